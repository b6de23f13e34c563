//! The HTTP/1.1 edge: accept loops and one small connection driver that
//! serves an axum [`Router`] for every route, on both listeners.
//!
//! The driver only moves bytes: it reads a request head and its body
//! ([`request`] parses both, as pure functions), hands an `http::Request` to
//! the router, and writes the response. Routes, auth, CORS, limits and the
//! JSON errors are all the router's ([`crate::http`]); nothing here knows a
//! route.
//!
//! Why our own driver rather than hyper's server:
//! - Memory. Idle SSE streams are nearly all of a node's connections. Under
//!   hyper each kept two 8 KiB buffers for its whole life; here the read
//!   buffer is freed once the request is read, and a stream's task holds
//!   only the socket, the response body and the write in flight. An event
//!   stream is close-delimited (valid HTTP/1.1, and how every SSE stream ends
//!   anyway), so no chunked encoding either.
//! - One set of deadlines for every request: the whole head within
//!   [`HEAD_TIMEOUT`], the whole body within [`BODY_TIMEOUT`], an idle
//!   keep-alive connection closed after [`KEEP_ALIVE_TIMEOUT`], a response
//!   written within [`WRITE_TIMEOUT`]; and a cap on the connections that are
//!   not event streams (`--max-http-connections`), which the hub does not
//!   count.
//! - A slow client's stream must be closable while a write to it is
//!   blocked: an event stream's response carries a [`StreamCut`], and the
//!   driver drops the connection when it fires.
//!
//! Bodies of requests are read whole before the router sees them (every
//! route takes a small JSON body or none), bounded by the configured limit.
//! Responses whose length is known are written with `Content-Length` on a
//! keep-alive connection; any other body is streamed and ends the
//! connection.

pub(crate) mod request;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, Method, StatusCode, Version};

use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::http::{error_response, StreamCut};
use request::{BodyFraming, Chunked, Head, Refusal};

/// How long a client may take to send a whole request head, counted from
/// the connection's start (first request) or the request's first byte.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to send a whole request body.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a keep-alive connection may sit idle between requests.
pub(crate) const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long writing one (non-streaming) response may take.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a listener held at its socket limit says so.
const PAUSE_WARN_EVERY: Duration = Duration::from_secs(10);

/// What the driver enforces for one listener.
#[derive(Debug, Clone)]
pub(crate) struct EdgeConfig {
    /// Largest request body; larger ones are answered 413.
    pub(crate) max_body: usize,
    /// Connections not (yet) streaming: reading a request, being answered
    /// or idle in keep-alive. Beyond it new connections get a 503.
    pub(crate) max_http_connections: usize,
    /// Sockets of every kind (streams, requests, refusals being written)
    /// the listener holds at once. At it the listener stops accepting until
    /// one closes: new connections wait in the kernel's backlog instead of
    /// failing at `accept` with EMFILE and taking the node's last
    /// descriptors (Redis, the admin listener) with them.
    pub(crate) max_sockets: usize,
}

