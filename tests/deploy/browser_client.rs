//! herald.js in real Chromium, several tabs of one user, through nginx in
//! front of three nodes sharing Redis (`tests/e2e/tabs.mjs` drives the
//! browser). What is proven is what a user of the tabs sees: every
//! notification, once, in order — while tabs close and reload, a node dies
//! and the cookie expires — and what the operator sees: one connection for
//! all of a user's tabs.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::clients::Script;
use crate::cluster::{Cluster, RedisPublisher};
use crate::common::{wait_until, Claims};
use crate::HEAVY;

/// How long tabs may take to connect or catch up (a loaded 2-core machine
/// with a browser; passing runs take a fraction of it).
const SETTLE: Duration = Duration::from_secs(20);

/// What one tab saw (tabs.mjs keeps it across reloads).
#[derive(Debug, Deserialize)]
struct Tab {
    /// `data` of every `notice`, in arrival order.
    received: Vec<String>,
    /// `meta.channel` of each of them.
    channels: Vec<Option<String>>,
    /// The node of each `herald.ready` this tab's own connection got.
    readies: Vec<String>,
    states: Vec<String>,
    leader: bool,
    /// When this tab last became leader (ms since the epoch, browser side).
    #[serde(rename = "leaderSince")]
    leader_since: Option<u64>,
    refreshes: usize,
    expired: usize,
    loads: usize,
    /// How the page reached the origin (`h2`, `http/1.1`).
    protocol: Option<String>,
    errors: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Report {
    tabs: BTreeMap<String, Tab>,
}

impl Report {
    fn tab(&self, name: &str) -> &Tab {
        self.tabs
            .get(name)
            .unwrap_or_else(|| panic!("no tab {name}"))
    }

    fn leaders(&self) -> Vec<&str> {
        self.tabs
            .iter()
            .filter(|(_, t)| t.leader)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    fn state(&self, name: &str) -> Option<&str> {
        self.tab(name).states.last().map(String::as_str)
    }
}

/// Whether the cluster's `herald_connections` reaches `n` within [`SETTLE`].
async fn connections_become(cluster: &Cluster, n: f64) -> bool {
    wait_until(SETTLE, || async {
        cluster.metric_sum("herald_connections").await == n
    })
    .await
}

/// Chromium with tabs on the test page (`tabs.mjs`).
struct Tabs {
    script: Script,
}

impl Tabs {
    /// Starts the browser; every tab's cookie is `token`, and the page's
    /// `refresh()` sets `fresh`.
    async fn start(base: &str, token: &str, fresh: &str) -> Tabs {
        Tabs::launch(json!({ "base": base, "token": token, "fresh": fresh })).await
    }

    async fn launch(config: Value) -> Tabs {
        let mut tabs = Tabs {
            script: Script::spawn("tabs.mjs", &config),
        };
        tabs.expect("started").await;
        tabs
    }

    async fn expect(&mut self, kind: &str) -> Value {
        let line = self.script.next(Duration::from_secs(60)).await;
        match line {
            Some(line) if line["type"] == kind => line,
            other => panic!(
                "tabs.mjs said {other:?}, wanted `{kind}`\nstderr:\n{}",
                self.script.stderr_tail()
            ),
        }
    }

    async fn command(&mut self, command: Value, reply: &str) -> Value {
        self.script.send(&command.to_string()).await;
        self.expect(reply).await
    }

    async fn open(&mut self, tab: &str, options: Value) {
        self.command(
            json!({"cmd": "open", "tab": tab, "options": options}),
            "opened",
        )
        .await;
    }

    async fn close(&mut self, tab: &str) {
        self.command(json!({"cmd": "close", "tab": tab}), "closed")
            .await;
    }

    async fn reload(&mut self, tab: &str) {
        self.command(json!({"cmd": "reload", "tab": tab}), "reloaded")
            .await;
    }

    /// A reload in two steps: the page leaves (to `about:blank`)…
    async fn away(&mut self, tab: &str) {
        self.command(json!({"cmd": "away", "tab": tab}), "away")
            .await;
    }

    /// … and comes back.
    async fn back(&mut self, tab: &str) {
        self.command(json!({"cmd": "back", "tab": tab}), "back")
            .await;
    }

