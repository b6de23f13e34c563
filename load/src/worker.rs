//! A worker process: holds its share of the SSE connections and accounts
//! for every event they receive.
//!
//! One process may hold at most ~20,000 open files here, so the
//! coordinator re-executes itself as several workers. Each worker is one
//! thread (a current-thread runtime and a `LocalSet`): per-delivery work
//! is a `RefCell` borrow and a few counters, with no locks and no
//! cross-thread wake-ups, which keeps the load tool's own CPU — taken from
//! the same cores as the server's — as small as we can make it.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use herald::fuzzing::Channel;
use herald::StreamId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use crate::account::{Arrival, SeqTracker, Tally};
use crate::net::{connect, mint_token, unix_now_us};
use crate::proto::{
    new_histogram, Counters, Delivery, DuplicateSample, Fanout, FromWorker, Hist, PhaseLatency,
    Progress, ToWorker, WorkerPlan, WorkerResult,
};
use crate::wire::{parse_head, parse_payload, BodyDecoder, SseItem, SseParser};

/// Distinct error kinds kept (the rest are folded into "other").
const MAX_ERROR_KINDS: usize = 32;
/// Read buffer per connection.
const READ_BUF: usize = 8 * 1024;

/// Entry point of `herald-load worker`: the plan is the first stdin line.
pub(crate) fn run() -> anyhow::Result<()> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the worker plan")?;
    let plan: WorkerPlan = serde_json::from_str(&line).context("parsing the worker plan")?;
    if limit > 0 && plan.clients + 64 > limit {
        eprintln!(
            "herald-load worker {}: {} connections but only {limit} open files allowed",
            plan.index, plan.clients
        );
    }
    let mut rt = tokio::runtime::Builder::new_current_thread();
    rt.enable_all();
    // `--poll-interval`: with nothing left to run, the worker naps before
    // it waits in `epoll_wait`, and what became readable meanwhile is
    // ready at once. On loopback the node's `send` runs the receiving
    // side's TCP stack too, including waking a receiver asleep in
    // `epoll_wait` (on a VM a cross-CPU interrupt); a browser's machine
    // pays that itself, not the server's. A busy worker never naps; an
    // event waits at most one nap longer.
    if plan.poll_interval_us > 0 {
        let nap = Duration::from_micros(plan.poll_interval_us);
        rt.on_thread_park(move || std::thread::sleep(nap));
    }
    let rt = rt.build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, worker_main(plan))
}

/// One client's account, kept in the worker's shared state.
struct Slot {
    tracker: SeqTracker,
    ready: bool,
    /// Ready when publishing started: only these are accounted for.
    accounted: bool,
    /// Has connected or failed at least once (the ramp waits for this).
    tried: bool,
    ever_ready: bool,
    /// Forces a reconnect (churn).
    kick: Option<Rc<Notify>>,
    /// Mixed traffic: the broadcasts (`tracker` holds the unicasts).
    broadcast: Option<SeqTracker>,
    /// Streams this client has had.
    streams: u32,
    /// The first few messages of `tracker` to arrive, and how: a duplicate
    /// of one says where both copies came from.
    arrivals: Vec<(u64, Delivery)>,
}

/// Arrivals a slot remembers (unicasts are a few per client).
const ARRIVALS_KEPT: usize = 4;

/// The worker's state, shared by its client tasks on one thread.
struct Shared {
    plan: Rc<WorkerPlan>,
    slots: Vec<Slot>,
    started: bool,
    /// Unix µs that second 0 of `per_second` starts at.
    series_origin_us: u64,
    latency: Histogram<u64>,
    replay_latency: Histogram<u64>,
    connect: Histogram<u64>,
    ready: Histogram<u64>,
    reconnect_gap: Histogram<u64>,
    per_second: Vec<u64>,
    first_delivery_us: u64,
    last_delivery_us: u64,
    progress: Progress,
    counters: Counters,
    errors: BTreeMap<String, u64>,
    /// Mixed traffic: the phase live latency counts towards, and its
    /// histograms (unicast, broadcast) per phase.
    phase: usize,
    phase_latency: Vec<(Histogram<u64>, Histogram<u64>)>,
    unicast_samples: Vec<(u64, u64)>,
    duplicate_samples: Vec<DuplicateSample>,
    /// Targets that take connections (the first this many).
    active_targets: usize,
}

