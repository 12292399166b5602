//! The store suite: every test runs against a real SQLite file and a real
//! Postgres database (which must be reachable: see handset-testkit).

use std::sync::Arc;

use chrono::{Duration, Utc};
use handset_core::model::{CallbackAttempt, CallbackState};
use handset_core::model::{
    OutboxMessage, Partner, Product, ProviderName, ResultError, Status, Transaction, TransactionResult, Verification,
};
use handset_core::store::{AfterAttempt, Claim, Finalization, LocalCodeAttempt, NewPartner, Store, StoreError};
use handset_core::{ErrorCode, secret};
use handset_store::PoolSettings;
use handset_testkit::{Kind, TestDatabase};
use serde_json::json;
use uuid::Uuid;

struct Fixture {
    store: Arc<dyn Store>,
    db: TestDatabase,
    partner: Partner,
}

async fn fixture(kind: Kind) -> Fixture {
    let db = TestDatabase::new(kind).await;
    let store = handset_store::connect(&db.url, &PoolSettings::default()).unwrap();
    store.migrate().await.unwrap();
    let partner = partner("acme");
    store
        .insert_partner(&NewPartner { partner: partner.clone(), api_key_hash: secret::api_key_hash("key-acme") })
        .await
        .unwrap();
    Fixture { store, db, partner }
}

fn partner(name: &str) -> Partner {
    Partner {
        id: Uuid::new_v4(),
        name: name.into(),
        products: vec![Product::PossessionSms, Product::Identity],
        active: true,
        webhook_secret: "whsec_dGVzdA==".into(),
        created_at: Utc::now(),
    }
}

fn pending(partner: &Partner, verification: &Verification) -> Transaction {
    let now = Utc::now();
    let tx = Transaction::pending(
        partner.id,
        verification.id,
        Product::PossessionSms,
        ProviderName::Sandbox,
        "+18885551234",
        now,
    );
    Transaction {
        expires_at: Some(now + Duration::minutes(10)),
        max_attempts: 5,
        code_hash: Some(secret::code_hash(b"test-pepper", Uuid::nil(), "123123")),
        provider_ref: Some(format!("ref-{}", Uuid::new_v4())),
        provider_verification: Some("idme-verification".into()),
        redirect_uri: Some("https://partner.example/done".into()),
        callback_url: Some("https://partner.example/hook".into()),
        metadata: json!({"order": 42, "tags": ["a", "b"]}),
        ..tx
    }
}

fn verification(partner: &Partner) -> Verification {
    Verification { id: Uuid::new_v4(), partner_id: partner.id, created_at: Utc::now() }
}

fn outbox(tx: &Transaction) -> OutboxMessage {
    OutboxMessage::of(tx, tx.callback_url.clone().unwrap(), tx.updated_at)
}

async fn outbox_of(f: &Fixture, transaction_id: Uuid) -> Vec<OutboxMessage> {
    f.store.callbacks_of_transaction(transaction_id).await.unwrap().into_iter().map(|r| r.message).collect()
}

fn succeeded(tx: &Transaction) -> Transaction {
    Transaction {
        status: Status::Succeeded,
        result: Some(TransactionResult::Phone { phone: "+18885551234".into() }),
        updated_at: Utc::now(),
        ..tx.clone()
    }
}

async fn insert_pending(f: &Fixture) -> Transaction {
    let v = verification(&f.partner);
    let tx = pending(&f.partner, &v);
    f.store.insert_transaction(&tx, Some(&v), None).await.unwrap();
    tx
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::fixture(super::Kind::Sqlite).await).await } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::fixture(super::Kind::Postgres).await).await } )*
        }
    };
}

on_both_stores!(
    migrations_are_idempotent,
    partners_by_key_hash,
    key_rotation_overlaps,
    transactions_round_trip,
    attempts_stop_at_the_limit,
    attempts_written_only_over_the_count_the_caller_saw,
    concurrent_attempts_never_exceed_the_limit,
    local_code_attempts_decide_in_one_write,
    a_failed_start_writes_nothing,
    rate_hits_stop_at_the_limit,
    expired_transactions_take_no_attempt,
    finalize_writes_state_and_outbox_once,
    final_insert_and_its_outbox_are_one_transaction,
    failed_outbox_write_rolls_back_the_state_change,
    ping_fails_when_the_database_is_gone,
    claims_are_exclusive_and_leases_expire,
    retries_wait_for_their_time,
    concurrent_claims_hand_out_each_callback_once,
    expired_pending_lists_only_overdue_checks,
    purge_removes_personal_data_and_keeps_the_audit_trail,
    provider_refs_and_polls,
);

/// Migrating a database that holds data again changes nothing: every row
/// (partner, verification, pending and final transactions, outbox) reads back equal.
async fn migrations_are_idempotent(f: Fixture) {
    let pending = insert_pending(&f).await;
    let (done, _) = insert_final_with_callback(&f).await;
    let before = snapshot(&f, &[pending.id, done.id]).await;
    f.store.migrate().await.unwrap();
    f.store.migrate().await.unwrap();
    f.store.ping().await.unwrap();
    assert_eq!(snapshot(&f, &[pending.id, done.id]).await, before);
    assert!(before.contains(pending.code_hash.as_deref().unwrap()), "the snapshot covers stored fields");
}

