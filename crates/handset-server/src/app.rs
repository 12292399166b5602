//! The application: state, router, and `Application` (build on a listener,
//! report the port, run until stopped), so tests start the real thing on port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use handset_core::adaptive::AdaptiveSettings;
use handset_core::breaker::BreakerSettings;
use handset_core::model::{Partner, Product, ProviderName};
use handset_core::provider::Provider;
use handset_core::pumping::PumpingGuard;
use handset_core::rate_limit::RateLimits;
use handset_core::routing::Routing;
use handset_core::sandbox::Sandbox;
use handset_core::secret::api_key_hash;
use handset_core::store::{NewPartner, Store, StoreError};
use handset_core::{ApiError, ErrorCode, Gateway, GatewaySettings, Region};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::dns::{CallbackGuard, HostLookup, SystemLookup};
use crate::error::{Failure, error_response};
use crate::routes::{callbacks, docs, health, identity, possession, providers, sandbox, stats, transactions};
use crate::serve::{ConnectionLimits, serve};
use crate::settings::Settings;
use crate::telemetry;
use crate::worker::delivery::Delivery;
use crate::worker::{Runner, RunnerSettings};

/// The development partner's fixed id, so its row is found again across restarts.
pub const DEV_PARTNER_ID: Uuid = Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_d001);

/// The development partner's callback signing secret (published in the README).
const DEV_WEBHOOK_SECRET: &str = "whsec_ZGV2ZWxvcG1lbnQtb25seS13ZWJob29rLXNlY3JldA==";

/// Callback deliveries a transaction may have pending before
/// `POST .../callbacks/retry` answers 429.
pub const MAX_PENDING_CALLBACKS: i64 = 10;

/// What every request's handlers share: a handle, cloned by each extractor
/// and middleware of a request (one reference count, not one per field).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub gateway: Arc<Gateway>,
    pub default_region: Region,
    /// Where callbacks may go (checked at request time and again at delivery).
    pub callbacks: CallbackGuard,
    pub metrics: PrometheusHandle,
    /// The sandbox provider and its `/sandbox/*` pages exist (development only).
    pub sandbox: bool,
    pub body_read_timeout: Duration,
    pub request_timeout: Duration,
    /// How long a request holds its `Idempotency-Key` before a retry may take it over.
    pub idempotency_lock: Duration,
    /// Every request's work, so shutdown can wait for it.
    pub in_flight: TaskTracker,
    /// `GET /openapi.json`'s body, made once at start.
    pub openapi: axum::body::Bytes,
    /// SIGTERM arrived: `/ready` answers 503 while the server drains.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("production configuration is incomplete:\n  - {}", .0.join("\n  - "))]
    Production(Vec<String>),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// A provider's settings cannot be used (the message names the key).
    #[error("provider configuration: {0}")]
    Provider(String),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

pub struct Application {
    listener: TcpListener,
    router: Router,
    addr: SocketAddr,
    runner: Option<Runner>,
    limits: ConnectionLimits,
    /// Requests' work, which outlives its connection (see `deadline`).
    in_flight: TaskTracker,
    gateway: Arc<Gateway>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    drain_delay: Duration,
}

impl Application {
    /// Checks what production requires, binds `server.bind` (port 0 picks a
    /// free port), opens the store, migrates when configured, and seeds (in
    /// development) or deactivates (in production) the development partner.
    pub async fn build(settings: Settings) -> Result<Application, StartError> {
        Self::build_with_lookup(settings, Arc::new(SystemLookup)).await
    }

