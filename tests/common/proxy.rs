//! A TCP proxy between a node and Redis that can fail silently.
//!
//! `blackhole_existing` stops forwarding Redis → node bytes on every
//! connection opened so far while keeping those sockets open (what a
//! half-dead NAT entry or a stuck middlebox looks like to the node: the
//! connection is "up" but nothing arrives). Bytes the node sends still reach
//! Redis, and connections accepted afterwards are forwarded normally, so a
//! node that notices and reconnects recovers through the same proxy.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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

#[derive(Default)]
struct Shared {
    /// How many client connections were accepted so far.
    accepted: AtomicUsize,
    /// Per connection: set to drop its Redis → client bytes.
    blackholes: Mutex<Vec<Arc<AtomicBool>>>,
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
        for flag in self.shared.blackholes.lock().expect("proxy lock").iter() {
            flag.store(true, Ordering::SeqCst);
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
        let blackhole = Arc::new(AtomicBool::new(false));
        // Registered before the count goes up, so a test that saw the count
        // can rely on `blackhole_existing` covering the connection.
        shared
            .blackholes
            .lock()
            .expect("proxy lock")
            .push(blackhole.clone());
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let task = tokio::spawn(forward(client, upstream, blackhole));
        shared
            .tasks
            .lock()
            .expect("proxy lock")
            .push(task.abort_handle());
    }
}

/// Pumps both directions until either side closes.
async fn forward(client: TcpStream, upstream: u16, blackhole: Arc<AtomicBool>) {
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
    let to_client = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Read and discard rather than stop reading, so Redis never
            // sees back-pressure and cuts the client for its output buffer.
            if blackhole.load(Ordering::SeqCst) {
                continue;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = to_server => {}
        _ = to_client => {}
    }
}
