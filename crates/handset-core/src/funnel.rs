//! The verification funnel (`GET /v1/stats`, `handset stats`): how the
//! transactions started in a time range ended, grouped by provider, country
//! and product. The store counts; this module owns the query's shape, the
//! validation of its parameters and the answer partners read.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, ErrorCode};

/// What the funnel can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dimension {
    Provider,
    Country,
    Product,
}

impl Dimension {
    pub const ALL: [Dimension; 3] = [Dimension::Provider, Dimension::Country, Dimension::Product];

    pub fn parse(name: &str) -> Option<Dimension> {
        match name {
            "provider" => Some(Dimension::Provider),
            "country" => Some(Dimension::Country),
            "product" => Some(Dimension::Product),
            _ => None,
        }
    }
}

/// The longest range one query may cover (the cost of a query grows with it).
pub const MAX_RANGE_DAYS: i64 = 93;
/// The range when `since` is not given: the day before `until`.
pub const DEFAULT_RANGE_HOURS: i64 = 24;

/// Which transactions to count: created in `[since, until)`, of one partner
/// (`None`: every partner, for operators), grouped by `group_by`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunnelQuery {
    pub partner_id: Option<Uuid>,
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub group_by: BTreeSet<Dimension>,
}

impl FunnelQuery {
    /// Checks a range and grouping as a partner gave them (RFC 3339 times,
    /// a comma-separated `group_by`); `now` stands in for a missing `until`.
    pub fn parse(
        partner_id: Option<Uuid>,
        since: Option<&str>,
        until: Option<&str>,
        group_by: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<FunnelQuery, ApiError> {
        let invalid = |message: String| ApiError::with_message(ErrorCode::InvalidStatsQuery, message);
        let time = |name: &str, value: &str| {
            DateTime::parse_from_rfc3339(value)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| invalid(format!("Query parameter {name} must be an RFC 3339 time (2026-01-31T00:00:00Z)")))
        };
        let until = until.map(|u| time("until", u)).transpose()?.unwrap_or(now);
        let since =
            since.map(|s| time("since", s)).transpose()?.unwrap_or(until - Duration::hours(DEFAULT_RANGE_HOURS));
        if since >= until {
            return Err(invalid("Query parameter since must be before until".into()));
        }
        if until - since > Duration::days(MAX_RANGE_DAYS) {
            return Err(invalid(format!("A stats query covers at most {MAX_RANGE_DAYS} days")));
        }
        let group_by = match group_by {
            None => Dimension::ALL.into_iter().collect(),
            Some(list) => list
                .split(',')
                .map(|name| {
                    Dimension::parse(name.trim()).ok_or_else(|| {
                        invalid("Query parameter group_by lists provider, country or product, comma-separated".into())
                    })
                })
                .collect::<Result<BTreeSet<_>, _>>()?,
        };
        Ok(FunnelQuery { partner_id, since, until, group_by })
    }

    pub fn groups_by(&self, dimension: Dimension) -> bool {
        self.group_by.contains(&dimension)
    }
}

/// One group's counts as the store returns them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FunnelCounts {
    /// `None` where the query does not group by the dimension (or, for
    /// country, where the number's region is unknown).
    pub provider: Option<String>,
    pub country: Option<String>,
    pub product: Option<String>,
    pub started: i64,
    pub succeeded: i64,
    /// Final without success, before the deadline (wrong codes, provider refusals).
    pub failed: i64,
    /// Final without success at or after the deadline (no answer in time).
    pub expired: i64,
    pub pending: i64,
    pub median_seconds_to_success: Option<f64>,
}

/// `GET /v1/stats`'s answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunnelOut {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub groups: Vec<FunnelGroupOut>,
}

/// One group of the funnel. A dimension the query does not group by is
/// `null`; so is the country of a number whose region is unknown.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunnelGroupOut {
    #[schema(example = "sandbox")]
    pub provider: Option<String>,
    #[schema(example = "US")]
    pub country: Option<String>,
    #[schema(example = "possession.sms")]
    pub product: Option<String>,
    pub started: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub expired: i64,
    pub pending: i64,
    /// `succeeded / (started - pending)`; `null` when nothing has ended.
    pub conversion: Option<f64>,
    /// Median time from the start to the success, in seconds.
    pub median_seconds_to_success: Option<f64>,
}

impl FunnelOut {
    pub fn of(query: &FunnelQuery, counts: Vec<FunnelCounts>) -> FunnelOut {
        let groups = counts
            .into_iter()
            .map(|c| {
                let ended = c.started - c.pending;
                FunnelGroupOut {
                    conversion: (ended > 0).then(|| c.succeeded as f64 / ended as f64),
                    provider: c.provider,
                    country: c.country,
                    product: c.product,
                    started: c.started,
                    succeeded: c.succeeded,
                    failed: c.failed,
                    expired: c.expired,
                    pending: c.pending,
                    median_seconds_to_success: c.median_seconds_to_success,
                }
            })
            .collect();
        FunnelOut { since: query.since, until: query.until, groups }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-29T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn defaults_to_the_last_day_grouped_by_everything() {
        let q = FunnelQuery::parse(None, None, None, None, now()).unwrap();
        assert_eq!((q.since, q.until), (now() - Duration::hours(24), now()));
        assert_eq!(q.group_by.len(), 3);
    }

    #[test]
    fn refuses_bad_ranges_and_dimensions() {
        for (since, until, group_by) in [
            (Some("yesterday"), None, None),
            (Some("2026-11-29T12:00:00Z"), Some("2026-11-29T12:00:00Z"), None),
            (Some("2026-01-01T00:00:00Z"), Some("2026-11-29T00:00:00Z"), None),
            (None, None, Some("provider,carrier")),
            (None, None, Some("")),
        ] {
            let error = FunnelQuery::parse(None, since, until, group_by, now()).unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidStatsQuery, "{since:?} {until:?} {group_by:?}");
        }
    }

    #[test]
    fn conversion_counts_only_ended_transactions() {
        let q = FunnelQuery::parse(None, None, None, None, now()).unwrap();
        let counts = |started, succeeded, pending| FunnelCounts { started, succeeded, pending, ..Default::default() };
        let out = FunnelOut::of(&q, vec![counts(10, 3, 4), counts(2, 0, 2)]);
        assert_eq!(out.groups[0].conversion, Some(0.5));
        assert_eq!(out.groups[1].conversion, None);
    }
}