    /// As `build`, resolving callback hosts with `lookup` instead of the
    /// system's resolver (tests of DNS rebinding).
    pub async fn build_with_lookup(settings: Settings, lookup: Arc<dyn HostLookup>) -> Result<Application, StartError> {
        crate::install_crypto_provider();
        // Off the first request's path (it builds the plans' patterns).
        tokio::task::spawn_blocking(handset_core::phone::load_numbering_plans);
        let problems = settings.production_problems();
        if !problems.is_empty() {
            return Err(StartError::Production(problems));
        }
        let listener = TcpListener::bind(&settings.server.bind)
            .await
            .map_err(|source| StartError::Bind { addr: settings.server.bind.clone(), source })?;
        let addr = listener.local_addr()?;
        let store = open_store(&settings)?;
        if settings.database.migrate_on_start {
            store.migrate().await?;
        }
        let public_url = if settings.server.public_url.is_empty() {
            format!("http://{addr}")
        } else {
            settings.server.public_url.trim_end_matches('/').to_owned()
        };
        if settings.is_production() {
            if settings.security.code_pepper.expose().chars().count() < 32 {
                tracing::warn!("security.code_pepper is shorter than 32 characters: use a longer random secret");
            }
            retire_dev_partner(store.as_ref()).await;
        } else if let Err(error) = seed_dev_partner(&settings, store.as_ref()).await {
            // The database may come up later (`/ready` says 503 meanwhile); keep trying.
            tracing::warn!(%error, "could not register the development partner yet; retrying in the background");
            let (settings, store) = (settings.clone(), store.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    if seed_dev_partner(&settings, store.as_ref()).await.is_ok() {
                        tracing::info!("development partner registered");
                        break;
                    }
                }
            });
        }
        let providers = providers(&settings, &public_url)?;
        let gateway = Gateway::new(
            store,
            providers,
            Routing::new(settings.routing.rules.clone()),
            GatewaySettings {
                code_ttl: chrono::Duration::from_std(settings.possession.code_ttl).unwrap_or(chrono::Duration::MAX),
                max_attempts: settings.possession.max_attempts as i32,
                public_url,
                refused_partner: settings.is_production().then_some(DEV_PARTNER_ID),
                code_pepper: settings.code_pepper(),
                max_pending_callbacks: MAX_PENDING_CALLBACKS,
                identity_ttl: chrono::Duration::from_std(settings.identity.result_ttl).unwrap_or(chrono::Duration::MAX),
                poll_min: settings.workers.provider_poll_min,
                poll_max: settings.workers.provider_poll_max,
                breaker: BreakerSettings {
                    failure_threshold: settings.circuit_breaker.failure_threshold,
                    open_for: settings.circuit_breaker.open_for,
                },
                partner_cache_ttl: settings.security.partner_cache_ttl,
                pumping_guard: PumpingGuard {
                    prefix_digits: settings.fraud.prefix_digits,
                    window: chrono::Duration::from_std(settings.fraud.window).unwrap_or(chrono::Duration::MAX),
                    min_sends: i64::from(settings.fraud.min_sends),
                    max_conversion: settings.fraud.max_conversion,
                    cooldown: chrono::Duration::from_std(settings.fraud.cooldown).unwrap_or(chrono::Duration::MAX),
                },
                pumping_guard_enabled: settings.fraud.enabled(settings.is_production()),
                adaptive: AdaptiveSettings {
                    window: settings.routing.adaptive.window,
                    min_samples: settings.routing.adaptive.min_samples,
                    explore: settings.routing.adaptive.explore,
                    seed: settings.routing.adaptive.seed,
                    costs: settings.providers.costs(),
                    // Deadlines, then the expiry job's round and a margin.
                    longest_check: settings.possession.code_ttl.max(settings.identity.result_ttl)
                        + settings.workers.poll_interval
                        + std::time::Duration::from_secs(60),
                },
                rate_limits: RateLimits {
                    per_product_per_minute: settings.rate_limits.per_product_per_minute,
                    per_partner_per_minute: settings.rate_limits.per_partner_per_minute,
                    per_phone_per_hour: settings.rate_limits.per_phone_per_hour,
                },
            },
        );
        let gateway = Arc::new(gateway);
        let callbacks = CallbackGuard { allow_private_networks: settings.callbacks.allow_private_networks, lookup };
        let runner = if settings.workers.enabled {
            let delivery = Delivery::new(callbacks.clone(), settings.callbacks.timeout)
                .map_err(|e| StartError::Io(std::io::Error::other(e)))?;
            Some(Runner::new(gateway.clone(), delivery, runner_settings(&settings)))
        } else {
            None
        };
        let in_flight = TaskTracker::new();
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let state = AppState::new(Shared {
            gateway: gateway.clone(),
            default_region: settings.default_region(),
            callbacks,
            metrics: telemetry::metrics_handle(),
            sandbox: !settings.is_production(),
            body_read_timeout: settings.server.body_read_timeout,
            request_timeout: settings.server.request_timeout,
            idempotency_lock: settings.idempotency_lock(),
            in_flight: in_flight.clone(),
            openapi: docs::document(!settings.is_production()).to_string().into(),
            draining: draining.clone(),
        });
        let limits = ConnectionLimits {
            header_read_timeout: settings.server.header_read_timeout,
            max_connections: settings.server.max_connections as usize,
            shutdown_timeout: settings.server.shutdown_timeout,
        };
        let drain_delay = settings.server.drain_delay;
        Ok(Application {
            listener,
            router: router(state),
            addr,
            runner,
            limits,
            in_flight,
            gateway,
            draining,
            drain_delay,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves (and runs background jobs) until `shutdown` resolves; then
    /// answers `/ready` with 503 for `server.drain_delay` while still
    /// serving, then stops taking requests and claiming jobs, and lets
    /// in-flight requests (their work included) and deliveries finish, all
    /// within one deadline: `server.shutdown_timeout` after the drain.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(addr = %self.addr, "handset listening");
        let (stop, stopped) = watch::channel(false);
        let runner = self.runner.map(|runner| tokio::spawn(runner.run(stopped)));
        let gateway = self.gateway;
        let partner_changes = tokio::spawn(async move { gateway.follow_partner_changes().await });
        let (draining, drain_delay) = (self.draining, self.drain_delay);
        let signal = async move {
            shutdown.await;
            // Readiness fails first, so traffic moves elsewhere while this
            // process still answers; then the listener closes.
            draining.store(true, std::sync::atomic::Ordering::SeqCst);
            if !drain_delay.is_zero() {
                tracing::info!(delay = ?drain_delay, "draining: /ready answers 503 before the listener closes");
                tokio::time::sleep(drain_delay).await;
            }
            // Background work goes on while requests are still served, so
            // their callbacks are sent by this process too.
            let _ = stop.send(true);
        };
        let deadline = serve(self.listener, self.router, self.limits, signal).await;
        self.in_flight.close();
        if tokio::time::timeout_at(deadline, self.in_flight.wait()).await.is_err() {
            tracing::warn!("requests' work did not finish within server.shutdown_timeout; it is cut short");
        }
        if let Some(runner) = runner
            && tokio::time::timeout_at(deadline, runner).await.is_err()
        {
            tracing::warn!(
                "background work did not finish in time; unfinished callbacks are retried after their lease"
            );
        }
        partner_changes.abort();
        Ok(())
    }
}

