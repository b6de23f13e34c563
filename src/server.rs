//! Listeners and the per-connection task, with lean paths for `/events` and
//! `/publish`.
//!
//! Every connection starts here: we read the request head ourselves (with
//! `httparse`, into a small buffer, under a timeout). A `GET /events` is then
//! served by the lean streaming path below, a plain `POST /publish` by the
//! lean publish loop; anything else is handed, with the bytes already read,
//! to hyper and the axum router.
//!
//! Why a lean path: idle SSE connections are nearly all of a node's
//! connections, and under hyper each keeps two 8 KiB buffers for its whole
//! life. Here a stream keeps no buffer once its head is parsed: the session's
//! frames are written straight from the shared `Bytes`, and the task's
//! long-lived future holds only the socket, the session and the write in
//! flight (everything else runs in boxed futures freed before streaming). It
//! runs the very same code as the axum route ([`open_session`], the CORS
//! policy, the error bodies); only the framing differs: the response is
//! delimited by closing the connection (valid HTTP/1.1, and how every SSE
//! stream ends anyway), so no chunked encoding is needed.
//!
//! Why a lean publish path: an app service's publish is a small request on a
//! keep-alive connection, and under hyper and the router each one cost more
//! instructions in framework layers (header maps, boxed futures, body
//! channels) than in the publish itself. Here a request is parsed in place
//! and answered with one write; it runs the same code as the axum route
//! ([`publish_body`], the token check, the CORS policy, the error bodies).
//! Anything unusual (chunked bodies, `Expect`, HTTP/1.0, a bad
//! `Content-Length`) goes to hyper, which handles it as before.
//!
//! Why our own loop at all: a slow client's connection must be closable from
//! outside. When its socket buffer is full, a writer is parked on a write and
//! never polls the body again; the tasks below drop the whole connection
//! when its [`ConnectionKill`] fires.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::IntoResponse;
use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::auth::{bearer_token, AuthError};
use crate::http::{
    body_limit, open_session, publish_body, sse_headers, too_large, ApiError, AppState,
};
use crate::session::Session;

/// Closes one TCP connection when cancelled; handed to handlers through the
/// request extensions.
#[derive(Clone, Debug)]
pub struct ConnectionKill(pub CancellationToken);

/// How long a client may take to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to send a publish body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head we read; larger ones go to hyper, which answers 431.
const MAX_HEAD: usize = 16 * 1024;
/// Most request headers parsed on the lean path.
const MAX_HEADERS: usize = 64;

/// Accepts connections until `stop` fires; each connection runs on
/// `tracker` and, once `stop` fired, finishes its current response and
/// closes. With `lean`, `GET /events` takes the lean streaming path.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    lean: Option<AppState>,
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
        let lean = lean.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            // Boxed: a task's future is as large as its largest state, and
            // this task lives as long as the SSE connection.
            let opened = Box::pin(open(stream, router, lean, stop)).await;
            if let Some((stream, session)) = opened {
                stream_events(stream, session).await;
            }
        });
    }
}

/// Everything before streaming: read the head; serve non-SSE requests with
/// hyper; open the session and write the response head. Returns what the
/// streaming phase needs, or `None` when the connection is done.
async fn open(
    mut stream: TcpStream,
    router: Router,
    lean: Option<AppState>,
    stop: CancellationToken,
) -> Option<(TcpStream, Session)> {
    let Some(state) = lean else {
        serve_hyper(stream, Bytes::new(), router, stop).await;
        return None;
    };
    let mut buf = BytesMut::with_capacity(1024);
    let (mut stream, headers, query) = loop {
        let read = tokio::select! {
            _ = stop.cancelled() => return None,
            read = tokio::time::timeout(HEADER_READ_TIMEOUT, read_head(stream, buf)) => read,
        };
        match read {
            Ok(Ok(Head::Events {
                stream,
                headers,
                query,
            })) => break (stream, headers, query),
            Ok(Ok(Head::Publish {
                stream: mut conn,
                buf: mut rest,
                head,
            })) => {
                if !publish_one(&mut conn, &mut rest, head, &state, &stop).await {
                    return None;
                }
                if rest.is_empty() {
                    // An idle keep-alive connection waits for its next
                    // request as long as the client likes, but not past a
                    // drain; the head timeout starts with its first byte.
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        ready = conn.readable() => ready.ok()?,
                    }
                }
                stream = conn;
                buf = rest;
            }
            Ok(Ok(Head::Other { stream, read })) => {
                serve_hyper(stream, read, router, stop).await;
                return None;
            }
            Ok(Err(_)) | Err(_) => return None,
        }
    };
    let session = match open_session(&state, &headers, query.as_deref(), None).await {
        Ok(session) => session,
        Err(error) => {
            error.count_rejected();
            let _ = write_error(&mut stream, &state, &headers, error).await;
            return None;
        }
    };
    let mut head = String::from("HTTP/1.1 200 OK\r\nconnection: close\r\n");
    push_date(&mut head);
    let mut extra = HeaderMap::new();
    for (name, value) in sse_headers() {
        extra.insert(name, value);
    }
    state.cors.apply(&headers, &mut extra);
    push_headers(&mut head, &extra);
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    Some((stream, session))
}

