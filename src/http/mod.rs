//! HTTP routes: the public router (demo page, `/events`, `/publish`) and the
//! admin router (`/metrics`, `/healthz`, `/readyz`), kept on separate
//! listeners so metrics are never exposed by accident.

mod access;
mod admin;
mod client;
pub(crate) mod cors;
mod disconnect;
mod events;
mod history;
mod presence;
// `pub(crate)`: `crate::fuzzing` reaches `parse_body`.
pub(crate) mod publish;

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::{AuthError, Verifier};
use crate::hub::{Hub, LimitError};
use crate::metrics::{self, RejectReason};
use crate::session::{SessionConfig, StartError};

pub(crate) use admin::admin_router;
pub(crate) use events::StreamCut;
pub(crate) use publish::body_limit;

/// Everything a handler needs. axum's `State` clones it for every request,
/// so it is one `Arc` (a clone of the fields themselves was about ten
/// reference counts up and down per request).
#[derive(Clone)]
pub(crate) struct AppState(Arc<AppShared>);

impl AppState {
    pub(crate) fn new(shared: AppShared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppShared;

    fn deref(&self) -> &AppShared {
        &self.0
    }
}

/// What [`AppState`] shares.
pub(crate) struct AppShared {
    /// Local fanout (and, through it, the broker).
    pub(crate) hub: Hub,
    /// Token verification.
    pub(crate) verifier: Arc<Verifier>,
    /// Per-connection settings.
    pub(crate) session: Arc<SessionConfig>,
    /// Where browsers carry the token.
    pub(crate) cookie_name: Arc<str>,
    /// Whether `?access_token=` is accepted.
    pub(crate) allow_query_token: bool,
    /// Validates and publishes for `/publish`.
    pub(crate) publisher: crate::publisher::Publisher,
    /// Renders `/metrics`.
    pub(crate) prometheus: PrometheusHandle,
    /// Allowed CORS origins.
    pub(crate) cors: cors::Cors,
    /// Disconnects and revocations across nodes.
    pub(crate) control: crate::control::Control,
    /// Session cookies checked by the application (`--auth-url`).
    pub(crate) app_auth: Option<Arc<crate::app_auth::AppAuth>>,
}

impl AppShared {
    /// Whether the node should receive traffic.
    pub(crate) fn is_ready(&self) -> bool {
        !self.hub.is_draining() && self.hub.broker().is_connected() && self.verifier.is_ready()
    }
}

/// The public router. CORS wraps every route (preflights included) when
/// origins are configured; without any it would add nothing, so it is not
/// layered at all (one boxed middleware future less per request).
pub(crate) fn public_router(state: AppState) -> Router {
    let cors = state.cors.clone();
    let router = Router::new()
        .route("/", get(demo_page))
        .route("/herald.js", get(client::herald_js))
        .route("/events", get(events::events))
        .route("/publish", post(publish::publish))
        .route("/history", get(history::history))
        .route("/disconnect", post(disconnect::disconnect))
        .route("/presence", get(presence::presence))
        .with_state(state)
        // The transport bounds every body already (`body_limit`).
        .layer(axum::extract::DefaultBodyLimit::disable());
    if cors.is_empty() {
        return router;
    }
    router.layer(axum::middleware::from_fn_with_state(cors, cors::layer))
}

async fn demo_page() -> Html<&'static str> {
    Html(include_str!("../demo.html"))
}

/// Errors of the public API, each a JSON `{"error": …}` with its status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// 403.
    #[error("{0}")]
    Forbidden(String),
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 413.
    #[error("{0}")]
    TooLarge(String),
    /// 429 or 503.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// 503.
    #[error("{0}")]
    Unavailable(String),
}

impl From<StartError> for ApiError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Limit(l) => ApiError::Limit(l),
            StartError::Broker(b) => ApiError::Unavailable(b.to_string()),
        }
    }
}

impl ApiError {
    /// The HTTP status for this error.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::Auth(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Limit(LimitError::User) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Limit(LimitError::Node | LimitError::Draining) | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// Counts a refused SSE connection under DESIGN's reason labels.
    pub(crate) fn count_rejected(&self) {
        let reason = match self {
            ApiError::Auth(_) => RejectReason::Auth,
            ApiError::Forbidden(_) => RejectReason::Forbidden,
            ApiError::Limit(_) => RejectReason::Limit,
            _ => return,
        };
        metrics::get().rejected(reason);
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.status(), &self.to_string())
    }
}

/// Every error answer of both listeners, the transport's refusals included:
/// `{"error": message}` with its status (and, for a 401, the challenge).
pub(crate) fn error_response(status: StatusCode, message: &str) -> Response {
    let mut response = (status, Json(serde_json::json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

// --- Server API helpers (`/disconnect`, `/presence`) ----------------------

/// Largest server API request body.
const MAX_API_BODY: usize = 4096;

/// The claims of the request's bearer token, which must carry `control`
/// (401 without a valid token, 403 without the claim). Bearer only, as for
/// `/publish`: a page must not reach the server API with a visitor's cookie.
pub(crate) fn require_control(
    state: &AppState,
    headers: &axum::http::HeaderMap,
) -> Result<Arc<crate::auth::Claims>, ApiError> {
    let token = crate::auth::bearer_token(headers).ok_or(AuthError::Missing)?;
    let claims = state.verifier.verify(token)?;
    if !claims.control {
        return Err(ApiError::Forbidden(
            "the server API needs a token with the `control` claim".into(),
        ));
    }
    Ok(claims)
}

/// Reads a server API request body (at most [`MAX_API_BODY`] bytes).
pub(crate) async fn api_body(body: axum::body::Body) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::{BodyExt, LengthLimitError, Limited};
    match Limited::new(body, MAX_API_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::TooLarge(
            format!("request body over {MAX_API_BODY} bytes"),
        )),
        Err(e) => Err(ApiError::BadRequest(format!("could not read body: {e}"))),
    }
}
