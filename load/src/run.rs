//! The coordinator: plans the run, starts worker processes (itself,
//! re-executed), publishes, signals a node for failover, samples `/proc`
//! around the measured window and turns it all into a `Report`.
//!
//! The measured window is publishing plus the drain (or the idle hold):
//! server and load-tool CPU are read at its edges, so ramp-up costs do not
//! count towards CPU per million deliveries.

use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::net::{check_redis_url, mint_token, unix_now_us, Target};
use crate::procfs::{self, Sample};
use crate::proto::{
    new_histogram, Counters, Fanout, FromWorker, Progress, ToWorker, WorkerPlan, WorkerResult,
};
use crate::publish::{self, PublishPlan, Via};
use crate::report::{
    ConnectReport, DeliveryReport, FailoverReport, LoadReport, Pcts, PublishReport,
    ReconnectReport, Report, ServerReport, ServerTotals,
};
use crate::{Kind, PublishVia, RunArgs, Signal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    Idle,
    Broadcast,
    Unicast,
    Churn,
    Failover,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Broadcast => "broadcast",
            Scenario::Unicast => "unicast",
            Scenario::Churn => "churn",
            Scenario::Failover => "failover",
        }
    }
}

pub(crate) fn main(scenario: Scenario, args: RunArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (report, latency) = rt.block_on(run(scenario, &args))?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        crate::chart::draw(path, &report, &latency)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// Messages from the workers' stdout readers.
pub(crate) enum Event {
    Msg(usize, FromWorker),
    /// A worker's stdout closed.
    Gone(usize),
}

/// The worker processes and what they last said.
pub(crate) struct Fleet {
    pub(crate) children: Vec<Child>,
    pub(crate) stdins: Vec<ChildStdin>,
    pub(crate) pids: Vec<u32>,
    pub(crate) progress: Vec<Progress>,
    pub(crate) ramp_done: Vec<bool>,
    pub(crate) results: Vec<Option<WorkerResult>>,
    pub(crate) rx: mpsc::UnboundedReceiver<Event>,
}

/// Each worker's (index, first client, client count): `connections` shared
/// out over `workers` processes as evenly as possible.
pub(crate) fn shares(connections: u64, workers: usize) -> impl Iterator<Item = (usize, u64, u64)> {
    let base = connections / workers as u64;
    let extra = connections % workers as u64;
    (0..workers).scan(0, move |first: &mut u64, index| {
        let clients = base + u64::from((index as u64) < extra);
        let start = *first;
        *first += clients;
        Some((index, start, clients))
    })
}

impl Fleet {
    /// Starts one worker process per plan; they report on the fleet's `rx`.
    pub(crate) async fn spawn(plans: &[WorkerPlan]) -> anyhow::Result<Fleet> {
        let exe = std::env::current_exe().context("finding our own executable")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let workers = plans.len();
        let mut fleet = Fleet {
            children: Vec::new(),
            stdins: Vec::new(),
            pids: Vec::new(),
            progress: vec![Progress::default(); workers],
            ramp_done: vec![false; workers],
            results: (0..workers).map(|_| None).collect(),
            rx,
        };
        for plan in plans {
            let (child, stdin) = spawn_worker(&exe, plan, &tx).await?;
            fleet.pids.push(child.id().unwrap_or(0));
            fleet.children.push(child);
            fleet.stdins.push(stdin);
        }
        Ok(fleet)
    }

    pub(crate) fn totals(&self) -> Progress {
        let mut t = Progress::default();
        for p in &self.progress {
            t.connected += p.connected;
            t.ready += p.ready;
            t.accounted += p.accounted;
            t.delivered += p.delivered;
            t.duplicates += p.duplicates;
            t.disconnects += p.disconnects;
            t.errors += p.errors;
        }
        t
    }

    pub(crate) async fn send(&mut self, cmd: &ToWorker) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(cmd)?;
        line.push(b'\n');
        for (i, stdin) in self.stdins.iter_mut().enumerate() {
            stdin
                .write_all(&line)
                .await
                .with_context(|| format!("worker {i} is gone"))?;
            stdin.flush().await?;
        }
        Ok(())
    }

    /// Handles worker messages until `deadline` or until `done` holds.
    /// Returns whether `done` held.
    pub(crate) async fn pump(
        &mut self,
        deadline: Instant,
        ui: &mut Ui,
        mut done: impl FnMut(&Fleet) -> bool,
    ) -> anyhow::Result<bool> {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            if done(self) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::select! {
                ev = self.rx.recv() => match ev {
                    Some(Event::Msg(i, FromWorker::Progress(p))) => self.progress[i] = p,
                    Some(Event::Msg(i, FromWorker::RampDone)) => self.ramp_done[i] = true,
                    Some(Event::Msg(i, FromWorker::Result(r))) => self.results[i] = Some(*r),
                    Some(Event::Gone(i)) => {
                        if self.results[i].is_none() {
                            bail!("worker {i} exited unexpectedly (see its messages above)");
                        }
                    }
                    None => bail!("all workers are gone"),
                },
                _ = tick.tick() => ui.update(&self.totals()),
            }
        }
    }
}

