//! Command line and environment configuration.
//!
//! Every flag of `herald serve` also reads `HERALD_<FLAG>` (clap's `env`), so
//! a systemd env-file or a container's environment configures a node without
//! a wrapper script. Durations (`500ms`, `15s`, `24h`) and sizes (`64KiB`) are
//! parsed here, once, with errors that name the offending value.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

/// `herald`: notification fanout over Server-Sent Events.
#[derive(Debug, Parser)]
#[command(name = "herald", version, about)]
pub struct Cli {
    /// What to do; `serve` when omitted (see [`Cli::parse_with_default`]).
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process arguments, treating `herald [flags]` as
    /// `herald serve [flags]` so the common case needs no subcommand.
    pub fn parse_with_default() -> Self {
        // Help shows `[env: HERALD_X]`, not clap's `[env: HERALD_X=]` for an
        // unset variable (and never a set one's value).
        let command =
            Self::command().mut_subcommands(|sub| sub.mut_args(|arg| arg.hide_env_values(true)));
        let matches = command.get_matches_from(with_default_command(std::env::args_os().collect()));
        Self::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
    }
}

/// Inserts `serve` when the first argument is a flag (or absent), keeping
/// `--help` and `--version` for the top-level command.
fn with_default_command(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    let top_level = matches!(first, "-h" | "--help" | "-V" | "--version" | "help");
    if !top_level && (first.is_empty() || first.starts_with('-')) {
        args.insert(1.min(args.len()), "serve".into());
    }
    args
}

/// Subcommands of the `herald` binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node (the default).
    Serve(Box<ServeConfig>),
    /// Mint a token with the configured key (for tests and demos).
    Token(TokenArgs),
    /// Publish one message through the same path as `POST /publish`.
    Publish(PublishArgs),
}

/// Flags that configure token verification and signing.
#[derive(Debug, Clone, Args, Default)]
pub struct KeyConfig {
    /// HS256/384/512 shared secret; repeatable (env: comma-separated), any
    /// of them verifies, the first one signs. Rotate by adding the new one
    /// first, then dropping the old one once its tokens expired.
    #[arg(
        long,
        env = "HERALD_JWT_SECRET",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub jwt_secret: Vec<String>,
    /// PEM file with RS*/PS*/ES*/EdDSA verification keys (one file may hold
    /// several); repeatable (env: comma-separated).
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY", value_delimiter = ',')]
    pub jwt_public_key: Vec<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "HERALD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "HERALD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock skew allowed for `exp` and `nbf`.
    #[arg(long, env = "HERALD_JWT_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,
}

/// Everything a node needs to run.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Public listener: SSE, publish API, demo page.
    #[arg(long, env = "HERALD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Private listener: /metrics, /healthz, /readyz.
    #[arg(long, env = "HERALD_ADMIN_LISTEN", default_value = "127.0.0.1:9180")]
    pub admin_listen: SocketAddr,
    /// Redis, history and message size: the same flags as `herald publish`.
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// How often the Redis pub/sub connection is probed; a probe not back
    /// within this interval marks the node unready and forces a reconnect.
    #[arg(long, env = "HERALD_REDIS_PROBE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub redis_probe_interval: Duration,
    /// Token verification.
    #[command(flatten)]
    pub keys: KeyConfig,
    /// JWKS endpoint (http or https) whose keys also verify tokens, chosen
    /// by `kid`; the node is unready until the first fetch succeeds.
    #[arg(long, env = "HERALD_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// How often the JWKS is refetched (an unknown `kid` refetches at once,
    /// at most every 10 s).
    #[arg(long, env = "HERALD_JWT_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration)]
    pub jwt_jwks_refresh: Duration,
    /// Session-cookie auth through the application: a browser request
    /// without a Herald JWT is authenticated by `GET <auth-url>` with its
    /// cookies (see the README).
    #[arg(long, env = "HERALD_AUTH_URL")]
    pub auth_url: Option<String>,
    /// Budget of one `--auth-url` call (a slower answer is a 503).
    #[arg(long, env = "HERALD_AUTH_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub auth_timeout: Duration,
    /// How long an `--auth-url` answer is reused for the same cookie header.
    #[arg(long, env = "HERALD_AUTH_CACHE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub auth_cache_ttl: Duration,
    /// Cookie carrying the JWT for browsers.
    #[arg(long, env = "HERALD_COOKIE_NAME", default_value = "herald_token")]
    pub cookie_name: String,
    /// Also accept `?access_token=` (it leaks into access logs; opt-in).
    #[arg(long, env = "HERALD_ALLOW_QUERY_TOKEN")]
    pub allow_query_token: bool,
    /// Exact allowed CORS origin (repeatable); credentials are allowed for these only.
    #[arg(
        long = "cors-origin",
        env = "HERALD_CORS_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// SSE comment ping on idle connections.
    #[arg(long, env = "HERALD_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// `retry:` hint sent to clients on connect.
    #[arg(long, env = "HERALD_RETRY", default_value = "2s", value_parser = parse_duration)]
    pub retry: Duration,
    /// Close each event stream after this age (±10 %) with a jittered
    /// `retry:`; the client resumes by cursor on whichever node the balancer
    /// picks, so nodes added to a loaded cluster fill up. Off by default.
    #[arg(long, env = "HERALD_MAX_CONNECTION_AGE", value_parser = parse_connection_age)]
    pub max_connection_age: Option<Duration>,
    /// Per-connection pending events before it is cut as slow.
    #[arg(long, env = "HERALD_QUEUE_CAPACITY", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_capacity: u32,
    /// Connections per node; beyond it new ones get 503.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Connections on a listener that are not event streams (reading a
    /// request, being answered, idle in keep-alive); beyond it new ones get 503.
    #[arg(long, env = "HERALD_MAX_HTTP_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_http_connections: u32,
    /// Connections per user per node; beyond it new ones get 429.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_USER", default_value_t = 32)]
    pub max_connections_per_user: usize,
    /// Graceful shutdown budget.
    #[arg(long, env = "HERALD_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How long `POST /disconnect` with `revoke` refuses the user's older
    /// tokens (make it at least your longest token lifetime).
    #[arg(long, env = "HERALD_REVOCATION_TTL", default_value = "24h", value_parser = parse_duration)]
    pub revocation_ttl: Duration,
    /// Worker threads (0: one per CPU; 1: everything on one thread, with
    /// tokio's single-threaded scheduler). Several nodes sharing a machine
    /// run best with fewer each: fewer threads waking each other for little
    /// work.
    #[arg(long, env = "HERALD_WORKERS", default_value_t = 0)]
    pub workers: usize,
}

