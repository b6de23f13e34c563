//! `POST /disconnect {"user":"42"[,"revoke":true][,"reason":"…"]}`: ends a
//! user's connections on every node; with `revoke`, also refuses the
//! user's tokens issued before now ("log out everywhere"). Needs a bearer
//! token with the `control` claim. Reply `{"connections":N}`, the number
//! ended on this node (the others end theirs as the message reaches them).

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{api_body, require_control, ApiError, AppState};
use crate::auth::MAX_SUB_LEN;
use crate::channel::Channel;
use crate::control::MAX_REASON_LEN;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    user: String,
    #[serde(default)]
    revoke: bool,
    reason: Option<String>,
}

pub(super) async fn disconnect(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_control(&state, &headers)?;
    let bytes = api_body(body).await?;
    let request: Request = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(format!(
            "expected {{\"user\":\"<sub>\",\"revoke\"?:bool,\"reason\"?:\"…\"}}: {e}"
        ))
    })?;
    let sub = &request.user;
    if sub.is_empty() || sub.len() > MAX_SUB_LEN || sub.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "`user` must be 1-{MAX_SUB_LEN} bytes without control characters"
        )));
    }
    let user = Channel::user(sub).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let reason = match request.reason {
        Some(reason) if reason.len() > MAX_REASON_LEN => {
            return Err(ApiError::BadRequest(format!(
                "`reason` is at most {MAX_REASON_LEN} bytes"
            )))
        }
        Some(reason) => reason,
        None if request.revoke => "revoked".to_owned(),
        None => "disconnected".to_owned(),
    };
    let closed = state
        .control
        .disconnect(&user, sub, &reason, request.revoke)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(Json(serde_json::json!({ "connections": closed })).into_response())
}
