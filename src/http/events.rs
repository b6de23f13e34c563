//! `GET /events`: authenticate, pick channels, start a session, stream it.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::channel::Channel;
use crate::mailbox::MailboxRef;
use crate::session::Session;

/// Most topics one connection may ask for.
const MAX_TOPICS: usize = 64;

pub(super) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let session = match open_session(&state, &headers, query.as_deref()).await {
        Ok(session) => session,
        Err(error) => {
            error.count_rejected();
            return error.into_response();
        }
    };
    let cut = StreamCut(session.mailbox().clone());
    // The session lives in the body: when the client goes away the
    // transport drops the body, and the session's drop unregisters it from
    // the hub.
    let stream = futures_util::stream::unfold(session, |mut session| async move {
        let chunk = session.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), session))
    });
    let mut response = Body::from_stream(stream).into_response();
    for (name, value) in sse_headers() {
        response.headers_mut().insert(name, value);
    }
    response.extensions_mut().insert(cut);
    response
}

/// Lets the transport close an event stream's connection at once when the
/// hub cuts it (slow, or its channel lost history), even while a write to
/// the client is blocked and the body is not being polled.
#[derive(Clone)]
pub(crate) struct StreamCut(MailboxRef);

impl StreamCut {
    /// Resolves once the stream is cut.
    pub(crate) async fn cut(&self) {
        self.0.killed().await
    }
}

/// The response headers of an event stream (CORS comes on top).
fn sse_headers() -> [(HeaderName, HeaderValue); 3] {
    [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        // Tells nginx not to buffer this response even where buffering is on.
        (
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        ),
    ]
}

/// Authenticates the request, resolves its channels and starts its session:
/// everything `/events` does before streaming.
async fn open_session(
    state: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Session, ApiError> {
    let mut topics = Vec::new();
    let mut query_token = None;
    let mut query_cursor = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "topic" => topics.push(value.into_owned()),
            "last_event_id" => query_cursor = Some(value.into_owned()),
            "access_token" if state.allow_query_token => query_token = Some(value.into_owned()),
            _ => {}
        }
    }
    let claims = super::access::authenticate(state, headers, query_token.as_deref()).await?;

    let user = Channel::user(&claims.sub).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let mut channels = vec![user, Channel::broadcast()];
    if topics.len() > MAX_TOPICS {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_TOPICS} topics per connection"
        )));
    }
    for name in topics {
        let channel = Channel::topic(&name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if !claims.allows_topic(&name) {
            return Err(ApiError::Forbidden(format!(
                "token does not allow topic `{name}`"
            )));
        }
        if !channels.contains(&channel) {
            channels.push(channel);
        }
    }

    // A new EventSource (a reload, another tab) cannot set the header, so
    // it may pass the cursor as `?last_event_id=`; the header wins.
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .or_else(|| {
            query_cursor
                .as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
        });
    let session = Session::start(&state.hub, &state.session, &claims, channels, last_event_id);
    // Boxed: the start-up future is large and must not stay allocated in
    // the connection's task for the whole life of the stream.
    Ok(Box::pin(session).await?)
}
