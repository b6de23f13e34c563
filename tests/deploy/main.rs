//! Herald deployed the way an operator would: nginx (the repository's
//! nginx.conf) in front of three nodes sharing Redis, Prometheus scraping
//! them, the `deploy/cluster` script — exercised with real software at both
//! ends: the npm `eventsource` client, headless Chromium, `promtool` and
//! `prometheus`.
//!
//! The cluster tests each start Redis, three nodes and nginx on free ports
//! and take turns (`HEAVY`), so the timing-sensitive ones (rolling restart,
//! failover) are not starved by a browser on a 2-core machine. Nothing waits
//! by sleeping: every wait polls a condition with a deadline.

#[path = "../common/mod.rs"]
mod common;

mod browser_client;
mod clients;
mod cluster;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use clients::{Browser, ClientReport, Clients};
use cluster::{listening, repo, Cluster, Prometheus, RedisPublisher};
use common::{get, token, Claims, Sse};

/// One cluster test at a time.
static HEAVY: Mutex<()> = Mutex::const_new(());

/// How long clients may take to (re)connect or catch up in these tests:
/// generous for a loaded 2-core machine; passing runs take a few seconds.
const CATCH_UP: Duration = Duration::from_secs(30);

/// `(name, token)` for `n` users `<prefix>00`, `<prefix>01`, ...
fn users(prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let sub = format!("{prefix}{i:02}");
            let jwt = token(&sub);
            (sub, jwt)
        })
        .collect()
}

