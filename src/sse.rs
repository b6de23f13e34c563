//! SSE wire encoding and the resume cursor.
//!
//! A message is encoded once per node into the part every connection shares
//! (`event:` and `data:` lines); only the `id:` line, which carries that
//! connection's [`Cursor`], is written per connection.
//!
//! The cursor is `v1.` + base64url(JSON object channel → stream id). It holds
//! a position for every channel of the connection, because one SSE
//! `Last-Event-ID` must resume several channels at once.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};

use crate::channel::Channel;
use crate::envelope::{compact_json, Envelope, StreamId};

/// Longest `Last-Event-ID` we try to decode; anything longer is malformed.
pub(crate) const MAX_CURSOR_LEN: usize = 16 * 1024;

const CURSOR_VERSION: &str = "v1.";

/// The shared part of one message's frame: `event:` + `data:` lines and the
/// blank line that ends the event. Built once per node per message.
pub fn encode_message(envelope: &Envelope<'_>) -> Bytes {
    let raw = envelope.data.get();
    let mut out = BytesMut::with_capacity(raw.len() + 32);
    out.put_slice(b"event: ");
    out.put_slice(envelope.event.unwrap_or("message").as_bytes());
    out.put_u8(b'\n');
    // Only a JSON string starts with a quote. Asking serde_json for a String
    // from anything else would build (and drop) an error with its message,
    // about 2 k instructions per message for the commonest data: objects.
    let text = if raw.trim_ascii_start().starts_with('"') {
        serde_json::from_str::<String>(raw).ok()
    } else {
        None
    };
    match text {
        // A JSON string is sent as its text; each line its own `data:` line
        // (SSE treats \r\n, \r and \n alike as line ends).
        Some(text) => {
            for line in text.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
                out.put_slice(b"data: ");
                out.put_slice(line.as_bytes());
                out.put_u8(b'\n');
            }
        }
        None => {
            out.put_slice(b"data: ");
            if raw.bytes().any(|b| b.is_ascii_whitespace()) {
                out.put_slice(compact_json(raw).as_bytes());
            } else {
                out.put_slice(raw.as_bytes());
            }
            out.put_u8(b'\n');
        }
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// A control event (`herald.ready`, `herald.reset`, `herald.expired`) with
/// JSON data, optionally carrying a cursor id.
pub(crate) fn encode_control(event: &str, data: &serde_json::Value, id: Option<&str>) -> Bytes {
    let mut out = String::new();
    if let Some(id) = id {
        let _ = writeln!(out, "id: {id}");
    }
    let _ = write!(out, "event: {event}\ndata: {data}\n\n");
    Bytes::from(out)
}

/// The `retry:` hint frame.
pub(crate) fn encode_retry(ms: u64) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

/// The heartbeat: an SSE comment, ignored by clients, that keeps proxies and
/// NATs from timing the connection out and reveals dead sockets.
pub(crate) const HEARTBEAT: &[u8] = b":\n\n";

/// A connection's position in each of its channels.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    positions: BTreeMap<String, StreamId>,
}

/// Why a `Last-Event-ID` could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed cursor")]
pub struct MalformedCursor;

impl Cursor {
    /// The position of `channel`, if the cursor has one.
    pub fn get(&self, channel: &Channel) -> Option<StreamId> {
        self.positions.get(channel.as_str()).copied()
    }

    /// Parses a `Last-Event-ID`. Entries for invalid channel names make the
    /// whole cursor malformed: it was not made by Herald.
    pub fn decode(text: &str) -> Result<Cursor, MalformedCursor> {
        if text.len() > MAX_CURSOR_LEN {
            return Err(MalformedCursor);
        }
        let body = text.strip_prefix(CURSOR_VERSION).ok_or(MalformedCursor)?;
        let json = URL_SAFE_NO_PAD.decode(body).map_err(|_| MalformedCursor)?;
        let map: BTreeMap<String, String> =
            serde_json::from_slice(&json).map_err(|_| MalformedCursor)?;
        let mut positions = BTreeMap::new();
        for (channel, id) in map {
            Channel::parse(&channel).map_err(|_| MalformedCursor)?;
            positions.insert(channel, id.parse().map_err(|_| MalformedCursor)?);
        }
        Ok(Cursor { positions })
    }
}

