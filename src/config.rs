//! Service settings: built-in defaults (`config/default.toml`, compiled in), then an
//! optional file, then `VERIGATE__SECTION__KEY` environment variables, then the
//! single-app shortcut `VERIGATE_APP_KEY` / `VERIGATE_APP_SECRET`.
//!
//! Every problem is reported at start, naming the setting, so a bad deployment fails
//! before it answers Sinch wrongly.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use crate::signature::{decode_secret, AppCredentials, Keyring};

const DEFAULTS: &str = include_str!("../config/default.toml");
const ENV_PREFIX: &str = "VERIGATE";
const APP_KEY_VAR: &str = "VERIGATE_APP_KEY";
const APP_SECRET_VAR: &str = "VERIGATE_APP_SECRET";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// The single app VERIGATE_APP_KEY and VERIGATE_APP_SECRET name, if they are set.
fn app_from_env(env: &HashMap<String, String>) -> Result<Option<AppSettings>, SettingsError> {
    match (env.get(APP_KEY_VAR), env.get(APP_SECRET_VAR)) {
        (Some(key), Some(secret)) => Ok(Some(AppSettings {
            key: key.clone(),
            secret: SecretString::from(secret.clone()),
            basic_auth: false,
        })),
        (Some(_), None) => Err(invalid(
            APP_SECRET_VAR,
            format!("is required when {APP_KEY_VAR} is set"),
        )),
        (None, Some(_)) => Err(invalid(
            APP_KEY_VAR,
            format!("is required when {APP_SECRET_VAR} is set"),
        )),
        (None, None) => Ok(None),
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub auth: AuthSettings,
    #[serde(default)]
    pub apps: Vec<AppSettings>,
    pub store: StoreSettings,
    pub policy: PolicySettings,
    pub api: ApiSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: String,
    pub callback_path: String,
    #[serde(default)]
    pub public_callback_path: Option<String>,
    pub body_limit: usize,
    pub workers: usize,
    #[serde(deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// How long a callback that arrives before the store is open waits for it.
    #[serde(deserialize_with = "duration")]
    pub startup_wait: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Zero disables the freshness check.
    #[serde(deserialize_with = "duration")]
    pub max_clock_skew: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSettings {
    pub key: String,
    pub secret: SecretString,
    #[serde(default)]
    pub basic_auth: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    pub backend: StoreBackend,
    pub path: PathBuf,
    /// Required with `backend = "postgres"`; holds a password, so never logged.
    #[serde(default)]
    pub postgres_url: Option<SecretString>,
    pub postgres_pool_size: usize,
    /// Zero keeps everything.
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    #[serde(deserialize_with = "duration")]
    pub retention_check_interval: Duration,
    pub hash_numbers: bool,
    #[serde(default)]
    pub number_hash_key: Option<SecretString>,
    /// Memory for caching the index, in bytes.
    #[serde(deserialize_with = "bytes")]
    pub cache_size: u64,
    /// Events held in memory before they are moved into the index.
    pub checkpoint_events: usize,
}

/// Where verifications are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// The embedded database in `store.path`.
    Sled,
    /// A PostgreSQL database shared by several replicas.
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    pub path: PathBuf,
    #[serde(deserialize_with = "duration")]
    pub decision_deadline: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    #[serde(default)]
    pub token: Option<SecretString>,
    #[serde(default)]
    pub read_token: Option<SecretString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Settings {
    /// Loads settings from the process environment and an optional file.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, SettingsError> {
        Self::load_from(file, std::env::vars().collect())
    }

    /// Loads settings with an explicit environment, so tests never touch the real one.
    pub fn load_from(
        file: Option<&std::path::Path>,
        env: HashMap<String, String>,
    ) -> Result<Self, SettingsError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).required(true));
        }
        let mut settings: Settings = builder
            .add_source(
                Environment::with_prefix(ENV_PREFIX)
                    .separator("__")
                    .source(Some(env.clone())),
            )
            .build()?
            .try_deserialize()?;
        settings.apps.extend(app_from_env(&env)?);
        settings.validate()?;
        Ok(settings)
    }

    /// Every section's checks, in the order the file lists them.
    fn validate(&self) -> Result<(), SettingsError> {
        self.validate_server()?;
        self.validate_apps()?;
        self.validate_api()?;
        self.validate_store()?;
        self.validate_log()
    }

    /// Listen address, callback paths, body limit, and the policy's decision deadline.
    fn validate_server(&self) -> Result<(), SettingsError> {
        self.listen_addr()?;
        for (key, path) in [
            ("server.callback_path", Some(&self.server.callback_path)),
            (
                "server.public_callback_path",
                self.server.public_callback_path.as_ref(),
            ),
        ] {
            if let Some(path) = path.filter(|p| !p.starts_with('/') || p.contains(['?', '#', ' ']))
            {
                return Err(invalid(
                    key,
                    format!("`{path}` must be a path starting with `/`, without query"),
                ));
            }
        }
        if self.policy.decision_deadline.is_zero()
            || self.policy.decision_deadline > Duration::from_secs(10)
        {
            return Err(invalid(
                "policy.decision_deadline",
                "must be between 1 ms and 10 s",
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.server.body_limit) {
            return Err(invalid(
                "server.body_limit",
                "must be between 1024 and 16777216 bytes",
            ));
        }
        Ok(())
    }

    /// Sinch apps: each key once, each secret base64.
    fn validate_apps(&self) -> Result<(), SettingsError> {
        let mut keys = std::collections::HashSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            if app.key.trim().is_empty() {
                return Err(invalid(format!("apps[{i}].key"), "must not be empty"));
            }
            if !keys.insert(app.key.as_str()) {
                return Err(invalid(
                    format!("apps[{i}].key"),
                    format!("`{}` is listed twice", app.key),
                ));
            }
            decode_secret(app.secret.expose_secret()).map_err(|_| {
                invalid(
                    format!("apps[{i}].secret"),
                    "is not base64 (copy it from the Sinch dashboard)",
                )
            })?;
        }
        Ok(())
    }

    /// API tokens long enough not to be guessed.
    fn validate_api(&self) -> Result<(), SettingsError> {
        for (key, token) in [
            ("api.token", &self.api.token),
            ("api.read_token", &self.api.read_token),
        ] {
            if token.as_ref().is_some_and(|t| t.expose_secret().len() < 16) {
                return Err(invalid(key, "must be at least 16 characters"));
            }
        }
        Ok(())
    }

    /// Number hashing, the PostgreSQL backend, checkpoints, cache and retention.
    fn validate_store(&self) -> Result<(), SettingsError> {
        match (&self.store.number_hash_key, self.store.hash_numbers) {
            (None, true) => {
                return Err(invalid(
                    "store.number_hash_key",
                    "is required when store.hash_numbers = true",
                ))
            }
            (Some(k), true) if k.expose_secret().len() < 16 => {
                return Err(invalid(
                    "store.number_hash_key",
                    "must be at least 16 characters",
                ))
            }
            _ => {}
        }
        if self.store.backend == StoreBackend::Postgres {
            match &self.store.postgres_url {
                None => {
                    return Err(invalid(
                        "store.postgres_url",
                        "is required when store.backend = \"postgres\"",
                    ))
                }
                Some(url) if !url.expose_secret().starts_with("postgres") => {
                    return Err(invalid(
                        "store.postgres_url",
                        "must be a postgres:// or postgresql:// URL",
                    ))
                }
                Some(_) => {}
            }
            if !(1..=1_000).contains(&self.store.postgres_pool_size) {
                return Err(invalid(
                    "store.postgres_pool_size",
                    "must be from 1 to 1000",
                ));
            }
        }
        if !(1..=1_000_000).contains(&self.store.checkpoint_events) {
            return Err(invalid(
                "store.checkpoint_events",
                "must be between 1 and 1000000",
            ));
        }
        if !(1 << 20..=1 << 40).contains(&self.store.cache_size) {
            return Err(invalid("store.cache_size", "must be between 1MiB and 1TiB"));
        }
        if self.store.retention_check_interval.is_zero() {
            return Err(invalid(
                "store.retention_check_interval",
                "must be more than 0",
            ));
        }
        Ok(())
    }

    fn validate_log(&self) -> Result<(), SettingsError> {
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a level or filter", self.log.level),
            ));
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, SettingsError> {
        self.server.listen.parse().map_err(|_| {
            invalid(
                "server.listen",
                format!("`{}` is not an address:port", self.server.listen),
            )
        })
    }

    /// The keyring of configured apps, plus warnings about secrets worth a second look.
    pub fn keyring(&self) -> Result<(Keyring, Vec<String>), SettingsError> {
        let mut warnings = Vec::new();
        let mut apps = Vec::with_capacity(self.apps.len());
        for (i, app) in self.apps.iter().enumerate() {
            let secret = app.secret.expose_secret();
            let bad = || invalid(format!("apps[{i}].secret"), "is not base64");
            if !decode_secret(secret).map_err(|_| bad())?.canonical {
                warnings.push(format!(
                    "apps[{i}] (key {}): the secret is not canonical base64; accepted leniently, check for a copy-paste error",
                    app.key
                ));
            }
            apps.push(AppCredentials::new(&app.key, secret, app.basic_auth).map_err(|_| bad())?);
        }
        Ok((Keyring::new(apps), warnings))
    }

    /// How the store is to keep numbers and make writes durable.
    pub fn store_options(&self) -> crate::store::StoreOptions {
        let numbers = match (&self.store.number_hash_key, self.store.hash_numbers) {
            (Some(key), true) => {
                crate::store::NumberPrivacy::hashed(key.expose_secret().as_bytes())
            }
            _ => crate::store::NumberPrivacy::Plain,
        };
        let postgres = match (self.store.backend, &self.store.postgres_url) {
            (StoreBackend::Postgres, Some(url)) => Some(crate::store::postgres::PostgresOptions {
                url: url.clone(),
                pool_size: self.store.postgres_pool_size,
            }),
            _ => None,
        };
        crate::store::StoreOptions {
            path: self.store.path.clone(),
            numbers,
            cache_bytes: self.store.cache_size,
            checkpoint_events: self.store.checkpoint_events,
            postgres,
        }
    }

    /// `None` when records are kept forever.
    pub fn retention(&self) -> Option<Duration> {
        Some(self.store.retention).filter(|d| !d.is_zero())
    }

    /// `None` when the freshness check is disabled.
    pub fn max_clock_skew(&self) -> Option<Duration> {
        Some(self.auth.max_clock_skew).filter(|d| !d.is_zero())
    }

    /// The path Sinch signs: the public one when a proxy rewrites paths.
    pub fn signed_path(&self) -> &str {
        self.server
            .public_callback_path
            .as_deref()
            .unwrap_or(&self.server.callback_path)
    }
}