/// Every stored field of the partner, these transactions, their verifications and callbacks.
async fn snapshot(f: &Fixture, ids: &[Uuid]) -> String {
    let partner = by_key(f, "key-acme").await.unwrap();
    let mut out = format!("{partner:?} {}\n", partner.webhook_secret.expose());
    for id in ids {
        let tx = f.store.transaction(*id).await.unwrap().unwrap();
        let result = tx.result.as_ref().map(|r| serde_json::to_string(r).unwrap());
        out += &format!(
            "{tx:?} {:?} {:?} {:?} {:?} {:?} {:?} {} {result:?}\n",
            tx.phone, tx.birth_date, tx.code_hash, tx.provider_ref, tx.redirect_uri, tx.callback_url, tx.metadata
        );
        out += &format!("{:?}\n", f.store.verification(tx.verification_id).await.unwrap().unwrap());
        out += &format!("{:?}\n", f.store.callbacks_of_transaction(*id).await.unwrap());
    }
    out
}

/// The partner an API key authenticates now.
async fn by_key(f: &Fixture, key: &str) -> Option<handset_core::Partner> {
    let found = f.store.partner_by_key_hash(&secret::api_key_hash(key), chrono::Utc::now()).await.unwrap();
    found.map(|found| found.partner)
}

async fn partners_by_key_hash(f: Fixture) {
    let found = by_key(&f, "key-acme").await.unwrap();
    assert_eq!(found.id, f.partner.id);
    assert_eq!(found.products, vec![Product::PossessionSms, Product::Identity]);
    assert!(found.active);
    assert!(by_key(&f, "other").await.is_none());

    let same_key = NewPartner { partner: partner("copy"), api_key_hash: secret::api_key_hash("key-acme") };
    assert!(matches!(f.store.insert_partner(&same_key).await, Err(StoreError::Conflict(_))));

    assert!(f.store.set_partner_active(f.partner.id, false).await.unwrap());
    assert!(!by_key(&f, "key-acme").await.unwrap().active);
    assert!(!f.store.set_partner_active(Uuid::new_v4(), false).await.unwrap());
}

/// A rotated key's predecessor works until its overlap ends (by the `now`
/// given), is reported with that end, and a rotation without overlap drops it.
async fn key_rotation_overlaps(f: Fixture) {
    let now = chrono::Utc::now();
    let until = now + chrono::Duration::minutes(10);
    let hash = secret::api_key_hash;
    assert!(f.store.rotate_api_key(f.partner.id, &hash("key-2"), Some(until)).await.unwrap());
    let current = f.store.partner_by_key_hash(&hash("key-2"), now).await.unwrap().unwrap();
    assert_eq!((current.partner.id, current.key_expires_at), (f.partner.id, None));
    let previous = f.store.partner_by_key_hash(&hash("key-acme"), now).await.unwrap().unwrap();
    assert_eq!(previous.partner.id, f.partner.id);
    assert_eq!(previous.key_expires_at.map(|t| t.timestamp_millis()), Some(until.timestamp_millis()));
    assert!(f.store.partner_by_key_hash(&hash("key-acme"), until).await.unwrap().is_none(), "over at its end");
    let record = f.store.partner(f.partner.id).await.unwrap().unwrap();
    assert_eq!(record.previous_key_expires_at.map(|t| t.timestamp_millis()), Some(until.timestamp_millis()));
    assert_eq!(f.store.partners().await.unwrap().len(), 1);

    assert!(f.store.rotate_api_key(f.partner.id, &hash("key-3"), None).await.unwrap());
    for old in ["key-acme", "key-2"] {
        assert!(f.store.partner_by_key_hash(&hash(old), now).await.unwrap().is_none(), "{old}");
    }
    assert!(f.store.partner(f.partner.id).await.unwrap().unwrap().previous_key_expires_at.is_none());
    assert!(!f.store.rotate_api_key(Uuid::new_v4(), &hash("key-4"), None).await.unwrap());

    assert!(f.store.rotate_webhook_secret(f.partner.id, "whsec_bmV3", Some(until)).await.unwrap());
    let record = f.store.partner(f.partner.id).await.unwrap().unwrap();
    assert_eq!(record.partner.webhook_secret.expose(), "whsec_bmV3");
    assert!(record.previous_webhook_secret_expires_at.is_some());
}

async fn transactions_round_trip(f: Fixture) {
    let tx = insert_pending(&f).await;
    let read = f.store.transaction(tx.id).await.unwrap().unwrap();
    assert_eq!(read.to_resource().metadata, tx.metadata);
    assert_eq!(read.phone, tx.phone);
    assert_eq!(read.status, Status::Pending);
    assert_eq!(read.code_hash, tx.code_hash);
    assert_eq!(read.provider_ref, tx.provider_ref);
    assert_eq!(read.provider_verification.as_deref(), Some("idme-verification"));
    assert_eq!(read.expires_at.map(|t| t.timestamp_millis()), tx.expires_at.map(|t| t.timestamp_millis()));
    assert_eq!(read.created_at.timestamp_micros(), tx.created_at.timestamp_micros());

    let verification = f.store.verification(tx.verification_id).await.unwrap().unwrap();
    assert_eq!(verification.partner_id, f.partner.id);
    let second = Transaction { id: Uuid::new_v4(), created_at: tx.created_at + Duration::seconds(1), ..tx.clone() };
    f.store.insert_transaction(&second, None, None).await.unwrap();
    let all = f.store.transactions_of_verification(tx.verification_id).await.unwrap();
    assert_eq!(all.iter().map(|t| t.id).collect::<Vec<_>>(), vec![tx.id, second.id]);
    assert!(f.store.transaction(Uuid::new_v4()).await.unwrap().is_none());
}