/// Where messages and their history live, read the same way by `serve`
/// and `publish` (one definition, one validation).
#[derive(Debug, Clone, Args)]
pub struct BackboneArgs {
    /// Redis backbone (redis:// or rediss://). `serve`: unset runs the
    /// embedded broker; `publish`: set publishes straight into Redis.
    #[arg(long, env = "HERALD_REDIS_URL")]
    pub redis_url: Option<String>,
    /// `--redis-url` names a Redis Cluster (several seed URLs,
    /// comma-separated, allowed): sharded pub/sub, calls routed by slot.
    #[arg(long, env = "HERALD_REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// Namespace for Redis keys and channels.
    #[arg(long, env = "HERALD_CHANNEL_PREFIX", default_value = "herald")]
    pub channel_prefix: String,
    /// Entries kept per channel for replay.
    #[arg(long, env = "HERALD_HISTORY_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub history_size: u32,
    /// Idle channel history expires after this.
    #[arg(long, env = "HERALD_HISTORY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub history_ttl: Duration,
    /// Largest accepted message (the envelope's `data`).
    #[arg(long, env = "HERALD_MAX_PAYLOAD", default_value = "64KiB", value_parser = parse_size)]
    pub max_payload: usize,
}

/// `herald token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Signing key: `--jwt-secret` (a PEM public key cannot sign).
    #[command(flatten)]
    pub keys: KeyConfig,
    /// The user id (`sub`).
    #[arg(long)]
    pub sub: String,
    /// Topics the token may subscribe to (patterns, comma separated).
    #[arg(long, value_delimiter = ',')]
    pub topics: Vec<String>,
    /// Channels the token may publish to (patterns, comma separated).
    #[arg(long, value_delimiter = ',')]
    pub publish: Vec<String>,
    /// Lifetime of the token.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Allow the server API (`/disconnect`, `/presence`): the `control` claim.
    #[arg(long)]
    pub control: bool,
    /// Key id for the token header (`kid`).
    #[arg(long)]
    pub kid: Option<String>,
}

/// `herald publish`.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// Signing key for the publish token, and Redis settings for direct publishing.
    #[command(flatten)]
    pub keys: KeyConfig,
    /// Node to publish through (ignored with --redis-url).
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Redis, history and message size: with `--redis-url`, the message
    /// goes straight into Redis with the publish script, as a node's would.
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// A ready-made publisher token instead of minting one from --jwt-secret.
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Target channel: `user:<id>`, `broadcast` or `topic:<name>`.
    #[arg(long)]
    pub channel: String,
    /// Event name (default `message`).
    #[arg(long)]
    pub event: Option<String>,
    /// The data: JSON if it parses as JSON, else sent as a string.
    pub data: String,
}

