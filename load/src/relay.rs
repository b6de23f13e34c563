//! `herald-load relay`: the floor of an HTTP publish hop.
//!
//! A publish through a node's HTTP API costs the node one wake-up to read
//! the request, a write of the publish script to Redis, one wake-up for
//! Redis's reply and a write of the HTTP response. The relay does exactly
//! that and nothing else — no authentication, no validation, no metrics, one
//! thread, one Redis connection per client connection, hand-written RESP —
//! so its CPU per publish is the least any node can spend on that hop on
//! this machine. `load/compare` runs it in place of the nodes' publish API to
//! show how far Herald is from that floor; [`crate::deliver`] is the same
//! for the delivering side.
//!
//! It is a measuring instrument, not a server: it trusts its input, answers
//! every request with the id Redis returned, and closes a connection on
//! anything it does not understand.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where the relay listens and what it writes to Redis.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct RelayArgs {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub(crate) listen: SocketAddr,
    /// The Redis the nodes use.
    #[arg(long)]
    pub(crate) redis_url: String,
    /// Key prefix (the nodes' --channel-prefix).
    #[arg(long, default_value = "herald")]
    pub(crate) channel_prefix: String,
    /// History size passed to the publish script.
    #[arg(long, default_value_t = 1000)]
    pub(crate) history_size: u64,
    /// History TTL passed to the publish script.
    #[arg(long, default_value = "24h", value_parser = crate::parse_duration)]
    pub(crate) history_ttl: std::time::Duration,
}

/// Runs the relay until the process is killed.
pub(crate) fn run(args: RelayArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

struct Shared {
    redis: SocketAddr,
    sha: String,
    prefix: String,
    size: String,
    ttl: String,
}

async fn serve(args: RelayArgs) -> anyhow::Result<()> {
    // It answers anyone without a token: never beyond this machine.
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "the relay listens on loopback addresses only"
    );
    let redis = redis_addr(&args.redis_url).await?;
    let client = redis::Client::open(args.redis_url.as_str()).context("redis URL")?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(herald::broker::redis::PUBLISH_SCRIPT)
        .query_async(&mut conn)
        .await
        .context("loading the publish script")?;
    let shared = std::rc::Rc::new(Shared {
        redis,
        sha,
        prefix: args.channel_prefix,
        size: args.history_size.to_string(),
        ttl: args.history_ttl.as_secs().max(1).to_string(),
    });
    let listener = TcpListener::bind(args.listen).await?;
    println!("relay listening on http://{}", listener.local_addr()?);
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            loop {
                let (stream, _) = listener.accept().await?;
                let shared = shared.clone();
                tokio::task::spawn_local(async move {
                    if let Err(e) = connection(stream, &shared).await {
                        eprintln!("relay: connection closed: {e:#}");
                    }
                });
            }
        })
        .await
}

#[derive(serde::Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    channel: &'a str,
    #[serde(default, borrow)]
    event: Option<&'a str>,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

async fn connection(mut client: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    client.set_nodelay(true)?;
    let mut redis = TcpStream::connect(shared.redis).await?;
    redis.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut reply = Vec::with_capacity(256);
    let mut out = Vec::with_capacity(512);
    loop {
        // One request: head, then Content-Length bytes of body.
        let (head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(n) = req.parse(&buf)? {
                let len = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .context("content-length")?;
                break (n, len);
            }
            if read_more(&mut client, &mut buf).await? == 0 {
                return Ok(());
            }
        };
        while buf.len() < head_len + body_len {
            if read_more(&mut client, &mut buf).await? == 0 {
                return Ok(());
            }
        }
        let body: Body = serde_json::from_slice(&buf[head_len..head_len + body_len])?;
        out.clear();
        let history = format!("{}:{{{}}}:h", shared.prefix, body.channel);
        let channel = format!("{}:{{{}}}", shared.prefix, body.channel);
        let args: [&[u8]; 9] = [
            b"EVALSHA",
            shared.sha.as_bytes(),
            b"2",
            history.as_bytes(),
            channel.as_bytes(),
            body.event.unwrap_or("").as_bytes(),
            body.data.get().as_bytes(),
            shared.size.as_bytes(),
            shared.ttl.as_bytes(),
        ];
        write_command(&mut out, &args);
        redis.write_all(&out).await?;
        buf.drain(..head_len + body_len);
        let id = read_bulk(&mut redis, &mut reply).await?;
        let json = format!("{{\"id\":\"{id}\"}}");
        out.clear();
        out.extend_from_slice(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
                json.len()
            )
            .as_bytes(),
        );
        client.write_all(&out).await?;
    }
}

/// Appends a RESP command (an array of bulk strings) to `out`.
pub(crate) fn write_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// The TCP address of a `redis://` URL.
pub(crate) async fn redis_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let client = redis::Client::open(url).context("redis URL")?;
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => tokio::net::lookup_host((host.as_str(), *port))
            .await?
            .next()
            .context("redis address"),
        _ => anyhow::bail!("plain TCP to Redis only"),
    }
}

pub(crate) async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<usize> {
    if buf.len() > 1 << 20 {
        anyhow::bail!("request too large");
    }
    buf.reserve(4096);
    Ok(stream.read_buf(buf).await?)
}

/// Reads one RESP bulk string reply (`$<n>\r\n<bytes>\r\n`).
async fn read_bulk(redis: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<String> {
    buf.clear();
    loop {
        if let Some(id) = parse_bulk(buf)? {
            return Ok(id);
        }
        if read_more(redis, buf).await? == 0 {
            anyhow::bail!("redis closed the connection");
        }
    }
}

/// A complete bulk string reply in `buf`, `None` while incomplete.
fn parse_bulk(buf: &[u8]) -> anyhow::Result<Option<String>> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..eol])?;
    let Some(len) = line.strip_prefix('$') else {
        anyhow::bail!("redis: {line}");
    };
    let len: usize = len.parse().context("bulk length")?;
    if buf.len() < eol + 2 + len + 2 {
        return Ok(None);
    }
    Ok(Some(
        std::str::from_utf8(&buf[eol + 2..eol + 2 + len])?.to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_bulk;

    #[test]
    fn bulk_replies_parse_only_when_complete() {
        assert_eq!(
            parse_bulk(b"$15\r\n1795324261099-0").expect("incomplete is not an error"),
            None
        );
        assert_eq!(
            parse_bulk(b"$15\r\n1795324261099-0\r\n")
                .expect("complete")
                .as_deref(),
            Some("1795324261099-0")
        );
        assert_eq!(parse_bulk(b"$1").expect("incomplete is not an error"), None);
        let err = parse_bulk(b"-NOSCRIPT No matching script\r\n").expect_err("an error reply");
        assert!(err.to_string().contains("NOSCRIPT"), "{err}");
    }
}