async fn attempts_stop_at_the_limit(f: Fixture) {
    let tx = insert_pending(&f).await;
    for expected in 1..=5 {
        assert_eq!(f.store.use_attempt(tx.id, Utc::now(), None).await.unwrap(), Some(expected));
    }
    assert_eq!(f.store.use_attempt(tx.id, Utc::now(), None).await.unwrap(), None);
    assert_eq!(f.store.transaction(tx.id).await.unwrap().unwrap().attempts_used, 5);
}

/// A write on a copy of the transaction that saw another count of used
/// attempts (another replica used one since) changes nothing.
async fn attempts_written_only_over_the_count_the_caller_saw(f: Fixture) {
    let tx = insert_pending(&f).await;
    assert_eq!(f.store.use_attempt(tx.id, Utc::now(), Some(1)).await.unwrap(), None);
    assert_eq!(f.store.use_attempt(tx.id, Utc::now(), Some(0)).await.unwrap(), Some(1));
    assert_eq!(f.store.use_attempt(tx.id, Utc::now(), Some(0)).await.unwrap(), None, "the copy that saw 0 is stale");
    let (results, messages) = local_outcomes(&tx);
    let stale = LocalCodeAttempt { expected_attempts: Some(0), ..local_attempt(&tx, true, &results, &messages) };
    assert_eq!(f.store.attempt_local_code(stale).await.unwrap(), None);
    let stored = f.store.transaction(tx.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.attempts_used), (Status::Pending, 1), "nothing written");
    assert!(outbox_of(&f, tx.id).await.is_empty(), "no callback owed");
    let without_callback = LocalCodeAttempt {
        on_success: None,
        on_exhausted: None,
        expected_attempts: Some(0),
        ..local_attempt(&tx, false, &results, &messages)
    };
    assert_eq!(f.store.attempt_local_code(without_callback).await.unwrap(), None);
    let current = LocalCodeAttempt { expected_attempts: Some(1), ..local_attempt(&tx, true, &results, &messages) };
    assert_eq!(f.store.attempt_local_code(current).await.unwrap(), Some((Status::Succeeded, 2)));
    assert_eq!(outbox_of(&f, tx.id).await.len(), 1);
}

async fn concurrent_attempts_never_exceed_the_limit(f: Fixture) {
    let tx = insert_pending(&f).await;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = f.store.clone();
            tokio::spawn(async move { store.use_attempt(tx.id, Utc::now(), None).await.unwrap() })
        })
        .collect();
    let mut granted = Vec::new();
    for task in tasks {
        if let Some(n) = task.await.unwrap() {
            granted.push(n);
        }
    }
    granted.sort();
    assert_eq!(granted, vec![1, 2, 3, 4, 5]);
}

async fn ids_and_payloads(f: &Fixture, transaction_id: Uuid) -> Vec<(Uuid, String)> {
    outbox_of(f, transaction_id).await.into_iter().map(|m| (m.id, m.payload)).collect()
}

fn local_attempt<'a>(
    tx: &Transaction,
    matched: bool,
    results: &'a (TransactionResult, TransactionResult),
    messages: &'a (OutboxMessage, OutboxMessage),
) -> LocalCodeAttempt<'a> {
    LocalCodeAttempt {
        id: tx.id,
        now: Utc::now(),
        matched,
        success: &results.0,
        exhausted: &results.1,
        on_success: Some(&messages.0),
        on_exhausted: Some(&messages.1),
        expected_attempts: None,
    }
}

fn local_outcomes(tx: &Transaction) -> ((TransactionResult, TransactionResult), (OutboxMessage, OutboxMessage)) {
    let success = TransactionResult::Phone { phone: "+18885551234".into() };
    let exhausted = TransactionResult::failure(ResultError::new(ErrorCode::RetryLimitExceeded));
    let done = succeeded(tx);
    let failed = Transaction { status: Status::Failed, result: Some(exhausted.clone()), ..tx.clone() };
    ((success, exhausted), (outbox(&done), outbox(&failed)))
}