/// The progress bar (a TTY) or an occasional plain line (a log).
pub(crate) struct Ui {
    bar: Option<ProgressBar>,
    plain: bool,
    last_plain: Instant,
    phase: &'static str,
    connections: u64,
    messages: u64,
    sent: Arc<AtomicU64>,
    started: Instant,
    last_delivered: (Instant, u64),
    rate: f64,
}

impl Ui {
    pub(crate) fn new(quiet: bool, connections: u64, messages: u64, sent: Arc<AtomicU64>) -> Ui {
        let tty = std::io::stderr().is_terminal();
        let bar = (tty && !quiet).then(|| {
            let bar = ProgressBar::with_draw_target(
                Some(connections),
                ProgressDrawTarget::stderr_with_hz(5),
            );
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Ui {
            bar,
            plain: !tty && !quiet,
            last_plain: Instant::now(),
            phase: "connecting",
            connections,
            messages,
            sent,
            started: Instant::now(),
            last_delivered: (Instant::now(), 0),
            rate: 0.0,
        }
    }

    pub(crate) fn phase(&mut self, phase: &'static str) {
        self.phase = phase;
        if let Some(bar) = &self.bar {
            match phase {
                "publishing" => bar.set_length(self.messages),
                "connecting" => bar.set_length(self.connections),
                _ => {}
            }
        }
    }

    fn update(&mut self, t: &Progress) {
        let now = Instant::now();
        let dt = (now - self.last_delivered.0).as_secs_f64();
        if dt >= 1.0 {
            self.rate = (t.delivered - self.last_delivered.1.min(t.delivered)) as f64 / dt;
            self.last_delivered = (now, t.delivered);
        }
        let sent = self.sent.load(Ordering::Relaxed);
        let msg = format!(
            "{} | ready {}/{} | sent {}/{} | delivered {} ({:.0}/s) | dup {} | disconnects {} | errors {}",
            self.phase,
            t.ready,
            self.connections,
            sent,
            self.messages,
            t.delivered,
            self.rate,
            t.duplicates,
            t.disconnects,
            t.errors
        );
        if let Some(bar) = &self.bar {
            bar.set_message(msg);
            bar.set_position(if self.phase == "publishing" {
                sent
            } else {
                t.ready
            });
        } else if self.plain && now - self.last_plain >= Duration::from_secs(10) {
            self.last_plain = now;
            eprintln!(
                "herald-load [{:>5.0}s] {msg}",
                (now - self.started).as_secs_f64()
            );
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn sample_all(pids: &[u32]) -> Vec<Option<Sample>> {
    pids.iter().map(|&p| procfs::sample(p)).collect()
}

fn remember(last: &mut [Option<Sample>], pids: &[u32]) {
    for (slot, &pid) in last.iter_mut().zip(pids) {
        if let Some(s) = procfs::sample(pid) {
            *slot = Some(s);
        }
    }
}

fn cpu_sum(samples: &[Option<Sample>]) -> f64 {
    samples.iter().flatten().map(|s| s.cpu_s).sum()
}

async fn run(scenario: Scenario, args: &RunArgs) -> anyhow::Result<(Report, Histogram<u64>)> {
    let started_unix = unix_now_us() / 1_000_000;
    let epoch = Instant::now();
    let epoch_us = unix_now_us();
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let targets: Vec<Target> = args
        .targets
        .iter()
        .map(|u| Target::parse(u))
        .collect::<anyhow::Result<_>>()?;
    let fanout = match scenario {
        Scenario::Unicast => Fanout::Unicast,
        Scenario::Broadcast | Scenario::Idle => Fanout::Broadcast,
        Scenario::Churn | Scenario::Failover => args.fanout.unwrap_or(Fanout::Broadcast),
    };
    let messages = if scenario == Scenario::Idle {
        0
    } else {
        args.messages
    };
    if args.kind == Kind::Herald && args.jwt_secret.is_none() {
        bail!("Herald clients need tokens: pass --jwt-secret (or HERALD_JWT_SECRET)");
    }
    if args.kind == Kind::Nchan && args.publish == PublishVia::Redis {
        bail!("--publish redis speaks Herald's publish script; publish to nchan over HTTP");
    }
    if scenario == Scenario::Failover && args.kill_pid.is_none() {
        bail!("failover needs --kill-pid (a server process you started)");
    }
    if args.source_addrs > 250 {
        bail!("--source-addrs: at most 250 (127.0.0.2..127.0.0.251)");
    }
    let events_path = args.events_path.clone().unwrap_or_else(|| match args.kind {
        Kind::Herald => "/events".into(),
        Kind::Nchan => "/events?user={user}".into(),
    });
    let ready_event = match (&args.ready_event, args.kind) {
        (Some(e), _) if e.is_empty() => None,
        (Some(e), _) => Some(e.clone()),
        (None, Kind::Herald) => Some("herald.ready".to_string()),
        (None, Kind::Nchan) => None,
    };
    let publish_via = match args.publish {
        PublishVia::Http => {
            let urls: Vec<Target> = if args.publish_urls.is_empty() {
                targets.clone()
            } else {
                args.publish_urls
                    .iter()
                    .map(|u| Target::parse(u))
                    .collect::<anyhow::Result<_>>()?
            };
            let token = match (&args.publish_token, &args.jwt_secret, args.kind) {
                (Some(t), _, _) => Some(t.clone()),
                (None, Some(secret), Kind::Herald) => Some(mint_token(
                    secret,
                    "herald-load",
                    args.token_ttl,
                    Some(&["user:*", "broadcast"]),
                )?),
                _ => None,
            };
            Via::Http {
                kind: args.kind,
                urls,
                path: args
                    .publish_path
                    .clone()
                    .unwrap_or_else(|| match args.kind {
                        Kind::Herald => "/publish".into(),
                        Kind::Nchan => "/pub?id={channel}".into(),
                    }),
                token,
            }
        }
        PublishVia::Redis => {
            for seed in args.redis_url.split(',') {
                check_redis_url(seed.trim())?;
            }
            Via::Redis {
                url: args.redis_url.clone(),
                cluster: args.redis_cluster,
                prefix: args.channel_prefix.clone(),
                history_size: args.history_size,
                history_ttl_s: args.history_ttl.as_secs().max(1),
            }
        }
    };
    let publish_via_name = match args.publish {
        PublishVia::Http => "http",
        PublishVia::Redis if args.redis_cluster => "redis cluster",
        PublishVia::Redis => "redis",
    };

    // How the connections are spread.
    let workers = args
        .workers
        .unwrap_or(0)
        .max(args.connections.div_ceil(args.per_process.max(1)) as usize)
        .max(1);
    let source_addrs: Vec<Ipv4Addr> = (0..args.source_addrs)
        .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
        .collect();
    let _ = rlimit::increase_nofile_limit(u64::MAX);

    let sent = Arc::new(AtomicU64::new(0));
    let mut ui = Ui::new(args.quiet, args.connections, messages, sent.clone());
    let server_before = sample_all(&args.server_pids);

    // Start the workers.
    let mut plans = Vec::with_capacity(workers);
    for (index, first, clients) in shares(args.connections, workers) {
        let share = clients as f64 / args.connections as f64;
        plans.push(WorkerPlan {
            index,
            first_client: first,
            clients,
            total_clients: args.connections,
            fanout,
            messages,
            targets: targets.clone(),
            events_path: events_path.clone(),
            jwt_secret: if args.kind == Kind::Herald {
                args.jwt_secret.clone()
            } else {
                None
            },
            token_ttl_s: args.token_ttl.as_secs(),
            cookie_name: args.cookie_name.clone(),
            ready_event: ready_event.clone(),
            source_addrs: source_addrs.clone(),
            ramp_per_s: args.ramp * share,
            churn_per_s: if scenario == Scenario::Churn {
                args.churn_rate * share
            } else {
                0.0
            },
            retry_ms: args.retry.map(|d| d.as_millis() as u64),
            connect_timeout_ms: args.connect_timeout.as_millis() as u64,
            poll_interval_us: args.poll_interval.as_micros() as u64,
            epoch_us,
            report_ms: 200,
            mixed: None,
            random_reconnect: false,
            active_targets: 0,
        });
    }
    let mut fleet = Fleet::spawn(&plans).await?;

    // The ramp.
    let ramp_budget = Duration::from_secs_f64(
        args.connections as f64 / args.ramp.max(1.0) * 1.5
            + args.connect_timeout.as_secs_f64() * 3.0
            + 10.0,
    );
    let ramp_start = Instant::now();
    let all_ramped = fleet
        .pump(Instant::now() + ramp_budget, &mut ui, |f| {
            f.ramp_done.iter().all(|d| *d)
        })
        .await?;
    let ramp_s = ramp_start.elapsed().as_secs_f64();
    if !all_ramped {
        eprintln!(
            "herald-load: the ramp did not finish in {:.0}s; going on with {} ready",
            ramp_budget.as_secs_f64(),
            fleet.totals().ready
        );
    }
    ui.phase("settling");
    fleet
        .pump(Instant::now() + args.settle, &mut ui, |_| false)
        .await?;
    let server_connected = sample_all(&args.server_pids);
    let ready_at_start = fleet.totals().ready;

    // The measured window.
    let mut load_pids = fleet.pids.clone();
    load_pids.push(std::process::id());
    let load_start = sample_all(&load_pids);
    let window_start = Instant::now();
    let server_start = sample_all(&args.server_pids);
    // The last reading of each server, for one that dies in the window.
    let mut server_last = server_start.clone();
    fleet
        .send(&ToWorker::Start {
            at_us: unix_now_us(),
        })
        .await?;
    let publish_start_s = (window_start - epoch).as_secs_f64();
    let mut published = None;
    let mut failover = None;
    if scenario == Scenario::Idle {
        ui.phase("holding");
        fleet
            .pump(Instant::now() + args.duration, &mut ui, |_| false)
            .await?;
    } else {
        ui.phase("publishing");
        let plan = Arc::new(PublishPlan {
            via: publish_via,
            messages,
            rate: args.rate,
            concurrency: args.publish_concurrency,
            fanout,
            total_clients: args.connections,
            ..PublishPlan::default()
        });
        let publisher = tokio::spawn(publish::run(plan.clone(), sent.clone()));
        let publish_span = if args.rate > 0.0 {
            messages as f64 / args.rate
        } else {
            0.0
        };
        let kill_at = args
            .kill_after
            .unwrap_or_else(|| Duration::from_secs_f64(publish_span * 0.4));
        let mut killed: Option<(Instant, u64, u64)> = None; // when, ready, disconnects
        let mut recovered: Option<Duration> = None;
        loop {
            let deadline = if scenario == Scenario::Failover && killed.is_none() {
                (window_start + kill_at).min(Instant::now() + Duration::from_millis(100))
            } else {
                Instant::now() + Duration::from_millis(100)
            };
            fleet.pump(deadline, &mut ui, |_| false).await?;
            remember(&mut server_last, &args.server_pids);
            if scenario == Scenario::Failover {
                if let (None, Some(pid)) = (killed, args.kill_pid) {
                    if window_start.elapsed() >= kill_at {
                        let t = fleet.totals();
                        send_signal(pid, args.kill_signal)?;
                        killed = Some((Instant::now(), t.ready, t.disconnects));
                    }
                }
                if let (Some((at, ready, disc)), None) = (killed, recovered) {
                    let t = fleet.totals();
                    if t.disconnects > disc && t.ready >= ready {
                        recovered = Some(at.elapsed());
                    }
                }
            }
            if publisher.is_finished() {
                break;
            }
        }
        let result = publisher.await.context("publisher")??;
        // The drain: until every confirmed message arrived, deliveries stop
        // for a while, or --drain runs out.
        ui.phase("draining");
        let accounted = fleet.totals().accounted;
        let expected_total = match fanout {
            Fanout::Broadcast => result.confirmed * accounted,
            Fanout::Unicast => result.confirmed * accounted / args.connections.max(1),
        };
        let quiet_for = Duration::from_secs(3)
            .max(args.retry.unwrap_or(Duration::from_secs(2)) * 2 + Duration::from_secs(1));
        let drain_end = Instant::now() + args.drain;
        let mut last = (Instant::now(), fleet.totals().delivered);
        loop {
            let done = fleet
                .pump(
                    drain_end.min(Instant::now() + Duration::from_millis(200)),
                    &mut ui,
                    |f| {
                        let t = f.totals();
                        // After a kill, also wait until the clients are back.
                        let back = match killed {
                            Some((_, ready, disc)) => t.disconnects > disc && t.ready >= ready,
                            None => true,
                        };
                        t.delivered >= expected_total && back
                    },
                )
                .await?;
            remember(&mut server_last, &args.server_pids);
            let t = fleet.totals();
            if let (Some((at, ready, disc)), None) = (killed, recovered) {
                if t.disconnects > disc && t.ready >= ready {
                    recovered = Some(at.elapsed());
                }
            }
            if done || Instant::now() >= drain_end {
                break;
            }
            if t.delivered != last.1 {
                last = (Instant::now(), t.delivered);
            } else if last.0.elapsed() >= quiet_for {
                break;
            }
        }
        if let (Some(pid), Some((at, ready, _))) = (args.kill_pid, killed) {
            failover = Some(FailoverReport {
                pid,
                signal: match args.kill_signal {
                    Signal::Kill => "KILL".into(),
                    Signal::Term => "TERM".into(),
                },
                at_s: (at - window_start).as_secs_f64(),
                ready_before: ready,
                recovered_s: recovered.map(|d| d.as_secs_f64()),
            });
        }
        published = Some(result);
    }
    let window_s = window_start.elapsed().as_secs_f64();
    let server_end = sample_all(&args.server_pids);
    let load_end = sample_all(&load_pids);
    let load_rss: u64 = load_end.iter().flatten().map(|s| s.rss_kib).sum();

    // Settle the accounts.
    ui.phase("collecting");
    let (count, excluded) = match &published {
        Some(p) => (p.attempted, p.excluded.clone()),
        None => (0, Vec::new()),
    };
    fleet
        .send(&ToWorker::Finish {
            published: count,
            excluded,
            broadcast_published: 0,
            broadcast_excluded: Vec::new(),
        })
        .await?;
    fleet
        .pump(Instant::now() + Duration::from_secs(60), &mut ui, |f| {
            f.results.iter().all(Option::is_some)
        })
        .await?;
    ui.finish();
    for child in &mut fleet.children {
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
    let results: Vec<WorkerResult> = fleet.results.into_iter().flatten().collect();
    if results.len() != workers {
        bail!("only {} of {workers} workers reported", results.len());
    }

    // Merge.
    let mut tally = crate::account::Tally::default();
    let mut counters = Counters::default();
    let mut errors = std::collections::BTreeMap::new();
    let mut latency = new_histogram();
    let mut replay = new_histogram();
    let mut connect = new_histogram();
    let mut ready = new_histogram();
    let mut gap = new_histogram();
    let mut per_second: Vec<u64> = Vec::new();
    let (mut first_us, mut last_us) = (u64::MAX, 0u64);
    for r in &results {
        tally.add(&r.tally);
        counters.add(&r.counters);
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_insert(0) += v;
        }
        r.latency.add_to(&mut latency);
        r.replay_latency.add_to(&mut replay);
        r.connect.add_to(&mut connect);
        r.ready.add_to(&mut ready);
        r.reconnect_gap.add_to(&mut gap);
        if per_second.len() < r.per_second.len() {
            per_second.resize(r.per_second.len(), 0);
        }
        for (i, n) in r.per_second.iter().enumerate() {
            per_second[i] += n;
        }
        if r.first_delivery_us > 0 {
            first_us = first_us.min(r.first_delivery_us);
        }
        last_us = last_us.max(r.last_delivery_us);
    }
    let deliveries = latency.len() + replay.len();
    let active_s = if last_us > first_us {
        (last_us - first_us) as f64 / 1e6
    } else {
        0.0
    };
    let per_million = |cpu: f64| (deliveries > 0).then(|| cpu / deliveries as f64 * 1e6);

    let servers: Vec<ServerReport> = args
        .server_pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| {
            let cpu = match (server_start[i], server_end[i].or(server_last[i])) {
                (Some(a), Some(b)) => b.cpu_s - a.cpu_s,
                _ => 0.0,
            };
            ServerReport {
                pid,
                rss_before_kib: server_before[i].map_or(0, |s| s.rss_kib),
                rss_connected_kib: server_connected[i].map_or(0, |s| s.rss_kib),
                rss_end_kib: server_end[i].map_or(0, |s| s.rss_kib),
                cpu_s: cpu,
            }
        })
        .collect();
    let server_cpu: f64 = servers.iter().map(|s| s.cpu_s).sum();
    let rss_growth: i64 = servers
        .iter()
        .map(|s| s.rss_connected_kib as i64 - s.rss_before_kib as i64)
        .sum();
    let server_total = ServerTotals {
        rss_per_connection_bytes: (!servers.is_empty() && ready_at_start > 0)
            .then(|| rss_growth as f64 * 1024.0 / ready_at_start as f64),
        cpu_s: server_cpu,
        cpu_s_per_million: if servers.is_empty() {
            None
        } else {
            per_million(server_cpu)
        },
        cpu_percent: if window_s > 0.0 {
            server_cpu / window_s * 100.0
        } else {
            0.0
        },
    };
    let load_cpu = cpu_sum(&load_end) - cpu_sum(&load_start);

    let publish = published.as_ref().map(|p| {
        let duration_s = (p.finished - p.started).as_secs_f64();
        PublishReport {
            attempted: p.attempted,
            confirmed: p.confirmed,
            failed: p.failed,
            uncertain: p.uncertain,
            duration_s,
            // Intervals between publishes over the time they took.
            rate: if duration_s > 0.0 && p.attempted > 1 {
                (p.attempted - 1) as f64 / duration_s
            } else {
                0.0
            },
            rtt_ms: Pcts::of(&p.rtt),
            first_error: p.first_error.clone(),
        }
    });
    let accounted = fleet.progress.iter().map(|p| p.accounted).sum::<u64>();
    let report = Report {
        scenario: scenario.name().into(),
        label: args.label.clone(),
        kind: match args.kind {
            Kind::Herald => "herald".into(),
            Kind::Nchan => "nchan".into(),
        },
        targets: targets.iter().map(|t| t.url.clone()).collect(),
        command: command_line(),
        started_unix,
        connections: args.connections,
        workers,
        source_addrs: source_addrs.len(),
        fanout: match fanout {
            Fanout::Broadcast => "broadcast".into(),
            Fanout::Unicast => "unicast".into(),
        },
        messages,
        rate: args.rate,
        publish_via: publish_via_name.into(),
        connect: ConnectReport {
            ready: accounted.max(tally.clients),
            never_ready: counters.never_ready,
            late: counters.late_clients,
            attempts: counters.connect_attempts,
            failures: counters.connect_failures,
            errors,
            connect_ms: Pcts::of(&connect),
            ready_ms: Pcts::of(&ready),
            ramp_s,
        },
        publish,
        delivery: DeliveryReport {
            tally,
            deliveries,
            per_s: if active_s > 0.0 {
                deliveries as f64 / active_s
            } else {
                0.0
            },
            peak_per_s: per_second.iter().copied().max().unwrap_or(0),
            per_second,
            publish_start_s,
        },
        latency_ms: Pcts::of(&latency),
        replay_latency_ms: Pcts::of(&replay),
        reconnects: ReconnectReport {
            disconnects: counters.disconnects,
            churned: counters.churned,
            resumed_with_cursor: counters.resumed_with_cursor,
            resets: counters.resets,
            expired: counters.expired,
            heartbeats: counters.heartbeats,
            foreign_events: counters.foreign_events,
            gap_ms: Pcts::of(&gap),
        },
        servers,
        server_total,
        load: LoadReport {
            processes: load_pids.len(),
            cpu_s: load_cpu,
            cpu_s_per_million: per_million(load_cpu),
            cpu_percent: if window_s > 0.0 {
                load_cpu / window_s * 100.0
            } else {
                0.0
            },
            rss_kib: load_rss,
            window_s,
        },
        failover,
    };
    Ok((report, latency))
}

/// Starts one worker process (ourselves, re-executed) with its plan, and a
/// task that forwards what it says to `tx`.
pub(crate) async fn spawn_worker(
    exe: &std::path::Path,
    plan: &WorkerPlan,
    tx: &mpsc::UnboundedSender<Event>,
) -> anyhow::Result<(Child, ChildStdin)> {
    let index = plan.index;
    let mut child = tokio::process::Command::new(exe)
        .arg("worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting a worker process")?;
    let mut stdin = child.stdin.take().context("worker stdin")?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let mut line = serde_json::to_vec(plan)?;
    line.push(b'\n');
    stdin.write_all(&line).await?;
    let tx = tx.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<FromWorker>(&line) {
                Ok(msg) => {
                    let _ = tx.send(Event::Msg(index, msg));
                }
                Err(e) => eprintln!("herald-load: worker {index} said {line:?}: {e}"),
            }
        }
        let _ = tx.send(Event::Gone(index));
    });
    Ok((child, stdin))
}

/// Signals a server process the user named with --kill-pid (or one the
/// `scale` scenario started).
pub(crate) fn send_signal(pid: u32, signal: Signal) -> anyhow::Result<()> {
    let name = match signal {
        Signal::Kill => "KILL",
        Signal::Term => "TERM",
    };
    let status = std::process::Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -s {name} {pid} failed");
    }
    Ok(())
}

/// The command line as typed, quoted for a shell (secrets masked).
pub(crate) fn command_line() -> String {
    let mut out = Vec::new();
    let mut mask_next = false;
    for arg in std::env::args() {
        let shown = if mask_next {
            mask_next = false;
            "…".to_string()
        } else if let Some(v) = arg.strip_prefix("--jwt-secret=") {
            let _ = v;
            "--jwt-secret=…".to_string()
        } else {
            if arg == "--jwt-secret" || arg == "--publish-token" {
                mask_next = true;
            }
            arg
        };
        if shown
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@…".contains(c))
        {
            out.push(shown);
        } else {
            out.push(format!("'{}'", shown.replace('\'', r"'\''")));
        }
    }
    out.join(" ")
}
