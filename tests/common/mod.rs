//! Shared harness for the integration tests: a real `herald` process, a real
//! SSE client over TCP, token minting, metrics scraping and a throwaway
//! `redis-server`.
//!
//! Each test starts its own node on `127.0.0.1:0` and learns its ports from
//! the `herald listening ...` line, so tests run in parallel without sharing
//! state. Nothing here sleeps to wait for readiness: a node is ready once it
//! printed its listening line, a stream once it delivered `herald.ready`;
//! everything else is polled with a deadline (`wait_until`).

// Every test binary compiles this module but uses only part of it.
#![allow(dead_code)]

pub(crate) mod app;
pub(crate) mod cluster;
pub(crate) mod proxy;
pub(crate) mod resp;
pub(crate) mod wire;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The HS256 secret every node gets unless a test asks otherwise.
pub(crate) const SECRET: &str = "herald-integration-test-secret-0123456789";

/// How long a node may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How many stderr lines a node keeps for failure messages.
const STDERR_TAIL: usize = 200;

/// How long tests wait for something that should happen "at once" (an
/// event, a metric change). Generous: a loaded CI machine is slow.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// A generous bound for one plain HTTP exchange with a local node.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Node: one `herald serve` process
// ---------------------------------------------------------------------------

/// A running `herald serve` child process. Dropping it kills that process
/// (and only it, by PID).
pub(crate) struct Node {
    child: Child,
    public: String,
    admin: String,
    id: String,
    /// stdout lines printed before the listening line (demo token, page URL).
    banner: Vec<String>,
    /// The last `STDERR_TAIL` lines of the node's log, for failure messages.
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Node {
    /// Starts a node with the shared test secret plus `args`.
    pub(crate) fn start(args: &[&str]) -> Node {
        Node::launch(Some(SECRET), args, &[])
    }

    /// Like `start`, with extra environment variables for the process.
    pub(crate) fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Node {
        Node::launch(Some(SECRET), args, env)
    }

    /// Starts a node without `--jwt-secret` (the test passes its own key
    /// flags, or none to get the generated demo secret).
    pub(crate) fn start_without_secret(args: &[&str]) -> Node {
        Node::launch(None, args, &[])
    }

    /// Starts a node whose process may open only `open_files` descriptors
    /// (soft and hard limit, set by the shell that execs it).
    pub(crate) fn start_with_open_files(open_files: u64, args: &[&str]) -> Node {
        Node::launch_limited(Some(SECRET), args, &[], Some(open_files))
    }

    fn launch(secret: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Node {
        Node::launch_limited(secret, args, env, None)
    }

    fn launch_limited(
        secret: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
        open_files: Option<u64>,
    ) -> Node {
        let mut cmd = match open_files {
            None => Command::new(env!("CARGO_BIN_EXE_herald")),
            Some(limit) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", &format!("ulimit -n {limit} && exec \"$0\" \"$@\"")])
                    .arg(env!("CARGO_BIN_EXE_herald"));
                sh
            }
        };
        cmd.envs(env.iter().copied());
        // A developer's HERALD_* environment must not leak into the tests.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HERALD_") {
                cmd.env_remove(key);
            }
        }
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ]);
        if let Some(secret) = secret {
            cmd.args(["--jwt-secret", secret]);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the herald binary");

        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let tail = Arc::clone(&stderr);
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                let mut tail = tail.lock().expect("stderr tail lock");
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });

        // stdout is read on a thread and kept drained for the node's whole
        // life, so a chatty node never blocks on a full pipe.
        let stdout_pipe = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout_pipe).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });

        let deadline = std::time::Instant::now() + START_TIMEOUT;
        let mut banner = Vec::new();
        let failure = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => match parse_listening(&line) {
                    Some((public, admin, id)) => {
                        return Node {
                            child,
                            public,
                            admin,
                            id,
                            banner,
                            stderr,
                        };
                    }
                    None => banner.push(line),
                },
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    break format!("no listening line within {START_TIMEOUT:?}");
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    break "stdout closed before the listening line".to_string();
                }
            }
        };
        let _ = child.kill();
        let status = child.wait();
        let _ = stderr_reader.join();
        let tail = stderr.lock().expect("stderr tail lock");
        panic!(
            "herald {args:?} failed to start: {failure} (exit: {status:?})\n\
             stdout:\n{}\nstderr:\n{}",
            banner.join("\n"),
            tail.iter().cloned().collect::<Vec<_>>().join("\n")
        );
    }

    /// Base URL of the public listener, e.g. `http://127.0.0.1:41234`.
    pub(crate) fn public(&self) -> &str {
        &self.public
    }

    /// Base URL of the admin listener.
    pub(crate) fn admin(&self) -> &str {
        &self.admin
    }

    /// The node id from the listening line.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// `public()` + `path`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{}", self.public, path)
    }

    /// `admin()` + `path`.
    pub(crate) fn admin_url(&self, path: &str) -> String {
        format!("{}{}", self.admin, path)
    }

    /// stdout lines printed before the listening line.
    pub(crate) fn banner(&self) -> &[String] {
        &self.banner
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines the node logged, for assertion messages.
    pub(crate) fn stderr_tail(&self) -> String {
        let tail = self.stderr.lock().expect("stderr tail lock");
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Sends a signal (`"TERM"`, `"INT"`, ...) to this node's process.
    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// The exit status if the process has already exited.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on herald")
    }

    /// Waits for the process to exit; panics (with its log) after `timeout`.
    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on herald") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "herald did not exit within {timeout:?}\nstderr:\n{}",
                    self.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- herald node {} ({}) stderr tail ---\n{}",
                self.id,
                self.public,
                self.stderr_tail()
            );
        }
    }
}

