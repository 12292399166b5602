//! The `handset` command line: `serve` (default), `migrate`, `health`,
//! `openapi`, `partner ...`, `callbacks ...`, `fraud ...`, `stats`. Operator commands print JSON on
//! stdout (logs go to stderr) and exit 1 with a message when refused.

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use clap::{Parser, Subcommand};
use handset_core::model::{Partner, Product};
use handset_core::secret::api_key_hash;
use handset_core::store::{NewPartner, PartnerRecord};
use rand::RngCore;
use serde_json::json;
use uuid::Uuid;

use crate::app::{Application, open_store};
use crate::settings::{LogFormat, Settings};
use crate::telemetry;

#[derive(Debug, Parser)]
#[command(name = "handset", version, about = "Phone verification gateway")]
pub struct Cli {
    /// Configuration file layered over the built-in defaults.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format; overrides `log.format`.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Ask the `handset serve` this configuration describes (`server.bind`)
    /// for `/health`: exits 0 when it answers 200 (a container's HEALTHCHECK).
    Health,
    /// Print the OpenAPI document this configuration serves at /openapi.json
    /// (docs/openapi.json is the development one).
    Openapi,
    /// Manage partner accounts.
    #[command(subcommand)]
    Partner(PartnerCommand),
    /// Operate on callbacks.
    #[command(subcommand)]
    Callbacks(CallbacksCommand),
    /// The SMS pumping guard's paused number ranges.
    #[command(subcommand)]
    Fraud(FraudCommand),
    /// The verification funnel across partners (or of one), as `GET
    /// /v1/stats` answers it: {"since","until","groups":[...]}.
    Stats {
        /// Start of the range: a time before now (1h, 2d) or an RFC 3339 time.
        #[arg(long, default_value = "24h")]
        since: String,
        /// End of the range (RFC 3339); default: now.
        #[arg(long)]
        until: Option<String>,
        /// Only this partner's transactions.
        #[arg(long)]
        partner: Option<Uuid>,
        /// Comma-separated subset of provider, country, product (default: all three).
        #[arg(long)]
        group_by: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum FraudCommand {
    /// The ranges paused now, as a JSON array of {"range","paused_at",
    /// "paused_until","sends","succeeded"}.
    List,
    /// Lift a range's pause (e.g. +1415555); its sends so far stop counting.
    /// Prints {"range","released"}.
    Release { range: String },
}

#[derive(Debug, Subcommand)]
pub enum CallbacksCommand {
    /// Re-queue a partner's callbacks that gave up, with a fresh retry
    /// schedule; prints {"partner_id","requeued","callback_ids","not_replayable"}.
    Replay {
        #[arg(long)]
        partner: Uuid,
        /// Replay callbacks that exhausted their retries (the only kind that can be).
        #[arg(long)]
        failed: bool,
        /// Those that gave up within this long before now (e.g. 2h, 3d).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum PartnerCommand {
    /// Create a partner; prints {"partner_id","api_key","webhook_secret"} as JSON.
    Create {
        #[arg(long)]
        name: String,
        /// Comma-separated products (default: all three).
        #[arg(long, value_delimiter = ',', default_value = "possession.sms,possession.network,identity")]
        products: Vec<String>,
    },
    /// Deactivate a partner: its key then answers 401 1200 on every replica
    /// (on Postgres, once the change's announcement reaches it: milliseconds).
    Deactivate {
        #[arg(long)]
        id: Uuid,
    },
    /// Reactivate a deactivated partner.
    Activate {
        #[arg(long)]
        id: Uuid,
    },
    /// Every partner, oldest first, as a JSON array (no secrets).
    List,
    /// One partner as JSON (no secrets).
    Show { id: Uuid },
    /// Issue a new API key; prints {"partner_id","api_key","previous_key_expires_at"}.
    /// The old key keeps working for `--overlap` (default 0s: it stops at once).
    RotateKey {
        id: Uuid,
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        overlap: std::time::Duration,
    },
    /// Issue a new webhook secret; prints {"partner_id","webhook_secret",
    /// "previous_webhook_secret_expires_at"}. For `--overlap` (default 0s)
    /// callbacks carry a signature with each secret.
    RotateWebhookSecret {
        id: Uuid,
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        overlap: std::time::Duration,
    },
}

pub type CliResult = Result<(), Box<dyn std::error::Error>>;

pub async fn run(cli: Cli) -> CliResult {
    let settings = Settings::load(cli.config.as_deref())?;
    let format = cli.log_format.unwrap_or(settings.log.format);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            // Only the server exports traces; the other commands just log.
            let export = telemetry::init_telemetry(format, &settings.log.level, Some(&settings.telemetry))?;
            let served = serve(settings).await;
            if let Some(export) = export {
                export.shutdown();
            }
            served
        }
        command => {
            telemetry::init_logging(format, &settings.log.level);
            command_run(settings, command).await
        }
    }
}

async fn command_run(settings: Settings, command: Command) -> CliResult {
    match command {
        Command::Serve => serve(settings).await,
        Command::Migrate => {
            open_store(&settings)?.migrate().await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Health => health(&settings).await,
        Command::Openapi => {
            let document = crate::routes::docs::document(!settings.is_production());
            println!("{}", serde_json::to_string_pretty(&document)?);
            Ok(())
        }
        Command::Partner(command) => partner(settings, command).await,
        Command::Callbacks(command) => callbacks(settings, command).await,
        Command::Fraud(command) => fraud(settings, command).await,
        Command::Stats { since, until, partner, group_by } => {
            stats(settings, &since, until.as_deref(), partner, group_by.as_deref()).await
        }
    }
}

async fn fraud(settings: Settings, command: FraudCommand) -> CliResult {
    let store = open_store(&settings)?;
    if settings.database.migrate_on_start {
        store.migrate().await?;
    }
    let now = chrono::Utc::now();
    match command {
        FraudCommand::List => println!("{}", serde_json::to_string_pretty(&store.paused_ranges(now).await?)?),
        FraudCommand::Release { range } => {
            if !store.release_range(&range, now).await? {
                return Err(format!("{range} is not paused (handset fraud list shows the paused ranges)").into());
            }
            tracing::info!(range = %range, "number range released");
            println!("{}", json!({ "range": range, "released": true }));
        }
    }
    Ok(())
}

async fn stats(
    settings: Settings,
    since: &str,
    until: Option<&str>,
    partner: Option<Uuid>,
    group_by: Option<&str>,
) -> CliResult {
    let store = open_store(&settings)?;
    if settings.database.migrate_on_start {
        store.migrate().await?;
    }
    let now = chrono::Utc::now();
    // A duration counts back from now; anything else must be a time.
    let since = match humantime::parse_duration(since) {
        Ok(ago) => before(now, ago)?.to_rfc3339(),
        Err(_) => since.to_owned(),
    };
    let query = handset_core::funnel::FunnelQuery::parse(partner, Some(&since), until, group_by, now)
        .map_err(|e| e.message.into_owned())?;
    let counts = store.funnel(&query).await?;
    println!("{}", serde_json::to_string_pretty(&handset_core::funnel::FunnelOut::of(&query, counts))?);
    Ok(())
}

async fn callbacks(settings: Settings, command: CallbacksCommand) -> CliResult {
    let store = open_store(&settings)?;
    if settings.database.migrate_on_start {
        store.migrate().await?;
    }
    match command {
        CallbacksCommand::Replay { partner, failed, since } => {
            if !failed {
                return Err("only callbacks that gave up can be replayed: pass --failed".into());
            }
            if store.partner(partner).await?.is_none() {
                return Err(format!("no partner {partner}").into());
            }
            let now = chrono::Utc::now();
            let since = before(now, since)?;
            let requeued = store.requeue_failed_callbacks(partner, since, now).await?;
            if requeued.purged > 0 {
                tracing::warn!(
                    count = requeued.purged,
                    "failed callbacks whose body retention removed cannot be replayed"
                );
            }
            println!(
                "{}",
                json!({
                    "partner_id": partner,
                    "requeued": requeued.ids.len(),
                    "callback_ids": requeued.ids,
                    "not_replayable": requeued.purged,
                })
            );
        }
    }
    Ok(())
}

/// A partner as operators see it; never a secret. An overlap that has
/// ended is shown as none.
fn partner_json(record: &PartnerRecord) -> serde_json::Value {
    let p = &record.partner;
    let now = chrono::Utc::now();
    let running = |until: Option<chrono::DateTime<chrono::Utc>>| until.filter(|at| *at > now);
    json!({
        "partner_id": p.id,
        "name": p.name,
        "products": p.products.iter().map(|product| product.as_str()).collect::<Vec<_>>(),
        "active": p.active,
        "created_at": p.created_at,
        "previous_key_expires_at": running(record.previous_key_expires_at),
        "previous_webhook_secret_expires_at": running(record.previous_webhook_secret_expires_at),
    })
}

/// When an overlap of `overlap` from now ends, or `None` for no overlap.
fn overlap_until(overlap: std::time::Duration) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
    if overlap.is_zero() {
        return Ok(None);
    }
    let overlap = chrono::Duration::from_std(overlap).map_err(|_| "--overlap is too long".to_owned())?;
    Ok(Some(chrono::Utc::now() + overlap))
}

fn new_api_key() -> String {
    format!("hs_{}", URL_SAFE_NO_PAD.encode(random_bytes::<32>()))
}

fn new_webhook_secret() -> String {
    format!("whsec_{}", STANDARD.encode(random_bytes::<32>()))
}

async fn health(settings: &Settings) -> CliResult {
    crate::install_crypto_provider();
    let bind = &settings.server.bind;
    // A server bound to every interface is asked on loopback.
    let host = match bind.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            let loopback: std::net::IpAddr = match addr {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            };
            std::net::SocketAddr::new(loopback, addr.port()).to_string()
        }
        _ => bind.clone(),
    };
    let url = format!("http://{host}/health");
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(3)).build()?;
    let status = client.get(&url).send().await?.status();
    if !status.is_success() {
        return Err(format!("{url} answered {status}").into());
    }
    println!("{}", json!({ "url": url, "status": status.as_u16() }));
    Ok(())
}

