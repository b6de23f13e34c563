//! What the fuzz targets share: the strict SSE reader, a real `Publisher`
//! for its checks, and the property every accepted message must keep all
//! the way to the wire.

pub mod sse;

use std::sync::OnceLock;

use herald::fuzzing::encode_envelope;
use herald::fuzzing::Channel;
use herald::fuzzing::Frame;
use herald::Publisher;
use herald::StreamId;
use serde_json::value::RawValue;

/// `--max-payload` for the targets: small, so the fuzzer reaches the limit.
pub const MAX_PAYLOAD: usize = 4096;

/// A publisher over the embedded broker. Only its checks run (nothing is
/// published), so the broker's runtime is never driven; it is leaked
/// because the broker's sweeper task lives in it for the whole process.
pub fn publisher() -> &'static Publisher {
    static PUBLISHER: OnceLock<Publisher> = OnceLock::new();
    PUBLISHER.get_or_init(|| {
        let runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a current-thread runtime"),
        ));
        let _entered = runtime.enter();
        herald::fuzzing::embedded_publisher(1, MAX_PAYLOAD)
    })
}

/// What a node writes for a message the publisher accepted: the envelope
/// as it arrives from Redis (the publish script puts `data` in verbatim),
/// decoded into a frame. A message the publisher accepts must decode.
pub fn deliver(channel: &Channel, event: Option<&str>, data: &RawValue) -> Vec<u8> {
    let payload = encode_envelope(Some(StreamId { ms: 1, seq: 0 }), event, data, 1);
    let frame = Frame::decode(channel.clone(), payload.as_bytes(), MAX_PAYLOAD)
        .unwrap_or_else(|| panic!("an accepted message is dropped by the node: {payload}"));
    frame.body.to_vec()
}

/// The SSE property: a message frame is exactly one event, holding one
/// `event:` line and then `data:` lines and nothing else (no `id:`,
/// `retry:`, comment, other field or second event), and EventSource reads
/// back what was published: a JSON string as its text (line ends
/// normalised), any other value as compact JSON on one line.
pub fn assert_one_event(event: Option<&str>, data: &str, frame: &[u8]) {
    let text = std::str::from_utf8(frame).expect("frames are UTF-8");
    let stream = sse::read(text);
    assert!(
        stream.events.len() == 1 && stream.pending.is_empty() && stream.unterminated.is_empty(),
        "not exactly one whole event: {text:?}"
    );
    let lines = &stream.events[0];
    assert_eq!(lines[0].0, "event", "{text:?}");
    assert!(lines.len() >= 2, "no data line: {text:?}");
    assert!(
        lines[1..].iter().all(|(name, _)| name == "data"),
        "a field other than data after event: {text:?}"
    );
    let (name, got) = sse::dispatched(lines).expect("has data");
    assert_eq!(name, event.unwrap_or("message"), "{text:?}");
    match serde_json::from_str::<String>(data) {
        Ok(string) => assert_eq!(got, sse::normalise_line_ends(&string), "{text:?}"),
        Err(_) => {
            assert!(!got.contains(['\n', '\r']), "{text:?}");
            let sent = serde_json::from_str::<serde_json::Value>(data);
            let read = serde_json::from_str::<serde_json::Value>(&got);
            if let Ok(sent) = sent {
                assert_eq!(read.ok(), Some(sent), "data changed on the way: {text:?}");
            }
        }
    }
}
