//! Rows as both databases return them, and their conversion to domain records.

use chrono::{DateTime, Utc};
use handset_core::funnel::FunnelCounts;
use handset_core::model::{
    CallbackAttempt, CallbackRecord, CallbackState, OutboxMessage, Partner, PersonName, Product, ProviderName, Status,
    Transaction, TransactionResult, Verification,
};
use handset_core::pumping::{PausedRange, RangeTraffic};
use handset_core::routing::RoutingDecision;
use handset_core::store::{AfterAttempt, IdempotencyBegin, PartnerByKey, PartnerRecord, StoreError};
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
    country: Option<String>,
    number_range: Option<String>,
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
    /// Read leniently: a decision written by a newer version (a reason this
    /// one does not know) reads as none rather than failing the row.
    routing: Option<Json<Value>>,
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
            country: row.country,
            number_range: row.number_range,
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
            routing: row.routing.and_then(|r| serde_json::from_value::<RoutingDecision>(r.0).ok()),
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

/// Each callback with its own delivery attempts (`attempts` in order).
pub(crate) fn callback_records(
    rows: Vec<OutboxRow>,
    attempts: &[AttemptRow],
) -> Result<Vec<CallbackRecord>, StoreError> {
    rows.into_iter()
        .map(|row| {
            let id = row.id;
            let mine = attempts.iter().filter(|a| a.outbox_id == id);
            row.into_record(mine.map(|a| CallbackAttempt::from(a.clone())).collect())
        })
        .collect()
}

/// What a key already held means (`IDEMPOTENCY_RECORD`'s row) for a request
/// with `request_hash`, once neither inserting nor taking it over worked.
pub(crate) fn idempotency_begin(
    row: Option<(String, String, Option<i32>, Option<String>)>,
    request_hash: &str,
) -> IdempotencyBegin {
    match row {
        // Released meanwhile: the caller may simply try again.
        None => IdempotencyBegin::InFlight,
        Some((hash, _, _, _)) if hash != request_hash => IdempotencyBegin::Mismatch,
        Some((_, state, Some(status), Some(body))) if state == "done" => {
            IdempotencyBegin::Replay { status: u16::try_from(status).unwrap_or(500), body }
        }
        Some(_) => IdempotencyBegin::InFlight,
    }
}

/// A row of `funnel_histogram!`: a group's key, a bucket of time to
/// success (`None` for the transactions that did not succeed), and counts.
pub(crate) type FunnelRow = (Option<String>, Option<String>, Option<String>, Option<f64>, [i64; 5]);

/// The seconds a bucket of `funnel_histogram!` covers.
fn bucket_span(bucket: f64) -> (f64, f64) {
    if bucket < 600.0 { (bucket, bucket + 1.0) } else { ((bucket - 600.0) * 60.0, (bucket - 600.0) * 60.0 + 60.0) }
}

/// The funnel's groups from its rows, ordered by provider, country and
/// product (no group first). The median time to success is read from the
/// buckets, interpolated within the middle one: exact to the second below
/// ten minutes, to the minute above.
pub(crate) fn funnel_counts(rows: Vec<FunnelRow>) -> Vec<FunnelCounts> {
    type Key = (Option<String>, Option<String>, Option<String>);
    /// A group's five counts, and its successes per bucket.
    type Group = ([i64; 5], Vec<(f64, i64)>);
    let mut groups: std::collections::BTreeMap<Key, Group> = Default::default();
    for (provider, country, product, bucket, counts) in rows {
        let (totals, buckets) = groups.entry((provider, country, product)).or_default();
        for (total, count) in totals.iter_mut().zip(counts) {
            *total += count;
        }
        if let Some(bucket) = bucket {
            buckets.push((bucket, counts[1]));
        }
    }
    groups
        .into_iter()
        .map(|((provider, country, product), (counts, mut buckets))| {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            // The rollup and the transactions may both count one bucket.
            buckets.dedup_by(|later, kept| {
                let same = later.0 == kept.0;
                if same {
                    kept.1 += later.1;
                }
                same
            });
            let [started, succeeded, failed, expired, pending] = counts;
            FunnelCounts {
                provider,
                country,
                product,
                started,
                succeeded,
                failed,
                expired,
                pending,
                median_seconds_to_success: median(&buckets),
            }
        })
        .collect()
}