/// `--max-connections` as far as `open_files` descriptors allow: a stream
/// past them would fail at accept (and the client would only see a reset),
/// so the hub refuses it first with a 503 and the client tries another
/// node. A tenth of the descriptors (256 to 4,096) stays for requests,
/// Redis and the rest.
pub fn connections_within(requested: usize, open_files: u64) -> usize {
    let reserve = (open_files / 10).clamp(256, 4096);
    let room = usize::try_from(open_files.saturating_sub(reserve)).unwrap_or(usize::MAX);
    requested.min(room)
}

/// Descriptors a node keeps whatever its clients do: Redis (the pool and
/// the pub/sub connections), the admin listener's [`ADMIN_SOCKETS`], logs.
const OWN_FILES: u64 = 256;

/// Sockets the admin listener (probes, metrics scrapes) holds at once.
pub const ADMIN_SOCKETS: usize = 64;

/// Sockets of every kind the public listener may hold at once within
/// `open_files` descriptors: all but [`OWN_FILES`]. Streams are capped
/// lower ([`connections_within`]), so requests still have room on a node
/// full of streams.
pub fn sockets_within(open_files: u64) -> usize {
    usize::try_from(open_files.saturating_sub(OWN_FILES))
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Parses `500ms`, `15s`, `2m`, `24h`, `1d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (examples: 500ms, 15s, 24h)"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{text}` (use ms, s, m, h, d)"
            ))
        }
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("`{text}` is out of range"))
}

/// `--max-connection-age`: a duration of at least 1 s; shorter would have
/// clients spend more time reconnecting than connected.
fn parse_connection_age(text: &str) -> Result<Duration, String> {
    let age = parse_duration(text)?;
    if age < Duration::from_secs(1) {
        return Err(format!("`{text}` is too short (at least 1s)"));
    }
    Ok(age)
}

/// Parses `65536`, `64KiB`, `1MiB`, `64KB` (KB/MB are decimal).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: usize = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (examples: 65536, 64KiB, 1MiB)"))?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{text}` (use B, KiB, MiB, GiB)"
            ))
        }
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn streams_fit_the_open_files_limit() {
        assert_eq!(connections_within(100_000, 20_000), 18_000);
        assert_eq!(connections_within(100_000, 1_024), 768);
        assert_eq!(connections_within(10_000, 1_048_576), 10_000);
        assert_eq!(connections_within(100_000, 200), 0);
        // Sockets of any kind: all but the node's own descriptors, and
        // never fewer than the streams.
        assert_eq!(sockets_within(20_000), 19_744);
        assert_eq!(sockets_within(100), 1);
        for open_files in [300, 1_024, 20_000, 1 << 20] {
            assert!(sockets_within(open_files) >= connections_within(usize::MAX, open_files));
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn serve_is_the_default_command() {
        let args = ["herald", "--heartbeat", "1s"].map(Into::into).to_vec();
        let cli = Cli::try_parse_from(with_default_command(args)).expect("parses");
        let Command::Serve(serve) = cli.command else {
            panic!("expected serve")
        };
        assert_eq!(serve.heartbeat, Duration::from_secs(1));
        assert_eq!(serve.backbone.max_payload, 65_536);
        let args = ["herald", "token", "--sub", "a"].map(Into::into).to_vec();
        let cli = Cli::try_parse_from(with_default_command(args)).expect("parses");
        assert!(matches!(cli.command, Command::Token(_)));
    }

    #[test]
    fn serve_and_publish_read_the_backbone_flags_alike() {
        let parse = |command: &str, history_size: &str| {
            let mut args = vec![command, "--redis-url", "redis://127.0.0.1:1"];
            args.extend(["--history-size", history_size, "--history-ttl", "1h"]);
            args.extend(["--max-payload", "1KiB", "--channel-prefix", "p"]);
            if command == "publish" {
                args.extend(["--channel", "broadcast", "data"]);
            }
            let args = std::iter::once("herald").chain(args).map(Into::into);
            Cli::try_parse_from(with_default_command(args.collect()))
        };
        let backbone = |cli: Cli| match cli.command {
            Command::Serve(serve) => serve.backbone,
            Command::Publish(publish) => publish.backbone,
            Command::Token(_) => panic!("not a backbone command"),
        };
        let serve = backbone(parse("serve", "7").expect("serve parses"));
        let publish = backbone(parse("publish", "7").expect("publish parses"));
        assert_eq!(format!("{serve:?}"), format!("{publish:?}"));
        assert_eq!(serve.history_size, 7);
        assert_eq!(serve.max_payload, 1024);
        for command in ["serve", "publish"] {
            assert!(
                parse(command, "0").is_err(),
                "{command} accepted --history-size 0"
            );
        }
    }
}
