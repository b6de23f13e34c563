//! The `scale` scenario: a whole Herald cluster under load, restarted and
//! resized, with every message accounted for.
//!
//! Unlike the other scenarios this one owns its nodes: it starts
//! `--nodes` Herald processes (`--workers 1`, fixed loopback ports) on one
//! Redis or Redis Cluster, so it can restart them on the same port. The
//! timeline, from the start of publishing:
//!
//! 1. (before t=0) the ramp to `--connections` over the first nodes;
//! 2. `--publish-for`: a broadcast every `--broadcast-every` plus unicasts
//!    at `--unicast-rate` to pseudo-random users, each stream published
//!    half over HTTP (round robin over the nodes) and half straight into
//!    Redis with Herald's publish script;
//! 3. during it: after `--steady`, a rolling restart (SIGTERM, one node
//!    every `--restart-every`; each comes back on its port, now with
//!    `--max-connection-age`), then `--kill-after` later a SIGKILL of one
//!    node, restarted at once;
//! 4. then `--extra-nodes` more nodes (also with the age limit) join the
//!    balancer, and publishing goes on until no node holds more than
//!    `--balance` × the mean, or `--rebalance-timeout`.
//!
//! Clients reconnect to a random active node, as behind a balancer, and
//! resume by cursor. Node connection counts come from each node's own
//! `/metrics` once a second; CPU and RSS from `/proc`. Every phase, wait
//! and node operation is bounded; the nodes are children of this process
//! (killed when it exits on any path) and only their PIDs are signalled.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::process::Child;
use tokio::sync::mpsc;

use crate::account::Tally;
use crate::net::{check_redis_url, mint_token, unix_now_us, HttpConn, Target};
use crate::procfs;
use crate::proto::{
    new_histogram, Delivery, DuplicateSample, Fanout, Mixed, ToWorker, WorkerPlan, WorkerResult,
};
use crate::publish::{self, PublishPlan, Published, Via};
use crate::report::Pcts;
use crate::run::{shares, Fleet, Ui};
use crate::{parse_duration, Kind, Signal, POLL_INTERVAL, POLL_INTERVAL_HELP};
use herald::fuzzing::Channel;

/// How long the end of a run waits with nothing arriving before it
/// settles the accounts: more than a client's longest back-off (10 s plus
/// jitter, see the worker's reconnect loop).
const DRAIN_QUIET: Duration = Duration::from_secs(15);

/// The event name broadcasts carry, so clients tell the two streams apart.
const BROADCAST_EVENT: &str = "bcast";
/// Latency phases, in timeline order.
const PHASES: [&str; 4] = ["steady", "rolling restart", "after SIGKILL", "rebalance"];

#[derive(Args, Debug, Clone)]
pub(crate) struct ScaleArgs {
    /// Small sizes that finish in about two minutes (10,000 connections,
    /// 3 + 1 nodes, shorter phases); explicit flags still win.
    #[arg(long)]
    pub(crate) quick: bool,
    #[arg(long, default_value = "target/release/herald")]
    pub(crate) herald_bin: PathBuf,
    /// Nodes at the start [full: 7, quick: 3].
    #[arg(long)]
    pub(crate) nodes: Option<usize>,
    /// Nodes added after the restarts [full: 3, quick: 1].
    #[arg(long)]
    pub(crate) extra_nodes: Option<usize>,
    /// Redis (or, with --redis-cluster, comma-separated cluster seeds).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub(crate) redis_url: String,
    #[arg(long)]
    pub(crate) redis_cluster: bool,
    #[arg(long, default_value = "herald")]
    pub(crate) channel_prefix: String,
    /// HS256 secret for the nodes and the client tokens.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: String,
    /// Connections (one user each) [full: 100000, quick: 10000].
    #[arg(short = 'n', long)]
    pub(crate) connections: Option<u64>,
    /// New connections per second during the ramp.
    #[arg(long, default_value_t = 2000.0)]
    pub(crate) ramp: f64,
    /// Publishing before the extra nodes join [full: 120s, quick: 36s].
    #[arg(long, value_parser = parse_duration)]
    pub(crate) publish_for: Option<Duration>,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) broadcast_every: Duration,
    /// Unicast messages per second (all publishers together).
    #[arg(long, default_value_t = 500.0)]
    pub(crate) unicast_rate: f64,
    /// Publishing before the first restart [full: 15s, quick: 6s].
    #[arg(long, value_parser = parse_duration)]
    pub(crate) steady: Option<Duration>,
    /// Between two SIGTERMs of the rolling restart [full: 15s, quick: 8s].
    #[arg(long, value_parser = parse_duration)]
    pub(crate) restart_every: Option<Duration>,
    /// From the last SIGTERM to the SIGKILL [full: 10s, quick: 8s].
    #[arg(long, value_parser = parse_duration)]
    pub(crate) kill_after: Option<Duration>,
    /// What restarted and added nodes run with [full: 60s, quick: 20s].
    #[arg(long, value_parser = parse_duration)]
    pub(crate) max_connection_age: Option<Duration>,
    /// Longest wait for the balance after the extra nodes joined [full:
    /// 150s, quick: 60s].
    #[arg(long, value_parser = parse_duration)]
    pub(crate) rebalance_timeout: Option<Duration>,
    /// Balanced: no node above this many times the mean.
    #[arg(long, default_value_t = 1.2)]
    pub(crate) balance: f64,
    /// Node i listens on base+i, its admin listener on base+100+i; below
    /// the kernel's ephemeral ports, which the clients' sockets take.
    #[arg(long, default_value_t = 28100)]
    pub(crate) base_port: u16,
    /// The nodes' --drain-timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) drain_timeout: Duration,
    /// Another flag for every node (repeatable), e.g. `--node-arg=--heartbeat=30s`.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub(crate) node_args: Vec<String>,
    /// Most connections per load-generator process: as many as the open
    /// files limit comfortably allows, since a busier process reads more
    /// events per wake-up (4,000 cost a third more load-generator CPU).
    #[arg(long, default_value_t = 12_500)]
    pub(crate) per_process: u64,
    /// Of the connections, this many in a process of their own [full:
    /// 2000, quick: 500]. A browser holds one connection; a load-generator
    /// process holding 12,500 reads a broadcast's 12,500 events before a
    /// unicast that arrived behind them, and that wait is the generator's,
    /// not the nodes'. The probe's latency is what a lightly loaded client
    /// sees; it is reported beside every client's.
    #[arg(long)]
    pub(crate) probe_clients: Option<u64>,
    /// Loopback source addresses 127.0.0.2 … to spread connections over.
    /// A source port is bound per address across all destinations and
    /// ports in TIME_WAIT are skipped, so a restart storm at 100,000
    /// connections needs more than the other scenarios' 16.
    #[arg(long, default_value_t = 64)]
    pub(crate) source_addrs: usize,
    #[arg(long, default_value = POLL_INTERVAL, value_parser = parse_duration, help = POLL_INTERVAL_HELP)]
    pub(crate) poll_interval: Duration,
    /// Where node logs go [default: a new directory under /tmp].
    #[arg(long)]
    pub(crate) work_dir: Option<PathBuf>,
    #[arg(long)]
    pub(crate) label: Option<String>,
    #[arg(long)]
    pub(crate) json: bool,
    #[arg(long)]
    pub(crate) json_out: Option<PathBuf>,
    /// Write the report as a markdown section (for load/RESULTS.md).
    #[arg(long)]
    pub(crate) markdown_out: Option<PathBuf>,
    /// PNG: connections per node and deliveries/s over time.
    #[arg(long)]
    pub(crate) chart: Option<PathBuf>,
    #[arg(short, long)]
    pub(crate) quiet: bool,
}

/// The sizes of one run, with the quick/full defaults resolved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub(crate) connections: u64,
    pub(crate) nodes: usize,
    pub(crate) extra_nodes: usize,
    pub(crate) ramp: f64,
    pub(crate) publish_for_s: f64,
    pub(crate) broadcast_every_s: f64,
    pub(crate) unicast_rate: f64,
    pub(crate) steady_s: f64,
    pub(crate) restart_every_s: f64,
    pub(crate) kill_after_s: f64,
    pub(crate) max_connection_age_s: f64,
    pub(crate) rebalance_timeout_s: f64,
    pub(crate) balance: f64,
    pub(crate) redis_cluster: bool,
    /// Processes holding the connections, the probe's included.
    pub(crate) load_processes: usize,
    pub(crate) source_addrs: usize,
    /// Connections in the probe process (the last one); 0: none.
    #[serde(default)]
    pub(crate) probe_clients: u64,
}

