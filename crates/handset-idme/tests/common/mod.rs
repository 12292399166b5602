//! Shared by the adapter's test files.

use handset_core::model::{Product, ProviderName, Status, Transaction};

/// A pending transaction of `product` that handset keeps for ID.me's `provider_ref`.
pub fn kept(product: Product, provider_ref: Option<String>) -> Transaction {
    let now = chrono::Utc::now();
    Transaction {
        id: uuid::Uuid::new_v4(),
        verification_id: uuid::Uuid::new_v4(),
        partner_id: uuid::Uuid::new_v4(),
        product,
        provider: ProviderName::Idme,
        phone: Some("+14155550123".into()),
        birth_date: None,
        status: Status::Pending,
        created_at: now,
        updated_at: now,
        expires_at: None,
        attempts_used: 0,
        max_attempts: 5,
        code_hash: None,
        provider_ref,
        provider_verification: None,
        next_poll_at: None,
        poll_attempts: 0,
        redirect_url: None,
        redirect_uri: None,
        callback_url: None,
        name: None,
        metadata: serde_json::json!({}),
        result: None,
    }
}
