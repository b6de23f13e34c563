//! Incremental decoders for what an SSE client reads off a socket: the
//! HTTP/1.1 response head, the body framing (chunked, length or
//! until-close) and the `text/event-stream` format itself.
//!
//! Every decoder takes bytes in whatever pieces the socket hands over — a
//! CRLF, a chunk-size line or a UTF-8 BOM may be split anywhere — and keeps
//! only the state it needs between calls. Nothing here trusts the server:
//! every buffer is bounded and every malformed input is an error, not a
//! panic. The SSE rules follow the WHATWG "event stream interpretation"
//! (the same rules `EventSource` applies), so what we count is what a
//! browser would see.

use std::fmt;

/// Largest response head we accept; SSE servers send a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size line (with extensions) or trailer line.
const MAX_CHUNK_LINE: usize = 4096;
/// Largest SSE line or event data we buffer; far above any payload here.
pub(crate) const MAX_SSE_LINE: usize = 1024 * 1024;

/// Why a stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WireError(pub String);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

fn err<T>(msg: impl Into<String>) -> Result<T, WireError> {
    Err(WireError(msg.into()))
}

/// A parsed HTTP/1.1 response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) status: u16,
    /// Header names are lower-cased; values are trimmed.
    pub(crate) headers: Vec<(String, String)>,
    /// How the body that follows is delimited.
    pub(crate) framing: Framing,
    /// False when the server said `Connection: close` (or spoke HTTP/1.0
    /// without keep-alive): the connection cannot carry another request.
    pub(crate) keep_alive: bool,
}

impl Head {
    /// The first value of a header, by lower-case name.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Chunked,
    Length(u64),
    /// Until the server closes the connection.
    Close,
}

/// Parses a response head from the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete, else the head and the
/// number of bytes it used (the body starts right after). Interim `1xx`
/// responses are skipped. Bare LF line ends are accepted, as most clients do.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, WireError> {
    let mut start = 0;
    loop {
        let rest = &buf[start..];
        let Some(end) = head_end(rest) else {
            if rest.len() > MAX_HEAD {
                return err("response head too large");
            }
            return Ok(None);
        };
        let head = parse_head_text(&rest[..end])?;
        if (100..200).contains(&head.status) && head.status != 101 {
            start += end;
            continue;
        }
        return Ok(Some((head, start + end)));
    }
}

/// The length of the head including its blank line, if complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + p;
        // Is the next line empty ("\n" or "\r\n")?
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

fn parse_head_text(text: &[u8]) -> Result<Head, WireError> {
    let Ok(text) = std::str::from_utf8(text) else {
        return err("response head is not UTF-8");
    };
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return err(format!("not an HTTP/1.x status line: {status_line:?}")),
    };
    let code = parts.next().unwrap_or_default();
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return err(format!("bad status code in {status_line:?}"));
    }
    let status: u16 = code.parse().map_err(|_| WireError("bad status".into()))?;

    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            return err("obsolete header line folding");
        }
        let Some((name, value)) = line.split_once(':') else {
            return err(format!("header line without a colon: {line:?}"));
        };
        if name.is_empty() || name.ends_with([' ', '\t']) {
            return err(format!("bad header name {name:?}"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }

    let mut chunked = false;
    let mut length: Option<u64> = None;
    let mut keep_alive = !http10;
    for (name, value) in &headers {
        match name.as_str() {
            "transfer-encoding" => {
                // Only the last coding decides the framing.
                let last = value.rsplit(',').next().unwrap_or_default().trim();
                chunked = last.eq_ignore_ascii_case("chunked");
                if !chunked {
                    length = None;
                }
            }
            "content-length" => {
                if !value.bytes().all(|b| b.is_ascii_digit()) || value.is_empty() {
                    return err(format!("bad content-length {value:?}"));
                }
                let n: u64 = value
                    .parse()
                    .map_err(|_| WireError("content-length overflow".into()))?;
                if length.is_some_and(|l| l != n) {
                    return err("conflicting content-length headers");
                }
                length = Some(n);
            }
            "connection" => {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                        keep_alive = true;
                    }
                }
            }
            _ => {}
        }
    }
    let framing = if chunked {
        Framing::Chunked
    } else if status == 204 || status == 304 {
        Framing::Length(0)
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::Close
    };
    Ok(Head {
        status,
        headers,
        framing,
        keep_alive,
    })
}

