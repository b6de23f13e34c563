//! `herald-load deliver`: the floor of a delivery hop.
//!
//! The other half of [`crate::relay`]. A node holding a user's connection
//! costs, per message, one wake-up to read it from its Redis pub/sub
//! connection and one write to the user's socket. This process does that
//! and nothing else: it takes `GET /events` with the `herald_token` cookie,
//! reads the `sub` from the token without verifying it, subscribes to the
//! user's channel on one hand-written RESP pub/sub connection, sends
//! `herald.ready` once Redis confirmed the subscription, then writes each
//! published message's `data` as an SSE event. No cursor, no history, no
//! auth, no heartbeats, no metrics, one thread.
//!
//! With relays taking the publishes and these processes holding the
//! clients, `load/compare` measures the cheapest a publish-on-one-process,
//! deliver-from-another path through Redis can be on this machine. Like the
//! relay it is an instrument: it trusts its input and listens on loopback
//! only.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// Where the process listens and which Redis it subscribes to.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct DeliverArgs {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub(crate) listen: SocketAddr,
    /// The Redis the publishers use.
    #[arg(long)]
    pub(crate) redis_url: String,
    /// Key prefix (the nodes' --channel-prefix).
    #[arg(long, default_value = "herald")]
    pub(crate) channel_prefix: String,
    /// Cookie that carries the client token.
    #[arg(long, default_value = "herald_token")]
    pub(crate) cookie_name: String,
}

/// Runs until the process is killed.
pub(crate) fn run(args: DeliverArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, serve(args))
}

/// Who waits for what on the one pub/sub connection.
#[derive(Default)]
struct Routes {
    /// Channel → the connections subscribed to it.
    streams: HashMap<Vec<u8>, Vec<mpsc::UnboundedSender<Bytes>>>,
    /// Channel → connections waiting for Redis to confirm the subscription.
    confirming: HashMap<Vec<u8>, Vec<oneshot::Sender<()>>>,
}

async fn serve(args: DeliverArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "deliver listens on loopback addresses only"
    );
    let redis = crate::relay::redis_addr(&args.redis_url).await?;
    let pubsub = TcpStream::connect(redis)
        .await
        .context("connecting to Redis")?;
    pubsub.set_nodelay(true)?;
    let (reader, mut writer) = pubsub.into_split();
    let routes = Rc::new(RefCell::new(Routes::default()));
    // SUBSCRIBE commands, written in order by one task.
    let (commands, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::task::spawn_local(async move {
        while let Some(command) = queue.recv().await {
            if writer.write_all(&command).await.is_err() {
                return;
            }
        }
    });
    tokio::task::spawn_local(read_pubsub(reader, routes.clone()));

    let listener = TcpListener::bind(args.listen).await?;
    println!("deliver listening on http://{}", listener.local_addr()?);
    let args = Rc::new(args);
    loop {
        let (stream, _) = listener.accept().await?;
        let (routes, commands, args) = (routes.clone(), commands.clone(), args.clone());
        tokio::task::spawn_local(async move {
            if let Err(e) = connection(stream, &routes, &commands, &args).await {
                eprintln!("deliver: connection closed: {e:#}");
            }
        });
    }
}

async fn connection(
    mut client: TcpStream,
    routes: &RefCell<Routes>,
    commands: &mpsc::UnboundedSender<Vec<u8>>,
    args: &DeliverArgs,
) -> anyhow::Result<()> {
    client.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(1024);
    let sub = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(_) = req.parse(&buf)? {
            let token = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
                .filter_map(|h| std::str::from_utf8(h.value).ok())
                .flat_map(|v| v.split(';'))
                .find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == args.cookie_name).then_some(v)
                })
                .context("no token cookie")?;
            break token_sub(token)?;
        }
        if crate::relay::read_more(&mut client, &mut buf).await? == 0 {
            return Ok(());
        }
    };
    let channel = format!("{}:{{user:{sub}}}", args.channel_prefix).into_bytes();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (confirmed, wait) = oneshot::channel();
    {
        let mut routes = routes.borrow_mut();
        routes.streams.entry(channel.clone()).or_default().push(tx);
        routes
            .confirming
            .entry(channel.clone())
            .or_default()
            .push(confirmed);
    }
    let mut subscribe = Vec::new();
    crate::relay::write_command(&mut subscribe, &[b"SUBSCRIBE", &channel]);
    commands.send(subscribe)?;
    wait.await.context("the pub/sub connection ended")?;
    client
        .write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n\
              event: herald.ready\ndata: {}\n\n",
        )
        .await?;
    while let Some(frame) = rx.recv().await {
        client.write_all(&frame).await?;
    }
    Ok(())
}

