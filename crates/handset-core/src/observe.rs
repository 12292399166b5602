//! Domain metrics and trace spans the gateway emits. Every metric is named
//! `handset_*`; their HELP texts are registered by handset-server's
//! `telemetry::describe_metrics`, which lists them all. Labels take values
//! from fixed sets (products, providers, outcomes, catalogue codes) so no
//! request can add series without bound.

use std::future::Future;
use std::time::Instant;

use tracing::Instrument;

use crate::model::{Product, ProviderName, Transaction, TransactionResult};
use crate::provider::ProviderError;

/// One call to a provider, as a child span of the request or job that makes
/// it (`provider`, `product`, `call`, `outcome`), timed in
/// `handset_provider_call_duration_seconds`; unavailable, misconfigured and
/// failed answers are also counted in `handset_provider_errors_total`.
pub async fn provider_call<T>(
    provider: ProviderName,
    product: Product,
    call: &'static str,
    work: impl Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    let span = tracing::info_span!(
        "provider_call",
        provider = provider.as_str(),
        product = product.as_str(),
        call,
        outcome = tracing::field::Empty
    );
    let started = Instant::now();
    let result = work.instrument(span.clone()).await;
    let outcome = match &result {
        Ok(_) => "answered",
        Err(ProviderError::Rejected(_)) => "rejected",
        Err(ProviderError::Ineligible { .. }) => "ineligible",
        Err(ProviderError::Unavailable { .. }) => "unavailable",
        Err(ProviderError::Misconfigured { .. }) => "misconfigured",
        Err(ProviderError::Failed { .. }) => "failed",
    };
    span.record("outcome", outcome);
    metrics::histogram!(
        "handset_provider_call_duration_seconds",
        "provider" => provider.as_str(),
        "call" => call,
        "outcome" => outcome
    )
    .record(started.elapsed().as_secs_f64());
    if matches!(outcome, "unavailable" | "misconfigured" | "failed") {
        metrics::counter!(
            "handset_provider_errors_total",
            "provider" => provider.as_str(),
            "call" => call,
            "kind" => outcome
        )
        .increment(1);
    }
    result
}

/// A transaction was recorded at its start (pending or already final).
pub fn started(tx: &Transaction) {
    metrics::counter!(
        "handset_verifications_started_total",
        "product" => tx.product.as_str(),
        "provider" => tx.provider.as_str()
    )
    .increment(1);
    if tx.is_final() {
        finished(tx);
    }
}

/// A transaction reached its final state (once per transaction: only the
/// write that ended it reports it).
pub fn finished(tx: &Transaction) {
    let code = tx.result.as_ref().and_then(TransactionResult::error_code).map(|c| c.to_string()).unwrap_or_default();
    let outcome = if tx.status.code() == 200 { "succeeded" } else { "failed" };
    metrics::counter!(
        "handset_verifications_finished_total",
        "product" => tx.product.as_str(),
        "provider" => tx.provider.as_str(),
        "outcome" => outcome,
        "code" => code
    )
    .increment(1);
}