impl Shared {
    fn error(&mut self, kind: String) {
        self.progress.errors += 1;
        let kind = if self.errors.len() < MAX_ERROR_KINDS || self.errors.contains_key(&kind) {
            kind
        } else {
            "other".to_string()
        };
        *self.errors.entry(kind).or_default() += 1;
    }

    fn set_ready(&mut self, slot: usize) {
        if !self.slots[slot].ready {
            self.slots[slot].ready = true;
            self.slots[slot].tried = true;
            self.slots[slot].ever_ready = true;
            self.progress.ready += 1;
        }
    }

    fn set_unready(&mut self, slot: usize) {
        if self.slots[slot].ready {
            self.slots[slot].ready = false;
            self.progress.ready -= 1;
        }
    }
}

type SharedRef = Rc<RefCell<Shared>>;

async fn worker_main(plan: WorkerPlan) -> anyhow::Result<()> {
    let plan = Rc::new(plan);
    let churn = plan.churn_per_s > 0.0;
    let slots = (0..plan.clients)
        .map(|i| {
            let global = plan.first_client + i;
            let (stride, offset) = match (&plan.mixed, plan.fanout) {
                (Some(m), _) => (
                    plan.total_clients,
                    mul_mod(global, m.unicast_mult_inv, plan.total_clients),
                ),
                (None, Fanout::Broadcast) => (1, 0),
                (None, Fanout::Unicast) => (plan.total_clients, global),
            };
            Slot {
                tracker: SeqTracker::new(stride, offset, plan.messages),
                broadcast: plan
                    .mixed
                    .as_ref()
                    .map(|m| SeqTracker::new(1, 0, m.broadcasts)),
                ready: false,
                accounted: false,
                tried: false,
                ever_ready: false,
                kick: churn.then(|| Rc::new(Notify::new())),
                streams: 0,
                arrivals: Vec::new(),
            }
        })
        .collect();
    let shared: SharedRef = Rc::new(RefCell::new(Shared {
        plan: plan.clone(),
        slots,
        started: false,
        series_origin_us: plan.epoch_us,
        latency: new_histogram(),
        replay_latency: new_histogram(),
        connect: new_histogram(),
        ready: new_histogram(),
        reconnect_gap: new_histogram(),
        per_second: Vec::new(),
        first_delivery_us: 0,
        last_delivery_us: 0,
        progress: Progress::default(),
        counters: Counters::default(),
        errors: BTreeMap::new(),
        phase: 0,
        phase_latency: (0..plan.mixed.as_ref().map_or(0, |m| m.phases))
            .map(|_| (new_histogram(), new_histogram()))
            .collect(),
        unicast_samples: Vec::new(),
        duplicate_samples: Vec::new(),
        active_targets: match plan.active_targets {
            0 => plan.targets.len(),
            n => n.min(plan.targets.len()),
        },
    }));

    // Commands from the coordinator.
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<ToWorker>();
    // (A plain thread: stdin is a pipe that tokio would also read with a
    // blocking thread.)
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<ToWorker>(&line) {
                Ok(cmd) => {
                    if cmd_tx.send(cmd).is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("herald-load worker: bad command {line:?}: {e}"),
            }
        }
        // The coordinator went away: stop rather than load a server forever.
        std::process::exit(3);
    });

    // The ramp: clients start at a steady rate.
    let ramp_shared = shared.clone();
    let ramp_plan = plan.clone();
    tokio::task::spawn_local(async move {
        let start = tokio::time::Instant::now();
        for i in 0..ramp_plan.clients {
            if ramp_plan.ramp_per_s > 0.0 {
                let at = start + Duration::from_secs_f64(i as f64 / ramp_plan.ramp_per_s);
                tokio::time::sleep_until(at).await;
            }
            tokio::task::spawn_local(client(i as usize, ramp_shared.clone()));
        }
    });

    let mut tick = tokio::time::interval(Duration::from_millis(plan.report_ms.max(50)));
    let mut ramp_reported = false;
    let mut churn_timer: Option<tokio::time::Interval> = None;
    let mut rng = XorShift::new(plan.epoch_us ^ ((plan.index as u64 + 1) * 0x9E37_79B9));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let s = shared.borrow();
                send(&FromWorker::Progress(s.progress.clone()))?;
                if !ramp_reported && s.slots.iter().all(|c| c.tried) {
                    ramp_reported = true;
                    send(&FromWorker::RampDone)?;
                }
            }
            _ = async { churn_timer.as_mut().expect("guarded").tick().await }, if churn_timer.is_some() => {
                kick_one(&shared, &mut rng);
            }
            cmd = cmd_rx.recv() => match cmd {
                Some(ToWorker::Start { at_us }) => {
                    let mut s = shared.borrow_mut();
                    s.started = true;
                    s.series_origin_us = at_us;
                    let mut accounted = 0;
                    for slot in &mut s.slots {
                        slot.accounted = slot.ready;
                        accounted += u64::from(slot.ready);
                    }
                    s.progress.accounted = accounted;
                    if churn {
                        let every = Duration::from_secs_f64(1.0 / plan.churn_per_s);
                        churn_timer = Some(tokio::time::interval(every));
                    }
                }
                Some(ToWorker::Finish { published, excluded, broadcast_published, broadcast_excluded }) => {
                    let result = finish(
                        &shared.borrow(),
                        (published, &excluded),
                        (broadcast_published, &broadcast_excluded),
                    );
                    send(&FromWorker::Result(Box::new(result)))?;
                    std::io::stdout().flush()?;
                    // Connections close with the process.
                    std::process::exit(0);
                }
                Some(ToWorker::Phase { index }) => shared.borrow_mut().phase = index,
                Some(ToWorker::Targets { active }) => {
                    shared.borrow_mut().active_targets = active.clamp(1, plan.targets.len());
                }
                None => return Ok(()),
            }
        }
    }
}