/// Removes the body framing, handing out the payload bytes without copying.
#[derive(Debug, Clone)]
pub(crate) struct BodyDecoder {
    state: BodyState,
    /// Bytes of the current chunk-size or trailer line (bounded).
    line_len: usize,
    /// The chunk size being read, before it is complete.
    size: u64,
    size_digits: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    /// Identity body with this many bytes left.
    Length(u64),
    Close,
    ChunkSize,
    /// After the size: extensions or whitespace up to the line end.
    ChunkExt,
    ChunkSizeLf,
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    TrailerLineStart,
    TrailerLine,
    TrailerEndLf,
    Done,
}

impl BodyDecoder {
    pub(crate) fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Chunked => BodyState::ChunkSize,
            Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Close => BodyState::Close,
        };
        BodyDecoder {
            state,
            line_len: 0,
            size: 0,
            size_digits: 0,
        }
    }

    /// True once the whole body has been read (never for until-close).
    pub(crate) fn is_done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// Decodes `input`, passing each run of payload bytes to `sink`.
    /// Returns how many bytes of `input` belong to this body: less than
    /// `input.len()` only when the body ended inside it.
    pub(crate) fn decode(
        &mut self,
        input: &[u8],
        sink: &mut impl FnMut(&[u8]),
    ) -> Result<usize, WireError> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                BodyState::Done => return Ok(i),
                BodyState::Close => {
                    sink(&input[i..]);
                    return Ok(input.len());
                }
                BodyState::Length(left) => {
                    let take = left.min((input.len() - i) as u64) as usize;
                    sink(&input[i..i + take]);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        BodyState::Done
                    } else {
                        BodyState::Length(left)
                    };
                }
                BodyState::ChunkData(left) => {
                    let take = left.min((input.len() - i) as u64) as usize;
                    sink(&input[i..i + take]);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        BodyState::ChunkDataCr
                    } else {
                        BodyState::ChunkData(left)
                    };
                }
                _ => {
                    let b = input[i];
                    i += 1;
                    self.step(b)?;
                }
            }
        }
        Ok(i)
    }

    /// One byte of chunk framing (size lines, CRLFs, trailers).
    fn step(&mut self, b: u8) -> Result<(), WireError> {
        use BodyState::*;
        match self.state {
            ChunkSize => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    self.size_digits += 1;
                    if self.size_digits > 15 {
                        return err("chunk size too large");
                    }
                    let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                    self.size = self.size * 16 + d;
                }
                b';' | b' ' | b'\t' if self.size_digits > 0 => {
                    self.state = ChunkExt;
                    self.line_len = 0;
                }
                b'\r' if self.size_digits > 0 => self.state = ChunkSizeLf,
                b'\n' if self.size_digits > 0 => self.end_size_line(),
                _ => return err(format!("bad byte {b:#04x} in chunk size")),
            },
            ChunkExt => match b {
                b'\r' => self.state = ChunkSizeLf,
                b'\n' => self.end_size_line(),
                _ => {
                    self.line_len += 1;
                    if self.line_len > MAX_CHUNK_LINE {
                        return err("chunk extension too long");
                    }
                }
            },
            ChunkSizeLf => match b {
                b'\n' => self.end_size_line(),
                _ => return err("CR without LF after chunk size"),
            },
            ChunkDataCr => match b {
                b'\r' => self.state = ChunkDataLf,
                b'\n' => self.state = ChunkSize,
                _ => return err("chunk data longer than its size"),
            },
            ChunkDataLf => match b {
                b'\n' => self.state = ChunkSize,
                _ => return err("CR without LF after chunk data"),
            },
            TrailerLineStart => match b {
                b'\r' => self.state = TrailerEndLf,
                b'\n' => self.state = Done,
                _ => {
                    self.state = TrailerLine;
                    self.line_len = 1;
                }
            },
            TrailerLine => match b {
                b'\n' => self.state = TrailerLineStart,
                _ => {
                    self.line_len += 1;
                    if self.line_len > MAX_CHUNK_LINE {
                        return err("trailer line too long");
                    }
                }
            },
            TrailerEndLf => match b {
                b'\n' => self.state = Done,
                _ => return err("CR without LF at end of trailers"),
            },
            Length(_) | Close | ChunkData(_) | Done => {}
        }
        Ok(())
    }

    fn end_size_line(&mut self) {
        self.state = if self.size == 0 {
            BodyState::TrailerLineStart
        } else {
            BodyState::ChunkData(self.size)
        };
        self.size = 0;
        self.size_digits = 0;
    }
}