fn median(buckets: &[(f64, i64)]) -> Option<f64> {
    let total: i64 = buckets.iter().map(|(_, count)| count).sum();
    let middle = total as f64 / 2.0;
    let mut below = 0.0;
    for &(bucket, count) in buckets {
        let count = count as f64;
        if below + count >= middle && count > 0.0 {
            let (low, high) = bucket_span(bucket);
            return Some(low + (middle - below) / count * (high - low));
        }
        below += count;
    }
    None
}

/// Where a range's count of confirmed checks begins: the window's start,
/// or its last release, or the end of its last pause if that is over.
pub(crate) fn counts_from(
    since: DateTime<Utc>,
    paused_until: Option<DateTime<Utc>>,
    released_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    RangeTraffic::counting_since(paused_until, released_at, now).map_or(since, |from| from.max(since))
}

/// A paused range as `PAUSED_RANGES` returns it.
pub(crate) fn paused_range(row: (String, DateTime<Utc>, DateTime<Utc>, i64, i64)) -> PausedRange {
    let (range, paused_at, paused_until, sends, succeeded) = row;
    PausedRange { range, paused_at, paused_until, sends, succeeded }
}

pub(crate) fn status_of(code: i32) -> Result<Status, StoreError> {
    Status::from_code(code).ok_or_else(|| corrupt("status_code", &code.to_string()))
}

/// A callback's state after an attempt at `attempted_at`: the state, when
/// it is next due (kept as it was when `None`), and when it finished.
pub(crate) fn after_attempt(
    next: AfterAttempt,
    attempted_at: DateTime<Utc>,
) -> (CallbackState, Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    match next {
        AfterAttempt::Delivered => (CallbackState::Delivered, None, Some(attempted_at)),
        AfterAttempt::RetryAt(at) => (CallbackState::Pending, Some(at), None),
        AfterAttempt::GiveUp => (CallbackState::Failed, None, Some(attempted_at)),
    }
}

fn corrupt(column: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{column} = {value:?}"))
}

/// The same rows read from SQLite (rusqlite), by column position in the
/// lists of `queries.rs`.
mod sqlite {
    use rusqlite::Row;

    use super::*;
    use crate::sqlite::engine::{get_json, get_opt_json, get_opt_ts, get_ts};

    impl PartnerRow {
        /// `partner_columns!` at positions 0-5.
        fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self> {
            Ok(PartnerRow {
                id: row.get(0)?,
                name: row.get(1)?,
                products: Json(get_json(row, 2)?),
                active: row.get(3)?,
                webhook_secret: row.get(4)?,
                created_at: get_ts(row, 5)?,
            })
        }
    }

    impl PartnerRecordRow {
        pub(crate) fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self> {
            Ok(PartnerRecordRow {
                partner: PartnerRow::from_sqlite(row)?,
                previous_api_key_expires_at: get_opt_ts(row, 6)?,
                previous_webhook_secret_expires_at: get_opt_ts(row, 7)?,
            })
        }
    }

    impl PartnerByKeyRow {
        pub(crate) fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self> {
            Ok(PartnerByKeyRow { partner: PartnerRow::from_sqlite(row)?, key_expires_at: get_opt_ts(row, 6)? })
        }
    }

    impl VerificationRow {
        pub(crate) fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self> {
            Ok(VerificationRow { id: row.get(0)?, partner_id: row.get(1)?, created_at: get_ts(row, 2)? })
        }
    }

