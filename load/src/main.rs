//! `herald-load`: load generator and benchmark scenarios for Herald (and,
//! for comparison, nchan).
//!
//! # Layout
//!
//! - `main` — the command line.
//! - `run` — the coordinator: spawns worker processes, paces the ramp,
//!   publishes, kills a node for failover, samples `/proc`, builds the
//!   report.
//! - `worker` — a worker process holding up to ~15,000 SSE connections on
//!   one thread and accounting for every event.
//! - `wire` — incremental HTTP/1.1 head, chunked and `text/event-stream`
//!   decoders (the client side of the contract, tested on edge cases).
//! - `account` — per-client lost / duplicated / out-of-order bookkeeping.
//! - `publish` — the paced publisher (HTTP API or Redis publish script).
//! - `relay`, `deliver` — the floor probes: a bare HTTP → publish-script
//!   relay, and a bare pub/sub → SSE writer.
//! - `net` — targets, the minimal HTTP client, token minting.
//! - `scale` — the `scale` scenario: owns a cluster of nodes, restarts,
//!   kills and adds them under load.
//! - `procfs` — RSS and CPU time from `/proc`.
//! - `proto` — what the coordinator and workers say to each other.
//! - `report`, `chart` — the table, JSON, markdown comparison and PNG.

mod account;
mod chart;
mod deliver;
mod net;
mod procfs;
mod proto;
mod publish;
mod relay;
mod report;
mod run;
mod scale;
mod wire;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::proto::Fanout;

#[derive(Parser)]
#[command(
    name = "herald-load",
    version,
    about = "Load generator and benchmark scenarios for Herald and other SSE fanout servers",
    long_about = "Holds tens of thousands of SSE connections (spread over worker processes and \
                  loopback source addresses), publishes sequenced messages at a fixed rate, and \
                  reports delivered / lost / duplicated / out-of-order counts, end-to-end \
                  latency, deliveries per second, connect times, and server RSS and CPU from \
                  /proc. Only loopback targets are accepted."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hold N connections and report the server's RSS per connection.
    Idle(RunArgs),
    /// N connections all receive the `broadcast` channel: M messages at rate R.
    Broadcast(RunArgs),
    /// N users, one connection each; message k goes to user u(k mod N).
    Unicast(RunArgs),
    /// Connections drop and resume by cursor at --churn-rate while messages flow.
    Churn(RunArgs),
    /// Signal --kill-pid mid-run; clients resume elsewhere by cursor; count
    /// what each lost or got twice.
    Failover(RunArgs),
    /// Print JSON reports (from --json-out) as one markdown table; the last
    /// file is the baseline the others are divided by.
    Markdown {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The floor of an HTTP publish hop: a bare relay from HTTP requests to
    /// Herald's publish script (no auth, no validation), for `load/compare`.
    Relay(relay::RelayArgs),
    /// The floor of a delivery hop: holds `/events` clients and writes each
    /// message from Redis pub/sub, nothing else, for `load/compare`.
    Deliver(deliver::DeliverArgs),
    /// Starts its own Herald nodes, holds up to 100,000 connections over
    /// them, publishes broadcasts and unicasts while it restarts, kills and
    /// adds nodes, and accounts for every message.
    Scale(Box<scale::ScaleArgs>),
    /// Internal: run as a worker process (the plan comes on stdin).
    #[command(hide = true)]
    Worker,
}

