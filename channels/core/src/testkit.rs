//! Conformance checks every channel's tests should run (enable the `testkit` feature).
//!
//! They feed a channel hostile input and check that it answers with errors, never panics, and
//! that its rendering honours its own limits.

use crate::{Channel, Method, Reply, WebhookRequest};
use bytes::Bytes;
use std::time::SystemTime;

fn request(method: Method, query: &str, body: &'static [u8]) -> WebhookRequest {
    let pairs = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key.to_owned(), value.to_owned())
        })
        .collect();
    WebhookRequest {
        method,
        query: pairs,
        raw_query: query.to_owned(),
        headers: vec![],
        body: Bytes::from_static(body),
        received_at: SystemTime::now(),
    }
}

/// Runs every check; panics (this is test code) naming the first that fails.
pub fn check_channel(channel: &dyn Channel) {
    rejects_unsigned_and_garbage_requests(channel);
    renders_within_its_part_limit(channel);
}

/// [`check_channel`], and [`survives_signed_garbage`] with `sign`: for a channel that checks
/// its callers, so that the garbage gets past the check and reaches its parser.
pub fn check_signed_channel(channel: &dyn Channel, sign: &dyn Fn(&mut WebhookRequest)) {
    check_channel(channel);
    survives_signed_garbage(channel, sign);
}

/// Garbage that carries a valid signature (`sign` adds it: a header, a query parameter) is an
/// error or an acknowledgement, never a panic, and any message it yields has a usable id. At
/// least one signed POST must get past the signature check (refused neither as unsigned nor as
/// unsupported), or `sign` did not sign and the garbage never reached the parser.
pub fn survives_signed_garbage(channel: &dyn Channel, sign: &dyn Fn(&mut WebhookRequest)) {
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let long = format!("{{\"text\":\"{}\"}}", "字".repeat(100_000));
    let bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"null".to_vec(),
        b"{}".to_vec(),
        b"[]".to_vec(),
        b"{\"message_id\":1,\"user\":[],\"text\":{}}".to_vec(),
        b"{\"message_id\":\"\",\"user\":\"\",\"text\":\"\"}".to_vec(),
        b"<xml><MsgType>text</MsgType><Content>\xff</Content></xml>".to_vec(),
        b"\xff\xfe\x00garbage".to_vec(),
        deep.into_bytes(),
        long.into_bytes(),
    ];
    let mut past_the_check = false;
    for body in bodies {
        for method in [Method::Get, Method::Post] {
            let mut request = WebhookRequest {
                method,
                query: vec![],
                raw_query: String::new(),
                headers: vec![],
                body: Bytes::from(body.clone()),
                received_at: SystemTime::now(),
            };
            sign(&mut request);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| channel.handle_webhook(&request)));
            let preview = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
            let Ok(outcome) = outcome else {
                panic!("channel {} panicked on a signed {method:?} request: {preview:?}", channel.id())
            };
            // A POST (the one method every platform pushes with) that got past the signature
            // to the parser: not refused as unsigned, nor as a method or mode not handled.
            past_the_check |= method == Method::Post
                && !matches!(outcome, Err(crate::ChannelError::BadSignature(_) | crate::ChannelError::Unsupported(_)));
            if let Ok(crate::WebhookOutcome::Accepted { envelopes, .. }) = outcome {
                for envelope in envelopes {
                    assert!(
                        envelope.has_usable_ids(),
                        "channel {} accepted {preview:?} as a message without usable ids (the core would refuse it): {:?} / {:?} / {:?}",
                        channel.id(),
                        envelope.platform_message_id,
                        envelope.conversation.id,
                        envelope.sender.id
                    );
                }
            }
        }
    }
    assert!(
        past_the_check,
        "channel {}: `sign` did not sign (no signed POST got past the check: each was refused as unsigned or unsupported)",
        channel.id()
    );
}

