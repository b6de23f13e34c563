//! The request side of the HTTP/1.1 edge, as pure functions over bytes: the
//! head (with `httparse`) and the body framing (`Content-Length` or chunked).
//!
//! Nothing here does I/O, so the fuzz targets drive exactly the code the
//! network reaches. The rules are RFC 9112's, read strictly, as hyper and
//! nginx read them: where a proxy in front could frame a request differently
//! from us (two lengths, a length next to `Transfer-Encoding`, a coding other
//! than a final `chunked`, a length that is not plain digits), the request
//! is refused, never guessed at. Every refusal closes the connection.

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use bytes::{Buf, BytesMut};

/// Largest request head; larger ones are answered 431.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most request headers; more are answered 431.
pub(crate) const MAX_HEADERS: usize = 64;
/// Largest chunk-size line or trailer section of a chunked body.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Why a request was refused before it reached the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The status answered.
    pub status: StatusCode,
    /// The `error` text of the JSON body.
    pub message: &'static str,
    /// Whether to answer at all: a client speaking another protocol gets
    /// the connection closed, as hyper does.
    pub answer: bool,
}

impl Refusal {
    /// A refusal answered with `status` and `message`.
    pub const fn new(status: StatusCode, message: &'static str) -> Self {
        Refusal {
            status,
            message,
            answer: true,
        }
    }

    fn bad(message: &'static str) -> Self {
        Refusal::new(StatusCode::BAD_REQUEST, message)
    }
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// `Content-Length` bytes (0 when absent).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    /// The method.
    pub method: Method,
    /// The request target.
    pub uri: Uri,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The headers, as sent.
    pub headers: HeaderMap,
    /// Bytes of the head, up to and including the blank line.
    pub len: usize,
    /// How the body is framed.
    pub body: BodyFraming,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead.
    pub expect_continue: bool,
}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is
/// incomplete (and still within [`MAX_HEAD`]).
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, Refusal> {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut parsed);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(head_too_large()),
        Err(httparse::Error::TooManyHeaders) => return Err(head_too_large()),
        // HTTP/2 with prior knowledge: not ours to answer in HTTP/1. The
        // version is refused as soon as its `2` arrives, so a preface cut
        // short is one too (found by the `request` fuzz target).
        Err(httparse::Error::Version) if is_h2_preface(buf) => {
            return Err(Refusal {
                answer: false,
                ..Refusal::bad("HTTP/2 is not served")
            })
        }
        Err(_) => return Err(Refusal::bad("malformed request head")),
    };
    if len > MAX_HEAD {
        return Err(head_too_large());
    }
    let version = match request.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let method = Method::from_bytes(request.method.unwrap_or("").as_bytes())
        .map_err(|_| Refusal::bad("invalid method"))?;
    if method == Method::CONNECT {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served",
        ));
    }
    let uri: Uri = request
        .path
        .unwrap_or("")
        .parse()
        .map_err(|_| Refusal::bad("invalid request target"))?;

    let mut headers = HeaderMap::with_capacity(request.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = version == Version::HTTP_10;
    let mut expect_continue = false;
    for h in request.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Refusal::bad("invalid header"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| Refusal::bad("invalid header"))?;
        if name == axum::http::header::CONTENT_LENGTH {
            let n = content_length(h.value)?;
            if length.is_some_and(|previous| previous != n) {
                return Err(Refusal::bad("conflicting Content-Length"));
            }
            length = Some(n);
        } else if name == axum::http::header::TRANSFER_ENCODING {
            if version == Version::HTTP_10 {
                return Err(Refusal::bad("Transfer-Encoding in an HTTP/1.0 request"));
            }
            // A coding after `chunked`, or a second `chunked`, leaves the
            // body unframed: refused, as RFC 9112 §6.3 requires.
            if chunked {
                return Err(Refusal::bad("unsupported Transfer-Encoding"));
            }
            chunked = final_coding_is_chunked(h.value)?;
        } else if name == axum::http::header::CONNECTION {
            for token in tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    close = false;
                }
            }
        } else if name == axum::http::header::EXPECT {
            expect_continue |= value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        }
        headers.append(name, value);
    }
    if chunked && length.is_some() {
        return Err(Refusal::bad(
            "both Content-Length and Transfer-Encoding in one request",
        ));
    }
    let body = if chunked {
        BodyFraming::Chunked
    } else {
        BodyFraming::Length(length.unwrap_or(0))
    };
    Ok(Some(Head {
        method,
        uri,
        version,
        headers,
        len,
        body,
        keep_alive: !close,
        // An HTTP/1.0 client does not wait for a 100.
        expect_continue: expect_continue && version == Version::HTTP_11,
    }))
}

