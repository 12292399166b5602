//! Shared by the adapter's test files.

use handset_core::model::{Product, ProviderName, Transaction};

/// A pending transaction of `product` that handset keeps for ID.me's `provider_ref`.
pub fn kept(product: Product, provider_ref: Option<String>) -> Transaction {
    let (partner, verification) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let pending =
        Transaction::pending(partner, verification, product, ProviderName::Idme, "+14155550123", chrono::Utc::now());
    Transaction { provider_ref, max_attempts: 5, ..pending }
}