/// Accepts connections until `stop` fires; each connection runs on
/// `tracker` and, once `stop` fired, finishes its current response and
/// closes.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    config: EdgeConfig,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let edge = Arc::new(Edge {
        router,
        config,
        stop: stop.clone(),
        http_connections: AtomicUsize::new(0),
    });
    let sockets = Arc::new(Semaphore::new(
        edge.config.max_sockets.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let mut warned: Option<Instant> = None;
    loop {
        let socket = match sockets.clone().try_acquire_owned() {
            Ok(socket) => socket,
            Err(_) => {
                // At the limit every close lets one in: say so now and then.
                if warned.is_none_or(|at| at.elapsed() >= PAUSE_WARN_EVERY) {
                    warned = Some(Instant::now());
                    tracing::warn!(
                        max_sockets = edge.config.max_sockets,
                        "listener at its socket limit (open files): \
                         accepting paused until a connection closes"
                    );
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    socket = sockets.clone().acquire_owned() => match socket {
                        Ok(socket) => socket,
                        Err(_) => return, // never closed
                    },
                }
            }
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Usually EMFILE: back off instead of spinning; the
                // connection limits keep this rare.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let edge = edge.clone();
        tracker.spawn(async move {
            let _socket = socket;
            let Some(permit) = HttpPermit::take(&edge) else {
                crate::metrics::get().rejected(crate::metrics::RejectReason::Limit);
                let mut stream = stream;
                let refusal = Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "node is at its connection limit",
                );
                let _ = write_refusal(&mut stream, &refusal).await;
                return;
            };
            // Boxed: a task's future is as large as its largest state, and
            // this task lives as long as the stream it may turn into.
            let streaming = Box::pin(edge.requests(stream, permit)).await;
            if let Some(streaming) = streaming {
                streaming.run().await;
            }
        });
    }
}

/// One listener's shared state.
struct Edge {
    router: Router,
    config: EdgeConfig,
    /// Fired when the node drains: no new request is read.
    stop: CancellationToken,
    /// Connections holding an [`HttpPermit`].
    http_connections: AtomicUsize,
}

/// A connection's place under `--max-http-connections`, given back when it
/// closes or turns into an event stream.
struct HttpPermit(Arc<Edge>);

impl HttpPermit {
    fn take(edge: &Arc<Edge>) -> Option<HttpPermit> {
        let previous = edge.http_connections.fetch_add(1, Ordering::AcqRel);
        let permit = HttpPermit(edge.clone());
        (previous < edge.config.max_http_connections).then_some(permit)
    }
}

impl Drop for HttpPermit {
    fn drop(&mut self) {
        self.0.http_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response whose body is streamed until it ends; the connection closes
/// after it.
struct Streaming {
    stream: TcpStream,
    body: Body,
    cut: Option<StreamCut>,
}

/// A request read off the wire, or why the connection ends instead.
// Lives only between reading a request and routing it; boxing the head
// would cost an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
enum Read {
    Request(Head, Bytes),
    /// Refused: answer this, then close.
    Refused(Refusal),
    /// The client went away, timed out, or the node drains: close quietly.
    Closed,
}

impl Edge {
    /// Serves requests on one connection until it closes or a response
    /// turns into a stream, which is returned for the caller to run.
    async fn requests(&self, mut stream: TcpStream, permit: HttpPermit) -> Option<Streaming> {
        let mut buf = BytesMut::with_capacity(1024);
        let mut deadline = Instant::now() + HEAD_TIMEOUT;
        loop {
            let (head, body) = match self.read_request(&mut stream, &mut buf, deadline).await {
                Read::Request(head, body) => (head, body),
                Read::Refused(refusal) => {
                    let _ = write_refusal(&mut stream, &refusal).await;
                    return None;
                }
                Read::Closed => return None,
            };
            let keep_alive = head.keep_alive && !self.stop.is_cancelled();
            let is_head = head.method == Method::HEAD;
            let http10 = head.version == Version::HTTP_10;
            let mut request = Request::new(Body::from(body));
            *request.method_mut() = head.method;
            *request.uri_mut() = head.uri;
            *request.version_mut() = head.version;
            *request.headers_mut() = head.headers;
            let Ok(response) = self.router.clone().oneshot(request).await;

            let (parts, body) = response.into_parts();
            let exact = axum::body::HttpBody::size_hint(&body).exact();
            if exact.is_none() && !is_head {
                // A streamed body (an event stream): it ends the connection.
                let mut cut_parts = parts;
                let cut = cut_parts.extensions.remove::<StreamCut>();
                let mut out = Vec::with_capacity(256);
                write_head(
                    &mut out,
                    cut_parts.status,
                    &cut_parts.headers,
                    None,
                    Some("close"),
                );
                let written = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&out)).await;
                if !matches!(written, Ok(Ok(()))) {
                    return None;
                }
                drop(permit);
                return Some(Streaming { stream, body, cut });
            }
            let bytes = if is_head {
                Bytes::new()
            } else {
                match whole(body).await {
                    Some(bytes) => bytes,
                    None => return None,
                }
            };
            let length = exact.unwrap_or(0) as usize;
            let mut out = Vec::with_capacity(192 + bytes.len());
            let connection = match (keep_alive, http10) {
                (false, _) => Some("close"),
                // HTTP/1.0 closes unless told otherwise, in the answer too.
                (true, true) => Some("keep-alive"),
                (true, false) => None,
            };
            write_head(
                &mut out,
                parts.status,
                &parts.headers,
                Some(length),
                connection,
            );
            out.extend_from_slice(&bytes);
            let written = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&out)).await;
            if !matches!(written, Ok(Ok(()))) || !keep_alive {
                let _ = stream.shutdown().await;
                return None;
            }
            if buf.is_empty() {
                // Idle keep-alive: wait for the next request's first byte,
                // but not forever and not past a drain. The buffer is given
                // back meanwhile.
                buf = BytesMut::new();
                // Bytes already here are a request the client sent before
                // it could know of the drain: answer it (with `close`)
                // rather than drop it unread, which resets the connection
                // and leaves the client unsure whether it was acted on.
                let ready = tokio::select! {
                    biased;
                    ready = tokio::time::timeout(KEEP_ALIVE_TIMEOUT, stream.readable()) => ready,
                    _ = self.stop.cancelled() => return None,
                };
                if !matches!(ready, Ok(Ok(()))) {
                    return None;
                }
                buf.reserve(1024);
            }
            deadline = Instant::now() + HEAD_TIMEOUT;
        }
    }

    /// Reads one request's head (by `deadline`) and its whole body (within
    /// [`BODY_TIMEOUT`]), leaving any pipelined bytes in `buf`.
    async fn read_request(
        &self,
        stream: &mut TcpStream,
        buf: &mut BytesMut,
        deadline: Instant,
    ) -> Read {
        let head = loop {
            if !buf.is_empty() {
                match request::parse_head(buf) {
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                    Err(refusal) => return Read::Refused(refusal),
                }
            }
            if !self.read_more(stream, buf, deadline).await {
                return Read::Closed;
            }
        };
        buf.advance(head.len);
        let limit = self.config.max_body;
        let deadline = Instant::now() + BODY_TIMEOUT;
        if let BodyFraming::Length(n) = head.body {
            if n > limit as u64 {
                return Read::Refused(request::body_too_large());
            }
        }
        if head.expect_continue && head.body != BodyFraming::Length(0) && buf.is_empty() {
            let go = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            if !matches!(tokio::time::timeout_at(deadline, go).await, Ok(Ok(()))) {
                return Read::Closed;
            }
        }
        let body = match head.body {
            BodyFraming::Length(n) => {
                let n = n as usize;
                while buf.len() < n {
                    buf.reserve(n - buf.len());
                    if !self.read_more(stream, buf, deadline).await {
                        return Read::Closed;
                    }
                }
                buf.split_to(n).freeze()
            }
            BodyFraming::Chunked => {
                let mut decoder = Chunked::default();
                let mut body = BytesMut::new();
                loop {
                    match decoder.decode(buf, &mut body, limit) {
                        Ok(true) => break,
                        Ok(false) => {}
                        Err(refusal) => return Read::Refused(refusal),
                    }
                    if !self.read_more(stream, buf, deadline).await {
                        return Read::Closed;
                    }
                }
                body.freeze()
            }
        };
        Read::Request(head, body)
    }

    /// Reads more bytes into `buf`; `false` when the client closed, the
    /// deadline passed, or the node drains before a request began. A
    /// request that began (bytes in `buf`, or already in the socket) is
    /// read to its end within its deadline, drain or not, so that it is
    /// answered: dropping it unread would reset the connection with the
    /// client unsure whether it was acted on.
    async fn read_more(
        &self,
        stream: &mut TcpStream,
        buf: &mut BytesMut,
        deadline: Instant,
    ) -> bool {
        if buf.capacity() == buf.len() {
            buf.reserve(1024);
        }
        let began = !buf.is_empty();
        let read = tokio::time::timeout_at(deadline, stream.read_buf(buf));
        tokio::select! {
            biased;
            read = read => matches!(read, Ok(Ok(n)) if n > 0),
            _ = self.stop.cancelled(), if !began => false,
        }
    }
}