fn send(msg: &FromWorker) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, msg)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// Forces a random ready client to drop its stream and resume.
fn kick_one(shared: &SharedRef, rng: &mut XorShift) {
    let s = shared.borrow();
    let n = s.slots.len();
    if n == 0 {
        return;
    }
    // A few probes find a ready client when most are.
    for _ in 0..8 {
        let i = (rng.next() % n as u64) as usize;
        if s.slots[i].ready {
            if let Some(k) = &s.slots[i].kick {
                k.notify_one();
            }
            return;
        }
    }
}

fn finish(s: &Shared, unicast: (u64, &[u64]), broadcast: (u64, &[u64])) -> WorkerResult {
    let mut tally = Tally::default();
    let mut broadcast_tally = s.plan.mixed.as_ref().map(|_| Tally::default());
    let mut counters = s.counters.clone();
    for slot in &s.slots {
        if slot.accounted {
            tally.add(&slot.tracker.tally(unicast.0, unicast.1));
            if let (Some(t), Some(b)) = (broadcast_tally.as_mut(), &slot.broadcast) {
                t.add(&b.tally(broadcast.0, broadcast.1));
            }
        } else if slot.ever_ready {
            counters.late_clients += 1;
        } else {
            counters.never_ready += 1;
        }
    }
    WorkerResult {
        tally,
        counters,
        errors: s.errors.clone(),
        latency: Hist::from_histogram(&s.latency),
        replay_latency: Hist::from_histogram(&s.replay_latency),
        connect: Hist::from_histogram(&s.connect),
        ready: Hist::from_histogram(&s.ready),
        reconnect_gap: Hist::from_histogram(&s.reconnect_gap),
        per_second: s.per_second.clone(),
        first_delivery_us: s.first_delivery_us,
        last_delivery_us: s.last_delivery_us,
        broadcast_tally,
        phases: s
            .phase_latency
            .iter()
            .map(|(u, b)| PhaseLatency {
                unicast: Hist::from_histogram(u),
                broadcast: Hist::from_histogram(b),
            })
            .collect(),
        unicast_samples: s.unicast_samples.clone(),
        duplicate_samples: s.duplicate_samples.clone(),
    }
}

