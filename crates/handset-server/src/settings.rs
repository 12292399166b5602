//! Configuration: `config/default.toml` (compiled in), then `--config FILE`,
//! then `HANDSET__SECTION__KEY` environment variables; validated as a whole.

use std::path::Path;
use std::time::Duration;

use config::{Config, Environment as EnvSource, File, FileFormat};
use handset_core::Region;
use handset_core::model::{Product, ProviderName};
use handset_core::routing::RoutingRule;
use handset_core::secret::DEVELOPMENT_CODE_PEPPER;
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = include_str!("../../../config/default.toml");

pub use handset_core::secret::Secret;

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
    pub fraud: FraudSettings,
    pub routing: RoutingSettings,
    pub security: SecuritySettings,
    pub dev: DevSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub bind: String,
    pub public_url: String,
    /// A client must send a request's whole header within this time (also
    /// how long an idle keep-alive connection stays open).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request body must arrive whole within this time (408 3909).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// The longest a request is answered in (500 5000 after it; a change
    /// already under way still completes and is recorded).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: u32,
    /// After SIGTERM, how long open requests and background work may take.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// After SIGTERM, how long new connections are still served, with
    /// `/ready` answering 503, before the listener closes.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
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
    pub sandbox: SandboxSettings,
    pub idme: handset_idme::IdmeSettings,
    pub veratad: handset_veratad::VeratadSettings,
    pub dqe: handset_dqe::DqeSettings,
}

/// `[providers.sandbox]`: it has nothing to configure but its weight.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    pub cost: f64,
}