/// A real message, `request` (signed, as the platform sends it), is accepted as the core needs
/// it: the same request handled again a minute later (the platform's retry) yields the same
/// `platform_message_id` (the dedupe key: never built from the time of receipt), each envelope
/// has usable ids ([`Envelope::has_usable_ids`](crate::Envelope::has_usable_ids)), its
/// `received_at_ms` is the request's `received_at`, and it reads back from the JSON the
/// journal keeps (a NaN, say, would not: the message would be lost at a restart).
pub fn accepts_a_message_and_its_retry_alike(channel: &dyn Channel, request: &WebhookRequest) {
    let ids = |request: &WebhookRequest| -> Vec<String> {
        let envelopes = match channel.handle_webhook(request) {
            Ok(crate::WebhookOutcome::Accepted { envelopes, .. }) if !envelopes.is_empty() => envelopes,
            other => panic!("channel {} did not accept the message: {other:?}", channel.id()),
        };
        let received_at_ms = crate::unix_millis(request.received_at);
        for envelope in &envelopes {
            assert!(envelope.has_usable_ids(), "channel {}: ids the core refuses: {envelope:?}", channel.id());
            assert_eq!(
                envelope.received_at_ms,
                received_at_ms,
                "channel {}: `received_at_ms` is not the request's `received_at`",
                channel.id()
            );
            let json = serde_json::to_string(envelope).unwrap_or_default();
            let read = serde_json::from_str::<crate::Envelope>(&json);
            assert!(
                read.as_ref().is_ok_and(|read| read == envelope),
                "channel {}: the envelope does not read back from {json}: {read:?}",
                channel.id()
            );
        }
        envelopes.into_iter().map(|envelope| envelope.platform_message_id).collect()
    };
    let first = ids(request);
    let mut retry = request.clone();
    retry.received_at = request.received_at + std::time::Duration::from_secs(60);
    assert_eq!(
        ids(&retry),
        first,
        "channel {}: the platform's retry of a message must carry the same `platform_message_id`",
        channel.id()
    );
}

/// Unsigned, empty and garbage requests are errors, not panics and not accepted messages.
pub fn rejects_unsigned_and_garbage_requests(channel: &dyn Channel) {
    let bodies: [&'static [u8]; 6] = [
        b"",
        b"<xml>",
        b"{\"a\":",
        b"\xff\xfe\x00garbage",
        b"<xml><ToUserName>a</ToUserName><MsgType>text</MsgType></xml>",
        b"{\"schema\":\"2.0\",\"header\":{},\"event\":{}}",
    ];
    for body in bodies {
        for method in [Method::Get, Method::Post] {
            for query in ["", "signature=0&timestamp=0&nonce=0&echostr=x", "msg_signature=&timestamp=x"] {
                let outcome = channel.handle_webhook(&request(method, query, body));
                assert!(
                    outcome.is_err(),
                    "channel {} accepted an unsigned request: {method:?} ?{query} {body:?}",
                    channel.id()
                );
            }
        }
    }
}

/// The largest limit [`renders_within_its_part_limit`] sizes its samples by.
const SAMPLE_BYTES_AT_MOST: usize = 64 << 10;

/// `render` never produces a part over `max_part_bytes`, never an empty or blank part (long runs
/// of whitespace included), loses no text
/// and repeats none (a few characters per part, for a label or a hint, are allowed).
pub fn renders_within_its_part_limit(channel: &dyn Channel) {
    let limit = channel.capabilities().max_part_bytes;
    // Samples sized by the limit, up to a size a test can build (a channel may declare no
    // limit at all as `usize::MAX`).
    let size = limit.min(SAMPLE_BYTES_AT_MOST);
    let samples = [
        "短".to_owned(),
        "你好，世界。".repeat(size / 6 + 7),
        "a".repeat(size * 3 + 1),
        format!("{}\n\n{}", "第一段。".repeat(size / 8), "第二段！".repeat(size / 8)),
        // Four-byte characters and multi-character emoji, with no natural break anywhere.
        "好🇨🇳👨\u{200d}👩\u{200d}👧😀".repeat(size / 10 + 3),
        // Long runs of whitespace, which must not become parts of their own.
        format!("开头{}结尾", " ".repeat(size * 3)),
        format!("开头{}结尾", "\n".repeat(size * 3)),
    ];
    for sample in samples {
        let parts = channel.render(&Reply::text(sample.clone()));
        assert!(!parts.is_empty(), "render produced no parts");
        for part in &parts {
            assert!(!part.text.trim().is_empty(), "render produced an empty (or blank) part");
            assert!(part.text.len() <= limit, "part of {} bytes over the {limit}-byte limit", part.text.len());
        }
        let kept: usize = parts.iter().map(|part| part.text.chars().filter(|c| !c.is_whitespace()).count()).sum();
        let given = sample.chars().filter(|c| !c.is_whitespace()).count();
        assert!(kept >= given, "render lost text: {kept} of {given} characters kept");
        assert!(kept <= given + 64 * parts.len(), "render repeated text: {kept} characters for {given}");
    }
}