/// One thing the event stream produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SseItem<'a> {
    /// A dispatched event. `event` is `message` when the stream named none;
    /// `id` is the stream's last event ID at dispatch (what `EventSource`
    /// would send back as `Last-Event-ID`).
    Event {
        event: &'a [u8],
        data: &'a [u8],
        id: &'a [u8],
    },
    /// A `:` comment line (heartbeats), without the colon.
    Comment(&'a [u8]),
    /// A valid `retry:` field, in milliseconds.
    Retry(u64),
}

/// The `text/event-stream` interpreter, fed with body bytes.
#[derive(Debug, Default, Clone)]
pub(crate) struct SseParser {
    /// A line split across reads.
    line: Vec<u8>,
    data: Vec<u8>,
    event: Vec<u8>,
    /// The "last event ID buffer" of the spec: set by `id:` fields.
    id: Vec<u8>,
    /// The previous read ended in CR: an LF starting the next one belongs
    /// to the same line end.
    after_cr: bool,
    /// Bytes of a possible leading UTF-8 BOM seen so far (0..=3); 4 once
    /// the start of the stream is behind us.
    bom: u8,
}

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

impl SseParser {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The last event ID, as `EventSource` would resend it.
    pub(crate) fn last_event_id(&self) -> &[u8] {
        &self.id
    }

    /// Starts a new stream (a reconnect) keeping the last event ID, as
    /// `EventSource` does.
    pub(crate) fn reset_keep_id(&mut self) {
        self.line.clear();
        self.data.clear();
        self.event.clear();
        self.after_cr = false;
        self.bom = 0;
    }