/// A code checked by handset: wrong codes count and stay pending until the
/// last one ends the check (with its callback); a match succeeds (with its
/// callback); each in one write, exactly the limit under concurrency.
async fn local_code_attempts_decide_in_one_write(f: Fixture) {
    let tx = insert_pending(&f).await;
    let (results, messages) = local_outcomes(&tx);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (store, tx, results, messages) = (f.store.clone(), tx.clone(), results.clone(), messages.clone());
            tokio::spawn(async move {
                store.attempt_local_code(local_attempt(&tx, false, &results, &messages)).await.unwrap()
            })
        })
        .collect();
    let mut granted = Vec::new();
    for task in tasks {
        granted.extend(task.await.unwrap());
    }
    granted.sort_by_key(|(_, used)| *used);
    let expected: Vec<(Status, i32)> = vec![
        (Status::Pending, 1),
        (Status::Pending, 2),
        (Status::Pending, 3),
        (Status::Pending, 4),
        (Status::Failed, 5),
    ];
    assert_eq!(granted, expected);
    let read = f.store.transaction(tx.id).await.unwrap().unwrap();
    assert_eq!((read.status, read.attempts_used), (Status::Failed, 5));
    assert_eq!(read.result, Some(results.1.clone()));
    assert_eq!(ids_and_payloads(&f, tx.id).await, [(messages.1.id, messages.1.payload.clone())], "once");
    assert_eq!(f.store.attempt_local_code(local_attempt(&tx, true, &results, &messages)).await.unwrap(), None);

    let tx = insert_pending(&f).await;
    let (results, messages) = local_outcomes(&tx);
    assert_eq!(
        f.store.attempt_local_code(local_attempt(&tx, false, &results, &messages)).await.unwrap(),
        Some((Status::Pending, 1))
    );
    assert!(outbox_of(&f, tx.id).await.is_empty(), "a wrong code owes no callback");
    assert_eq!(
        f.store.attempt_local_code(local_attempt(&tx, true, &results, &messages)).await.unwrap(),
        Some((Status::Succeeded, 2))
    );
    let read = f.store.transaction(tx.id).await.unwrap().unwrap();
    assert_eq!((read.status, read.result), (Status::Succeeded, Some(results.0.clone())));
    assert_eq!(ids_and_payloads(&f, tx.id).await, [(messages.0.id, messages.0.payload.clone())]);
    assert_eq!(f.store.attempt_local_code(local_attempt(&tx, true, &results, &messages)).await.unwrap(), None);

    // Past the deadline nothing is written.
    let tx = insert_pending(&f).await;
    let (results, messages) = local_outcomes(&tx);
    let late = LocalCodeAttempt { now: tx.expires_at.unwrap(), ..local_attempt(&tx, true, &results, &messages) };
    assert_eq!(f.store.attempt_local_code(late).await.unwrap(), None);
    assert_eq!(f.store.transaction(tx.id).await.unwrap().unwrap().status, Status::Pending);
}

/// A start whose transaction cannot be written leaves nothing behind (not
/// its verification either), and the next write works (on SQLite, the
/// writer connection went back to the pool with no transaction open).
async fn a_failed_start_writes_nothing(f: Fixture) {
    let tx = insert_pending(&f).await;
    let v = verification(&f.partner);
    let clash = Transaction { verification_id: v.id, ..tx.clone() };
    assert!(f.store.insert_transaction(&clash, Some(&v), None).await.is_err(), "the id is taken");
    assert!(f.store.verification(v.id).await.unwrap().is_none(), "the verification was rolled back");
    let next = insert_pending(&f).await;
    assert_eq!(f.store.use_attempt(next.id, Utc::now(), None).await.unwrap(), Some(1));
    assert!(f.store.verification(next.verification_id).await.unwrap().is_some());
}

/// The per-phone window: concurrent hits against a limit take exactly the
/// limit, and refused ones are not counted (a full window stays at its limit).
async fn rate_hits_stop_at_the_limit(f: Fixture) {
    let window = Utc::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = f.store.clone();
            tokio::spawn(async move { store.take_rate_hit("phone:x", window, 5).await.unwrap() })
        })
        .collect();
    let mut taken = 0;
    for task in tasks {
        taken += usize::from(task.await.unwrap());
    }
    assert_eq!(taken, 5);
    assert_eq!(f.store.add_rate_hits("phone:x", window, 0).await.unwrap(), 5, "refusals were not counted");
    assert!(f.store.take_rate_hit("phone:y", window, 1).await.unwrap(), "another scope has its own window");
}

async fn expired_transactions_take_no_attempt(f: Fixture) {
    let tx = insert_pending(&f).await;
    let after_expiry = tx.expires_at.unwrap() + Duration::milliseconds(1);
    assert_eq!(f.store.use_attempt(tx.id, after_expiry, None).await.unwrap(), None);
    assert_eq!(f.store.use_attempt(tx.id, Utc::now(), None).await.unwrap(), Some(1));
}

async fn finalize_writes_state_and_outbox_once(f: Fixture) {
    let tx = insert_pending(&f).await;
    let done = succeeded(&tx);
    let message = outbox(&done);
    assert!(f.store.finalize(Finalization { transaction: &done, outbox: Some(&message) }).await.unwrap());
    let read = f.store.transaction(tx.id).await.unwrap().unwrap();
    assert_eq!(read.status, Status::Succeeded);
    assert_eq!(read.result, done.result);

    let failed = Transaction {
        status: Status::Failed,
        result: Some(TransactionResult::failure(ResultError::new(ErrorCode::CodeExpired))),
        ..tx.clone()
    };
    let second = outbox(&failed);
    assert!(!f.store.finalize(Finalization { transaction: &failed, outbox: Some(&second) }).await.unwrap());
    assert_eq!(f.store.transaction(tx.id).await.unwrap().unwrap().status, Status::Succeeded);
    let messages = outbox_of(&f, tx.id).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].id, message.id);
    assert_eq!(messages[0].payload, message.payload);
}

async fn final_insert_and_its_outbox_are_one_transaction(f: Fixture) {
    let v = verification(&f.partner);
    let first = succeeded(&pending(&f.partner, &v));
    let message = outbox(&first);
    f.store.insert_transaction(&first, Some(&v), Some(&message)).await.unwrap();
    assert_eq!(outbox_of(&f, first.id).await.len(), 1);

    // Same outbox id again: the outbox insert fails, so neither the second
    // transaction nor its new verification may exist afterwards.
    let v2 = verification(&f.partner);
    let second = succeeded(&pending(&f.partner, &v2));
    let clash = OutboxMessage { transaction_id: second.id, ..message.clone() };
    assert!(f.store.insert_transaction(&second, Some(&v2), Some(&clash)).await.is_err());
    assert!(f.store.transaction(second.id).await.unwrap().is_none());
    assert!(f.store.verification(v2.id).await.unwrap().is_none());
}

