//! The `handset` command line: `serve` (default), `migrate`, `health`,
//! `openapi`, `partner ...`.

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use clap::{Parser, Subcommand};
use handset_core::model::{Partner, Product};
use handset_core::secret::api_key_hash;
use handset_core::store::NewPartner;
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
}

pub type CliResult = Result<(), Box<dyn std::error::Error>>;

pub async fn run(cli: Cli) -> CliResult {
    let settings = Settings::load(cli.config.as_deref())?;
    telemetry::init_logging(cli.log_format.unwrap_or(settings.log.format), &settings.log.level);
    match cli.command.unwrap_or(Command::Serve) {
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
    }
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
            let api_key = format!("hs_{}", URL_SAFE_NO_PAD.encode(random_bytes::<32>()));
            let webhook_secret = format!("whsec_{}", STANDARD.encode(random_bytes::<32>()));
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
