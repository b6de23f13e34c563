//! What the coordinator and its worker processes say to each other: one
//! JSON object per line, the plan and commands on the worker's stdin, its
//! progress and result on its stdout (its stderr is the user's).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::account::Tally;
use crate::net::Target;

/// Who receives message `k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Fanout {
    /// Every connection (channel `broadcast`).
    Broadcast,
    /// User `u(k mod N)` (channel `user:u<k mod N>`).
    Unicast,
}

/// Everything a worker needs to run its share of the clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerPlan {
    pub(crate) index: usize,
    /// Global index of this worker's first client; it runs `clients` of them.
    pub(crate) first_client: u64,
    pub(crate) clients: u64,
    /// All clients of the run (the unicast stride).
    pub(crate) total_clients: u64,
    pub(crate) fanout: Fanout,
    /// Messages in the run (bounds the per-client bitmaps).
    pub(crate) messages: u64,
    pub(crate) targets: Vec<Target>,
    /// Request path; `{user}` is replaced by the client's user id.
    pub(crate) events_path: String,
    pub(crate) jwt_secret: Option<String>,
    pub(crate) token_ttl_s: u64,
    pub(crate) cookie_name: String,
    /// Event that marks a stream as caught up; `None`: the 200 head does.
    pub(crate) ready_event: Option<String>,
    pub(crate) source_addrs: Vec<Ipv4Addr>,
    /// This worker's share of the connection ramp.
    pub(crate) ramp_per_s: f64,
    /// This worker's share of forced reconnects per second (churn).
    pub(crate) churn_per_s: f64,
    /// Fixed reconnect delay instead of the server's `retry:`.
    pub(crate) retry_ms: Option<u64>,
    pub(crate) connect_timeout_ms: u64,
    /// `--poll-interval` in µs (0: the worker sleeps in `epoll_wait`).
    pub(crate) poll_interval_us: u64,
    /// Unix microseconds the run started at (seeds, until `Start` moves
    /// the per-second series' origin to the start of publishing).
    pub(crate) epoch_us: u64,
    pub(crate) report_ms: u64,
    /// The `scale` scenario's mixed traffic (absent in the others).
    #[serde(default)]
    pub(crate) mixed: Option<Mixed>,
    /// Reconnect to a random one of the active targets (like a balancer)
    /// instead of the next one.
    #[serde(default)]
    pub(crate) random_reconnect: bool,
    /// Only the first this many targets take connections (0: all); the
    /// coordinator widens it with `ToWorker::Targets` as nodes join.
    #[serde(default)]
    pub(crate) active_targets: usize,
}

/// Broadcasts and unicasts in one run, each with its own sequence space:
/// broadcast `k` carries the event name `broadcast_event` and goes to every
/// client; unicast `k` (any other event) goes to user
/// `u((k · unicast_mult) mod total_clients)`. The multiplier is coprime to
/// the number of clients, so it permutes them: the users look random, yet
/// each client still knows exactly which sequence numbers are its own
/// (`k ≡ u · unicast_mult⁻¹`, every `total_clients`-th message).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Mixed {
    pub(crate) broadcast_event: String,
    /// Broadcasts in the run (bounds the bitmaps).
    pub(crate) broadcasts: u64,
    pub(crate) unicast_mult: u64,
    /// `unicast_mult⁻¹ mod total_clients`.
    pub(crate) unicast_mult_inv: u64,
    /// Phases the latency is split by (`ToWorker::Phase` moves on).
    pub(crate) phases: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub(crate) enum ToWorker {
    /// Publishing begins (at unix µs `at_us`): clients ready now are the
    /// ones accounted for, and the per-second series counts from here.
    Start { at_us: u64 },
    /// Publishing is over: settle the accounts and report. With mixed
    /// traffic, `published`/`excluded` are the unicasts' and
    /// `broadcast_*` the broadcasts'.
    Finish {
        published: u64,
        excluded: Vec<u64>,
        #[serde(default)]
        broadcast_published: u64,
        #[serde(default)]
        broadcast_excluded: Vec<u64>,
    },
    /// Latency from now on counts towards phase `index`.
    Phase { index: usize },
    /// The first `active` targets take connections from now on.
    Targets { active: usize },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum FromWorker {
    Progress(Progress),
    /// Every client has connected or failed at least once.
    RampDone,
    Result(Box<WorkerResult>),
}

/// Live counters, sent every `report_ms`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Progress {
    pub(crate) connected: u64,
    pub(crate) ready: u64,
    /// Clients that were ready when publishing started.
    pub(crate) accounted: u64,
    /// Distinct messages received (all clients).
    pub(crate) delivered: u64,
    pub(crate) duplicates: u64,
    pub(crate) disconnects: u64,
    pub(crate) errors: u64,
}