impl ProvidersSettings {
    /// `providers.<name>.cost` of each provider.
    pub fn costs(&self) -> std::collections::HashMap<ProviderName, f64> {
        [
            (ProviderName::Sandbox, self.sandbox.cost),
            (ProviderName::Idme, self.idme.cost),
            (ProviderName::Veratad, self.veratad.cost),
            (ProviderName::Dqe, self.dqe.cost),
        ]
        .into()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub per_product_per_minute: u32,
    pub per_partner_per_minute: u32,
    pub per_phone_per_hour: u32,
}

/// The SMS pumping guard (`handset_core::pumping`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FraudSettings {
    /// Unset: on in production, off in development.
    pub enabled: Option<bool>,
    pub prefix_digits: usize,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    pub min_sends: u32,
    pub max_conversion: f64,
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

impl FraudSettings {
    pub fn enabled(&self, production: bool) -> bool {
        self.enabled.unwrap_or(production)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSettings {
    pub rules: Vec<RoutingRule>,
    pub adaptive: AdaptiveRoutingSettings,
}

/// `[routing.adaptive]`: how rules with `strategy = "adaptive"` rank their
/// providers (`handset_core::adaptive`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveRoutingSettings {
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    pub min_samples: u32,
    pub explore: f64,
    /// Seeds the exploration draws, for reproducible tests; unset: random.
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySettings {
    /// Keys the hashes of one-time codes handset checks itself. Required in
    /// production; development uses `DEVELOPMENT_CODE_PEPPER`.
    pub code_pepper: Secret,
    /// The longest a partner read by its API key is reused; 0 reads it on
    /// every request. Used on Postgres only, where every partner change is
    /// announced to every replica (`handset_core::partner_cache`).
    #[serde(with = "humantime_serde")]
    pub partner_cache_ttl: Duration,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// An OpenTelemetry collector's OTLP/HTTP base URL (`/v1/traces` is
    /// appended); empty: traces are not exported.
    pub otlp_endpoint: String,
    pub otlp_protocol: OtlpProtocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "http/json")]
    HttpJson,
}

/// A list of humantime durations, as a TOML array or as one comma-separated
/// string (how environment variables give lists).
fn durations<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Duration>, D::Error> {
    handset_core::config::string_list(deserializer)?
        .iter()
        .map(|item| humantime::parse_duration(item).map_err(serde::de::Error::custom))
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
        let otlp = &self.telemetry.otlp_endpoint;
        if !otlp.is_empty() && !url::Url::parse(otlp).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) {
            return invalid(format!("telemetry.otlp_endpoint must be an http(s) URL, got {otlp:?}"));
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
        if self.server.max_connections == 0 {
            return invalid("server.max_connections must be at least 1".into());
        }
        let fraud = &self.fraud;
        if !(1..=12).contains(&fraud.prefix_digits) {
            return invalid("fraud.prefix_digits must be between 1 and 12".into());
        }
        if !(0.0..=1.0).contains(&fraud.max_conversion) {
            return invalid("fraud.max_conversion is a share: between 0 and 1".into());
        }

        for (key, value, max) in self.bounded_durations() {
            // Zero turns these two off.
            if value.is_zero()
                && !matches!(
                    key.as_str(),
                    "retention.personal_data" | "security.partner_cache_ttl" | "server.drain_delay"
                )
            {
                return invalid(format!("{key} must be more than zero"));
            }
            if value > max {
                return invalid(format!(
                    "{key} must be at most {}, got {}",
                    humantime::format_duration(max),
                    humantime::format_duration(value)
                ));
            }
        }
        if self.providers.veratad.enabled() {
            self.providers.veratad.validate().map_err(SettingsError::Invalid)?;
        }
        if self.providers.dqe.enabled() {
            self.providers.dqe.validate().map_err(SettingsError::Invalid)?;
        }
        for (name, cost) in self.providers.costs() {
            if !(cost.is_finite() && cost > 0.0) {
                return invalid(format!("providers.{name}.cost must be a number above 0, got {cost}"));
            }
        }
        let adaptive = &self.routing.adaptive;
        if !(0.0..=1.0).contains(&adaptive.explore) {
            return invalid(format!("routing.adaptive.explore must be a share from 0 to 1, got {}", adaptive.explore));
        }
        if adaptive.min_samples == 0 {
            return invalid("routing.adaptive.min_samples must be at least 1".into());
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

    /// Every duration with its upper bound: a deadline is `now + duration`,
    /// which must stay far from the calendar's end.
    fn bounded_durations(&self) -> Vec<(String, Duration, Duration)> {
        const MINUTE: u64 = 60;
        const HOUR: u64 = 60 * MINUTE;
        const DAY: u64 = 24 * HOUR;
        let max = |secs: u64| Duration::from_secs(secs);
        let mut bounded = vec![
            ("server.header_read_timeout".to_owned(), self.server.header_read_timeout, max(5 * MINUTE)),
            ("server.body_read_timeout".to_owned(), self.server.body_read_timeout, max(5 * MINUTE)),
            ("server.request_timeout".to_owned(), self.server.request_timeout, max(10 * MINUTE)),
            ("server.shutdown_timeout".to_owned(), self.server.shutdown_timeout, max(HOUR)),
            ("server.drain_delay".to_owned(), self.server.drain_delay, max(5 * MINUTE)),
            ("database.acquire_timeout".to_owned(), self.database.acquire_timeout, max(5 * MINUTE)),
            ("possession.code_ttl".to_owned(), self.possession.code_ttl, max(DAY)),
            ("identity.result_ttl".to_owned(), self.identity.result_ttl, max(7 * DAY)),
            ("callbacks.timeout".to_owned(), self.callbacks.timeout, max(5 * MINUTE)),
            ("workers.poll_interval".to_owned(), self.workers.poll_interval, max(HOUR)),
            ("workers.provider_poll_min".to_owned(), self.workers.provider_poll_min, max(DAY)),
            ("workers.provider_poll_max".to_owned(), self.workers.provider_poll_max, max(DAY)),
            ("retention.personal_data".to_owned(), self.retention.personal_data, max(100 * 365 * DAY)),
            ("circuit_breaker.open_for".to_owned(), self.circuit_breaker.open_for, max(DAY)),
            ("security.partner_cache_ttl".to_owned(), self.security.partner_cache_ttl, max(HOUR)),
            ("providers.idme.timeout".to_owned(), self.providers.idme.timeout, max(5 * MINUTE)),
            ("providers.veratad.timeout".to_owned(), self.providers.veratad.timeout, max(5 * MINUTE)),
            ("providers.dqe.timeout".to_owned(), self.providers.dqe.timeout, max(5 * MINUTE)),
            ("fraud.window".to_owned(), self.fraud.window, max(DAY)),
            ("routing.adaptive.window".to_owned(), self.routing.adaptive.window, max(7 * DAY)),
            ("fraud.cooldown".to_owned(), self.fraud.cooldown, max(30 * DAY)),
        ];
        for (i, delay) in self.callbacks.retry_schedule.iter().enumerate() {
            bounded.push((format!("callbacks.retry_schedule[{i}]"), *delay, max(7 * DAY)));
        }
        bounded
    }

    /// What production (`environment = "production"`) requires and this
    /// configuration lacks, each naming its key; empty when `serve` may start.
    /// Development needs none of it.
    pub fn production_problems(&self) -> Vec<String> {
        if !self.is_production() {
            return Vec::new();
        }
        let mut problems = Vec::new();
        for rule in &self.routing.rules {
            if rule.providers.contains(&ProviderName::Sandbox) {
                problems.push(format!(
                    "routing.rules: the rule for {} names \"sandbox\", which verifies any number without checking it; \
                     production must route every product to real providers in its own [[routing.rules]]",
                    rule.product
                ));
            }
        }
        if self.server.public_url.is_empty() {
            problems.push(
                "server.public_url is required: the absolute https URL providers and users reach handset at".into(),
            );
        }
        let pepper = self.security.code_pepper.expose();
        if pepper.is_empty() || pepper == DEVELOPMENT_CODE_PEPPER {
            problems.push(
                "security.code_pepper is required: a random secret (32 or more characters, e.g. openssl rand -hex 32)"
                    .into(),
            );
        }
        let sms_routed = self.sms_provider_enabled()
            || self.routing.rules.iter().any(|r| r.product == Product::PossessionSms && !r.providers.is_empty());
        if sms_routed && self.rate_limits.per_phone_per_hour == 0 {
            problems.push(
                "rate_limits.per_phone_per_hour is 0 while an SMS provider is routed: set a limit (e.g. 5) \
                 against SMS pumping"
                    .into(),
            );
        }
        problems
    }

    /// How long a request holds its `Idempotency-Key` before a retry may take
    /// it over (its process may have died): longer than any request's work,
    /// which may outlast `server.request_timeout` while a provider chain
    /// answers, and at least 2 minutes.
    pub fn idempotency_lock(&self) -> Duration {
        let p = &self.providers;
        let chain = p.idme.timeout + p.veratad.timeout + p.dqe.timeout;
        (self.server.request_timeout + chain + Duration::from_secs(60)).max(Duration::from_secs(120))
    }

    /// The pepper codes are hashed with: the configured one, or the
    /// published development pepper outside production.
    pub fn code_pepper(&self) -> Secret {
        if self.security.code_pepper.is_set() {
            self.security.code_pepper.clone()
        } else {
            Secret::from(DEVELOPMENT_CODE_PEPPER)
        }
    }

    pub fn default_region(&self) -> Region {
        Region::parse(&self.phone.default_region).unwrap_or_default()
    }

    /// Whether a provider that sends SMS codes (ID.me, Veratad) has credentials.
    pub fn sms_provider_enabled(&self) -> bool {
        self.providers.idme.enabled() || self.providers.veratad.enabled()
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
        assert_eq!(s.routing.rules.len(), 4);
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
        for (key, value) in [
            ("HANDSET__FRAUD__PREFIX_DIGITS", "0"),
            ("HANDSET__FRAUD__MAX_CONVERSION", "1.5"),
            ("HANDSET__FRAUD__COOLDOWN", "0s"),
        ] {
            assert!(Settings::load_with(None, env(&[(key, value)])).is_err(), "{key} = {value}");
        }
    }

    /// The pumping guard is on in production and off in development unless set.
    #[test]
    fn the_pumping_guard_follows_the_environment() {
        let development = Settings::load_with(None, env(&[])).unwrap();
        assert!(!development.fraud.enabled(development.is_production()));
        let production = Settings::load_with(None, env(&[("HANDSET__ENVIRONMENT", "production")])).unwrap();
        assert!(production.fraud.enabled(production.is_production()));
        let opted_out = env(&[("HANDSET__ENVIRONMENT", "production"), ("HANDSET__FRAUD__ENABLED", "false")]);
        let opted_out = Settings::load_with(None, opted_out).unwrap();
        assert!(!opted_out.fraud.enabled(opted_out.is_production()));
        assert_eq!((development.fraud.prefix_digits, development.fraud.min_sends), (6, 20));
    }

    #[test]
    fn durations_have_upper_bounds() {
        // `now + ttl` would panic far past the calendar's end; such values never load.
        for (key, value) in [
            ("HANDSET__POSSESSION__CODE_TTL", "100000000years"),
            ("HANDSET__CALLBACKS__RETRY_SCHEDULE", "5s,300000years"),
            ("HANDSET__RETENTION__PERSONAL_DATA", "500years"),
            ("HANDSET__SERVER__REQUEST_TIMEOUT", "1day"),
            ("HANDSET__IDENTITY__RESULT_TTL", "0s"),
        ] {
            let refused = Settings::load_with(None, env(&[(key, value)])).unwrap_err().to_string();
            let named = key.trim_start_matches("HANDSET__").to_ascii_lowercase().replacen("__", ".", 1);
            assert!(refused.contains(&named), "{key}={value}: {refused}");
        }
        assert!(Settings::load_with(None, env(&[("HANDSET__POSSESSION__CODE_TTL", "1day")])).is_ok());
    }

    #[test]
    fn production_names_what_it_lacks() {
        let development = Settings::load_with(None, env(&[])).unwrap();
        assert!(development.production_problems().is_empty());
        let production = Settings::load_with(None, env(&[("HANDSET__ENVIRONMENT", "production")])).unwrap();
        let problems = production.production_problems().join("\n");
        for key in ["routing.rules", "server.public_url", "security.code_pepper", "rate_limits.per_phone_per_hour"] {
            assert!(problems.contains(key), "{key}: {problems}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Settings::load_with(None, env(&[("HANDSET__PROVIDERS__IDME__SECRET", "hunter2")])).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
