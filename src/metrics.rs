//! Metric names (DESIGN's), handles and the Prometheus recorder.
//!
//! Handles are resolved once, so the per-delivery path increments an atomic
//! instead of looking a name up. Labels never carry user ids or channels.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Why a connection closed (`herald_connections_closed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client went away (or a write to it failed).
    Client,
    /// Its queue filled up.
    Slow,
    /// Its token expired.
    Expired,
    /// The node is draining.
    Shutdown,
    /// It reached `--max-connection-age`.
    MaxAge,
    /// The node failed it.
    Error,
    /// `POST /disconnect` closed it.
    Disconnected,
}

impl CloseReason {
    /// Every reason, in declaration order (the index of its counter).
    const ALL: [CloseReason; 7] = [
        CloseReason::Client,
        CloseReason::Slow,
        CloseReason::Expired,
        CloseReason::Shutdown,
        CloseReason::MaxAge,
        CloseReason::Error,
        CloseReason::Disconnected,
    ];

    fn label(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Slow => "slow",
            CloseReason::Expired => "expired",
            CloseReason::Shutdown => "shutdown",
            CloseReason::MaxAge => "max_age",
            CloseReason::Error => "error",
            CloseReason::Disconnected => "disconnected",
        }
    }
}

/// Why a connection was refused (`herald_connections_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RejectReason {
    /// No or invalid token.
    Auth,
    /// A topic the token does not allow.
    Forbidden,
    /// A connection limit.
    Limit,
}

/// Pre-resolved handles for every metric.
pub(crate) struct Metrics {
    /// `herald_connections`.
    pub(crate) connections: Gauge,
    /// `herald_connections_opened_total`.
    pub(crate) opened: Counter,
    closed: [Counter; CloseReason::ALL.len()],
    rejected: [Counter; 3],
    /// `herald_messages_published_total`.
    pub(crate) published: Counter,
    /// `herald_messages_received_total`.
    pub(crate) received: Counter,
    /// `herald_messages_delivered_total`.
    pub(crate) delivered: Counter,
    /// `herald_messages_invalid_total`.
    pub(crate) invalid: Counter,
    /// `herald_delivery_lag_seconds`.
    pub(crate) lag: Histogram,
    /// `herald_replayed_messages_total`.
    pub(crate) replayed: Counter,
    /// `herald_history_resets_total`.
    pub(crate) resets: Counter,
    /// `herald_subscribed_channels`.
    pub(crate) subscribed_channels: Gauge,
    /// `herald_redis_connected`.
    pub(crate) redis_connected: Gauge,
    /// `herald_redis_reconnects_total`.
    pub(crate) redis_reconnects: Counter,
    /// `herald_redis_shards`: Redis Cluster shards whose pub/sub answers.
    pub(crate) redis_shards: Gauge,
    /// `herald_redis_topology_changes_total`: cluster shape changes seen.
    pub(crate) redis_topology_changes: Counter,
    /// `herald_disconnects_total`.
    pub(crate) disconnects: Counter,
    /// `herald_jwks_refreshes_total{result="ok"|"error"}`.
    jwks_refreshes: [Counter; 2],
    /// `herald_auth_requests_total{result="ok"|"denied"|"error"}`.
    auth_requests: [Counter; 3],
}

impl Metrics {
    /// Counts a closed connection.
    pub(crate) fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].increment(1);
    }

    /// Counts an `--auth-url` call by its result label.
    pub(crate) fn auth_request(&self, result: &str) {
        let i = match result {
            "ok" => 0,
            "denied" => 1,
            _ => 2,
        };
        self.auth_requests[i].increment(1);
    }

    /// Counts a JWKS fetch.
    pub(crate) fn jwks_refresh(&self, ok: bool) {
        self.jwks_refreshes[usize::from(!ok)].increment(1);
    }

    /// Counts a refused connection.
    pub(crate) fn rejected(&self, reason: RejectReason) {
        self.rejected[reason as usize].increment(1);
    }
}

/// How often histogram samples are folded into their buckets. Until then
/// each sample is held in memory: at 100,000 deliveries/s, about 1.6 MB a second.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

static METRICS: OnceLock<Metrics> = OnceLock::new();
static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and returns the
/// handle that renders `/metrics`.
///
/// The recorder keeps every histogram sample (one per delivery, for
/// `herald_delivery_lag_seconds`) until something folds them into the
/// buckets. A scrape does; a node nobody scrapes would grow by about 16
/// bytes a delivery (the unit test's figure) for ever. So a thread of its
/// own (not a task: it must outlive any one runtime, and nodes in tests
/// come and go) does it every
/// [`UPKEEP_INTERVAL`].
pub(crate) fn install() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("herald_delivery_lag_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0,
                    ],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("herald-metrics".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start the metrics upkeep thread ({e}); histograms are folded only when /metrics is scraped");
            }
            // Fails only if another recorder was installed first (an
            // embedding application's); metrics then go to that one.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// The `# HELP` text of every metric, so dashboards and `promtool check
