//! Logs, traces and metrics: one structured line per request (request id,
//! route, status, latency); a `request` span per request (request id, route,
//! partner id) under which provider calls are child spans, exported over
//! OTLP when `telemetry.otlp_endpoint` is set; the request id in the
//! `x-request-id` header and in every error body; Prometheus counters and
//! histograms, with the HELP text of every `handset_*` metric
//! (`describe_metrics`, the one list of them). Request bodies, phone
//! numbers, keys and codes are never logged or put in spans.

use std::sync::OnceLock;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::{LogFormat, OtlpProtocol, TelemetrySettings};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Installs the log subscriber once for the process. `RUST_LOG` wins over `level`.
pub fn init_logging(format: LogFormat, level: &str) {
    let _ = init_telemetry(format, level, None);
}

/// Spans exported over OTLP; `shutdown` sends what is still buffered.
pub struct TraceExport(SdkTracerProvider);

impl TraceExport {
    pub fn shutdown(self) {
        // The exporter's blocking HTTP client must not run on an async worker.
        let provider = self.0;
        let flushed = std::thread::spawn(move || provider.shutdown()).join();
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!("could not send the last spans to telemetry.otlp_endpoint");
        }
    }
}

/// Logs as `init_logging`, and, when `telemetry.otlp_endpoint` is set,
/// spans exported to that collector (the caller keeps the `TraceExport` and
/// shuts it down on exit).
pub fn init_telemetry(
    format: LogFormat,
    level: &str,
    telemetry: Option<&TelemetrySettings>,
) -> Result<Option<TraceExport>, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = log_layer(format, std::io::stderr, ansi);
    let export = match telemetry.filter(|t| !t.otlp_endpoint.is_empty()) {
        Some(settings) => Some(trace_export(settings)?),
        None => None,
    };
    let traces = export.as_ref().map(|export| tracing_opentelemetry::layer().with_tracer(export.0.tracer("handset")));
    let installed = tracing_subscriber::registry().with(filter).with(logs).with(traces).try_init();
    if installed.is_err() && export.is_some() {
        return Err("telemetry.otlp_endpoint: another tracing subscriber is already installed".into());
    }
    Ok(export)
}

/// Logs as `handset serve` writes them (`format`, `level`, `RUST_LOG`), into
/// `writer`: the benchmark's in-process gateway logs as the binary does,
/// into a sink, so its cost is measured.
pub fn init_logging_to<W>(format: LogFormat, level: &str, writer: W)
where
    W: for<'writer> tracing_subscriber::fmt::MakeWriter<'writer> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::registry().with(filter).with(log_layer(format, writer, false)).try_init();
}

fn log_layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    W: for<'writer> tracing_subscriber::fmt::MakeWriter<'writer> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi).boxed(),
    }
}

fn trace_export(settings: &TelemetrySettings) -> Result<TraceExport, String> {
    crate::install_crypto_provider();
    let endpoint = format!("{}/v1/traces", settings.otlp_endpoint.trim_end_matches('/').trim_end_matches("/v1/traces"));
    let protocol = match settings.otlp_protocol {
        OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
        OtlpProtocol::HttpJson => Protocol::HttpJson,
    };
    // Built off the async runtime: the exporter's HTTP client is blocking.
    std::thread::spawn(move || {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
        let resource = opentelemetry_sdk::Resource::builder().with_service_name("handset").build();
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
        Ok(TraceExport(provider))
    })
    .join()
    .map_err(|_| "telemetry.otlp_endpoint: the exporter could not be built".to_owned())?
}

/// The process-wide metrics recorder (installed on first use, so several apps
/// in one test process share it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("static bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by an embedding
            // program); ours still renders what it records.
            let _ = metrics::set_global_recorder(recorder);
            describe_metrics();
            handle
        })
        .clone()
}

