//! handset's HTTP side: the axum application, partner authentication and
//! request parsing, configuration, logs and metrics, and the `handset` CLI.
//! `main.rs` is a thin wrapper over `cli::run`.

pub mod app;
pub mod cli;
pub mod deadline;
pub mod dns;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod input;
pub mod routes;
pub mod serve;
pub mod settings;
pub mod telemetry;
pub mod worker;

pub use app::{AppState, Application};
pub use settings::Settings;

/// Selects ring as rustls' crypto backend for every TLS client in the process
/// (reqwest is built without a provider of its own, so only one backend is compiled).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