impl Plan {
    fn of(a: &ScaleArgs) -> Plan {
        let q = a.quick;
        let pick = |v: Option<Duration>, full: u64, quick: u64| {
            v.unwrap_or(Duration::from_secs(if q { quick } else { full }))
                .as_secs_f64()
        };
        let connections = a.connections.unwrap_or(if q { 10_000 } else { 100_000 });
        let probe_clients = a
            .probe_clients
            .unwrap_or(if q { 500 } else { 2_000 })
            .min(connections / 2);
        Plan {
            connections,
            nodes: a.nodes.unwrap_or(if q { 3 } else { 7 }),
            extra_nodes: a.extra_nodes.unwrap_or(if q { 1 } else { 3 }),
            ramp: a.ramp,
            publish_for_s: pick(a.publish_for, 120, 36),
            broadcast_every_s: a.broadcast_every.as_secs_f64().max(0.1),
            unicast_rate: a.unicast_rate,
            steady_s: pick(a.steady, 15, 6),
            restart_every_s: pick(a.restart_every, 15, 8),
            kill_after_s: pick(a.kill_after, 10, 8),
            max_connection_age_s: pick(a.max_connection_age, 60, 20),
            rebalance_timeout_s: pick(a.rebalance_timeout, 150, 60),
            balance: a.balance,
            redis_cluster: a.redis_cluster,
            load_processes: (connections - probe_clients)
                .div_ceil(a.per_process.max(1))
                .max(1) as usize
                + usize::from(probe_clients > 0),
            source_addrs: a.source_addrs,
            probe_clients,
        }
    }

    fn kill_at_s(&self) -> f64 {
        self.steady_s
            + (self.nodes.saturating_sub(1)) as f64 * self.restart_every_s
            + self.kill_after_s
    }
}

// ------------------------------------------------------------------ nodes

/// What a node's supervisor is asked to do.
#[derive(Debug)]
enum NodeCmd {
    Start { age: bool },
    Restart { signal: Signal, age: bool },
    Stop,
}

/// A value read from one process at a time, summed over the node's
/// incarnations (a counter or CPU time starts again at each restart).
#[derive(Debug, Clone, Copy, Default)]
struct Accum {
    pid: u32,
    retired: f64,
    current: f64,
}

impl Accum {
    fn update(&mut self, pid: u32, value: f64) {
        if pid != self.pid {
            self.retired += self.current;
            self.pid = pid;
            self.current = 0.0;
        }
        self.current = value;
    }

    fn total(&self) -> f64 {
        self.retired + self.current
    }
}

/// A node as the coordinator sees it (written by its supervisor and the
/// sampler; a std mutex, never held across an await).
#[derive(Debug, Default)]
struct NodeState {
    pid: Option<u32>,
    up: bool,
    with_age: bool,
    cpu: Accum,
    max_age_closes: Accum,
    resets: Accum,
    rss_kib: u64,
    connections: u64,
    /// The node's first process, fresh, before any connection.
    rss_fresh_kib: u64,
    /// Cumulative stop/start durations, for the report.
    downtime: Vec<(String, f64)>,
}

type Table = Arc<Mutex<Vec<NodeState>>>;

fn lock(t: &Table) -> std::sync::MutexGuard<'_, Vec<NodeState>> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// How to start node `index`.
#[derive(Clone)]
struct NodeSpec {
    index: usize,
    bin: PathBuf,
    port: u16,
    admin_port: u16,
    args: Vec<String>,
    age: String,
    log: PathBuf,
    drain: Duration,
}

impl NodeSpec {
    fn admin(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.admin_port))
    }

    fn spawn(&self, age: bool, epoch: Instant) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        use std::io::Write as _;
        let _ = writeln!(
            &log,
            "--- herald-load scale: start at {:.1}s{}",
            epoch.elapsed().as_secs_f64(),
            if age {
                " with --max-connection-age"
            } else {
                ""
            }
        );
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("serve")
            .arg(format!("--listen=127.0.0.1:{}", self.port))
            .arg(format!("--admin-listen=127.0.0.1:{}", self.admin_port))
            .args(&self.args);
        if age {
            cmd.arg(format!("--max-connection-age={}", self.age));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))
    }
}

/// `GET path` on a node's admin listener.
async fn admin_get(addr: SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    let timeout = Duration::from_secs(2);
    let mut conn = HttpConn::open(addr, timeout).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let resp = conn.exchange(req.as_bytes(), timeout).await.ok()?;
    Some((resp.status, resp.body))
}

/// Owns one node's process: starts, signals and restarts it on command.
async fn supervise(
    spec: NodeSpec,
    table: Table,
    mut rx: mpsc::UnboundedReceiver<NodeCmd>,
    epoch: Instant,
) {
    let mut child: Option<Child> = None;
    loop {
        // A command, or the process ending on its own (Err: its status).
        let next = match child.as_mut() {
            Some(c) => tokio::select! {
                cmd = rx.recv() => Ok(cmd),
                status = c.wait() => Err(status),
            },
            None => Ok(rx.recv().await),
        };
        let cmd = match next {
            Ok(cmd) => cmd,
            Err(status) => {
                eprintln!(
                    "herald-load scale: node {} exited on its own ({status:?}); see {}",
                    spec.index,
                    spec.log.display()
                );
                let mut t = lock(&table);
                t[spec.index].up = false;
                t[spec.index].pid = None;
                t[spec.index]
                    .downtime
                    .push(("exited on its own at".into(), epoch.elapsed().as_secs_f64()));
                child = None;
                continue;
            }
        };
        let (stop_first, start_age) = match cmd {
            Some(NodeCmd::Start { age }) => (None, Some(age)),
            Some(NodeCmd::Restart { signal, age }) => (Some(signal), Some(age)),
            Some(NodeCmd::Stop) | None => (Some(Signal::Term), None),
        };
        if let (Some(signal), Some(mut c)) = (stop_first, child.take()) {
            let t0 = Instant::now();
            lock(&table)[spec.index].up = false;
            if let Some(pid) = c.id() {
                let _ = crate::run::send_signal(pid, signal);
            }
            // A drain ends within --drain-timeout; past that (and a
            // margin), the process is killed.
            let waited = tokio::time::timeout(spec.drain + Duration::from_secs(5), c.wait()).await;
            if waited.is_err() {
                let _ = c.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
            }
            let what = match signal {
                Signal::Term => "SIGTERM → exit",
                Signal::Kill => "SIGKILL → exit",
            };
            lock(&table)[spec.index]
                .downtime
                .push((what.into(), t0.elapsed().as_secs_f64()));
        }
        let Some(age) = start_age else {
            return;
        };
        let t0 = Instant::now();
        match spec.spawn(age, epoch) {
            Ok(c) => {
                let pid = c.id();
                child = Some(c);
                let ready = wait_ready(spec.admin(), Duration::from_secs(30)).await;
                let mut t = lock(&table);
                let n = &mut t[spec.index];
                n.pid = pid;
                n.up = ready;
                n.with_age = age;
                n.downtime
                    .push(("start → ready".into(), t0.elapsed().as_secs_f64()));
                if !ready {
                    eprintln!(
                        "herald-load scale: node {} not ready within 30s; see {}",
                        spec.index,
                        spec.log.display()
                    );
                }
            }
            Err(e) => eprintln!("herald-load scale: node {}: {e:#}", spec.index),
        }
    }
}