/// Parses `herald listening public=URL admin=URL node=ID`.
pub(crate) fn parse_listening(line: &str) -> Option<(String, String, String)> {
    let rest = line.trim().strip_prefix("herald listening ")?;
    let (mut public, mut admin, mut node) = (None, None, None);
    for part in rest.split_whitespace() {
        if let Some(v) = part.strip_prefix("public=") {
            public = Some(v.trim_end_matches('/').to_string());
        } else if let Some(v) = part.strip_prefix("admin=") {
            admin = Some(v.trim_end_matches('/').to_string());
        } else if let Some(v) = part.strip_prefix("node=") {
            node = Some(v.to_string());
        }
    }
    Some((public?, admin?, node?))
}

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

/// Unix time in seconds.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Path of a file under `tests/fixtures/`.
pub(crate) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// JWT claims under construction; `Claims::new("alice").sign()` is a valid
/// one-hour token for the shared secret.
#[derive(Clone, Debug)]
pub(crate) struct Claims(Map<String, Value>);

impl Claims {
    pub(crate) fn new(sub: &str) -> Claims {
        let mut map = Map::new();
        map.insert("sub".into(), json!(sub));
        map.insert("exp".into(), json!(now() + 3600));
        Claims(map)
    }

    pub(crate) fn topics(self, topics: &[&str]) -> Claims {
        self.set("topics", json!(topics))
    }

    pub(crate) fn publish(self, patterns: &[&str]) -> Claims {
        self.set("publish", json!(patterns))
    }

    /// `exp` = now + `secs` (negative for the past).
    pub(crate) fn exp_in(self, secs: i64) -> Claims {
        self.set("exp", json!(now() + secs))
    }

    /// `nbf` = now + `secs`.
    pub(crate) fn nbf_in(self, secs: i64) -> Claims {
        self.set("nbf", json!(now() + secs))
    }

    pub(crate) fn iss(self, iss: &str) -> Claims {
        self.set("iss", json!(iss))
    }

    pub(crate) fn aud(self, aud: &str) -> Claims {
        self.set("aud", json!(aud))
    }

    pub(crate) fn set(mut self, key: &str, value: Value) -> Claims {
        self.0.insert(key.into(), value);
        self
    }

    pub(crate) fn without(mut self, key: &str) -> Claims {
        self.0.remove(key);
        self
    }

    /// HS256 with the shared test secret.
    pub(crate) fn sign(&self) -> String {
        self.sign_hmac(Algorithm::HS256, SECRET.as_bytes())
    }

