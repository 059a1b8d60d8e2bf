//! Incremental Server-Sent-Events parsing over arbitrary byte chunks, plus the response-body
//! helpers the backends share (bounded reads, error-body extraction, stream sniffing).
//!
//! Invariants: chunks may split lines, `\r\n` pairs and UTF-8 characters anywhere, because bytes
//! are only decoded once a whole line is buffered; memory is bounded by `max_event_bytes` (a line
//! or an event's accumulated data larger than that is an error, never an unbounded buffer).
//! Follows the WHATWG "event stream interpretation" rules, with two deliberate deviations: a final
//! event without the terminating blank line is still dispatched at end of stream, because real
//! LLM gateways close the connection right after their last `data:` line; and a bare line
//! starting with `{` is read as data (a gateway's JSON error sent as the event stream), as is
//! every line of a stream whose first line starts so (the same error, pretty-printed).

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use super::backend::LlmError;

/// The default bound on one line or one event: far above any real LLM chunk, small enough that a
/// broken or hostile server cannot exhaust memory.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// The longest event name kept. Names are a few words (`error`, `response.output_text.delta`);
/// a longer one is no event either backend knows, and is read as no name at all, so that a
/// server's megabyte of name is not copied into each of an event's split-out parts.
const MAX_EVENT_NAME_BYTES: usize = 128;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, when the server named the event (OpenAI does not; Responses-style
    /// servers do, but callers should still dispatch on the JSON payload).
    pub event: Option<String>,
    /// All `data:` lines of the event joined with `\n` (without a trailing newline).
    pub data: String,
}

/// Why an event stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SseError {
    /// A line or an event grew past the configured bound.
    #[error("SSE line or event larger than {limit} bytes")]
    TooLarge {
        /// The bound that was exceeded.
        limit: usize,
    },
    /// The underlying body stream failed (already stripped of URLs).
    #[error("SSE body broke: {0}")]
    Transport(String),
    /// Nothing at all (not even a keep-alive comment) arrived for this long.
    #[error("nothing received for {}s", .0.as_secs())]
    Quiet(Duration),
}

/// A push parser: feed it chunks as they arrive, collect complete events.
///
/// It never panics on any input; malformed lines are ignored as the SSE spec demands (but for a
/// bare JSON line, read as data: see the module docs).
pub struct SseParser {
    /// Bytes of the current, not yet terminated line. Kept as bytes so a chunk boundary inside a
    /// multi-byte character is harmless.
    line: Vec<u8>,
    /// The previous chunk ended in `\r`; a `\n` at the start of the next one belongs to it.
    pending_cr: bool,
    /// Whether the very first line is still to come (its UTF-8 BOM, if any, must be dropped).
    at_stream_start: bool,
    /// The stream began with `{`: a JSON document sent as the event stream (a gateway's error),
    /// perhaps over several lines, each of them data.
    json_document: bool,
    /// The `event:` field of the event being assembled.
    event: Option<String>,
    /// The `data:` lines of the event being assembled, each followed by `\n`.
    data: String,
    /// Whether any `data:` field was seen; the spec drops events without one.
    has_data: bool,
    /// Upper bound for `line` and for `data`.
    max_event_bytes: usize,
    /// Completed events not yet taken by the caller.
    ready: VecDeque<SseEvent>,
}

