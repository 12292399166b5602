//! handset's domain, with no I/O of its own: phone numbers and birth dates that
//! validate on construction, transactions and their resource, the error
//! catalogue, the provider and store ports, routing policy, the sandbox
//! provider, and the `Gateway` service that makes every decision.

pub mod adaptive;
pub mod birth_date;
pub mod breaker;
pub mod callback;
pub mod config;
pub mod error;
pub mod funnel;
pub mod model;
pub mod observe;
pub mod partner_cache;
pub mod phone;
pub mod provider;
pub mod pumping;
pub mod rate_limit;
pub mod recent;
pub mod routing;
pub mod sandbox;
pub mod secret;
pub mod service;
pub mod store;
pub mod webhook;

pub use birth_date::BirthDate;
pub use error::{ApiError, ErrorCode};
pub use model::{Partner, Product, ProviderName, Status, Transaction, TransactionOut, VerificationOut};
pub use phone::{Phone, Region};
pub use service::{Gateway, GatewayError, GatewaySettings, StartIdentity, StartPossession};