/// Which protocol dialect the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// Herald: JWT cookie, `herald.ready`, `POST /publish` with a JSON envelope.
    Herald,
    /// nchan: no auth, user in the query, raw-body publishing to a channel URL.
    Nchan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PublishVia {
    /// The server's HTTP publish API.
    Http,
    /// Straight into Redis with Herald's publish script.
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Signal {
    Kill,
    Term,
}

/// `--poll-interval`, of every scenario.
pub(crate) const POLL_INTERVAL: &str = "0.5ms";
pub(crate) const POLL_INTERVAL_HELP: &str =
    "How long a load-generator process with nothing left to run naps before it waits in \
    epoll_wait (0: it waits at once, and is woken per event). Napping keeps the cost of waking \
    the generator out of the server's CPU figures (on loopback the sender pays it); a busy \
    process never naps, and an event waits at most one nap longer";

/// Options shared by every scenario.
#[derive(Args, Debug, Clone)]
pub(crate) struct RunArgs {
    /// Base URL of a server (repeatable: clients are spread round robin and
    /// reconnect to the next one).
    #[arg(short = 't', long = "target", default_value = "http://127.0.0.1:8080")]
    pub(crate) targets: Vec<String>,
    #[arg(long, value_enum, default_value_t = Kind::Herald)]
    pub(crate) kind: Kind,
    /// Concurrent SSE connections (one user each).
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub(crate) connections: u64,
    /// Messages to publish.
    #[arg(short = 'm', long, default_value_t = 200)]
    pub(crate) messages: u64,
    /// Publish rate, messages per second (0: as fast as possible).
    #[arg(short = 'r', long, default_value_t = 20.0)]
    pub(crate) rate: f64,
    /// Who receives the messages in churn and failover (default broadcast).
    #[arg(long, value_enum)]
    pub(crate) fanout: Option<Fanout>,
    /// New connections per second during the ramp (all workers together).
    #[arg(long, default_value_t = 2000.0)]
    pub(crate) ramp: f64,
    /// How long `idle` holds the connections.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    /// Pause between the ramp and publishing.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub(crate) settle: Duration,
    /// Longest wait for the last deliveries after the last publish.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub(crate) drain: Duration,
    /// HS256 secret to mint client (and publisher) tokens with.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: Option<String>,
    #[arg(long, default_value = "2h", value_parser = parse_duration)]
    pub(crate) token_ttl: Duration,
    /// Cookie that carries the client token, as a browser sends it.
    #[arg(long, default_value = "herald_token")]
    pub(crate) cookie_name: String,
    /// Subscriber path; `{user}` is replaced [herald: /events, nchan: /events?user={user}].
    #[arg(long)]
    pub(crate) events_path: Option<String>,
    /// Event that marks a stream caught up; "" for none (the 200 head)
    /// [herald: herald.ready, nchan: none].
    #[arg(long)]
    pub(crate) ready_event: Option<String>,
    #[arg(long, value_enum, default_value_t = PublishVia::Http)]
    pub(crate) publish: PublishVia,
    /// Base URL to publish to (repeatable, round robin) [default: the targets].
    #[arg(long = "publish-url")]
    pub(crate) publish_urls: Vec<String>,
    /// Publish path; `{channel}` is replaced [herald: /publish, nchan: /pub?id={channel}].
    #[arg(long)]
    pub(crate) publish_path: Option<String>,
    /// Publish requests in flight at once (1 keeps broadcast order).
    #[arg(long, default_value_t = 1)]
    pub(crate) publish_concurrency: usize,
    /// Bearer token for publishing [default: minted with --jwt-secret,
    /// publish claim user:* and broadcast].
    #[arg(long)]
    pub(crate) publish_token: Option<String>,
    /// Redis for `--publish redis` (with --redis-cluster: seed URLs,
    /// comma-separated).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub(crate) redis_url: String,
    /// `--redis-url` names a Redis Cluster: publish through a cluster
    /// client (routed by slot) with the script's `ARGV[5]` = `SPUBLISH`,
    /// as nodes started with `--redis-cluster` do.
    #[arg(long)]
    pub(crate) redis_cluster: bool,
    #[arg(long, default_value = "herald")]
    pub(crate) channel_prefix: String,
    /// History size passed to the publish script (the nodes' --history-size).
    #[arg(long, default_value_t = 1000)]
    pub(crate) history_size: u64,
    /// History TTL passed to the publish script (the nodes' --history-ttl).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub(crate) history_ttl: Duration,
    /// Loopback source addresses to spread connections over: 127.0.0.2 up
    /// to 127.0.0.(N+1); 0 lets the kernel choose.
    #[arg(long, default_value_t = 16)]
    pub(crate) source_addrs: usize,
    /// Most connections per worker process (each may hold ≤ 20,000 files).
    #[arg(long, default_value_t = 15_000)]
    pub(crate) per_process: u64,
    /// Worker processes [default: enough for --per-process].
    #[arg(long)]
    pub(crate) workers: Option<usize>,
    /// A server process to sample for RSS and CPU (repeatable).
    #[arg(long = "server-pid")]
    pub(crate) server_pids: Vec<u32>,
    /// Churn: forced disconnect + resume per second (all workers together).
    #[arg(long, default_value_t = 50.0)]
    pub(crate) churn_rate: f64,
    /// Failover: the server PID to signal (only one you started).
    #[arg(long)]
    pub(crate) kill_pid: Option<u32>,
    #[arg(long, value_enum, default_value_t = Signal::Term)]
    pub(crate) kill_signal: Signal,
    /// Failover: when to signal, after publishing starts [default: 40% in].
    #[arg(long, value_parser = parse_duration)]
    pub(crate) kill_after: Option<Duration>,
    /// Fixed reconnect delay instead of the server's `retry:`.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) retry: Option<Duration>,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) connect_timeout: Duration,
    #[arg(long, default_value = POLL_INTERVAL, value_parser = parse_duration, help = POLL_INTERVAL_HELP)]
    pub(crate) poll_interval: Duration,
    /// A name for this run in reports (e.g. "herald 3 nodes").
    #[arg(long)]
    pub(crate) label: Option<String>,
    /// Print the report as JSON instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub(crate) json_out: Option<PathBuf>,
    /// Write a PNG chart: latency distribution and deliveries/s over time.
    #[arg(long)]
    pub(crate) chart: Option<PathBuf>,
    /// No progress display.
    #[arg(short, long)]
    pub(crate) quiet: bool,
}

/// Durations as the server reads them (`500ms`, `15s`, `2m`, `24h`).
pub(crate) use herald::config::parse_duration;

fn main() {
    let cli = Cli::parse();
    let scenario = match cli.command {
        Command::Worker => exit_on_error(worker::run()),
        Command::Markdown { files } => exit_on_error(print_markdown(&files)),
        Command::Relay(a) => exit_on_error(relay::run(a)),
        Command::Deliver(a) => exit_on_error(deliver::run(a)),
        Command::Scale(a) => exit_on_error(scale::main(*a)),
        Command::Idle(a) => (run::Scenario::Idle, a),
        Command::Broadcast(a) => (run::Scenario::Broadcast, a),
        Command::Unicast(a) => (run::Scenario::Unicast, a),
        Command::Churn(a) => (run::Scenario::Churn, a),
        Command::Failover(a) => (run::Scenario::Failover, a),
    };
    exit_on_error(run::main(scenario.0, scenario.1))
}

fn exit_on_error(r: anyhow::Result<()>) -> ! {
    match r {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("herald-load: error: {e:#}");
            std::process::exit(1)
        }
    }
}

fn print_markdown(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        let r: report::Report =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        reports.push(r);
    }
    print!("{}", report::markdown(&reports));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
