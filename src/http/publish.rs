//! `POST /publish`: the HTTP publish API for app services.
//!
//! Only `Authorization: Bearer` is accepted here, never the browser cookie,
//! so a page cannot be tricked into publishing with a visitor's cookie.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::{ApiError, AppState};
use crate::auth::{bearer_token, AuthError};
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

pub(super) async fn publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let token = bearer_token(&headers).ok_or(AuthError::Missing)?;
    let claims = state.verifier.verify(token)?;

    // A batch may hold many messages; the body as a whole is bounded too.
    let limit = state
        .hub
        .config()
        .max_payload
        .saturating_mul(16)
        .max(64 * 1024);
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ApiError::TooLarge(format!(
                "request body over {limit} bytes"
            )))
        }
        Err(e) => return Err(ApiError::BadRequest(format!("could not read body: {e}"))),
    };
    let request: Request = serde_json::from_slice(&bytes)
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
        ids.push(publisher.publish_checked(message).await?.to_string());
    }
    let reply = if batch {
        json!({ "ids": ids })
    } else {
        json!({ "id": ids[0] })
    };
    Ok(Json(reply).into_response())
}
