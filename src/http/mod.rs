//! HTTP routes: the public router (demo page, `/events`, `/publish`) and the
//! admin router (`/metrics`, `/healthz`, `/readyz`), kept on separate
//! listeners so metrics are never exposed by accident.

mod admin;
pub mod cors;
mod events;
pub(crate) mod publish; // `pub(crate)`: `crate::fuzzing` reaches `parse_body`

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

pub use admin::admin_router;
pub use events::StreamCut;
pub use publish::body_limit;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Local fanout (and, through it, the broker).
    pub hub: Hub,
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// Per-connection settings.
    pub session: Arc<SessionConfig>,
    /// Where browsers carry the token.
    pub cookie_name: Arc<str>,
    /// Whether `?access_token=` is accepted.
    pub allow_query_token: bool,
    /// Validates and publishes for `/publish`.
    pub publisher: crate::publisher::Publisher,
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// Allowed CORS origins.
    pub cors: cors::Cors,
}

impl AppState {
    /// Whether the node should receive traffic.
    pub fn is_ready(&self) -> bool {
        !self.hub.is_draining() && self.hub.broker().is_connected()
    }
}

/// The public router. CORS wraps every route (preflights included).
pub fn public_router(state: AppState) -> Router {
    let cors = state.cors.clone();
    Router::new()
        .route("/", get(demo_page))
        .route("/events", get(events::events))
        .route("/publish", post(publish::publish))
        .with_state(state)
        // The transport bounds every body already (`body_limit`).
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(cors, cors::layer))
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
    pub fn status(&self) -> StatusCode {
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
pub fn error_response(status: StatusCode, message: &str) -> Response {
    let mut response = (status, Json(serde_json::json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}