/// The position of `channel` in a cursor Herald wrote, as
/// `Cursor::decode(text)?.get(channel)` gives it, but without building the
/// map: for a client that reads every event's id (the load generator counts
/// order by it). Other text gives `None` or, if it looks enough like a
/// cursor, some position; it never panics.
pub fn position_in(text: &str, channel: &Channel) -> Option<StreamId> {
    let name = channel.as_str();
    let mut json = [0u8; 1024];
    let decoded = text
        .strip_prefix(CURSOR_VERSION)
        .and_then(|body| URL_SAFE_NO_PAD.decode_slice(body, &mut json).ok());
    let (Some(len), false) = (decoded, name.contains(['"', '\\'])) else {
        // Long cursors and names written escaped: the full parse.
        return Cursor::decode(text).ok()?.get(channel);
    };
    // write_cursor's keys: `{"name":"` or `,"name":"`, one per channel.
    let json = &json[..len];
    let key_len = name.len() + 5;
    let mut at = 0;
    while at + key_len <= json.len() {
        let rest = &json[at..];
        let starts_key = matches!(rest[0], b'{' | b',')
            && rest[1] == b'"'
            && rest[2..].starts_with(name.as_bytes())
            && rest[2 + name.len()..].starts_with(b"\":\"");
        if starts_key {
            let value = &rest[key_len..];
            let end = value.iter().position(|&b| b == b'"')?;
            return std::str::from_utf8(&value[..end]).ok()?.parse().ok();
        }
        at += 1;
    }
    None
}

/// Encodes positions as a cursor (`v1.` + base64url of a JSON object).
/// Takes positions from anywhere, so a connection need not keep a map.
pub fn encode_cursor<'a>(positions: impl Iterator<Item = (&'a str, StreamId)>) -> String {
    let mut out = BytesMut::with_capacity(128);
    write_cursor(&mut out, positions);
    String::from_utf8_lossy(&out).into_owned()
}