async fn failed_outbox_write_rolls_back_the_state_change(f: Fixture) {
    let other = succeeded(&insert_pending(&f).await);
    let taken = outbox(&other);
    assert!(f.store.finalize(Finalization { transaction: &other, outbox: Some(&taken) }).await.unwrap());

    let tx = insert_pending(&f).await;
    let done = succeeded(&tx);
    let clash = OutboxMessage { transaction_id: tx.id, ..taken };
    assert!(f.store.finalize(Finalization { transaction: &done, outbox: Some(&clash) }).await.is_err());
    assert_eq!(f.store.transaction(tx.id).await.unwrap().unwrap().status, Status::Pending);
}

/// Readiness: the store's own ping fails once its database is gone (on
/// SQLite, once the file it had open was removed, though the open
/// connections would go on working on the deleted file).
async fn ping_fails_when_the_database_is_gone(f: Fixture) {
    f.store.ping().await.unwrap();
    f.db.destroy().await;
    f.store.ping().await.expect_err("ping after the database is gone");
}

async fn insert_final_with_callback(f: &Fixture) -> (Transaction, OutboxMessage) {
    let v = verification(&f.partner);
    let tx = succeeded(&pending(&f.partner, &v));
    let message = outbox(&tx);
    f.store.insert_transaction(&tx, Some(&v), Some(&message)).await.unwrap();
    (tx, message)
}

fn claim(owner: &str, now: chrono::DateTime<Utc>) -> Claim<'_> {
    Claim { now, lease_until: now + Duration::minutes(1), owner, limit: 10 }
}

fn attempt(status: i32) -> CallbackAttempt {
    CallbackAttempt { attempted_at: Utc::now(), status_code: Some(status), error: None, latency_ms: 3 }
}

async fn claims_are_exclusive_and_leases_expire(f: Fixture) {
    let (tx, message) = insert_final_with_callback(&f).await;
    let now = Utc::now();
    let first = f.store.claim_due_callbacks(claim("a", now)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].message.id, message.id);
    assert_eq!(first[0].message.payload, message.payload);
    assert_eq!(first[0].attempts_before, 0);
    assert_eq!(first[0].webhook_secret, f.partner.webhook_secret);
    assert!(f.store.claim_due_callbacks(claim("b", now)).await.unwrap().is_empty(), "leased to a");
    // a dies; after its lease, b takes the callback over and a's late report is refused.
    let later = now + Duration::minutes(2);
    let taken = f.store.claim_due_callbacks(claim("b", later)).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].attempts_before, 0, "a claim that was never reported costs no attempt");
    assert!(!f.store.finish_callback_attempt(message.id, "a", &attempt(200), AfterAttempt::Delivered).await.unwrap());
    assert!(f.store.finish_callback_attempt(message.id, "b", &attempt(204), AfterAttempt::Delivered).await.unwrap());
    assert!(f.store.claim_due_callbacks(claim("c", later + Duration::minutes(5))).await.unwrap().is_empty());
    let records = f.store.callbacks_of_transaction(tx.id).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].state, CallbackState::Delivered);
    assert_eq!(records[0].attempts.len(), 1, "only b's attempt is recorded");
    assert_eq!(records[0].attempts[0].status_code, Some(204));
    assert_eq!(f.store.due_callbacks(later).await.unwrap(), 0);
}

async fn retries_wait_for_their_time(f: Fixture) {
    let (tx, message) = insert_final_with_callback(&f).await;
    let now = Utc::now();
    assert_eq!(f.store.due_callbacks(now).await.unwrap(), 1);
    f.store.claim_due_callbacks(claim("a", now)).await.unwrap();
    let retry_at = now + Duration::seconds(30);
    let failed = CallbackAttempt { status_code: None, error: Some("timeout".into()), ..attempt(0) };
    assert!(f.store.finish_callback_attempt(message.id, "a", &failed, AfterAttempt::RetryAt(retry_at)).await.unwrap());
    assert!(f.store.claim_due_callbacks(claim("a", now + Duration::seconds(29))).await.unwrap().is_empty());
    let again = f.store.claim_due_callbacks(claim("a", retry_at)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts_before, 1);
    assert!(f.store.finish_callback_attempt(message.id, "a", &attempt(500), AfterAttempt::GiveUp).await.unwrap());
    let record = &f.store.callbacks_of_transaction(tx.id).await.unwrap()[0];
    assert_eq!(record.state, CallbackState::Failed);
    assert_eq!(record.attempts.len(), 2);
    assert_eq!(record.attempts[0].error.as_deref(), Some("timeout"));
    assert!(f.store.claim_due_callbacks(claim("a", retry_at + Duration::days(1))).await.unwrap().is_empty());
}

