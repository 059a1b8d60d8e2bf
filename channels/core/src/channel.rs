//! The [`Channel`] trait and the HTTP-shaped types it works on.
//!
//! The types mirror an HTTP request and response without naming any web framework, so a channel
//! can be tested with plain values and the core can host it under actix-web.

use crate::{ChannelError, ChannelId, Delivery, DeliveryReceipt, Envelope, Reply};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

/// A boxed future, so that [`Channel`] stays object-safe without `async-trait`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The HTTP method of a webhook call; platforms use GET to verify the URL and POST to push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// URL verification (WeChat, WeCom).
    Get,
    /// Message and event pushes.
    Post,
}

/// A webhook call as the channel sees it.
#[derive(Debug, Clone)]
pub struct WebhookRequest {
    /// GET or POST.
    pub method: Method,
    /// Query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
    /// The raw query string as sent (some signatures are computed over encoded values).
    pub raw_query: String,
    /// Headers with lower-case names.
    pub headers: Vec<(String, String)>,
    /// The raw body; signatures are computed over these exact bytes.
    pub body: Bytes,
    /// When the hub received the call; replay windows are measured against it.
    pub received_at: SystemTime,
}

impl WebhookRequest {
    /// The first query parameter called `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    /// The first header called `name`, in any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        // HTTP header names are case-insensitive; the hub hands them over lowercased, tests and
        // other callers may not.
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    /// Seconds since the Unix epoch at [`received_at`](Self::received_at).
    pub fn received_at_unix(&self) -> i64 {
        match self.received_at.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(elapsed) => elapsed.as_secs() as i64,
            Err(before) => -(before.duration().as_secs() as i64),
        }
    }

    /// Checks a platform timestamp against the replay window. `window` of zero disables the
    /// check (for operators whose clocks they cannot trust).
    pub fn check_timestamp(&self, timestamp: &str, window: Duration) -> Result<(), ChannelError> {
        if window.is_zero() {
            return Ok(());
        }
        let sent: i64 = timestamp
            .trim()
            .parse()
            .map_err(|_| ChannelError::BadSignature(format!("timestamp {timestamp:?} is not a number")))?;
        // `abs_diff`: any i64 parses, and a subtraction could overflow.
        let skew = self.received_at_unix().abs_diff(sent);
        if skew > window.as_secs() {
            return Err(ChannelError::BadSignature(format!(
                "timestamp is {skew} s away from now, outside the {} s replay window",
                window.as_secs()
            )));
        }
        Ok(())
    }
}

/// What the core sends back to the platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookResponse {
    /// HTTP status code.
    pub status: u16,
    /// The `Content-Type` header.
    pub content_type: &'static str,
    /// The body.
    pub body: Bytes,
}

impl WebhookResponse {
    /// 200 with a plain-text body (WeChat's `success`, an `echostr`).
    pub fn text(body: impl Into<Bytes>) -> Self {
        Self { status: 200, content_type: "text/plain; charset=utf-8", body: body.into() }
    }

    /// 200 with a JSON body (Feishu's challenge).
    pub fn json(body: impl Into<Bytes>) -> Self {
        Self { status: 200, content_type: "application/json", body: body.into() }
    }

    /// 200 with an XML body (WeChat's passive reply).
    pub fn xml(body: impl Into<Bytes>) -> Self {
        Self { status: 200, content_type: "application/xml; charset=utf-8", body: body.into() }
    }

    /// 200 with nothing in it.
    pub fn empty() -> Self {
        Self::text(Bytes::new())
    }
}

/// What a webhook call amounted to.
#[derive(Debug, Clone)]
pub enum WebhookOutcome {
    /// Answer with this and dispatch nothing (URL verification, events the bot ignores).
    Respond(WebhookResponse),
    /// Messages to dispatch. The core journals them, then answers with `ack`.
    Accepted {
        /// The messages, usually one.
        envelopes: Vec<Envelope>,
        /// The acknowledgement, sent once the envelopes are safe.
        ack: WebhookResponse,
    },
}

