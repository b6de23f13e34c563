//! Session-cookie authentication through the application (`--auth-url`).
//!
//! For a browser request that carries no Herald JWT but a `Cookie` header,
//! the node asks the application: `GET <auth-url>` with the request's
//! `Cookie`, `Origin` and `X-Forwarded-For`. A 200 answer
//! `{"sub":"42","topics":["news"],"exp":1732243600}` (`topics`, `exp`
//! optional) becomes the connection's claims; a 401 or 403 is passed on;
//! anything else, or no answer within `--auth-timeout`, is a 503. The
//! application's body is never shown to the client.
//!
//! Bounded: answers (grants and refusals) are cached per exact cookie
//! header for `--auth-cache-ttl`, at most [`CACHE_CAPACITY`] of them;
//! concurrent requests with the same cookie share one call; and at most
//! [`MAX_CONCURRENT_CALLS`] calls are in flight per node, so a flood of new
//! connections cannot overload the application.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;
use tokio::sync::{watch, Semaphore};

use crate::auth::{unix_now, Claims, MAX_SUB_LEN};
use crate::fetch::Fetcher;
use crate::metrics;
use crate::sync::lock;

/// Most auth calls in flight at once per node.
pub(crate) const MAX_CONCURRENT_CALLS: usize = 32;
/// Most cookie headers whose answer is cached.
pub(crate) const CACHE_CAPACITY: usize = 4096;
/// Longest cookie header whose answer is cached (longer ones always ask).
const MAX_CACHED_COOKIE: usize = 4096;
/// Largest answer body read from the application.
const MAX_ANSWER: usize = 16 * 1024;
/// Most topics taken from one answer.
const MAX_TOPICS: usize = 256;
/// `exp` for an answer without one: the stream lasts until it closes.
const NO_EXPIRY: u64 = u32::MAX as u64;

/// What the application decided (or that it could not be asked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AppAuthError {
    /// It answered 401.
    #[error("session not accepted")]
    Unauthorized,
    /// It answered 403.
    #[error("session not allowed here")]
    Forbidden,
    /// Timeout, 5xx, or an answer that is not the protocol's.
    #[error("the authentication service is unavailable")]
    Unavailable,
}

type Outcome = Result<Arc<Claims>, AppAuthError>;

/// The application's 200 answer.
#[derive(Deserialize)]
struct Grant {
    sub: String,
    #[serde(default)]
    topics: Vec<String>,
    exp: Option<u64>,
}

/// Asks the application who a session cookie belongs to.
pub(crate) struct AppAuth {
    fetcher: Fetcher,
    timeout: Duration,
    cache_ttl: Duration,
    calls: Semaphore,
    /// cookie header → (answer, when received). Std mutexes, never held
    /// across an `.await`.
    cache: Mutex<HashMap<Box<str>, (Outcome, Instant)>>,
    /// Calls in flight by cookie header, for requests that arrive meanwhile.
    pending: Mutex<HashMap<Box<str>, watch::Receiver<Option<Outcome>>>>,
}

/// A call in flight for one cookie; dropping it ends the sharing.
struct Pending<'a> {
    auth: &'a AppAuth,
    cookie: &'a str,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        lock(&self.auth.pending).remove(self.cookie);
    }
}

impl std::fmt::Debug for AppAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppAuth")
            .field("fetcher", &self.fetcher)
            .finish_non_exhaustive()
    }
}