async fn wait_ready(addr: SocketAddr, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Some((200, _)) = admin_get(addr, "/readyz").await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The value of a metric line `name{labels} value` (labels exactly as
/// given, `""` for none).
fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = rest.strip_prefix(labels)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// One row of the per-node time series.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NodePoint {
    /// Seconds since publishing started (negative: the ramp).
    pub(crate) t_s: f64,
    /// `herald_connections` of each node (`None`: down or not started).
    pub(crate) connections: Vec<Option<u64>>,
}

/// Reads every running node's `/metrics` and `/proc` once.
async fn sample_nodes(specs: &[NodeSpec], table: &Table) -> Vec<Option<u64>> {
    let pids: Vec<Option<u32>> = lock(table).iter().map(|n| n.pid).collect();
    let mut out = Vec::with_capacity(specs.len());
    for (spec, pid) in specs.iter().zip(pids) {
        let Some(pid) = pid else {
            out.push(None);
            continue;
        };
        let text = match admin_get(spec.admin(), "/metrics").await {
            Some((200, body)) => String::from_utf8(body).ok(),
            _ => None,
        };
        let proc = procfs::sample(pid);
        let mut t = lock(table);
        let n = &mut t[spec.index];
        if n.pid != Some(pid) {
            out.push(None);
            continue;
        }
        if let Some(s) = proc {
            n.cpu.update(pid, s.cpu_s);
            n.rss_kib = s.rss_kib;
        }
        let conns = text.as_deref().and_then(|text| {
            let closed = |r: &str| metric(text, "herald_connections_closed_total", r);
            if let Some(v) = closed("{reason=\"max_age\"}") {
                n.max_age_closes.update(pid, v);
            }
            if let Some(v) = metric(text, "herald_history_resets_total", "") {
                n.resets.update(pid, v);
            }
            metric(text, "herald_connections", "").map(|v| v as u64)
        });
        if let Some(c) = conns {
            n.connections = c;
        }
        out.push(conns);
    }
    out
}

// ------------------------------------------------------------------ report

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PhaseReport {
    pub(crate) name: String,
    pub(crate) from_s: f64,
    pub(crate) to_s: f64,
    pub(crate) unicast_ms: Pcts,
    pub(crate) broadcast_ms: Pcts,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct NodeReport {
    pub(crate) index: usize,
    pub(crate) port: u16,
    pub(crate) extra: bool,
    /// At the end of the ramp: connections, RSS growth per connection.
    pub(crate) ramp_connections: u64,
    pub(crate) ramp_rss_kib: u64,
    pub(crate) rss_fresh_kib: u64,
    pub(crate) rss_per_connection_bytes: Option<f64>,
    /// Connections per second of ramp this node took.
    pub(crate) ramp_rate: f64,
    pub(crate) end_connections: u64,
    pub(crate) end_rss_kib: u64,
    pub(crate) cpu_s: f64,
    pub(crate) max_age_closes: u64,
    pub(crate) resets_sent: u64,
    /// (what, seconds) for each stop and start.
    pub(crate) operations: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct StreamReport {
    pub(crate) attempted: u64,
    pub(crate) confirmed: u64,
    pub(crate) failed: u64,
    pub(crate) uncertain: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) tally: Tally,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ScaleReport {
    pub(crate) label: Option<String>,
    pub(crate) command: String,
    pub(crate) plan: Option<Plan>,
    pub(crate) started_unix: u64,
    pub(crate) herald_has_max_connection_age: bool,
    pub(crate) ramp_s: f64,
    pub(crate) ready_at_start: u64,
    pub(crate) connect_ms: Pcts,
    pub(crate) ready_ms: Pcts,
    pub(crate) connect_errors: BTreeMap<String, u64>,
    pub(crate) phases: Vec<PhaseReport>,
    /// Unicasts published in the second after a broadcast was.
    pub(crate) unicast_during_broadcast_ms: Pcts,
    /// The same latencies as `phases` and `unicast_during_broadcast_ms`,
    /// at the probe's clients only (`Plan::probe_clients`).
    #[serde(default)]
    pub(crate) probe_phases: Vec<PhaseReport>,
    #[serde(default)]
    pub(crate) probe_unicast_during_broadcast_ms: Pcts,
    pub(crate) replay_ms: Pcts,
    pub(crate) unicast: StreamReport,
    pub(crate) broadcast: StreamReport,
    pub(crate) never_ready: u64,
    pub(crate) late: u64,
    pub(crate) disconnects: u64,
    pub(crate) resumed_with_cursor: u64,
    pub(crate) resets_received: u64,
    pub(crate) reconnect_gap_ms: Pcts,
    /// Seconds from publishing start: the extra nodes ready, and balanced.
    pub(crate) joined_at_s: Option<f64>,
    pub(crate) balanced_after_s: Option<f64>,
    pub(crate) balance_at_end: f64,
    pub(crate) nodes: Vec<NodeReport>,
    pub(crate) series: Vec<NodePoint>,
    pub(crate) deliveries: u64,
    pub(crate) per_second: Vec<u64>,
    pub(crate) window_s: f64,
    pub(crate) server_cpu_s: f64,
    pub(crate) redis_cpu_s: Option<f64>,
    pub(crate) load_cpu_s: f64,
    pub(crate) server_cpu_s_per_million: Option<f64>,
    pub(crate) load_cpu_s_per_million: Option<f64>,
    pub(crate) load_rss_kib: u64,
    /// The open files limit the nodes ran with (they inherit this
    /// process's), and the cores of the machine.
    #[serde(default)]
    pub(crate) open_files: Option<u64>,
    #[serde(default)]
    pub(crate) cores: usize,
    /// The first duplicates, with what tells a double delivery from a
    /// double publish.
    pub(crate) duplicates: Vec<Duplicate>,
}

/// A message some client got twice.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Duplicate {
    #[serde(flatten)]
    pub(crate) sample: DuplicateSample,
    /// Its publish was uncertain (sent, no answer).
    pub(crate) uncertain: bool,
    /// How many entries of the channel's history carry its seq (read at
    /// the end of the run; 2 = published twice). `None` if not read.
    pub(crate) in_history: Option<usize>,
}

// ------------------------------------------------------------------ run

pub(crate) fn main(args: ScaleArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        tokio::select! {
            r = run(&args) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted (nodes and workers are stopped)"),
        }
    });
    // Dropping the runtime drops every supervisor and worker handle: any
    // process still running is killed (kill_on_drop).
    drop(rt);
    let report = report?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.markdown_out {
        std::fs::write(path, markdown(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        crate::chart::draw_scale(path, &report)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", markdown(&report));
    }
    Ok(())
}

/// `a⁻¹ mod m` (a and m coprime).
fn inverse_mod(a: u64, m: u64) -> Option<u64> {
    let (mut t, mut new_t) = (0i128, 1i128);
    let (mut r, mut new_r) = (i128::from(m), i128::from(a % m));
    while new_r != 0 {
        let q = r / new_r;
        (t, new_t) = (new_t, t - q * new_t);
        (r, new_r) = (new_r, r - q * new_r);
    }
    (r == 1).then(|| t.rem_euclid(i128::from(m)) as u64)
}

/// A multiplier that spreads unicasts over `n` users in a random-looking
/// order (coprime to `n`), with its inverse.
fn unicast_permutation(n: u64) -> (u64, u64) {
    if n <= 1 {
        return (1, 0);
    }
    for p in [
        2_654_435_761u64,
        40_503,
        1_000_003,
        998_244_353,
        1_000_000_007,
    ] {
        if let Some(inv) = inverse_mod(p % n, n) {
            if p % n > 1 || n == 2 {
                return (p % n, inv);
            }
        }
    }
    (1, 1)
}

/// The kernel's ephemeral port range (`ip_local_port_range`).
fn ephemeral_ports() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    Some((parts.next()?.ok()?, parts.next()?.ok()?))
}

fn port_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

async fn run(args: &ScaleArgs) -> anyhow::Result<ScaleReport> {
    let plan = Plan::of(args);
    let started_unix = unix_now_us() / 1_000_000;
    let epoch = Instant::now();
    let epoch_us = unix_now_us();
    if plan.connections == 0 || plan.nodes == 0 {
        bail!("need at least one connection and one node");
    }
    if plan.source_addrs > 250 {
        bail!("--source-addrs: at most 250");
    }
    for url in args.redis_url.split(',') {
        check_redis_url(url.trim())?;
    }
    let total_nodes = plan.nodes + plan.extra_nodes;
    if usize::from(args.base_port) + 100 + total_nodes > 65_535 {
        bail!("--base-port too high for {total_nodes} nodes");
    }
    if let Some((low, high)) = ephemeral_ports() {
        let last = usize::from(args.base_port) + 100 + total_nodes;
        if usize::from(args.base_port) <= usize::from(high) && last >= usize::from(low) {
            bail!(
                "--base-port: ports {}..={last} overlap the ephemeral range {low}-{high}; \
                 a restarted node could find its port held by a client socket",
                args.base_port
            );
        }
    }
    let ports: Vec<(u16, u16)> = (0..total_nodes)
        .map(|i| (args.base_port + i as u16, args.base_port + 100 + i as u16))
        .collect();
    for &(p, a) in &ports {
        if !port_free(p) || !port_free(a) {
            bail!("port {p} or {a} is taken: choose another --base-port");
        }
    }
    let help = std::process::Command::new(&args.herald_bin)
        .args(["serve", "--help"])
        .output()
        .with_context(|| format!("running {} serve --help", args.herald_bin.display()))?;
    let has_age = String::from_utf8_lossy(&help.stdout).contains("--max-connection-age");
    if !has_age {
        eprintln!(
            "herald-load scale: {} has no --max-connection-age: nodes restart without it, and \
             the extra nodes will not take load (the rebalance phase runs to its timeout)",
            args.herald_bin.display()
        );
    }
    let work = match &args.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("herald-scale-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let _ = rlimit::increase_nofile_limit(u64::MAX);

    // The nodes.
    let mut node_args = vec![
        format!("--redis-url={}", args.redis_url),
        format!("--channel-prefix={}", args.channel_prefix),
        format!("--jwt-secret={}", args.jwt_secret),
        "--workers=1".to_string(),
        format!("--drain-timeout={}ms", args.drain_timeout.as_millis()),
    ];
    if args.redis_cluster {
        node_args.push("--redis-cluster".into());
    }
    node_args.extend(args.node_args.iter().cloned());
    let specs: Vec<NodeSpec> = ports
        .iter()
        .enumerate()
        .map(|(i, &(port, admin_port))| NodeSpec {
            index: i,
            bin: args.herald_bin.clone(),
            port,
            admin_port,
            args: node_args.clone(),
            age: format!("{}ms", (plan.max_connection_age_s * 1000.0) as u64),
            log: work.join(format!("node{i}.log")),
            drain: args.drain_timeout,
        })
        .collect();
    let table: Table = Arc::new(Mutex::new(
        (0..total_nodes).map(|_| NodeState::default()).collect(),
    ));
    let mut node_tx = Vec::new();
    for spec in &specs {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(supervise(spec.clone(), table.clone(), rx, epoch));
        node_tx.push(tx);
    }
    let command = |i: usize, cmd: NodeCmd| {
        let _ = node_tx[i].send(cmd);
    };
    for i in 0..plan.nodes {
        command(i, NodeCmd::Start { age: false });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while lock(&table).iter().take(plan.nodes).any(|n| !n.up) {
        if Instant::now() > deadline {
            bail!(
                "the nodes were not ready within 60s (logs in {})",
                work.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Fresh RSS of every first process (the extra ones when they start).
    tokio::time::sleep(Duration::from_millis(300)).await;
    sample_nodes(&specs, &table).await;
    for n in lock(&table).iter_mut() {
        n.rss_fresh_kib = n.rss_kib;
    }
    // Every redis-server behind the URL(s): one, or a cluster's nodes.
    let redis_pids: Vec<u32> = args.redis_url.split(',').filter_map(redis_pid).collect();
    let redis_cpu = || -> Option<f64> {
        let samples: Option<Vec<f64>> = redis_pids
            .iter()
            .map(|&pid| procfs::sample(pid).map(|s| s.cpu_s))
            .collect();
        samples.filter(|s| !s.is_empty()).map(|s| s.iter().sum())
    };

    // The workers.
    let targets: Vec<Target> = ports
        .iter()
        .map(|(p, _)| Target::parse(&format!("http://127.0.0.1:{p}")))
        .collect::<anyhow::Result<_>>()?;
    let horizon_s = plan.publish_for_s + plan.rebalance_timeout_s + 10.0;
    let broadcasts = (horizon_s / plan.broadcast_every_s).ceil() as u64 + 1;
    let unicasts = (horizon_s * plan.unicast_rate).ceil() as u64 + 1;
    let (mult, mult_inv) = unicast_permutation(plan.connections);
    let workers = plan.load_processes;
    let source_addrs: Vec<Ipv4Addr> = (0..plan.source_addrs)
        .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
        .collect();
    let mut plans = Vec::with_capacity(workers);
    let probe_workers = usize::from(plan.probe_clients > 0);
    let shared = shares(
        plan.connections - plan.probe_clients,
        workers - probe_workers,
    );
    let probe = (plan.probe_clients > 0).then_some((
        workers - 1,
        plan.connections - plan.probe_clients,
        plan.probe_clients,
    ));
    for (index, first, clients) in shared.chain(probe) {
        plans.push(WorkerPlan {
            index,
            first_client: first,
            clients,
            total_clients: plan.connections,
            fanout: Fanout::Unicast,
            messages: unicasts,
            targets: targets.clone(),
            events_path: "/events".into(),
            jwt_secret: Some(args.jwt_secret.clone()),
            token_ttl_s: 4 * 3600,
            cookie_name: "herald_token".into(),
            ready_event: Some("herald.ready".into()),
            source_addrs: source_addrs.clone(),
            ramp_per_s: plan.ramp * clients as f64 / plan.connections as f64,
            churn_per_s: 0.0,
            retry_ms: None,
            connect_timeout_ms: 10_000,
            poll_interval_us: args.poll_interval.as_micros() as u64,
            epoch_us,
            report_ms: 250,
            mixed: Some(Mixed {
                broadcast_event: BROADCAST_EVENT.into(),
                broadcasts,
                unicast_mult: mult,
                unicast_mult_inv: mult_inv,
                phases: PHASES.len(),
            }),
            random_reconnect: true,
            active_targets: plan.nodes,
        });
    }
    let mut fleet = Fleet::spawn(&plans).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let mut ui = Ui::new(
        args.quiet,
        plan.connections,
        broadcasts + unicasts,
        sent.clone(),
    );

    // The sampler: node connection counts, CPU and RSS once a second.
    // (Times since `epoch` until publishing starts; shifted at the end.)
    let series: Arc<Mutex<Vec<NodePoint>>> = Arc::default();
    let sampler = {
        let (specs, table, series) = (specs.clone(), table.clone(), series.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let conns = sample_nodes(&specs, &table).await;
                series
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(NodePoint {
                        t_s: epoch.elapsed().as_secs_f64(),
                        connections: conns,
                    });
            }
        })
    };

    // 1. The ramp.
    let ramp_start = Instant::now();
    let ramp_budget =
        Duration::from_secs_f64(plan.connections as f64 / plan.ramp.max(1.0) * 1.5 + 40.0);
    ui.phase("connecting");
    let all_tried = fleet
        .pump(ramp_start + ramp_budget, &mut ui, |f| {
            f.ramp_done.iter().all(|d| *d)
        })
        .await?;
    // Stragglers (a failed first attempt) retry; give them a little while.
    fleet
        .pump(Instant::now() + Duration::from_secs(15), &mut ui, |f| {
            f.totals().ready >= plan.connections
        })
        .await?;
    let ramp_s = ramp_start.elapsed().as_secs_f64();
    if !all_tried {
        eprintln!(
            "herald-load scale: the ramp did not finish in {:.0}s",
            ramp_budget.as_secs_f64()
        );
    }
    ui.phase("settling");
    fleet
        .pump(Instant::now() + Duration::from_secs(2), &mut ui, |_| false)
        .await?;
    sample_nodes(&specs, &table).await;
    let ramp_nodes: Vec<(u64, u64)> = lock(&table)
        .iter()
        .map(|n| (n.connections, n.rss_kib))
        .collect();
    let ready_at_start = fleet.totals().ready;

    // 2. Publishing, with the restarts and the join on its timeline.
    let mut load_pids = fleet.pids.clone();
    load_pids.push(std::process::id());
    let load_cpu = |pids: &[u32]| -> f64 {
        pids.iter()
            .filter_map(|&p| procfs::sample(p))
            .map(|s| s.cpu_s)
            .sum()
    };
    let load_cpu_start = load_cpu(&load_pids);
    let server_cpu_start: f64 = lock(&table).iter().map(|n| n.cpu.total()).sum();
    let redis_cpu_start = redis_cpu();
    let start = Instant::now() + Duration::from_millis(200);
    let start_us = epoch_us + (start - epoch).as_micros() as u64;
    fleet.send(&ToWorker::Start { at_us: start_us }).await?;

    let http_urls: Vec<Target> = targets[..plan.nodes].to_vec();
    let token = mint_token(
        &args.jwt_secret,
        "herald-load",
        Duration::from_secs(4 * 3600),
        Some(&["user:*", "broadcast"]),
    )?;
    let redis_config = herald::broker::redis::RedisConfig {
        url: args.redis_url.clone(),
        prefix: args.channel_prefix.clone(),
        history_size: 1000,
        history_ttl: Duration::from_secs(24 * 3600),
        probe_interval: Duration::from_secs(5),
    };
    let library = if args.redis_cluster {
        herald::Publisher::redis_cluster(redis_config, 64 * 1024)
    } else {
        herald::Publisher::redis(redis_config, 64 * 1024)
    }
    .map_err(|e| anyhow::anyhow!("redis publisher: {e}"))?;
    let stop_broadcast = Arc::new(AtomicU64::new(broadcasts));
    let stop_unicast = Arc::new(AtomicU64::new(unicasts));
    let abandon = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mk = |via: Via, fanout: Fanout, first: u64, concurrency: usize| {
        let (messages, rate, stop, event) = match fanout {
            Fanout::Broadcast => (
                broadcasts,
                1.0 / plan.broadcast_every_s,
                stop_broadcast.clone(),
                Some(BROADCAST_EVENT.to_string()),
            ),
            Fanout::Unicast => (unicasts, plan.unicast_rate, stop_unicast.clone(), None),
        };
        Arc::new(PublishPlan {
            via,
            messages,
            rate,
            concurrency,
            fanout,
            total_clients: plan.connections,
            first,
            step: 2,
            stop_at: Some(stop),
            abandon: Some(abandon.clone()),
            event,
            unicast_mult: Some(mult),
            start: Some(start),
        })
    };
    let http = || Via::Http {
        kind: Kind::Herald,
        urls: http_urls.clone(),
        path: "/publish".into(),
        token: Some(token.clone()),
    };
    let publishers = vec![
        tokio::spawn(publish::run(
            mk(http(), Fanout::Broadcast, 0, 1),
            sent.clone(),
        )),
        tokio::spawn(publish::run(
            mk(Via::Library(library.clone()), Fanout::Broadcast, 1, 1),
            sent.clone(),
        )),
        tokio::spawn(publish::run(
            mk(http(), Fanout::Unicast, 0, 16),
            sent.clone(),
        )),
        tokio::spawn(publish::run(
            mk(Via::Library(library), Fanout::Unicast, 1, 16),
            sent.clone(),
        )),
    ];

    ui.phase("publishing");
    let kill_node = plan.nodes / 2;
    let mut restarted = 0usize;
    let mut killed = false;
    let mut joining = false;
    let mut joined_at: Option<Instant> = None;
    let mut balanced_at: Option<Instant> = None;
    let mut phase = 0usize;
    let mut phase_starts = vec![0.0f64];
    let mut balance_at_end = 0.0;
    loop {
        fleet
            .pump(Instant::now() + Duration::from_millis(100), &mut ui, |_| {
                false
            })
            .await?;
        let t = if Instant::now() > start {
            (Instant::now() - start).as_secs_f64()
        } else {
            0.0
        };
        let mut next_phase = phase;
        if restarted < plan.nodes && t >= plan.steady_s + restarted as f64 * plan.restart_every_s {
            command(
                restarted,
                NodeCmd::Restart {
                    signal: Signal::Term,
                    age: has_age,
                },
            );
            restarted += 1;
            next_phase = next_phase.max(1);
        }
        if !killed && restarted == plan.nodes && t >= plan.kill_at_s() {
            command(
                kill_node,
                NodeCmd::Restart {
                    signal: Signal::Kill,
                    age: has_age,
                },
            );
            killed = true;
            next_phase = next_phase.max(2);
        }
        if !joining && killed && t >= plan.publish_for_s.max(plan.kill_at_s()) {
            for i in plan.nodes..total_nodes {
                command(i, NodeCmd::Start { age: has_age });
            }
            joining = true;
            next_phase = next_phase.max(3);
        }
        if joining && joined_at.is_none() {
            let all_up = lock(&table).iter().skip(plan.nodes).all(|n| n.up);
            if all_up {
                joined_at = Some(Instant::now());
                for n in lock(&table).iter_mut().skip(plan.nodes) {
                    if n.rss_fresh_kib == 0 {
                        n.rss_fresh_kib = n.rss_kib;
                    }
                }
                fleet
                    .send(&ToWorker::Targets {
                        active: total_nodes,
                    })
                    .await?;
            }
        }
        if let Some(at) = joined_at {
            let counts: Vec<u64> = lock(&table)
                .iter()
                .map(|n| if n.up { n.connections } else { 0 })
                .collect();
            let (ratio, balanced) = balance(&counts, plan.connections, plan.balance);
            balance_at_end = ratio;
            if balanced_at.is_none() && balanced {
                balanced_at = Some(Instant::now());
            }
            // Hold the balance a few seconds under traffic, then stop.
            let done = balanced_at.is_some_and(|b| b.elapsed() >= Duration::from_secs(5))
                || at.elapsed().as_secs_f64() >= plan.rebalance_timeout_s;
            if done {
                break;
            }
        } else if joining && t >= plan.publish_for_s + 60.0 {
            eprintln!("herald-load scale: the extra nodes were not ready within 60s");
            break;
        }
        if next_phase != phase {
            phase = next_phase;
            phase_starts.push(t);
            while phase_starts.len() < phase + 1 {
                phase_starts.push(t);
            }
            fleet.send(&ToWorker::Phase { index: phase }).await?;
        }
        if publishers.iter().all(|p| p.is_finished()) {
            break;
        }
    }
    // Stop the schedule at what is due now.
    let t = (Instant::now() - start).as_secs_f64();
    stop_broadcast.store(
        (t / plan.broadcast_every_s).floor() as u64 + 1,
        Ordering::Relaxed,
    );
    stop_unicast.store(
        (t * plan.unicast_rate).floor() as u64 + 1,
        Ordering::Relaxed,
    );
    let publish_end_s = t;
    let mut results: Vec<Published> = Vec::new();
    ui.phase("draining");
    // What is due is still sent, for 20 s; then nothing more (a cluster
    // that stopped answering would otherwise keep the publishers busy
    // with timeouts); in-flight requests end within their 10 s timeout
    // per URL, and a publisher still busy 110 s in ends the run.
    let stopping = Instant::now();
    for p in publishers {
        let r = loop {
            if p.is_finished() {
                break p.await.context("publisher")??;
            }
            if stopping.elapsed() >= Duration::from_secs(20) {
                abandon.store(true, Ordering::Relaxed);
            }
            if stopping.elapsed() >= Duration::from_secs(110) {
                p.abort();
                bail!("a publisher did not stop within 110 s (the nodes stopped answering)");
            }
            fleet
                .pump(Instant::now() + Duration::from_millis(100), &mut ui, |_| {
                    false
                })
                .await?;
        };
        results.push(r);
    }
    let (b_pub, u_pub) = (
        stop_broadcast.load(Ordering::Relaxed).min(broadcasts),
        stop_unicast.load(Ordering::Relaxed).min(unicasts),
    );
    let merge = |a: &Published, b: &Published| {
        let mut ex: Vec<u64> = a.excluded.iter().chain(&b.excluded).copied().collect();
        ex.sort_unstable();
        let report = StreamReport {
            attempted: a.attempted + b.attempted,
            confirmed: a.confirmed + b.confirmed,
            failed: a.failed + b.failed,
            uncertain: a.uncertain + b.uncertain,
            first_error: a.first_error.clone().or_else(|| b.first_error.clone()),
            tally: Tally::default(),
        };
        (report, ex)
    };
    let (mut bcast, b_ex) = merge(&results[0], &results[1]);
    let (mut uni, u_ex) = merge(&results[2], &results[3]);

    // The drain: until every confirmed message arrived, or nothing arrived
    // for longer than a client's longest back-off between reconnects (a
    // client still backing off resumes by cursor and catches up; ending
    // before it does would count what it is owed as lost).
    let accounted = fleet.totals().accounted;
    let expected = bcast.confirmed * accounted + uni.confirmed;
    let drain_end = Instant::now() + Duration::from_secs(90);
    let mut last = (Instant::now(), fleet.totals().delivered);
    loop {
        let done = fleet
            .pump(
                drain_end.min(Instant::now() + Duration::from_millis(200)),
                &mut ui,
                |f| f.totals().delivered >= expected,
            )
            .await?;
        let d = fleet.totals().delivered;
        if done || Instant::now() >= drain_end {
            break;
        }
        if d != last.1 {
            last = (Instant::now(), d);
        } else if last.0.elapsed() >= DRAIN_QUIET {
            break;
        }
    }
    let window_s = (Instant::now() - start).as_secs_f64();
    sample_nodes(&specs, &table).await;
    let server_cpu_end: f64 = lock(&table).iter().map(|n| n.cpu.total()).sum();
    let redis_cpu_end = redis_cpu();
    let load_cpu_end = load_cpu(&load_pids);
    let load_rss: u64 = load_pids
        .iter()
        .filter_map(|&p| procfs::sample(p))
        .map(|s| s.rss_kib)
        .sum();
    sampler.abort();

    // Settle the accounts.
    ui.phase("collecting");
    fleet
        .send(&ToWorker::Finish {
            published: u_pub,
            excluded: u_ex.clone(),
            broadcast_published: b_pub,
            broadcast_excluded: b_ex.clone(),
        })
        .await?;
    fleet
        .pump(Instant::now() + Duration::from_secs(60), &mut ui, |f| {
            f.results.iter().all(Option::is_some)
        })
        .await?;
    ui.finish();
    let (b_ex_all, u_ex_all) = (b_ex, u_ex);
    let worker_results: Vec<WorkerResult> =
        fleet.results.iter_mut().filter_map(Option::take).collect();
    if worker_results.len() != workers {
        bail!(
            "only {} of {workers} workers reported",
            worker_results.len()
        );
    }
    // Stop the nodes (gracefully; the supervisors kill after the drain).
    for i in 0..total_nodes {
        command(i, NodeCmd::Stop);
    }

    // Merge the workers' figures.
    let mut u_tally = Tally::default();
    let mut b_tally = Tally::default();
    let mut counters = crate::proto::Counters::default();
    let mut errors = BTreeMap::new();
    let (mut connect, mut ready, mut gap, mut replay) = (
        new_histogram(),
        new_histogram(),
        new_histogram(),
        new_histogram(),
    );
    let mut phase_h: Vec<(Histogram<u64>, Histogram<u64>)> = PHASES
        .iter()
        .map(|_| (new_histogram(), new_histogram()))
        .collect();
    let mut during = new_histogram();
    // The probe's (the last worker's) latencies on their own.
    let mut probe_h: Vec<(Histogram<u64>, Histogram<u64>)> = PHASES
        .iter()
        .map(|_| (new_histogram(), new_histogram()))
        .collect();
    let mut probe_during = new_histogram();
    let probe_index = (plan.probe_clients > 0).then_some(workers - 1);
    let mut duplicates = Vec::new();
    let mut per_second: Vec<u64> = Vec::new();
    let every_us = (plan.broadcast_every_s * 1e6) as u64;
    for (w, r) in worker_results.iter().enumerate() {
        let is_probe = probe_index == Some(w);
        u_tally.add(&r.tally);
        if let Some(b) = &r.broadcast_tally {
            b_tally.add(b);
        }
        counters.add(&r.counters);
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_insert(0) += v;
        }
        r.connect.add_to(&mut connect);
        r.ready.add_to(&mut ready);
        r.reconnect_gap.add_to(&mut gap);
        r.replay_latency.add_to(&mut replay);
        for (i, p) in r.phases.iter().enumerate().take(PHASES.len()) {
            p.unicast.add_to(&mut phase_h[i].0);
            p.broadcast.add_to(&mut phase_h[i].1);
            if is_probe {
                p.unicast.add_to(&mut probe_h[i].0);
                p.broadcast.add_to(&mut probe_h[i].1);
            }
        }
        for d in &r.duplicate_samples {
            let ex = if d.broadcast { &b_ex_all } else { &u_ex_all };
            duplicates.push(Duplicate {
                sample: d.clone(),
                uncertain: ex.binary_search(&d.seq).is_ok(),
                in_history: None,
            });
        }
        for &(sent_us, lat) in &r.unicast_samples {
            // Within a second after a broadcast's scheduled publish.
            if sent_us >= start_us && (sent_us - start_us) % every_us < 1_000_000 {
                let _ = during.record(lat);
                if is_probe {
                    let _ = probe_during.record(lat);
                }
            }
        }
        if per_second.len() < r.per_second.len() {
            per_second.resize(r.per_second.len(), 0);
        }
        for (i, n) in r.per_second.iter().enumerate() {
            per_second[i] += n;
        }
    }
    bcast.tally = b_tally;
    uni.tally = u_tally;
    let deliveries: u64 = per_second.iter().sum();
    let server_cpu = server_cpu_end - server_cpu_start;
    let load_cpu = load_cpu_end - load_cpu_start;
    let per_million = |cpu: f64| (deliveries > 0).then(|| cpu / deliveries as f64 * 1e6);
    phase_starts.resize(PHASES.len(), publish_end_s);
    let phase_reports = |h: &[(Histogram<u64>, Histogram<u64>)]| -> Vec<PhaseReport> {
        PHASES
            .iter()
            .enumerate()
            .map(|(i, name)| PhaseReport {
                name: (*name).into(),
                from_s: phase_starts[i],
                to_s: phase_starts.get(i + 1).copied().unwrap_or(publish_end_s),
                unicast_ms: Pcts::of(&h[i].0),
                broadcast_ms: Pcts::of(&h[i].1),
            })
            .collect()
    };
    let phases = phase_reports(&phase_h);
    let probe_phases = if probe_index.is_some() {
        phase_reports(&probe_h)
    } else {
        Vec::new()
    };
    let nodes = {
        let t = lock(&table);
        t.iter()
            .enumerate()
            .map(|(i, n)| {
                let (rc, rr) = ramp_nodes[i];
                NodeReport {
                    index: i,
                    port: specs[i].port,
                    extra: i >= plan.nodes,
                    ramp_connections: rc,
                    ramp_rss_kib: rr,
                    rss_fresh_kib: n.rss_fresh_kib,
                    rss_per_connection_bytes: (i < plan.nodes && rc > 0)
                        .then(|| (rr as f64 - n.rss_fresh_kib as f64) * 1024.0 / rc as f64),
                    ramp_rate: if ramp_s > 0.0 {
                        rc as f64 / ramp_s
                    } else {
                        0.0
                    },
                    end_connections: n.connections,
                    end_rss_kib: n.rss_kib,
                    cpu_s: n.cpu.total(),
                    max_age_closes: n.max_age_closes.total() as u64,
                    resets_sent: n.resets.total() as u64,
                    operations: n.downtime.clone(),
                }
            })
            .collect()
    };
    // Let the supervisors drain the nodes before the runtime goes away.
    let stop_deadline = Instant::now() + args.drain_timeout + Duration::from_secs(6);
    while lock(&table).iter().any(|n| n.pid.is_some() && n.up) && Instant::now() < stop_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shift = (start - epoch).as_secs_f64();
    let mut series = series.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for point in &mut series {
        point.t_s -= shift;
    }
    count_in_history(args, &mut duplicates).await;
    Ok(ScaleReport {
        label: args.label.clone(),
        command: crate::run::command_line(),
        plan: Some(plan.clone()),
        started_unix,
        herald_has_max_connection_age: has_age,
        ramp_s,
        ready_at_start,
        connect_ms: Pcts::of(&connect),
        ready_ms: Pcts::of(&ready),
        connect_errors: errors,
        phases,
        unicast_during_broadcast_ms: Pcts::of(&during),
        probe_phases,
        probe_unicast_during_broadcast_ms: Pcts::of(&probe_during),
        replay_ms: Pcts::of(&replay),
        unicast: uni,
        broadcast: bcast,
        never_ready: counters.never_ready,
        late: counters.late_clients,
        disconnects: counters.disconnects,
        resumed_with_cursor: counters.resumed_with_cursor,
        resets_received: counters.resets,
        reconnect_gap_ms: Pcts::of(&gap),
        joined_at_s: joined_at.map(|j| (j - start).as_secs_f64()),
        balanced_after_s: match (joined_at, balanced_at) {
            (Some(j), Some(b)) => Some((b - j).as_secs_f64()),
            _ => None,
        },
        balance_at_end,
        nodes,
        series,
        deliveries,
        per_second,
        window_s,
        server_cpu_s: server_cpu,
        redis_cpu_s: match (redis_cpu_start, redis_cpu_end) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        load_cpu_s: load_cpu,
        server_cpu_s_per_million: per_million(server_cpu),
        load_cpu_s_per_million: per_million(load_cpu),
        load_rss_kib: load_rss,
        open_files: rlimit::getrlimit(rlimit::Resource::NOFILE)
            .ok()
            .map(|(_, hard)| hard),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        duplicates,
    })
}

/// What the run says about sizing a deployment: the per-node limit, what
/// 100,000 connections take, and which resource ran out first.
fn planning(r: &ScaleReport) -> String {
    let Some(p) = &r.plan else {
        return String::new();
    };
    let mut o = String::from("\n**Planning from this run.** ");
    if let Some(open_files) = r.open_files {
        let streams = herald::config::connections_within(usize::MAX, open_files);
        let nodes = 100_000usize.div_ceil(streams.max(1));
        let _ = write!(
            o,
            "Each node may open {open_files} files, so it holds at most {streams} event \
             streams (`--max-connections` is capped to that at start, the rest kept for \
             requests and Redis): 100,000 connections need {nodes} nodes, and {} to restart \
             one at a time under the limit. ",
            nodes + 1
        );
    }
    let mut per_conn: Vec<f64> = r
        .nodes
        .iter()
        .filter_map(|n| n.rss_per_connection_bytes)
        .collect();
    per_conn.sort_by(f64::total_cmp);
    if let Some(median) = per_conn.get(per_conn.len() / 2) {
        let _ = write!(
            o,
            "Memory is not what runs out: {:.2} KiB per idle connection is {:.0} MiB per \
             100,000. ",
            median / 1024.0,
            median * 100_000.0 / 1_048_576.0
        );
    }
    let used = r.server_cpu_s + r.redis_cpu_s.unwrap_or(0.0) + r.load_cpu_s;
    let available = r.window_s * r.cores.max(1) as f64;
    let _ = write!(
        o,
        "CPU is: the nodes, Redis and the load generator used {used:.0} of the {available:.0} \
         CPU-s the {} cores had over the run ({:.0} %), and every broadcast to {} clients \
         took the cores about {:.1} s (its p99 in the steady phase). ",
        r.cores,
        100.0 * used / available.max(1.0),
        p.connections,
        r.phases
            .first()
            .map_or(0.0, |ph| ph.broadcast_ms.p99 / 1000.0),
    );
    if let Some(per_million) = r.server_cpu_s_per_million {
        // 1M connections, one broadcast per interval.
        let deliveries_per_s = 1_000_000.0 / p.broadcast_every_s;
        let _ = write!(
            o,
            "The nodes spent {per_million:.1} CPU-s per million deliveries, restarts and \
             reconnects included: 1,000,000 connections with a broadcast every {:.0} s need \
             about {:.0} cores for the nodes alone, before Redis and TLS.",
            p.broadcast_every_s,
            deliveries_per_s * per_million / 1e6
        );
    }
    o.push('\n');
    o
}

/// A history entry as `XRANGE` returns it: id and field-value pairs.
type HistoryEntry = (String, Vec<(String, Vec<u8>)>);

/// Counts, for each duplicate, the entries of its channel's history that
/// carry its seq: one means a node delivered one message twice, two that
/// it was published twice. One Redis only (a cluster's keys are spread).
async fn count_in_history(args: &ScaleArgs, duplicates: &mut [Duplicate]) {
    if args.redis_cluster || duplicates.is_empty() {
        return;
    }
    let Ok(client) = redis::Client::open(args.redis_url.as_str()) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    for d in duplicates.iter_mut().take(8) {
        let name = if d.sample.broadcast {
            "broadcast".to_string()
        } else {
            format!("user:u{}", d.sample.client)
        };
        let Ok(channel) = Channel::parse(&name) else {
            continue;
        };
        let key = channel.history_key(&args.channel_prefix);
        let entries: Result<Vec<HistoryEntry>, _> = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await;
        let Ok(entries) = entries else {
            continue;
        };
        d.in_history = Some(
            entries
                .iter()
                .filter(|(_, fields)| {
                    fields.iter().any(|(_, value)| {
                        crate::wire::parse_payload(value)
                            .is_some_and(|(seq, _)| seq == d.sample.seq)
                    })
                })
                .count(),
        );
    }
}

/// The PID of the redis-server listening on the Redis URL's port,
/// for its CPU time: found through `/proc/net/tcp` and the process's open
/// sockets, so only a server on this machine is ever read.
fn redis_pid(url: &str) -> Option<u32> {
    let authority = url.trim().strip_prefix("redis://")?.split('/').next()?;
    let port: u16 = authority
        .rsplit('@')
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local = f.get(1)?;
        let p = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
        (p == port && f.get(3) == Some(&"0A")).then(|| f.get(9).map(|s| s.to_string()))?
    })?;
    let needle = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == needle) {
                return Some(pid);
            }
        }
    }
    None
}