    /// HS256/384/512 with any secret.
    pub(crate) fn sign_hmac(&self, alg: Algorithm, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &self.0,
            &EncodingKey::from_secret(secret),
        )
        .expect("sign HMAC token")
    }

    /// Signs with a private key PEM from `tests/fixtures/` (RS*/PS*, ES*, EdDSA).
    pub(crate) fn sign_pem(&self, alg: Algorithm, private_key_fixture: &str) -> String {
        let pem = std::fs::read(fixture(private_key_fixture)).expect("read key fixture");
        let key = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            other => panic!("{other:?} is not a public-key algorithm"),
        }
        .expect("parse key fixture");
        jsonwebtoken::encode(&Header::new(alg), &self.0, &key).expect("sign token")
    }

    /// A hand-built token: base64url(header).base64url(claims).base64url(sig),
    /// for headers no library will sign (`alg: none`).
    pub(crate) fn forge(&self, header: &Value, signature: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.{}",
            b64.encode(header.to_string()),
            b64.encode(Value::Object(self.0.clone()).to_string()),
            b64.encode(signature)
        )
    }
}

/// A valid one-hour token for `sub` with no topics and no publish rights.
pub(crate) fn token(sub: &str) -> String {
    Claims::new(sub).sign()
}

/// A token allowed to publish to every channel.
pub(crate) fn publisher_token() -> String {
    Claims::new("test-publisher")
        .publish(&["user:*", "broadcast", "topic:*"])
        .sign()
}

/// `Authorization` header value for `token`.
pub(crate) fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------
// Plain HTTP
// ---------------------------------------------------------------------------

/// A complete HTTP response.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Reply {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the raw body if it is not JSON.
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} response body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        header_str(&self.headers, name)
    }

    /// Asserts the `{"error": "..."}` shape DESIGN promises for every error.
    pub(crate) fn assert_json_error(&self, status: StatusCode) {
        assert_eq!(self.status, status, "body: {}", self.text());
        let body = self.json();
        assert!(
            body.get("error")
                .and_then(Value::as_str)
                .is_some_and(|e| !e.is_empty()),
            "{status} body should be {{\"error\": \"...\"}}, got {body}"
        );
        assert!(
            self.header("content-type")
                .is_some_and(|ct| ct.starts_with("application/json")),
            "{status} should be JSON, content-type: {:?}",
            self.header("content-type")
        );
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Splits `http://host:port/path?q` into the socket address, the authority
/// and the request target.
fn split_url(url: &str) -> (SocketAddr, String, String) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("only http:// URLs are supported: {url}"));
    let (authority, target) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let addr = authority
        .parse()
        .unwrap_or_else(|e| panic!("{authority} is not ip:port ({e})"));
    (addr, authority.to_string(), target.to_string())
}

/// Sends one request on a fresh TCP connection. The returned task drives the
/// connection; aborting it closes the socket.
async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    recv_buffer: Option<u32>,
) -> (hyper::Response<Incoming>, JoinHandle<()>) {
    let (addr, authority, target) = split_url(url);
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .expect("create socket");
    if let Some(size) = recv_buffer {
        // Set before connect so the advertised window stays small and the
        // kernel does not autotune it.
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    let stream = socket
        .connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http1 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(target)
        .header("host", authority);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(body)).expect("build request");
    let resp = sender
        .send_request(req)
        .await
        .unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
    (resp, conn)
}

/// One HTTP exchange; the whole body is read.
pub(crate) async fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let body = body.into();
    let exchange = async {
        let (resp, conn) = send(method, url, headers, body, None).await;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("read body of {url}: {e}"))
            .to_bytes();
        conn.abort();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{url} did not answer within {HTTP_TIMEOUT:?}"))
}

pub(crate) async fn get(url: &str) -> Reply {
    request(Method::GET, url, &[], Bytes::new()).await
}

/// `POST /publish` with `token`; returns the status and the JSON body.
pub(crate) async fn publish(node: &Node, token: &str, body: &Value) -> (StatusCode, Value) {
    let reply = publish_raw(node, token, body.to_string()).await;
    (reply.status, reply.json())
}

