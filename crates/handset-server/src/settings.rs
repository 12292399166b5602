//! Configuration: `config/default.toml` (compiled in), then `--config FILE`,
//! then `HANDSET__SECTION__KEY` environment variables; validated as a whole.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use config::{Config, Environment as EnvSource, File, FileFormat};
use handset_core::Region;
use handset_core::routing::RoutingRule;
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = include_str!("../../../config/default.toml");

/// A value that must never be printed: `Debug` shows only whether it is set.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_set() { "Secret(***)" } else { "Secret(unset)" })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunEnvironment {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub environment: RunEnvironment,
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub phone: PhoneSettings,
    pub possession: PossessionSettings,
    pub identity: IdentitySettings,
    pub callbacks: CallbackSettings,
    pub workers: WorkerSettings,
    pub retention: RetentionSettings,
    pub providers: ProvidersSettings,
    pub circuit_breaker: CircuitBreakerSettings,
    pub rate_limits: RateLimitSettings,
    pub routing: RoutingSettings,
    pub dev: DevSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub bind: String,
    pub public_url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub migrate_on_start: bool,
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhoneSettings {
    pub default_region: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PossessionSettings {
    #[serde(with = "humantime_serde")]
    pub code_ttl: Duration,
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackSettings {
    pub allow_private_networks: bool,
    #[serde(deserialize_with = "durations")]
    pub retry_schedule: Vec<Duration>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Run the job runner in this process (several processes may share a database).
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    pub batch_size: u32,
    /// First wait before asking a provider again for a pending result; doubled each time up to the max.
    #[serde(with = "humantime_serde")]
    pub provider_poll_min: Duration,
    #[serde(with = "humantime_serde")]
    pub provider_poll_max: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// How long an identity match may wait for an asynchronous result.
    #[serde(with = "humantime_serde")]
    pub result_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerSettings {
    /// Consecutive unavailable answers that pause a provider.
    pub failure_threshold: u32,
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Personal data of final transactions older than this is purged; 0 keeps it.
    #[serde(with = "humantime_serde")]
    pub personal_data: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersSettings {
    pub idme: IdmeSettings,
    pub veratad: VeratadSettings,
    pub dqe: DqeSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdmeSettings {
    pub base_url: String,
    pub secret: Secret,
    pub webhook_secret: Secret,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VeratadSettings {
    pub base_url: String,
    pub user: String,
    pub pass: Secret,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DqeSettings {
    pub base_url: String,
    pub licence: Secret,
    pub token: Secret,
    pub name: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub per_product_per_minute: u32,
    pub per_partner_per_minute: u32,
    pub per_phone_per_hour: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSettings {
    pub rules: Vec<RoutingRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevSettings {
    pub api_key: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// A list of humantime durations, as a TOML array or as one comma-separated
/// string (how environment variables give lists).
fn durations<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        List(Vec<String>),
        Joined(String),
    }
    let items = match Form::deserialize(deserializer)? {
        Form::List(items) => items,
        Form::Joined(text) => text.split(',').map(str::to_owned).collect(),
    };
    items
        .iter()
        .filter(|item| !item.trim().is_empty())
        .map(|item| humantime::parse_duration(item.trim()).map_err(serde::de::Error::custom))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Settings {
    /// Reads the layers (defaults, `file`, the process environment) and validates.
    pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
        Self::load_with(file, None)
    }

    /// As `load`, with environment variables taken from `env` instead of the
    /// process (tests).
    pub fn load_with(file: Option<&Path>, env: Option<Vec<(String, String)>>) -> Result<Settings, SettingsError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULT_CONFIG, FileFormat::Toml));
        if let Some(path) = file {
            // Whatever the file is called, it is TOML.
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        // Values stay strings (a key like "000123" must not become 123); typed
        // fields convert them, and lists accept "5s,1m".
        let mut env_source = EnvSource::with_prefix("HANDSET").prefix_separator("__").separator("__");
        if let Some(vars) = env {
            env_source = env_source.source(Some(vars.into_iter().collect()));
        }
        let settings: Settings = builder.add_source(env_source).build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |why: String| Err(SettingsError::Invalid(why));
        let port = self.server.bind.rsplit_once(':').map(|(_, port)| port.parse::<u16>());
        if !matches!(port, Some(Ok(_))) {
            return invalid(format!("server.bind must be HOST:PORT, got {:?}", self.server.bind));
        }
        if !self.server.public_url.is_empty() && url::Url::parse(&self.server.public_url).is_err() {
            return invalid(format!("server.public_url must be an absolute URL, got {:?}", self.server.public_url));
        }
        if handset_store::Backend::of_url(self.database.url.expose()).is_none() {
            return invalid("database.url must start with sqlite: or postgres://".into());
        }
        if self.database.max_connections == 0 {
            return invalid("database.max_connections must be at least 1".into());
        }
        if Region::parse(&self.phone.default_region).is_none() {
            return invalid(format!("phone.default_region {:?} is not a known region", self.phone.default_region));
        }
        if self.possession.max_attempts == 0 || self.possession.max_attempts > 100 {
            return invalid("possession.max_attempts must be between 1 and 100".into());
        }
        if self.is_production() && self.callbacks.allow_private_networks {
            return invalid(
                "callbacks.allow_private_networks is for development and tests; refused in production".into(),
            );
        }
        if self.workers.batch_size == 0 || self.workers.poll_interval.is_zero() {
            return invalid("workers.batch_size and workers.poll_interval must be more than zero".into());
        }
        if self.workers.provider_poll_min.is_zero() || self.workers.provider_poll_max < self.workers.provider_poll_min {
            return invalid("workers.provider_poll_min must be more than zero and at most provider_poll_max".into());
        }
        if self.identity.result_ttl.is_zero() {
            return invalid("identity.result_ttl must be more than zero".into());
        }
        if self.callbacks.timeout.is_zero() {
            return invalid("callbacks.timeout must be more than zero".into());
        }
        if self.possession.code_ttl.is_zero() {
            return invalid("possession.code_ttl must be more than zero".into());
        }
        for rule in &self.routing.rules {
            if rule.providers.is_empty() {
                return invalid(format!("routing rule for {} lists no provider", rule.product));
            }
            for country in rule.countries.iter().flatten() {
                if Region::parse(country).is_none() {
                    return invalid(format!("routing rule for {}: unknown country {country:?}", rule.product));
                }
            }
        }
        Ok(())
    }

    pub fn default_region(&self) -> Region {
        Region::parse(&self.phone.default_region).unwrap_or_default()
    }

    /// ID.me is enabled when it has a secret.
    pub fn idme_enabled(&self) -> bool {
        self.providers.idme.secret.is_set()
    }

    pub fn is_production(&self) -> bool {
        self.environment == RunEnvironment::Production
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn defaults_are_sandbox_ready() {
        let s = Settings::load_with(None, env(&[])).unwrap();
        assert_eq!(s.environment, RunEnvironment::Development);
        assert_eq!(s.database.url.expose(), "sqlite://handset.db");
        assert_eq!(s.possession.code_ttl, Duration::from_secs(600));
        assert_eq!(s.possession.max_attempts, 5);
        assert_eq!(s.routing.rules.len(), 3);
        assert_eq!(s.callbacks.retry_schedule.len(), 7);
        assert!(!s.providers.idme.secret.is_set());
    }

    #[test]
    fn environment_overrides() {
        let s = Settings::load_with(
            None,
            env(&[
                ("HANDSET__DATABASE__URL", "postgres://u:p@127.0.0.1/x"),
                ("HANDSET__POSSESSION__MAX_ATTEMPTS", "3"),
                ("HANDSET__POSSESSION__CODE_TTL", "90s"),
                ("HANDSET__PROVIDERS__IDME__BASE_URL", "http://127.0.0.1:9"),
                ("HANDSET__CALLBACKS__RETRY_SCHEDULE", "1s,2s"),
                ("HANDSET__DEV__API_KEY", "000123"),
                ("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "true"),
                ("HANDSET__SERVER__BIND", "localhost:0"),
            ]),
        )
        .unwrap();
        assert_eq!(s.database.url.expose(), "postgres://u:p@127.0.0.1/x");
        assert_eq!(s.possession.max_attempts, 3);
        assert_eq!(s.possession.code_ttl, Duration::from_secs(90));
        assert_eq!(s.providers.idme.base_url, "http://127.0.0.1:9");
        assert_eq!(s.callbacks.retry_schedule, [Duration::from_secs(1), Duration::from_secs(2)]);
        assert_eq!(s.dev.api_key.expose(), "000123", "strings stay strings");
        assert!(s.callbacks.allow_private_networks);
        assert_eq!(s.server.bind, "localhost:0");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Settings::load_with(None, env(&[("HANDSET__PHONE__DEFAULT_REGION", "XX")])).is_err());
        assert!(Settings::load_with(None, env(&[("HANDSET__DATABASE__URL", "mysql://x")])).is_err());
        assert!(Settings::load_with(None, env(&[("HANDSET__ENVIRONMENT", "staging")])).is_err());
        assert!(Settings::load_with(None, env(&[("HANDSET__SERVER__TYPO", "x")])).is_err());
        let open_in_production =
            env(&[("HANDSET__ENVIRONMENT", "production"), ("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "true")]);
        assert!(Settings::load_with(None, open_in_production).is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Settings::load_with(None, env(&[("HANDSET__PROVIDERS__IDME__SECRET", "hunter2")])).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