impl fmt::Debug for SseParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // NOTE: event payloads are user conversation text; keep them out of debug output.
        f.debug_struct("SseParser")
            .field("buffered_line_bytes", &self.line.len())
            .field("buffered_data_bytes", &self.data.len())
            .field("ready_events", &self.ready.len())
            .field("max_event_bytes", &self.max_event_bytes)
            .finish()
    }
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseParser {
    /// A parser that rejects lines or events larger than `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            line: Vec::new(),
            pending_cr: false,
            at_stream_start: true,
            json_document: false,
            event: None,
            data: String::new(),
            has_data: false,
            max_event_bytes,
            ready: VecDeque::new(),
        }
    }

    /// Feeds one chunk of the body. Completed events become available through
    /// [`next_event`](Self::next_event).
    ///
    /// # Errors
    ///
    /// [`SseError::TooLarge`] when a line or an event outgrows the bound; the partial line or
    /// event is discarded, and the caller should stop reading.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<(), SseError> {
        if chunk.is_empty() {
            // Between a `\r` and its `\n`, an empty chunk must not end the pending line pair.
            return Ok(());
        }
        if self.pending_cr {
            self.pending_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.extend_line(&chunk[..pos])?;
            self.end_line()?;
            let terminator = chunk[pos];
            chunk = &chunk[pos + 1..];
            if terminator == b'\r' {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.pending_cr = true,
                }
            }
        }
        self.extend_line(chunk)
    }

    /// Signals end of stream: a partial last line is processed and a pending event is
    /// dispatched even without its blank line.
    ///
    /// # Errors
    ///
    /// [`SseError::TooLarge`] when the last line overflows the event's bound.
    pub fn finish(&mut self) -> Result<(), SseError> {
        self.pending_cr = false;
        if !self.line.is_empty() {
            self.end_line()?;
        }
        self.dispatch();
        Ok(())
    }

    /// Takes the oldest completed event.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }

    /// Feeds a chunk and returns the events it completed; convenient for tests and simple loops.
    pub fn push_collect(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        self.push(chunk)?;
        Ok(self.ready.drain(..).collect())
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.line.len().saturating_add(bytes.len()) > self.max_event_bytes {
            self.line.clear();
            return Err(SseError::TooLarge { limit: self.max_event_bytes });
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn end_line(&mut self) -> Result<(), SseError> {
        let raw = std::mem::take(&mut self.line);
        // NOTE: the spec decodes with replacement characters, so invalid UTF-8 is not an error.
        let decoded = String::from_utf8_lossy(&raw);
        let mut line: &str = &decoded;
        if self.at_stream_start {
            self.at_stream_start = false;
            line = line.strip_prefix('\u{FEFF}').unwrap_or(line);
            self.json_document = line.starts_with('{');
        }
        if line.is_empty() {
            self.dispatch();
            return Ok(());
        }
        if line.starts_with(':') && !self.json_document {
            // A comment, typically a keep-alive.
            return Ok(());
        }
        // No field name starts with `{`: a bare JSON line is a server (or gateway) that answered
        // `text/event-stream` with a JSON document, an error as a rule ("quota exceeded"). Read
        // as the data it is, it reaches the caller instead of vanishing into "empty answer";
        // so does every line of a document that began the stream (pretty-printed).
        let (field, value) = match line.split_once(':') {
            _ if self.json_document || line.starts_with('{') => ("data", line),
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" if value.len() <= MAX_EVENT_NAME_BYTES => self.event = Some(value.to_owned()),
            "event" => self.event = None,
            "data" => {
                if self.data.len().saturating_add(value.len()).saturating_add(1) > self.max_event_bytes {
                    self.reset_event();
                    return Err(SseError::TooLarge { limit: self.max_event_bytes });
                }
                self.data.push_str(value);
                self.data.push('\n');
                self.has_data = true;
            }
            // `id` and `retry` only matter to reconnecting browsers; unknown fields are ignored.
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self) {
        if self.has_data {
            let mut data = std::mem::take(&mut self.data);
            if data.ends_with('\n') {
                data.pop();
            }
            let event = self.event.take().filter(|name| !name.is_empty());
            self.ready.push_back(SseEvent { event, data });
        }
        self.reset_event();
    }

    fn reset_event(&mut self) {
        self.event = None;
        self.data.clear();
        self.has_data = false;
    }
}

/// Reads the events of a streaming HTTP response one at a time.
///
/// Pull-based (`next_event().await`) rather than a `Stream`, so callers can wrap each read in a
/// deadline without pinning gymnastics.
#[derive(Debug)]
pub struct SseStream {
    response: reqwest::Response,
    parser: SseParser,
    /// The body has ended (or failed); only buffered events remain.
    finished: bool,
    /// `data: [DONE]` was seen: the server ended the answer (not merely the connection).
    done: bool,
    /// An event of several JSON lines (see [`next_json_event`]) whose lines are being returned
    /// one at a time: each is parsed when its turn comes, so that an event of a million `{}`
    /// lines holds its data once, not a million parsed values.
    split_out: Option<SplitEvent>,
}

/// See [`SseStream::split_out`].
#[derive(Debug)]
struct SplitEvent {
    event: Option<String>,
    data: String,
    /// Where the next line starts in `data`.
    at: usize,
}

impl SplitEvent {
    /// The next line's event (`None` for `[DONE]`), or `None` once every line was returned.
    fn next_line(&mut self) -> Option<Option<(Option<String>, serde_json::Value)>> {
        loop {
            let rest = self.data.get(self.at..).filter(|rest| !rest.is_empty())?;
            let (line, taken) = match rest.find('\n') {
                Some(end) => (&rest[..end], end + 1),
                None => (rest, rest.len()),
            };
            self.at += taken;
            match line.trim() {
                "" => {}
                "[DONE]" => return Some(None),
                // Every line was checked to be JSON when the event was split.
                json => {
                    if let Ok(json) = serde_json::from_str(json) {
                        return Some(Some((self.event.clone(), json)));
                    }
                }
            }
        }
    }
}

/// Whether each non-blank line of `data` is a JSON value or `[DONE]`, the first JSON, and there
/// is more than one: an event to split (see [`next_json_event`]). Each value is parsed as it
/// will be when its turn comes (a lone surrogate escape or a number out of range passes a
/// lighter check, and would then end the split early), and dropped at once.
fn splits_into_json_lines(data: &str) -> bool {
    let mut lines = data.lines().map(str::trim).filter(|line| !line.is_empty());
    let is_json = |line: &str| serde_json::from_str::<serde_json::Value>(line).is_ok();
    let Some(first) = lines.next() else { return false };
    let mut more = false;
    for line in lines {
        if line != "[DONE]" && !is_json(line) {
            return false;
        }
        more = true;
    }
    more && is_json(first)
}

impl SseStream {
    /// Wraps a response whose body is an event stream.
    pub fn new(response: reqwest::Response, max_event_bytes: usize) -> Self {
        Self { response, parser: SseParser::new(max_event_bytes), finished: false, done: false, split_out: None }
    }

    /// Whether the server sent `data: [DONE]`, ending the answer on purpose.
    pub fn saw_done(&self) -> bool {
        self.done
    }

    /// Like [`new`](Self::new), for a body whose first bytes were already read (for example to
    /// sniff whether the server streamed at all).
    pub fn with_prefix(response: reqwest::Response, prefix: &[u8], max_event_bytes: usize) -> Result<Self, SseError> {
        let mut stream = Self::new(response, max_event_bytes);
        stream.parser.push(prefix)?;
        Ok(stream)
    }

    /// The next event, or `None` at end of stream.
    ///
    /// # Errors
    ///
    /// [`SseError::Transport`] when the body breaks, [`SseError::TooLarge`] on an oversized event.
    ///
    /// Cancel-safe at await points: a dropped call loses no parsed event.
    pub async fn next_event(&mut self) -> Result<Option<SseEvent>, SseError> {
        self.next_event_within(None).await
    }

    /// [`Self::next_event`], failing with [`SseError::Quiet`] when `quiet` passes with no byte
    /// received (comments count: a server that sends them is alive, an agent's tool at work).
    pub async fn next_event_within(&mut self, quiet: Option<Duration>) -> Result<Option<SseEvent>, SseError> {
        loop {
            if let Some(event) = self.parser.next_event() {
                return Ok(Some(event));
            }
            if self.finished {
                return Ok(None);
            }
            let read = match quiet {
                Some(limit) => {
                    tokio::time::timeout(limit, self.response.chunk()).await.map_err(|_| SseError::Quiet(limit))?
                }
                None => self.response.chunk().await,
            };
            match read {
                Ok(Some(chunk)) => self.parser.push(&chunk)?,
                Ok(None) => {
                    self.finished = true;
                    self.parser.finish()?;
                }
                Err(error) => {
                    self.finished = true;
                    return Err(SseError::Transport(describe_reqwest_error(error)));
                }
            }
        }
    }
}

/// Renders a reqwest error with its cause chain but without the request URL, so neither
/// credentials in a URL nor query strings reach logs or users.
pub fn describe_reqwest_error(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    // Bounded: cause chains are short, but never trust that.
    let mut depth = 0;
    while let Some(cause) = source {
        if depth >= 8 {
            break;
        }
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
        depth += 1;
    }
    text
}

/// How much of an error body is read: enough for any JSON error, bounded against huge HTML pages.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// How many characters of a server's error message are kept in [`LlmError`]s and logs.
pub(crate) const MAX_ERROR_MESSAGE_CHARS: usize = 500;

/// How many first-token timeouts a started answer may go without receiving a byte (keep-alive
/// comments count) before it counts as stalled ([`LlmError::Lost`]).
const STALL_FACTOR: u32 = 2;

/// The next event whose data is JSON, for both backends' stream loops: waits at most until
/// `first_token_deadline` while the model has not started (`started == false`: no text, visible
/// or reasoning, yet; after that at most [`STALL_FACTOR`] first-token timeouts without a byte,
/// and the caller's total timeout), stops at
/// `[DONE]` or the end of the stream (`None`), skips blank and unparsable events, and turns a
/// non-JSON `error` event into [`LlmError::Stream`]. An event whose `data:` lines are each a
/// JSON value (but not together), possibly ending with `[DONE]` (which then ends the stream),
/// is taken as that many events.
pub(crate) async fn next_json_event(
    events: &mut SseStream,
    started: bool,
    first_token_deadline: Instant,
    first_token_timeout: Duration,
    backend: &'static str,
) -> Result<Option<(Option<String>, serde_json::Value)>, LlmError> {
    if let Some(split) = events.split_out.as_mut() {
        match split.next_line() {
            Some(line) => {
                events.done |= line.is_none();
                if line.is_none() {
                    events.split_out = None;
                }
                return Ok(line);
            }
            None => events.split_out = None,
        }
    }
    loop {
        let next = if started {
            // A server wedged after its first words would otherwise hold its slot until the total
            // timeout, which the breaker does not count against a started answer: every user
            // would wait it out.
            let stall = first_token_timeout.saturating_mul(STALL_FACTOR);
            events.next_event_within(Some(stall)).await.map_err(|error| match error {
                SseError::Quiet(after) => {
                    LlmError::Lost(format!("the answer stopped: nothing received for {}s", after.as_secs()))
                }
                other => stream_error(other),
            })
        } else {
            tokio::time::timeout_at(first_token_deadline, events.next_event())
                .await
                .map_err(|_elapsed| LlmError::FirstTokenTimeout(first_token_timeout))?
                .map_err(stream_error)
        };
        let Some(event) = next? else { return Ok(None) };
        let data = event.data.trim();
        if data == "[DONE]" {
            events.done = true;
            return Ok(None);
        }
        if data.is_empty() {
            continue;
        }
        match serde_json::from_str(data) {
            Ok(json) => return Ok(Some((event.event, json))),
            Err(_) if event.event.as_deref() == Some("error") => {
                return Err(LlmError::Stream(truncate_chars(data, MAX_ERROR_MESSAGE_CHARS)));
            }
            Err(error) => {
                // Several `data:` lines each a whole JSON object: events from a proxy that
                // separates them with one line break instead of two (the event format joins
                // them into one). Dropped, they would cut the answer short unnoticed.
                // The stream's `[DONE]` may come last among them.
                if splits_into_json_lines(data) {
                    let mut split = SplitEvent { event: event.event, data: event.data, at: 0 };
                    let first = split.next_line().flatten();
                    events.split_out = Some(split);
                    return Ok(first);
                }
                tracing::debug!(backend, %error, "Ignoring an unparsable stream event.");
            }
        }
    }
}

/// Waits for `sending` ([`send`] or [`send_once`]) until `deadline`: no response head by then is
/// a first-token timeout.
pub(crate) async fn send_before(
    sending: impl std::future::Future<Output = Result<reqwest::Response, LlmError>>,
    deadline: Instant,
    first_token_timeout: Duration,
) -> Result<reqwest::Response, LlmError> {
    match tokio::time::timeout_at(deadline, sending).await {
        Err(_elapsed) => Err(LlmError::FirstTokenTimeout(first_token_timeout)),
        Ok(result) => result,
    }
}

/// Sends a request with no deadline but the caller's: a transport failure is a (retryable)
/// connect error, a request refused before sending (a bad URL or header value) a protocol
/// error, since every retry would be refused the same way.
pub(crate) async fn send(request: reqwest::RequestBuilder) -> Result<reqwest::Response, LlmError> {
    request.send().await.map_err(|error| {
        if error.is_builder() {
            LlmError::Protocol(describe_reqwest_error(error))
        } else {
            LlmError::Connect(describe_reqwest_error(error))
        }
    })
}

/// How long a start-up probe (see [`LlmBackend::probe`](super::LlmBackend::probe)) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET url` with the backend's key: `Ok` for a 2xx answer, else what went wrong (the key
/// removed from the server's words).
pub(crate) async fn probe(http: &reqwest::Client, url: &str, api_key: Option<&str>) -> Result<(), LlmError> {
    let mut request = http.get(url).timeout(PROBE_TIMEOUT);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let mut response = send(request).await.map_err(|error| error.redacting(api_key))?;
    if !response.status().is_success() {
        return Err(status_error(response, PROBE_TIMEOUT, api_key).await);
    }
    // A web page where the API should be, told by its first byte (as in `open_body`).
    let (start, _) = read_body_limited(&mut response, PROBE_BODY_BYTES).await.unwrap_or_default();
    if start.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'<') {
        return Err(LlmError::Protocol(NOT_AN_API.to_owned()));
    }
    Ok(())
}

/// How much of a probe's answer is read to tell a web page from the API's JSON.
const PROBE_BODY_BYTES: usize = 1024;

/// What a server that answered with a web page is told.
const NOT_AN_API: &str =
    "the server answered with a web page, not the API: check `llm.base_url` (for `openai`, the API root ending in /v1)";

/// [`send`] for a request that must not reach the server twice: only a failure to connect
/// (nothing was sent) stays a retryable connect error; a failure after that is
/// [`LlmError::Lost`], never retried.
pub(crate) async fn send_once(request: reqwest::RequestBuilder) -> Result<reqwest::Response, LlmError> {
    request.send().await.map_err(|error| {
        if error.is_builder() {
            LlmError::Protocol(describe_reqwest_error(error))
        } else if error.is_connect() {
            LlmError::Connect(describe_reqwest_error(error))
        } else {
            LlmError::Lost(format!(
                "{} (it may have reached the server; not sent again)",
                describe_reqwest_error(error)
            ))
        }
    })
}

/// Reads the body up to `limit` bytes. Returns the bytes and whether more was left unread.
pub(crate) async fn read_body_limited(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(body.len());
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// The longest `Retry-After` believed; more is a broken server's (and would overflow a deadline).
const MAX_RETRY_AFTER_SECS: u64 = 3_600;

/// The pause a `Retry-After` value asks for, at `now` (the response's `Date`, else ours): whole
/// seconds (what servers in front of models send), or an HTTP date (a date past is no pause);
/// capped at an hour. `None` for anything else.
fn retry_after_delay(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value).ok()?.duration_since(now).unwrap_or_default(),
    };
    Some(delay.min(Duration::from_secs(MAX_RETRY_AFTER_SECS)))
}