/// The `sub` claim of a JWT, read without checking the signature.
fn token_sub(token: &str) -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    struct Claims {
        sub: String,
    }
    let payload = token.split('.').nth(1).context("not a JWT")?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    Ok(serde_json::from_slice::<Claims>(&json)?.sub)
}

/// Reads pub/sub pushes: confirms subscriptions, forwards messages.
async fn read_pubsub(mut reader: tokio::net::tcp::OwnedReadHalf, routes: Rc<RefCell<Routes>>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.reserve(16 * 1024);
        match reader.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
        let mut used = 0;
        while let Some((parts, n)) = parse_push(&buf[used..]) {
            used += n;
            let mut routes = routes.borrow_mut();
            match parts.as_slice() {
                [kind, channel, _] if kind == b"subscribe" => {
                    for waiter in routes.confirming.remove(*channel).unwrap_or_default() {
                        let _ = waiter.send(());
                    }
                }
                [kind, channel, payload] if kind == b"message" => {
                    if let (Some(streams), Some(frame)) =
                        (routes.streams.get(*channel), sse_frame(payload))
                    {
                        for stream in streams {
                            let _ = stream.send(frame.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        buf.drain(..used);
    }
}

/// An envelope as one SSE event: its id and its data.
fn sse_frame(envelope: &[u8]) -> Option<Bytes> {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(default)]
        id: Option<&'a str>,
        #[serde(borrow)]
        data: &'a serde_json::value::RawValue,
    }
    let envelope: Envelope = serde_json::from_slice(envelope).ok()?;
    let mut frame = Vec::with_capacity(envelope.data.get().len() + 48);
    if let Some(id) = envelope.id {
        frame.extend_from_slice(b"id: ");
        frame.extend_from_slice(id.as_bytes());
        frame.push(b'\n');
    }
    frame.extend_from_slice(b"data: ");
    frame.extend_from_slice(envelope.data.get().as_bytes());
    frame.extend_from_slice(b"\n\n");
    Some(frame.into())
}

/// One complete RESP array of bulk strings and integers at the start of
/// `buf` (a pub/sub push), as its parts and its length; `None` while
/// incomplete.
fn parse_push(buf: &[u8]) -> Option<(Vec<&[u8]>, usize)> {
    let (count, mut at) = line(buf, 0, b'*')?;
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        match buf.get(at)? {
            b'$' => {
                let (len, start) = line(buf, at, b'$')?;
                let end = start.checked_add(len)?;
                if buf.len() < end + 2 {
                    return None;
                }
                parts.push(&buf[start..end]);
                at = end + 2;
            }
            b':' => {
                let eol = find_crlf(buf, at)?;
                parts.push(&buf[at + 1..eol]);
                at = eol + 2;
            }
            _ => return None,
        }
    }
    Some((parts, at))
}

/// `<tag><number>\r\n` at `at`: the number and where the next item starts.
fn line(buf: &[u8], at: usize, tag: u8) -> Option<(usize, usize)> {
    if *buf.get(at)? != tag {
        return None;
    }
    let eol = find_crlf(buf, at)?;
    let n = std::str::from_utf8(&buf[at + 1..eol]).ok()?.parse().ok()?;
    Some((n, eol + 2))
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_parse_only_when_complete() {
        let push = b"*3\r\n$7\r\nmessage\r\n$3\r\nch1\r\n$5\r\nhello\r\n*3\r\n$9\r\nsubscribe";
        let (parts, n) = parse_push(push).expect("the first push is complete");
        assert_eq!(parts, [&b"message"[..], b"ch1", b"hello"]);
        assert_eq!(parse_push(&push[n..]), None);
        let (parts, _) =
            parse_push(b"*3\r\n$9\r\nsubscribe\r\n$3\r\nch1\r\n:1\r\n").expect("complete");
        assert_eq!(parts, [&b"subscribe"[..], b"ch1", b"1"]);
    }

    #[test]
    fn envelopes_become_events_and_tokens_give_their_sub() {
        let frame = sse_frame(br#"{"id":"1-0","data":{"seq":3},"ts":1}"#).expect("envelope");
        assert_eq!(&frame[..], b"id: 1-0\ndata: {\"seq\":3}\n\n");
        assert_eq!(sse_frame(b"not json"), None);
        let token = herald::auth::mint(
            "s",
            "u7",
            vec![],
            vec![],
            std::time::Duration::from_secs(60),
        )
        .expect("mint");
        assert_eq!(token_sub(&token).expect("sub"), "u7");
    }
}
