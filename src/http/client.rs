//! `GET /herald.js`: the browser client (`clients/js/herald.js`), compiled
//! into the binary so every node serves the same bytes with no file to
//! deploy next to it.
//!
//! Cached by revalidation: `Cache-Control: no-cache` makes the browser ask
//! every time, and a strong `ETag` (a hash of the source, computed at
//! compile time) turns that question into a bodiless 304 while nothing
//! changed. So a new release reaches every tab on its next load, and nodes
//! of one release agree on the tag, whichever of them nginx picks.

use std::sync::LazyLock;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The module's source.
const SOURCE: &str = include_str!("../../clients/js/herald.js");

/// FNV-1a (64 bit) of the source. Not a security property: it only has to
/// change when the file does, and to be the same on every build of it.
const SOURCE_HASH: u64 = fnv1a(SOURCE.as_bytes());

const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The strong entity tag, `"<16 hex digits>"`.
static ETAG: LazyLock<HeaderValue> = LazyLock::new(|| {
    HeaderValue::from_str(&format!("\"{SOURCE_HASH:016x}\"")).expect("hex digits and quotes")
});

const CONTENT_TYPE: HeaderValue = HeaderValue::from_static("text/javascript; charset=utf-8");
const NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");

pub(super) async fn herald_js(request: HeaderMap) -> Response {
    let etag = &*ETAG;
    let headers = [
        (header::ETAG, etag.clone()),
        (header::CACHE_CONTROL, NO_CACHE),
    ];
    if matches(&request, etag) {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (headers, [(header::CONTENT_TYPE, CONTENT_TYPE)], SOURCE).into_response()
}

/// Whether `If-None-Match` names `etag` (or is `*`). RFC 9110 compares
/// weakly here, so a `W/` prefix a proxy may have added still matches.
fn matches(request: &HeaderMap, etag: &HeaderValue) -> bool {
    let etag = etag.as_bytes();
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/").as_bytes() == etag)
}
