//! Properties of the wire formats, over generated inputs (proptest): the
//! resume cursor round-trips, a message is always exactly one SSE event
//! that gives back what was published, and request bodies framed with
//! `Content-Length` or chunked in any pieces read back whole. The fuzz
//! targets in `fuzz/` drive the same code with coverage guidance; these run
//! with every `cargo test`.

// The strict SSE reader the fuzz targets use: it keeps every line, so an
// extra field or event would show (the tests' `Sse` client drops unknown
// fields, as a browser does).
#[allow(unreachable_pub, dead_code)]
#[path = "../fuzz/src/sse.rs"]
mod sse_reader;

use std::collections::BTreeMap;

use bytes::BytesMut;
use herald::fuzzing::{
    body_too_large, encode_cursor, encode_message, parse_head, BodyFraming, Channel, Chunked,
    Cursor, Envelope,
};
use herald::StreamId;
use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::Value;

/// A valid channel name of any kind, with any non-control text in it.
fn channel() -> impl Strategy<Value = Channel> {
    let name = "[^\\p{Cc}]{1,40}";
    prop_oneof![
        Just("broadcast".to_owned()),
        name.prop_map(|n| format!("user:{n}")),
        name.prop_map(|n| format!("topic:{n}")),
    ]
    .prop_map(|n| Channel::parse(&n).expect("generated names are valid"))
}

fn stream_id() -> impl Strategy<Value = StreamId> {
    (any::<u64>(), any::<u64>()).prop_map(|(ms, seq)| StreamId { ms, seq })
}

/// Any JSON value but floats (which need not print back identically).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The frame a node writes for `data` (JSON text) and `event`, read as
/// EventSource reads it; asserts it is exactly one event of event + data
/// lines, and returns its name and data.
fn sse_event(event: Option<&str>, data: &str) -> (String, String) {
    let raw = RawValue::from_string(data.to_owned()).expect("JSON");
    let envelope = Envelope {
        id: None,
        event,
        data: &raw,
        ts: None,
    };
    let frame = encode_message(&envelope);
    let text = std::str::from_utf8(&frame).expect("UTF-8");
    let stream = sse_reader::read(text);
    assert_eq!(stream.events.len(), 1, "{text:?}");
    assert!(stream.pending.is_empty() && stream.unterminated.is_empty());
    let lines = &stream.events[0];
    assert_eq!(lines[0].0, "event", "{text:?}");
    assert!(
        lines[1..].iter().all(|(name, _)| name == "data"),
        "{text:?}"
    );
    sse_reader::dispatched(lines).expect("dispatches")
}

/// A body in chunked coding, cut into chunks of the given sizes (with a
/// chunk extension and upper-case hex on some), then a trailer.
fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut wire = Vec::new();
    let mut rest = body;
    for (i, &size) in sizes.iter().cycle().enumerate() {
        if rest.is_empty() {
            break;
        }
        let (chunk, after) = rest.split_at(size.clamp(1, rest.len()));
        rest = after;
        let line = match i % 3 {
            0 => format!("{:x}\r\n", chunk.len()),
            1 => format!("{:X};name=value\r\n", chunk.len()),
            _ => format!("{:x} ;x\r\n", chunk.len()),
        };
        wire.extend_from_slice(line.as_bytes());
        wire.extend_from_slice(chunk);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    wire
}

/// Feeds `wire` to a chunked decoder in reads of the given sizes, as the
/// edge does; returns the outcome, the body, and the bytes left over.
fn decode_in_reads(
    wire: &[u8],
    reads: &[usize],
    limit: usize,
) -> (Result<bool, herald::fuzzing::Refusal>, Vec<u8>, Vec<u8>) {
    let mut decoder = Chunked::default();
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    let mut fed = 0;
    let mut result = Ok(false);
    for &size in reads.iter().cycle() {
        let end = (fed + size.max(1)).min(wire.len());
        input.extend_from_slice(&wire[fed..end]);
        fed = end;
        result = decoder.decode(&mut input, &mut out, limit);
        if !matches!(result, Ok(false)) || fed == wire.len() {
            break;
        }
    }
    input.extend_from_slice(&wire[fed..]);
    (result, out.to_vec(), input.to_vec())
}

