use std::time::Duration;

use clap::Parser;
use handset_sim::delivery::DeliveryRates;
use handset_sim::dqe::DqeConfig;
use handset_sim::faults::Faults;
use handset_sim::idme::IdmeConfig;
use handset_sim::veratad::VeratadConfig;
use handset_sim::{Sim, SimConfig};

/// Imitates handset's upstream providers (ID.me, Veratad and DQE) for local runs and tests.
#[derive(Debug, Parser)]
#[command(name = "handset-sim", version)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9090")]
    bind: String,
    /// This sim's address as a browser reaches it, used in the operator
    /// pages' URLs (default: http:// and the bound address).
    #[arg(long)]
    public_url: Option<String>,
    /// The ID.me API secret callers must use.
    #[arg(long, default_value = "sim-secret", env = "HANDSET_SIM_IDME_SECRET")]
    idme_secret: String,
    /// How long identity checks stay pending (humantime: 500ms, 2s).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    idme_identity_delay: Duration,
    /// How long a sent code can be confirmed (then 3103).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    idme_code_ttl: Duration,
    /// Push identity results here instead of the request's callback_url.
    #[arg(long)]
    idme_webhook_url: Option<String>,
    /// Do not push results (callers must poll).
    #[arg(long)]
    no_idme_webhooks: bool,
    /// The Veratad API username callers must send as `user`.
    #[arg(long, default_value = "sim-user", env = "HANDSET_SIM_VERATAD_USER")]
    veratad_user: String,
    /// The Veratad API password callers must send as `pass`.
    #[arg(long, default_value = "sim-pass", env = "HANDSET_SIM_VERATAD_PASS")]
    veratad_pass: String,
    /// The DQE licence code callers must send (`licence`, then `Licence`).
    #[arg(long, default_value = "sim-licence", env = "HANDSET_SIM_DQE_LICENCE")]
    dqe_licence: String,
    /// The DQE API token callers must send to `/IDMOBILE/`.
    #[arg(long, default_value = "sim-token", env = "HANDSET_SIM_DQE_TOKEN")]
    dqe_token: String,
    /// The partner name DQE knows handset by (`providers.dqe.name`).
    #[arg(long, default_value = "handset", env = "HANDSET_SIM_DQE_NAME")]
    dqe_name: String,
    /// Latency added to every provider answer.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Up to this much extra latency, at random.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    jitter: Duration,
    /// Share of requests answered 503 (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Never answer provider requests.
    #[arg(long)]
    hang: bool,
    /// Share of ID.me's sent codes that reach the user's inbox (0.0 to 1.0).
    #[arg(long, default_value_t = 1.0)]
    idme_delivery_rate: f64,
    /// Share of Veratad's sent codes that reach the user's inbox (0.0 to 1.0).
    #[arg(long, default_value_t = 1.0)]
    veratad_delivery_rate: f64,
    /// Seed of the delivery draws (the same seed, the same deliveries).
    #[arg(long, default_value_t = 0)]
    delivery_seed: u64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new("info")).init();
    let args = Args::parse();
    let delivery =
        DeliveryRates { idme: args.idme_delivery_rate, veratad: args.veratad_delivery_rate, seed: args.delivery_seed };
    if !delivery.valid() {
        eprintln!("handset-sim: delivery rates are shares between 0.0 and 1.0");
        std::process::exit(2);
    }
    let config = SimConfig {
        faults: Faults {
            latency_ms: args.latency.as_millis() as u64,
            jitter_ms: args.jitter.as_millis() as u64,
            error_rate: args.error_rate,
            error_status: None,
            hang: args.hang,
        },
        idme: IdmeConfig {
            secret: args.idme_secret,
            identity_delay: args.idme_identity_delay,
            push_webhooks: !args.no_idme_webhooks,
            webhook_url: args.idme_webhook_url,
            code_ttl: args.idme_code_ttl,
        },
        veratad: VeratadConfig { user: args.veratad_user, pass: args.veratad_pass, ..VeratadConfig::default() },
        dqe: DqeConfig {
            licence: args.dqe_licence,
            token: args.dqe_token,
            name: args.dqe_name,
            ..DqeConfig::default()
        },
        delivery,
        public_url: args.public_url,
    };
    Sim::serve(&args.bind, config).await
}