impl Streaming {
    /// Writes each chunk of the body as it comes, until it ends, the client
    /// goes away or the stream is cut.
    async fn run(self) {
        let Streaming {
            mut stream,
            mut body,
            cut,
        } = self;
        let mut probe = [0u8; 16];
        loop {
            tokio::select! {
                frame = body.frame() => {
                    let Some(Ok(frame)) = frame else { break };
                    let Ok(chunk) = frame.into_data() else { continue };
                    let written = match &cut {
                        Some(cut) => tokio::select! {
                            written = stream.write_all(&chunk) => written,
                            _ = cut.cut() => return,
                        },
                        None => stream.write_all(&chunk).await,
                    };
                    if written.is_err() {
                        return;
                    }
                }
                // The client sends nothing after its request; a read
                // returning 0 means it closed, so the stream ends now, not
                // at the next failed write.
                read = stream.read(&mut probe) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        return;
                    }
                }
            }
        }
        let _ = stream.shutdown().await;
    }
}

/// A body of known length as one `Bytes`: its only data frame as is (what
/// every route's body is), or the frames joined.
async fn whole(mut body: Body) -> Option<Bytes> {
    let mut first = Bytes::new();
    let mut rest = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.ok()?.into_data() else {
            continue;
        };
        if first.is_empty() {
            first = data;
        } else {
            if rest.is_empty() {
                rest.extend_from_slice(&first);
            }
            rest.extend_from_slice(&data);
        }
    }
    Some(if rest.is_empty() {
        first
    } else {
        rest.freeze()
    })
}

