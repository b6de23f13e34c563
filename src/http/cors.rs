//! CORS for the configured origins only, with credentials.
//!
//! One small policy used by both the axum routes and the lean `/events`
//! path, so the two can never disagree. A request whose `Origin` is not
//! listed gets no CORS headers at all (the browser then refuses to expose
//! the response); `*` is never sent, because credentials are allowed.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The allowed origins (exact, as browsers send them).
#[derive(Debug, Clone, Default)]
pub(crate) struct Cors {
    origins: Vec<HeaderValue>,
}

const ALLOW_METHODS: HeaderValue = HeaderValue::from_static("GET, POST");
const ALLOW_HEADERS: HeaderValue =
    HeaderValue::from_static("authorization, content-type, last-event-id");
const MAX_AGE: HeaderValue = HeaderValue::from_static("600");

impl Cors {
    /// A policy allowing `origins` (invalid header values are skipped).
    pub(crate) fn new(origins: &[String]) -> Self {
        Cors {
            origins: origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
                .collect(),
        }
    }

    /// Whether no origin is allowed (the policy adds nothing then).
    pub(crate) fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// The request's origin, if it is allowed.
    fn allowed<'a>(&self, request: &'a HeaderMap) -> Option<&'a HeaderValue> {
        let origin = request.get(header::ORIGIN)?;
        self.origins.iter().any(|o| o == origin).then_some(origin)
    }

    /// Adds the CORS response headers for an allowed origin.
    pub(crate) fn apply(&self, request: &HeaderMap, response: &mut HeaderMap) {
        if self.origins.is_empty() {
            return;
        }
        // Caches must not serve one origin's answer to another.
        response.append(header::VARY, HeaderValue::from_static("origin"));
        if let Some(origin) = self.allowed(request) {
            response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            response.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }

    /// The answer to a preflight `OPTIONS`.
    fn preflight(&self, request: &HeaderMap) -> Response {
        let mut response = StatusCode::NO_CONTENT.into_response();
        self.apply(request, response.headers_mut());
        if self.allowed(request).is_some() {
            let h = response.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, ALLOW_METHODS);
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOW_HEADERS);
            h.insert(header::ACCESS_CONTROL_MAX_AGE, MAX_AGE);
        }
        response
    }
}

/// Axum middleware: answers preflights and decorates every response.
pub(super) async fn layer(State(cors): State<Cors>, request: Request, next: Next) -> Response {
    let request_headers = request.headers().clone();
    if request.method() == Method::OPTIONS
        && request_headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return cors.preflight(&request_headers);
    }
    let mut response = next.run(request).await;
    cors.apply(&request_headers, response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(origin: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_static(origin));
        h
    }

    #[test]
    fn only_listed_origins_get_credentials() {
        let cors = Cors::new(&["https://app.example".into()]);
        let mut response = HeaderMap::new();
        cors.apply(&request("https://app.example"), &mut response);
        assert_eq!(
            response[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example"
        );
        assert_eq!(response[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        let mut response = HeaderMap::new();
        cors.apply(&request("https://evil.example"), &mut response);
        assert!(response.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    }

    #[test]
    fn no_origins_means_no_headers() {
        let mut response = HeaderMap::new();
        Cors::default().apply(&request("https://app.example"), &mut response);
        assert!(response.is_empty());
    }
}
