//! The message envelope: the JSON that travels over pub/sub and is stored in
//! history, and the stream ids that order it.
//!
//! `{"id":"1732240000000-0","event":"notice","data":<JSON>,"ts":1732240000000}`
//!
//! Everything here is input from outside (publishers, Redis), so parsing
//! never panics: a payload that is not a valid envelope is an
//! [`EnvelopeError`] the caller counts and drops.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// How far ahead of this node's clock an envelope id may be (Redis' clock
/// and ours differ a little); beyond it the id is treated as forged.
pub const MAX_CLOCK_SKEW_MS: u64 = 60_000;

/// Longest event name, in bytes.
pub(crate) const MAX_EVENT_LEN: usize = 64;

/// A position in a channel's history, in Redis stream-id form `<ms>-<seq>`.
/// Ordered, so replay and live delivery can be merged without duplicates.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct StreamId {
    /// Milliseconds since the Unix epoch when the entry was added.
    pub ms: u64,
    /// Sequence within that millisecond.
    pub seq: u64,
}

impl StreamId {
    /// The position before any entry.
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    /// Appends `<ms>-<seq>` to `out` without the formatting machinery:
    /// every publish reply carries one.
    pub(crate) fn push_to(self, out: &mut String) {
        let mut digits = itoa::Buffer::new();
        out.push_str(digits.format(self.ms));
        out.push('-');
        out.push_str(digits.format(self.seq));
    }

    /// The next id after `self` at wall-clock `now_ms`, never going backwards
    /// (Redis' XADD `*` rule), so ids stay monotonic if the clock steps back.
    pub fn next_after(self, now_ms: u64) -> StreamId {
        if now_ms > self.ms {
            StreamId { ms: now_ms, seq: 0 }
        } else {
            StreamId {
                ms: self.ms,
                seq: self.seq.saturating_add(1),
            }
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A string that is not `<ms>-<seq>`.
#[derive(Debug, thiserror::Error)]
#[error("not a stream id")]
pub struct BadStreamId;

impl FromStr for StreamId {
    type Err = BadStreamId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.split_once('-').ok_or(BadStreamId)?;
        Ok(StreamId {
            ms: decimal(ms)?,
            seq: decimal(seq)?,
        })
    }
}

/// 1-20 digits as a u64, in one pass (every envelope and publish reply
/// has an id; `str::parse` after a check of the digits took two): no sign,
/// no spaces, no overflow.
fn decimal(digits: &str) -> Result<u64, BadStreamId> {
    if digits.is_empty() || digits.len() > 20 {
        return Err(BadStreamId);
    }
    digits.bytes().try_fold(0u64, |n, b| {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return Err(BadStreamId);
        }
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d)))
            .ok_or(BadStreamId)
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether `name` is a valid event name: `[A-Za-z0-9_.:-]{1,64}`.
pub fn valid_event_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_EVENT_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Why a payload was not accepted as an envelope.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Not JSON, or not the envelope's shape.
    #[error("not an envelope: {0}")]
    Shape(#[from] serde_json::Error),
    /// `event` outside `[A-Za-z0-9_.:-]{1,64}`.
    #[error("invalid event name")]
    EventName,
    /// `id` present but not `<ms>-<seq>`.
    #[error("invalid id")]
    Id,
    /// `data` larger than the configured maximum.
    #[error("data larger than {0} bytes")]
    TooLarge(usize),
}

/// A parsed, validated envelope borrowing from its payload.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// History position; `None` for live-only messages (plain PUBLISH).
    pub id: Option<StreamId>,
    /// Event name; `None` means `message`.
    pub event: Option<&'a str>,
    /// The data, as the JSON text it arrived as.
    pub data: &'a RawValue,
    /// Publish time in ms, for the delivery-lag metric.
    pub ts: Option<u64>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(default, borrow)]
    id: Option<&'a str>,
    #[serde(default, borrow)]
    event: Option<&'a str>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    ts: Option<u64>,
}

impl<'a> Envelope<'a> {
    /// Parses and validates a pub/sub or history payload.
    pub fn parse(payload: &'a [u8], max_payload: usize) -> Result<Self, EnvelopeError> {
        let wire: Wire<'a> = serde_json::from_slice(payload)?;
        if let Some(event) = wire.event {
            if !valid_event_name(event) {
                return Err(EnvelopeError::EventName);
            }
        }
        if wire.data.get().len() > max_payload {
            return Err(EnvelopeError::TooLarge(max_payload));
        }
        let id = match wire.id {
            Some(id) => Some(id.parse().map_err(|_| EnvelopeError::Id)?),
            None => None,
        };
        // Ids come from Redis' clock via the publish script. One far in the
        // future was forged by a raw PUBLISH, and would move every
        // connection's position past messages still to come.
        if id.is_some_and(|id: StreamId| id.ms > now_ms().saturating_add(MAX_CLOCK_SKEW_MS)) {
            return Err(EnvelopeError::Id);
        }
        Ok(Envelope {
            id,
            event: wire.event,
            data: wire.data,
            ts: wire.ts,
        })
    }
}

