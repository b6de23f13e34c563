//! A Herald cluster for the deployment tests, laid out the way
//! `deploy/cluster up` lays one out: a throwaway redis-server, N `herald`
//! nodes on fixed loopback ports sharing it, and nginx running the
//! repository's `nginx.conf` with only its ports changed. Everything uses
//! free ports and one temp directory; every process is stopped by its PID
//! when the cluster is dropped.
//!
//! A node keeps its ports across restarts (nginx's upstream list names
//! them), so `ClusterNode::terminate` + `ClusterNode::start` is exactly a
//! rolling-restart step. Readiness is polled (`/readyz`), never slept on.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use hyper::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use crate::common::{self, free_port, get, Redis, SECRET};

/// How long a node, nginx or Prometheus may take to become ready.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The repository root.
pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether something accepts connections on 127.0.0.1:`port`.
pub(crate) fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        .is_ok()
}

/// The last `lines` lines of a log file, for failure messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Sends `signal` (`"TERM"`, `"KILL"`, ...) to `pid`.
pub(crate) fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Polls `child` until it exits; `None` after `timeout`.
async fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM, then SIGKILL if it is still there after `grace` (for Drop).
fn stop_child(child: &mut Child, grace: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    send_signal(child.id(), "TERM");
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

/// One `herald serve` process with fixed ports, logging to a file.
pub(crate) struct ClusterNode {
    /// 1-based, as in `deploy/cluster` (node1, node2, ...).
    pub(crate) number: usize,
    pub(crate) port: u16,
    pub(crate) admin_port: u16,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// The node id from the current process's listening line.
    id: String,
}

impl ClusterNode {
    fn new(number: usize, dir: &Path, redis_url: &str, extra: &[&str]) -> ClusterNode {
        let port = free_port();
        let admin_port = free_port();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{admin_port}"),
            "--redis-url".into(),
            redis_url.into(),
            "--jwt-secret".into(),
            SECRET.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        ClusterNode {
            number,
            port,
            admin_port,
            args,
            log: dir.join(format!("node{number}.log")),
            child: None,
            id: String::new(),
        }
    }

    /// Starts the process (again, on the same ports) and waits until its
    /// `/readyz` is 200.
    pub(crate) async fn start(&mut self) {
        assert!(
            self.child.is_none(),
            "node{} is already running",
            self.number
        );
        let offset = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HERALD_") {
                cmd.env_remove(key);
            }
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn herald"));

        // Ready = this process printed its listening line (the log is
        // appended to across restarts: only what follows `offset` counts)
        // and its /readyz says 200 (Redis connected).
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "node{} exited during start-up ({status}):\n{}",
                    self.number,
                    self.log_tail()
                );
            }
            if let Some(id) = listening_id(&self.log, offset) {
                if get(&self.admin_url("/readyz")).await.status == StatusCode::OK {
                    self.id = id;
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node{} not ready within {START_TIMEOUT:?}:\n{}",
                self.number,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM (graceful drain); waits for the exit and asserts it was clean.
    pub(crate) async fn terminate(&mut self, timeout: Duration) {
        let mut child = self.child.take().expect("node is running");
        send_signal(child.id(), "TERM");
        let status = wait_child(&mut child, timeout).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "node{} did not drain and exit 0 within {timeout:?} after SIGTERM (got {status:?}):\n{}",
            self.number,
            self.log_tail()
        );
    }

    /// SIGKILL: the node vanishes without draining.
    pub(crate) fn kill(&mut self) {
        let mut child = self.child.take().expect("node is running");
        child.kill().expect("SIGKILL herald");
        child.wait().expect("reap herald");
    }

    /// The node id of the running process (from its listening line).
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub(crate) fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }

    /// One series from this node's `/metrics` (0 if absent).
    pub(crate) async fn metric(&self, series: &str) -> f64 {
        let reply = get(&self.admin_url("/metrics")).await;
        assert_eq!(reply.status, StatusCode::OK, "node{} /metrics", self.number);
        common::metric_in(&reply.text(), series).unwrap_or(0.0)
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- node{} log tail ---\n{}", self.number, self.log_tail());
        }
    }
}