    /// Feeds body bytes, calling `f` for every item they complete.
    pub(crate) fn feed(
        &mut self,
        mut input: &[u8],
        f: &mut impl FnMut(SseItem<'_>),
    ) -> Result<(), WireError> {
        // A BOM may only open the stream, and may arrive split.
        while self.bom < 4 {
            let Some(&b) = input.first() else {
                return Ok(());
            };
            let at = self.bom as usize;
            if at < 3 && b == BOM[at] {
                self.bom += 1;
                input = &input[1..];
                if self.bom == 3 {
                    self.bom = 4;
                }
            } else {
                // Not a BOM after all: what matched so far is content.
                let matched = at;
                self.bom = 4;
                if matched > 0 {
                    let prefix = BOM[..matched].to_vec();
                    self.feed_lines(&prefix, f)?;
                }
            }
        }
        self.feed_lines(input, f)
    }

    fn feed_lines(
        &mut self,
        input: &[u8],
        f: &mut impl FnMut(SseItem<'_>),
    ) -> Result<(), WireError> {
        let mut i = 0;
        if self.after_cr && !input.is_empty() {
            self.after_cr = false;
            if input[0] == b'\n' {
                i = 1;
            }
        }
        while i < input.len() {
            let rest = &input[i..];
            let Some(p) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                if self.line.len() + rest.len() > MAX_SSE_LINE {
                    return err("event-stream line too long");
                }
                self.line.extend_from_slice(rest);
                break;
            };
            let end = i + p;
            if self.line.is_empty() {
                self.process_line(&input[i..end], f)?;
            } else {
                if self.line.len() + p > MAX_SSE_LINE {
                    return err("event-stream line too long");
                }
                self.line.extend_from_slice(&input[i..end]);
                let line = std::mem::take(&mut self.line);
                let result = self.process_line(&line, f);
                self.line = line;
                self.line.clear();
                result?;
            }
            i = end + 1;
            if input[end] == b'\r' {
                if i < input.len() {
                    if input[i] == b'\n' {
                        i += 1;
                    }
                } else {
                    self.after_cr = true;
                }
            }
        }
        Ok(())
    }

    fn process_line(
        &mut self,
        line: &[u8],
        f: &mut impl FnMut(SseItem<'_>),
    ) -> Result<(), WireError> {
        if line.is_empty() {
            self.dispatch(f);
            return Ok(());
        }
        if line[0] == b':' {
            f(SseItem::Comment(&line[1..]));
            return Ok(());
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match name {
            b"data" => {
                if self.data.len() + value.len() + 1 > MAX_SSE_LINE {
                    return err("event data too large");
                }
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"id" if !value.contains(&0) => {
                self.id.clear();
                self.id.extend_from_slice(value);
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                let ms = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(u64::MAX);
                f(SseItem::Retry(ms));
            }
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, f: &mut impl FnMut(SseItem<'_>)) {
        // The last event ID is taken at every blank line, even when no
        // event is dispatched; `self.id` already holds it.
        if self.data.is_empty() {
            self.event.clear();
            return;
        }
        self.data.pop(); // the trailing LF
        let event: &[u8] = if self.event.is_empty() {
            b"message"
        } else {
            &self.event
        };
        f(SseItem::Event {
            event,
            data: &self.data,
            id: &self.id,
        });
        self.data.clear();
        self.event.clear();
    }
}

/// Where `needle` (not empty) first occurs in `hay`: a jump from one
/// candidate first byte to the next, not a comparison at every offset.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, _) = needle.split_first()?;
    let mut from = 0;
    while let Some(i) = hay.get(from..)?.iter().position(|&b| b == first) {
        let at = from + i;
        if hay[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Reads `{"seq":K,"sent_us":T}` (any key order, whitespace, extra keys)
/// without a JSON library: this runs once per delivery, hundreds of
/// thousands of times a second, on the cores the server also needs.
pub(crate) fn parse_payload(data: &[u8]) -> Option<(u64, u64)> {
    Some((json_u64(data, b"\"seq\"")?, json_u64(data, b"\"sent_us\"")?))
}

fn json_u64(data: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(data, key)?;
    let mut rest = data[at + key.len()..].iter().copied().peekable();
    while rest.peek().is_some_and(|b| b.is_ascii_whitespace()) {
        rest.next();
    }
    if rest.next()? != b':' {
        return None;
    }
    while rest.peek().is_some_and(|b| b.is_ascii_whitespace()) {
        rest.next();
    }
    let mut n: u64 = 0;
    let mut digits = 0;
    while let Some(b) = rest.peek().copied().filter(u8::is_ascii_digit) {
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
        rest.next();
    }
    (digits > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq, Clone)]
    enum Owned {
        Event(String, String, String),
        Comment(String),
        Retry(u64),
    }

    fn s(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    /// Feeds `input` split at every possible point into `pieces`-sized
    /// reads and checks each split gives the same items.
    fn sse_all_splits(input: &[u8]) -> Vec<Owned> {
        let whole = sse_pieces(&[input]);
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(sse_pieces(&[a, b]), whole, "split at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(sse_pieces(&bytes), whole, "byte at a time");
        whole
    }

    fn sse_pieces(pieces: &[&[u8]]) -> Vec<Owned> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for piece in pieces {
            p.feed(piece, &mut |item| {
                out.push(match item {
                    SseItem::Event { event, data, id } => Owned::Event(s(event), s(data), s(id)),
                    SseItem::Comment(c) => Owned::Comment(s(c)),
                    SseItem::Retry(ms) => Owned::Retry(ms),
                })
            })
            .expect("valid stream");
        }
        out
    }

    fn ev(e: &str, d: &str, id: &str) -> Owned {
        Owned::Event(e.into(), d.into(), id.into())
    }

    #[test]
    fn sse_basic_event_with_defaults() {
        assert_eq!(
            sse_all_splits(b"data: hi\n\n"),
            vec![ev("message", "hi", "")]
        );
    }

    #[test]
    fn sse_herald_frames() {
        let stream = b"retry: 2000\n\nid: v1.abc\nevent: herald.ready\ndata: {\"node\":\"n\"}\n\n:\n\nid: v1.abd\nevent: message\ndata: {\"seq\":7,\"sent_us\":99}\n\n";
        assert_eq!(
            sse_all_splits(stream),
            vec![
                Owned::Retry(2000),
                ev("herald.ready", "{\"node\":\"n\"}", "v1.abc"),
                Owned::Comment(String::new()),
                ev("message", "{\"seq\":7,\"sent_us\":99}", "v1.abd"),
            ]
        );
    }

    #[test]
    fn sse_multiline_data_and_mixed_line_ends() {
        // LF, CRLF and bare CR all end lines; data lines join with LF.
        let stream = b"data: one\r\ndata:two\rdata:  three\n\r\n";
        assert_eq!(
            sse_all_splits(stream),
            vec![ev("message", "one\ntwo\n three", "")]
        );
    }

    #[test]
    fn sse_crlf_split_across_reads_is_one_line_end() {
        // A CR at the end of one read and LF at the start of the next must
        // not produce an extra blank line (which would dispatch early).
        let items = sse_pieces(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(items, vec![ev("message", "a\nb", "")]);
    }

    #[test]
    fn sse_empty_data_and_no_data_events() {
        // `data` with no value makes an event with empty data; an event
        // with no data field at all dispatches nothing.
        let stream = b"data\n\nevent: x\n\ndata:\ndata:\n\n";
        assert_eq!(
            sse_all_splits(stream),
            vec![ev("message", "", ""), ev("message", "\n", "")]
        );
    }

    #[test]
    fn sse_id_rules() {
        // The id persists across events, an id with NUL is ignored, an
        // empty id resets it, and an id seen on a data-less event still
        // becomes the last event id.
        let stream = b"id: 1\ndata: a\n\ndata: b\n\nid: 2\0x\ndata: c\n\nid: 3\n\nid\ndata: d\n\n";
        assert_eq!(
            sse_all_splits(stream),
            vec![
                ev("message", "a", "1"),
                ev("message", "b", "1"),
                ev("message", "c", "1"),
                ev("message", "d", ""),
            ]
        );
        let mut p = SseParser::new();
        p.feed(b"id: 3\n\n", &mut |_| {}).expect("valid");
        assert_eq!(p.last_event_id(), b"3");
    }

    #[test]
    fn sse_fields_comments_and_unknowns() {
        let stream = b": hello\n:\nfoo: bar\ndata:x\nretry: 12a\nretry: 350\nevent:  spaced\nEVENT: nope\n\n";
        assert_eq!(
            sse_all_splits(stream),
            vec![
                Owned::Comment(" hello".into()),
                Owned::Comment(String::new()),
                Owned::Retry(350),
                ev(" spaced", "x", ""),
            ]
        );
    }

    #[test]
    fn sse_leading_bom_is_skipped_once() {
        let mut stream = BOM.to_vec();
        stream.extend_from_slice(b"data: a\n\n");
        stream.extend_from_slice(&BOM);
        stream.extend_from_slice(b"data: b\n\n");
        let items = sse_all_splits(&stream);
        // The second BOM is part of a field name, so that line is ignored.
        assert_eq!(items, vec![ev("message", "a", "")]);
        // A partial BOM-like prefix is content.
        assert_eq!(
            sse_all_splits(b"\xEFdata\n\ndata: z\n\n"),
            vec![ev("message", "z", "")]
        );
    }

    #[test]
    fn sse_incomplete_event_is_not_dispatched() {
        assert_eq!(sse_pieces(&[b"data: a\n", b"data: b"]), vec![]);
    }

    #[test]
    fn sse_reconnect_keeps_last_id() {
        let mut p = SseParser::new();
        p.feed(b"id: 5\ndata: a\n\ndata: half", &mut |_| {})
            .expect("valid");
        p.reset_keep_id();
        let mut got = Vec::new();
        p.feed(b"data: b\n\n", &mut |i| {
            if let SseItem::Event { data, id, .. } = i {
                got.push((s(data), s(id)));
            }
        })
        .expect("valid");
        assert_eq!(got, vec![("b".to_string(), "5".to_string())]);
    }

    #[test]
    fn sse_line_limit() {
        let mut p = SseParser::new();
        let big = vec![b'a'; MAX_SSE_LINE + 1];
        assert!(p.feed(&big, &mut |_| {}).is_err());
    }

    fn dechunk_pieces(pieces: &[&[u8]]) -> Result<(Vec<u8>, bool, Vec<u8>), WireError> {
        let mut d = BodyDecoder::new(Framing::Chunked);
        let mut out = Vec::new();
        let mut leftover = Vec::new();
        for piece in pieces {
            let used = d.decode(piece, &mut |b| out.extend_from_slice(b))?;
            leftover.extend_from_slice(&piece[used..]);
        }
        Ok((out, d.is_done(), leftover))
    }

    #[test]
    fn chunked_every_split() {
        let body = b"5\r\nhello\r\n1;ext=1\r\n,\r\nA \r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for cut in 0..=body.len() {
            let (a, b) = body.split_at(cut);
            let (out, done, leftover) = dechunk_pieces(&[a, b]).expect("valid");
            assert_eq!(out, b"hello,0123456789", "split at {cut}");
            assert!(done);
            assert_eq!(leftover, b"NEXT");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let (out, done, leftover) = dechunk_pieces(&bytes).expect("valid");
        assert_eq!(out, b"hello,0123456789");
        assert!(done);
        assert_eq!(leftover, b"NEXT");
    }

    #[test]
    fn chunked_bare_lf_and_uppercase_hex() {
        let (out, done, _) = dechunk_pieces(&[b"B\nhello world\n0\n\n"]).expect("valid");
        assert_eq!(out, b"hello world");
        assert!(done);
    }

    #[test]
    fn chunked_streaming_stays_open() {
        // An SSE stream is one endless chunked body.
        let (out, done, _) = dechunk_pieces(&[b"3\r\nabc\r\n", b"2\r\nde"]).expect("valid");
        assert_eq!(out, b"abcde");
        assert!(!done);
    }

    #[test]
    fn chunked_errors() {
        assert!(dechunk_pieces(&[b"x\r\n"]).is_err());
        assert!(dechunk_pieces(&[b"\r\n"]).is_err());
        assert!(dechunk_pieces(&[b"3\r\nabcd\r\n"]).is_err());
        assert!(dechunk_pieces(&[b"3\rx"]).is_err());
        assert!(dechunk_pieces(&[b"ffffffffffffffff\r\n"]).is_err());
    }

    #[test]
    fn length_and_close_bodies() {
        let mut d = BodyDecoder::new(Framing::Length(3));
        let mut out = Vec::new();
        let used = d
            .decode(b"abcHTTP", &mut |b| out.extend_from_slice(b))
            .expect("valid");
        assert_eq!((out.as_slice(), used, d.is_done()), (&b"abc"[..], 3, true));
        let mut d = BodyDecoder::new(Framing::Close);
        let mut out = Vec::new();
        d.decode(b"abc", &mut |b| out.extend_from_slice(b))
            .expect("valid");
        assert_eq!(out, b"abc");
        assert!(!d.is_done());
    }

    #[test]
    fn head_sse_response() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n";
        for cut in 0..raw.len() - 5 {
            assert_eq!(parse_head(&raw[..cut]).expect("valid"), None, "{cut}");
        }
        let (head, used) = parse_head(raw).expect("valid").expect("complete");
        assert_eq!(head.status, 200);
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.keep_alive);
        assert_eq!(head.header("content-type"), Some("text/event-stream"));
        assert_eq!(&raw[used..], b"7\r\n");
    }

    #[test]
    fn head_variants() {
        let (h, used) = parse_head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 401 Unauthorized\nContent-Length: 5\nConnection: close\n\nerror")
            .expect("valid")
            .expect("complete");
        assert_eq!(h.status, 401);
        assert_eq!(h.framing, Framing::Length(5));
        assert!(!h.keep_alive);
        assert_eq!(used, 88);
        let (h, _) = parse_head(b"HTTP/1.0 200 OK\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(h.framing, Framing::Close);
        assert!(!h.keep_alive);
        let (h, _) = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(h.framing, Framing::Length(0));
        assert!(parse_head(b"HTTP/2 200\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 20 OK\r\n\r\n").is_err());
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .is_err()
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nBad header\r\n\r\n").is_err());
        assert!(parse_head(&vec![b'a'; MAX_HEAD + 2]).is_err());
    }

    #[test]
    fn payload_fields() {
        assert_eq!(
            parse_payload(br#"{"seq":12,"sent_us":1700000000000000}"#),
            Some((12, 1_700_000_000_000_000))
        );
        assert_eq!(
            parse_payload(br#"{ "sent_us" : 5 , "x":1, "seq" : 0 }"#),
            Some((0, 5))
        );
        assert_eq!(parse_payload(br#"{"seq":"1","sent_us":5}"#), None);
        assert_eq!(parse_payload(b"hello"), None);
        assert_eq!(
            parse_payload(br#"{"seq":99999999999999999999999,"sent_us":1}"#),
            None
        );
    }
}