thread_local! {
    /// Scratch space for the cursor's JSON: cursors are written once per
    /// delivery, so they must not allocate.
    static CURSOR_JSON: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Appends the cursor for `positions` to `out`, allocating nothing once
/// `out` has room.
pub(crate) fn write_cursor<'a>(
    out: &mut BytesMut,
    positions: impl Iterator<Item = (&'a str, StreamId)>,
) {
    CURSOR_JSON.with_borrow_mut(|json| {
        json.clear();
        json.push(b'{');
        for (i, (channel, id)) in positions.enumerate() {
            if i > 0 {
                json.push(b',');
            }
            // Channel names have no control characters: only quotes and
            // backslashes need escaping.
            json.push(b'"');
            for &b in channel.as_bytes() {
                if b == b'"' || b == b'\\' {
                    json.push(b'\\');
                }
                json.push(b);
            }
            json.extend_from_slice(b"\":\"");
            let mut digits = itoa::Buffer::new();
            json.extend_from_slice(digits.format(id.ms).as_bytes());
            json.push(b'-');
            json.extend_from_slice(digits.format(id.seq).as_bytes());
            json.push(b'"');
        }
        json.push(b'}');
        out.put_slice(CURSOR_VERSION.as_bytes());
        let start = out.len();
        let len = base64::encoded_len(json.len(), false).unwrap_or(0);
        out.resize(start + len, 0);
        let written = URL_SAFE_NO_PAD
            .encode_slice(&json[..], &mut out[start..])
            .unwrap_or(0);
        out.truncate(start + written);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    #[test]
    fn a_position_is_read_off_a_cursor_as_decode_reads_it() {
        let id = |ms, seq| StreamId { ms, seq };
        let cursor = encode_cursor(
            [
                ("broadcast", id(17, 2)),
                ("user:a", id(5, 0)),
                ("user:ab", id(6, 1)),
                ("topic:x\"y", id(9, 9)),
            ]
            .into_iter(),
        );
        for name in [
            "broadcast",
            "user:a",
            "user:ab",
            "topic:x\"y",
            "user:b",
            "topic:a",
        ] {
            let channel = Channel::parse(name).expect("valid");
            let full = Cursor::decode(&cursor).expect("ours").get(&channel);
            assert_eq!(position_in(&cursor, &channel), full, "{name}");
        }
        let broadcast = Channel::parse("broadcast").expect("valid");
        assert_eq!(position_in(&cursor, &broadcast), Some(id(17, 2)));
        for garbage in ["", "v1.", "v1.!!!", "v2.e30", "v1.e30"] {
            assert_eq!(position_in(garbage, &broadcast), None, "{garbage}");
        }
        // Longer than the fast path's buffer: the same answer.
        let many: Vec<String> = (0..200).map(|i| format!("topic:t{i}")).collect();
        let long = encode_cursor(many.iter().map(|n| (n.as_str(), id(1, 1))));
        let last = Channel::parse("topic:t199").expect("valid");
        assert!(long.len() > 1400);
        assert_eq!(position_in(&long, &last), Some(id(1, 1)));
    }

    fn message(event: Option<&str>, data: &str) -> String {
        let raw = RawValue::from_string(data.to_owned()).expect("json");
        let envelope = Envelope {
            id: None,
            event,
            data: &raw,
            ts: None,
        };
        String::from_utf8(encode_message(&envelope).to_vec()).expect("utf8")
    }

    #[test]
    fn strings_are_sent_raw_and_split_into_lines() {
        assert_eq!(
            message(Some("notice"), r#""hi""#),
            "event: notice\ndata: hi\n\n"
        );
        assert_eq!(
            message(None, r#""a\nb\r\nc""#),
            "event: message\ndata: a\ndata: b\ndata: c\n\n"
        );
    }

    #[test]
    fn other_json_is_sent_compact_on_one_line() {
        assert_eq!(
            message(None, "{\n \"a\": [1, 2]\n}"),
            "event: message\ndata: {\"a\":[1,2]}\n\n"
        );
        assert_eq!(message(None, "42"), "event: message\ndata: 42\n\n");
        assert_eq!(
            message(None, r#"["a b"]"#),
            "event: message\ndata: [\"a b\"]\n\n"
        );
        assert_eq!(message(None, "null"), "event: message\ndata: null\n\n");
    }

    #[test]
    fn cursor_round_trips() {
        let user = Channel::parse("user:a\"b").expect("valid");
        let positions = [
            (user.as_str(), StreamId { ms: 10, seq: 2 }),
            ("broadcast", StreamId::ZERO),
        ];
        let text = encode_cursor(positions.into_iter());
        assert!(text.starts_with("v1."));
        assert!(!text.contains(['\n', '\r', '+', '/', '=']));
        let back = Cursor::decode(&text).expect("decodes");
        assert_eq!(back.get(&user), Some(StreamId { ms: 10, seq: 2 }));
        assert_eq!(back.get(&Channel::broadcast()), Some(StreamId::ZERO));
        assert_eq!(back.get(&Channel::parse("topic:x").expect("valid")), None);
    }

    #[test]
    fn garbage_cursors_are_malformed() {
        for text in ["", "v1.", "v2.e30", "v1.!!!", "v1.bm90IGpzb24", "12345-0"] {
            assert_eq!(Cursor::decode(text), Err(MalformedCursor), "{text}");
        }
        let bad_channel = format!("v1.{}", URL_SAFE_NO_PAD.encode(r#"{"room:1":"1-0"}"#));
        assert_eq!(Cursor::decode(&bad_channel), Err(MalformedCursor));
        let bad_id = format!("v1.{}", URL_SAFE_NO_PAD.encode(r#"{"broadcast":"x"}"#));
        assert_eq!(Cursor::decode(&bad_id), Err(MalformedCursor));
        assert_eq!(
            Cursor::decode(&"v".repeat(MAX_CURSOR_LEN + 1)),
            Err(MalformedCursor)
        );
    }
}