/// Runs the `herald` binary (e.g. `publish --redis-url ...`) and asserts it
/// succeeded; returns its stdout.
async fn herald_cli(args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HERALD_") {
            cmd.env_remove(key);
        }
    }
    let output = cmd.args(args).output().await.expect("run herald");
    assert!(
        output.status.success(),
        "herald {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts every client got exactly `expected(client)`: nothing missing,
/// nothing twice, nothing meant for someone else, and never gave up.
fn assert_exactly(reports: &[ClientReport], expected: impl Fn(&ClientReport) -> Vec<String>) {
    let mut failures = Vec::new();
    for report in reports {
        let want = expected(report);
        if report.received != want {
            let mut got_count: HashMap<&str, usize> = HashMap::new();
            for data in &report.received {
                *got_count.entry(data).or_default() += 1;
            }
            let want_set: BTreeSet<&str> = want.iter().map(String::as_str).collect();
            let missing: Vec<&str> = want_set
                .iter()
                .filter(|w| !got_count.contains_key(**w))
                .copied()
                .collect();
            let twice: Vec<&str> = got_count
                .iter()
                .filter(|(_, &n)| n > 1)
                .map(|(d, _)| *d)
                .collect();
            let foreign: Vec<&str> = got_count
                .keys()
                .filter(|d| !want_set.contains(**d))
                .copied()
                .collect();
            failures.push(format!(
                "{}: got {} of {} messages; missing {missing:?}, duplicated {twice:?}, \
                 not for it {foreign:?} (readies {}, nodes {:?}, errors {})",
                report.name,
                report.received.len(),
                want.len(),
                report.readies,
                report.nodes,
                report.errors
            ));
        }
        if report.closed || report.resets > 0 {
            failures.push(format!(
                "{}: closed for good {} / herald.reset {}",
                report.name, report.closed, report.resets
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// The deploy files, checked with the real tools
// ---------------------------------------------------------------------------

fn run(cmd: &str, args: &[&str]) -> Output {
    std::process::Command::new(cmd)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd} (is it installed? tests/run installs it): {e}"))
}

fn assert_ok(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn nginx_conf_runs_as_committed_from_any_prefix() {
    let prefix = tempfile::tempdir().expect("prefix");
    std::fs::create_dir(prefix.path().join("logs")).expect("logs dir");
    let conf = repo().join("nginx.conf");
    let output = run(
        "nginx",
        &[
            "-t",
            "-p",
            prefix.path().to_str().expect("utf-8 path"),
            "-c",
            conf.to_str().expect("utf-8 path"),
            "-e",
            "logs/error.log",
        ],
    );
    assert_ok("nginx -t on the committed nginx.conf", &output);
    // Everything it needed was created under the prefix, nowhere else.
    assert!(prefix.path().join("client_body_temp").is_dir());

    // The stream settings the end-to-end tests cannot tell apart (the
    // nodes also send `X-Accel-Buffering: no`, and no test idles for an
    // hour) are pinned here, so a later edit cannot drop them silently.
    let text = std::fs::read_to_string(&conf).expect("read nginx.conf");
    let directives = |block: &str| -> Vec<String> {
        let start = text.find(block).unwrap_or_else(|| panic!("no `{block}`"));
        let body = &text[start..];
        let end = body.find("\n        }").expect("end of block");
        body[..end]
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    };
    let events = directives("location = /events {");
    for wanted in [
        "proxy_buffering off;",
        "proxy_cache off;",
        "proxy_read_timeout 1h;",
    ] {
        assert!(events.iter().any(|d| d == wanted), "/events lacks {wanted}");
    }
    let server = directives("server {");
    for wanted in [
        "proxy_http_version 1.1;",
        "proxy_set_header Connection \"\";",
    ] {
        assert!(server.iter().any(|d| d == wanted), "server lacks {wanted}");
    }
    // A POST is never sent to a second node after the first may have
    // applied it.
    assert!(
        !text
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .any(|l| l.contains("non_idempotent")),
        "proxy_next_upstream must not retry POSTs (non_idempotent)"
    );
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    assert_ok(
        "promtool check config",
        &run(
            "promtool",
            &["check", "config", "deploy/prometheus/prometheus.yml"],
        ),
    );
    assert_ok(
        "promtool check rules",
        &run(
            "promtool",
            &["check", "rules", "deploy/prometheus/alerts.yml"],
        ),
    );
    // Each alert fires on the series that should trigger it, and not on
    // the healthy ones next to them.
    assert_ok(
        "promtool test rules",
        &run(
            "promtool",
            &["test", "rules", "deploy/prometheus/alerts.test.yml"],
        ),
    );
}

/// Metric selectors in a PromQL expression: `(name, [(label, value)])`.
/// Skips functions, `by (...)` lists, ranges, strings and numbers.
fn selectors(expr: &str) -> Vec<(String, Vec<(String, String)>)> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        // Aggregations, which may come before their `by (...)`.
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_past = |i: &mut usize, close: char| {
        while *i < chars.len() && chars[*i] != close {
            *i += 1;
        }
        *i += 1;
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i += 1;
            skip_past(&mut i, c);
        } else if c == '[' {
            skip_past(&mut i, ']');
        } else if c.is_ascii_digit() || c == '$' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "._$".contains(chars[i]))
            {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j] == ' ' {
                j += 1;
            }
            let next = chars.get(j).copied();
            if ["by", "without", "on", "ignoring"].contains(&word.as_str()) {
                i = j;
                if next == Some('(') {
                    skip_past(&mut i, ')');
                }
            } else if KEYWORDS.contains(&word.as_str()) || next == Some('(') {
                // A keyword, or a function / aggregation name.
            } else {
                let mut labels = Vec::new();
                if next == Some('{') {
                    let end = (j..chars.len())
                        .find(|&k| chars[k] == '}')
                        .expect("closing }");
                    let inside: String = chars[j + 1..end].iter().collect();
                    for matcher in inside.split(',').filter(|m| !m.trim().is_empty()) {
                        let (key, value) = matcher.split_once('=').expect("label matcher");
                        labels.push((
                            key.trim().trim_end_matches(['!', '~']).to_string(),
                            value
                                .trim()
                                .trim_start_matches('~')
                                .trim_matches('"')
                                .to_string(),
                        ));
                    }
                    i = end + 1;
                }
                out.push((word, labels));
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every `expr` in the Grafana dashboard (at any depth).
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dashboard];
    while let Some(value) = stack.pop() {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(expr)) = map.get("expr") {
                    out.push(expr.clone());
                }
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    out
}

/// Every `expr:` in alerts.yml (single-line or a `|`/`>` block).
fn alert_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push(block.join(" "));
        } else {
            out.push(rest.trim_matches(['"', '\'']).to_string());
        }
    }
    out
}

/// A Grafana expr as Prometheus would run it.
fn as_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/dashboard.json"))
        .expect("read dashboard.json");
    serde_json::from_str(&text).expect("dashboard.json is JSON")
}

