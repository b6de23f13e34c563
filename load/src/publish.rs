//! The publisher: message `k` carries `{"seq":k,"sent_us":<unix µs>}`,
//! paced at a fixed rate, sent through the HTTP API (Herald's
//! `POST /publish`, or an nchan publisher location) or straight into Redis
//! with Herald's publish script (on a Redis Cluster through a cluster
//! client, with `SPUBLISH` as the script's `ARGV[5]`, as Herald's nodes do).
//!
//! Each message's outcome is kept: confirmed, failed (certainly not
//! published) or uncertain (sent, but no answer). Only confirmed messages
//! are expected at the clients.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::net::{unix_now_us, HttpConn, RequestError, Target};
use crate::proto::{new_histogram, Fanout};
use crate::Kind;
use serde_json::value::RawValue;

/// Herald's publish script, the one its nodes and `herald::Publisher` use.
const PUBLISH_SCRIPT: &str = herald::broker::redis::PUBLISH_SCRIPT;

pub(crate) enum Via {
    Http {
        kind: Kind,
        urls: Vec<Target>,
        /// `{channel}` is replaced (nchan); Herald's is `/publish`.
        path: String,
        /// Bearer token (Herald).
        token: Option<String>,
    },
    Redis {
        /// One URL, or a cluster's seed URLs, comma-separated.
        url: String,
        /// A Redis Cluster: route by slot and publish with `SPUBLISH`.
        cluster: bool,
        prefix: String,
        history_size: u64,
        history_ttl_s: u64,
    },
    /// Herald's own library publisher (`herald::Publisher`): the publish
    /// script on one Redis or, routed by slot, on a Redis Cluster.
    Library(herald::Publisher),
}

pub(crate) struct PublishPlan {
    pub(crate) via: Via,
    pub(crate) messages: u64,
    pub(crate) rate: f64,
    pub(crate) concurrency: usize,
    pub(crate) fanout: Fanout,
    pub(crate) total_clients: u64,
    /// This publisher sends messages `first, first + step, …` of the
    /// schedule (two publishers can share one sequence space).
    pub(crate) first: u64,
    pub(crate) step: u64,
    /// Messages at or beyond this number are not sent (lowered to stop a
    /// run early); `None`: `messages`.
    pub(crate) stop_at: Option<Arc<AtomicU64>>,
    /// Once set, nothing more is sent, even what is due (the messages not
    /// sent stay unexpected): a run whose servers stopped answering ends.
    pub(crate) abandon: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Event name for every message (`None`: the default `message`).
    pub(crate) event: Option<String>,
    /// Unicast message `k` goes to user `(k · mult) mod total_clients`
    /// instead of `k mod total_clients`.
    pub(crate) unicast_mult: Option<u64>,
    /// Time zero of the schedule (`None`: when publishing starts).
    pub(crate) start: Option<Instant>,
}

impl Default for PublishPlan {
    fn default() -> Self {
        PublishPlan {
            via: Via::Http {
                kind: Kind::Herald,
                urls: Vec::new(),
                path: "/publish".into(),
                token: None,
            },
            messages: 0,
            rate: 0.0,
            concurrency: 1,
            fanout: Fanout::Broadcast,
            total_clients: 1,
            first: 0,
            step: 1,
            stop_at: None,
            abandon: None,
            event: None,
            unicast_mult: None,
            start: None,
        }
    }
}

impl PublishPlan {
    /// The messages this publisher is responsible for.
    fn own(&self) -> impl Iterator<Item = u64> {
        (self.first..self.messages).step_by(self.step.max(1) as usize)
    }

    /// Messages below this number may still be sent.
    fn limit(&self) -> u64 {
        if self
            .abandon
            .as_ref()
            .is_some_and(|a| a.load(Ordering::Relaxed))
        {
            return 0;
        }
        self.schedule_end()
    }