/// What a channel can do, so the core picks the right reply path.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// The platform accepts an answer in the webhook's HTTP response, and waits this long for
    /// it (WeChat: 5 s). `None` for platforms that want an immediate acknowledgement.
    ///
    /// Declaring a window brings WeChat's whole model with it, not just the wait: the core
    /// expects the platform to retry an unanswered request (three attempts in all; the first
    /// two are held past the window and left to lapse, the last answers the `ack`, or a
    /// [`passive_reply`](Channel::passive_reply) of the user's oldest parked answer), defaults
    /// the channel to `reply_mode = "auto"` with a send quota of 5 parts per message (3 after a
    /// menu click, follow or scan), and parks what cannot be sent behind the continue word. A
    /// platform that does not retry waits out two windows before its answer is pushed (or less,
    /// once four windows have passed since the message arrived: no retry comes after that).
    pub passive_reply_window: Option<Duration>,
    /// The platform renders markdown. Informational: the core passes the model's text (usually
    /// markdown) to [`Channel::render`] as it is; a channel whose platform would show `**` and
    /// `#` literally converts the text there (`yizhan_channel_common::markdown` has converters).
    pub markdown: bool,
    /// The largest part `deliver` accepts, in bytes of UTF-8.
    pub max_part_bytes: usize,
    /// The channel implements [`Channel::begin_stream`] and friends: the answer can be shown
    /// while the model writes it.
    pub streaming: bool,
    /// The least time between two [`Channel::update_stream`] calls (platform edit rate limits).
    pub min_stream_interval: Duration,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            passive_reply_window: None,
            markdown: false,
            max_part_bytes: 2048,
            streaming: false,
            min_stream_interval: Duration::from_millis(200),
        }
    }
}

