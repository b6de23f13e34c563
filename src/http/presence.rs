//! `GET /presence?channel=user:42` (server API, `control` claim):
//! `{"connections":N,"nodes":M}` across the cluster, a few seconds stale at
//! most (see [`crate::presence`]).

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::{require_control, ApiError, AppState};
use crate::channel::Channel;

pub(super) async fn presence(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    require_control(&state, &headers)?;
    let channel = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "channel")
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| ApiError::BadRequest("`channel` is required".into()))?;
    let channel = Channel::parse(&channel).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let presence = state
        .hub
        .broker()
        .presence(&channel)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let body = serde_json::json!({
        "connections": presence.connections,
        "nodes": presence.nodes,
    });
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body.to_string(),
    )
        .into_response())
}
