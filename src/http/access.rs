//! Who a request is: the one authentication step of every route a browser
//! calls (`/events`, `/history`), so the token sources, the verification,
//! the session-cookie fallback (`--auth-url`) and the revocation check are
//! the same everywhere.

use std::sync::Arc;

use axum::http::HeaderMap;

use super::{ApiError, AppState};
use crate::app_auth::AppAuthError;
use crate::auth::{find_token, AuthError, Claims};
use crate::control::RevocationError;

/// Authenticates a request from its token: `Authorization: Bearer`, the
/// cookie, or `query_token` (pass it only when `?access_token=` is allowed).
pub(crate) async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Arc<Claims>, ApiError> {
    let Some((token, _)) = find_token(headers, &state.cookie_name, query_token) else {
        return session(state, headers).await;
    };
    let claims = match state.verifier.verify(token) {
        // Keys rotated at the identity provider: fetch them (rate-limited).
        Err(AuthError::UnknownKid) if state.verifier.refetch_for_unknown_kid().await => {
            state.verifier.verify(token)?
        }
        other => other?,
    };
    check_revocation(state, &claims).await?;
    Ok(claims)
}

/// A request without a Herald JWT: its session cookie, if `--auth-url`
/// lets the application decide.
async fn session(state: &AppState, headers: &HeaderMap) -> Result<Arc<Claims>, ApiError> {
    let app = state.app_auth.as_ref().ok_or(AuthError::Missing)?;
    let claims = app
        .authenticate(headers)
        .await
        .ok_or(AuthError::Missing)?
        .map_err(|e| match e {
            AppAuthError::Unauthorized => ApiError::Auth(AuthError::Session),
            AppAuthError::Forbidden => ApiError::Forbidden(e.to_string()),
            AppAuthError::Unavailable => ApiError::Unavailable(e.to_string()),
        })?;
    check_revocation(state, &claims).await?;
    Ok(claims)
}

/// Refuses a token its user's revocation ("log out everywhere") covers.
async fn check_revocation(state: &AppState, claims: &Claims) -> Result<(), ApiError> {
    state
        .control
        .check_revocation(claims)
        .await
        .map_err(|e| match e {
            RevocationError::Revoked => ApiError::Auth(AuthError::Revoked),
            RevocationError::Broker(b) => ApiError::Unavailable(b.to_string()),
        })
}