proptest! {
    #[test]
    fn a_cursor_decodes_to_the_positions_it_encodes(
        positions in prop::collection::btree_map(channel(), stream_id(), 0..8)
    ) {
        let text = encode_cursor(positions.iter().map(|(c, id)| (c.as_str(), *id)));
        prop_assert!(text.starts_with("v1."));
        prop_assert!(text[3..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let cursor = Cursor::decode(&text).expect("decodes");
        for (channel, id) in &positions {
            prop_assert_eq!(cursor.get(channel), Some(*id));
        }
        let absent = Channel::parse("topic:absent").expect("valid");
        prop_assert_eq!(cursor.get(&absent), positions.get(&absent).copied());
    }

    #[test]
    fn any_text_is_one_event_whose_data_is_the_text(
        text in any::<String>(),
        event in proptest::option::of("[A-Za-z0-9_.:-]{1,64}"),
    ) {
        let json = serde_json::to_string(&text).expect("serialises");
        let (name, data) = sse_event(event.as_deref(), &json);
        prop_assert_eq!(name, event.as_deref().unwrap_or("message"));
        prop_assert_eq!(data, sse_reader::normalise_line_ends(&text));
    }

    #[test]
    fn any_other_json_is_one_event_of_one_compact_line(value in json_value()) {
        prop_assume!(!value.is_string());
        let pretty = serde_json::to_string_pretty(&value).expect("serialises");
        let (_, data) = sse_event(None, &pretty);
        prop_assert!(!data.contains(['\n', '\r']));
        prop_assert_eq!(serde_json::from_str::<Value>(&data).expect("JSON"), value);
    }

    #[test]
    fn a_chunked_body_in_any_pieces_decodes_whole(
        body in prop::collection::vec(any::<u8>(), 0..2048),
        sizes in prop::collection::vec(1usize..600, 1..8),
        reads in prop::collection::vec(1usize..700, 1..8),
    ) {
        let mut wire = chunked(&body, &sizes);
        wire.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
        let (result, out, left) = decode_in_reads(&wire, &reads, 4096);
        prop_assert_eq!(result, Ok(true));
        prop_assert_eq!(out, body);
        prop_assert_eq!(left, b"GET /next HTTP/1.1\r\n\r\n".to_vec(), "the pipelined request stays");
    }

    #[test]
    fn a_chunked_body_over_the_limit_is_413_without_buffering_past_it(
        body in prop::collection::vec(any::<u8>(), 1..2048),
        sizes in prop::collection::vec(1usize..600, 1..8),
        reads in prop::collection::vec(1usize..700, 1..8),
        limit in 0usize..2048,
    ) {
        prop_assume!(body.len() > limit);
        let (result, out, _) = decode_in_reads(&chunked(&body, &sizes), &reads, limit);
        prop_assert_eq!(result, Err(body_too_large()));
        prop_assert!(out.len() <= limit);
    }

    #[test]
    fn a_content_length_head_frames_exactly_its_body(
        body in prop::collection::vec(any::<u8>(), 0..2048),
        padding in "[ \t]{0,3}",
    ) {
        let head = format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length:{padding}{}{padding}\r\n\r\n",
            body.len()
        );
        let mut wire = head.clone().into_bytes();
        wire.extend_from_slice(&body);
        let parsed = parse_head(&wire).expect("valid").expect("complete");
        prop_assert_eq!(parsed.len, head.len());
        prop_assert_eq!(parsed.body, BodyFraming::Length(body.len() as u64));
        prop_assert_eq!(&wire[parsed.len..], &body[..]);
    }
}

/// The same properties on cases a reader can check by eye.
#[test]
fn known_cases_read_back_as_published() {
    assert_eq!(
        sse_event(None, r#""a\r\nb\rc\nd""#),
        ("message".to_owned(), "a\nb\nc\nd".to_owned())
    );
    assert_eq!(
        sse_event(Some("x"), "{\n \"k\": [1, \"a b\"]\n}"),
        ("x".to_owned(), r#"{"k":[1,"a b"]}"#.to_owned())
    );
    let positions = BTreeMap::from([(Channel::broadcast(), StreamId { ms: 1, seq: 2 })]);
    let text = encode_cursor(positions.iter().map(|(c, id)| (c.as_str(), *id)));
    assert_eq!(
        Cursor::decode(&text)
            .expect("decodes")
            .get(&Channel::broadcast()),
        Some(StreamId { ms: 1, seq: 2 })
    );
    let (result, out, left) = decode_in_reads(&chunked(b"hello world", &[5]), &[3], 64);
    assert_eq!(
        (result, &out[..], &left[..]),
        (Ok(true), &b"hello world"[..], &b""[..])
    );
}