async fn concurrent_claims_hand_out_each_callback_once(f: Fixture) {
    for _ in 0..40 {
        insert_final_with_callback(&f).await;
    }
    let now = Utc::now();
    let tasks: Vec<_> = (0..4)
        .map(|worker| {
            let store = f.store.clone();
            tokio::spawn(async move {
                let owner = format!("w{worker}");
                let mut ids = Vec::new();
                loop {
                    let got = store
                        .claim_due_callbacks(Claim {
                            now,
                            lease_until: now + Duration::minutes(1),
                            owner: &owner,
                            limit: 3,
                        })
                        .await
                        .unwrap();
                    if got.is_empty() {
                        break ids;
                    }
                    ids.extend(got.into_iter().map(|c| c.message.id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let total = all.len();
    all.sort();
    all.dedup();
    assert_eq!(total, 40, "every callback claimed");
    assert_eq!(all.len(), 40, "none claimed twice");
}

async fn expired_pending_lists_only_overdue_checks(f: Fixture) {
    let tx = insert_pending(&f).await;
    let (done, _) = insert_final_with_callback(&f).await;
    let deadline = tx.expires_at.unwrap();
    assert!(f.store.expired_pending(deadline - Duration::seconds(1), 10).await.unwrap().is_empty());
    let overdue = f.store.expired_pending(deadline, 10).await.unwrap();
    assert_eq!(overdue.iter().map(|t| t.id).collect::<Vec<_>>(), vec![tx.id]);
    assert!(!overdue.iter().any(|t| t.id == done.id));
}

async fn purge_removes_personal_data_and_keeps_the_audit_trail(f: Fixture) {
    let (old, message) = insert_final_with_callback(&f).await;
    f.store.claim_due_callbacks(claim("a", Utc::now())).await.unwrap();
    f.store.finish_callback_attempt(message.id, "a", &attempt(200), AfterAttempt::Delivered).await.unwrap();
    let still_pending = insert_pending(&f).await;
    let cutoff = Utc::now() + Duration::seconds(1);
    assert_eq!(f.store.purge_personal_data(cutoff, Utc::now()).await.unwrap(), 1);
    let purged = f.store.transaction(old.id).await.unwrap().unwrap();
    assert_eq!(purged.phone, None);
    assert_eq!(purged.metadata, json!({}));
    assert_eq!(purged.result, Some(TransactionResult::Purged { purged: true }));
    assert_eq!(purged.status, Status::Succeeded, "the outcome stays");
    let record = &f.store.callbacks_of_transaction(old.id).await.unwrap()[0];
    assert_eq!(record.message.payload, "", "the delivered body is gone");
    assert_eq!(record.attempts.len(), 1, "the delivery log stays");
    assert!(f.store.transaction(still_pending.id).await.unwrap().unwrap().phone.is_some());
    assert_eq!(f.store.purge_personal_data(cutoff, Utc::now()).await.unwrap(), 0, "purged once");
}

async fn provider_refs_and_polls(f: Fixture) {
    let v = verification(&f.partner);
    let now = Utc::now();
    let tx = Transaction {
        provider: ProviderName::Idme,
        product: Product::Identity,
        next_poll_at: Some(now + Duration::seconds(2)),
        ..pending(&f.partner, &v)
    };
    f.store.insert_transaction(&tx, Some(&v), None).await.unwrap();
    let reference = tx.provider_ref.clone().unwrap();
    let found = f.store.transaction_by_provider_ref(ProviderName::Idme, &reference).await.unwrap().unwrap();
    assert_eq!(found.id, tx.id);
    assert!(f.store.transaction_by_provider_ref(ProviderName::Veratad, &reference).await.unwrap().is_none());

    assert!(f.store.claim_due_polls(now, now + Duration::minutes(1), 10).await.unwrap().is_empty(), "not due yet");
    let due_at = now + Duration::seconds(2);
    let claimed = f.store.claim_due_polls(due_at, due_at + Duration::minutes(1), 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].poll_attempts, 1);
    assert!(f.store.claim_due_polls(due_at, due_at + Duration::minutes(1), 10).await.unwrap().is_empty(), "leased");
    f.store.schedule_poll(tx.id, due_at + Duration::seconds(4)).await.unwrap();
    assert_eq!(f.store.claim_due_polls(due_at + Duration::seconds(4), due_at, 10).await.unwrap().len(), 1);

    let done = succeeded(&tx);
    f.store.finalize(Finalization { transaction: &done, outbox: None }).await.unwrap();
    assert!(
        f.store.claim_due_polls(due_at + Duration::days(1), due_at, 10).await.unwrap().is_empty(),
        "final: no polls"
    );
}

/// Production Postgres usually requires TLS: `?sslmode=require` must connect
/// (the local server has Debian's default certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls() {
    let db = TestDatabase::postgres().await;
    let separator = if db.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}sslmode=require", db.url);
    let store = handset_store::connect(&url, &PoolSettings::default()).unwrap();
    store.migrate().await.expect("migrate over TLS");
    store.ping().await.expect("ping over TLS");
    // Every session the store holds on its database is encrypted, as the
    // server itself reports (not merely a connection that did not fail).
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url).await.unwrap();
    let database = db.url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
    let (sessions, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(*) FILTER (WHERE s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
    )
    .bind(&database)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(sessions > 0, "the store keeps a session open");
    assert_eq!(encrypted, sessions, "every session of the store uses TLS");
}

/// SQLite's migrations are applied by the store itself (not by sqlx) and
/// recorded as sqlx records them: a file sqlx's own migrator migrated is
/// accepted as up to date, and a file this store migrated is one sqlx's
/// migrator finds nothing to do on (same versions, same checksums).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_migrations_agree_with_sqlx() {
    use sqlx::migrate::Migrator;
    let migrator = Migrator::new(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations/sqlite")))
        .await
        .unwrap();

    // Migrated by sqlx, then opened by the store.
    let by_sqlx = TestDatabase::sqlite();
    let pool = sqlx::SqlitePool::connect(&format!("{}?mode=rwc", by_sqlx.url)).await.unwrap();
    migrator.run(&pool).await.unwrap();
    let store = handset_store::connect(&by_sqlx.url, &PoolSettings::default()).unwrap();
    store.migrate().await.expect("the store accepts sqlx's record");
    pool.close().await;

    // Migrated by the store, then checked by sqlx: every migration applied, none dirty.
    let by_store = TestDatabase::sqlite();
    let store = handset_store::connect(&by_store.url, &PoolSettings::default()).unwrap();
    store.migrate().await.unwrap();
    let pool = sqlx::SqlitePool::connect(&by_store.url).await.unwrap();
    migrator.run(&pool).await.expect("sqlx finds the store's record consistent");
    let applied: Vec<(i64, bool)> = sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
        .fetch_all(&pool)
        .await
        .unwrap();
    let expected: Vec<(i64, bool)> =
        migrator.iter().filter(|m| !m.migration_type.is_down_migration()).map(|m| (m.version, true)).collect();
    assert_eq!(applied, expected);
}

/// A SQLite file from a newer handset (a migration this build does not
/// know), or one whose applied migration was edited, is refused with a
/// message that says so, and nothing is changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refuses_a_schema_it_does_not_know() {
    for (tamper, expected) in [
        (
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (99990001, 'future', TRUE, x'00', 0)",
            "does not know",
        ),
        ("UPDATE _sqlx_migrations SET checksum = x'00' WHERE version = 1", "was changed"),
        ("UPDATE _sqlx_migrations SET success = FALSE WHERE version = 1", "half-applied"),
    ] {
        let db = TestDatabase::sqlite();
        let store = handset_store::connect(&db.url, &PoolSettings::default()).unwrap();
        store.migrate().await.unwrap();
        let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
        sqlx::query(tamper).execute(&pool).await.unwrap();
        let error = store.migrate().await.expect_err(tamper).to_string();
        assert!(error.contains(expected), "{tamper}: {error}");
    }
}

/// Writes queued together share one commit, but each is its own unit: one
/// that fails (a duplicate id) is rolled back alone, and the writes grouped
/// with it are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_failing_write_spares_its_group() {
    let f = fixture(Kind::Sqlite).await;
    let taken = insert_pending(&f).await;
    let mut writes = Vec::new();
    for i in 0..40 {
        let v = verification(&f.partner);
        let tx =
            if i % 4 == 0 { Transaction { verification_id: v.id, ..taken.clone() } } else { pending(&f.partner, &v) };
        let store = f.store.clone();
        writes.push(tokio::spawn(async move {
            let outcome = store.insert_transaction(&tx, Some(&v), None).await;
            (tx.id, v.id, outcome.is_ok())
        }));
    }
    let mut kept = 0;
    for write in writes {
        let (tx_id, verification_id, ok) = write.await.unwrap();
        let verification = f.store.verification(verification_id).await.unwrap();
        if tx_id == taken.id {
            assert!(!ok, "a duplicate transaction id is refused");
            assert!(verification.is_none(), "its verification was rolled back with it");
        } else {
            assert!(ok);
            assert!(verification.is_some() && f.store.transaction(tx_id).await.unwrap().is_some());
            kept += 1;
        }
    }
    assert_eq!(kept, 30);
}

/// A migrated Postgres database, its store, and a connection of its own to
/// change the schema behind the store's back.
async fn migrated_postgres() -> (TestDatabase, Arc<dyn Store>, sqlx::PgConnection) {
    let db = TestDatabase::postgres().await;
    let store = handset_store::connect(&db.url, &PoolSettings::default()).unwrap();
    store.migrate().await.unwrap();
    let admin = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url).await.unwrap();
    (db, store, admin)
}

/// An index that an interrupted `CREATE INDEX CONCURRENTLY` left invalid (a
/// deadlock between replicas migrating at once can do it) is rebuilt by
/// the next migration, rather than skipped forever by `IF NOT EXISTS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_rebuild_invalid_indexes() {
    let (_db, store, mut admin) = migrated_postgres().await;
    sqlx::query("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'transactions_number_range'::regclass")
        .execute(&mut admin)
        .await
        .unwrap();
    assert!(!index_valid(&mut admin).await);
    store.migrate().await.expect("migrate rebuilds");
    assert!(index_valid(&mut admin).await, "rebuilt and valid again");
}

