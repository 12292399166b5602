//! The partner API over real HTTP, on SQLite and on Postgres.

mod helpers;
mod receiver;

mod adaptive;
mod browser;
mod callbacks;
mod catalogue;
mod confirm;
mod dqe;
mod errors;
mod flows;
mod hardening;
mod idempotency;
mod idme;
mod operations;
mod operator_cli;
mod processes;
mod production;
mod pumping;
mod rate_limits;
mod rules;
mod sandbox;
mod stats;
mod veratad;
