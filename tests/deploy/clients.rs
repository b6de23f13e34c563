//! Drivers for the real clients in `tests/e2e/` (Node.js): many `eventsource`
//! clients in one process (`clients.mjs`) and headless Chromium on the demo
//! page (`browser.mjs`). Both speak JSON lines on stdout; `clients.mjs`
//! also takes commands on stdin.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cluster::repo;

/// `tests/e2e/`, with its `node_modules` installed (tests/run does that).
fn e2e_dir() -> PathBuf {
    let dir = repo().join("tests/e2e");
    assert!(
        dir.join("node_modules/eventsource").is_dir()
            && dir.join("node_modules/playwright-core").is_dir(),
        "tests/e2e/node_modules is missing: run tests/run, or `npm ci --prefix tests/e2e`"
    );
    dir
}

/// A Node.js script with piped stdio: parsed stdout lines arrive on a
/// channel, stderr is kept for failure messages.
pub(crate) struct Script {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<Value>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Script {
    pub(crate) fn spawn(script: &str, config: &Value) -> Script {
        let dir = e2e_dir();
        let mut child = Command::new("node")
            .arg(dir.join(script))
            .arg(config.to_string())
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node (is Node.js installed? tests/run installs it)");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({ "type": "unparsed", "line": line }));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let tail = Arc::clone(&stderr);
        let pipe = child.stderr.take().expect("piped stderr");
        tokio::spawn(async move {
            let mut reader = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let mut tail = tail.lock().expect("stderr lock");
                if tail.len() == 100 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let stdin = child.stdin.take();
        Script {
            child,
            stdin,
            lines,
            stderr,
        }
    }

    pub(crate) fn stderr_tail(&self) -> String {
        let tail = self.stderr.lock().expect("stderr lock");
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The next stdout line, or `None` after `timeout` or at EOF.
    pub(crate) async fn next(&mut self, timeout: Duration) -> Option<Value> {
        tokio::time::timeout(timeout, self.lines.recv())
            .await
            .ok()
            .flatten()
    }

    pub(crate) async fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("write a command to the clients script");
        stdin.flush().await.expect("flush");
    }
}

// ---------------------------------------------------------------------------
// eventsource clients
// ---------------------------------------------------------------------------

/// One client's view at the end of a test.
#[derive(Debug, Deserialize)]
pub(crate) struct ClientReport {
    pub(crate) name: String,
    /// `data` of every application message, in arrival order.
    pub(crate) received: Vec<String>,
    /// The event type of each of them.
    pub(crate) events: Vec<String>,
    /// How many `herald.ready` it saw (1 + reconnects).
    pub(crate) readies: usize,
    /// The node of each `herald.ready`, in order.
    pub(crate) nodes: Vec<String>,
    pub(crate) resets: usize,
    pub(crate) errors: usize,
    /// Gave up for good (a non-200 answer).
    pub(crate) closed: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Counts {
    pub(crate) counts: Vec<usize>,
    pub(crate) readies: Vec<usize>,
    pub(crate) closed: Vec<bool>,
}

/// A `herald.ready` seen by a client.
#[derive(Debug, Clone)]
pub(crate) struct Ready {
    pub(crate) client: usize,
    pub(crate) node: String,
    pub(crate) at: Instant,
}

/// N `eventsource` clients with the `herald_token` cookie, in one process.
pub(crate) struct Clients {
    script: Script,
    n: usize,
    /// Every `herald.ready` so far, in arrival order.
    pub(crate) readies: Vec<Ready>,
}

impl Clients {
    /// Starts a client per `(name, token)` on `events_url`.
    pub(crate) fn start(events_url: &str, clients: &[(String, String)]) -> Clients {
        let config = json!({
            "url": events_url,
            "clients": clients
                .iter()
                .map(|(name, token)| json!({ "name": name, "token": token }))
                .collect::<Vec<_>>(),
        });
        Clients {
            script: Script::spawn("clients.mjs", &config),
            n: clients.len(),
            readies: Vec::new(),
        }
    }

    /// Reads one stdout line within `timeout`: `Some(None)` for a `ready`
    /// line (recorded), `Some(Some(line))` for any other, `None` on silence.
    async fn read_line(&mut self, timeout: Duration) -> Option<Option<Value>> {
        let line = self.script.next(timeout).await?;
        if line["type"] != "ready" {
            return Some(Some(line));
        }
        self.readies.push(Ready {
            client: line["client"].as_u64().expect("client index") as usize,
            node: line["node"].as_str().expect("node id").to_string(),
            at: Instant::now(),
        });
        Some(None)
    }

    /// Reads until the reply of type `kind` to a command.
    async fn reply(&mut self, kind: &str) -> Value {
        loop {
            match self.read_line(Duration::from_secs(10)).await {
                Some(Some(line)) => {
                    assert_eq!(
                        line["type"],
                        kind,
                        "clients.mjs said {line}\nstderr:\n{}",
                        self.script.stderr_tail()
                    );
                    return line;
                }
                Some(None) => {}
                None => panic!(
                    "clients.mjs did not answer `{kind}`\nstderr:\n{}",
                    self.script.stderr_tail()
                ),
            }
        }
    }

    /// Waits until every client has seen `herald.ready` at least `n` times;
    /// returns the node of each client's latest one.
    pub(crate) async fn wait_readies(&mut self, n: usize, timeout: Duration) -> Vec<String> {
        let all: Vec<usize> = (0..self.n).collect();
        self.wait_readies_of(&all, n, timeout).await;
        self.latest_nodes()
    }

    /// The node of each client's latest `herald.ready` ("" if none yet).
    pub(crate) fn latest_nodes(&self) -> Vec<String> {
        let mut latest = vec![String::new(); self.n];
        for ready in &self.readies {
            latest[ready.client] = ready.node.clone();
        }
        latest
    }

    /// Waits until each of `which` clients has seen `herald.ready` at least
    /// `n` times.
    pub(crate) async fn wait_readies_of(&mut self, which: &[usize], n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = vec![0usize; self.n];
            for ready in &self.readies {
                seen[ready.client] += 1;
            }
            if which.iter().all(|&c| seen[c] >= n) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_line(left).await {
                Some(None) => {}
                Some(Some(line)) => panic!(
                    "clients.mjs said {line} while connecting\nstderr:\n{}",
                    self.script.stderr_tail()
                ),
                None => panic!(
                    "not every one of clients {which:?} saw {n} herald.ready within {timeout:?}: {seen:?}\nstderr:\n{}",
                    self.script.stderr_tail()
                ),
            }
        }
    }

    /// How many application messages each client has received so far.
    pub(crate) async fn counts(&mut self) -> Counts {
        self.script.send("counts").await;
        let line = self.reply("counts").await;
        serde_json::from_value(line).expect("counts line")
    }

    /// Polls `counts` until `done`; panics with the last counts after
    /// `timeout`.
    pub(crate) async fn wait_counts(
        &mut self,
        timeout: Duration,
        done: impl Fn(&Counts) -> bool,
    ) -> Counts {
        let deadline = Instant::now() + timeout;
        loop {
            let counts = self.counts().await;
            assert!(
                !counts.closed.iter().any(|&c| c),
                "a client gave up for good (EventSource CLOSED after a non-200): {counts:?}"
            );
            if done(&counts) {
                return counts;
            }
            assert!(
                Instant::now() < deadline,
                "clients did not get there within {timeout:?}: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Everything every client saw.
    pub(crate) async fn report(&mut self) -> Vec<ClientReport> {
        self.script.send("report").await;
        let line = self.reply("report").await;
        serde_json::from_value(line["clients"].clone()).expect("report line")
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        let _ = self.script.child.start_kill();
    }
}

// ---------------------------------------------------------------------------
// Chromium
// ---------------------------------------------------------------------------

/// Headless Chromium on the demo page (`browser.mjs`).
pub(crate) struct Browser {
    script: Script,
}

impl Browser {
    pub(crate) fn open(config: &Value) -> Browser {
        Browser {
            script: Script::spawn("browser.mjs", config),
        }
    }

    /// The next report line (`live`, `done` or `failed`); panics on silence.
    pub(crate) async fn next(&mut self, timeout: Duration) -> Value {
        match self.script.next(timeout).await {
            Some(line) => line,
            None => panic!(
                "browser.mjs said nothing within {timeout:?}\nstderr:\n{}",
                self.script.stderr_tail()
            ),
        }
    }

    pub(crate) fn stderr_tail(&self) -> String {
        self.script.stderr_tail()
    }

    /// Waits for the script to exit; returns whether it succeeded.
    pub(crate) async fn wait(&mut self, timeout: Duration) -> bool {
        match tokio::time::timeout(timeout, self.script.child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => false,
        }
    }
}
