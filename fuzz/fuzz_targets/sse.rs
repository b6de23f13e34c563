//! The SSE encoder, property: no event name and data the publisher accepts
//! produce an extra SSE field or event; EventSource reads back exactly the
//! event name and data that were published. The input is an event name
//! line and then data: the data is tried as JSON text (whitespace, escapes,
//! numbers, nesting) and as any text sent as a JSON string.
#![no_main]

use herald::fuzzing::Channel;
use herald::Message;
use herald_fuzz::{assert_one_event, deliver, publisher};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|input: &[u8]| {
    // `<event name>\n<data>`; an empty name means none (`message`).
    let Ok(input) = std::str::from_utf8(input) else {
        return;
    };
    let (event, text) = input.split_once('\n').unwrap_or(("", input));
    let event = (!event.is_empty()).then(|| event.to_owned());
    // The data as JSON text, and the text sent as a JSON string.
    let as_string = serde_json::to_string(text).expect("a string serialises");
    for json in [text.to_owned(), as_string] {
        let Ok(data) = RawValue::from_string(json) else {
            continue;
        };
        let message = Message {
            channel: "broadcast".to_owned(),
            event: event.clone(),
            data,
        };
        if publisher().check(message.clone()).is_err() {
            continue;
        }
        let frame = deliver(
            &Channel::broadcast(),
            message.event.as_deref(),
            &message.data,
        );
        assert_one_event(message.event.as_deref(), message.data.get(), &frame);
    }
});