// ------------------------------------------------------------------ markdown

fn pct_cells(p: &Pcts) -> String {
    if p.count == 0 {
        return "– | – | – | 0".into();
    }
    format!("{:.1} | {:.1} | {:.1} | {}", p.p50, p.p99, p.p999, p.count)
}

/// A latency table: one row per phase, then the unicasts published in the
/// second after a broadcast (the caller may add rows).
fn latency_table(o: &mut String, phases: &[PhaseReport], during: &Pcts) {
    let _ = writeln!(
        o,
        "| phase | seconds | unicast p50 | p99 | p99.9 | n | broadcast p50 | p99 | p99.9 | n |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for ph in phases {
        let _ = writeln!(
            o,
            "| {} | {:.0}–{:.0} | {} | {} |",
            ph.name,
            ph.from_s,
            ph.to_s,
            pct_cells(&ph.unicast_ms),
            pct_cells(&ph.broadcast_ms)
        );
    }
    let _ = writeln!(
        o,
        "| unicast published < 1 s after a broadcast | | {} | | | | |",
        pct_cells(during)
    );
}

/// The run as a markdown section (for load/RESULTS.md and the terminal).
pub(crate) fn markdown(r: &ScaleReport) -> String {
    let mut o = String::new();
    let Some(p) = &r.plan else {
        return "_(no plan)_\n".into();
    };
    let _ =
        writeln!(
        o,
        "{} connections on {} Herald nodes (`--workers 1`) + {}{}, {} load-generator processes{} \
         over {} loopback source addresses on the same machine. Publishing {:.0} s: a broadcast \
         every {:.0} s and {:.0} unicasts/s, each half over `POST /publish` (round robin over \
         the nodes) and half straight into Redis with the publish script. After {:.0} s a \
         rolling restart (SIGTERM, one node every {:.0} s; each comes back on its port with \
         `--max-connection-age {:.0}s`{}), {:.0} s after the last one a SIGKILL of node {} \
         (restarted at once); then {} more node(s) with the same age limit join, and \
         publishing goes on until no node holds more than {}× the mean. Clients reconnect to \
         a random node, like behind a balancer, and resume by cursor.\n",
        r.ready_at_start,
        p.nodes,
        if p.redis_cluster { "a Redis Cluster" } else { "one Redis" },
        r.label.as_ref().map(|l| format!(" ({l})")).unwrap_or_default(),
        p.load_processes,
        if p.probe_clients > 0 {
            format!(" (the last holds {} of the connections: the probe below)", p.probe_clients)
        } else {
            String::new()
        },
        p.source_addrs,
        p.publish_for_s,
        p.broadcast_every_s,
        p.unicast_rate,
        p.steady_s,
        p.restart_every_s,
        p.max_connection_age_s,
        if r.herald_has_max_connection_age {
            ""
        } else {
            " — **this build has no such flag: nodes ran without it**"
        },
        p.kill_after_s,
        p.nodes / 2,
        p.extra_nodes,
        p.balance,
    );
    let _ = writeln!(o, "\n`{}`\n", r.command);
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(
        o,
        "| ramp | {} ready of {} in {:.1} s ({:.0}/s); connect p50 {:.1} ms, p99 {:.1} ms; ready p50 {:.1} ms, p99 {:.1} ms |",
        r.ready_at_start,
        p.connections,
        r.ramp_s,
        r.ready_at_start as f64 / r.ramp_s.max(0.001),
        r.connect_ms.p50,
        r.connect_ms.p99,
        r.ready_ms.p50,
        r.ready_ms.p99
    );
    for (name, s) in [("broadcast", &r.broadcast), ("unicast", &r.unicast)] {
        let t = &s.tally;
        let _ = writeln!(
            o,
            "| {name} | {} published ({} confirmed, {} failed, {} uncertain); **lost {} / duplicated {} / out of order {}** over {} clients (clients with a loss {}, with a duplicate {}); {} expected, {} received |",
            s.attempted, s.confirmed, s.failed, s.uncertain, t.lost, t.duplicates, t.out_of_order,
            t.clients, t.clients_with_loss, t.clients_with_duplicates, t.expected, t.received
        );
    }
    let _ = writeln!(
        o,
        "| reconnects | {} disconnects, {} resumed with a cursor, gap p50 {:.0} ms / p99 {:.0} ms; resets received {} (sent by nodes: {}); never ready {}, late {} |",
        r.disconnects,
        r.resumed_with_cursor,
        r.reconnect_gap_ms.p50,
        r.reconnect_gap_ms.p99,
        r.resets_received,
        r.nodes.iter().map(|n| n.resets_sent).sum::<u64>(),
        r.never_ready,
        r.late
    );
    let _ = writeln!(
        o,
        "| rebalance | extra nodes ready at {}; balanced (max ≤ {}× mean) {}; max/mean at the end {:.2}; closes by age {} |",
        r.joined_at_s.map_or("never".into(), |t| format!("{t:.0} s")),
        p.balance,
        r.balanced_after_s
            .map_or("**not within the timeout**".into(), |t| format!("**{t:.0} s** after they joined")),
        r.balance_at_end,
        r.nodes.iter().map(|n| n.max_age_closes).sum::<u64>()
    );
    let _ = writeln!(
        o,
        "| CPU | nodes {:.1} s{}, load generator {:.1} s over {:.0} s; {} deliveries: nodes {} CPU-s, load generator {} CPU-s per million |",
        r.server_cpu_s,
        r.redis_cpu_s.map(|c| format!(" (+ Redis {c:.1} s)")).unwrap_or_default(),
        r.load_cpu_s,
        r.window_s,
        r.deliveries,
        r.server_cpu_s_per_million.map_or("–".into(), |c| format!("{c:.2}")),
        r.load_cpu_s_per_million.map_or("–".into(), |c| format!("{c:.2}")),
    );
    let _ = writeln!(
        o,
        "\nEnd-to-end latency (ms) of live deliveries, by when they arrived:\n"
    );
    latency_table(&mut o, &r.phases, &r.unicast_during_broadcast_ms);
    let _ = writeln!(
        o,
        "| replayed after a reconnect (both kinds) | | {} | | | | |",
        pct_cells(&r.replay_ms)
    );
    if !r.probe_phases.is_empty() {
        let _ = writeln!(
            o,
            "\nThe same at the probe: {} of the connections in a load-generator process of their own, \
             so an event waits only for the nodes and the kernel, not behind the thousands of other \
             clients' events a busy generator process reads first (as a browser, holding one \
             connection, waits for none):\n",
            p.probe_clients
        );
        latency_table(
            &mut o,
            &r.probe_phases,
            &r.probe_unicast_during_broadcast_ms,
        );
    }
    let _ = writeln!(
        o,
        "\nPer node (RSS per connection: growth from the fresh process to the end of the ramp, over the connections it then held):\n\n| node | ramp conns | conns/s in ramp | RSS/conn | end conns | end RSS | CPU s | closed by age | resets sent | stops and starts (s) |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for n in &r.nodes {
        let ops: Vec<String> = n
            .operations
            .iter()
            .map(|(w, s)| format!("{w} {s:.1}"))
            .collect();
        let _ = writeln!(
            o,
            "| {}{} | {} | {:.0} | {} | {} | {:.0} MiB | {:.1} | {} | {} | {} |",
            n.index,
            if n.extra { " (added)" } else { "" },
            n.ramp_connections,
            n.ramp_rate,
            n.rss_per_connection_bytes
                .map_or("–".into(), |b| format!("{:.2} KiB", b / 1024.0)),
            n.end_connections,
            n.end_rss_kib as f64 / 1024.0,
            n.cpu_s,
            n.max_age_closes,
            n.resets_sent,
            ops.join("; ")
        );
    }
    if !r.connect_errors.is_empty() {
        let errs: Vec<String> = r
            .connect_errors
            .iter()
            .map(|(k, v)| format!("`{k}` {v}"))
            .collect();
        let _ = writeln!(
            o,
            "\nConnection errors seen by clients (expected while nodes restart): {}.",
            errs.join(", ")
        );
    }
    o.push_str(&planning(r));
    if !r.duplicates.is_empty() {
        let d: Vec<String> = r
            .duplicates
            .iter()
            .map(|d| {
                let how = |x: &Delivery| {
                    format!(
                        "{} on node {} (stream {})",
                        if x.replay { "replayed" } else { "live" },
                        x.target,
                        x.stream
                    )
                };
                let s = &d.sample;
                format!(
                    "u{} {} {}: {}again {}{}{}",
                    s.client,
                    if s.broadcast { "broadcast" } else { "unicast" },
                    s.seq,
                    s.first
                        .as_ref()
                        .map(|f| format!("first {}, ", how(f)))
                        .unwrap_or_default(),
                    how(&s.again),
                    if d.uncertain {
                        ", publish uncertain"
                    } else {
                        ""
                    },
                    d.in_history
                        .map(|n| format!(", {n} in the channel's history"))
                        .unwrap_or_default()
                )
            })
            .collect();
        let _ = writeln!(o, "\nDuplicates (first {}): {}.", d.len(), d.join("; "));
    }
    for (name, s) in [("broadcast", &r.broadcast), ("unicast", &r.unicast)] {
        if let Some(e) = &s.first_error {
            let _ = writeln!(o, "\nFirst {name} publish error: `{e}`.");
        }
    }
    o.push('\n');
    o
}

