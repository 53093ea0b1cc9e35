//! Configuration: one typed tree, from flags and `HERALD_*` variables, loaded
//! once at start, grouped by what it configures (client tokens, the publish
//! API, the store, the fleet, recovery, limits, connections). `--help` is the
//! reference. Secrets are in [`secrets`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::ExposeSecret;

use crate::event_log::Retention;
use crate::redis_conn::RedisSettings;
use crate::telemetry::LogFormat;

mod groups;
mod secrets;

pub use groups::{
    AccessHookSettings, AuthSettings, ConnectionSettings, FleetSettings, Limits, PublishSettings, ReplaySettings,
    StoreSettings,
};
pub use secrets::{MIN_JWT_SECRET, MIN_PUBLISH_TOKEN};

/// What `--help` says about the settings that are not flags.
const SECRETS_HELP: &str = "\
Secrets are never flags (a flag's value shows in `ps`). Give each one in the environment or in a file:
  HERALD_JWT_SECRET       HS256 secret that client tokens are signed with
  HERALD_JWT_SECRET_FILE  file holding it (also --jwt-secret-file)
  HERALD_PUBLISH_TOKEN    bearer token of the publish API (POST /v1/events)
  HERALD_PUBLISH_TOKEN_FILE  file holding it (also --publish-token-file)
  HERALD_ACCESS_SECRET    secret that signs the calls to the authorization hook (HERALD_ACCESS_URL)
  HERALD_ACCESS_SECRET_FILE  file holding it (also --access-secret-file)
In development mode (the default) missing secrets are generated at start and printed once, with a
ready-to-use client token. With HERALD_ENV=production herald refuses to start without them.
With HERALD_JWT_JWKS_URL, client tokens are verified with the identity provider's keys: no JWT secret is
used or generated, and setting one (or HERALD_JWT_ALGORITHM, HERALD_JWT_PUBLIC_KEY_FILE) is refused.";

/// herald: the real-time Socket.IO gateway.
#[derive(Debug, Parser)]
#[command(name = "herald", version, about, after_long_help = SECRETS_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Mint a client token signed with the configured key, and print it.
    Token {
        /// The user id (`sub` claim).
        #[arg(long)]
        sub: String,
        /// How long the token is valid, e.g. `1h`, `30m`, `7d`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// PEM private key, for RS256 and ES256 (HS256 uses the JWT secret).
        #[arg(long, env = "HERALD_JWT_PRIVATE_KEY_FILE")]
        private_key_file: Option<PathBuf>,
    },
}

/// Development (generated secrets, demo data, any CORS origin) or production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Development,
    Production,
}

/// The JWT signature algorithms herald accepts (one at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum JwtAlgorithm {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
}