/// `POST /publish` with an arbitrary body.
pub(crate) async fn publish_raw(node: &Node, token: &str, body: impl Into<Bytes>) -> Reply {
    let auth = bearer(token);
    request(
        Method::POST,
        &node.url("/publish"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
}

/// Publishes `data` to `channel` as the all-powerful publisher and asserts
/// success; returns the message id.
pub(crate) async fn publish_ok(node: &Node, channel: &str, data: Value) -> String {
    let body = json!({ "channel": channel, "data": data });
    let (status, reply) = publish(node, &publisher_token(), &body).await;
    assert_eq!(status, StatusCode::OK, "publish {body} -> {reply}");
    reply["id"]
        .as_str()
        .unwrap_or_else(|| panic!("publish reply has no id: {reply}"))
        .to_string()
}

/// The node is still healthy and a brand-new client still gets messages
/// (used after a test provoked errors).
pub(crate) async fn assert_still_serves(node: &Node) {
    let health = get(&node.admin_url("/healthz")).await;
    assert_eq!(health.status, StatusCode::OK, "/healthz: {}", health.text());
    let sub = format!("fresh-{}", rand::random::<u32>());
    let mut sse = Sse::open(node, &token(&sub)).await;
    publish_ok(node, &format!("user:{sub}"), json!("still here")).await;
    let event = sse
        .next_data(WAIT)
        .await
        .expect("a fresh client gets a message");
    assert_eq!(event.data(), "still here");
}

// ---------------------------------------------------------------------------
// Metrics and polling
// ---------------------------------------------------------------------------

/// Reads one series from the node's `/metrics`, e.g.
/// `herald_connections_closed_total{reason="slow"}`. Labels match as a set.
/// A series the node has not emitted reads as 0, like a fresh counter.
pub(crate) async fn metric(node: &Node, series: &str) -> f64 {
    let reply = get(&node.admin_url("/metrics")).await;
    assert_eq!(reply.status, StatusCode::OK, "/metrics: {}", reply.text());
    metric_in(&reply.text(), series).unwrap_or(0.0)
}

/// Finds `series` in a Prometheus text exposition.
pub(crate) fn metric_in(text: &str, series: &str) -> Option<f64> {
    let wanted = parse_series(series);
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let (series, value) = split_sample(line)?;
            (parse_series(series) == wanted).then(|| value.parse().ok())?
        })
}

/// `name{labels} value [timestamp]` -> (`name{labels}`, `value`).
fn split_sample(line: &str) -> Option<(&str, &str)> {
    let end = match line.find('{') {
        Some(open) => open + line[open..].find('}')? + 1,
        None => line.find(char::is_whitespace)?,
    };
    let (series, rest) = line.split_at(end);
    Some((series, rest.split_whitespace().next()?))
}

/// `name{a="x",b="y"}` -> (name, {a: x, b: y}).
fn parse_series(series: &str) -> (String, BTreeMap<String, String>) {
    let series = series.trim();
    let Some(open) = series.find('{') else {
        return (series.to_string(), BTreeMap::new());
    };
    let name = series[..open].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = series[open + 1..].trim_end_matches('}');
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = rest[eq + 1..].trim_start().strip_prefix('"').unwrap_or("");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key, value);
        rest = &after[end..];
    }
    (name, labels)
}

/// Polls `check` every 25 ms until it returns true or `timeout` passes.
/// Returns whether it became true.
pub(crate) async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls a metric until `ok(value)`; panics with the last value otherwise.
pub(crate) async fn wait_metric(
    node: &Node,
    series: &str,
    timeout: Duration,
    ok: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let last = metric(node, series).await;
        if ok(last) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached the expected value within {timeout:?}; last {last}\nstderr:\n{}",
            node.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------
// SSE client
// ---------------------------------------------------------------------------

/// One SSE frame: the fields seen between two blank lines. A browser would
/// dispatch it as an event only if it has `data` (see `Event::dispatches`);
/// frames holding only `retry:` or a comment are kept so tests can see them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Event {
    pub(crate) id: Option<String>,
    pub(crate) event: Option<String>,
    pub(crate) data: Option<String>,
    pub(crate) retry: Option<u64>,
    pub(crate) comment: Option<String>,
}

impl Event {
    /// The event type EventSource would report (`message` by default).
    pub(crate) fn name(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }

    pub(crate) fn data(&self) -> &str {
        self.data.as_deref().unwrap_or("")
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(self.data())
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {self:?}"))
    }

    /// Would EventSource fire an event for this frame?
    pub(crate) fn dispatches(&self) -> bool {
        self.data.is_some()
    }

    /// An application message (not a `herald.*` control event).
    pub(crate) fn is_message(&self) -> bool {
        self.dispatches() && !self.name().starts_with("herald.")
    }
}

/// Data payloads of the application messages among `events`.
pub(crate) fn payloads(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.is_message())
        .map(|e| e.data().to_string())
        .collect()
}