/// Turns a non-2xx response into [`LlmError::Status`], with the server's own message when its
/// body is a JSON error (OpenAI `{"error":{"message"}}`, LobeHub `{"error":…}`/`{"message"}`),
/// else the start of the body text.
///
/// The body read is bounded in size and in time (`read_timeout`), so a server that stalls after an
/// error status cannot hold the attempt.
///
/// `api_key` is removed from the body before anything is kept: some gateways quote the key
/// they were sent in a 401's message, and the message is logged.
pub(crate) async fn status_error(
    mut response: reqwest::Response,
    read_timeout: Duration,
    api_key: Option<&str>,
) -> LlmError {
    let status = response.status();
    let retry_after =
        response.headers().get(reqwest::header::RETRY_AFTER).and_then(|value| value.to_str().ok()).and_then(|value| {
            // A date counts from the server's own clock where it gave it (ours may be off).
            let server_now = response
                .headers()
                .get(reqwest::header::DATE)
                .and_then(|date| httpdate::parse_http_date(date.to_str().ok()?).ok());
            retry_after_delay(value, server_now.unwrap_or_else(std::time::SystemTime::now))
        });
    let body = tokio::time::timeout(read_timeout, read_body_limited(&mut response, MAX_ERROR_BODY_BYTES)).await;
    let text = match body {
        Ok(Ok((bytes, _))) => redact(String::from_utf8_lossy(&bytes).into_owned(), api_key),
        _ => String::new(),
    };
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|json| error_message(&json))
        .unwrap_or_else(|| text.trim().to_owned());
    let message = if message.is_empty() {
        status.canonical_reason().unwrap_or("no message").to_owned()
    } else {
        truncate_chars(&message, MAX_ERROR_MESSAGE_CHARS)
    };
    LlmError::Status { status: status.as_u16(), message, retry_after }
}