#[tokio::test]
async fn dashboard_and_alerts_query_only_metrics_a_node_exports() {
    // What a real node exports: every series name and its label pairs.
    let node = common::Node::start(&[]);
    let text = get(&node.admin_url("/metrics")).await.text();
    let mut exported: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (name, labels) = selectors(line.split_whitespace().next().expect("series"))
            .into_iter()
            .next()
            .expect("a series name");
        exported.entry(name).or_default().extend(labels);
    }
    assert!(exported.contains_key("herald_connections"), "{text}");

    let dashboard = dashboard();
    let dashboard_exprs = dashboard_exprs(&dashboard);
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml"))
        .expect("read alerts.yml");
    let alert_exprs = alert_exprs(&alerts);
    assert_eq!(alert_exprs.len(), alerts.matches("- alert:").count());

    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for expr in dashboard_exprs.iter().chain(&alert_exprs) {
        for (name, labels) in selectors(expr) {
            used.insert(name.clone());
            if name == "up" {
                continue; // Prometheus's own, per target
            }
            let Some(series_labels) = exported.get(&name) else {
                unknown.push(format!("{name} in {expr}"));
                continue;
            };
            for label in labels {
                if !series_labels.contains(&label) {
                    unknown.push(format!("{name}{{{}=\"{}\"}} in {expr}", label.0, label.1));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "queries use series no node exports:\n{}",
        unknown.join("\n")
    );

    // The panels and alerts are all there.
    for metric in [
        "herald_connections",
        "herald_messages_delivered_total",
        "herald_delivery_lag_seconds_bucket",
        "herald_connections_closed_total",
        "herald_replayed_messages_total",
        "herald_history_resets_total",
        "herald_redis_connected",
    ] {
        assert!(
            dashboard_exprs.iter().any(|e| e.contains(metric)),
            "no dashboard panel shows {metric}"
        );
    }
    for needle in [
        "up{job=\"herald\"} == 0",
        "herald_redis_connected == 0",
        "rate(herald_connections_closed_total{reason=\"slow\"}",
        "histogram_quantile(0.99",
    ] {
        assert!(
            alert_exprs.iter().any(|e| e.contains(needle)),
            "no alert on {needle}"
        );
    }
    // Panels point at the datasource the provisioning creates.
    let datasources = std::fs::read_to_string(
        repo().join("deploy/grafana/provisioning/datasources/prometheus.yml"),
    )
    .expect("read datasource provisioning");
    let uid = datasources
        .lines()
        .find_map(|l| l.trim().strip_prefix("uid:"))
        .expect("provisioned datasource uid")
        .trim();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert_eq!(panel["datasource"]["uid"], uid, "panel {}", panel["title"]);
    }
}

// ---------------------------------------------------------------------------
// Real clients through nginx
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_eventsource_clients_on_three_nodes_get_exactly_their_messages() {
    let _turn = HEAVY.lock().await;
    let cluster = Cluster::start(3, &[]).await;
    let users = users("user", 30);
    let mut clients = Clients::start(&cluster.url("/events"), &users);
    let nodes = clients.wait_readies(1, CATCH_UP).await;

    // nginx spread them over every node, and each node counts its own.
    let mut per_node = [0usize; 3];
    for id in &nodes {
        per_node[cluster.node_index(id).expect("a cluster node")] += 1;
    }
    assert!(
        per_node.iter().all(|&n| n > 0),
        "clients per node: {per_node:?}"
    );
    for (node, &n) in cluster.nodes.iter().zip(&per_node) {
        assert_eq!(node.metric("herald_connections").await, n as f64);
    }

    // Through nginx's POST /publish: a batch with one message per user, and
    // a broadcast.
    let batch: Vec<Value> = users
        .iter()
        .map(|(sub, _)| json!({"channel": format!("user:{sub}"), "event": "notice", "data": format!("nginx:{sub}")}))
        .collect();
    let reply = cluster.publish(&json!({ "messages": batch })).await;
    assert_eq!(reply["ids"].as_array().map(Vec::len), Some(30), "{reply}");
    cluster
        .publish(&json!({"channel": "broadcast", "event": "notice", "data": "broadcast:nginx"}))
        .await;
    // Straight into Redis, no node involved: the documented publish script
    // (as an app service in any language would), and `herald publish`.
    let mut redis = RedisPublisher::connect(&cluster.redis.url()).await;
    for (sub, _) in &users {
        redis
            .publish(&format!("user:{sub}"), "", &json!(format!("redis:{sub}")))
            .await;
    }
    let redis_url = cluster.redis.url();
    herald_cli(&[
        "publish",
        "--redis-url",
        &redis_url,
        "--channel",
        "broadcast",
        "--event",
        "notice",
        "broadcast:cli",
    ])
    .await;
    // Last, a JSON object: it arrives as compact JSON text, after the rest.
    cluster
        .publish(&json!({"channel": "broadcast", "data": {"last": true}}))
        .await;

    clients
        .wait_counts(CATCH_UP, |c| c.counts.iter().all(|&n| n >= 5))
        .await;
    let reports = clients.report().await;
    let mut sorted: Vec<ClientReport> = reports;
    for report in &mut sorted {
        // Per channel the order is the publish order; across channels it
        // is not specified, so compare as sets (duplicates still show).
        let mut pairs: Vec<(String, String)> = report
            .events
            .iter()
            .cloned()
            .zip(report.received.iter().cloned())
            .collect();
        pairs.sort();
        report.received = pairs.iter().map(|(e, d)| format!("{e} {d}")).collect();
    }
    assert_exactly(&sorted, |r| {
        let mut want = vec![
            "message redis:".to_string() + &r.name,
            "message {\"last\":true}".to_string(),
            "notice broadcast:cli".to_string(),
            "notice broadcast:nginx".to_string(),
            "notice nginx:".to_string() + &r.name,
        ];
        want.sort();
        want
    });
    for report in &sorted {
        assert_eq!(
            report.readies, 1,
            "{} reconnected: {:?}",
            report.name, report.nodes
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_a_notification_on_the_demo_page_through_nginx() {
    let _turn = HEAVY.lock().await;
    let cluster = Cluster::start(3, &[]).await;
    let sub = "browser-user";
    let jwt = Claims::new(sub)
        .publish(&[&format!("user:{sub}"), "broadcast"])
        .sign();
    let artifacts = repo().join("tests/artifacts");
    std::fs::create_dir_all(&artifacts).expect("tests/artifacts");
    let screenshot = artifacts.join("demo-page.png");
    let _ = std::fs::remove_file(&screenshot);

    let expect = "Your export is ready";
    let form = "Hello from the demo page's form";
    let mut browser = Browser::open(&json!({
        "base": cluster.url(""),
        "token": jwt,
        "expect": expect,
        "form": form,
        "screenshot": screenshot,
    }));
    let live = browser.next(Duration::from_secs(60)).await;
    assert_eq!(live["type"], "live", "{live}\n{}", browser.stderr_tail());
    assert_eq!(live["status"], "open");
    assert!(
        live["role"]
            .as_str()
            .is_some_and(|r| r.starts_with("This tab leads")),
        "{live}"
    );
    assert!(
        live["detail"]
            .as_str()
            .is_some_and(|d| d.contains("user:browser-user")),
        "{live}"
    );

    // Published elsewhere: an app service writing straight into Redis.
    let redis_url = cluster.redis.url();
    herald_cli(&[
        "publish",
        "--redis-url",
        &redis_url,
        "--channel",
        &format!("user:{sub}"),
        "--event",
        "notice",
        expect,
    ])
    .await;

    let done = browser.next(Duration::from_secs(60)).await;
    assert_eq!(done["type"], "done", "{done}\n{}", browser.stderr_tail());
    let items = done["items"].as_array().expect("items");
    for text in [expect, form] {
        assert!(
            items
                .iter()
                .any(|i| i["event"] == "notice" && i["data"] == text),
            "the page does not show {text:?}: {items:?}"
        );
    }
    assert!(
        done["publishResult"]
            .as_str()
            .is_some_and(|r| r.starts_with("Published to user:browser-user")),
        "{done}"
    );
    assert!(
        browser.wait(Duration::from_secs(30)).await,
        "browser.mjs failed"
    );
    let png = std::fs::read(&screenshot).expect("screenshot saved");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_delivers_every_message_exactly_once() {
    let _turn = HEAVY.lock().await;
    // --retry 1s: a draining node sends clients retry: 0.5-2s (jittered).
    let mut cluster = Cluster::start(3, &["--retry", "1s"]).await;
    let users = users("roll", 30);
    let mut clients = Clients::start(&cluster.url("/events"), &users);
    let first = clients.wait_readies(1, CATCH_UP).await;
    let on_node: BTreeSet<usize> = first
        .iter()
        .filter_map(|id| cluster.node_index(id))
        .collect();
    assert_eq!(on_node.len(), 3, "clients on every node before the restart");

    const MESSAGES: usize = 1000;
    const RESTART_AT: [usize; 3] = [150, 450, 750];
    let (progress_tx, progress) = watch::channel(0usize);
    let mut redis = RedisPublisher::connect(&cluster.redis.url()).await;
    let started = Instant::now();

    // 100 messages a second, straight into Redis (as the app would), ...
    let publish = async {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for k in 0..MESSAGES {
            tick.tick().await;
            redis
                .publish("broadcast", "notice", &json!(format!("m{k:04}")))
                .await;
            progress_tx.send_replace(k + 1);
        }
        started.elapsed()
    };
    // ... while each node in turn gets SIGTERM, drains, exits and starts
    // again on the same ports.
    let nodes = &mut cluster.nodes;
    let restart = async {
        let mut log = Vec::new();
        let mut progress = progress.clone();
        for (node, at) in nodes.iter_mut().zip(RESTART_AT) {
            progress
                .wait_for(|&n| n >= at)
                .await
                .expect("publisher alive");
            let terminated_at = *progress.borrow();
            node.terminate(Duration::from_secs(15)).await;
            node.start().await;
            log.push((node.number, terminated_at, *progress.borrow()));
        }
        log
    };
    let (publish_took, restarts) = tokio::join!(publish, restart);
    eprintln!("published {MESSAGES} in {publish_took:?}; restarts (node, sent at, ready at): {restarts:?}");
    for &(number, terminated_at, _) in &restarts {
        assert!(
            terminated_at < MESSAGES,
            "node{number} was restarted after publishing ended: {restarts:?}"
        );
    }

    redis.publish("broadcast", "notice", &json!("fence")).await;
    let counts = clients
        .wait_counts(CATCH_UP, |c| c.counts.iter().all(|&n| n > MESSAGES))
        .await;
    eprintln!("caught up {:?} after the start", started.elapsed());
    // Every client was on a node that restarted, so each reconnected at
    // least once, resuming with Last-Event-ID.
    assert!(
        counts.readies.iter().all(|&r| r >= 2),
        "readies: {:?}",
        counts.readies
    );
    let reports = clients.report().await;
    let want: Vec<String> = (0..MESSAGES)
        .map(|k| format!("m{k:04}"))
        .chain(["fence".to_string()])
        .collect();
    assert_exactly(&reports, |_| want.clone());
    assert!(
        cluster.metric_sum("herald_replayed_messages_total").await > 0.0,
        "no node replayed anything: clients never resumed from history"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_clients_reconnect_through_nginx_and_lose_nothing() {
    let _turn = HEAVY.lock().await;
    let mut cluster = Cluster::start(3, &["--retry", "1s"]).await;
    let users = users("fail", 30);
    let mut clients = Clients::start(&cluster.url("/events"), &users);
    let first = clients.wait_readies(1, CATCH_UP).await;
    let victim = 1;
    let victim_id = cluster.nodes[victim].id().to_string();
    let orphans: Vec<usize> = (0..users.len())
        .filter(|&c| first[c] == victim_id)
        .collect();
    assert!(!orphans.is_empty(), "no client on node2: {first:?}");

    for k in 0..10 {
        cluster
            .publish(&json!({"channel": "broadcast", "data": format!("before{k:02}")}))
            .await;
    }
    clients
        .wait_counts(CATCH_UP, |c| c.counts.iter().all(|&n| n >= 10))
        .await;

    // SIGKILL: no drain, no retry: hint; the sockets just die.
    cluster.nodes[victim].kill();
    let killed = Instant::now();
    // Publishing through nginx goes on without a hiccup (the dead node
    // refuses the connection, nginx uses another) ...
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    for k in 0..40 {
        tick.tick().await;
        cluster
            .publish(&json!({"channel": "broadcast", "data": format!("during{k:02}")}))
            .await;
    }
    for &c in &orphans {
        let sub = &users[c].0;
        cluster
            .publish(&json!({"channel": format!("user:{sub}"), "data": format!("for-{sub}")}))
            .await;
    }
    // ... and the orphans come back through nginx, on the other nodes.
    clients.wait_readies_of(&orphans, 2, CATCH_UP).await;
    let mut slowest = Duration::ZERO;
    for ready in clients
        .readies
        .iter()
        .filter(|r| orphans.contains(&r.client))
    {
        if ready.node != victim_id {
            slowest = slowest.max(ready.at.duration_since(killed));
        }
        assert!(
            ready.at < killed || ready.node != victim_id,
            "client {} reconnected to the dead node",
            ready.client
        );
    }
    eprintln!(
        "{} orphans reconnected, the last after {slowest:?}",
        orphans.len()
    );
    assert!(
        slowest < Duration::from_secs(10),
        "orphans took {slowest:?} to reconnect"
    );

    cluster
        .publish(&json!({"channel": "broadcast", "data": "fence"}))
        .await;
    clients
        .wait_counts(CATCH_UP, |c| {
            (0..c.counts.len()).all(|i| c.counts[i] >= if orphans.contains(&i) { 52 } else { 51 })
        })
        .await;
    let mut reports = clients.report().await;
    for (i, report) in reports.iter_mut().enumerate() {
        if orphans.contains(&i) {
            // Its own message, exactly once (it is on another channel than
            // the broadcasts, so its place among them is not specified).
            let mine = format!("for-{}", report.name);
            let copies = report.received.iter().filter(|d| **d == mine).count();
            assert_eq!(copies, 1, "{}: {:?}", report.name, report.received);
            report.received.retain(|d| *d != mine);
        } else {
            assert_eq!(
                report.readies, 1,
                "{} was disturbed: {:?}",
                report.name, report.nodes
            );
        }
    }
    let broadcasts: Vec<String> = (0..10)
        .map(|k| format!("before{k:02}"))
        .chain((0..40).map(|k| format!("during{k:02}")))
        .chain(["fence".to_string()])
        .collect();
    assert_exactly(&reports, |_| broadcasts.clone());
}

// ---------------------------------------------------------------------------
// Monitoring
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_node_and_sees_every_connection() {
    let _turn = HEAVY.lock().await;
    let cluster = Cluster::start(3, &[]).await;
    // 30 browsers' worth of streams through nginx, with the cookie.
    let mut streams = Vec::new();
    for (sub, jwt) in users("watched", 30) {
        let cookie = format!("herald_token={jwt}");
        let mut sse = Sse::connect(&cluster.url("/events"), &[("cookie", &cookie)])
            .await
            .unwrap_or_else(|r| panic!("{sub}: {} {}", r.status, r.text()));
        sse.wait_ready(CATCH_UP).await;
        streams.push(sse);
    }

    let targets: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.admin_port))
        .collect();
    let prometheus = Prometheus::start(
        cluster.dir.path(),
        &targets,
        &[repo().join("deploy/prometheus/alerts.yml")],
    )
    .await;

    // herald_connections for each node, as Prometheus scraped it, adds up
    // to the clients; and each node's value is what that node reports.
    let deadline = Instant::now() + CATCH_UP;
    let per_instance = loop {
        let data = prometheus.query("herald_connections").await;
        let per_instance: BTreeMap<String, f64> = data["result"]
            .as_array()
            .expect("result")
            .iter()
            .map(|r| {
                (
                    r["metric"]["instance"]
                        .as_str()
                        .expect("instance")
                        .to_string(),
                    r["value"][1]
                        .as_str()
                        .expect("value")
                        .parse()
                        .expect("number"),
                )
            })
            .collect();
        let sum: f64 = per_instance.values().sum();
        if per_instance.len() == 3 && sum == streams.len() as f64 {
            break per_instance;
        }
        assert!(
            Instant::now() < deadline,
            "herald_connections in Prometheus: {per_instance:?} (want 3 nodes summing to {})\n{}",
            streams.len(),
            prometheus.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for node in &cluster.nodes {
        let instance = format!("127.0.0.1:{}", node.admin_port);
        assert_eq!(
            per_instance.get(&instance).copied(),
            Some(node.metric("herald_connections").await),
            "{instance}"
        );
    }
    let targets = prometheus.api("targets").await;
    for target in targets["activeTargets"].as_array().expect("targets") {
        assert_eq!(target["health"], "up", "{target}");
    }

    // The alert rules load and evaluate, and a healthy cluster fires none.
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let rules = prometheus.api("rules").await;
        let rules: Vec<&Value> = rules["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().expect("rules"))
            .collect();
        assert_eq!(rules.len(), 6, "{rules:?}");
        if rules.iter().all(|r| r["health"] == "ok") {
            for rule in &rules {
                assert_eq!(rule["state"], "inactive", "{rule}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all healthy: {rules:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every dashboard panel's query runs and has data for this cluster.
    let exprs = dashboard_exprs(&dashboard());
    let deadline = Instant::now() + CATCH_UP;
    let mut empty = exprs.clone();
    while !empty.is_empty() {
        let mut still = Vec::new();
        for expr in &empty {
            let data = prometheus.query(&as_promql(expr)).await;
            if data["result"].as_array().is_none_or(|r| r.is_empty()) {
                still.push(expr.clone());
            }
        }
        empty = still;
        assert!(
            empty.is_empty() || Instant::now() < deadline,
            "dashboard queries with no data: {empty:#?}"
        );
        if !empty.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

// ---------------------------------------------------------------------------
// deploy/cluster
// ---------------------------------------------------------------------------

/// A base port for `deploy/cluster up --port P` whose derived ports (nodes
/// P+1.., admin P+1101.., Redis P-1700, Prometheus P+1010) are all free.
fn free_base_port(nodes: u16) -> u16 {
    for _ in 0..50 {
        let base: u16 = rand::random_range(20_000..40_000);
        let mut ports = vec![base, base - 1700, base + 1010];
        for i in 1..=nodes {
            ports.extend([base + i, base + 1100 + i]);
        }
        if ports
            .iter()
            .all(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            return base;
        }
    }
    panic!("no free port range for deploy/cluster");
}

/// Runs `deploy/cluster ARGS` with the test build of herald.
fn cluster_script(args: &[&str]) -> Output {
    std::process::Command::new(repo().join("deploy/cluster"))
        .args(args)
        .env("HERALD_BIN", env!("CARGO_BIN_EXE_herald"))
        .current_dir(repo())
        .output()
        .expect("run deploy/cluster")
}

/// Runs `deploy/cluster down` on drop, so a failed test leaves nothing
/// running.
struct ScriptCluster<'a>(&'a Path);

impl Drop for ScriptCluster<'_> {
    fn drop(&mut self) {
        let _ = cluster_script(&["down", "--dir", self.0.to_str().unwrap_or_default()]);
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The recorded PIDs in a run directory, by process name.
fn recorded_pids(dir: &Path) -> BTreeMap<String, u32> {
    std::fs::read_dir(dir.join("pids"))
        .expect("pids dir")
        .map(|entry| {
            let path = entry.expect("dir entry").path();
            let name = path
                .file_stem()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path).expect("pid file");
            let pid = text
                .split_whitespace()
                .next()
                .expect("pid")
                .parse()
                .expect("pid");
            (name, pid)
        })
        .collect()
}

/// The process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|s| !s.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_cluster_script_starts_reports_restarts_and_stops_a_cluster() {
    let _turn = HEAVY.lock().await;
    let run_dir = tempfile::tempdir().expect("run dir");
    let dir = run_dir.path().to_str().expect("utf-8").to_string();
    let base = free_base_port(3);
    let port = base.to_string();

    let up = cluster_script(&[
        "up", "--port", &port, "--dir", &dir, "--", "--retry", "500ms",
    ]);
    let _down = ScriptCluster(run_dir.path());
    assert_ok("deploy/cluster up", &up);
    let out = stdout(&up);
    let url = format!("http://127.0.0.1:{base}");
    assert!(out.contains(&format!("URL:         {url}")), "{out}");
    assert!(
        out.contains(&format!("demo page:   {url}/#token=")),
        "{out}"
    );
    assert!(out.contains(&format!("{dir}/logs/")), "{out}");
    let demo_token = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("demo token:"))
        .expect("a demo token line")
        .trim()
        .to_string();

    let pids = recorded_pids(run_dir.path());
    let mut expected = BTreeSet::from(["nginx", "node1", "node2", "node3", "redis"]);
    let with_prometheus = run("sh", &["-c", "command -v prometheus"]).status.success();
    if with_prometheus {
        expected.insert("prometheus");
        assert!(
            out.contains(&format!("http://127.0.0.1:{}", base + 1010)),
            "{out}"
        );
        let ready = get(&format!("http://127.0.0.1:{}/-/ready", base + 1010)).await;
        assert_eq!(ready.status, StatusCode::OK);
    }
    assert_eq!(
        pids.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        expected
    );
    assert!(pids.values().all(|&pid| alive(pid)), "{pids:?}");

    // What a user of the printed URL gets: the demo page, and the stream
    // with the demo token as the browser's cookie; publishing works too.
    let page = get(&format!("{url}/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text().contains("Herald demo"));
    let cookie = format!("herald_token={demo_token}");
    let mut sse = Sse::connect(&format!("{url}/events"), &[("cookie", &cookie)])
        .await
        .unwrap_or_else(|r| panic!("GET /events through nginx: {} {}", r.status, r.text()));
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    sse.wait_ready(CATCH_UP).await;
    let auth = common::bearer(&demo_token);
    let published = common::request(
        hyper::Method::POST,
        &format!("{url}/publish"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        json!({"channel": "user:demo", "event": "notice", "data": "hello from curl"}).to_string(),
    )
    .await;
    assert_eq!(published.status, StatusCode::OK, "{}", published.text());
    let event = sse.next_data(CATCH_UP).await.expect("the published notice");
    assert_eq!((event.name(), event.data()), ("notice", "hello from curl"));

    // Metrics and health stay private: not through nginx, only on the
    // nodes' loopback admin ports.
    for path in ["/metrics", "/readyz", "/healthz"] {
        assert_eq!(
            get(&format!("{url}{path}")).await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    let metrics = get(&format!("http://127.0.0.1:{}/metrics", base + 1101)).await;
    assert!(metrics.text().contains("herald_connections"));

    let status = cluster_script(&["status", "--dir", &dir]);
    assert_ok("deploy/cluster status", &status);
    let report = stdout(&status);
    assert_eq!(
        report.matches(" ready, public 127.0.0.1:").count(),
        3,
        "{report}"
    );
    assert!(
        report.contains(&format!("up, http://127.0.0.1:{base}/")),
        "{report}"
    );

    // A rolling restart of node2: a new process on the same ports, ready.
    let restart = cluster_script(&["restart", "2", "--dir", &dir]);
    assert_ok("deploy/cluster restart 2", &restart);
    let after = recorded_pids(run_dir.path());
    assert_ne!(after["node2"], pids["node2"]);
    assert!(!alive(pids["node2"]), "the old node2 is gone");
    assert_eq!(after["node1"], pids["node1"]);
    assert_ok(
        "status after restart",
        &cluster_script(&["status", "--dir", &dir]),
    );
    assert_eq!(
        get(&format!("http://127.0.0.1:{}/readyz", base + 1102))
            .await
            .status,
        StatusCode::OK
    );

    // down stops exactly what up started.
    drop(sse);
    let down = cluster_script(&["down", "--dir", &dir]);
    assert_ok("deploy/cluster down", &down);
    for (name, pid) in &after {
        assert!(!alive(*pid), "{name} (pid {pid}) still running after down");
    }
    for p in [base, base + 1, base + 2, base + 3, base + 1101, base - 1700] {
        assert!(!listening(p), "port {p} still open after down");
    }
    let status = cluster_script(&["status", "--dir", &dir]);
    assert!(
        !status.status.success(),
        "status after down: {}",
        stdout(&status)
    );
}
