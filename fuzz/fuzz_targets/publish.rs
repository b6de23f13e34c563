//! The `POST /publish` body: its JSON shapes, then every message through
//! `Publisher::check`, then (for what is accepted) the frame a node writes.
//! Property: no body the edge accepts can put an extra SSE field or event
//! on the wire.
#![no_main]

use herald::fuzzing::parse_publish_body;
use herald::fuzzing::valid_event_name;
use herald::fuzzing::ApiError;
use herald::fuzzing::Channel;
use herald_fuzz::{assert_one_event, deliver, publisher, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let (messages, batch) = match parse_publish_body(body) {
        Ok(parsed) => parsed,
        Err(error) => {
            assert!(matches!(error, ApiError::BadRequest(_)), "{error:?}");
            return;
        }
    };
    assert!((1..=1000).contains(&messages.len()));
    assert!(batch || messages.len() == 1);
    for message in messages {
        let valid = Channel::parse(&message.channel).is_ok()
            && message.event.as_deref().is_none_or(valid_event_name)
            && message.data.get().len() <= MAX_PAYLOAD;
        let checked = publisher().check(message.clone());
        assert_eq!(checked.is_ok(), valid, "{message:?} -> {checked:?}");
        let Ok(checked) = checked else { continue };
        assert_eq!(checked.channel.as_str(), message.channel);
        let frame = deliver(&checked.channel, message.event.as_deref(), &message.data);
        assert_one_event(message.event.as_deref(), message.data.get(), &frame);
    }
});