/// The fullest node's connections over the mean a node should hold, and
/// whether that is within `limit` with (nearly) every client back on a
/// node: nodes that shed clients still in backoff are "under the mean"
/// without being balanced. 1 % is left for clients between an age close
/// and their next stream.
fn balance(counts: &[u64], connections: u64, limit: f64) -> (f64, bool) {
    let mean = connections as f64 / counts.len().max(1) as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    let held = counts.iter().sum::<u64>() as f64;
    let ratio = max / mean;
    (ratio, held >= connections as f64 * 0.99 && ratio <= limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_needs_the_clients_back_as_well_as_an_even_spread() {
        // Even, everyone connected.
        assert_eq!(balance(&[100, 100, 100, 100], 400, 1.2), (1.0, true));
        // One node holds too many.
        assert!(!balance(&[160, 80, 80, 80], 400, 1.2).1);
        // Even and low, but a third of the clients are not on any node.
        let (ratio, balanced) = balance(&[66, 66, 68, 66], 400, 1.2);
        assert!(ratio < 1.2 && !balanced);
        // A few clients between streams still count as back.
        assert!(balance(&[100, 99, 99, 99], 400, 1.2).1);
    }

    #[test]
    fn the_unicast_multiplier_permutes_the_users() {
        for n in [1u64, 2, 3, 10, 10_000, 100_000, 99_991] {
            let (m, inv) = unicast_permutation(n);
            let mut seen = vec![false; n as usize];
            for k in 0..n {
                let u = (u128::from(k) * u128::from(m) % u128::from(n)) as usize;
                assert!(!seen[u], "n={n}: user {u} twice");
                seen[u] = true;
                // The client side finds its own messages with the inverse.
                assert_eq!(
                    (u128::from(u as u64) * u128::from(inv) % u128::from(n)) as u64,
                    k % n
                );
            }
        }
    }

    #[test]
    fn reads_metric_lines() {
        let text = "# HELP x\nherald_connections 42\nherald_connections_closed_total{reason=\"max_age\"} 7\nherald_connections_opened_total 50\n";
        assert_eq!(metric(text, "herald_connections", ""), Some(42.0));
        assert_eq!(
            metric(
                text,
                "herald_connections_closed_total",
                "{reason=\"max_age\"}"
            ),
            Some(7.0)
        );
        assert_eq!(
            metric(text, "herald_connections_closed_total", "{reason=\"slow\"}"),
            None
        );
    }

    #[test]
    fn counters_sum_over_restarts() {
        let mut a = Accum::default();
        a.update(10, 5.0);
        a.update(10, 8.0);
        a.update(11, 2.0);
        assert_eq!(a.total(), 10.0);
    }
}