/// `a · b mod m` without overflow.
fn mul_mod(a: u64, b: u64, m: u64) -> u64 {
    (u128::from(a) * u128::from(b) % u128::from(m.max(1))) as u64
}

/// Why a stream ended.
enum End {
    /// The server closed it or the connection failed.
    Closed,
    /// The churn scenario asked for a reconnect.
    Kicked,
}

/// One simulated browser tab: an `EventSource` that reconnects with
/// `Last-Event-ID` whenever its stream ends, as browsers do.
async fn client(slot: usize, shared: SharedRef) {
    let plan = shared.borrow().plan.clone();
    let kick = shared.borrow().slots[slot].kick.clone();
    let global = plan.first_client + slot as u64;
    let user = format!("u{global}");
    let token = plan.jwt_secret.as_ref().map(|secret| {
        mint_token(secret, &user, Duration::from_secs(plan.token_ttl_s), None).unwrap_or_default()
    });
    let path = plan.events_path.replace("{user}", &user);
    let channels = Channels {
        user: Channel::parse(&format!("user:{user}")).ok(),
        broadcast: Channel::parse("broadcast").ok(),
    };
    let source: Option<Ipv4Addr> = if plan.source_addrs.is_empty() {
        None
    } else {
        Some(plan.source_addrs[global as usize % plan.source_addrs.len()])
    };
    let mut target = global as usize % shared.borrow().active_targets;
    let mut rng = XorShift::new(global.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ plan.epoch_us);
    let mut parser = SseParser::new();
    let mut buf = vec![0u8; READ_BUF];
    let mut retry = Duration::from_millis(plan.retry_ms.unwrap_or(2000));
    let mut failures: u32 = 0;
    let mut ever_ready = false;
    let mut disconnected_at: Option<Instant> = None;

    loop {
        let t0 = Instant::now();
        let last_id = String::from_utf8_lossy(parser.last_event_id()).into_owned();
        shared.borrow_mut().counters.connect_attempts += 1;
        let outcome = stream_once(
            &plan,
            &shared,
            slot,
            target,
            source,
            &path,
            token.as_deref(),
            &last_id,
            &mut parser,
            &mut buf,
            &mut retry,
            t0,
            &mut ever_ready,
            &mut disconnected_at,
            kick.as_deref(),
            &channels,
        )
        .await;
        let kicked = {
            let mut s = shared.borrow_mut();
            s.slots[slot].tried = true;
            let was_ready = s.slots[slot].ready;
            s.set_unready(slot);
            match outcome {
                Ok(End::Kicked) => {
                    s.counters.churned += 1;
                    disconnected_at = Some(Instant::now());
                    failures = 0;
                    true
                }
                Ok(End::Closed) => {
                    if was_ready {
                        s.counters.disconnects += 1;
                        s.progress.disconnects += 1;
                        disconnected_at = Some(Instant::now());
                        failures = 0;
                    } else {
                        failures += 1;
                    }
                    false
                }
                Err(kind) => {
                    s.counters.connect_failures += 1;
                    s.error(kind);
                    failures += 1;
                    false
                }
            }
        };
        if kicked {
            continue; // resume at once, by cursor
        }
        // Another server next time (a dead node's clients spread over the
        // others); back off on repeated failures, with jitter.
        let active = shared.borrow().active_targets;
        target = if plan.random_reconnect {
            (rng.next() % active as u64) as usize
        } else {
            (target + 1) % active
        };
        let base = if failures == 0 {
            retry
        } else {
            retry.max(Duration::from_millis(500)) * failures.min(4)
        };
        let jitter = (global.wrapping_mul(2_654_435_761) ^ unix_now_us()) % 200;
        tokio::time::sleep(base.min(Duration::from_secs(10)) + Duration::from_millis(jitter)).await;
    }
}

