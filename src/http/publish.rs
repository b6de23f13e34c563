//! `POST /publish`: the HTTP publish API for app services.
//!
//! Only `Authorization: Bearer` is accepted here, never the browser cookie,
//! so a page cannot be tricked into publishing with a visitor's cookie.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use http_body_util::BodyExt as _;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ApiError, AppState};
use crate::auth::{bearer_token, AuthError, Claims};
use crate::envelope::StreamId;
use crate::publisher::{Message, PublishError};

/// Most messages in one batch.
const MAX_BATCH: usize = 1000;

#[derive(Deserialize)]
struct Request {
    channel: Option<String>,
    event: Option<String>,
    data: Option<Box<RawValue>>,
    messages: Option<Vec<Message>>,
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Invalid(m) => ApiError::BadRequest(m),
            PublishError::TooLarge { .. } => ApiError::TooLarge(e.to_string()),
            PublishError::Broker(b) => ApiError::Unavailable(b.to_string()),
        }
    }
}

/// The body arrives whole: the transport reads it within its deadline and
/// refuses one over [`body_limit`] with a 413 before the route runs.
///
/// Takes the whole request rather than `HeaderMap` and `Bytes` extractors:
/// the first clones every header and the second wraps the body in a length
/// limit the transport has already applied, together about 2.5 k
/// instructions per publish.
pub(super) async fn publish(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let token = bearer_token(&parts.headers).ok_or(AuthError::Missing)?;
    let claims = state.verifier.verify(token)?;
    let body = body
        .collect()
        .await
        .map_err(|e| ApiError::BadRequest(format!("could not read body: {e}")))?
        .to_bytes();
    let reply = publish_body(&state, &claims, &body).await?;
    let mut response = Response::new(Body::from(reply));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Largest request body: a batch may hold many messages, so the body as a
/// whole is bounded at 16 payloads (at least 64 KiB).
pub(crate) fn body_limit(max_payload: usize) -> usize {
    max_payload.saturating_mul(16).max(64 * 1024)
}

/// The messages a request body holds, and whether it was a batch: the JSON
/// parsed and its shape and batch size checked, nothing validated or
/// published yet. Pure, so the fuzz targets drive it directly.
pub fn parse_body(body: &[u8]) -> Result<(Vec<Message>, bool), ApiError> {
    let request: Request = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
    let (messages, batch) = match request {
        Request {
            messages: Some(messages),
            channel: None,
            event: None,
            data: None,
        } => (messages, true),
        Request {
            messages: None,
            channel: Some(channel),
            event,
            data: Some(data),
        } => (
            vec![Message {
                channel,
                event,
                data,
            }],
            false,
        ),
        _ => {
            return Err(ApiError::BadRequest(
                "expected {\"channel\",\"event\"?,\"data\"} or {\"messages\":[...]}".into(),
            ))
        }
    };
    if messages.is_empty() || messages.len() > MAX_BATCH {
        return Err(ApiError::BadRequest(format!(
            "a batch holds 1-{MAX_BATCH} messages"
        )));
    }
    Ok((messages, batch))
}

/// Publishes what a request body asks for, on behalf of a verified token:
/// checks every message (shape, channel, size, the token's `publish`
/// patterns) before publishing any, and returns the JSON reply body.
async fn publish_body(state: &AppState, claims: &Claims, body: &[u8]) -> Result<String, ApiError> {
    let (messages, batch) = parse_body(body)?;

    // Validate everything before publishing anything.
    let publisher = &state.publisher;
    let mut checked = Vec::with_capacity(messages.len());
    for message in messages {
        let message = publisher.check(message)?;
        if !claims.allows_publish(message.channel.as_str()) {
            return Err(ApiError::Forbidden(format!(
                "token may not publish to `{}`",
                message.channel
            )));
        }
        checked.push(message);
    }
    let mut ids = Vec::with_capacity(checked.len());
    for message in &checked {
        ids.push(publisher.publish_checked(message).await?);
    }
    Ok(reply(&ids, batch))
}

/// `{"id":"<id>"}`, or `{"ids":[...]}` for a batch. Written directly rather
/// than through `serde_json::Value` (a map, a string per id, then the
/// formatter), which cost more than the rest of the reply path: a stream id
/// is digits and a dash, so there is nothing to escape.
fn reply(ids: &[StreamId], batch: bool) -> String {
    let mut out = String::with_capacity(12 + ids.len() * 30);
    out.push_str(if batch { "{\"ids\":[" } else { "{\"id\":" });
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        id.push_to(&mut out);
        out.push('"');
    }
    out.push_str(if batch { "]}" } else { "}" });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_the_json_they_look_like() {
        let a = StreamId {
            ms: 1732240000000,
            seq: 0,
        };
        let b = StreamId {
            ms: 1732240000000,
            seq: 17,
        };
        assert_eq!(reply(&[a], false), r#"{"id":"1732240000000-0"}"#);
        assert_eq!(
            reply(&[a, b], true),
            r#"{"ids":["1732240000000-0","1732240000000-17"]}"#
        );
        let parsed: serde_json::Value =
            serde_json::from_str(&reply(&[b], true)).expect("valid JSON");
        assert_eq!(parsed["ids"][0], "1732240000000-17");
    }
}