/// Serves one `POST /publish` whose head is at the start of `buf`: the
/// token, then the body, then [`publish_body`], as the axum route does.
/// Leaves any pipelined bytes in `buf`. Returns whether the connection
/// stays open for another request.
async fn publish_one(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    head: PublishHead,
    state: &AppState,
    stop: &CancellationToken,
) -> bool {
    let claims = match bearer_token(&head.headers)
        .ok_or(AuthError::Missing)
        .and_then(|token| state.verifier.verify(token))
    {
        Ok(claims) => claims,
        Err(error) => {
            let _ = write_error(stream, state, &head.headers, error.into()).await;
            return false;
        }
    };
    let limit = body_limit(state);
    if head.body_len > limit {
        let _ = write_error(stream, state, &head.headers, too_large(limit)).await;
        return false;
    }
    // The whole body within one deadline, however it trickles in.
    let end = head.head_len + head.body_len;
    let deadline = tokio::time::Instant::now() + BODY_READ_TIMEOUT;
    while buf.len() < end {
        buf.reserve(end - buf.len());
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return false,
        }
    }
    let reply = match publish_body(state, &claims, &buf[head.head_len..end]).await {
        Ok(reply) => reply,
        Err(error) => {
            let _ = write_error(stream, state, &head.headers, error).await;
            return false;
        }
    };
    buf.advance(end);
    let close = head.close || stop.is_cancelled();
    let mut out = String::with_capacity(192 + reply.len());
    out.push_str("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ");
    out.push_str(itoa::Buffer::new().format(reply.len()));
    out.push_str("\r\n");
    if close {
        out.push_str("connection: close\r\n");
    }
    push_date(&mut out);
    let mut extra = HeaderMap::new();
    state.cors.apply(&head.headers, &mut extra);
    push_headers(&mut out, &extra);
    out.push_str("\r\n");
    out.push_str(&reply);
    if stream.write_all(out.as_bytes()).await.is_err() {
        return false;
    }
    if close {
        let _ = stream.shutdown().await;
        return false;
    }
    true
}