async fn index_valid(admin: &mut sqlx::PgConnection) -> bool {
    let query = "SELECT indisvalid FROM pg_index WHERE indexrelid = 'transactions_number_range'::regclass";
    sqlx::query_scalar::<_, bool>(query).fetch_one(admin).await.unwrap()
}

/// An upgrade interrupted while building an index that replaces another
/// (`transactions_provider_ref_set`, then the old one dropped) ends, on the
/// next migration, with the new index valid and the old one gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_interrupted_index_replacement_completes() {
    let (_db, store, mut admin) = migrated_postgres().await;
    // As a database whose migration 16 was cut short: the old index still
    // there, the new one left invalid, 16 and 17 not recorded as applied.
    let interrupted = "CREATE INDEX transactions_provider_ref ON transactions (provider, provider_ref); \
         UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'transactions_provider_ref_set'::regclass; \
         DELETE FROM _sqlx_migrations WHERE version IN (16, 17)";
    sqlx::raw_sql(interrupted).execute(&mut admin).await.unwrap();
    store.migrate().await.expect("migrate completes the replacement");
    let indexes: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE c.relname LIKE 'transactions_provider_ref%' ORDER BY 1",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(indexes, vec![("transactions_provider_ref_set".to_owned(), true)]);
}

/// A matching code's write that meets a connection the database closed (a
/// restart, before anything told the pool) runs once more on a live one:
/// a confirm that starts from the start's copy writes before it reads, so
/// no read is there to find the loss first. A wrong code's write is not
/// repeated (it might count the attempt twice) and fails as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_matching_code_survives_a_closed_connection() {
    let f = fixture(Kind::Postgres).await;
    let terminate = async |f: &Fixture| assert!(f.db.close_connections().await > 0, "the store had connections");

    let tx = insert_pending(&f).await;
    let (results, messages) = local_outcomes(&tx);
    terminate(&f).await;
    let matched = LocalCodeAttempt { expected_attempts: Some(0), ..local_attempt(&tx, true, &results, &messages) };
    assert_eq!(f.store.attempt_local_code(matched).await.unwrap(), Some((Status::Succeeded, 1)));
    assert_eq!(ids_and_payloads(&f, tx.id).await, [(messages.0.id, messages.0.payload.clone())], "one callback");

    let tx = insert_pending(&f).await;
    let (results, messages) = local_outcomes(&tx);
    terminate(&f).await;
    let wrong = f.store.attempt_local_code(local_attempt(&tx, false, &results, &messages)).await;
    assert!(wrong.is_err(), "a wrong code's write is not repeated: {wrong:?}");
    assert_eq!(f.store.transaction(tx.id).await.unwrap().unwrap().attempts_used, 0);
}