    async fn set_cookie(&mut self, value: &str) {
        self.command(json!({"cmd": "cookie", "value": value}), "cookie")
            .await;
    }

    async fn report(&mut self) -> Report {
        let line = self.command(json!({"cmd": "report"}), "report").await;
        let report: Report = serde_json::from_value(line).expect("report line");
        for (name, tab) in &report.tabs {
            assert!(
                tab.errors.is_empty(),
                "{name}: page errors {:?}",
                tab.errors
            );
        }
        report
    }

    /// Polls the report until `done`; panics with it after `timeout`.
    async fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Report) -> bool,
    ) -> Report {
        let deadline = Instant::now() + timeout;
        loop {
            let report = self.report().await;
            if done(&report) {
                return report;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}: {report:#?}\nstderr:\n{}",
                self.script.stderr_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the tabs in `names` all say 'open' and exactly one of
    /// `names` leads; returns its name.
    async fn wait_open(&mut self, names: &[&str]) -> String {
        let report = self
            .wait("tabs open with one leader", SETTLE, |r| {
                names.iter().all(|n| r.state(n) == Some("open"))
                    && r.leaders().len() == 1
                    && names.contains(&r.leaders()[0])
            })
            .await;
        report.leaders()[0].to_string()
    }

    async fn quit(mut self) {
        self.script.send(r#"{"cmd":"quit"}"#).await;
    }
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|k| format!("{prefix}{k:04}")).collect()
}

/// Publishes `data` one after the other to `channel` straight into Redis
/// (as an app service would), every `every`.
async fn publish_paced(
    redis: &mut RedisPublisher,
    channel: &str,
    data: &[String],
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for item in data {
        tick.tick().await;
        redis.publish(channel, "notice", &json!(item)).await;
    }
}

/// Asserts `tab` shows exactly `want`: all, in order, none twice.
fn assert_shows_exactly(name: &str, tab: &Tab, want: &[String]) {
    if tab.received == want {
        return;
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    for data in &tab.received {
        *count.entry(data).or_default() += 1;
    }
    let missing: Vec<&String> = want
        .iter()
        .filter(|w| !count.contains_key(w.as_str()))
        .collect();
    let twice: Vec<&&str> = count
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(d, _)| d)
        .collect();
    panic!(
        "{name}: {} of {} shown; missing {missing:?}, twice {twice:?}; readies {:?}, states {:?}",
        tab.received.len(),
        want.len(),
        tab.readies,
        tab.states
    );
}

fn user_token(sub: &str) -> String {
    Claims::new(sub).sign()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_tabs_hold_one_connection_and_every_tab_shows_every_event() {
    let _turn = HEAVY.lock().await;
    let cluster = Cluster::start(3, &[]).await;
    let sub = "tabs-share";
    let jwt = user_token(sub);
    let mut tabs = Tabs::start(&cluster.url(""), &jwt, &jwt).await;
    let names = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"];
    for name in names {
        tabs.open(name, json!({"share": true})).await;
    }
    tabs.wait_open(&names).await;
    // One stream on the whole cluster for eight tabs (and it stays one: a
    // second would show up here before the messages below are through).
    assert!(
        connections_become(&cluster, 1.0).await,
        "8 shared tabs, one connection: {}",
        cluster.metric_sum("herald_connections").await
    );

    let mut redis = RedisPublisher::connect(&cluster.redis.url()).await;
    let want = numbered("s", 200);
    publish_paced(
        &mut redis,
        &format!("user:{sub}"),
        &want,
        Duration::from_millis(5),
    )
    .await;
    let report = tabs
        .wait("every tab has all 200", SETTLE, |r| {
            r.tabs.values().all(|t| t.received.len() >= want.len())
        })
        .await;
    for name in names {
        let tab = report.tab(name);
        assert_shows_exactly(name, tab, &want);
        assert!(
            tab.channels
                .iter()
                .all(|c| c.as_deref() == Some("user:tabs-share")),
            "{name}: meta.channel {:?}",
            tab.channels
        );
    }
    let readies: usize = report.tabs.values().map(|t| t.readies.len()).sum();
    assert_eq!(readies, 1, "followers never connect: {report:#?}");
    assert_eq!(cluster.metric_sum("herald_connections").await, 1.0);
    tabs.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_leader_tab_hands_over_within_two_seconds_and_loses_nothing() {
    let _turn = HEAVY.lock().await;
    let cluster = Cluster::start(3, &[]).await;
    let sub = "tabs-handover";
    let jwt = user_token(sub);
    let mut tabs = Tabs::start(&cluster.url(""), &jwt, &jwt).await;
    let names = ["a", "b", "c", "d"];
    for name in names {
        tabs.open(name, json!({"share": true})).await;
    }
    let leader = tabs.wait_open(&names).await;
    let rest: Vec<&str> = names.iter().copied().filter(|n| *n != leader).collect();

    // 300 messages at 20/s; the leader tab closes a third of the way in.
    let mut redis = RedisPublisher::connect(&cluster.redis.url()).await;
    let want = numbered("h", 300);
    let channel = format!("user:{sub}");
    let publishing = publish_paced(&mut redis, &channel, &want, Duration::from_millis(50));
    let handover = async {
        tabs.wait("100 published before the close", SETTLE, |r| {
            r.tab(&leader).received.len() >= 100
        })
        .await;
        let line = tabs
            .command(json!({"cmd": "close", "tab": leader}), "closed")
            .await;
        let closed_at = line["at"].as_u64().expect("closed at");
        let report = tabs
            .wait("a follower leads", SETTLE, |r| r.leaders().len() == 1)
            .await;
        let new_leader = report.leaders()[0].to_string();
        let since = report.tab(&new_leader).leader_since.expect("leader since");
        (
            new_leader,
            Duration::from_millis(since.saturating_sub(closed_at)),
        )
    };
    let ((new_leader, took), ()) = tokio::join!(handover, publishing);
    eprintln!("{leader} closed; {new_leader} led {took:?} later");
    assert!(rest.contains(&new_leader.as_str()));
    assert!(took < Duration::from_secs(2), "handover took {took:?}");

    let report = tabs
        .wait("the remaining tabs have all 300", SETTLE, |r| {
            rest.iter().all(|n| r.tab(n).received.len() >= want.len())
        })
        .await;
    for name in &rest {
        assert_shows_exactly(name, report.tab(name), &want);
    }
    assert_eq!(
        report.tab(&new_leader).readies.len(),
        1,
        "the new leader connected once"
    );
    assert!(
        connections_become(&cluster, 1.0).await,
        "one connection after the handover: {}",
        cluster.metric_sum("herald_connections").await
    );
    tabs.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_tab_resumes_from_its_cursor_and_a_reloaded_follower_gets_new_events_only() {
    let _turn = HEAVY.lock().await;
    let cluster = Cluster::start(3, &[]).await;
    let sub = "tabs-reload";
    let jwt = user_token(sub);
    let channel = format!("user:{sub}");
    let mut redis = RedisPublisher::connect(&cluster.redis.url()).await;
    let mut tabs = Tabs::start(&cluster.url(""), &jwt, &jwt).await;

    // A lone tab (its own connection) reloads while 100 messages go out at
    // 20/s, some of them while the page is away.
    tabs.open("lone", json!({"share": true, "persist": "session"}))
        .await;
    tabs.wait_open(&["lone"]).await;
    let want = numbered("r", 100);
    let reload = async {
        tabs.wait("30 shown before the reload", SETTLE, |r| {
            r.tab("lone").received.len() >= 30
        })
        .await;
        tabs.reload("lone").await;
    };
    tokio::join!(
        reload,
        publish_paced(&mut redis, &channel, &want, Duration::from_millis(50))
    );
    let report = tabs
        .wait("the reloaded tab has all 100", SETTLE, |r| {
            r.tab("lone").received.len() >= want.len()
        })
        .await;
    let lone = report.tab("lone");
    assert_eq!(lone.loads, 2);
    assert_eq!(lone.readies.len(), 2, "one connection per page load");
    assert_shows_exactly("lone", lone, &want);

    // Whether that reload missed anything depends on how fast the page came
    // back. This one misses 10 for certain: they are published once its
    // stream is closed, so only a resume by cursor can show them.
    tabs.away("lone").await;
    assert!(
        connections_become(&cluster, 0.0).await,
        "the page left: its stream closed"
    );
    let replayed_before = cluster.metric_sum("herald_replayed_messages_total").await;
    let missed = numbered("m", 10);
    publish_paced(&mut redis, &channel, &missed, Duration::from_millis(20)).await;
    tabs.back("lone").await;
    let want: Vec<String> = [&want[..], &missed].concat();
    let report = tabs
        .wait("the tab that was away has all 110", SETTLE, |r| {
            r.tab("lone").received.len() >= want.len()
        })
        .await;
    assert_shows_exactly("lone", report.tab("lone"), &want);
    let replayed = cluster.metric_sum("herald_replayed_messages_total").await - replayed_before;
    assert!(
        replayed >= missed.len() as f64,
        "the page came back and resumed by replay: {replayed} replayed"
    );

    // A second tab follows; it reloads while the first leads: it comes back
    // as a follower and shows only what is published after it is back.
    tabs.open("follower", json!({"share": true, "persist": "session"}))
        .await;
    tabs.wait("the follower is open", SETTLE, |r| {
        r.state("follower") == Some("open") && r.leaders() == ["lone"]
    })
    .await;
    let before = numbered("f", 10);
    publish_paced(&mut redis, &channel, &before, Duration::from_millis(20)).await;
    tabs.wait("the follower shows the first 10", SETTLE, |r| {
        r.tab("follower").received.len() >= 10
    })
    .await;
    // Published while the follower's page is gone (a reload, paused).
    tabs.away("follower").await;
    let gap = numbered("g", 10);
    publish_paced(&mut redis, &channel, &gap, Duration::from_millis(20)).await;
    tabs.wait("the leader shows the gap", SETTLE, |r| {
        r.tab("lone").received.last() == gap.last()
    })
    .await;
    tabs.back("follower").await;
    tabs.wait("the follower is back", SETTLE, |r| {
        r.tab("follower").loads == 2 && r.state("follower") == Some("open")
    })
    .await;
    let after = numbered("n", 10);
    publish_paced(&mut redis, &channel, &after, Duration::from_millis(20)).await;
    let report = tabs
        .wait("both tabs show the last 10", SETTLE, |r| {
            ["lone", "follower"]
                .iter()
                .all(|n| r.tab(n).received.last() == after.last())
        })
        .await;
    let follower = report.tab("follower");
    assert!(follower.readies.is_empty(), "a follower never connects");
    // What it shows: the first 10, then only what came after it was back —
    // nothing of the gap, nothing twice. The leader shows everything.
    assert_shows_exactly("follower", follower, &[&before[..], &after].concat());
    let everything: Vec<String> = [&want[..], &before, &gap, &after].concat();
    assert_shows_exactly("lone", report.tab("lone"), &everything);
    assert_eq!(cluster.metric_sum("herald_connections").await, 1.0);
    tabs.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_node_dies_and_the_tabs_lose_nothing() {
    let _turn = HEAVY.lock().await;
    let mut cluster = Cluster::start(3, &[]).await;
    let sub = "tabs-kill";
    let jwt = user_token(sub);
    let channel = format!("user:{sub}");
    let mut tabs = Tabs::start(&cluster.url(""), &jwt, &jwt).await;
    for name in ["a", "b"] {
        tabs.open(name, json!({"share": true})).await;
    }
    let leader = tabs.wait_open(&["a", "b"]).await;
    let report = tabs.report().await;
    let node = report.tab(&leader).readies[0].clone();
    let victim = cluster.node_index(&node).expect("the leader's node");

    let mut redis = RedisPublisher::connect(&cluster.redis.url()).await;
    let first = numbered("k", 20);
    publish_paced(&mut redis, &channel, &first, Duration::from_millis(20)).await;
    tabs.wait("20 shown", SETTLE, |r| {
        r.tabs.values().all(|t| t.received.len() >= 20)
    })
    .await;
    cluster.nodes[victim].kill();
    let during = numbered("l", 40);
    publish_paced(&mut redis, &channel, &during, Duration::from_millis(25)).await;
    let want: Vec<String> = [first, during].concat();
    let report = tabs
        .wait("all 60 after the node died", SETTLE, |r| {
            r.tabs.values().all(|t| t.received.len() >= want.len())
        })
        .await;
    for (name, tab) in &report.tabs {
        assert_shows_exactly(name, tab, &want);
    }
    let leader_tab = report.tab(report.leaders()[0]);
    assert!(
        leader_tab.readies.len() >= 2 && !leader_tab.readies[1..].contains(&node),
        "reconnected through nginx to another node: {:?}",
        leader_tab.readies
    );
    tabs.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_cookie_is_refreshed_and_the_stream_resumes() {
    let _turn = HEAVY.lock().await;
    let cluster = Cluster::start(3, &[]).await;
    let sub = "tabs-expiry";
    // The cookie expires a few seconds in; refresh() sets a one-hour one.
    let fresh = user_token(sub);
    let channel = format!("user:{sub}");
    let mut tabs = Tabs::start(&cluster.url(""), &fresh, &fresh).await;
    tabs.set_cookie(&Claims::new(sub).exp_in(5).sign()).await;
    tabs.open("a", json!({"share": true})).await;
    tabs.wait_open(&["a"]).await;

    // Published at 10/s across the expiry.
    let mut redis = RedisPublisher::connect(&cluster.redis.url()).await;
    let want = numbered("e", 80);
    publish_paced(&mut redis, &channel, &want, Duration::from_millis(100)).await;
    let report = tabs
        .wait("all 80 across the expiry", SETTLE, |r| {
            r.tab("a").received.len() >= want.len()
        })
        .await;
    let tab = report.tab("a");
    assert_eq!(tab.expired, 1, "herald.expired arrived: {tab:?}");
    assert_eq!(tab.refreshes, 1, "refresh() was awaited once: {tab:?}");
    assert_eq!(tab.readies.len(), 2, "and the stream resumed: {tab:?}");
    assert_shows_exactly("a", tab, &want);
    tabs.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_on_reconnect_is_refreshed_and_the_stream_resumes() {
    let _turn = HEAVY.lock().await;
    let mut cluster = Cluster::start(3, &[]).await;
    let sub = "tabs-401";
    let jwt = user_token(sub);
    let channel = format!("user:{sub}");
    let mut tabs = Tabs::start(&cluster.url(""), &jwt, &jwt).await;
    tabs.open("a", json!({"share": true})).await;
    tabs.wait_open(&["a"]).await;
    let mut redis = RedisPublisher::connect(&cluster.redis.url()).await;
    let first = numbered("u", 10);
    publish_paced(&mut redis, &channel, &first, Duration::from_millis(20)).await;
    tabs.wait("10 shown", SETTLE, |r| r.tab("a").received.len() >= 10)
        .await;

    // The session ends behind the page's back (the cookie is now one the
    // nodes refuse), then the connection drops: the reconnect is a 401,
    // which a bare EventSource would never retry.
    let refused = Claims::new(sub).exp_in(-3600).sign();
    tabs.set_cookie(&refused).await;
    let report = tabs.report().await;
    let victim = cluster
        .node_index(&report.tab("a").readies[0])
        .expect("the tab's node");
    cluster.nodes[victim].kill();
    let during = numbered("v", 20);
    publish_paced(&mut redis, &channel, &during, Duration::from_millis(25)).await;
    let want: Vec<String> = [first, during].concat();
    let report = tabs
        .wait("all 30 after the 401", SETTLE, |r| {
            r.tab("a").received.len() >= want.len()
        })
        .await;
    let tab = report.tab("a");
    assert!(tab.refreshes >= 1, "refresh() was called: {tab:?}");
    assert_eq!(tab.expired, 0);
    assert!(
        cluster
            .metric_sum("herald_connections_rejected_total{reason=\"auth\"}")
            .await
            >= 1.0,
        "a node refused the expired cookie"
    );
    assert_shows_exactly("a", tab, &want);
    tabs.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_tls_block_serves_http2_and_eight_unshared_tabs_each_hold_a_stream() {
    let _turn = HEAVY.lock().await;
    // deploy/cluster --tls: the `#tls` lines of nginx.conf enabled, with
    // the self-signed certificate it makes.
    let run_dir = tempfile::tempdir().expect("run dir");
    let dir = run_dir.path().to_str().expect("utf-8").to_string();
    let base = crate::free_base_port(3);
    let up = crate::cluster_script(&[
        "up",
        "--tls",
        "--no-prometheus",
        "--port",
        &base.to_string(),
        "--dir",
        &dir,
    ]);
    let _down = crate::ScriptCluster(run_dir.path());
    crate::assert_ok("deploy/cluster up --tls", &up);
    let https = format!("https://127.0.0.1:{}", base + 363);
    assert!(crate::stdout(&up).contains(&format!("HTTPS/2:     {https}/")));
    let cert = run_dir.path().join("tls/herald.crt");
    let cert = cert.to_str().expect("utf-8");
    let token = std::fs::read_to_string(run_dir.path().join("demo-token")).expect("demo token");
    let token = token.trim();

    // curl, verifying the certificate (it names 127.0.0.1), over HTTP/2.
    let js = crate::run(
        "curl",
        &[
            "--http2",
            "-sS",
            "--cacert",
            cert,
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code} %{content_type}",
            &format!("{https}/herald.js"),
        ],
    );
    crate::assert_ok("curl --http2 /herald.js", &js);
    assert_eq!(crate::stdout(&js), "2 200 text/javascript; charset=utf-8");
    // The stream too: HTTP/2 headers, then herald.ready, unbuffered.
    let mut curl = tokio::process::Command::new("curl")
        .args(["--http2", "-sS", "-N", "-i", "--cacert", cert, "--cookie"])
        .arg(format!("herald_token={token}"))
        .arg(format!("{https}/events"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run curl");
    let stdout = curl.stdout.take().expect("piped");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut head = Vec::new();
    let read = tokio::time::timeout(SETTLE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let ready = line == "event: herald.ready";
            head.push(line);
            if ready {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(read, Ok(true), "no herald.ready over HTTP/2: {head:?}");
    assert_eq!(head[0].trim(), "HTTP/2 200", "{head:?}");
    assert!(
        head.iter()
            .any(|l| l.trim() == "content-type: text/event-stream"),
        "{head:?}"
    );
    curl.kill().await.expect("stop curl");

    // Eight tabs that do not share: eight streams, none starved (over
    // HTTP/1.1 a browser holds at most six connections per host).
    let mut tabs = Tabs::launch(json!({
        "base": https, "token": token, "fresh": token, "insecure": true,
    }))
    .await;
    let names = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"];
    for name in names {
        tabs.open(name, json!({"share": false})).await;
    }
    let report = tabs
        .wait("eight tabs open", SETTLE, |r| {
            names.iter().all(|n| r.state(n) == Some("open"))
        })
        .await;
    for name in names {
        let tab = report.tab(name);
        assert!(tab.leader, "{name} holds its own stream");
        assert_eq!(tab.protocol.as_deref(), Some("h2"), "{name}");
    }
    let connections = || async {
        let mut sum = 0.0;
        for i in 1..=3 {
            let metrics =
                crate::common::get(&format!("http://127.0.0.1:{}/metrics", base + 1100 + i)).await;
            sum += crate::common::metric_in(&metrics.text(), "herald_connections").unwrap_or(0.0);
        }
        sum
    };
    assert!(
        wait_until(SETTLE, || async { connections().await == 8.0 }).await,
        "8 connections: {}",
        connections().await
    );
    let mut redis = RedisPublisher::connect(&format!("redis://127.0.0.1:{}", base - 1700)).await;
    let want = numbered("t", 50);
    publish_paced(&mut redis, "user:demo", &want, Duration::from_millis(10)).await;
    let report = tabs
        .wait("every tab has all 50", SETTLE, |r| {
            r.tabs.values().all(|t| t.received.len() >= want.len())
        })
        .await;
    for name in names {
        assert_shows_exactly(name, report.tab(name), &want);
    }
    tabs.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_then_online_reconnects_at_once_and_loses_nothing() {
    let _turn = HEAVY.lock().await;
    let cluster = Cluster::start(3, &[]).await;
    let sub = "tabs-offline";
    let jwt = user_token(sub);
    let channel = format!("user:{sub}");
    let mut tabs = Tabs::start(&cluster.url(""), &jwt, &jwt).await;
    tabs.open("a", json!({"share": true})).await;
    tabs.wait_open(&["a"]).await;
    let mut redis = RedisPublisher::connect(&cluster.redis.url()).await;
    let first = numbered("o", 10);
    publish_paced(&mut redis, &channel, &first, Duration::from_millis(20)).await;
    tabs.wait("10 shown", SETTLE, |r| r.tab("a").received.len() >= 10)
        .await;

    tabs.command(json!({"cmd": "offline", "value": true}), "offline")
        .await;
    tabs.wait("reconnecting while offline", SETTLE, |r| {
        r.state("a") == Some("reconnecting")
    })
    .await;
    assert!(
        connections_become(&cluster, 0.0).await,
        "offline, the tab let its stream go"
    );
    let during = numbered("p", 10);
    publish_paced(&mut redis, &channel, &during, Duration::from_millis(20)).await;
    tabs.command(json!({"cmd": "offline", "value": false}), "offline")
        .await;
    let want: Vec<String> = [first, during].concat();
    let report = tabs
        .wait("back online with all 20", SETTLE, |r| {
            r.tab("a").received.len() >= want.len() && r.state("a") == Some("open")
        })
        .await;
    let tab = report.tab("a");
    assert_shows_exactly("a", tab, &want);
    assert_eq!(tab.readies.len(), 2, "one reconnect: {tab:?}");
    assert_eq!(tab.states, ["open", "reconnecting", "open"]);
    tabs.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_told_it_will_freeze_hands_over_and_follows() {
    let _turn = HEAVY.lock().await;
    let cluster = Cluster::start(3, &[]).await;
    let sub = "tabs-freeze";
    let jwt = user_token(sub);
    let channel = format!("user:{sub}");
    let mut tabs = Tabs::start(&cluster.url(""), &jwt, &jwt).await;
    for name in ["a", "b"] {
        tabs.open(name, json!({"share": true})).await;
    }
    let leader = tabs.wait_open(&["a", "b"]).await;
    let other = if leader == "a" { "b" } else { "a" };
    let mut redis = RedisPublisher::connect(&cluster.redis.url()).await;
    let first = numbered("z", 10);
    publish_paced(&mut redis, &channel, &first, Duration::from_millis(20)).await;
    tabs.wait("10 shown", SETTLE, |r| {
        r.tabs.values().all(|t| t.received.len() >= 10)
    })
    .await;

    // The leading tab gets `freeze` (a browser about to freeze it): frozen,
    // it could no longer forward events, so it gives the lead away; on
    // `resume` it queues for it again, as a follower. (The test dispatches
    // the events; a headless page cannot really be frozen.)
    tabs.command(json!({"cmd": "freeze", "tab": leader}), "freeze")
        .await;
    tabs.wait("the other tab leads", SETTLE, |r| {
        r.tab(other).leader && r.state(other) == Some("open")
    })
    .await;
    let during = numbered("y", 10);
    publish_paced(&mut redis, &channel, &during, Duration::from_millis(20)).await;
    let want: Vec<String> = [first, during].concat();
    tabs.wait("the new leader shows all 20", SETTLE, |r| {
        r.tab(other).received.len() >= want.len()
    })
    .await;
    tabs.command(json!({"cmd": "resume", "tab": leader}), "resume")
        .await;
    let after = numbered("x", 5);
    publish_paced(&mut redis, &channel, &after, Duration::from_millis(20)).await;
    let report = tabs
        .wait("both show the last one", SETTLE, |r| {
            r.tabs.values().all(|t| t.received.last() == after.last())
        })
        .await;
    let all = [&want[..], &after].concat();
    assert_shows_exactly(other, report.tab(other), &all);
    assert_shows_exactly(&leader, report.tab(&leader), &all);
    assert!(
        !report.tab(&leader).leader,
        "the tab that gave the lead away follows: {report:#?}"
    );
    assert_eq!(report.tab(other).readies.len(), 1);
    assert_eq!(report.leaders(), [other]);
    tabs.close(other).await;
    let report = tabs
        .wait("the resumed tab leads once the other closes", SETTLE, |r| {
            r.tab(&leader).leader && r.state(&leader) == Some("open")
        })
        .await;
    assert_eq!(report.tab(&leader).readies.len(), 2, "{report:#?}");
    assert!(
        connections_become(&cluster, 1.0).await,
        "one connection: {}",
        cluster.metric_sum("herald_connections").await
    );
    tabs.quit().await;
}