/// Captures every log line (any level, no colours) of the current thread until the guard is
/// dropped. For a current-thread test runtime, so the thread-local default covers every await;
/// run such a test in a binary of its own (tracing caches per-callsite interest process-wide,
/// so a concurrent test hitting the same callsites without a subscriber could hide events).
pub fn capture_logs() -> (CapturedLog, tracing::subscriber::DefaultGuard) {
    let captured = CapturedLog::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// Log output captured in memory, for tests that check what a channel logs: what
/// [`capture_logs`] collects.
#[derive(Clone, Default)]
pub struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLog {
    /// Every line written so far.
    pub fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().map(|buffer| buffer.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).lines().map(str::to_owned).collect()
    }
}

impl std::io::Write for CapturedLog {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut buffer) = self.0.lock() {
            buffer.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Checks what a channel logs for a misconfiguration its platform reports with `code` (an IP
/// not whitelisted, say): five failed sends log one error, a send that goes ends the run, and
/// the next failure logs again; the error names the code and `channel=<channel>`, and no line
/// holds any of `secrets`. `send(text)` delivers a part with that text and says whether it
/// went; the stand-in platform must refuse the first five, take the sixth and refuse the
/// seventh. Run it under [`capture_logs`].
pub async fn misconfiguration_is_logged_once_per_run<F, Fut>(
    captured: &CapturedLog,
    mut send: F,
    code: &str,
    channel: &str,
    secrets: &[&str],
) where
    F: FnMut(&'static str) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let errors_logged = || captured.lines().iter().filter(|line| line.contains("ERROR")).count();
    for _ in 0..5 {
        assert!(!send("hi").await, "the stand-in took a send it should refuse");
    }
    assert_eq!(errors_logged(), 1, "{:#?}", captured.lines());
    assert!(send("fixed").await, "the stand-in refused the send it should take");
    assert!(!send("broken again").await, "the stand-in took a send it should refuse");
    assert_eq!(errors_logged(), 2, "{:#?}", captured.lines());

    let lines = captured.lines();
    let channel = format!("channel={channel}");
    assert!(lines.iter().any(|line| line.contains(code) && line.contains(&channel)), "{lines:#?}");
    for line in &lines {
        assert!(!secrets.iter().any(|secret| line.contains(secret)), "secret in log: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BoxFuture, ChannelError, ChannelId, Delivery, DeliveryReceipt, WebhookOutcome};

    /// Refuses GETs as unsupported (as a channel that checks the method first does) and POSTs
    /// without its signature header as unsigned; anything signed is malformed.
    struct MethodFirst(ChannelId);

    impl Channel for MethodFirst {
        fn id(&self) -> &ChannelId {
            &self.0
        }

        fn kind(&self) -> &str {
            "method_first"
        }

        fn handle_webhook(&self, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
            if request.method == Method::Get {
                return Err(ChannelError::Unsupported("GET".into()));
            }
            if !request.headers.iter().any(|(name, _)| name == "x-sig") {
                return Err(ChannelError::BadSignature("unsigned".into()));
            }
            Err(ChannelError::Malformed("garbage".into()))
        }

        fn deliver<'a>(&'a self, _delivery: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
            Box::pin(async { Ok(DeliveryReceipt::default()) })
        }
    }

    #[test]
    fn a_sign_that_does_not_sign_is_caught_even_when_gets_are_refused_first() {
        let channel = MethodFirst(ChannelId::parse("fake").unwrap_or_else(|e| panic!("{e}")));
        let unsigned = std::panic::catch_unwind(|| survives_signed_garbage(&channel, &|_| {}));
        assert!(unsigned.is_err(), "a sign that adds nothing passed");
        survives_signed_garbage(&channel, &|request| request.headers.push(("x-sig".into(), "1".into())));
    }
}