fn runner_settings(settings: &Settings) -> RunnerSettings {
    let retention = settings.retention.personal_data;
    RunnerSettings {
        poll_interval: settings.workers.poll_interval,
        retry_schedule: settings.callbacks.retry_schedule.clone(),
        // Outlasts a round of deliveries (each bounded by the timeout, all
        // concurrent) and the writes that record them.
        lease: settings.callbacks.timeout * 2 + Duration::from_secs(2),
        batch_size: i64::from(settings.workers.batch_size),
        retention: (!retention.is_zero()).then_some(retention),
        // Rate windows last an hour at most, the pumping guard's
        // `fraud.window`; keep one more hour for clock skew between replicas.
        counter_lifetime: settings.fraud.window.max(Duration::from_secs(3600)) + Duration::from_secs(3600),
        // A start is recorded within its idempotency lock (the request's
        // time and every provider's timeout); five more minutes for clocks.
        funnel_hour_settles: settings.idempotency_lock() + Duration::from_secs(300),
    }
}

pub fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, StoreError> {
    let pool = handset_store::PoolSettings {
        max_connections: settings.database.max_connections,
        acquire_timeout: settings.database.acquire_timeout,
    };
    handset_store::connect(settings.database.url.expose(), &pool)
}

/// The providers handset can call: the sandbox outside production, ID.me
/// when it has a secret. The others say at start why they are off.
fn providers(settings: &Settings, public_url: &str) -> Result<Vec<Arc<dyn Provider>>, StartError> {
    let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
    if settings.is_production() {
        tracing::info!(provider = "sandbox", "production: the sandbox provider and /sandbox routes are off");
    } else {
        providers.push(Arc::new(Sandbox::new(public_url)));
    }
    let p = &settings.providers;
    if p.idme.enabled() {
        if !p.idme.webhook_secret.is_set() {
            tracing::info!(provider = "idme", "no providers.idme.webhook_secret: ID.me results are polled");
        }
        let idme = handset_idme::Idme::new(&p.idme, public_url).map_err(StartError::Provider)?;
        tracing::info!(provider = "idme", base_url = %p.idme.base_url, "provider enabled");
        let idme = Arc::new(idme);
        // Tell the operator early if ID.me cannot be reached; requests work (or fail over) regardless.
        let probe = idme.clone();
        tokio::spawn(async move {
            if !probe.health().await {
                tracing::warn!(provider = "idme", "ID.me's /health does not answer: requests will fail over or fail");
            }
        });
        providers.push(idme);
    } else {
        tracing::info!(provider = "idme", "provider disabled: no credentials configured");
    }
    if settings.sms_provider_enabled() && settings.rate_limits.per_phone_per_hour == 0 && !settings.is_production() {
        tracing::warn!(
            "an SMS provider is enabled and rate_limits.per_phone_per_hour is 0: nothing limits SMS pumping"
        );
    }
    if p.veratad.enabled() {
        let veratad = handset_veratad::Veratad::new(&p.veratad).map_err(StartError::Provider)?;
        tracing::info!(provider = "veratad", base_url = %p.veratad.base_url, "provider enabled");
        providers.push(Arc::new(veratad));
    } else {
        tracing::info!(provider = "veratad", "provider disabled: no credentials configured");
    }
    if p.dqe.enabled() {
        let dqe = handset_dqe::Dqe::new(&p.dqe).map_err(StartError::Provider)?;
        tracing::info!(provider = "dqe", base_url = %p.dqe.base_url, "provider enabled");
        providers.push(Arc::new(dqe));
    } else {
        tracing::info!(provider = "dqe", "provider disabled: no credentials configured");
    }
    // A disabled provider in a rule is skipped (the shipped rules name DQE
    // before the sandbox); a rule left with no provider at all deserves a warning.
    for rule in &settings.routing.rules {
        let enabled = |name: &ProviderName| providers.iter().any(|p| p.name() == *name);
        for name in rule.providers.iter().filter(|name| !enabled(name)) {
            tracing::info!(provider = %name, product = %rule.product, "a routing rule names a disabled provider; it is skipped");
        }
        if !rule.providers.iter().any(enabled) {
            tracing::warn!(product = %rule.product, "a routing rule names no enabled provider: its requests get 422 3908");
        }
    }
    Ok(providers)
}