/// A duration given as seconds (`600`) or with a unit (`"10m"`, `"90s"`).
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Seconds(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => match t.trim().parse::<u64>() {
            Ok(s) => Ok(Duration::from_secs(s)),
            Err(_) => humantime::parse_duration(t.trim())
                .map_err(|e| serde::de::Error::custom(format!("`{t}` is not a duration ({e})"))),
        },
    }
}

/// A size in bytes: a number, or a number with a unit (`64MiB`, `1GiB`, `512KiB`, `2MB`).
fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    let text = match Raw::deserialize(d)? {
        Raw::Bytes(b) => return Ok(b),
        Raw::Text(t) => t,
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => u64::MAX,
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|_| scale != u64::MAX)
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| {
            serde::de::Error::custom(format!("`{text}` is not a size like 64MiB or 1GiB"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn built_in_defaults_load_and_are_what_the_docs_say() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:8080");
        assert_eq!(s.server.callback_path, "/sinch/verification");
        assert_eq!(s.server.body_limit, 64 * 1024);
        assert_eq!(s.max_clock_skew(), Some(Duration::from_secs(600)));
        assert!(s.apps.is_empty());
        assert!(s.api.token.is_none());
        assert_eq!(s.signed_path(), "/sinch/verification");
        assert_eq!(s.policy.decision_deadline, Duration::from_millis(500));
        assert_eq!(s.retention(), Some(Duration::from_secs(90 * 86400)));
        assert!(!s.store.hash_numbers);
    }

    #[test]
    fn environment_overrides_nested_keys_with_string_values() {
        let s = Settings::load_from(
            None,
            env(&[
                ("VERIGATE__SERVER__LISTEN", "0.0.0.0:9000"),
                ("VERIGATE__SERVER__BODY_LIMIT", "2048"),
                ("VERIGATE__SERVER__PUBLIC_CALLBACK_PATH", "/public/cb"),
                ("VERIGATE__AUTH__MAX_CLOCK_SKEW", "0"),
                ("VERIGATE__API__TOKEN", "0123456789abcdef"),
                ("VERIGATE_APP_KEY", "key-1"),
                ("VERIGATE_APP_SECRET", "BeIukql3pTKJ8RGL5zo0DA=="),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.listen, "0.0.0.0:9000");
        assert_eq!(s.server.body_limit, 2048);
        assert_eq!(s.signed_path(), "/public/cb");
        assert_eq!(s.max_clock_skew(), None);
        assert_eq!(s.apps.len(), 1);
        assert_eq!(s.apps[0].key, "key-1");
    }

    #[test]
    fn a_file_adds_apps_and_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("verigate.toml");
        std::fs::write(
            &path,
            "[auth]\nmax_clock_skew = \"90s\"\n[[apps]]\nkey = \"a\"\nsecret = \"c2VjcmV0\"\n[[apps]]\nkey = \"b\"\nsecret = \"9876543210\"\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(s.max_clock_skew(), Some(Duration::from_secs(90)));
        let (keyring, warnings) = s.keyring().unwrap();
        assert!(keyring.get("a").is_some() && keyring.get("b").is_some());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("apps[1]"));
    }

    #[test]
    fn bad_settings_are_refused_naming_the_setting() {
        let cases = [
            (
                vec![("VERIGATE__SERVER__LISTEN", "nowhere")],
                "server.listen",
            ),
            (
                vec![("VERIGATE__SERVER__CALLBACK_PATH", "sinch")],
                "server.callback_path",
            ),
            (
                vec![("VERIGATE__SERVER__BODY_LIMIT", "ten")],
                "server.body_limit",
            ),
            (
                vec![("VERIGATE__AUTH__MAX_CLOCK_SKEW", "soon")],
                "max_clock_skew",
            ),
            (vec![("VERIGATE__API__TOKEN", "short")], "api.token"),
            (
                vec![("VERIGATE__API__READ_TOKEN", "short")],
                "api.read_token",
            ),
            (
                vec![("VERIGATE__STORE__HASH_NUMBERS", "true")],
                "store.number_hash_key",
            ),
            (
                vec![("VERIGATE__POLICY__DECISION_DEADLINE", "0")],
                "policy.decision_deadline",
            ),
            (vec![("VERIGATE__LOG__FORMAT", "xml")], "xml"),
            (vec![("VERIGATE__SERVER__NOPE", "1")], "nope"),
            (vec![("VERIGATE_APP_KEY", "k")], "VERIGATE_APP_SECRET"),
            (
                vec![("VERIGATE_APP_KEY", "k"), ("VERIGATE_APP_SECRET", "!!")],
                "apps[0].secret",
            ),
        ];
        for (vars, needle) in cases {
            let err = Settings::load_from(None, env(&vars))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{vars:?} gave: {err}");
        }
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let err = Settings::load_from(Some(std::path::Path::new("/nonexistent/v.toml")), env(&[]));
        assert!(err.is_err());
    }
}