/// Writes a refusal as a complete JSON error response and closes.
async fn write_refusal(stream: &mut TcpStream, refusal: &Refusal) -> io::Result<()> {
    if !refusal.answer {
        return stream.shutdown().await;
    }
    let response = error_response(refusal.status, refusal.message);
    let (parts, body) = response.into_parts();
    let body = whole(body).await.unwrap_or_default();
    let mut out = Vec::with_capacity(192 + body.len());
    write_head(
        &mut out,
        parts.status,
        &parts.headers,
        Some(body.len()),
        Some("close"),
    );
    out.extend_from_slice(&body);
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&out))
        .await
        .map_err(|_| io::ErrorKind::TimedOut)??;
    stream.shutdown().await
}

/// A response head: status line, the response's own headers, `date:`, and
/// the framing the driver chose: `content-length` (or none, for a body the
/// close delimits) and the `connection` header to send, if any.
fn write_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    length: Option<usize>,
    connection: Option<&str>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        // The driver frames the message itself.
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    push_date(out);
    if let Some(length) = length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(connection) = connection {
        out.extend_from_slice(b"connection: ");
        out.extend_from_slice(connection.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A `date:` header line, as RFC 9110 asks of an origin server. The text
/// changes once a second, so each thread formats it once a second.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(cached, text)| {
        if *cached != second {
            *cached = second;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_head_frames_by_length_or_by_close() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        headers.insert(header::CONTENT_LENGTH, "999".parse().unwrap());
        let mut out = Vec::new();
        write_head(&mut out, StatusCode::OK, &headers, Some(2), None);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"));
        assert!(text.contains("\r\ncontent-length: 2\r\n"));
        assert!(!text.contains("999") && !text.contains("connection"));
        assert!(text.ends_with("\r\n\r\n"));
        let mut out = Vec::new();
        write_head(
            &mut out,
            StatusCode::OK,
            &HeaderMap::new(),
            None,
            Some("close"),
        );
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("content-length") && text.contains("connection: close\r\n"));
    }
}