/// Counters that only matter at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Counters {
    pub(crate) connect_attempts: u64,
    pub(crate) connect_failures: u64,
    pub(crate) disconnects: u64,
    /// Reconnects forced by the churn scenario.
    pub(crate) churned: u64,
    pub(crate) resumed_with_cursor: u64,
    pub(crate) heartbeats: u64,
    pub(crate) resets: u64,
    pub(crate) expired: u64,
    /// Events that carried no `seq` payload (other than Herald's own).
    pub(crate) foreign_events: u64,
    /// Clients never ready before publishing started.
    pub(crate) late_clients: u64,
    pub(crate) never_ready: u64,
}

impl Counters {
    pub(crate) fn add(&mut self, o: &Counters) {
        self.connect_attempts += o.connect_attempts;
        self.connect_failures += o.connect_failures;
        self.disconnects += o.disconnects;
        self.churned += o.churned;
        self.resumed_with_cursor += o.resumed_with_cursor;
        self.heartbeats += o.heartbeats;
        self.resets += o.resets;
        self.expired += o.expired;
        self.foreign_events += o.foreign_events;
        self.late_clients += o.late_clients;
        self.never_ready += o.never_ready;
    }
}

/// A worker's final account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerResult {
    pub(crate) tally: Tally,
    pub(crate) counters: Counters,
    pub(crate) errors: BTreeMap<String, u64>,
    /// Latency of live deliveries, µs.
    pub(crate) latency: Hist,
    /// Latency of messages replayed after a reconnect, µs.
    pub(crate) replay_latency: Hist,
    /// TCP connect + response head, µs (first connection of each client).
    pub(crate) connect: Hist,
    /// Connect to ready event, µs (first connection of each client).
    pub(crate) ready: Hist,
    /// Disconnect to ready again, µs.
    pub(crate) reconnect_gap: Hist,
    /// Deliveries in each second since publishing started.
    pub(crate) per_second: Vec<u64>,
    /// Unix µs of the first and last delivery (0 if none).
    pub(crate) first_delivery_us: u64,
    pub(crate) last_delivery_us: u64,
    /// Mixed traffic: the broadcasts' account (`tally` is the unicasts').
    #[serde(default)]
    pub(crate) broadcast_tally: Option<Tally>,
    /// Mixed traffic: live latency per phase, µs.
    #[serde(default)]
    pub(crate) phases: Vec<PhaseLatency>,
    /// Mixed traffic: every live unicast delivery as (sent unix µs,
    /// latency µs), so the coordinator can pick those that were in flight
    /// while a broadcast went out.
    #[serde(default)]
    pub(crate) unicast_samples: Vec<(u64, u64)>,
    /// The first duplicates seen, to tell a server's double delivery from
    /// a double publish.
    #[serde(default)]
    pub(crate) duplicate_samples: Vec<DuplicateSample>,
}

/// One message a client got twice.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DuplicateSample {
    pub(crate) client: u64,
    pub(crate) broadcast: bool,
    pub(crate) seq: u64,
    /// The first arrival, where known (unicasts), and the duplicate.
    pub(crate) first: Option<Delivery>,
    pub(crate) again: Delivery,
}

/// Where and how one message reached a client.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Delivery {
    /// The target (node) the client's stream was on.
    pub(crate) target: usize,
    /// Which of the client's streams (1 = its first).
    pub(crate) stream: u32,
    /// Replayed after a resume, rather than live.
    pub(crate) replay: bool,
}

/// Live-delivery latency of one phase, by kind.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PhaseLatency {
    pub(crate) unicast: Hist,
    pub(crate) broadcast: Hist,
}

/// A histogram in transit: (value, count) pairs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Hist(pub Vec<(u64, u64)>);

impl Hist {
    pub(crate) fn from_histogram(h: &Histogram<u64>) -> Hist {
        Hist(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    pub(crate) fn add_to(&self, h: &mut Histogram<u64>) {
        for &(v, n) in &self.0 {
            // Values were recorded into a histogram of the same bounds.
            let _ = h.record_n(v.min(h.high()), n);
        }
    }
}

/// Microsecond histograms up to an hour, 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}
