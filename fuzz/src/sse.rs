//! A strict reader of `text/event-stream`, for the SSE framing properties
//! (the fuzz targets and `tests/properties.rs` include this one file).
//!
//! It splits lines and fields exactly as EventSource does (WHATWG HTML,
//! "Server-sent events": CRLF, LF or CR end a line; a blank line ends an
//! event; the first `:` splits name from value, one space after it dropped),
//! but unlike a browser, or the tests' client, it keeps every line it sees:
//! an `id:`, `retry:`, comment or unknown field smuggled into a frame, or a
//! second event, is there to be asserted on, not silently ignored.

/// One line of an event: a field name and its value (a comment is the
/// name `:`).
pub type Field = (String, String);

/// What a byte stream holds, line by line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stream {
    /// The lines of each event, in order (an event ends at a blank line).
    pub events: Vec<Vec<Field>>,
    /// Lines after the last blank line: an event not yet ended.
    pub pending: Vec<Field>,
    /// Text after the last line end: a line not yet ended.
    pub unterminated: String,
}

/// Reads a whole stream.
pub fn read(stream: &str) -> Stream {
    let mut out = Stream::default();
    let mut rest = stream;
    while let Some(end) = rest.find(['\r', '\n']) {
        let line = &rest[..end];
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
        if line.is_empty() {
            if !out.pending.is_empty() {
                out.events.push(std::mem::take(&mut out.pending));
            }
            continue;
        }
        let field = match line.strip_prefix(':') {
            Some(comment) => (":".to_owned(), comment.to_owned()),
            None => match line.split_once(':') {
                Some((name, value)) => (
                    name.to_owned(),
                    value.strip_prefix(' ').unwrap_or(value).to_owned(),
                ),
                None => (line.to_owned(), String::new()),
            },
        };
        out.pending.push(field);
    }
    out.unterminated = rest.to_owned();
    out
}

/// The event type and data EventSource dispatches for one event's lines,
/// or `None` if it dispatches nothing (no `data` line).
pub fn dispatched(event: &[Field]) -> Option<(String, String)> {
    let mut name = None;
    let mut data: Option<String> = None;
    for (field, value) in event {
        match field.as_str() {
            "event" => name = Some(value.clone()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.clone()),
            },
            _ => {}
        }
    }
    let name = name.filter(|n| !n.is_empty());
    Some((name.unwrap_or_else(|| "message".to_owned()), data?))
}

/// Text as EventSource hands a multi-line `data` back: every line end
/// (CRLF, CR, LF) becomes LF.
pub fn normalise_line_ends(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}