async fn serve(settings: Settings) -> CliResult {
    if settings.is_production() {
        tracing::info!("production: the development key is refused");
    } else {
        tracing::warn!("development environment: the dev.api_key partner is enabled");
    }
    let app = Application::build(settings).await?;
    app.run_until(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn partner(settings: Settings, command: PartnerCommand) -> CliResult {
    let store = open_store(&settings)?;
    if settings.database.migrate_on_start {
        store.migrate().await?;
    }
    match command {
        PartnerCommand::Create { name, products } => {
            let products = products
                .iter()
                .map(|p| Product::parse(p.trim()).ok_or_else(|| format!("unknown product {p:?}")))
                .collect::<Result<Vec<_>, _>>()?;
            if name.trim().is_empty() {
                return Err("--name must not be empty".into());
            }
            let (api_key, webhook_secret) = (new_api_key(), new_webhook_secret());
            let partner = Partner {
                id: Uuid::new_v4(),
                name,
                products,
                active: true,
                webhook_secret: webhook_secret.clone().into(),
                created_at: chrono::Utc::now(),
            };
            let id = partner.id;
            store.insert_partner(&NewPartner { partner, api_key_hash: api_key_hash(&api_key) }).await?;
            println!("{}", json!({ "partner_id": id, "api_key": api_key, "webhook_secret": webhook_secret }));
        }
        PartnerCommand::Deactivate { id } | PartnerCommand::Activate { id } => {
            let active = matches!(command, PartnerCommand::Activate { .. });
            if !store.set_partner_active(id, active).await? {
                return Err(format!("no partner {id}").into());
            }
            println!("{}", json!({ "partner_id": id, "active": active }));
        }
        PartnerCommand::List => {
            let partners = store.partners().await?;
            println!("{}", serde_json::Value::Array(partners.iter().map(partner_json).collect()));
        }
        PartnerCommand::Show { id } => {
            let record = store.partner(id).await?.ok_or_else(|| format!("no partner {id}"))?;
            println!("{}", partner_json(&record));
        }
        PartnerCommand::RotateKey { id, overlap } => {
            let until = overlap_until(overlap)?;
            let api_key = new_api_key();
            if !store.rotate_api_key(id, &api_key_hash(&api_key), until).await? {
                return Err(format!("no partner {id}").into());
            }
            println!("{}", json!({ "partner_id": id, "api_key": api_key, "previous_key_expires_at": until }));
        }
        PartnerCommand::RotateWebhookSecret { id, overlap } => {
            let until = overlap_until(overlap)?;
            let webhook_secret = new_webhook_secret();
            if !store.rotate_webhook_secret(id, &webhook_secret, until).await? {
                return Err(format!("no partner {id}").into());
            }
            println!(
                "{}",
                json!({ "partner_id": id, "webhook_secret": webhook_secret, "previous_webhook_secret_expires_at": until })
            );
        }
    }
    Ok(())
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

/// `ago` before `now`, or a refusal when that is before any representable time.
fn before(
    now: chrono::DateTime<chrono::Utc>,
    ago: std::time::Duration,
) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|ago| now.checked_sub_signed(ago))
        .ok_or_else(|| "--since is too long".to_owned())
}