    impl TransactionRow {
        /// `transaction_columns!` order.
        pub(crate) fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self> {
            Ok(TransactionRow {
                id: row.get(0)?,
                verification_id: row.get(1)?,
                partner_id: row.get(2)?,
                product: row.get(3)?,
                provider: row.get(4)?,
                phone: row.get(5)?,
                birth_date: row.get(6)?,
                status_code: row.get(7)?,
                created_at: get_ts(row, 8)?,
                updated_at: get_ts(row, 9)?,
                expires_at: get_opt_ts(row, 10)?,
                attempts_used: row.get(11)?,
                max_attempts: row.get(12)?,
                code_hash: row.get(13)?,
                provider_ref: row.get(14)?,
                redirect_url: row.get(15)?,
                redirect_uri: row.get(16)?,
                callback_url: row.get(17)?,
                name: get_opt_json(row, 18)?.map(Json),
                metadata: Json(get_json(row, 19)?),
                result: get_opt_json(row, 20)?.map(Json),
                provider_verification: row.get(21)?,
                next_poll_at: get_opt_ts(row, 22)?,
                poll_attempts: row.get(23)?,
                country: row.get(24)?,
                number_range: row.get(25)?,
                routing: get_opt_json(row, 26)?.map(Json),
            })
        }
    }

    impl OutboxRow {
        /// `outbox_select!` order.
        pub(crate) fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self> {
            Ok(OutboxRow {
                id: row.get(0)?,
                transaction_id: row.get(1)?,
                partner_id: row.get(2)?,
                callback_url: row.get(3)?,
                payload: row.get(4)?,
                created_at: get_ts(row, 5)?,
                state: row.get(6)?,
                next_attempt_at: get_ts(row, 7)?,
                attempts: row.get(8)?,
            })
        }
    }

    impl AttemptRow {
        pub(crate) fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self> {
            Ok(AttemptRow {
                outbox_id: row.get(0)?,
                attempted_at: get_ts(row, 1)?,
                status_code: row.get(2)?,
                error: row.get(3)?,
                latency_ms: row.get(4)?,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_read_from_the_buckets() {
        let key = || (Some("idme".to_owned()), None, None);
        let row = |bucket: Option<f64>, started, succeeded| {
            let (p, c, pr) = key();
            (p, c, pr, bucket, [started, succeeded, 0, 0, 0])
        };
        let one_group = |rows| funnel_counts(rows).remove(0);
        // Four successes at 0.x, 1.x, 1.x and 2.x seconds: halfway through the 1 s bucket.
        let group = one_group(vec![row(Some(1.0), 2, 2), row(Some(0.0), 1, 1), row(Some(2.0), 1, 1), row(None, 3, 0)]);
        assert_eq!((group.started, group.succeeded), (7, 4));
        assert_eq!(group.median_seconds_to_success, Some(1.5));
        // Minute buckets beyond ten minutes: 605 is [300 s, 360 s).
        assert_eq!(one_group(vec![row(Some(605.0), 3, 3)]).median_seconds_to_success, Some(330.0));
        assert_eq!(one_group(vec![row(None, 2, 0)]).median_seconds_to_success, None);
    }
}

/// How a funnel query reads its range: the whole hours the rollup holds
/// from `funnel_hours`, the rest from the transactions.
#[derive(Debug, PartialEq)]
pub(crate) struct FunnelPlan {
    pub(crate) rolled: Option<(DateTime<Utc>, DateTime<Utc>)>,
    pub(crate) raw: Vec<(DateTime<Utc>, DateTime<Utc>)>,
}

pub(crate) fn funnel_plan(
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    rolled_until: Option<DateTime<Utc>>,
) -> FunnelPlan {
    let whole = FunnelPlan { rolled: None, raw: vec![(since, until)] };
    let Some(rolled_until) = rolled_until else { return whole };
    let first = ceil_hour(since);
    let last = floor_hour(until).min(rolled_until);
    if first >= last {
        return whole;
    }
    let raw = [(since, first), (last, until)].into_iter().filter(|(from, to)| from < to).collect();
    FunnelPlan { rolled: Some((first, last)), raw }
}

impl FunnelPlan {
    /// Each query to run, with its range: `rolled` (the dialect's
    /// `funnel_rolled!`) for the rolled hours, `raw` for the rest.
    pub(crate) fn queries(
        self,
        rolled: &'static str,
        raw: &'static str,
    ) -> impl Iterator<Item = (&'static str, DateTime<Utc>, DateTime<Utc>)> {
        let rolled = self.rolled.map(|(since, until)| (rolled, since, until));
        rolled.into_iter().chain(self.raw.into_iter().map(move |(since, until)| (raw, since, until)))
    }
}

pub(crate) fn floor_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::DurationRound;
    t.duration_trunc(chrono::Duration::hours(1)).unwrap_or(t)
}

fn ceil_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = floor_hour(t);
    if floor == t { t } else { floor + chrono::Duration::hours(1) }
}

/// Where the rollup starts looking when it has rolled nothing yet.
pub(crate) const ROLLUP_ORIGIN: DateTime<Utc> = DateTime::UNIX_EPOCH;

/// The rollup's next move, from where it stands (`rolled_until`), the first
/// transaction created since, and the end of the hours it may roll up.
#[derive(Debug, PartialEq)]
pub(crate) enum RollupStep {
    /// Nothing more to roll up now.
    Stop,
    /// The hours up to this one are empty: move the mark, then stop.
    Skip(DateTime<Utc>),
    /// Roll up the hour starting here (the empty hours before it with it).
    Roll(DateTime<Utc>),
}

pub(crate) fn rollup_step(
    rolled_until: Option<DateTime<Utc>>,
    next_created: Option<DateTime<Utc>>,
    before: DateTime<Utc>,
) -> RollupStep {
    let before = floor_hour(before);
    let skip_to = |to: DateTime<Utc>| match rolled_until {
        Some(mark) if mark < to => RollupStep::Skip(to),
        _ => RollupStep::Stop,
    };
    match next_created {
        None => skip_to(before),
        Some(next) => {
            let hour = floor_hour(next);
            if hour + chrono::Duration::hours(1) <= before { RollupStep::Roll(hour) } else { skip_to(hour.min(before)) }
        }
    }
}

#[cfg(test)]
mod rollup_tests {
    use super::*;