/// metrics` know what each one means.
fn describe() {
    describe_gauge!("herald_connections", "Open SSE connections on this node.");
    describe_counter!(
        "herald_connections_opened_total",
        "SSE connections opened on this node."
    );
    describe_counter!(
        "herald_connections_closed_total",
        "SSE connections closed, by reason (client, slow, expired, shutdown, max_age, error, disconnected)."
    );
    describe_counter!(
        "herald_connections_rejected_total",
        "Connections refused, by reason (auth, forbidden, limit)."
    );
    describe_counter!(
        "herald_messages_published_total",
        "Messages published through this node (HTTP API)."
    );
    describe_counter!(
        "herald_messages_received_total",
        "Messages this node received from the broker."
    );
    describe_counter!(
        "herald_messages_delivered_total",
        "Messages written to SSE connections (one per connection), replays included."
    );
    describe_counter!(
        "herald_messages_invalid_total",
        "Broker payloads dropped because they were not a valid envelope."
    );
    describe_histogram!(
        "herald_delivery_lag_seconds",
        Unit::Seconds,
        "Time from a message's publish timestamp to its write to a connection."
    );
    describe_counter!(
        "herald_replayed_messages_total",
        "Messages replayed from history to reconnecting clients."
    );
    describe_counter!(
        "herald_history_resets_total",
        "Streams opened with herald.reset because history could not cover the cursor."
    );
    describe_gauge!(
        "herald_subscribed_channels",
        "Channels this node is subscribed to on the broker."
    );
    describe_gauge!(
        "herald_redis_connected",
        "1 while the Redis pub/sub connection is up, else 0."
    );
    describe_counter!(
        "herald_redis_reconnects_total",
        "Reconnects of the Redis pub/sub connection."
    );
    describe_gauge!(
        "herald_redis_shards",
        "Redis Cluster shards (masters) whose pub/sub connection is up and probed."
    );
    describe_counter!(
        "herald_redis_topology_changes_total",
        "Redis Cluster shape changes (slot moved, failover, master added or lost) \
         after which this node resubscribed where the slots now live."
    );
}

/// The metric handles; call [`install`] first or they record nowhere.
pub(crate) fn get() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let closed = CloseReason::ALL
            .map(|r| counter!("herald_connections_closed_total", "reason" => r.label()));
        let rejected = ["auth", "forbidden", "limit"]
            .map(|r| counter!("herald_connections_rejected_total", "reason" => r));
        let m = Metrics {
            connections: gauge!("herald_connections"),
            opened: counter!("herald_connections_opened_total"),
            closed,
            rejected,
            published: counter!("herald_messages_published_total"),
            received: counter!("herald_messages_received_total"),
            delivered: counter!("herald_messages_delivered_total"),
            invalid: counter!("herald_messages_invalid_total"),
            lag: histogram!("herald_delivery_lag_seconds"),
            replayed: counter!("herald_replayed_messages_total"),
            resets: counter!("herald_history_resets_total"),
            subscribed_channels: gauge!("herald_subscribed_channels"),
            redis_connected: gauge!("herald_redis_connected"),
            redis_reconnects: counter!("herald_redis_reconnects_total"),
            redis_shards: gauge!("herald_redis_shards"),
            redis_topology_changes: counter!("herald_redis_topology_changes_total"),
            disconnects: counter!("herald_disconnects_total"),
            jwks_refreshes: ["ok", "error"]
                .map(|r| counter!("herald_jwks_refreshes_total", "result" => r)),
            auth_requests: ["ok", "denied", "error"]
                .map(|r| counter!("herald_auth_requests_total", "result" => r)),
        };
        metrics::describe_counter!(
            "herald_auth_requests_total",
            "--auth-url calls by result: ok (200), denied (401/403), error (timeout, 5xx, bad answer)"
        );
        metrics::describe_counter!(
            "herald_jwks_refreshes_total",
            "JWKS fetches by result (an error keeps the last good keys)"
        );
        metrics::describe_counter!(
            "herald_disconnects_total",
            "POST /disconnect requests this node carried out (each closes the user's connections on every node)"
        );
        // Make every series visible from the first scrape.
        for c in m
            .closed
            .iter()
            .chain(&m.rejected)
            .chain(&m.jwks_refreshes)
            .chain(&m.auth_requests)
        {
            c.increment(0);
        }
        for c in [
            &m.opened,
            &m.published,
            &m.received,
            &m.delivered,
            &m.invalid,
            &m.replayed,
            &m.resets,
            &m.redis_reconnects,
            &m.redis_topology_changes,
            &m.disconnects,
        ] {
            c.increment(0);
        }
        m.connections.set(0.0);
        m.subscribed_channels.set(0.0);
        m
    })
}

#[cfg(test)]
mod tests {
    use super::{get, install, CloseReason, UPKEEP_INTERVAL};

    /// Resident memory of this process, from /proc.
    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
        let pages = statm.split_whitespace().nth(1).expect("statm: resident");
        pages.parse::<u64>().expect("statm: a page count") * 4096
    }

    #[test]
    fn histogram_samples_do_not_pile_up_without_a_scrape() {
        install();
        let lag = &get().lag;
        // 5 rounds of 2M samples: 80 MB kept if nothing folds them.
        let before = rss_bytes();
        for _ in 0..5 {
            for i in 0..2_000_000u32 {
                lag.record(f64::from(i % 1000) / 1000.0);
            }
            std::thread::sleep(UPKEEP_INTERVAL * 3 / 2);
        }
        let grown = rss_bytes().saturating_sub(before);
        assert!(
            grown < 40 << 20,
            "10M samples with no scrape grew the process by {} MiB",
            grown >> 20
        );
    }

    #[test]
    fn each_close_reason_indexes_its_own_counter() {
        for (i, reason) in CloseReason::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i, "{reason:?} is out of order in ALL");
        }
    }
}
