//! The envelope as it arrives from Redis, under a payload limit, and the
//! frame a node builds from it: parsing never panics, what parses keeps the
//! envelope's rules, re-encodes to itself, and becomes exactly one SSE event.
#![no_main]

use herald::fuzzing::{
    encode_envelope, encode_message, now_ms, valid_event_name, Channel, Envelope, Frame,
    MAX_CLOCK_SKEW_MS,
};
use herald_fuzz::assert_one_event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let small = Envelope::parse(payload, 16);
    let parsed = Envelope::parse(payload, herald_fuzz::MAX_PAYLOAD);
    if small.is_ok() {
        assert!(
            parsed.is_ok(),
            "a larger limit refused what a smaller one took"
        );
    }
    let frame = Frame::decode(Channel::broadcast(), payload, herald_fuzz::MAX_PAYLOAD);
    let Ok(envelope) = parsed else {
        assert!(frame.is_none(), "a frame from an invalid envelope");
        return;
    };
    let frame = frame.expect("a valid envelope makes a frame");

    if let Some(event) = envelope.event {
        assert!(valid_event_name(event));
    }
    assert!(envelope.data.get().len() <= herald_fuzz::MAX_PAYLOAD);
    assert!(serde_json::from_str::<&serde_json::value::RawValue>(envelope.data.get()).is_ok());
    if let Some(id) = envelope.id {
        assert!(id.ms <= now_ms() + MAX_CLOCK_SKEW_MS);
    }

    let again = encode_envelope(
        envelope.id,
        envelope.event,
        envelope.data,
        envelope.ts.unwrap_or(0),
    );
    let back = Envelope::parse(again.as_bytes(), herald_fuzz::MAX_PAYLOAD)
        .expect("a re-encoded envelope parses");
    assert_eq!(back.id, envelope.id);
    assert_eq!(back.event, envelope.event);
    assert_eq!(back.data.get(), envelope.data.get());
    assert_eq!(back.ts, Some(envelope.ts.unwrap_or(0)));

    assert_eq!(frame.id, envelope.id);
    assert_eq!(frame.body, encode_message(&envelope));
    assert_one_event(envelope.event, envelope.data.get(), &frame.body);
});