/// One connection: request, head, then events until the stream ends.
/// `Err` is a failure to get a stream (counted as an error kind).
#[allow(clippy::too_many_arguments)]
async fn stream_once(
    plan: &WorkerPlan,
    shared: &SharedRef,
    slot: usize,
    target: usize,
    source: Option<Ipv4Addr>,
    path: &str,
    token: Option<&str>,
    last_id: &str,
    parser: &mut SseParser,
    buf: &mut [u8],
    retry: &mut Duration,
    t0: Instant,
    ever_ready: &mut bool,
    disconnected_at: &mut Option<Instant>,
    kick: Option<&Notify>,
    channels: &Channels,
) -> Result<End, String> {
    let t = &plan.targets[target];
    let mut stream: TcpStream = connect(
        t.addr,
        source,
        Duration::from_millis(plan.connect_timeout_ms),
    )
    .await
    .map_err(|e| format!("connect: {}", io_kind(&e)))?;

    let mut req = format!(
        "GET {}{} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n",
        t.prefix, path, t.host
    );
    if let Some(token) = token {
        req.push_str(&format!("Cookie: {}={}\r\n", plan.cookie_name, token));
    }
    let resuming = !last_id.is_empty();
    if resuming {
        req.push_str(&format!("Last-Event-ID: {last_id}\r\n"));
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {}", io_kind(&e)))?;

    // The response head.
    let mut head_buf: Vec<u8> = Vec::new();
    let (head, used) = loop {
        let n = tokio::time::timeout(
            Duration::from_millis(plan.connect_timeout_ms),
            stream.read(buf),
        )
        .await
        .map_err(|_| "head: timed out".to_string())?
        .map_err(|e| format!("head: {}", io_kind(&e)))?;
        if n == 0 {
            return Err("head: connection closed".into());
        }
        head_buf.extend_from_slice(&buf[..n]);
        if let Some(done) = parse_head(&head_buf).map_err(|e| format!("head: {e}"))? {
            break done;
        }
    };
    if head.status != 200 {
        return Err(format!("http {}", head.status));
    }
    let content_type = head.header("content-type").unwrap_or_default();
    if !content_type.starts_with("text/event-stream") {
        return Err(format!("http 200 with content-type {content_type:?}"));
    }
    let connected_at = Instant::now();
    {
        let mut s = shared.borrow_mut();
        s.progress.connected += 1;
        if !*ever_ready {
            let _ = s.connect.record((connected_at - t0).as_micros() as u64);
        }
        if resuming {
            s.counters.resumed_with_cursor += 1;
        }
        s.slots[slot].streams += 1;
    }
    parser.reset_keep_id();
    let mut body = BodyDecoder::new(head.framing);
    let mut replaying = resuming;
    let mut ctx = StreamCtx {
        plan,
        shared,
        slot,
        retry,
        t0,
        ever_ready,
        disconnected_at,
        replaying: &mut replaying,
        channels,
        target,
    };
    if plan.ready_event.is_none() {
        ctx.on_ready();
    }

    let leftover = head_buf[used..].to_vec();
    let mut result = ctx.consume(&mut body, parser, &leftover);
    while result.is_ok() && !body.is_done() {
        let read = match kick {
            Some(k) => tokio::select! {
                r = stream.read(buf) => r,
                _ = k.notified() => {
                    result = Ok(Some(End::Kicked));
                    break;
                }
            },
            None => stream.read(buf).await,
        };
        match read {
            Ok(0) => break,
            Ok(n) => result = ctx.consume(&mut body, parser, &buf[..n]),
            Err(e) => {
                result = Err(format!("read: {}", io_kind(&e)));
                break;
            }
        }
    }
    shared.borrow_mut().progress.connected -= 1;
    match result {
        Ok(Some(end)) => Ok(end),
        Ok(None) => Ok(End::Closed),
        // A stream that broke after it was up is a disconnect, not a
        // failed connect; record the cause all the same.
        Err(kind) => {
            shared.borrow_mut().error(kind);
            Ok(End::Closed)
        }
    }
}

/// What a live stream updates as events arrive.
struct StreamCtx<'a> {
    plan: &'a WorkerPlan,
    shared: &'a SharedRef,
    slot: usize,
    retry: &'a mut Duration,
    t0: Instant,
    ever_ready: &'a mut bool,
    disconnected_at: &'a mut Option<Instant>,
    /// Resumed with a cursor and not yet caught up: what arrives is replay.
    replaying: &'a mut bool,
    channels: &'a Channels,
    /// The target this stream is on.
    target: usize,
}

