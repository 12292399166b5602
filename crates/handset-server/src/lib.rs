//! handset's HTTP side: the axum application, partner authentication and
//! request parsing, configuration, logs and metrics, and the `handset` CLI.
//! `main.rs` is a thin wrapper over `cli::run`.

pub mod app;
pub mod cli;
pub mod error;
pub mod extract;
pub mod input;
pub mod routes;
pub mod settings;
pub mod telemetry;

pub use app::{AppState, Application};
pub use settings::Settings;