/// Every setting of the gateway, grouped.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// `development` or `production`. Production refuses to start without configured secrets
    /// and allows no CORS origin unless configured.
    #[arg(long = "env", env = "HERALD_ENV", value_enum, default_value = "development")]
    pub mode: Mode,

    /// Address to listen on (HTTP and Socket.IO).
    #[arg(long, env = "HERALD_LISTEN", default_value = "0.0.0.0:3000")]
    pub listen: String,

    #[command(flatten, next_help_heading = "Client tokens")]
    pub auth: AuthSettings,

    #[command(flatten, next_help_heading = "Publish API")]
    pub publish: PublishSettings,

    #[command(flatten, next_help_heading = "Membership store")]
    pub store: StoreSettings,

    #[command(flatten, next_help_heading = "Authorization hook")]
    pub access: AccessHookSettings,

    #[command(flatten, next_help_heading = "Fleet (Redis)")]
    pub fleet: FleetSettings,

    #[command(flatten, next_help_heading = "Recovery")]
    pub replay: ReplaySettings,

    #[command(flatten, next_help_heading = "Limits")]
    pub limits: Limits,

    #[command(flatten, next_help_heading = "Connections")]
    pub connections: ConnectionSettings,

    /// Allowed CORS origins, comma-separated. Unset: any origin in development, none in production.
    #[arg(long, help_heading = "Operations", env = "HERALD_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// How long shutdown may take before herald exits anyway.
    #[arg(long, help_heading = "Operations", env = "HERALD_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Log filter, in `tracing` env-filter syntax (`info`, `herald=debug,info`).
    #[arg(long = "log", help_heading = "Operations", env = "HERALD_LOG", default_value = "info")]
    pub log_filter: String,

    /// Log format.
    #[arg(long, help_heading = "Operations", env = "HERALD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {what} from {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is empty")]
    Empty(&'static str),
    #[error("{0} is set both directly and as a file; set one")]
    Both(&'static str),
    #[error("HERALD_ENV=production needs {0}; set it in the environment or in a file (see --help)")]
    MissingInProduction(&'static str),
    #[error("{0} is shorter than {1} bytes; production needs a strong secret")]
    TooShort(&'static str, usize),
    #[error("HERALD_JWT_ALGORITHM={0} needs HERALD_JWT_PUBLIC_KEY_FILE")]
    MissingPublicKey(&'static str),
    #[error(
        "{0} does not apply with HERALD_JWT_JWKS_URL (the JWKS says which key and algorithm verify a token); unset it"
    )]
    NotWithJwks(&'static str),
    #[error("HERALD_JWT_JWKS_MIN_REFRESH must be at least 1s and at most HERALD_JWT_JWKS_MAX_REFRESH")]
    JwksRefresh,
    #[error("{0} must be at least 1")]
    AtLeastOne(&'static str),
    #[error(
        "HERALD_ACCESS_URL needs HERALD_ACCESS_SECRET (or HERALD_ACCESS_SECRET_FILE): the application checks each call with it"
    )]
    MissingAccessSecret,
    #[error("HERALD_ACCESS_URL must be an http:// or https:// URL")]
    AccessUrl,
    #[error("{0} must be more than zero")]
    NotZero(&'static str),
    #[error("HERALD_PRESENCE_INTERVAL must be at least 10ms, and HERALD_PRESENCE_TIMEOUT at least twice it")]
    PresenceTimes,
}

/// How often presence makes a round, after how long without a round an
/// instance's members are dropped (it is taken for dead), and above how many
/// members a room is told counts only.
#[derive(Debug, Clone, Copy)]
pub struct PresenceSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub max_members: usize,
}

impl Config {
    /// Treats settings given as empty strings (`HERALD_REDIS_URL=`) as not given.
    pub fn drop_empty(&mut self) {
        for field in [
            &mut self.fleet.redis_url,
            &mut self.auth.jwt_issuer,
            &mut self.auth.jwt_audience,
            &mut self.auth.jwt_jwks_url,
            &mut self.access.access_url,
        ] {
            if field.as_deref().is_some_and(|v| v.trim().is_empty()) {
                *field = None;
            }
        }
        for path in [
            &mut self.auth.jwt_secret_file,
            &mut self.auth.jwt_public_key_file,
            &mut self.publish.publish_token_file,
            &mut self.access.access_secret_file,
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *path = None;
            }
        }
        self.cors_origins.retain(|o| !o.trim().is_empty());
    }

    /// Checks what can be checked without touching the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.limits.client_event_burst < 1.0 {
            return Err(ConfigError::AtLeastOne("HERALD_CLIENT_EVENT_BURST"));
        }
        if self.limits.rate_limit_strikes < 1 {
            return Err(ConfigError::AtLeastOne("HERALD_RATE_LIMIT_STRIKES"));
        }
        let presence = self.presence();
        if presence.interval < Duration::from_millis(10) || presence.timeout < presence.interval * 2 {
            return Err(ConfigError::PresenceTimes);
        }
        if self.replay.max_events < 1 {
            return Err(ConfigError::AtLeastOne("HERALD_REPLAY_MAX_EVENTS"));
        }
        if self.auth.jwt_jwks_url.is_some() {
            if self.auth.jwt_secret.is_some() {
                return Err(ConfigError::NotWithJwks("HERALD_JWT_SECRET (or HERALD_JWT_SECRET_FILE)"));
            }
            if self.auth.jwt_public_key_file.is_some() {
                return Err(ConfigError::NotWithJwks("HERALD_JWT_PUBLIC_KEY_FILE"));
            }
            if self.auth.jwt_algorithm != JwtAlgorithm::Hs256 {
                return Err(ConfigError::NotWithJwks("HERALD_JWT_ALGORITHM"));
            }
            if self.auth.jwt_jwks_min_refresh < Duration::from_secs(1)
                || self.auth.jwt_jwks_min_refresh > self.auth.jwt_jwks_max_refresh
            {
                return Err(ConfigError::JwksRefresh);
            }
        }
        self.validate_access_hook()?;
        let needs_key = match self.auth.jwt_algorithm {
            JwtAlgorithm::Hs256 => None,
            JwtAlgorithm::Rs256 => Some("RS256"),
            JwtAlgorithm::Es256 => Some("ES256"),
        };
        if let Some(alg) = needs_key
            && self.auth.jwt_public_key_file.is_none()
        {
            return Err(ConfigError::MissingPublicKey(alg));
        }
        if self.mode == Mode::Production {
            if self.auth.jwt_algorithm == JwtAlgorithm::Hs256
                && self.auth.jwt_secret.is_none()
                && self.auth.jwt_jwks_url.is_none()
            {
                return Err(ConfigError::MissingInProduction("HERALD_JWT_SECRET"));
            }
            if self.publish.publish_token.is_none() {
                return Err(ConfigError::MissingInProduction("HERALD_PUBLISH_TOKEN"));
            }
            if self.auth.jwt_secret.as_ref().is_some_and(|s| s.expose_secret().len() < MIN_JWT_SECRET) {
                return Err(ConfigError::TooShort("HERALD_JWT_SECRET", MIN_JWT_SECRET));
            }
            if self.publish.publish_token.as_ref().is_some_and(|s| s.expose_secret().len() < MIN_PUBLISH_TOKEN) {
                return Err(ConfigError::TooShort("HERALD_PUBLISH_TOKEN", MIN_PUBLISH_TOKEN));
            }
        }
        Ok(())
    }

    /// The authorization hook's settings, when a URL is given: a signing
    /// secret (as long as a JWT secret, in production), an http(s) URL, a
    /// timeout, slots and a circuit threshold above zero.
    fn validate_access_hook(&self) -> Result<(), ConfigError> {
        let Some(url) = &self.access.access_url else { return Ok(()) };
        if !matches!(reqwest::Url::parse(url), Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host()) {
            return Err(ConfigError::AccessUrl);
        }
        let Some(secret) = &self.access.access_secret else { return Err(ConfigError::MissingAccessSecret) };
        if self.mode == Mode::Production && secret.expose_secret().len() < MIN_JWT_SECRET {
            return Err(ConfigError::TooShort("HERALD_ACCESS_SECRET", MIN_JWT_SECRET));
        }
        if self.access.access_timeout.is_zero() {
            return Err(ConfigError::NotZero("HERALD_ACCESS_TIMEOUT"));
        }
        if self.access.access_max_in_flight < 1 {
            return Err(ConfigError::AtLeastOne("HERALD_ACCESS_MAX_IN_FLIGHT"));
        }
        if self.access.access_circuit_failures < 1 {
            return Err(ConfigError::AtLeastOne("HERALD_ACCESS_CIRCUIT_FAILURES"));
        }
        Ok(())
    }

    /// What the event log keeps, and what one replay may send (half a
    /// socket's buffer, so that the replay and the ack fit).
    pub fn retention(&self) -> Retention {
        Retention {
            window: self.replay.window,
            max_events: self.replay.max_events,
            max_bytes: self.replay.max_bytes,
            max_replay: (self.connections.socket_buffer / 2).max(1),
            keys_window: self.publish.idempotency_window,
        }
    }

    /// How presence makes its rounds.
    pub fn presence(&self) -> PresenceSettings {
        PresenceSettings {
            interval: self.fleet.presence_interval,
            timeout: self.fleet.presence_timeout,
            max_members: self.fleet.presence_max_members,
        }
    }

    /// The fleet's Redis, when one is configured.
    pub fn redis(&self) -> Option<RedisSettings> {
        let url = self.fleet.redis_url.clone()?;
        Some(RedisSettings { url, prefix: self.fleet.redis_prefix.clone(), op_timeout: self.fleet.redis_timeout })
    }

    /// Whether no secret at all was configured (development's demo mode).
    pub fn no_secrets_configured(&self) -> bool {
        self.auth.jwt_secret.is_none()
            && self.publish.publish_token.is_none()
            && self.auth.jwt_public_key_file.is_none()
            && self.auth.jwt_jwks_url.is_none()
    }

    /// The defaults, as if herald ran with no flag and no variable. Tests start from this.
    pub fn defaults() -> Config {
        Cli::parse_from(["herald"]).config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn production_needs_secrets() {
        let mut config = Config::defaults();
        config.mode = Mode::Production;
        assert!(matches!(config.validate(), Err(ConfigError::MissingInProduction(_))));
        config.auth.jwt_secret = Some("s".into());
        config.publish.publish_token = Some("p".into());
        assert!(matches!(config.validate(), Err(ConfigError::TooShort("HERALD_JWT_SECRET", _))));
        config.auth.jwt_secret = Some("s".repeat(32).into());
        assert!(matches!(config.validate(), Err(ConfigError::TooShort("HERALD_PUBLISH_TOKEN", _))));
        config.publish.publish_token = Some("p".repeat(16).into());
        assert!(config.validate().is_ok());
    }

    #[test]
    fn a_jwks_needs_no_jwt_secret_and_excludes_the_other_key_settings() {
        let mut config = Config::defaults();
        config.mode = Mode::Production;
        config.publish.publish_token = Some("p".repeat(16).into());
        config.auth.jwt_jwks_url = Some("https://idp.example/.well-known/jwks.json".into());
        assert!(config.validate().is_ok());
        assert!(!config.no_secrets_configured());
        config.auth.jwt_jwks_min_refresh = Duration::from_secs(48 * 3600);
        assert!(matches!(config.validate(), Err(ConfigError::JwksRefresh)));
        config.auth.jwt_jwks_min_refresh = Duration::from_secs(60);
        let mut with_secret = config.clone();
        with_secret.auth.jwt_secret = Some("s".repeat(32).into());
        let mut with_key = config.clone();
        with_key.auth.jwt_public_key_file = Some("key.pem".into());
        let mut with_alg = config.clone();
        with_alg.auth.jwt_algorithm = JwtAlgorithm::Rs256;
        for (conflict, name) in [(with_secret, "SECRET"), (with_key, "PUBLIC_KEY_FILE"), (with_alg, "ALGORITHM")] {
            let error = conflict.validate().unwrap_err().to_string();
            assert!(error.contains(name) && error.contains("HERALD_JWT_JWKS_URL"), "{error}");
        }
    }

    #[test]
    fn an_access_hook_needs_a_secret_and_an_http_url() {
        let mut config = Config::defaults();
        config.access.access_url = Some("http://app.internal/herald/access".into());
        assert!(matches!(config.validate(), Err(ConfigError::MissingAccessSecret)));
        config.access.access_secret = Some("short".into());
        assert!(config.validate().is_ok());
        config.mode = Mode::Production;
        config.auth.jwt_secret = Some("s".repeat(32).into());
        config.publish.publish_token = Some("p".repeat(16).into());
        assert!(matches!(config.validate(), Err(ConfigError::TooShort("HERALD_ACCESS_SECRET", _))));
        config.access.access_secret = Some("a".repeat(32).into());
        assert!(config.validate().is_ok());
        for bad in ["ftp://app/x", "app.internal/x", "http://"] {
            config.access.access_url = Some(bad.into());
            assert!(matches!(config.validate(), Err(ConfigError::AccessUrl)), "{bad}");
        }
        config.access.access_url = Some("https://app.internal/x".into());
        config.access.access_max_in_flight = 0;
        assert!(matches!(config.validate(), Err(ConfigError::AtLeastOne("HERALD_ACCESS_MAX_IN_FLIGHT"))));
    }

    #[test]
    fn empty_settings_count_as_unset() {
        let mut config = Config::defaults();
        config.fleet.redis_url = Some(String::new());
        config.auth.jwt_issuer = Some(" ".into());
        config.cors_origins = vec![String::new()];
        config.drop_empty();
        assert_eq!((config.fleet.redis_url, config.auth.jwt_issuer, config.cors_origins.len()), (None, None, 0));
    }
}