    /// The schedule's end: messages below it count (as confirmed, failed,
    /// uncertain or never sent).
    fn schedule_end(&self) -> u64 {
        self.stop_at.as_ref().map_or(self.messages, |s| {
            s.load(Ordering::Relaxed).min(self.messages)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pending,
    Confirmed,
    Failed,
    Uncertain,
}

/// What the publisher did.
pub(crate) struct Published {
    pub(crate) attempted: u64,
    pub(crate) confirmed: u64,
    /// Sorted sequence numbers not to expect (failed or uncertain).
    pub(crate) excluded: Vec<u64>,
    pub(crate) failed: u64,
    pub(crate) uncertain: u64,
    pub(crate) started: Instant,
    pub(crate) finished: Instant,
    /// Request round trip, µs.
    pub(crate) rtt: Histogram<u64>,
    pub(crate) first_error: Option<String>,
}

/// Live count of messages sent, for the progress display.
pub(crate) type SentCounter = Arc<AtomicU64>;

struct State {
    outcomes: Mutex<Vec<Outcome>>,
    rtt: Mutex<Histogram<u64>>,
    first_error: Mutex<Option<String>>,
    next: AtomicU64,
}

impl State {
    fn error(&self, e: String) {
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert(e);
        }
    }
    fn set(&self, k: u64, o: Outcome) {
        if let Ok(mut v) = self.outcomes.lock() {
            v[k as usize] = o;
        }
    }
}

pub(crate) fn channel_for(plan: &PublishPlan, k: u64) -> String {
    let n = plan.total_clients.max(1);
    match (plan.fanout, plan.unicast_mult) {
        (Fanout::Broadcast, _) => "broadcast".to_string(),
        (Fanout::Unicast, None) => format!("user:u{}", k % n),
        (Fanout::Unicast, Some(m)) => format!(
            "user:u{}",
            (u128::from(k) * u128::from(m) % u128::from(n)) as u64
        ),
    }
}

pub(crate) async fn run(plan: Arc<PublishPlan>, sent: SentCounter) -> anyhow::Result<Published> {
    let state = Arc::new(State {
        outcomes: Mutex::new(vec![Outcome::Pending; plan.messages as usize]),
        rtt: Mutex::new(new_histogram()),
        first_error: Mutex::new(None),
        next: AtomicU64::new(plan.first),
    });
    let redis = match &plan.via {
        Via::Redis { url, cluster, .. } => {
            let mut conn = RedisConn::open(url, *cluster).await?;
            let script = redis::Script::new(PUBLISH_SCRIPT);
            // Load once so every call is an EVALSHA (on a cluster the
            // client sends SCRIPT LOAD to every node).
            conn.load(&script)
                .await
                .context("loading the publish script")?;
            Some((conn, Arc::new(script)))
        }
        Via::Http { .. } | Via::Library(_) => None,
    };
    let started = plan.start.unwrap_or_else(Instant::now);
    let mut tasks = Vec::new();
    for worker in 0..plan.concurrency.max(1) {
        let plan = plan.clone();
        let state = state.clone();
        let sent = sent.clone();
        let redis = redis.clone();
        tasks.push(tokio::spawn(async move {
            match redis {
                Some((conn, script)) => {
                    redis_sender(&plan, &state, &sent, started, conn, &script).await
                }
                None if matches!(plan.via, Via::Library(_)) => {
                    library_sender(&plan, &state, &sent, started).await
                }
                None => http_sender(&plan, &state, &sent, started, worker).await,
            }
        }));
    }
    for t in tasks {
        t.await.context("publisher task")?;
    }
    let finished = Instant::now();
    let outcomes = state
        .outcomes
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut excluded = Vec::new();
    let (mut confirmed, mut failed, mut uncertain) = (0, 0, 0);
    let limit = plan.schedule_end();
    let mut attempted = 0;
    for k in plan.own().take_while(|&k| k < limit) {
        attempted += 1;
        let o = &outcomes[k as usize];
        match o {
            Outcome::Confirmed => confirmed += 1,
            Outcome::Failed | Outcome::Pending => {
                failed += 1;
                excluded.push(k);
            }
            Outcome::Uncertain => {
                uncertain += 1;
                excluded.push(k);
            }
        }
    }
    let rtt = state
        .rtt
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let first_error = state.first_error.lock().ok().and_then(|e| e.clone());
    Ok(Published {
        attempted,
        confirmed,
        excluded,
        failed,
        uncertain,
        started,
        finished,
        rtt,
        first_error,
    })
}

/// Takes the next message number and waits for its slot in the schedule.
async fn next_message(plan: &PublishPlan, state: &State, started: Instant) -> Option<u64> {
    let k = state.next.fetch_add(plan.step.max(1), Ordering::Relaxed);
    if k >= plan.limit() {
        return None;
    }
    if plan.rate > 0.0 {
        let at = started + Duration::from_secs_f64(k as f64 / plan.rate);
        tokio::time::sleep_until(at.into()).await;
        // The run may have been cut short while we waited.
        if k >= plan.limit() {
            return None;
        }
    }
    Some(k)
}

/// A connection for `--publish redis`: one Redis, or a cluster (commands
/// routed by their key's slot, `MOVED`/`ASK` followed by the client).
#[derive(Clone)]
enum RedisConn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl RedisConn {
    async fn open(url: &str, cluster: bool) -> anyhow::Result<Self> {
        if !cluster {
            let client = redis::Client::open(url).context("redis URL")?;
            let conn = client
                .get_multiplexed_async_connection()
                .await
                .with_context(|| format!("connecting to {url}"))?;
            return Ok(RedisConn::Single(conn));
        }
        let seeds: Vec<&str> = url.split(',').map(str::trim).collect();
        let client = redis::cluster::ClusterClientBuilder::new(seeds)
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(5))
            .build()
            .context("redis cluster URLs")?;
        let conn = client
            .get_async_connection()
            .await
            .with_context(|| format!("connecting to the cluster at {url}"))?;
        Ok(RedisConn::Cluster(conn))
    }

    async fn load(&mut self, script: &redis::Script) -> redis::RedisResult<String> {
        let invocation = script.prepare_invoke();
        match self {
            RedisConn::Single(c) => invocation.load_async(c).await,
            RedisConn::Cluster(c) => invocation.load_async(c).await,
        }
    }

    async fn invoke(
        &mut self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> redis::RedisResult<String> {
        match self {
            RedisConn::Single(c) => invocation.invoke_async(c).await,
            RedisConn::Cluster(c) => invocation.invoke_async(c).await,
        }
    }
}

fn payload(k: u64) -> String {
    format!("{{\"seq\":{k},\"sent_us\":{}}}", unix_now_us())
}

async fn redis_sender(
    plan: &PublishPlan,
    state: &State,
    sent: &SentCounter,
    started: Instant,
    mut conn: RedisConn,
    script: &redis::Script,
) {
    let Via::Redis {
        cluster,
        prefix,
        history_size,
        history_ttl_s,
        ..
    } = &plan.via
    else {
        return;
    };
    while let Some(k) = next_message(plan, state, started).await {
        let channel = channel_for(plan, k);
        let t = Instant::now();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(format!("{prefix}:{{{channel}}}:h"))
            .key(format!("{prefix}:{{{channel}}}"))
            .arg("")
            .arg(payload(k))
            .arg(*history_size)
            .arg(*history_ttl_s);
        if *cluster {
            // Sharded pub/sub: only the shard owning the slot carries it.
            invocation.arg("SPUBLISH");
        }
        let result = conn.invoke(&invocation).await;
        sent.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(_) => {
                state.set(k, Outcome::Confirmed);
                if let Ok(mut h) = state.rtt.lock() {
                    let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                }
            }
            Err(e) => {
                // A server error reply means the script did not run; an
                // I/O error leaves it unknown.
                let outcome = if e.kind() == redis::ErrorKind::Io || e.is_timeout() {
                    Outcome::Uncertain
                } else {
                    Outcome::Failed
                };
                state.set(k, outcome);
                state.error(format!("redis: {e}"));
            }
        }
    }
}

async fn library_sender(plan: &PublishPlan, state: &State, sent: &SentCounter, started: Instant) {
    let Via::Library(publisher) = &plan.via else {
        return;
    };
    while let Some(k) = next_message(plan, state, started).await {
        let data = match RawValue::from_string(payload(k)) {
            Ok(d) => d,
            Err(e) => {
                state.set(k, Outcome::Failed);
                state.error(format!("payload: {e}"));
                continue;
            }
        };
        let message = herald::Message {
            channel: channel_for(plan, k),
            event: plan.event.clone(),
            data,
        };
        let t = Instant::now();
        let result = publisher.publish(message).await;
        sent.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(_) => {
                state.set(k, Outcome::Confirmed);
                if let Ok(mut h) = state.rtt.lock() {
                    let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                }
            }
            Err(e) => {
                // A broker error may come after the script ran (a lost
                // reply): not certain either way.
                state.set(k, Outcome::Uncertain);
                state.error(format!("redis: {e}"));
            }
        }
    }
}