/// `text` with every occurrence of `secret` replaced, and with the start of `secret` removed
/// where a message cut short (optionally marked `…`) ends inside it.
pub(crate) fn redact(text: String, secret: Option<&str>) -> String {
    let Some(secret) = secret.filter(|secret| !secret.is_empty()) else { return text };
    let text = if text.contains(secret) { text.replace(secret, "<redacted>") } else { text };
    let body = text.strip_suffix('…').unwrap_or(&text);
    // The longest start of the secret the message ends with; a few characters reveal nothing
    // (key prefixes such as `sk-` are public).
    let cut = (4..secret.len())
        .rev()
        .filter(|&len| secret.is_char_boundary(len))
        .find(|&len| body.ends_with(&secret[..len]))
        .map(|len| body.len() - len);
    match cut {
        Some(cut) => format!("{}<redacted>…", &body[..cut]),
        None => text,
    }
}

/// Finds a human-readable error message in the error shapes seen in the wild:
/// `{"error":{"message":…}}`, `{"error":"…"}`, `{"message":…}`, `{"error":{"code":…}}`.
pub(crate) fn error_message(json: &serde_json::Value) -> Option<String> {
    let error = json.get("error").filter(|error| !error.is_null());
    let message = match error {
        Some(serde_json::Value::String(text)) => Some(text.clone()),
        Some(error) => error
            .get("message")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .or_else(|| error.get("code").map(value_to_text))
            .or_else(|| Some(truncate_chars(&error.to_string(), MAX_ERROR_MESSAGE_CHARS))),
        None => json.get("message").and_then(serde_json::Value::as_str).map(str::to_owned),
    };
    message.map(|text| truncate_chars(&text, MAX_ERROR_MESSAGE_CHARS))
}

