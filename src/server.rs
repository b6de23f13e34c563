//! Listeners and the per-connection HTTP task.
//!
//! We run hyper's HTTP/1 connections ourselves rather than `axum::serve` for
//! one reason: a slow client's connection must be closable from outside.
//! When its socket buffer is full, hyper is parked on a write and never polls
//! the body again, so ending the body stream would not free anything; the
//! task below drops the whole connection when its [`ConnectionKill`] fires.

use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Closes one TCP connection when cancelled; handed to handlers through the
/// request extensions.
#[derive(Clone, Debug)]
pub struct ConnectionKill(pub CancellationToken);

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until `stop` fires; each connection runs on
/// `tracker` and, once `stop` fired, finishes its current response and closes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Usually EMFILE: back off instead of spinning; the
                // connection limit keeps this rare.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let kill = CancellationToken::new();
            let request_kill = ConnectionKill(kill.clone());
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(request_kill.clone());
                let router = router.clone();
                router.oneshot(request)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = kill.cancelled() => {}
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        _ = kill.cancelled() => {}
                    }
                }
            }
        });
    }
}
