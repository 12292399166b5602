//! Shared by the adapter's test files.

use handset_core::model::{Product, ProviderName, Transaction};

/// A pending Veratad SMS check `id` that keeps `provider_ref` (the continuation).
pub fn kept(id: uuid::Uuid, provider_ref: Option<&str>) -> Transaction {
    let (partner, verification) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let pending = Transaction::pending(
        partner,
        verification,
        Product::PossessionSms,
        ProviderName::Veratad,
        "+14155550123",
        chrono::Utc::now(),
    );
    Transaction { id, provider_ref: provider_ref.map(str::to_owned), max_attempts: 5, ..pending }
}
