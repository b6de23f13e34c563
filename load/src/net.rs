//! Targets, the minimal HTTP/1.1 client used to publish, and token minting.
//!
//! Only loopback targets are accepted: this tool generates real load and
//! must never point it at another machine by mistake.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::wire::{parse_head, BodyDecoder, Framing};

/// A server to connect to: `http://host:port` with an optional path prefix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Target {
    /// The URL as given, for reports.
    pub(crate) url: String,
    pub(crate) addr: SocketAddr,
    /// `Host` header value.
    pub(crate) host: String,
    /// Path prefix without a trailing slash ("" for none).
    pub(crate) prefix: String,
}

impl Target {
    pub(crate) fn parse(url: &str) -> anyhow::Result<Target> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !authority.ends_with(']')
        }) {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("{url}: cannot resolve {authority}"))?
            .next()
            .with_context(|| format!("{url}: no address for {authority}"))?;
        if !addr.ip().is_loopback() {
            bail!("{url}: refusing a non-loopback target ({addr}); herald-load only loads this machine");
        }
        Ok(Target {
            url: url.to_string(),
            addr,
            host: authority.to_string(),
            prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

/// Checks a `redis://` URL points at this machine.
pub(crate) fn check_redis_url(url: &str) -> anyhow::Result<()> {
    let rest = url
        .strip_prefix("redis://")
        .with_context(|| format!("{url}: expected redis://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let with_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:6379")
    };
    let loopback = with_port
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve"))?
        .all(|a| a.ip().is_loopback());
    if !loopback {
        bail!("{url}: refusing a non-loopback Redis");
    }
    Ok(())
}

/// Connects from `source` (a loopback alias such as 127.0.0.7) when given,
/// so tens of thousands of connections do not exhaust one address's
/// ephemeral ports.
pub(crate) async fn connect(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let (Some(src), SocketAddr::V4(_)) = (source, addr) {
        socket.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A keep-alive HTTP/1.1 connection for request/response exchanges.
pub(crate) struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A complete response.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
    pub(crate) keep_alive: bool,
}

/// A request that went out (perhaps only in part) without a complete
/// response coming back: the server may or may not have acted on it.
#[derive(Debug)]
pub(crate) struct RequestError(pub String);

impl HttpConn {
    pub(crate) async fn open(addr: SocketAddr, timeout: Duration) -> std::io::Result<HttpConn> {
        Ok(HttpConn {
            stream: connect(addr, None, timeout).await?,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Whether the server already closed this idle keep-alive connection
    /// (a node that restarted does): a request written to it would die
    /// with no answer and count as uncertain, where any HTTP client would
    /// simply open a new connection first.
    pub(crate) fn is_closed(&self) -> bool {
        let mut probe = [0u8; 1];
        // Nothing is due on an idle connection: data or EOF both mean it
        // is unusable; WouldBlock means it is still open.
        !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Sends one request (already serialized) and reads its response.
    pub(crate) async fn exchange(
        &mut self,
        request: &[u8],
        timeout: Duration,
    ) -> Result<Response, RequestError> {
        if let Err(e) = self.stream.write_all(request).await {
            return Err(RequestError(format!("write: {e}")));
        }
        match tokio::time::timeout(timeout, self.read_response()).await {
            Ok(r) => r.map_err(RequestError),
            Err(_) => Err(RequestError("response timed out".into())),
        }
    }

    async fn read_response(&mut self) -> Result<Response, String> {
        let mut chunk = [0u8; 4096];
        let (head, used) = loop {
            if let Some(done) = parse_head(&self.buf).map_err(|e| e.to_string())? {
                break done;
            }
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed before a response".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let mut body = Vec::new();
        let mut decoder = BodyDecoder::new(head.framing);
        let rest = self.buf.split_off(used);
        self.buf.clear();
        let consumed = decoder
            .decode(&rest, &mut |b| body.extend_from_slice(b))
            .map_err(|e| e.to_string())?;
        self.buf.extend_from_slice(&rest[consumed..]);
        while !decoder.is_done() {
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                if head.framing == Framing::Close {
                    break;
                }
                return Err("connection closed inside a response body".into());
            }
            let consumed = decoder
                .decode(&chunk[..n], &mut |b| body.extend_from_slice(b))
                .map_err(|e| e.to_string())?;
            self.buf.extend_from_slice(&chunk[consumed..n]);
        }
        Ok(Response {
            status: head.status,
            body,
            keep_alive: head.keep_alive,
        })
    }
}

pub(crate) fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    publish: Option<&'a [&'a str]>,
}

/// Mints an HS256 token like an application would for its users.
pub(crate) fn mint_token(
    secret: &str,
    sub: &str,
    ttl: Duration,
    publish: Option<&[&str]>,
) -> anyhow::Result<String> {
    let exp = unix_now_us() / 1_000_000 + ttl.as_secs();
    let claims = Claims { sub, exp, publish };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loopback_targets() {
        let t = Target::parse("http://127.0.0.1:8080").expect("valid");
        assert_eq!(t.addr, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(t.host, "127.0.0.1:8080");
        assert_eq!(t.prefix, "");
        let t = Target::parse("http://localhost:81/herald/").expect("valid");
        assert!(t.addr.ip().is_loopback());
        assert_eq!(t.prefix, "/herald");
        assert!(Target::parse("https://127.0.0.1").is_err());
        assert!(Target::parse("http://192.0.2.1:80").is_err());
        assert!(check_redis_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_redis_url("redis://192.0.2.1").is_err());
    }

    #[test]
    fn mints_verifiable_tokens() {
        let token =
            mint_token("s", "u1", Duration::from_secs(60), Some(&["broadcast"])).expect("mint");
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"s"),
            &validation,
        )
        .expect("valid token");
        assert_eq!(data.claims["sub"], "u1");
        assert_eq!(data.claims["publish"][0], "broadcast");
    }
}
