//! `GET /v1/stats`: the calling partner's verification funnel.

use axum::Json;
use axum::extract::{RawQuery, State};
use handset_core::funnel::{FunnelOut, FunnelQuery};
use handset_core::{ApiError, ErrorCode};

use crate::app::AppState;
use crate::error::{ErrorsOut, Failure};
use crate::extract::AuthPartner;

/// How the calling partner's transactions started in a range ended, by
/// provider, country and product.
#[utoipa::path(
    get, path = "/v1/stats", tag = "stats", operation_id = "getStats",
    params(
        ("since" = Option<String>, Query, format = DateTime, description = "Start of the range (RFC 3339, inclusive); default: a day before `until`"),
        ("until" = Option<String>, Query, format = DateTime, description = "End of the range (RFC 3339, exclusive); default: now. At most 93 days after `since`"),
        ("group_by" = Option<String>, Query, pattern = "^(provider|country|product)(,(provider|country|product))*$",
            description = "Comma-separated subset of provider, country, product; default: all three. A dimension not grouped by is null in each group"),
    ),
    responses(
        (status = 200, body = FunnelOut),
        (status = 401, body = ErrorsOut),
        (status = 422, description = "3910: since, until or group_by is invalid (or another query parameter is given)", body = ErrorsOut),
        (status = 429, description = "5200: the partner's rate limit (see Retry-After)", body = ErrorsOut),
    ),
    security(("bearer" = []))
)]
pub async fn get_stats(
    State(state): State<AppState>,
    AuthPartner(partner): AuthPartner,
    RawQuery(raw): RawQuery,
) -> Result<Json<FunnelOut>, Failure> {
    let (mut since, mut until, mut group_by) = (None, None, None);
    for (name, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        let slot = match name.as_ref() {
            "since" => &mut since,
            "until" => &mut until,
            "group_by" => &mut group_by,
            other => {
                let message = format!("Unknown query parameter {other:?} (since, until and group_by are read)");
                return Err(ApiError::with_message(ErrorCode::InvalidStatsQuery, message).into());
            }
        };
        if slot.replace(value.into_owned()).is_some() {
            let message = format!("Query parameter {name} is given twice");
            return Err(ApiError::with_message(ErrorCode::InvalidStatsQuery, message).into());
        }
    }
    let query = FunnelQuery::parse(
        Some(partner.id),
        since.as_deref(),
        until.as_deref(),
        group_by.as_deref(),
        state.gateway.now(),
    )?;
    Ok(Json(state.gateway.funnel(&query).await?))
}
