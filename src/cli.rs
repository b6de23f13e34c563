//! `herald publish`: sends one message through a node's `POST /publish`, so
//! it takes exactly the path app services take; or, with `--redis-url`,
//! straight into Redis with the publish script, as a Rust app would.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use axum::http::{header, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::broker::redis::RedisConfig;
use crate::config::PublishArgs;

/// Publishes `args.data` to `args.channel` and prints the reply.
pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let data: serde_json::Value = serde_json::from_str(&args.data)
        .unwrap_or_else(|_| serde_json::Value::String(args.data.clone()));
    let backbone = &args.backbone;
    if let Some(config) = RedisConfig::from_flags(backbone, Duration::from_secs(5)) {
        let publisher = if backbone.redis_cluster {
            crate::Publisher::redis_cluster(config, backbone.max_payload)?
        } else {
            crate::Publisher::redis(config, backbone.max_payload)?
        };
        let message = crate::Message::new(args.channel.clone(), args.event.as_deref(), &data);
        let id = publisher.publish(message).await?;
        println!("{}", json!({ "id": id.to_string() }));
        return Ok(());
    }
    let token = match (&args.token, args.keys.jwt_secret.first()) {
        (Some(token), _) => token.clone(),
        (None, Some(secret)) => crate::auth::mint(
            secret,
            "herald-cli",
            Vec::new(),
            vec![args.channel.clone()],
            Duration::from_secs(60),
        )?,
        (None, None) => bail!("give --token, or --jwt-secret to mint one"),
    };
    let mut body = json!({ "channel": args.channel, "data": data });
    if let Some(event) = &args.event {
        body["event"] = json!(event);
    }
    let (status, reply) = post_json(&args.url, "/publish", &token, &body.to_string()).await?;
    if !status.is_success() {
        bail!("{status}: {reply}");
    }
    println!("{reply}");
    Ok(())
}

/// A minimal HTTP/1.1 POST (plain http only, as nodes listen behind a proxy).
async fn post_json(
    base: &str,
    path: &str,
    token: &str,
    body: &str,
) -> anyhow::Result<(axum::http::StatusCode, String)> {
    let uri: Uri = base.parse().with_context(|| format!("bad --url {base}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("--url must be http://host:port");
    }
    let host = uri.host().ok_or_else(|| anyhow!("--url has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::HOST, format!("{host}:{port}"))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_owned())))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
