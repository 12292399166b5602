//! HTTP routes, one module per resource.

pub mod callbacks;
pub mod docs;
pub mod health;
pub mod identity;
pub mod possession;
pub mod providers;
pub mod sandbox;
pub mod stats;
pub mod transactions;
