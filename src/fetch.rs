//! A small HTTP/1.1 GET client for what a node fetches itself: JWKS key
//! sets and `--auth-url` answers. `http://` and `https://` (rustls with the
//! system's root certificates, the same rustls and ring that `rediss://`
//! uses), one request per connection, every answer bounded in time and size.
//!
//! Built on hyper's client connection (already a dependency) rather than a
//! full client crate: a node makes few such requests, to one or two
//! configured URLs, and needs no pooling, redirects or cookies.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, Request, StatusCode, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    /// Not an absolute `http://` or `https://` URL.
    #[error("not an http:// or https:// URL: {0}")]
    Url(String),
    /// Connect, TLS, or the exchange failed.
    #[error("{0}")]
    Io(String),
    /// No complete answer within the timeout.
    #[error("timed out")]
    Timeout,
    /// The body was over the size limit.
    #[error("answer over {0} bytes")]
    TooLarge(usize),
}

/// A complete answer.
#[derive(Debug)]
pub(crate) struct Fetched {
    /// The status.
    pub(crate) status: StatusCode,
    /// The body (at most the limit given).
    pub(crate) body: Bytes,
}

/// A client for one configured URL.
#[derive(Clone)]
pub(crate) struct Fetcher {
    uri: Uri,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").field("uri", &self.uri).finish()
    }
}

impl Fetcher {
    /// A client for `url`; fails on anything but an absolute http(s) URL.
    pub(crate) fn new(url: &str) -> Result<Fetcher, FetchError> {
        let uri: Uri = url.parse().map_err(|_| FetchError::Url(url.into()))?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => Some(tls_connector()?),
            _ => return Err(FetchError::Url(url.into())),
        };
        if uri.host().is_none() {
            return Err(FetchError::Url(url.into()));
        }
        Ok(Fetcher { uri, tls })
    }

    /// `GET` of the URL with `headers`, the whole exchange within
    /// `timeout`, the body at most `limit` bytes.
    pub(crate) async fn get(
        &self,
        headers: &[(HeaderName, HeaderValue)],
        timeout: Duration,
        limit: usize,
    ) -> Result<Fetched, FetchError> {
        tokio::time::timeout(timeout, self.exchange(headers, limit))
            .await
            .map_err(|_| FetchError::Timeout)?
    }

    async fn exchange(
        &self,
        headers: &[(HeaderName, HeaderValue)],
        limit: usize,
    ) -> Result<Fetched, FetchError> {
        let io = |e: &dyn std::fmt::Display| FetchError::Io(e.to_string());
        let host = self.uri.host().unwrap_or_default();
        let port = self
            .uri
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| io(&e))?;
        let _ = tcp.set_nodelay(true);
        let path = self
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let authority = self
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let mut request = Request::get(path).header(header::HOST, authority);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| io(&e))?;
        let response = match &self.tls {
            None => send(TokioIo::new(tcp), request).await?,
            Some(tls) => {
                let name =
                    rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| io(&e))?;
                let stream = tls.connect(name, tcp).await.map_err(|e| io(&e))?;
                send(TokioIo::new(stream), request).await?
            }
        };
        let status = response.status();
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    FetchError::TooLarge(limit)
                } else {
                    FetchError::Io(e.to_string())
                }
            })?
            .to_bytes();
        Ok(Fetched { status, body })
    }
}

async fn send<T>(
    io: T,
    request: Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, FetchError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| FetchError::Io(e.to_string()))?;
    // The connection task ends with the exchange (or when dropped with it).
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| FetchError::Io(e.to_string()))
}

/// rustls with ring and the system's root certificates.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, FetchError> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(FetchError::Io("no system root certificates found".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| FetchError::Io(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