/// `text` in parts of at most `limit` bytes (each holds at least one character, whatever the
/// limit), cut after the last line break in the second half of a part, or else at the last
/// character boundary; nothing is lost or repeated but whitespace between parts (a stretch of
/// only whitespace is never a part of its own). Blank text gives no part.
fn split_to_bytes(text: &str, limit: usize) -> Vec<Reply> {
    let mut parts = Vec::new();
    let mut rest = text;
    while !rest.trim().is_empty() {
        if rest.len() <= limit {
            parts.push(Reply::text(rest));
            break;
        }
        let mut cut = limit;
        while cut > 0 && !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut == 0 {
            // A limit smaller than the first character: that character alone.
            cut = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        if let Some(newline) = rest[..cut].rfind('\n').filter(|&newline| newline + 1 > cut / 2) {
            cut = newline + 1;
        }
        let part = &rest[..cut];
        if !part.trim().is_empty() {
            parts.push(Reply::text(part));
        }
        rest = &rest[cut..];
    }
    parts
}

/// A message being written while the model streams (a Feishu CardKit card, …). Opaque to the
/// core; serialisable so it can be journaled.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StreamHandle(pub serde_json::Value);

/// One configured account on one platform.
///
/// Implementations must never panic on any input: every failure is a [`ChannelError`].
pub trait Channel: Send + Sync + 'static {
    /// The configured id of this account.
    fn id(&self) -> &ChannelId;

    /// The channel kind, as written in config (`wechat_mp`).
    fn kind(&self) -> &str;

    /// What this platform supports.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Verifies, decrypts and parses one webhook call. CPU work only: no I/O, and quick. It runs
    /// inline on an HTTP worker thread, which also serves held passive replies (and, by default,
    /// sessions): a slow call stalls every connection on that worker. A panic is caught and
    /// answered 500.
    ///
    /// What the core answers the platform:
    /// - [`WebhookOutcome::Accepted`]: the envelopes are journaled (durably), then the `ack` is
    ///   sent; a journal failure answers 503 so that the platform retries. Each envelope's
    ///   [`platform_message_id`](Envelope::platform_message_id) must be the same on every
    ///   retry of one message and differ between messages of the channel (it is the dedupe
    ///   key, per channel, not per user), non-blank and at most 512 bytes; otherwise the core
    ///   answers 400 and logs a bug.
    /// - [`WebhookOutcome::Respond`]: that response, nothing journaled (URL checks, events
    ///   ignored on purpose: acknowledge those, or the platform retries them).
    /// - Errors: [`BadSignature`](ChannelError::BadSignature) 401, [`Malformed`](ChannelError::Malformed)
    ///   400, [`Unsupported`](ChannelError::Unsupported) 405 (a method or mode, not an event
    ///   type the bot ignores: platforms retry a non-2xx), [`Transient`](ChannelError::Transient)
    ///   and [`MaybeDelivered`](ChannelError::MaybeDelivered) 503,
    ///   [`Refused`](ChannelError::Refused) and [`Misconfigured`](ChannelError::Misconfigured) 500.
    fn handle_webhook(&self, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError>;

    /// Renders an answer for this platform and splits it into parts that `deliver` accepts,
    /// in the order they must arrive. By default the text is kept as it is, split into parts of
    /// at most [`Capabilities::max_part_bytes`] (at a line break where one is near the end,
    /// otherwise at a character boundary; a stretch of only whitespace at a cut is dropped, never
    /// a part of its own). Blank parts are dropped by the core; an answer with text that
    /// renders to no part at all is sent by the default split instead (and logged).
    fn render(&self, reply: &Reply) -> Vec<Reply> {
        split_to_bytes(&reply.text, self.capabilities().max_part_bytes)
    }

    /// Builds the HTTP answer that carries `reply` passively, for platforms with a
    /// [`passive_reply_window`](Capabilities::passive_reply_window).
    fn passive_reply(
        &self,
        _request: &WebhookRequest,
        _envelope: &Envelope,
        _reply: &Reply,
    ) -> Result<WebhookResponse, ChannelError> {
        Err(ChannelError::Unsupported("passive replies".into()))
    }

    /// When the platform says the message was sent (Unix ms by its clock, to the second), for
    /// platforms with a [`passive_reply_window`](Capabilities::passive_reply_window): the core
    /// reads from the message's age which of the platform's attempts a request is (taking the
    /// attempts to come one window apart), when earlier ones never reached it (refused while it
    /// restarted, say). `None` (the default): attempts are counted as they come.
    fn sent_at_ms(&self, _envelope: &Envelope) -> Option<i64> {
        None
    }

    /// Sends one rendered part through the platform's API.
    ///
    /// A part may be sent more than once: after a failure the core retries, and a part pending
    /// at a stop or crash is sent again by the next start. [`Delivery::delivery_id`] is the same
    /// each time: pass it as the platform's idempotency key where there is one. Calls run at
    /// the same time (different conversations; and a conversation's busy reply beside its
    /// answer); one answer's parts go one at a time, in order. A panic is caught and fails the
    /// part.
    ///
    /// The call must end: the core sets no time limit on it (a channel may rightly wait long
    /// for its platform's rate limits), and until it ends the conversation's later answers
    /// wait. Give every request a timeout (a `reqwest::Client` has none unless built with
    /// one) and report one that expired after sending as `MaybeDelivered`.
    ///
    /// What the core does with each error:
    /// - [`Transient`](ChannelError::Transient): sent again with backoff, up to
    ///   `delivery.max_attempts` sends; a non-zero `retry_after` pauses every send of the
    ///   account instead (all conversations, for the advice, at most 10 minutes, plus a little
    ///   spread so that the held-back sends do not all go at once).
    /// - [`MaybeDelivered`](ChannelError::MaybeDelivered): the send went out and may have
    ///   arrived; sent once more at most, then recorded failed. Report a failure after sending
    ///   (a timeout, a gateway's 5xx, an unreadable answer) this way unless the platform drops
    ///   repeated sends of one idempotency key, in which case it is `Transient`.
    /// - Anything else: final. The part, and the parts of the answer after it, are recorded
    ///   failed with the error as the reason, or, on channels with a passive window in `auto`
    ///   mode, parked for the user's next message. The core logs every failed part; a channel
    ///   need not log its errors again. If it is an answer's first part (none of it shown), the
    ///   answer's turn is also taken out of the conversation's history; after `Transient` and
    ///   `MaybeDelivered` it stays (the part may have arrived).
    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>>;

    /// Starts a message that will show the answer while it is written, addressed like
    /// `target` (whose `reply` holds the text so far, possibly empty). Only called when
    /// [`Capabilities::streaming`] is set. The core then calls [`update_stream`](Self::update_stream)
    /// with the full text so far, at most once per [`Capabilities::min_stream_interval`], with a
    /// strictly increasing `sequence`, and finally [`finish_stream`](Self::finish_stream).
    /// [`ChannelError::Unsupported`] declines streaming this time, quietly (the answer is then
    /// delivered whole); other errors are logged as failures.
    fn begin_stream<'a>(&'a self, _target: &'a Delivery) -> BoxFuture<'a, Result<StreamHandle, ChannelError>> {
        Box::pin(async { Err(ChannelError::Unsupported("streaming".into())) })
    }

    /// Replaces the streamed message's text with `text_so_far` (the whole answer so far, as the
    /// model wrote it: not rendered, and not cut to `max_part_bytes`; a channel shows what
    /// fits). Once one update reached `max_part_bytes`, the core sends no more until the finish;
    /// nor after an error other than [`ChannelError::Transient`] (later updates would fail the
    /// same way). A transient error's `retry_after` delays the next update (at most 10 s); an
    /// update skipped on purpose (a rate budget) should say so that way rather than `Ok`, or the
    /// core takes the message as showing that text. A channel whose message is full (it shows
    /// the same for any longer text) may write the update and then return
    /// [`ChannelError::Unsupported`], which ends the updates without marking anything failed.
    fn update_stream<'a>(
        &'a self,
        _handle: &'a StreamHandle,
        _text_so_far: &'a str,
        _sequence: u64,
    ) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(async { Err(ChannelError::Unsupported("streaming".into())) })
    }

    /// Writes the final text and ends streaming mode. `full_text` is the answer's first part
    /// as [`render`](Self::render) made it (the whole answer when it fits one part; further
    /// parts follow through [`deliver`](Self::deliver)). The core may call this more than once
    /// for one handle: again after a transient error (with `sequence` moved past the two
    /// previous values, as either may have been applied), and once more with a short note when
    /// it gives up and sends the answer as messages instead. Implementations should make a
    /// repeated call harmless (write the text, not append it), and may use `sequence` and
    /// `sequence + 1`.
    fn finish_stream<'a>(
        &'a self,
        _handle: &'a StreamHandle,
        _full_text: &'a str,
        _sequence: u64,
    ) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
        Box::pin(async { Err(ChannelError::Unsupported("streaming".into())) })
    }

    /// Shows the user that an answer is being written, where the platform has such a thing.
    /// Failures are ignored by the core.
    fn typing<'a>(&'a self, _envelope: &'a Envelope) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_at(now: u64) -> WebhookRequest {
        WebhookRequest {
            method: Method::Post,
            query: vec![("a".into(), "1".into())],
            raw_query: "a=1".into(),
            headers: vec![],
            body: Bytes::new(),
            received_at: SystemTime::UNIX_EPOCH + Duration::from_secs(now),
        }
    }

    #[test]
    fn the_default_render_splits_to_the_part_limit_losing_nothing() {
        let text = format!("{}\n{}", "一".repeat(500), "二🇨🇳".repeat(300));
        for limit in [0, 1, 3, 5, 64, 2048, 100_000] {
            let parts = split_to_bytes(&text, limit);
            let joined: String = parts.iter().map(|part| part.text.as_str()).collect();
            // Only a stretch of whitespace alone (the line break, at the smallest limits) goes.
            let visible = |text: &str| text.chars().filter(|c| !c.is_whitespace()).collect::<String>();
            assert_eq!(visible(&joined), visible(&text), "limit {limit}");
            if limit >= 4 {
                assert_eq!(joined, text, "limit {limit}");
            }
            let most = limit.max(4);
            assert!(parts.iter().all(|part| part.text.len() <= most && !part.text.trim().is_empty()), "limit {limit}");
        }
        // A long run of spaces is never a part of its own.
        let spaced = split_to_bytes(&format!("a{}b", " ".repeat(12)), 4);
        assert!(spaced.iter().all(|part| !part.text.trim().is_empty()), "{spaced:?}");
        assert_eq!(spaced.iter().map(|part| part.text.trim()).collect::<String>(), "ab");
        assert_eq!(split_to_bytes("a\nbcd", 4).iter().map(|p| p.text.as_str()).collect::<Vec<_>>(), ["a\nbc", "d"]);
        assert_eq!(split_to_bytes("abc\nd", 4).iter().map(|p| p.text.as_str()).collect::<Vec<_>>(), ["abc\n", "d"]);
        assert!(split_to_bytes("  ", 10).is_empty());
    }

    #[test]
    fn timestamps_inside_the_window_pass_and_outside_fail() {
        let request = request_at(1_000);
        let window = Duration::from_secs(300);
        assert!(request.check_timestamp("1000", window).is_ok());
        assert!(request.check_timestamp("700", window).is_ok());
        assert!(request.check_timestamp("1300", window).is_ok());
        assert!(request.check_timestamp("699", window).is_err());
        assert!(request.check_timestamp("1301", window).is_err());
        assert!(request.check_timestamp("abc", window).is_err());
        assert!(request.check_timestamp("-99999999999999999999", window).is_err());
        // The extremes of i64 parse; the skew must not overflow (a panic in debug builds).
        assert!(request.check_timestamp(&i64::MIN.to_string(), window).is_err());
        assert!(request.check_timestamp(&i64::MAX.to_string(), window).is_err());
    }

    #[test]
    fn a_zero_window_disables_the_timestamp_check() {
        assert!(request_at(1_000_000).check_timestamp("1", Duration::ZERO).is_ok());
    }

    #[test]
    fn query_params_are_found_by_name() {
        assert_eq!(request_at(0).query_param("a"), Some("1"));
        assert_eq!(request_at(0).query_param("b"), None);
    }
}
