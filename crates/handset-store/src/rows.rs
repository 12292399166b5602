//! Rows as both databases return them, and their conversion to domain records.

use chrono::{DateTime, Utc};
use handset_core::model::{
    CallbackAttempt, CallbackRecord, CallbackState, OutboxMessage, Partner, PersonName, Product, ProviderName, Status,
    Transaction, TransactionResult, Verification,
};
use handset_core::store::{PartnerByKey, PartnerRecord, StoreError};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

#[derive(sqlx::FromRow)]
pub(crate) struct PartnerRow {
    id: Uuid,
    name: String,
    products: Json<Vec<String>>,
    active: bool,
    webhook_secret: String,
    created_at: DateTime<Utc>,
}

impl TryFrom<PartnerRow> for Partner {
    type Error = StoreError;

    fn try_from(row: PartnerRow) -> Result<Self, StoreError> {
        let products = row
            .products
            .0
            .iter()
            .map(|p| Product::parse(p).ok_or_else(|| corrupt("partners.products", p)))
            .collect::<Result<_, _>>()?;
        Ok(Partner {
            id: row.id,
            name: row.name,
            products,
            active: row.active,
            webhook_secret: row.webhook_secret.into(),
            created_at: row.created_at,
        })
    }
}

/// A partner with the state of its rotations (`PARTNER_SELECT`).
#[derive(sqlx::FromRow)]
pub(crate) struct PartnerRecordRow {
    #[sqlx(flatten)]
    partner: PartnerRow,
    previous_api_key_expires_at: Option<DateTime<Utc>>,
    previous_webhook_secret_expires_at: Option<DateTime<Utc>>,
}

impl TryFrom<PartnerRecordRow> for PartnerRecord {
    type Error = StoreError;

    fn try_from(row: PartnerRecordRow) -> Result<Self, StoreError> {
        Ok(PartnerRecord {
            partner: row.partner.try_into()?,
            previous_key_expires_at: row.previous_api_key_expires_at,
            previous_webhook_secret_expires_at: row.previous_webhook_secret_expires_at,
        })
    }
}

/// A partner found by a key, and when that key stops working.
#[derive(sqlx::FromRow)]
pub(crate) struct PartnerByKeyRow {
    #[sqlx(flatten)]
    partner: PartnerRow,
    key_expires_at: Option<DateTime<Utc>>,
}

impl TryFrom<PartnerByKeyRow> for PartnerByKey {
    type Error = StoreError;

    fn try_from(row: PartnerByKeyRow) -> Result<Self, StoreError> {
        Ok(PartnerByKey { partner: row.partner.try_into()?, key_expires_at: row.key_expires_at })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct VerificationRow {
    id: Uuid,
    partner_id: Uuid,
    created_at: DateTime<Utc>,
}

impl From<VerificationRow> for Verification {
    fn from(row: VerificationRow) -> Self {
        Verification { id: row.id, partner_id: row.partner_id, created_at: row.created_at }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct TransactionRow {
    id: Uuid,
    verification_id: Uuid,
    partner_id: Uuid,
    product: String,
    provider: String,
    phone: Option<String>,
    birth_date: Option<String>,
    status_code: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    attempts_used: i32,
    max_attempts: i32,
    code_hash: Option<String>,
    provider_ref: Option<String>,
    provider_verification: Option<String>,
    next_poll_at: Option<DateTime<Utc>>,
    poll_attempts: i32,
    redirect_url: Option<String>,
    redirect_uri: Option<String>,
    callback_url: Option<String>,
    name: Option<Json<PersonName>>,
    metadata: Json<Value>,
    result: Option<Json<TransactionResult>>,
}

impl TryFrom<TransactionRow> for Transaction {
    type Error = StoreError;

    fn try_from(row: TransactionRow) -> Result<Self, StoreError> {
        Ok(Transaction {
            id: row.id,
            verification_id: row.verification_id,
            partner_id: row.partner_id,
            product: Product::parse(&row.product).ok_or_else(|| corrupt("transactions.product", &row.product))?,
            provider: ProviderName::parse(&row.provider)
                .ok_or_else(|| corrupt("transactions.provider", &row.provider))?,
            phone: row.phone,
            birth_date: row.birth_date,
            status: Status::from_code(row.status_code)
                .ok_or_else(|| corrupt("transactions.status_code", &row.status_code.to_string()))?,
            created_at: row.created_at,
            updated_at: row.updated_at,
            expires_at: row.expires_at,
            attempts_used: row.attempts_used,
            max_attempts: row.max_attempts,
            code_hash: row.code_hash,
            provider_ref: row.provider_ref,
            provider_verification: row.provider_verification,
            next_poll_at: row.next_poll_at,
            poll_attempts: row.poll_attempts,
            redirect_url: row.redirect_url,
            redirect_uri: row.redirect_uri,
            callback_url: row.callback_url,
            name: row.name.map(|n| n.0),
            metadata: row.metadata.0,
            result: row.result.map(|r| r.0),
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct OutboxRow {
    id: Uuid,
    transaction_id: Uuid,
    partner_id: Uuid,
    callback_url: String,
    payload: String,
    created_at: DateTime<Utc>,
    state: String,
    next_attempt_at: DateTime<Utc>,
    pub(crate) attempts: i32,
}

impl OutboxRow {
    pub(crate) fn message(&self) -> OutboxMessage {
        OutboxMessage {
            id: self.id,
            transaction_id: self.transaction_id,
            partner_id: self.partner_id,
            callback_url: self.callback_url.clone(),
            payload: self.payload.clone(),
            created_at: self.created_at,
        }
    }

    pub(crate) fn partner_id(&self) -> Uuid {
        self.partner_id
    }

    pub(crate) fn into_record(self, attempts: Vec<CallbackAttempt>) -> Result<CallbackRecord, StoreError> {
        Ok(CallbackRecord {
            message: self.message(),
            state: CallbackState::parse(&self.state).ok_or_else(|| corrupt("outbox.state", &self.state))?,
            next_attempt_at: self.next_attempt_at,
            attempts,
        })
    }
}

#[derive(Clone, sqlx::FromRow)]
pub(crate) struct AttemptRow {
    pub(crate) outbox_id: Uuid,
    attempted_at: DateTime<Utc>,
    status_code: Option<i32>,
    error: Option<String>,
    latency_ms: i64,
}

impl From<AttemptRow> for CallbackAttempt {
    fn from(row: AttemptRow) -> Self {
        CallbackAttempt {
            attempted_at: row.attempted_at,
            status_code: row.status_code,
            error: row.error,
            latency_ms: row.latency_ms,
        }
    }
}

fn corrupt(column: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{column} = {value:?}"))
}