/// Serialises an envelope; `data` must already be valid JSON text.
pub fn encode(id: Option<StreamId>, event: Option<&str>, data: &RawValue, ts: u64) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        event: Option<&'a str>,
        data: &'a RawValue,
        ts: u64,
    }
    let out = Out {
        id: id.map(|id| id.to_string()),
        event,
        data,
        ts,
    };
    // Serialising borrowed strings and a RawValue cannot fail.
    serde_json::to_string(&out).unwrap_or_default()
}

/// Removes insignificant whitespace from JSON text, keeping key order (a
/// round trip through `serde_json::Value` would sort keys). Newlines must go:
/// they would end the SSE `data:` line. Input must be valid JSON.
pub(crate) fn compact_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_ascii_whitespace() {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids() {
        let id: StreamId = "1732240000000-7".parse().expect("valid");
        assert_eq!(
            id,
            StreamId {
                ms: 1_732_240_000_000,
                seq: 7
            }
        );
        assert_eq!(id.to_string(), "1732240000000-7");
        assert!("1-".parse::<StreamId>().is_err());
        assert!("-1".parse::<StreamId>().is_err());
        assert!("a-1".parse::<StreamId>().is_err());
        assert!("99999999999999999999999-1".parse::<StreamId>().is_err());
        assert!("18446744073709551616-0".parse::<StreamId>().is_err());
        assert!("+1-0".parse::<StreamId>().is_err());
        assert!("000000000000000000001-0".parse::<StreamId>().is_err());
        assert!("1-0-0".parse::<StreamId>().is_err());
        assert_eq!(
            "18446744073709551615-0".parse::<StreamId>().ok(),
            Some(StreamId {
                ms: u64::MAX,
                seq: 0
            })
        );
        assert!(StreamId { ms: 1, seq: 9 } < StreamId { ms: 2, seq: 0 });
        assert_eq!(id.next_after(id.ms - 5), StreamId { ms: id.ms, seq: 8 });
        assert_eq!(
            id.next_after(id.ms + 1),
            StreamId {
                ms: id.ms + 1,
                seq: 0
            }
        );
    }

    #[test]
    fn event_names() {
        assert!(valid_event_name("notice"));
        assert!(valid_event_name("order.created:v2-x_y"));
        assert!(!valid_event_name(""));
        assert!(!valid_event_name("two words"));
        assert!(!valid_event_name("line\nbreak"));
        assert!(!valid_event_name(&"x".repeat(65)));
    }

    #[test]
    fn envelopes_parse_and_reject() {
        let p = br#"{"id":"5-1","event":"notice","data":{"a":1},"ts":9}"#;
        let e = Envelope::parse(p, 1024).expect("valid");
        assert_eq!(e.id, Some(StreamId { ms: 5, seq: 1 }));
        assert_eq!(e.event, Some("notice"));
        assert_eq!(e.data.get(), r#"{"a":1}"#);
        assert!(Envelope::parse(br#"{"data":"x"}"#, 1024)
            .expect("live")
            .id
            .is_none());
        assert!(Envelope::parse(b"garbage", 1024).is_err());
        assert!(Envelope::parse(br#"{"event":"x"}"#, 1024).is_err());
        assert!(Envelope::parse(br#"{"data":1,"event":"a b"}"#, 1024).is_err());
        assert!(Envelope::parse(br#"{"data":1,"id":"nope"}"#, 1024).is_err());
        let forged = format!(r#"{{"data":1,"id":"{}-0"}}"#, now_ms() + 3_600_000);
        assert!(Envelope::parse(forged.as_bytes(), 1024).is_err());
        assert!(Envelope::parse(br#"{"data":"xxxxxxxx"}"#, 4).is_err());
    }

    #[test]
    fn encode_round_trips() {
        let data = RawValue::from_string(r#"[1,"two"]"#.into()).expect("json");
        let text = encode(Some(StreamId { ms: 3, seq: 0 }), None, &data, 42);
        let e = Envelope::parse(text.as_bytes(), 1024).expect("valid");
        assert_eq!(e.id, Some(StreamId { ms: 3, seq: 0 }));
        assert_eq!(e.data.get(), r#"[1,"two"]"#);
        assert_eq!(e.ts, Some(42));
    }

    #[test]
    fn compaction_keeps_strings_and_order() {
        let pretty = "{\n  \"b\": \"x y\\\" z\",\n  \"a\": [1, 2]\n}";
        assert_eq!(compact_json(pretty), r#"{"b":"x y\" z","a":[1,2]}"#);
    }
}
