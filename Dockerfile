# handset's image: `handset` (the gateway, the entry point) and `handset-sim`
# (the providers' stand-in docker-compose.yml runs beside it).
#
#   docker build -t handset .
#   docker run -p 8080:8080 handset
#
# Configuration comes from HANDSET__SECTION__KEY variables (see
# config/default.toml, compiled into the binary).

# Dependencies are compiled in a layer of their own (cargo-chef), rebuilt only
# when Cargo.toml or Cargo.lock change, not on every source change.
FROM rust:1.95-slim-bookworm AS chef
# make builds jemalloc, the binaries' allocator (tikv-jemalloc-sys).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# The build's settings (SQLite's compile flags) apply to the cached dependencies too.
COPY .cargo .cargo
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin handset --bin handset-sim

FROM debian:bookworm-slim AS runtime
# CA certificates for the providers' HTTPS APIs and partners' callback URLs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/handset --create-home handset
COPY --from=builder /src/target/release/handset /src/target/release/handset-sim /usr/local/bin/
USER handset
# The SQLite file, when no database.url is given, lands here.
WORKDIR /var/lib/handset
ENV HANDSET__SERVER__BIND=0.0.0.0:8080
EXPOSE 8080
# `handset health` asks this container's own /health (no curl in the image).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["handset", "health"]
ENTRYPOINT ["handset"]
CMD ["serve"]