/// Incremental parser for the `text/event-stream` format (WHATWG HTML,
/// "Server-sent events"): CRLF, LF or CR line ends, `:` comments, one
/// optional space after the colon, fields without a colon.
#[derive(Default)]
pub(crate) struct Parser {
    buf: Vec<u8>,
    /// Where the search for the next line end resumes, so a long line that
    /// arrives in many chunks is scanned once.
    scan: usize,
    /// The previous chunk ended in CR: a leading LF belongs to that line end.
    skip_lf: bool,
    bom_checked: bool,
    frame: Event,
    frame_has_field: bool,
}

impl Parser {
    pub(crate) fn feed(&mut self, chunk: &[u8], out: &mut VecDeque<Event>) {
        const BOM: &[u8] = b"\xEF\xBB\xBF";
        self.buf.extend_from_slice(chunk);
        if !self.bom_checked {
            if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
                return;
            }
            if self.buf.starts_with(BOM) {
                self.buf.drain(..BOM.len());
            }
            self.bom_checked = true;
        }
        let mut start = 0;
        loop {
            if self.skip_lf {
                if start == self.buf.len() {
                    break;
                }
                if self.buf[start] == b'\n' {
                    start += 1;
                }
                self.skip_lf = false;
                self.scan = start;
            }
            let from = self.scan.max(start);
            let Some(offset) = self.buf[from..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
            else {
                self.scan = self.buf.len();
                break;
            };
            let end = from + offset;
            self.skip_lf = self.buf[end] == b'\r';
            let line = String::from_utf8_lossy(&self.buf[start..end]).into_owned();
            start = end + 1;
            self.scan = start;
            self.line(&line, out);
        }
        self.buf.drain(..start);
        self.scan -= start;
    }

    fn line(&mut self, line: &str, out: &mut VecDeque<Event>) {
        if line.is_empty() {
            if self.frame_has_field {
                out.push_back(std::mem::take(&mut self.frame));
            }
            self.frame = Event::default();
            self.frame_has_field = false;
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            let comment = comment.strip_prefix(' ').unwrap_or(comment);
            match &mut self.frame.comment {
                Some(c) => {
                    c.push('\n');
                    c.push_str(comment);
                }
                None => self.frame.comment = Some(comment.to_string()),
            }
            self.frame_has_field = true;
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.frame.event = Some(value.to_string()),
            "data" => match &mut self.frame.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.frame.data = Some(value.to_string()),
            },
            "id" if !value.contains('\0') => self.frame.id = Some(value.to_string()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.frame.retry = value.parse().ok();
            }
            _ => return,
        }
        self.frame_has_field = true;
    }
}

/// An open `text/event-stream` response over its own TCP connection.
/// Dropping it closes the connection.
pub(crate) struct Sse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    body: Incoming,
    parser: Parser,
    pending: VecDeque<Event>,
    ended: bool,
    /// Why the body ended abnormally (connection reset, truncated chunk).
    end_error: Option<String>,
    last_id: Option<String>,
    ready: Option<Event>,
    conn: JoinHandle<()>,
}

impl std::fmt::Debug for Sse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("ended", &self.ended)
            .field("last_id", &self.last_id)
            .finish_non_exhaustive()
    }
}

impl Drop for Sse {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Sse {
    /// Reconnects to `path` on `node` as EventSource does, sending `cursor`
    /// as `Last-Event-ID`; returns the stream and what came before
    /// `herald.ready` (the replay). Panics if the node refuses.
    pub(crate) async fn resume(
        node: &Node,
        path: &str,
        token: &str,
        cursor: &str,
    ) -> (Sse, Vec<Event>) {
        let auth = bearer(token);
        let mut sse = Sse::connect(
            &node.url(path),
            &[("authorization", &auth), ("last-event-id", cursor)],
        )
        .await
        .unwrap_or_else(|r| panic!("resume refused: {} {}", r.status, r.text()));
        let before_ready = sse.wait_ready(WAIT).await;
        (sse, before_ready)
    }

    /// `GET url` with `headers`. A 200 becomes a stream; anything else comes
    /// back whole as the error.
    pub(crate) async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Sse, Reply> {
        Sse::connect_inner(url, headers, None).await
    }