/// Whether `buf` starts like HTTP/2's connection preface. Decided on what
/// httparse has seen when it refuses the version (up to the `2`), so the
/// answer is the same however the bytes arrive.
fn is_h2_preface(buf: &[u8]) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2";
    let n = buf.len().min(PREFACE.len());
    buf[..n] == PREFACE[..n]
}

fn head_too_large() -> Refusal {
    Refusal::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "request head too large",
    )
}

/// `Content-Length = 1*DIGIT`, with only SP/HTAB around it (httparse has
/// already dropped those; the check repeats it so the rule is whole here).
/// Anything else, Unicode spaces included, is refused.
fn content_length(value: &[u8]) -> Result<u64, Refusal> {
    let digits = value.trim_ascii();
    let invalid = || Refusal::bad("invalid Content-Length");
    if digits.is_empty()
        || digits.len() > 19
        || !digits.iter().all(u8::is_ascii_digit)
        || value
            .iter()
            .any(|b| !b.is_ascii_digit() && *b != b' ' && *b != b'\t')
    {
        return Err(invalid());
    }
    digits
        .iter()
        .try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or_else(invalid)
}

/// Whether a `Transfer-Encoding` value ends in `chunked`; any other final
/// coding is refused (we could not find the end of the body).
fn final_coding_is_chunked(value: &[u8]) -> Result<bool, Refusal> {
    let mut last = None;
    for token in tokens(value) {
        if last.is_some_and(|t: &[u8]| t.eq_ignore_ascii_case(b"chunked")) {
            return Err(Refusal::bad("unsupported Transfer-Encoding"));
        }
        last = Some(token);
    }
    match last {
        Some(t) if t.eq_ignore_ascii_case(b"chunked") => Ok(true),
        _ => Err(Refusal::bad("unsupported Transfer-Encoding")),
    }
}

/// The comma-separated tokens of a header value, trimmed of SP/HTAB.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Decodes a chunked body as its bytes arrive, into a bounded buffer.
#[derive(Debug, Default)]
pub struct Chunked {
    /// Bytes left in the current chunk's data, plus its CRLF.
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data: this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    /// The body is complete.
    Done,
}

impl Chunked {
    /// Moves decoded body bytes from `input` to `out`, consuming what it
    /// decoded. Returns `Ok(true)` once the body is complete; `Ok(false)`
    /// when it needs more input. Refuses a body over `limit` (413) and
    /// malformed framing (400).
    pub fn decode(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        limit: usize,
    ) -> Result<bool, Refusal> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(line) = take_line(input)? else {
                        return Ok(false);
                    };
                    match httparse::parse_chunk_size(&line) {
                        Ok(httparse::Status::Complete((_, 0))) => self.state = ChunkState::Trailers,
                        Ok(httparse::Status::Complete((_, size))) => {
                            if (out.len() as u64).saturating_add(size) > limit as u64 {
                                return Err(body_too_large());
                            }
                            self.state = ChunkState::Data(size);
                        }
                        _ => return Err(Refusal::bad("malformed chunk size")),
                    }
                }
                ChunkState::Data(left) => {
                    if input.is_empty() {
                        return Ok(false);
                    }
                    let n = (left.min(input.len() as u64)) as usize;
                    out.extend_from_slice(&input[..n]);
                    input.advance(n);
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd => {
                    if input.len() < 2 {
                        return Ok(false);
                    }
                    if &input[..2] != b"\r\n" {
                        return Err(Refusal::bad("malformed chunk"));
                    }
                    input.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(line) = take_line(input)? else {
                        return Ok(false);
                    };
                    // Trailer fields are read and ignored.
                    if line.len() == 2 {
                        self.state = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(true),
            }
        }
    }
}

