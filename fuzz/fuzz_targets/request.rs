//! The edge's request head and chunked body framing, on arbitrary bytes.
//!
//! The input is what a client sends. It is parsed all at once and fed in
//! pieces, as the driver does (re-parsing the growing buffer), and both
//! must agree; every accepted head keeps the framing rules.
#![no_main]

use bytes::BytesMut;
use herald::fuzzing::{parse_head, BodyFraming, Chunked, Head, Refusal, MAX_HEAD};
use http::{header, Method, StatusCode, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|wire: &[u8]| {
    let splits = split_points(wire);
    let whole = parse_head(wire);
    check_incremental_head(wire, &splits, &whole);
    let body = match &whole {
        Ok(Some(head)) => {
            check_head(wire, head);
            &wire[head.len..]
        }
        // Chunked decoding is fuzzed on every input, not only behind a
        // valid head, so the fuzzer reaches it directly.
        _ => wire,
    };
    for limit in [16, 64 * 1024] {
        check_chunked(body, &split_points(body), limit);
    }
});

/// Up to three cut points, chosen from the input itself so a crash
/// reproduces from the file alone.
fn split_points(data: &[u8]) -> Vec<usize> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let n = data.len() as u64 + 1;
    let mut points: Vec<usize> = (0..3).map(|i| ((hash >> (i * 21)) % n) as usize).collect();
    points.sort_unstable();
    points
}

/// Feeding the head in pieces gives what parsing it whole gives: a prefix
/// that completes is the same head; a prefix refused means the whole is
/// refused (with the same status, unless the prefix was refused only for
/// its size, 431, before the byte the whole is refused for arrived).
fn check_incremental_head(wire: &[u8], splits: &[usize], whole: &Result<Option<Head>, Refusal>) {
    for &end in splits.iter().chain([&wire.len()]) {
        match (parse_head(&wire[..end]), whole) {
            (Ok(None), _) => assert!(end <= MAX_HEAD, "an incomplete head over the limit"),
            (Ok(Some(part)), Ok(Some(all))) => assert_same_head(&part, all),
            (Ok(Some(part)), other) => panic!("a prefix parsed ({part:?}), the whole: {other:?}"),
            (Err(part), Err(all)) => {
                if part.status != StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE {
                    assert_eq!(&part, all);
                }
                return;
            }
            (Err(part), Ok(all)) => panic!("a prefix was refused ({part:?}), the whole: {all:?}"),
        }
    }
}

fn assert_same_head(a: &Head, b: &Head) {
    assert_eq!(a.len, b.len);
    assert_eq!(a.method, b.method);
    assert_eq!(a.uri, b.uri);
    assert_eq!(a.version, b.version);
    assert_eq!(a.headers, b.headers);
    assert_eq!(a.body, b.body);
    assert_eq!(a.keep_alive, b.keep_alive);
    assert_eq!(a.expect_continue, b.expect_continue);
}

/// What every accepted head must satisfy.
fn check_head(wire: &[u8], head: &Head) {
    assert!(head.len <= wire.len() && head.len <= MAX_HEAD);
    assert!(
        wire[..head.len].ends_with(b"\n"),
        "a head ends in a blank line"
    );
    assert_ne!(head.method, Method::CONNECT);
    let lengths: Vec<&[u8]> = head
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let codings = head
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .count();
    match head.body {
        BodyFraming::Length(n) => {
            assert_eq!(codings, 0, "Transfer-Encoding without chunked framing");
            if lengths.is_empty() {
                assert_eq!(n, 0);
            }
            for value in lengths {
                // Only plain digits (around SP/HTAB), and all the same.
                let digits = value.trim_ascii();
                assert!(!digits.is_empty() && digits.iter().all(u8::is_ascii_digit));
                assert!(value
                    .iter()
                    .all(|b| b.is_ascii_digit() || b" \t".contains(b)));
                let parsed: u64 = std::str::from_utf8(digits)
                    .expect("digits")
                    .parse()
                    .expect("fits");
                assert_eq!(parsed, n);
            }
        }
        BodyFraming::Chunked => {
            assert!(lengths.is_empty(), "Content-Length beside chunked");
            assert_eq!(codings, 1);
            assert_eq!(head.version, Version::HTTP_11);
            let coding = head.headers[header::TRANSFER_ENCODING].as_bytes();
            // Empty list elements are ignored (RFC 9110 §5.6.1).
            let last = coding
                .split(|b| *b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|t| !t.is_empty())
                .unwrap_or(b"");
            assert!(last.eq_ignore_ascii_case(b"chunked"));
        }
    }
    let close = head
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
    if close {
        assert!(!head.keep_alive);
    }
    if head.expect_continue {
        assert_eq!(head.version, Version::HTTP_11);
    }
}

/// A chunked body decodes the same whole or in pieces, never past `limit`,
/// and leaves the same bytes (a pipelined request) behind.
fn check_chunked(body: &[u8], splits: &[usize], limit: usize) {
    let mut input = BytesMut::from(body);
    let mut out = BytesMut::new();
    let whole = Chunked::default().decode(&mut input, &mut out, limit);
    assert!(out.len() <= limit, "body over the limit");

    let mut decoder = Chunked::default();
    let mut fed = BytesMut::new();
    let mut got = BytesMut::new();
    let mut result = Ok(false);
    let mut start = 0;
    for end in splits.iter().copied().chain([body.len()]) {
        fed.extend_from_slice(&body[start..end]);
        start = end;
        result = decoder.decode(&mut fed, &mut got, limit);
        assert!(got.len() <= limit, "body over the limit");
        if !matches!(result, Ok(false)) {
            break;
        }
    }
    fed.extend_from_slice(&body[start..]);
    assert_eq!(result, whole, "pieces and whole disagree");
    assert_eq!(got, out);
    if whole.is_ok() {
        assert_eq!(fed, input, "different bytes left after the body");
    }
}