fn value_to_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// At most `max` characters of `text`, with an ellipsis when cut (never splits a character).
pub(crate) fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// A successful response body: either the event stream that was asked for, or a whole JSON
/// document from a server that ignored `stream: true`.
pub(crate) enum ResponseBody {
    /// The server streamed. Boxed: the stream is large and the enum is moved around.
    Events(Box<SseStream>),
    /// The server answered in one piece.
    Json(Vec<u8>),
}

/// Decides how to read a 2xx body. `text/event-stream` is trusted; anything else is sniffed: a
/// body starting with `{` or `[` is JSON (an SSE body always starts with a field name or a
/// colon), so that a gateway labelling its event stream `application/json` is still streamed.
///
/// Only the sniffing read of a body not labelled JSON is bounded by `deadline`: a JSON body is
/// the complete answer, which a server may well start sending only once it has it, so only the
/// caller's total timeout applies to it.
pub(crate) async fn open_body(
    mut response: reqwest::Response,
    deadline: Instant,
    first_token_timeout: Duration,
) -> Result<ResponseBody, LlmError> {
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if content_type.contains("event-stream") {
        return Ok(ResponseBody::Events(Box::new(SseStream::new(response, DEFAULT_MAX_EVENT_BYTES))));
    }
    let labelled_json = content_type.contains("json");
    let mut prefix = Vec::new();
    // Sniff: read until the first non-whitespace byte (or the end).
    loop {
        let chunk = if labelled_json {
            response.chunk().await
        } else {
            tokio::time::timeout_at(deadline, response.chunk())
                .await
                .map_err(|_elapsed| LlmError::FirstTokenTimeout(first_token_timeout))?
        };
        let chunk = chunk.map_err(|error| LlmError::Stream(describe_reqwest_error(error)))?;
        let Some(chunk) = chunk else { break };
        prefix.extend_from_slice(&chunk);
        if prefix.len() > DEFAULT_MAX_EVENT_BYTES {
            return Err(LlmError::Protocol("unrecognised response body".to_owned()));
        }
        if prefix.iter().any(|byte| !byte.is_ascii_whitespace()) {
            break;
        }
    }
    let first = prefix.iter().find(|byte| !byte.is_ascii_whitespace());
    // A web page, not an API: a gateway's UI (one-api answers every path outside `/v1`
    // with its index page and 200) or a proxy's error page. (By its first byte: a sloppy
    // gateway may label JSON or events `text/html`.)
    if first == Some(&b'<') {
        return Err(LlmError::Protocol(NOT_AN_API.to_owned()));
    }
    if !matches!(first, Some(b'{') | Some(b'[')) {
        let stream = SseStream::with_prefix(response, &prefix, DEFAULT_MAX_EVENT_BYTES)
            .map_err(|error| LlmError::Stream(error.to_string()))?;
        return Ok(ResponseBody::Events(Box::new(stream)));
    }
    let (rest, truncated) = read_body_limited(&mut response, DEFAULT_MAX_EVENT_BYTES.saturating_sub(prefix.len()))
        .await
        .map_err(|error| LlmError::Stream(describe_reqwest_error(error)))?;
    if truncated {
        return Err(LlmError::Protocol(format!("response body larger than {DEFAULT_MAX_EVENT_BYTES} bytes")));
    }
    prefix.extend_from_slice(&rest);
    Ok(ResponseBody::Json(prefix))
}

