//! `GET /history?channel=C&limit=N[&before=ID]`: a channel's recent
//! messages, newest first, from the same streams replay reads: an app's
//! notification inbox on page load.
//!
//! Readable by a subscriber of the channel (the `/events` rule: its own
//! user channel, `broadcast`, allowed topics) or by a publisher token whose
//! `publish` claim covers it. Page on with `before=` the last id received
//! while `more` is true.

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::value::RawValue;

use super::{access, ApiError, AppState};
use crate::channel::Channel;
use crate::envelope::{Envelope, StreamId};

/// Messages per page unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 50;
/// Most messages per page.
pub(crate) const MAX_LIMIT: usize = 100;

/// One message as `/history` shows it.
#[derive(Serialize)]
struct Shown<'a> {
    id: String,
    event: &'a str,
    data: &'a RawValue,
    ts: u64,
}

pub(super) async fn history(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut channel = None;
    let mut limit = None;
    let mut before = None;
    let mut query_token = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "channel" => channel = Some(value.into_owned()),
            "limit" => limit = Some(value.into_owned()),
            "before" => before = Some(value.into_owned()),
            "access_token" if state.allow_query_token => query_token = Some(value.into_owned()),
            _ => {}
        }
    }
    let claims = access::authenticate(&state, &headers, query_token.as_deref()).await?;

    let channel = channel.ok_or_else(|| ApiError::BadRequest("`channel` is required".into()))?;
    let channel = Channel::parse(&channel).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::BadRequest(format!("`limit` must be a number from 1 to {MAX_LIMIT}"))
            })?,
    };
    let before = match before {
        None => None,
        Some(text) => Some(text.parse::<StreamId>().map_err(|_| {
            ApiError::BadRequest("`before` must be a message id such as 1732240000000-0".into())
        })?),
    };
    if !claims.allows_reading(&channel) && !claims.allows_publish(channel.as_str()) {
        return Err(ApiError::Forbidden(format!(
            "token may not read `{channel}`"
        )));
    }

    let page = state
        .hub
        .broker()
        .history_before(&channel, before, limit)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let max_payload = state.hub.config().max_payload;
    let parsed: Vec<(StreamId, Envelope<'_>)> = page
        .entries
        .iter()
        // Stored entries are validated on the way in; one that is not an
        // envelope any more (written around Herald) is left out here too.
        .filter_map(|(id, payload)| Some((*id, Envelope::parse(payload, max_payload).ok()?)))
        .collect();
    let messages: Vec<Shown<'_>> = parsed
        .iter()
        .map(|(id, envelope)| Shown {
            id: id.to_string(),
            event: envelope.event.unwrap_or("message"),
            data: envelope.data,
            ts: envelope.ts.unwrap_or(id.ms),
        })
        .collect();
    #[derive(Serialize)]
    struct Reply<'a> {
        messages: Vec<Shown<'a>>,
        more: bool,
    }
    // Serialising strings, numbers and RawValues cannot fail.
    let body = serde_json::to_string(&Reply {
        messages,
        more: page.more,
    })
    .unwrap_or_default();
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            // One user's messages: never kept by a shared cache.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response())
}