/// Takes one CRLF-terminated line (CRLF included) off the front of `input`,
/// or `None` if it has not fully arrived.
fn take_line(input: &mut BytesMut) -> Result<Option<BytesMut>, Refusal> {
    match input.windows(2).position(|w| w == b"\r\n") {
        Some(end) if end + 2 <= MAX_CHUNK_LINE => Ok(Some(input.split_to(end + 2))),
        Some(_) => Err(Refusal::bad("chunk line too long")),
        None if input.len() >= MAX_CHUNK_LINE => Err(Refusal::bad("chunk line too long")),
        None => Ok(None),
    }
}

/// The 413 for a body over the edge's limit.
pub fn body_too_large() -> Refusal {
    Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, Refusal> {
        parse_head(text.as_bytes())
    }

    fn status(text: &str) -> StatusCode {
        match head(text) {
            Err(refusal) => refusal.status,
            Ok(Some(_)) => StatusCode::OK,
            Ok(None) => StatusCode::CONTINUE,
        }
    }

    #[test]
    fn a_plain_publish_head() {
        let text = "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n{}";
        let parsed = head(text).expect("valid").expect("complete");
        assert_eq!(parsed.method, Method::POST);
        assert_eq!(parsed.uri.path(), "/publish");
        assert_eq!(parsed.body, BodyFraming::Length(12));
        assert_eq!(parsed.len, text.len() - 2);
        assert!(parsed.keep_alive);
    }

    #[test]
    fn content_length_is_digits_only() {
        for bad in [
            "12\u{a0}",
            "\u{2003}12",
            "+12",
            "1 2",
            "0x10",
            "",
            "99999999999999999999",
        ] {
            let text = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(status(&text), StatusCode::BAD_REQUEST, "{bad:?}");
        }
        let text = "POST / HTTP/1.1\r\nContent-Length: \t7 \r\n\r\n";
        assert_eq!(head(text).unwrap().unwrap().body, BodyFraming::Length(7));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let cases = [
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            "POST / HTTP/1.1\r\nX : a\r\n\r\n",
            "POST / HTTP/1.1\r\nX: a\0b\r\n\r\n",
        ];
        for text in cases {
            assert_eq!(status(text), StatusCode::BAD_REQUEST, "{text:?}");
        }
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            StatusCode::BAD_REQUEST
        );
        let preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        for cut in 12..=preface.len() {
            // Cut anywhere once the `2` is in: the same silent close.
            if let Err(refusal) = head(&preface[..cut]) {
                assert!(
                    !refusal.answer,
                    "{:?}: closed without an answer",
                    &preface[..cut]
                );
            }
        }
        assert!(!head(preface).unwrap_err().answer);
        let same = "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(head(same).unwrap().unwrap().body, BodyFraming::Length(3));
    }

    #[test]
    fn heads_over_the_limits_are_431() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(&big), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let partial = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(
            status(&partial),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(status(&text), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }

    #[test]
    fn connection_semantics() {
        let h = |t: &str| head(t).unwrap().unwrap();
        assert!(!h("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(h("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(!h("GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n").keep_alive);
        assert!(h("POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").expect_continue);
        assert!(!h("POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expect_continue);
    }

    #[test]
    fn chunked_bodies_decode_in_pieces_and_within_the_limit() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for split in 0..wire.len() {
            let mut decoder = Chunked::default();
            let mut input = BytesMut::from(&wire[..split]);
            let mut out = BytesMut::new();
            let mut done = decoder.decode(&mut input, &mut out, 1024).expect("valid");
            input.extend_from_slice(&wire[split..]);
            if !done {
                done = decoder.decode(&mut input, &mut out, 1024).expect("valid");
            }
            assert!(done, "split at {split}");
            assert_eq!(&out[..], b"hello, world");
            assert_eq!(&input[..], b"NEXT", "pipelined bytes stay");
        }
        let mut input = BytesMut::from(&b"400\r\n"[..]);
        let refusal = Chunked::default()
            .decode(&mut input, &mut BytesMut::new(), 100)
            .unwrap_err();
        assert_eq!(refusal.status, StatusCode::PAYLOAD_TOO_LARGE);
        let mut input = BytesMut::from(&b"zz\r\n"[..]);
        assert!(Chunked::default()
            .decode(&mut input, &mut BytesMut::new(), 100)
            .is_err());
    }
}