impl AppAuth {
    /// A client for `url`; fails on a URL that is not http(s).
    pub(crate) fn new(
        url: &str,
        timeout: Duration,
        cache_ttl: Duration,
    ) -> Result<AppAuth, crate::fetch::FetchError> {
        Ok(AppAuth {
            fetcher: Fetcher::new(url)?,
            timeout,
            cache_ttl,
            calls: Semaphore::new(MAX_CONCURRENT_CALLS),
            cache: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The claims for a request's session; `None` when it has no cookie.
    pub(crate) async fn authenticate(&self, headers: &HeaderMap) -> Option<Outcome> {
        let cookie = headers.get(header::COOKIE)?.to_str().ok()?;
        if cookie.trim().is_empty() {
            return None;
        }
        Some(self.answer_for(cookie, headers).await)
    }

    async fn answer_for(&self, cookie: &str, headers: &HeaderMap) -> Outcome {
        if let Some(outcome) = self.cached(cookie) {
            return outcome;
        }
        if cookie.len() > MAX_CACHED_COOKIE {
            return self.call(headers).await;
        }
        // One call per cookie at a time: later requests wait for its answer.
        let (leader, mut answer) = {
            let mut pending = lock(&self.pending);
            match pending.get(cookie) {
                Some(answer) => (None, answer.clone()),
                None => {
                    let (done, answer) = watch::channel(None);
                    pending.insert(cookie.into(), answer.clone());
                    (Some(done), answer)
                }
            }
        };
        let Some(done) = leader else {
            let waited = tokio::time::timeout(self.timeout, answer.wait_for(Option::is_some)).await;
            return match waited {
                Ok(Ok(outcome)) => outcome.clone().unwrap_or(Err(AppAuthError::Unavailable)),
                _ => Err(AppAuthError::Unavailable),
            };
        };
        // Removes the pending entry even if this request is dropped
        // mid-call (the client went away); waiters then see it closed.
        let _pending = Pending { auth: self, cookie };
        let outcome = self.call(headers).await;
        if outcome != Err(AppAuthError::Unavailable) {
            self.remember(cookie, outcome.clone());
        }
        let _ = done.send(Some(outcome.clone()));
        outcome
    }

    fn cached(&self, cookie: &str) -> Option<Outcome> {
        let cache = lock(&self.cache);
        let (outcome, at) = cache.get(cookie)?;
        let fresh = at.elapsed() < self.cache_ttl;
        // A cached grant still ends when its `exp` passes.
        let expired = matches!(outcome, Ok(c) if c.exp < unix_now());
        (fresh && !expired).then(|| outcome.clone())
    }

    fn remember(&self, cookie: &str, outcome: Outcome) {
        if self.cache_ttl.is_zero() {
            return;
        }
        let mut cache = lock(&self.cache);
        if cache.len() >= CACHE_CAPACITY {
            let ttl = self.cache_ttl;
            cache.retain(|_, (_, at)| at.elapsed() < ttl);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(cookie.into(), (outcome, Instant::now()));
    }

    /// One call to the application, within the per-node concurrency limit
    /// and the timeout (waiting for a free slot counts against it).
    async fn call(&self, headers: &HeaderMap) -> Outcome {
        let started = tokio::time::Instant::now();
        let outcome = match tokio::time::timeout(self.timeout, self.calls.acquire()).await {
            Ok(Ok(_permit)) => {
                let left = self.timeout.saturating_sub(started.elapsed());
                self.ask(headers, left).await
            }
            _ => Err(AppAuthError::Unavailable),
        };
        let result = match &outcome {
            Ok(_) => "ok",
            Err(AppAuthError::Unauthorized | AppAuthError::Forbidden) => "denied",
            Err(AppAuthError::Unavailable) => "error",
        };
        metrics::get().auth_request(result);
        outcome
    }

    async fn ask(&self, headers: &HeaderMap, timeout: Duration) -> Outcome {
        const FORWARDED: [HeaderName; 3] = [
            header::COOKIE,
            header::ORIGIN,
            HeaderName::from_static("x-forwarded-for"),
        ];
        let forward: Vec<(HeaderName, HeaderValue)> = FORWARDED
            .iter()
            .flat_map(|name| {
                headers
                    .get_all(name)
                    .iter()
                    .map(|v| (name.clone(), v.clone()))
            })
            .collect();
        let answer = match self.fetcher.get(&forward, timeout, MAX_ANSWER).await {
            Ok(answer) => answer,
            Err(error) => {
                tracing::warn!(%error, "auth call failed");
                return Err(AppAuthError::Unavailable);
            }
        };
        match answer.status {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => return Err(AppAuthError::Unauthorized),
            StatusCode::FORBIDDEN => return Err(AppAuthError::Forbidden),
            status => {
                tracing::warn!(%status, "auth service answered neither 200, 401 nor 403");
                return Err(AppAuthError::Unavailable);
            }
        }
        let grant = serde_json::from_slice::<Grant>(&answer.body)
            .ok()
            .filter(|g| {
                !g.sub.is_empty()
                    && g.sub.len() <= MAX_SUB_LEN
                    && !g.sub.chars().any(char::is_control)
                    && g.topics.len() <= MAX_TOPICS
            });
        let Some(grant) = grant else {
            tracing::warn!("auth service's 200 answer is not {{\"sub\",\"topics\"?,\"exp\"?}}");
            return Err(AppAuthError::Unavailable);
        };
        if grant.exp.is_some_and(|exp| exp < unix_now()) {
            return Err(AppAuthError::Unauthorized);
        }
        Ok(Arc::new(Claims {
            topics: grant.topics,
            exp: grant.exp.unwrap_or(NO_EXPIRY),
            ..Claims::issue(&grant.sub, Duration::ZERO)
        }))
    }
}