    /// Like `connect`, with a tiny socket receive buffer: a client that then
    /// stops reading pushes back on the server within a few KiB.
    pub(crate) async fn connect_slow(url: &str, headers: &[(&str, &str)]) -> Result<Sse, Reply> {
        Sse::connect_inner(url, headers, Some(4096)).await
    }

    async fn connect_inner(
        url: &str,
        headers: &[(&str, &str)],
        recv_buffer: Option<u32>,
    ) -> Result<Sse, Reply> {
        let mut all = vec![("accept", "text/event-stream")];
        all.extend_from_slice(headers);
        let connect = send(Method::GET, url, &all, Bytes::new(), recv_buffer);
        let (resp, conn) = tokio::time::timeout(HTTP_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| panic!("{url} sent no response head within {HTTP_TIMEOUT:?}"));
        let (parts, body) = resp.into_parts();
        if parts.status != StatusCode::OK {
            let body = tokio::time::timeout(HTTP_TIMEOUT, body.collect())
                .await
                .unwrap_or_else(|_| panic!("{url}: {} body never ended", parts.status))
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            conn.abort();
            return Err(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            });
        }
        Ok(Sse {
            status: parts.status,
            headers: parts.headers,
            body,
            parser: Parser::default(),
            pending: VecDeque::new(),
            ended: false,
            end_error: None,
            last_id: None,
            ready: None,
            conn,
        })
    }

    /// `GET /events` with a bearer token, then waits for `herald.ready`.
    pub(crate) async fn open(node: &Node, token: &str) -> Sse {
        Sse::open_at(node, "/events", token).await
    }

    /// `GET <path_and_query>` with a bearer token, then waits for `herald.ready`.
    pub(crate) async fn open_at(node: &Node, path_and_query: &str, token: &str) -> Sse {
        let auth = bearer(token);
        let mut sse = Sse::connect(&node.url(path_and_query), &[("authorization", &auth)])
            .await
            .unwrap_or_else(|r| {
                panic!(
                    "GET {path_and_query} was refused: {} {}",
                    r.status,
                    r.text()
                )
            });
        sse.wait_ready(Duration::from_secs(10)).await;
        sse
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        header_str(&self.headers, name)
    }