impl StreamCtx<'_> {
    fn on_ready(&mut self) {
        let now = Instant::now();
        let mut s = self.shared.borrow_mut();
        if !*self.ever_ready {
            *self.ever_ready = true;
            let _ = s.ready.record((now - self.t0).as_micros() as u64);
        }
        if let Some(at) = self.disconnected_at.take() {
            let _ = s.reconnect_gap.record((now - at).as_micros() as u64);
        }
        s.set_ready(self.slot);
        *self.replaying = false;
    }

    fn consume(
        &mut self,
        body: &mut BodyDecoder,
        parser: &mut SseParser,
        bytes: &[u8],
    ) -> Result<Option<End>, String> {
        let now_us = unix_now_us();
        let mut parse_error = None;
        body.decode(bytes, &mut |payload| {
            if parse_error.is_some() {
                return;
            }
            if let Err(e) = parser.feed(payload, &mut |item| {
                let ev = self.classify(&item);
                self.apply(ev, now_us);
            }) {
                parse_error = Some(e);
            }
        })
        .map_err(|e| format!("framing: {e}"))?;
        match parse_error {
            Some(e) => Err(format!("event-stream: {e}")),
            None => Ok(None),
        }
    }

    fn classify(&self, item: &SseItem<'_>) -> Ev {
        match *item {
            SseItem::Retry(ms) => Ev::Retry(ms),
            SseItem::Comment(_) => Ev::Comment,
            SseItem::Event { event, data, id } => {
                if self.plan.ready_event.as_deref().map(str::as_bytes) == Some(event) {
                    return Ev::Ready;
                }
                match event {
                    b"herald.reset" => Ev::Reset,
                    b"herald.expired" => Ev::Expired,
                    _ => {
                        let Some((seq, sent_us)) = parse_payload(data) else {
                            return Ev::Foreign;
                        };
                        let mixed_broadcast = self
                            .plan
                            .mixed
                            .as_ref()
                            .is_some_and(|m| m.broadcast_event.as_bytes() == event);
                        let on_broadcast = match self.plan.mixed {
                            Some(_) => mixed_broadcast,
                            None => self.plan.fanout == Fanout::Broadcast,
                        };
                        let channel = if on_broadcast {
                            &self.channels.broadcast
                        } else {
                            &self.channels.user
                        };
                        let position = position_in(id, channel.as_ref());
                        if mixed_broadcast {
                            Ev::Broadcast {
                                seq,
                                sent_us,
                                position,
                            }
                        } else {
                            Ev::Message {
                                seq,
                                sent_us,
                                position,
                            }
                        }
                    }
                }
            }
        }
    }

    fn apply(&mut self, ev: Ev, now_us: u64) {
        match ev {
            Ev::Retry(ms) => {
                if self.plan.retry_ms.is_none() {
                    *self.retry = Duration::from_millis(ms);
                }
            }
            Ev::Comment => self.shared.borrow_mut().counters.heartbeats += 1,
            Ev::Ready => self.on_ready(),
            Ev::Reset => self.shared.borrow_mut().counters.resets += 1,
            Ev::Expired => self.shared.borrow_mut().counters.expired += 1,
            Ev::Foreign => self.shared.borrow_mut().counters.foreign_events += 1,
            Ev::Message {
                seq,
                sent_us,
                position,
            }
            | Ev::Broadcast {
                seq,
                sent_us,
                position,
            } => {
                let is_broadcast = matches!(ev, Ev::Broadcast { .. });
                let mut s = self.shared.borrow_mut();
                let s = &mut *s;
                let slot = &mut s.slots[self.slot];
                let delivery = Delivery {
                    target: self.target,
                    stream: slot.streams,
                    replay: *self.replaying,
                };
                let (tracker, arrivals) = match (is_broadcast, slot.broadcast.as_mut()) {
                    (true, Some(b)) => (b, None),
                    _ => (&mut slot.tracker, Some(&mut slot.arrivals)),
                };
                let before = tracker.delivered;
                let dups_before = tracker.duplicates;
                let arrival = tracker.record(seq, position);
                s.progress.delivered += tracker.delivered - before;
                s.progress.duplicates += tracker.duplicates - dups_before;
                let lat = now_us.saturating_sub(sent_us).clamp(1, 3_600_000_000);
                let mut first = None;
                if let Some(arrivals) = arrivals {
                    if arrival == Arrival::Duplicate {
                        first = arrivals.iter().find(|(k, _)| *k == seq).map(|(_, d)| *d);
                    } else if arrival != Arrival::Misrouted && arrivals.len() < ARRIVALS_KEPT {
                        arrivals.push((seq, delivery));
                    }
                }
                if arrival == Arrival::Duplicate && s.duplicate_samples.len() < 32 {
                    s.duplicate_samples.push(DuplicateSample {
                        client: s.plan.first_client + self.slot as u64,
                        broadcast: is_broadcast,
                        seq,
                        first,
                        again: delivery,
                    });
                }
                let hist = if *self.replaying {
                    &mut s.replay_latency
                } else {
                    &mut s.latency
                };
                let _ = hist.record(lat);
                if !*self.replaying && s.started {
                    let phase = s.phase;
                    if let Some((u, b)) = s.phase_latency.get_mut(phase) {
                        let _ = if is_broadcast { b } else { u }.record(lat);
                        if !is_broadcast {
                            s.unicast_samples.push((sent_us, lat));
                        }
                    }
                }
                if s.first_delivery_us == 0 {
                    s.first_delivery_us = now_us;
                }
                s.last_delivery_us = now_us;
                let second = (now_us.saturating_sub(s.series_origin_us) / 1_000_000) as usize;
                if second < 86_400 {
                    if s.per_second.len() <= second {
                        s.per_second.resize(second + 1, 0);
                    }
                    s.per_second[second] += 1;
                }
            }
        }
    }
}

/// An event reduced to what the accounting needs (no borrowed buffers).
enum Ev {
    Retry(u64),
    Comment,
    Ready,
    Reset,
    Expired,
    Foreign,
    /// `position`: where the channel's stream placed it, from the cursor.
    Message {
        seq: u64,
        sent_us: u64,
        position: Option<StreamId>,
    },
    /// Mixed traffic: a broadcast (its own sequence space).
    Broadcast {
        seq: u64,
        sent_us: u64,
        position: Option<StreamId>,
    },
}

/// The clients' two channels, for reading their position off a cursor.
struct Channels {
    user: Option<Channel>,
    broadcast: Option<Channel>,
}

/// Where `channel`'s stream placed the event whose `id:` is `id`: Herald's
/// cursor holds it. `None` for any other server's ids.
fn position_in(id: &[u8], channel: Option<&Channel>) -> Option<StreamId> {
    herald::fuzzing::position_in(std::str::from_utf8(id).ok()?, channel?)
}

fn io_kind(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{:?} (os {code})", e.kind()),
        None => format!("{:?}", e.kind()),
    }
}

/// Cheap pseudo-random numbers for picking churn victims.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}