/// Maps an event-stream failure after the response started.
pub(crate) fn stream_error(error: SseError) -> LlmError {
    LlmError::Stream(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pretty_printed_json_error_sent_as_the_event_stream_is_one_event() {
        let mut parser = SseParser::default();
        let body = "{\n  \"error\": {\n    \"message\": \"quota exceeded\",\n    \"code\": 429\n  }\n}\n";
        let mut events = parser.push_collect(body.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert!(parser.finish().is_ok());
        events.extend(std::iter::from_fn(|| parser.next_event()));
        assert_eq!(events.len(), 1, "{events:?}");
        let json: serde_json::Value = serde_json::from_str(&events[0].data).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(error_message(&json).as_deref(), Some("quota exceeded"));
        // An event stream proper is read as ever: a `{` line inside it is one data line.
        let mut parser = SseParser::default();
        let events = parser.push_collect(b"data: 1\n\n{\"a\":1}\n\nfoo: 2\n\n").unwrap_or_else(|e| panic!("{e}"));
        let data: Vec<&str> = events.iter().map(|event| event.data.as_str()).collect();
        assert_eq!(data, ["1", "{\"a\":1}"]);
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00 GMT
        assert_eq!(retry_after_delay(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after_delay("Wed, 21 Oct 2015 07:28:03 GMT", now), Some(Duration::from_secs(3)));
        assert_eq!(retry_after_delay("Wed, 21 Oct 2015 07:27:00 GMT", now), Some(Duration::ZERO), "past");
        assert_eq!(retry_after_delay("86400", now), Some(Duration::from_secs(MAX_RETRY_AFTER_SECS)), "capped");
        assert_eq!(retry_after_delay("Thu, 22 Oct 2015 07:28:00 GMT", now), Some(Duration::from_secs(3_600)));
        for garbage in ["", "soon", "-1", "1.5e9", "Wed, 99 Oct 2015 07:28:03 GMT"] {
            assert_eq!(retry_after_delay(garbage, now), None, "{garbage:?}");
        }
    }

    #[test]
    fn redaction_covers_a_secret_cut_short_at_the_end_of_a_message() {
        let key = Some("sk-abcdefghijklmnop");
        assert_eq!(redact("key sk-abcdefghijklmnop bad".into(), key), "key <redacted> bad");
        assert_eq!(redact("...quoted sk-abcdefg…".into(), key), "...quoted <redacted>…");
        assert_eq!(redact("...quoted sk-abcdefg".into(), key), "...quoted <redacted>…");
        assert_eq!(redact("ends in sk-".into(), key), "ends in sk-");
        assert_eq!(redact("no key here".into(), None), "no key here");
    }

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(parser.push_collect(chunk).expect("valid sample"));
        }
        parser.finish().expect("valid sample");
        while let Some(event) = parser.next_event() {
            events.push(event);
        }
        events
    }

    fn data(text: &str) -> SseEvent {
        SseEvent { event: None, data: text.to_owned() }
    }

    #[test]
    fn a_simple_stream_yields_one_event_per_blank_line() {
        let events = parse_all(&[b"data: one\n\ndata: two\n\n"]);
        assert_eq!(events, vec![data("one"), data("two")]);
    }

    #[test]
    fn an_empty_chunk_between_cr_and_lf_does_not_end_the_event() {
        let events = parse_all(&[b"data: a\r", b"", b"\ndata: b\r\n\r\n"]);
        assert_eq!(events, vec![data("a\nb")]);
    }

    #[test]
    fn comment_and_keep_alive_lines_are_ignored() {
        let events = parse_all(&[b": keep-alive\n\n:\ndata: x\n: ping\n\n"]);
        assert_eq!(events, vec![data("x")]);
    }

    #[test]
    fn crlf_and_lone_cr_line_endings_are_understood() {
        assert_eq!(parse_all(&[b"data: a\r\n\r\ndata: b\r\n\r\n"]), vec![data("a"), data("b")]);
        assert_eq!(parse_all(&[b"data: a\r\rdata: b\r\r"]), vec![data("a"), data("b")]);
    }

    #[test]
    fn a_crlf_split_across_chunks_is_one_line_ending() {
        let events = parse_all(&[b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"]);
        assert_eq!(events, vec![data("a"), data("b")]);
    }

    #[test]
    fn multi_line_data_is_joined_with_newlines() {
        let events = parse_all(&[b"data: first\ndata:second\ndata\ndata:  third\n\n"]);
        assert_eq!(events, vec![data("first\nsecond\n\n third")]);
    }

    #[test]
    fn data_with_or_without_the_space_after_the_colon_is_the_same() {
        assert_eq!(parse_all(&[b"data:{\"a\":1}\n\n"]), parse_all(&[b"data: {\"a\":1}\n\n"]));
    }

    #[test]
    fn the_event_field_names_the_event() {
        let events = parse_all(&[b"event: response.created\ndata: {}\n\n"]);
        assert_eq!(events, vec![SseEvent { event: Some("response.created".into()), data: "{}".into() }]);
    }

    #[test]
    fn an_event_without_data_is_not_dispatched() {
        let events = parse_all(&[b"event: ping\n\nid: 3\nretry: 10\n\ndata: x\n\n"]);
        assert_eq!(events, vec![data("x")]);
    }

    #[test]
    fn a_final_event_without_a_trailing_blank_line_is_flushed_at_end_of_stream() {
        assert_eq!(parse_all(&[b"data: one\n\ndata: last"]), vec![data("one"), data("last")]);
        assert_eq!(parse_all(&[b"data: last\n"]), vec![data("last")]);
        assert_eq!(parse_all(&[b"data: last\r"]), vec![data("last")]);
    }

    #[test]
    fn a_leading_byte_order_mark_is_dropped() {
        let events = parse_all(&["\u{FEFF}data: x\n\n".as_bytes()]);
        assert_eq!(events, vec![data("x")]);
    }

    #[test]
    fn splitting_the_stream_at_every_byte_offset_gives_the_same_events() {
        let sample = "event: t\r\ndata: 你好, 世界 🌏\r\n: keep-alive\r\n\r\ndata: {\"x\":\"é\"}\n\ndata: a\ndata: b\n\ndata: end";
        let bytes = sample.as_bytes();
        let expected = parse_all(&[bytes]);
        assert_eq!(
            expected,
            vec![
                SseEvent { event: Some("t".into()), data: "你好, 世界 🌏".into() },
                data("{\"x\":\"é\"}"),
                data("a\nb"),
                data("end"),
            ]
        );
        for split in 0..=bytes.len() {
            let (left, right) = bytes.split_at(split);
            assert_eq!(parse_all(&[left, right]), expected, "split at byte {split}");
        }
        // And one byte at a time.
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_all(&singles), expected);
    }

    #[test]
    fn an_oversized_line_is_an_error_not_unbounded_memory() {
        let mut parser = SseParser::new(16);
        let result = parser.push(b"data: 0123456789abcdefXYZ");
        assert!(matches!(result, Err(SseError::TooLarge { limit: 16 })));
    }

    #[test]
    fn an_oversized_line_split_across_chunks_is_an_error() {
        let mut parser = SseParser::new(16);
        assert!(parser.push(b"data: 01234").is_ok());
        assert!(matches!(parser.push(b"56789abcdef"), Err(SseError::TooLarge { .. })));
    }

    #[test]
    fn an_oversized_multi_line_event_is_an_error() {
        let mut parser = SseParser::new(16);
        assert!(parser.push(b"data: 01234567\n").is_ok());
        assert!(matches!(parser.push(b"data: 01234567\n"), Err(SseError::TooLarge { .. })));
    }

    #[test]
    fn an_overlong_event_name_is_read_as_no_name() {
        let long = "n".repeat(MAX_EVENT_NAME_BYTES + 1);
        let events = parse_all(&[format!("event: {long}\ndata: a\n\nevent: error\ndata: b\n\n").as_bytes()]);
        assert_eq!(events, vec![data("a"), SseEvent { event: Some("error".into()), data: "b".into() }]);
    }

    #[test]
    fn invalid_utf8_is_replaced_rather_than_rejected() {
        let events = parse_all(&[b"data: a\xffb\n\n"]);
        assert_eq!(events, vec![data("a\u{FFFD}b")]);
    }
}
