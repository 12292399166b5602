//! `handset-sim`: one HTTP server that imitates handset's upstream providers
//! statefully, for the local stack, end-to-end tests and benchmarks. ID.me's
//! telecom API, Veratad's PhoneMatch5.0.SMS and DQE's ID Mobile numVerify
//! live under their documented paths, each a module with its own routers.
//! Faults (latency, jitter, error rate, hanging) apply to every provider route
//! and are set by flags or at run time through `/_admin/faults`; DQE's fake
//! operator page is not one (the user's browser visits it), nor is `/_admin`.
//! Sent codes reach the user's inbox (`/_admin/inbox/{phone}`) at each
//! provider's delivery rate (`/_admin/delivery`, see `delivery`).

pub mod delivery;
pub mod dqe;
pub mod faults;
pub mod idme;
pub mod veratad;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;

use crate::faults::{FaultState, Faults, SharedFaults};

#[derive(Debug, Clone, Default)]
pub struct SimConfig {
    pub faults: Faults,
    pub idme: idme::IdmeConfig,
    pub veratad: veratad::VeratadConfig,
    pub dqe: dqe::DqeConfig,
    /// The share of sent codes each provider delivers to the user.
    pub delivery: delivery::DeliveryRates,
    /// The sim's address as a browser reaches it, for the operator pages it
    /// links to (DQE's network check); default `http://` + the bound address.
    pub public_url: Option<String>,
}

/// A running simulator.
pub struct Sim {
    pub addr: SocketAddr,
    pub faults: SharedFaults,
    pub idme: idme::IdmeSim,
    pub veratad: veratad::VeratadSim,
    pub dqe: dqe::DqeSim,
    pub delivery: delivery::Delivery,
}

impl Sim {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.faults.faults.write().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    /// Provider requests received so far (admin calls not counted).
    pub fn requests(&self) -> u64 {
        self.faults.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Binds `bind` (port 0 for any) and serves in the background.
    pub async fn start(bind: &str, config: SimConfig) -> std::io::Result<Sim> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let (sim, router) = Self::build(addr, config);
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(sim)
    }

    /// Serves on `bind` until the process ends.
    pub async fn serve(bind: &str, config: SimConfig) -> std::io::Result<()> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let (_, router) = Self::build(addr, config);
        tracing::info!(%addr, "handset-sim listening");
        axum::serve(listener, router).await
    }

    fn build(addr: SocketAddr, config: SimConfig) -> (Sim, Router) {
        install_crypto_provider();
        let faults: SharedFaults = Arc::new(FaultState { faults: RwLock::new(config.faults), ..FaultState::default() });
        let delivery = delivery::Delivery::new(config.delivery);
        let idme = idme::IdmeSim::new(config.idme, delivery.clone());
        let veratad = veratad::VeratadSim::new(config.veratad, delivery.clone());
        let public_url = config.public_url.unwrap_or_else(|| format!("http://{addr}"));
        let dqe = dqe::DqeSim::new(config.dqe, public_url);
        let providers = Router::new()
            .merge(idme.router())
            .merge(veratad.router())
            .merge(dqe.router())
            .layer(axum::middleware::from_fn_with_state(faults.clone(), faults::inject));
        let admin = Router::new()
            .route("/_admin/faults", get(get_faults).put(put_faults))
            .with_state(faults.clone())
            .merge(idme.admin_router())
            .merge(veratad.admin_router())
            .merge(dqe.operator_router())
            .merge(dqe.admin_router())
            .merge(delivery.admin_router());
        (Sim { addr, faults, idme, veratad, dqe, delivery }, providers.merge(admin))
    }
}

async fn get_faults(State(state): State<SharedFaults>) -> Json<Faults> {
    Json(state.faults.read().unwrap_or_else(|e| e.into_inner()).clone())
}

async fn put_faults(State(state): State<SharedFaults>, Json(new): Json<Faults>) -> Json<Faults> {
    *state.faults.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
    Json(new)
}

/// The simulator pushes webhooks over HTTPS too; ring is its TLS backend.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
