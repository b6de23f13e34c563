//! A TCP proxy between a node and Redis that can fail silently.
//!
//! `blackhole_existing` stops forwarding Redis → node bytes on every
//! connection opened so far while keeping those sockets open (what a
//! half-dead NAT entry or a stuck middlebox looks like to the node: the
//! connection is "up" but nothing arrives). Bytes the node sends still reach
//! Redis, and connections accepted afterwards are forwarded normally, so a
//! node that notices and reconnects recovers through the same proxy.
//!
//! `lag_existing` instead delays those bytes by a fixed time: a connection
//! that still delivers everything, only late (a node reading a backlog).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// A running proxy on `127.0.0.1:<port>` to `127.0.0.1:<upstream>`.
/// Dropping it stops accepting and cuts every proxied connection.
pub(crate) struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

/// One connection's fault.
#[derive(Default)]
struct Fault {
    /// Drop Redis → client bytes.
    blackhole: AtomicBool,
    /// Deliver Redis → client bytes this many ms after they arrived.
    lag_ms: AtomicU64,
}

#[derive(Default)]
struct Shared {
    /// How many client connections were accepted so far.
    accepted: AtomicUsize,
    /// Per connection: what happens to its Redis → client bytes.
    faults: Mutex<Vec<Arc<Fault>>>,
    /// Connection tasks, aborted when the proxy is dropped.
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Proxy {
    /// Starts proxying to Redis on `upstream`.
    pub(crate) async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        Proxy {
            port,
            shared,
            accept,
        }
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `redis://` URL through the proxy.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub(crate) fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Silently stops delivering Redis → client bytes on every connection
    /// open now; later connections are unaffected.
    pub(crate) fn blackhole_existing(&self) {
        for fault in self.shared.faults.lock().expect("proxy lock").iter() {
            fault.blackhole.store(true, Ordering::SeqCst);
        }
    }

    /// Delivers Redis → client bytes `lag` late on every connection open
    /// now (all of them, in order); later connections are unaffected.
    pub(crate) fn lag_existing(&self, lag: Duration) {
        for fault in self.shared.faults.lock().expect("proxy lock").iter() {
            fault.lag_ms.store(lag.as_millis() as u64, Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self.shared.tasks.lock().expect("proxy lock").iter() {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: u16, shared: Arc<Shared>) {
    while let Ok((client, _)) = listener.accept().await {
        let fault = Arc::new(Fault::default());
        // Registered before the count goes up, so a test that saw the count
        // can rely on `blackhole_existing` covering the connection.
        shared
            .faults
            .lock()
            .expect("proxy lock")
            .push(fault.clone());
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let task = tokio::spawn(forward(client, upstream, fault));
        shared
            .tasks
            .lock()
            .expect("proxy lock")
            .push(task.abort_handle());
    }
}

/// Pumps both directions until either side closes.
async fn forward(client: TcpStream, upstream: u16, fault: Arc<Fault>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let to_server = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    };
    // Redis → client bytes, stamped when read, written once their lag is up.
    let (late, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let from_server = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Read and discard rather than stop reading, so Redis never
            // sees back-pressure and cuts the client for its output buffer.
            if fault.blackhole.load(Ordering::SeqCst) {
                continue;
            }
            let lag = Duration::from_millis(fault.lag_ms.load(Ordering::SeqCst));
            if late
                .send((tokio::time::Instant::now() + lag, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    };
    let to_client = async {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if client_write.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = to_server => {}
        _ = from_server => {}
        _ = to_client => {}
    }
}