/// In production the development partner is refused by id whatever key it
/// holds (`GatewaySettings::refused_partner`); its row, left by an earlier
/// development run on this database, is also deactivated, and the log says so.
async fn retire_dev_partner(store: &dyn Store) {
    match store.set_partner_active(DEV_PARTNER_ID, false).await {
        Ok(true) => tracing::warn!(partner_id = %DEV_PARTNER_ID, "production: the development partner is deactivated"),
        Ok(false) => {}
        Err(error) => {
            tracing::warn!(%error, "could not deactivate the development partner now; it is refused all the same")
        }
    }
}

/// In development, the configured key authenticates a partner with every product.
async fn seed_dev_partner(settings: &Settings, store: &dyn Store) -> Result<(), StoreError> {
    let key = settings.dev.api_key.expose();
    if key.is_empty() {
        return Ok(());
    }
    let partner = Partner {
        id: DEV_PARTNER_ID,
        name: "development".into(),
        products: Product::ALL.to_vec(),
        active: true,
        webhook_secret: DEV_WEBHOOK_SECRET.into(),
        created_at: chrono::Utc::now(),
    };
    store.upsert_partner(&NewPartner { partner, api_key_hash: api_key_hash(key) }).await
}

/// Every route with its OpenAPI operation: the router and the document are
/// both made from this list (`routes::docs::document`). `guarded`: the state
/// the `Idempotency-Key` layer of state-changing POSTs runs with (`None`
/// when only the document is wanted).
pub fn api_routes(sandbox: bool, guarded: Option<&AppState>) -> OpenApiRouter<AppState> {
    let mut idempotent = OpenApiRouter::new()
        .routes(routes!(possession::start))
        .routes(routes!(possession::confirm))
        .routes(routes!(identity::start))
        .routes(routes!(callbacks::retry));
    if let Some(state) = guarded {
        idempotent =
            idempotent.route_layer(axum::middleware::from_fn_with_state(state.clone(), crate::idempotency::guard));
    }
    let api = OpenApiRouter::with_openapi(docs::ApiDoc::openapi())
        .merge(idempotent)
        .routes(routes!(transactions::get_transaction))
        .routes(routes!(callbacks::list))
        .routes(routes!(transactions::get_verification))
        .routes(routes!(stats::get_stats))
        .routes(routes!(providers::webhook))
        .routes(routes!(providers::operator_return))
        .routes(routes!(health::health))
        .routes(routes!(health::ready))
        .routes(routes!(health::metrics))
        .routes(routes!(docs::openapi))
        .routes(routes!(docs::page))
        .routes(routes!(docs::script));
    // Production has no sandbox: its page is an unknown route there (404).
    if sandbox { api.routes(routes!(sandbox::operator)) } else { api }
}

pub fn router(state: AppState) -> Router {
    let (api, _) = api_routes(state.sandbox, Some(&state)).split_for_parts();
    api.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::deadline::detach))
        .with_state(state)
        // Inside `observe`, so a panic's 500 is logged, counted and carries its request id.
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::middleware::from_fn(telemetry::observe))
}

async fn not_found() -> Failure {
    ErrorCode::NotFound.into()
}

async fn method_not_allowed() -> Response {
    let mut response =
        error_response(&ApiError::with_message(ErrorCode::NotFound, "Method not allowed on this resource"));
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    Failure::from(ErrorCode::Internal).into_response()
}