/// The node id from the last `herald listening ... node=ID` line after
/// byte `offset` of `log`.
fn listening_id(log: &Path, offset: u64) -> Option<String> {
    let mut file = fs::File::open(log).ok()?;
    file.seek(SeekFrom::Start(offset)).ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.lines()
        .rev()
        .find_map(common::parse_listening)
        .map(|(_, _, id)| id)
}

// ---------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------

/// The repository's nginx.conf with nginx listening on `port` and the
/// upstream list replaced by `upstreams` (ports on 127.0.0.1): the same
/// rewrite `deploy/cluster` does for non-default ports. Panics if the
/// committed file no longer has the lines it rewrites.
pub(crate) fn nginx_conf_for(port: u16, upstreams: &[u16]) -> String {
    let committed = fs::read_to_string(repo().join("nginx.conf")).expect("read nginx.conf");
    let mut out = String::new();
    let (mut listen_seen, mut servers_seen) = (false, false);
    for line in committed.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("server 127.0.0.1:") {
            if !servers_seen {
                // One line per node, with the committed line's parameters.
                let params = rest.trim_start_matches(|c: char| c.is_ascii_digit());
                for upstream in upstreams {
                    out.push_str(&format!("        server 127.0.0.1:{upstream}{params}\n"));
                }
                servers_seen = true;
            }
            continue;
        }
        if trimmed.starts_with("listen 127.0.0.1:") {
            out.push_str(&format!("        listen 127.0.0.1:{port};\n"));
            listen_seen = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(
        listen_seen && servers_seen,
        "nginx.conf must have `listen 127.0.0.1:PORT;` and `server 127.0.0.1:PORT ...` lines"
    );
    out
}

/// nginx in the foreground (`daemon off` in nginx.conf) with its own prefix
/// directory; stopped with SIGTERM (fast shutdown) by PID.
pub(crate) struct Nginx {
    pub(crate) port: u16,
    prefix: PathBuf,
    child: Child,
}

impl Nginx {
    pub(crate) async fn start(dir: &Path, upstreams: &[u16]) -> Nginx {
        let port = free_port();
        let prefix = dir.join("nginx");
        fs::create_dir_all(prefix.join("logs")).expect("nginx prefix");
        let conf = prefix.join("nginx.conf");
        fs::write(&conf, nginx_conf_for(port, upstreams)).expect("write nginx.conf");
        let output = fs::File::create(prefix.join("logs/stdout.log")).expect("nginx stdout log");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .args(["-e", "logs/error.log"])
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("clone"))
            .stderr(output)
            .spawn()
            .expect("spawn nginx (is it installed? tests/run installs it)");
        let mut nginx = Nginx {
            port,
            prefix,
            child,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !listening(port) {
            if let Some(status) = nginx.child.try_wait().expect("try_wait nginx") {
                panic!("nginx exited at start ({status}):\n{}", nginx.logs());
            }
            assert!(
                Instant::now() < deadline,
                "nginx not listening within {START_TIMEOUT:?}:\n{}",
                nginx.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        nginx
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// nginx's error log and the tail of its access log.
    pub(crate) fn logs(&self) -> String {
        format!(
            "error.log:\n{}\nstdout:\n{}\naccess.log (tail):\n{}",
            tail(&self.prefix.join("logs/error.log"), 30),
            tail(&self.prefix.join("logs/stdout.log"), 10),
            tail(&self.prefix.join("logs/access.log"), 30),
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- nginx ---\n{}", self.logs());
        }
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------

pub(crate) struct Cluster {
    pub(crate) nodes: Vec<ClusterNode>,
    pub(crate) nginx: Nginx,
    pub(crate) redis: Redis,
    pub(crate) dir: tempfile::TempDir,
}

impl Cluster {
    /// Redis, `n` ready nodes (each with `extra` flags) and nginx in front.
    pub(crate) async fn start(n: usize, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("cluster dir");
        let redis = Redis::start();
        let mut nodes: Vec<ClusterNode> = (1..=n)
            .map(|i| ClusterNode::new(i, dir.path(), &redis.url(), extra))
            .collect();
        for node in &mut nodes {
            node.start().await;
        }
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let nginx = Nginx::start(dir.path(), &ports).await;
        Cluster {
            nodes,
            nginx,
            redis,
            dir,
        }
    }

    /// nginx's URL for `path`.
    pub(crate) fn url(&self, path: &str) -> String {
        self.nginx.url(path)
    }

    /// The node (0-based index) whose current process has `id`.
    pub(crate) fn node_index(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id() == id)
    }

    /// Sum of one series over every running node.
    pub(crate) async fn metric_sum(&self, series: &str) -> f64 {
        let mut sum = 0.0;
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            sum += node.metric(series).await;
        }
        sum
    }

    /// `POST /publish` through nginx as the all-channel publisher; returns
    /// the reply's JSON, asserting a 200.
    pub(crate) async fn publish(&self, body: &Value) -> Value {
        let auth = common::bearer(&common::publisher_token());
        let reply = common::request(
            hyper::Method::POST,
            &self.url("/publish"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "POST /publish through nginx: {}\n{}",
            reply.text(),
            self.nginx.logs()
        );
        reply.json()
    }
}

// ---------------------------------------------------------------------------
// Publishing straight to Redis, as an app service would
// ---------------------------------------------------------------------------

/// Publishes with Herald's Lua publish script over a plain Redis
/// connection (EVALSHA with the documented KEYS/ARGV), no node involved.
pub(crate) struct RedisPublisher {
    connection: redis::aio::MultiplexedConnection,
    script: redis::Script,
}

impl RedisPublisher {
    pub(crate) async fn connect(url: &str) -> RedisPublisher {
        let client = redis::Client::open(url).expect("redis url");
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        RedisPublisher {
            connection,
            script: redis::Script::new(herald::broker::redis::PUBLISH_SCRIPT),
        }
    }

    /// Publishes `data` (any JSON) to `channel`; returns the stream id.
    pub(crate) async fn publish(&mut self, channel: &str, event: &str, data: &Value) -> String {
        self.script
            .key(format!("herald:{{{channel}}}:h"))
            .key(format!("herald:{{{channel}}}"))
            .arg(event)
            .arg(data.to_string())
            .arg(1000)
            .arg(86400)
            .invoke_async(&mut self.connection)
            .await
            .unwrap_or_else(|e| panic!("publish script on {channel}: {e}"))
    }
}

// ---------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------

/// A real `prometheus` with its own config, data dir and free port,
/// scraping `targets` every second and loading `rule_files`.
pub(crate) struct Prometheus {
    pub(crate) port: u16,
    dir: PathBuf,
    child: Child,
}

impl Prometheus {
    pub(crate) async fn start(
        dir: &Path,
        targets: &[String],
        rule_files: &[PathBuf],
    ) -> Prometheus {
        let dir = dir.join("prometheus");
        fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let port = free_port();
        let targets = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let rules = rule_files
            .iter()
            .map(|p| format!("  - '{}'\n", p.display()))
            .collect::<String>();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{rules}\
             scrape_configs:\n  - job_name: herald\n    static_configs:\n      - targets: [{targets}]\n"
        );
        fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let log = fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone"))
            .stderr(log)
            .spawn()
            .expect("spawn prometheus (is it installed? tests/run installs it)");
        let mut prometheus = Prometheus { port, dir, child };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = prometheus.child.try_wait().expect("try_wait prometheus") {
                panic!("prometheus exited ({status}):\n{}", prometheus.log_tail());
            }
            if listening(port) && get(&prometheus.url("/-/ready")).await.status == StatusCode::OK {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within {START_TIMEOUT:?}:\n{}",
                prometheus.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `GET /api/v1/<path>`; asserts `"status": "success"` and returns `data`.
    pub(crate) async fn api(&self, path_and_query: &str) -> Value {
        let reply = get(&self.url(&format!("/api/v1/{path_and_query}"))).await;
        let body = reply.json();
        assert_eq!(
            body["status"], "success",
            "prometheus /api/v1/{path_and_query}: {} {body}",
            reply.status
        );
        body["data"].clone()
    }

    /// An instant query; `query` is URL-encoded here.
    pub(crate) async fn query(&self, query: &str) -> Value {
        let encoded: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
        self.api(&format!("query?query={encoded}")).await
    }

    pub(crate) fn log_tail(&self) -> String {
        tail(&self.dir.join("prometheus.log"), 30)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- prometheus log tail ---\n{}", self.log_tail());
        }
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}