    /// The next frame, or `None` if the stream ended or `timeout` passed
    /// (`ended()` tells which).
    pub(crate) async fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.pending.pop_front() {
                if let Some(id) = &event.id {
                    self.last_id = Some(id.clone());
                }
                return Some(event);
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_elapsed) => return None,
                Ok(None) => self.ended = true,
                Ok(Some(Err(e))) => {
                    self.ended = true;
                    self.end_error = Some(e.to_string());
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.parser.feed(&data, &mut self.pending);
                    }
                }
            }
        }
    }

    /// The next frame that carries `data` (skips `retry:`-only frames and
    /// comments).
    pub(crate) async fn next_data(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.next_event(left).await?;
            if event.dispatches() {
                return Some(event);
            }
        }
    }

    /// Reads until `herald.ready` and returns every frame before it. Panics
    /// (listing what it saw) if the stream ends or `timeout` passes first.
    pub(crate) async fn wait_ready(&mut self, timeout: Duration) -> Vec<Event> {
        let seen = self
            .collect_until(timeout, |e| e.name() == "herald.ready")
            .await;
        let (ready, before) = seen.split_last().expect("collect_until returns the match");
        self.ready = Some(ready.clone());
        before.to_vec()
    }

    /// The `herald.ready` event seen by `wait_ready`.
    pub(crate) fn ready(&self) -> &Event {
        self.ready.as_ref().expect("wait_ready was not called")
    }

    /// Reads frames up to and including the first that matches `done`.
    /// Panics (listing what it saw) if the stream ends or `timeout` passes.
    pub(crate) async fn collect_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&Event) -> bool,
    ) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Some(event) => {
                    let stop = done(&event);
                    seen.push(event);
                    if stop {
                        return seen;
                    }
                }
                None => panic!(
                    "stream {} before the expected event; saw {seen:#?}",
                    self.why_stopped(timeout)
                ),
            }
        }
    }

    /// The next `n` frames that carry data. Panics if they do not all come
    /// within `timeout`.
    pub(crate) async fn collect(&mut self, n: usize, timeout: Duration) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while seen.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_data(left).await {
                Some(event) => seen.push(event),
                None => panic!(
                    "stream {} after {} of {n} events: {seen:#?}",
                    self.why_stopped(timeout),
                    seen.len()
                ),
            }
        }
        seen
    }

    /// Reads until the server ends the stream. `Some(frames)` if it ended
    /// within `timeout`, `None` if it was still open.
    pub(crate) async fn read_to_end(&mut self, timeout: Duration) -> Option<Vec<Event>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Some(event) => seen.push(event),
                None if self.ended => return Some(seen),
                None => return None,
            }
        }
    }

    /// The last `id:` received, as EventSource would send in `Last-Event-ID`.
    pub(crate) fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// Has the server ended the stream (cleanly or by closing the socket)?
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// Why the body ended, if it ended with a transport error.
    pub(crate) fn end_error(&self) -> Option<&str> {
        self.end_error.as_deref()
    }

    fn why_stopped(&self, timeout: Duration) -> String {
        match (&self.ended, &self.end_error) {
            (true, Some(e)) => format!("broke ({e})"),
            (true, None) => "ended".to_string(),
            (false, _) => format!("stayed silent for {timeout:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// A port nothing listens on right now, for a server a test starts later
/// (and may restart on the same port).
///
/// Chosen at random below the kernel's ephemeral range: the OS hands ports
/// in that range to outgoing connections, and the tests open thousands of
/// them in parallel, so a port the OS picked with `bind(0)` could be taken by
/// a client socket before the server binds it (seen: a cluster node failing
/// with "Address already in use").
pub(crate) fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|low| *low > 11_000)
        .unwrap_or(32_768);
    for _ in 0..1000 {
        let port = rand::random_range(10_000..low);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 10000..{low}")
}

/// A throwaway `redis-server` with its own data directory. Dropping it
/// kills that process (by PID).
pub(crate) struct Redis {
    child: Option<Child>,
    port: u16,
    /// Extra redis-server options, kept for `restart`.
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl Redis {
    /// No persistence at all.
    pub(crate) fn start() -> Redis {
        Redis::launch(&[])
    }

    /// `appendonly yes`, so `restart` keeps the data (history survives).
    pub(crate) fn start_persistent() -> Redis {
        Redis::launch(&["--appendonly", "yes"])
    }

    /// Every command in an AOF fsynced before the reply
    /// (`--appendonly yes --appendfsync always`): a SIGKILL cannot lose an
    /// acknowledged stream entry.
    pub(crate) fn start_durable() -> Redis {
        Redis::launch(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// Redis on a port the test chose (e.g. one a node already points at).
    pub(crate) fn start_on(port: u16, args: &[&str]) -> Redis {
        let mut redis = Redis::new(port, args);
        redis.restart();
        redis
    }

    fn new(port: u16, args: &[&str]) -> Redis {
        Redis {
            child: None,
            port,
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: tempfile::tempdir().expect("redis data dir"),
        }
    }

    fn launch(args: &[&str]) -> Redis {
        // redis-server has no port 0: take a free port from the OS and race
        // for it; on a lost race try another.
        let mut redis = Redis::new(0, args);
        for _ in 0..5 {
            redis.port = free_port();
            redis.child = spawn_redis(redis.port, redis.dir.path(), &redis.args);
            if redis.child.is_some() {
                return redis;
            }
        }
        panic!(
            "redis-server did not start; log:\n{}",
            std::fs::read_to_string(redis.dir.path().join("redis.log")).unwrap_or_default()
        );
    }

    pub(crate) fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Whether this test started the server and has not killed it.
    pub(crate) fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL) to simulate losing Redis.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data directory.
    pub(crate) fn restart(&mut self) {
        self.kill();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Some(child) = spawn_redis(self.port, self.dir.path(), &self.args) {
                self.child = Some(child);
                return;
            }
        }
        panic!("redis-server did not restart on port {}", self.port);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts redis-server and waits until it answers PING; `None` if it exits
/// (port taken) or stays silent.
fn spawn_redis(port: u16, dir: &std::path::Path, args: &[String]) -> Option<Child> {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(args)
        .arg("--dir")
        .arg(dir)
        .args(["--logfile", "redis.log"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server (is it installed?)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return None;
        }
        if redis_ping(port) {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// One RESP `PING` over plain TCP.
pub(crate) fn redis_ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}