async fn http_sender(
    plan: &PublishPlan,
    state: &State,
    sent: &SentCounter,
    started: Instant,
    worker: usize,
) {
    let Via::Http {
        kind,
        urls,
        path,
        token,
    } = &plan.via
    else {
        return;
    };
    let timeout = Duration::from_secs(10);
    // One keep-alive connection per URL, opened on first use.
    let mut conns: Vec<Option<HttpConn>> = urls.iter().map(|_| None).collect();
    let mut down_until: Vec<Option<Instant>> = vec![None; urls.len()];
    while let Some(k) = next_message(plan, state, started).await {
        let channel = channel_for(plan, k);
        let (req_path, body) = match kind {
            Kind::Herald => (
                path.clone(),
                match &plan.event {
                    Some(e) => format!(
                        "{{\"channel\":\"{channel}\",\"event\":\"{e}\",\"data\":{}}}",
                        payload(k)
                    ),
                    None => format!("{{\"channel\":\"{channel}\",\"data\":{}}}", payload(k)),
                },
            ),
            Kind::Nchan => (path.replace("{channel}", &channel), payload(k)),
        };
        let mut outcome = Outcome::Failed;
        // Try each URL at most once, starting round robin.
        for attempt in 0..urls.len() {
            let u = (k as usize + worker + attempt) % urls.len();
            if down_until[u].is_some_and(|t| Instant::now() < t) && attempt + 1 < urls.len() {
                continue;
            }
            let target = &urls[u];
            if conns[u].as_ref().is_some_and(HttpConn::is_closed) {
                conns[u] = None;
            }
            if conns[u].is_none() {
                match HttpConn::open(target.addr, timeout).await {
                    Ok(c) => conns[u] = Some(c),
                    Err(e) => {
                        state.error(format!("publish connect {}: {e}", target.url));
                        down_until[u] = Some(Instant::now() + Duration::from_secs(1));
                        continue; // nothing sent: try the next URL
                    }
                }
            }
            let mut req = format!(
                "POST {}{} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                target.prefix,
                req_path,
                target.host,
                body.len()
            );
            if let Some(token) = token {
                req.push_str(&format!("Authorization: Bearer {token}\r\n"));
            }
            req.push_str("\r\n");
            req.push_str(&body);
            let t = Instant::now();
            let Some(conn) = conns[u].as_mut() else {
                continue;
            };
            match conn.exchange(req.as_bytes(), timeout).await {
                Ok(resp) => {
                    if !resp.keep_alive {
                        conns[u] = None;
                    }
                    if (200..300).contains(&resp.status) {
                        outcome = Outcome::Confirmed;
                        if let Ok(mut h) = state.rtt.lock() {
                            let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                        }
                    } else {
                        state.error(format!(
                            "publish {}: HTTP {} {}",
                            target.url,
                            resp.status,
                            String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)])
                        ));
                        outcome = Outcome::Failed;
                    }
                    break;
                }
                Err(RequestError(e)) => {
                    conns[u] = None;
                    down_until[u] = Some(Instant::now() + Duration::from_secs(1));
                    state.error(format!("publish {}: {e}", target.url));
                    outcome = Outcome::Uncertain;
                    break;
                }
            }
        }
        sent.fetch_add(1, Ordering::Relaxed);
        state.set(k, outcome);
    }
}
