//! The resume cursor (`Last-Event-ID`, `?last_event_id=`): decoding any
//! text never panics, a decoded cursor re-encodes to one that decodes to the
//! same positions, and any positions round-trip; the allocation-free
//! `position_in` reads the same positions off an encoded cursor.
#![no_main]

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use herald::fuzzing::Channel;
use herald::fuzzing::{encode_cursor, position_in, Cursor};
use herald::StreamId;
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_decoded(text);
    }
    // The input as the cursor's JSON, so the fuzzer gets past base64.
    check_decoded(&format!("v1.{}", URL_SAFE_NO_PAD.encode(data)));

    let mut u = Unstructured::new(data);
    let entries: Vec<(String, u64, u64)> = u.arbitrary().unwrap_or_default();
    let positions: BTreeMap<Channel, StreamId> = entries
        .into_iter()
        .filter_map(|(name, ms, seq)| Some((Channel::parse(&name).ok()?, StreamId { ms, seq })))
        .collect();
    let encoded = encode(&positions);
    let cursor = Cursor::decode(&encoded).expect("an encoded cursor decodes");
    for (channel, id) in &positions {
        assert_eq!(cursor.get(channel), Some(*id));
        assert_eq!(position_in(&encoded, channel), Some(*id));
    }
});

fn check_decoded(text: &str) {
    // Any text: no panic.
    if let Ok(channel) = Channel::parse("broadcast") {
        let _ = position_in(text, &channel);
    }
    let Ok(cursor) = Cursor::decode(text) else {
        return;
    };
    // Decoded, so the text is `v1.` + base64url(JSON object of channel →
    // `<ms>-<seq>`); read it back independently to re-encode it.
    let json = URL_SAFE_NO_PAD
        .decode(&text[3..])
        .expect("a decoded cursor is base64url");
    let map: BTreeMap<String, String> = serde_json::from_slice(&json).expect("a JSON object");
    let mut positions = BTreeMap::new();
    for (name, id) in map {
        let channel = Channel::parse(&name).expect("a decoded cursor has valid channels");
        let id: StreamId = id.parse().expect("and valid ids");
        assert_eq!(cursor.get(&channel), Some(id));
        positions.insert(channel, id);
    }
    assert_eq!(Cursor::decode(&encode(&positions)), Ok(cursor));
}

/// Encodes with the node's encoder and checks the text is fit for an `id:`
/// line and a header: base64url characters after `v1.`, nothing else.
fn encode(positions: &BTreeMap<Channel, StreamId>) -> String {
    let text = encode_cursor(positions.iter().map(|(c, id)| (c.as_str(), *id)));
    let body = text.strip_prefix("v1.").expect("versioned");
    assert!(
        body.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{text:?}"
    );
    text
}
