//! The run's figures: one serializable `Report` (the `--json` output and
//! what `herald-load markdown` compares), and its human table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::account::Tally;

/// Percentiles of a µs histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Pcts {
    pub(crate) count: u64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

impl Pcts {
    pub(crate) fn of(h: &Histogram<u64>) -> Pcts {
        if h.is_empty() {
            return Pcts::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Pcts {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    pub(crate) label: Option<String>,
    /// `herald` or `nchan`.
    pub(crate) kind: String,
    pub(crate) targets: Vec<String>,
    pub(crate) command: String,
    pub(crate) started_unix: u64,
    pub(crate) connections: u64,
    pub(crate) workers: usize,
    pub(crate) source_addrs: usize,
    pub(crate) fanout: String,
    pub(crate) messages: u64,
    pub(crate) rate: f64,
    pub(crate) publish_via: String,
    pub(crate) connect: ConnectReport,
    pub(crate) publish: Option<PublishReport>,
    pub(crate) delivery: DeliveryReport,
    /// End-to-end latency of live deliveries (publish call → parsed by the
    /// client).
    pub(crate) latency_ms: Pcts,
    /// Latency of messages replayed after a reconnect (from their publish).
    pub(crate) replay_latency_ms: Pcts,
    pub(crate) reconnects: ReconnectReport,
    pub(crate) servers: Vec<ServerReport>,
    pub(crate) server_total: ServerTotals,
    pub(crate) load: LoadReport,
    pub(crate) failover: Option<FailoverReport>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ConnectReport {
    /// Clients ready when publishing started (or at the end of the ramp).
    pub(crate) ready: u64,
    pub(crate) never_ready: u64,
    /// Ready only after publishing started: not accounted.
    pub(crate) late: u64,
    pub(crate) attempts: u64,
    pub(crate) failures: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    /// TCP connect + response head.
    pub(crate) connect_ms: Pcts,
    /// Until the stream is caught up (`herald.ready`), or the head.
    pub(crate) ready_ms: Pcts,
    pub(crate) ramp_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PublishReport {
    pub(crate) attempted: u64,
    pub(crate) confirmed: u64,
    pub(crate) failed: u64,
    pub(crate) uncertain: u64,
    pub(crate) duration_s: f64,
    /// Messages per second actually achieved.
    pub(crate) rate: f64,
    pub(crate) rtt_ms: Pcts,
    pub(crate) first_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct DeliveryReport {
    #[serde(flatten)]
    pub(crate) tally: Tally,
    /// Every message event received, duplicates included.
    pub(crate) deliveries: u64,
    /// Deliveries over first-to-last delivery.
    pub(crate) per_s: f64,
    pub(crate) peak_per_s: u64,
    /// Deliveries in each second since publishing started.
    pub(crate) per_second: Vec<u64>,
    /// Seconds after the run started that publishing began.
    pub(crate) publish_start_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ReconnectReport {
    pub(crate) disconnects: u64,
    pub(crate) churned: u64,
    pub(crate) resumed_with_cursor: u64,
    pub(crate) resets: u64,
    pub(crate) expired: u64,
    pub(crate) heartbeats: u64,
    pub(crate) foreign_events: u64,
    /// Disconnect → ready again.
    pub(crate) gap_ms: Pcts,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ServerReport {
    pub(crate) pid: u32,
    pub(crate) rss_before_kib: u64,
    pub(crate) rss_connected_kib: u64,
    pub(crate) rss_end_kib: u64,
    /// CPU seconds over the measured window.
    pub(crate) cpu_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ServerTotals {
    /// (RSS connected − RSS before) / ready connections, all server PIDs:
    /// the memory per connection when the servers started fresh.
    pub(crate) rss_per_connection_bytes: Option<f64>,
    pub(crate) cpu_s: f64,
    pub(crate) cpu_s_per_million: Option<f64>,
    /// Share of one core over the window.
    pub(crate) cpu_percent: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LoadReport {
    pub(crate) processes: usize,
    pub(crate) cpu_s: f64,
    pub(crate) cpu_s_per_million: Option<f64>,
    pub(crate) cpu_percent: f64,
    pub(crate) rss_kib: u64,
    /// The measured window (publishing + drain, or the idle hold).
    pub(crate) window_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct FailoverReport {
    pub(crate) pid: u32,
    pub(crate) signal: String,
    /// Seconds after publishing started.
    pub(crate) at_s: f64,
    pub(crate) ready_before: u64,
    /// Until as many clients were ready again (None: never within the run).
    pub(crate) recovered_s: Option<f64>,
}

fn pcts_row(name: &str, p: &Pcts) -> String {
    if p.count == 0 {
        return format!("  {name:<22} -\n");
    }
    format!(
        "  {name:<22} p50 {:>9.3}  p90 {:>9.3}  p99 {:>9.3}  p99.9 {:>9.3}  max {:>9.3} ms  (n={})\n",
        p.p50, p.p90, p.p99, p.p999, p.max, p.count
    )
}

impl Report {
    /// The human table.
    pub(crate) fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "herald-load {} — {}{} — {} connections over {} worker(s), {} source address(es)",
            self.scenario,
            self.kind,
            self.label
                .as_ref()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default(),
            self.connections,
            self.workers,
            self.source_addrs.max(1)
        );
        let _ = writeln!(o, "  targets: {}", self.targets.join(", "));
        let c = &self.connect;
        let _ = writeln!(o, "connections");
        let _ = writeln!(
            o,
            "  ready {}  never ready {}  late {}  attempts {}  failures {}  ramp {:.1}s",
            c.ready, c.never_ready, c.late, c.attempts, c.failures, c.ramp_s
        );
        o.push_str(&pcts_row("connect (to head)", &c.connect_ms));
        o.push_str(&pcts_row("to ready", &c.ready_ms));
        for (kind, n) in &c.errors {
            let _ = writeln!(o, "  error {kind}: {n}");
        }
        if let Some(p) = &self.publish {
            let _ = writeln!(o, "publishing ({}, {})", self.publish_via, self.fanout);
            let _ = writeln!(
                o,
                "  {} of {} confirmed (failed {}, uncertain {}) in {:.2}s = {:.1} msg/s (asked {})",
                p.confirmed, p.attempted, p.failed, p.uncertain, p.duration_s, p.rate, self.rate
            );
            o.push_str(&pcts_row("request round trip", &p.rtt_ms));
            if let Some(e) = &p.first_error {
                let _ = writeln!(o, "  first error: {e}");
            }
        }
        let d = &self.delivery;
        if self.publish.is_some() {
            let _ = writeln!(o, "delivery");
            let _ = writeln!(
                o,
                "  expected {}  received {}  lost {}  duplicated {}  out of order {}  misrouted {}",
                d.tally.expected,
                d.tally.received,
                d.tally.lost,
                d.tally.duplicates,
                d.tally.out_of_order,
                d.tally.misrouted
            );
            let _ = writeln!(
                o,
                "  clients with loss {} (max {} each)  with duplicates {} (max {} each)",
                d.tally.clients_with_loss,
                d.tally.max_lost_per_client,
                d.tally.clients_with_duplicates,
                d.tally.max_duplicates_per_client
            );
            let _ = writeln!(
                o,
                "  {} deliveries, {:.0}/s overall, peak {}/s",
                d.deliveries, d.per_s, d.peak_per_s
            );
            o.push_str(&pcts_row("end-to-end latency", &self.latency_ms));
            if self.replay_latency_ms.count > 0 {
                o.push_str(&pcts_row(
                    "replayed (from publish)",
                    &self.replay_latency_ms,
                ));
            }
        }
        let r = &self.reconnects;
        let _ = writeln!(
            o,
            "streams: disconnects {}  churned {}  resumed with cursor {}  resets {}  expired {}  heartbeats {}  foreign events {}",
            r.disconnects, r.churned, r.resumed_with_cursor, r.resets, r.expired, r.heartbeats, r.foreign_events
        );
        if r.gap_ms.count > 0 {
            o.push_str(&pcts_row("disconnect → ready", &r.gap_ms));
        }
        if let Some(f) = &self.failover {
            let _ = writeln!(
                o,
                "failover: SIG{} to pid {} at +{:.1}s; {} ready before; {}",
                f.signal,
                f.pid,
                f.at_s,
                f.ready_before,
                match f.recovered_s {
                    Some(s) => format!("all back after {s:.1}s"),
                    None => "not all back by the end".to_string(),
                }
            );
        }
        if !self.servers.is_empty() {
            let _ = writeln!(o, "server (window {:.1}s)", self.load.window_s);
            for s in &self.servers {
                let _ = writeln!(
                    o,
                    "  pid {:<8} RSS {} → {} → {} KiB  CPU {:.2}s",
                    s.pid, s.rss_before_kib, s.rss_connected_kib, s.rss_end_kib, s.cpu_s
                );
            }
            let t = &self.server_total;
            let _ = writeln!(
                o,
                "  RSS growth per connection {}  CPU {:.2}s ({:.0}% of a core)  CPU-s per million deliveries {}",
                t.rss_per_connection_bytes
                    .map(|b| format!("{:.0} B ({:.2} KiB)", b, b / 1024.0))
                    .unwrap_or_else(|| "-".into()),
                t.cpu_s,
                t.cpu_percent,
                t.cpu_s_per_million
                    .map(|c| format!("{c:.2}"))
                    .unwrap_or_else(|| "-".into())
            );
        }
        let l = &self.load;
        let _ = writeln!(
            o,
            "load tool: {} process(es), CPU {:.2}s ({:.0}% of a core){}, RSS {} MiB",
            l.processes,
            l.cpu_s,
            l.cpu_percent,
            l.cpu_s_per_million
                .map(|c| format!(", {c:.2} CPU-s per million"))
                .unwrap_or_default(),
            l.rss_kib / 1024
        );
        o
    }
}

/// A side-by-side markdown table of several reports (same scenario, one
/// per server), with the ratio of each to the last one (the baseline).
pub(crate) fn markdown(reports: &[Report]) -> String {
    let mut o = String::new();
    if reports.is_empty() {
        return o;
    }
    let name = |r: &Report| r.label.clone().unwrap_or_else(|| r.kind.clone());
    let baseline = reports.len() > 1;
    let _ = write!(o, "| metric |");
    for r in reports {
        let _ = write!(o, " {} |", name(r));
    }
    if baseline {
        for r in &reports[..reports.len() - 1] {
            let _ = write!(o, " {} / {} |", name(r), name(&reports[reports.len() - 1]));
        }
    }
    o.push('\n');
    let cols = reports.len() + if baseline { reports.len() - 1 } else { 0 };
    let _ = writeln!(o, "|---|{}", "---:|".repeat(cols));
    type Getter = fn(&Report) -> Option<f64>;
    let rows: Vec<(&str, Getter, usize)> = vec![
        ("connections ready", |r| Some(r.connect.ready as f64), 0),
        ("connect p50 (ms)", |r| Some(r.connect.connect_ms.p50), 2),
        ("connect p99 (ms)", |r| Some(r.connect.connect_ms.p99), 2),
        (
            "messages confirmed",
            |r| r.publish.as_ref().map(|p| p.confirmed as f64),
            0,
        ),
        (
            "publish rate achieved (msg/s)",
            |r| r.publish.as_ref().map(|p| p.rate),
            1,
        ),
        (
            "deliveries",
            |r| r.publish.as_ref().map(|_| r.delivery.deliveries as f64),
            0,
        ),
        (
            "lost",
            |r| r.publish.as_ref().map(|_| r.delivery.tally.lost as f64),
            0,
        ),
        (
            "duplicated",
            |r| {
                r.publish
                    .as_ref()
                    .map(|_| r.delivery.tally.duplicates as f64)
            },
            0,
        ),
        (
            "out of order",
            |r| {
                r.publish
                    .as_ref()
                    .map(|_| r.delivery.tally.out_of_order as f64)
            },
            0,
        ),
        (
            "deliveries/s",
            |r| r.publish.as_ref().map(|_| r.delivery.per_s),
            0,
        ),
        (
            "peak deliveries/s",
            |r| r.publish.as_ref().map(|_| r.delivery.peak_per_s as f64),
            0,
        ),
        (
            "latency p50 (ms)",
            |r| r.publish.as_ref().map(|_| r.latency_ms.p50),
            2,
        ),
        (
            "latency p90 (ms)",
            |r| r.publish.as_ref().map(|_| r.latency_ms.p90),
            2,
        ),
        (
            "latency p99 (ms)",
            |r| r.publish.as_ref().map(|_| r.latency_ms.p99),
            2,
        ),
        (
            "latency p99.9 (ms)",
            |r| r.publish.as_ref().map(|_| r.latency_ms.p999),
            2,
        ),
        (
            "latency max (ms)",
            |r| r.publish.as_ref().map(|_| r.latency_ms.max),
            2,
        ),
        (
            "reconnects resumed",
            |r| Some(r.reconnects.resumed_with_cursor as f64),
            0,
        ),
        // Only idle runs start from a fresh server: elsewhere RSS growth
        // mixes in what earlier runs left behind.
        (
            "server RSS per connection (KiB)",
            |r| {
                (r.scenario == "idle")
                    .then_some(r.server_total.rss_per_connection_bytes)
                    .flatten()
                    .map(|b| b / 1024.0)
            },
            2,
        ),
        (
            "server CPU (s)",
            |r| (!r.servers.is_empty()).then_some(r.server_total.cpu_s),
            2,
        ),
        (
            "server CPU-s per million deliveries",
            |r| r.server_total.cpu_s_per_million,
            2,
        ),
        ("load tool CPU (s)", |r| Some(r.load.cpu_s), 2),
    ];
    for (label, get, digits) in rows {
        let values: Vec<Option<f64>> = reports.iter().map(get).collect();
        if values.iter().all(Option::is_none) {
            continue;
        }
        let _ = write!(o, "| {label} |");
        for v in &values {
            match v {
                Some(v) => {
                    let _ = write!(o, " {v:.digits$} |");
                }
                None => o.push_str(" – |"),
            }
        }
        if baseline {
            let base = values[values.len() - 1];
            for v in &values[..values.len() - 1] {
                match (v, base) {
                    (Some(v), Some(b)) if b != 0.0 => {
                        let _ = write!(o, " {:.2}× |", v / b);
                    }
                    _ => o.push_str(" – |"),
                }
            }
        }
        o.push('\n');
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_has_ratios() {
        let mut a = Report {
            kind: "herald".into(),
            ..Report::default()
        };
        a.server_total.cpu_s_per_million = Some(4.0);
        a.servers.push(ServerReport::default());
        let mut b = Report {
            kind: "nchan".into(),
            ..Report::default()
        };
        b.server_total.cpu_s_per_million = Some(8.0);
        b.servers.push(ServerReport::default());
        let md = markdown(&[a, b]);
        assert!(
            md.contains("| metric | herald | nchan | herald / nchan |"),
            "{md}"
        );
        assert!(
            md.contains("| server CPU-s per million deliveries | 4.00 | 8.00 | 0.50× |"),
            "{md}"
        );
        // Delivery rows are left out when nothing was published.
        assert!(!md.contains("latency p50"));
    }
}
