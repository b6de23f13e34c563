//! A `redis-server` on a port the test chooses, with the options it needs.
//!
//! `common::Redis` covers the usual case (a free port, optional AOF). The
//! failure tests need more: start Redis on a port a node already points at
//! (node up before Redis), and an AOF that is fsynced on every write, so a
//! SIGKILL cannot lose an acknowledged stream entry.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long redis-server may take to answer PING after a (re)start.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A port nothing listens on right now (the OS picked it; it may be taken
/// again before it is used, which the tests accept as very unlikely).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port()
}

/// A `redis-server` child process with its own data directory. Dropping it
/// kills that process (by PID).
pub(crate) struct RedisServer {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts Redis on `port` with `args` (e.g. `["--appendonly", "yes"]`)
    /// and waits until it answers PING; panics (with its log) otherwise.
    pub(crate) fn start_on(port: u16, args: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port,
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: tempfile::tempdir().expect("redis data dir"),
        };
        server.spawn();
        server
    }

    /// Redis on a free port, writing every command to an AOF fsynced before
    /// the reply (`--appendonly yes --appendfsync always`).
    pub(crate) fn start_durable() -> RedisServer {
        RedisServer::start_on(
            free_port(),
            &["--appendonly", "yes", "--appendfsync", "always"],
        )
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL: no shutdown save, no goodbye to clients.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, options and data directory.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        // A just-killed server's port can take a moment to free up.
        while Instant::now() < deadline {
            let mut child = Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(&self.args)
                .arg("--dir")
                .arg(self.dir.path())
                .args(["--logfile", "redis.log"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server (is it installed?)");
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                if super::redis_ping(self.port) {
                    self.child = Some(child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "redis-server did not start on port {}; log:\n{}",
            self.port,
            std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
