//! Finding the token in arbitrary headers (`Authorization`, `Cookie`) and
//! the `/events` query (`topic`, `access_token`), read the way
//! `open_session` reads it: never panics, finds a token only where it is
//! and in the documented order, and every topic it accepts is one channel.
#![no_main]

use herald::auth::{bearer_token, find_token, TokenSource};
use herald::fuzzing::Channel;
use herald::fuzzing::Cursor;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const COOKIE: &str = "herald_token";

fuzz_target!(|input: &[u8]| {
    // The `/events` query on the first line, then header lines.
    let mut lines = input.split(|b| *b == b'\n');
    let query = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = HeaderName::from_bytes(&line[..colon]);
        let value = HeaderValue::from_bytes(&line[colon + 1..]);
        if let (Ok(name), Ok(value)) = (name, value) {
            headers.append(name, value);
        }
    }
    for allow_query_token in [false, true] {
        check(&headers, &query, allow_query_token);
    }
});

fn check(headers: &HeaderMap, query: &str, allow_query_token: bool) {
    // As `open_session` reads the query.
    let mut topics = Vec::new();
    let mut query_token = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "topic" => topics.push(value.into_owned()),
            "access_token" if allow_query_token => query_token = Some(value.into_owned()),
            _ => {}
        }
    }
    for name in &topics {
        if let Ok(channel) = Channel::topic(name) {
            assert_eq!(channel.as_str(), format!("topic:{name}"));
            assert_eq!(Channel::parse(channel.as_str()).as_ref(), Ok(&channel));
            let key = channel.pubsub_key("herald");
            assert_eq!(Channel::from_pubsub_key("herald", &key), Some(channel));
        }
    }
    if let Some(id) = headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        let _ = Cursor::decode(id.trim());
    }

    let values = |name: header::HeaderName| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect()
    };
    let bearer = bearer_token(headers);
    match find_token(headers, COOKIE, query_token.as_deref()) {
        Some((token, source)) => {
            assert!(!token.is_empty());
            match source {
                TokenSource::Bearer => {
                    assert_eq!(Some(token), bearer);
                    assert_eq!(token, token.trim());
                    assert!(values(header::AUTHORIZATION)
                        .iter()
                        .any(|v| v.contains(token)));
                }
                TokenSource::Cookie => {
                    assert!(bearer.is_none(), "the bearer header comes first");
                    assert!(!token.contains(';'));
                    let cookies = values(header::COOKIE);
                    assert!(cookies.iter().any(|v| v.contains(&format!("{COOKIE}="))));
                    assert!(cookies.iter().any(|v| v.contains(token)));
                }
                TokenSource::Query => {
                    assert!(bearer.is_none(), "the bearer header comes first");
                    assert!(allow_query_token);
                    assert_eq!(Some(token), query_token.as_deref());
                }
            }
        }
        None => {
            assert!(bearer.is_none());
            assert!(query_token.as_deref().is_none_or(str::is_empty));
        }
    }
}