    fn at(hour: u32, minute: u32) -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(2026, 11, 29, hour, minute, 0).unwrap()
    }

    #[test]
    fn a_query_reads_whole_rolled_hours_from_the_rollup() {
        let plan = funnel_plan(at(1, 30), at(9, 15), Some(at(6, 0)));
        assert_eq!(
            plan,
            FunnelPlan { rolled: Some((at(2, 0), at(6, 0))), raw: vec![(at(1, 30), at(2, 0)), (at(6, 0), at(9, 15))] }
        );
        let plan = funnel_plan(at(2, 0), at(5, 0), Some(at(6, 0)));
        assert_eq!(plan, FunnelPlan { rolled: Some((at(2, 0), at(5, 0))), raw: vec![] });
        // No whole rolled hour inside: all from the transactions.
        assert_eq!(funnel_plan(at(1, 30), at(2, 45), Some(at(6, 0))).rolled, None);
        assert_eq!(funnel_plan(at(1, 0), at(9, 0), None).raw, vec![(at(1, 0), at(9, 0))]);
    }

    #[test]
    fn the_rollup_moves_over_empty_hours_and_stops_at_open_ones() {
        // The hour of the next transaction, when it closed before `before`.
        assert_eq!(rollup_step(Some(at(2, 0)), Some(at(4, 10)), at(8, 20)), RollupStep::Roll(at(4, 0)));
        assert_eq!(rollup_step(None, Some(at(4, 10)), at(8, 20)), RollupStep::Roll(at(4, 0)));
        // The next transaction's hour is not over: move over the empty ones.
        assert_eq!(rollup_step(Some(at(2, 0)), Some(at(7, 50)), at(8, 20)), RollupStep::Roll(at(7, 0)));
        assert_eq!(rollup_step(Some(at(2, 0)), Some(at(8, 5)), at(8, 20)), RollupStep::Skip(at(8, 0)));
        assert_eq!(rollup_step(Some(at(8, 0)), Some(at(8, 5)), at(8, 20)), RollupStep::Stop);
        // No transaction since the mark: every closed hour is empty.
        assert_eq!(rollup_step(Some(at(2, 0)), None, at(8, 20)), RollupStep::Skip(at(8, 0)));
        assert_eq!(rollup_step(None, None, at(8, 20)), RollupStep::Stop);
    }
}