/// The lean `/events` stream: write each chunk as it comes, until the
/// session ends, the client goes away or the connection is killed.
async fn stream_events(mut stream: TcpStream, mut session: Session) {
    let mut probe = [0u8; 16];
    loop {
        tokio::select! {
            chunk = session.next_chunk() => {
                let Some(chunk) = chunk else { break };
                let written = tokio::select! {
                    written = stream.write_all(&chunk) => written,
                    _ = session.mailbox().killed() => return,
                };
                if written.is_err() {
                    return;
                }
            }
            // The client sends nothing after its request; a read returning
            // 0 means it closed, so the stream ends now, not at the next
            // failed write.
            read = stream.read(&mut probe) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}

/// What the request head turned out to be.
enum Head {
    /// `GET /events…`: served by the lean path.
    Events {
        stream: TcpStream,
        headers: HeaderMap,
        query: Option<String>,
    },
    /// A plain `POST /publish`: served by the lean publish loop. `buf`
    /// starts with the head.
    Publish {
        stream: TcpStream,
        buf: BytesMut,
        head: PublishHead,
    },
    /// Anything else, with the bytes read so far, for hyper.
    Other { stream: TcpStream, read: Bytes },
}

/// A `POST /publish` head the lean loop can serve.
struct PublishHead {
    headers: HeaderMap,
    /// Bytes of the head in the buffer.
    head_len: usize,
    /// `Content-Length` (0 when absent).
    body_len: usize,
    /// `Connection: close`: answer, then close.
    close: bool,
}

/// Reads until the request head in `buf` (which may already hold some or
/// all of it) is complete, or clearly not ours.
async fn read_head(mut stream: TcpStream, mut buf: BytesMut) -> io::Result<Head> {
    loop {
        if !buf.is_empty() {
            let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut request = httparse::Request::new(&mut parsed);
            match request.parse(&buf) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let path = request.path.unwrap_or("");
                    let (route, query) = path.split_once('?').unwrap_or((path, ""));
                    if request.method == Some("GET") && route == "/events" {
                        let headers = header_map(request.headers);
                        let query = (!query.is_empty()).then(|| query.to_owned());
                        return Ok(Head::Events {
                            stream,
                            headers,
                            query,
                        });
                    }
                    if request.method == Some("POST") && route == "/publish" {
                        if let Some(head) = publish_head(&request, head_len) {
                            return Ok(Head::Publish { stream, buf, head });
                        }
                    }
                    break;
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                // Too large, too many headers or malformed: hyper answers.
                _ => break,
            }
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(Head::Other {
        stream,
        read: buf.freeze(),
    })
}

/// The lean loop serves HTTP/1.1 requests with at most one valid
/// `Content-Length` and no `Transfer-Encoding` or `Expect`; `None` leaves
/// the rest (and their errors) to hyper.
fn publish_head(request: &httparse::Request<'_, '_>, head_len: usize) -> Option<PublishHead> {
    if request.version != Some(1) {
        return None;
    }
    let mut body_len = None;
    let mut close = false;
    for h in request.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") || h.name.eq_ignore_ascii_case("expect")
        {
            return None;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value).ok()?.trim();
            if body_len.is_some() || value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            body_len = Some(value.parse().ok()?);
        }
        if h.name.eq_ignore_ascii_case("connection") {
            close |= h
                .value
                .split(|b| *b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    Some(PublishHead {
        headers: header_map(request.headers),
        head_len,
        body_len: body_len.unwrap_or(0),
        close,
    })
}

fn header_map(parsed: &[httparse::Header<'_>]) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            headers.append(name, value);
        }
    }
    headers
}

/// Writes an API error as a complete response and closes.
async fn write_error(
    stream: &mut TcpStream,
    state: &AppState,
    request: &HeaderMap,
    error: ApiError,
) -> io::Result<()> {
    let response = error.into_response();
    let status = response.status();
    let mut headers = response.headers().clone();
    state.cors.apply(request, &mut headers);
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nconnection: close\r\ncontent-length: {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    push_date(&mut head);
    headers.remove(axum::http::header::CONTENT_LENGTH);
    push_headers(&mut head, &headers);
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// A `date:` header line, as hyper writes on every response. The text
/// changes once a second, so each thread formats it once a second.
fn push_date(out: &mut String) {
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
        out.push_str("date: ");
        out.push_str(text);
        out.push_str("\r\n");
    });
}

fn push_headers(out: &mut String, headers: &HeaderMap) {
    for (name, value) in headers {
        if let Ok(value) = value.to_str() {
            out.push_str(name.as_str());
            out.push_str(": ");
            out.push_str(value);
            out.push_str("\r\n");
        }
    }
}

/// Serves a connection with hyper and the router, replaying `read` first.
async fn serve_hyper(stream: TcpStream, read: Bytes, router: Router, stop: CancellationToken) {
    let kill = CancellationToken::new();
    let request_kill = ConnectionKill(kill.clone());
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(request_kill.clone());
        router.clone().oneshot(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let io = TokioIo::new(Rewind {
        prefix: read,
        inner: stream,
    });
    let connection = builder.serve_connection(io, service);
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
}

/// A stream that yields `prefix` before reading from `inner`: gives hyper
/// the request bytes we already read while peeking at the head.
struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