/// Every metric handset records, with its HELP text (`docs/operations.md`
/// says what to alert on).
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("handset_http_requests_total", "HTTP requests answered, by method, route and status");
    describe_histogram!(
        "handset_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by method, route and status"
    );
    describe_counter!(
        "handset_number_range_pauses_total",
        "Number ranges the SMS pumping guard paused (the range is in the log line, never a full number)"
    );
    describe_counter!(
        "handset_number_range_refusals_total",
        "SMS starts refused (429 5301) because their number range is paused"
    );
    describe_counter!(
        "handset_routing_decisions_total",
        "Starts by how their providers were ordered: product, strategy, reason (configured, requested, warming_up, \
         score, held, explore) and the provider put first"
    );
    describe_counter!(
        "handset_verifications_started_total",
        "Transactions recorded at their start, by product and provider (refused requests record none)"
    );
    describe_counter!(
        "handset_verifications_finished_total",
        "Transactions that reached a final state, by product, provider, outcome (succeeded, failed) and error code"
    );
    describe_histogram!(
        "handset_provider_call_duration_seconds",
        Unit::Seconds,
        "Time of each call to a provider, by provider, call (start, check_code, fetch_result) and outcome"
    );
    describe_counter!(
        "handset_provider_errors_total",
        "Provider calls that got no usable answer, by provider, call and kind (unavailable, misconfigured, failed); \
         an unavailable or misconfigured start moves on to the next provider"
    );
    describe_counter!(
        "handset_provider_auth_failures_total",
        "Answers where a provider refused handset's credentials or configuration: check its settings"
    );
    describe_gauge!("handset_circuit_breaker_state", "Each provider's circuit breaker: 0 closed, 1 open, 2 half-open");
    describe_gauge!("handset_callback_queue_due", "Callbacks due for delivery and not yet delivered");
    describe_counter!(
        "handset_callback_deliveries_total",
        "Callback delivery attempts, by outcome (delivered, retry, failed: given up)"
    );
    describe_histogram!(
        "handset_callback_delivery_duration_seconds",
        Unit::Seconds,
        "Time of each callback delivery attempt"
    );
    describe_counter!("handset_transactions_expired_total", "Pending transactions ended at their deadline");
    describe_counter!("handset_personal_data_purged_total", "Transactions whose personal data retention removed");
    describe_counter!("handset_job_runner_restarts_total", "Background job loops restarted after a panic, by job");
    describe_gauge!(
        "handset_db_pool_connections",
        "Database connections by pool (main; SQLite: writer, readers) and state (open, idle, max)"
    );
}

/// Sets the gauges read from state at scrape time: circuit breakers and database pools.
pub fn record_scrape_gauges(gateway: &handset_core::Gateway) {
    for (provider, state) in gateway.breaker_states() {
        metrics::gauge!("handset_circuit_breaker_state", "provider" => provider.as_str()).set(f64::from(state));
    }
    for usage in gateway.store().pool_usage() {
        for (state, value) in [("open", usage.open), ("idle", usage.idle), ("max", usage.max)] {
            metrics::gauge!("handset_db_pool_connections", "pool" => usage.pool, "state" => state)
                .set(f64::from(value));
        }
    }
}

/// An error body (`{"errors":[...]}`) with `request_id` added, so a partner
/// reporting an error hands over the id that finds its log line and trace.
async fn with_request_id(response: Response, request_id: &str) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let small = axum::body::HttpBody::size_hint(response.body()).exact().is_some_and(|len| len <= 64 * 1024);
    if !(response.status().is_client_error() || response.status().is_server_error()) || !is_json || !small {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // A body of known size already in memory: reading it cannot fail.
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, Body::empty());
    };
    let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut envelope)) if envelope.contains_key("errors") => {
            envelope.insert("request_id".into(), request_id.into());
            parts.headers.remove(header::CONTENT_LENGTH);
            serde_json::to_vec(&envelope).map(Body::from).unwrap_or_else(|_| Body::from(bytes))
        }
        _ => Body::from(bytes),
    };
    Response::from_parts(parts, body)
}

/// The method as a metrics label: one of a fixed set, or `other`, so made-up
/// methods cannot grow `/metrics` without bound (unknown paths are likewise
/// one `unmatched` route).
fn method_label(method: &Method) -> &'static str {
    let known = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
    ];
    known.into_iter().find(|(known, _)| known == method).map_or("other", |(_, label)| label)
}

/// Middleware: request id, the request log line, and HTTP metrics.
pub async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(request.method());
    // The request's span: handlers record `partner_id` once the key is known;
    // provider calls and the work a request starts are its children.
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method,
        route = %route,
        partner_id = tracing::field::Empty,
        status = tracing::field::Empty
    );

    let response = next.run(request).instrument(span.clone()).await;
    let mut response = with_request_id(response, &request_id).await;

    let latency = started.elapsed();
    span.record("status", response.status().as_u16());
    let status = response.status().as_u16();
    let labels = [("method", method.to_owned()), ("route", route.clone()), ("status", status.to_string())];
    metrics::counter!("handset_http_requests_total", &labels).increment(1);
    metrics::histogram!("handset_http_request_duration_seconds", &labels).record(latency.as_secs_f64());
    tracing::info!(
        request_id = %request_id,
        method = %method,
        route = %route,
        status,
        latency_ms = latency.as_secs_f64() * 1000.0,
        "request"
    );
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}