/// A start's write that meets a connection the database closed (a restart
/// while the provider was sending the code) is written on a live one; and
/// one whose earlier try was committed, only its answer lost, finds its rows
/// and counts as written. Without a lost connection, writing a transaction
/// twice is still a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_start_survives_a_closed_connection() {
    let f = fixture(Kind::Postgres).await;
    let first = insert_pending(&f).await;
    assert!(f.db.close_connections().await > 0, "the store had connections");
    let second = insert_pending(&f).await;
    assert!(f.store.transaction(second.id).await.unwrap().is_some());

    // As if the first write had committed and the connection closed before its answer.
    let v = f.store.verification(first.verification_id).await.unwrap().unwrap();
    let again = f.store.insert_transaction(&first, Some(&v), None).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "a plain second write conflicts: {again:?}");
    assert!(f.db.close_connections().await > 0, "the store had connections");
    f.store.insert_transaction(&first, Some(&v), None).await.expect("found written, not a conflict");
    assert_eq!(f.store.transactions_of_verification(v.id).await.unwrap().len(), 1, "written once");

    // A start already final, with its callback: BEGIN, three inserts, COMMIT.
    assert!(f.db.close_connections().await > 0, "the store had connections");
    let (ended, message) = insert_final_with_callback(&f).await;
    assert_eq!(outbox_of(&f, ended.id).await.len(), 1);
    let v = f.store.verification(ended.verification_id).await.unwrap().unwrap();
    assert!(f.db.close_connections().await > 0, "the store had connections");
    f.store.insert_transaction(&ended, Some(&v), Some(&message)).await.expect("found written, not a conflict");
    assert_eq!(outbox_of(&f, ended.id).await.len(), 1, "one callback");

    // The read a start on an existing verification begins with runs again too.
    assert!(f.db.close_connections().await > 0, "the store had connections");
    assert!(f.store.verification(v.id).await.unwrap().is_some());
}

/// A final write that meets a closed connection (a restart while the
/// provider checked the code) is written on a live one; one whose earlier
/// try committed, only its answer lost, finds the transaction final as it
/// would leave it and counts that as its own (one callback row), while a
/// different final state found there is still another request's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_final_write_survives_a_closed_connection() {
    let f = fixture(Kind::Postgres).await;
    let tx = insert_pending(&f).await;
    let done = succeeded(&tx);
    let message = outbox(&done);
    assert!(f.db.close_connections().await > 0, "the store had connections");
    assert!(f.store.finalize(Finalization { transaction: &done, outbox: Some(&message) }).await.unwrap());
    assert_eq!(f.store.transaction(tx.id).await.unwrap().unwrap().status, Status::Succeeded);

    // As if that write had committed and the connection closed before its answer.
    assert!(f.db.close_connections().await > 0, "the store had connections");
    assert!(f.store.finalize(Finalization { transaction: &done, outbox: Some(&message) }).await.unwrap());
    assert_eq!(outbox_of(&f, tx.id).await.len(), 1, "one callback");

    let failed = Transaction {
        status: Status::Failed,
        result: Some(TransactionResult::failure(ResultError::new(ErrorCode::CodeExpired))),
        ..tx.clone()
    };
    assert!(f.db.close_connections().await > 0, "the store had connections");
    let second = outbox(&failed);
    assert!(!f.store.finalize(Finalization { transaction: &failed, outbox: Some(&second) }).await.unwrap());
    assert_eq!(outbox_of(&f, tx.id).await.len(), 1, "still one callback");
}
