//! An example plugin channel, written outside Yizhan's crates against `yizhan-channel-core` only.
//!
//! "HTTP JSON" is the smallest useful platform: an internal system POSTs
//! `{"message_id": "...", "user": "...", "text": "..."}` to `/webhooks/{id}` with
//! `Authorization: Bearer <token>`, and receives answers as
//! `{"user": "...", "text": "...", "in_reply_to": "..."}` POSTed to its `callback_url`, each
//! with an `Idempotency-Key` header that is the same on every retry of one part.
//!
//! The contract with the internal system, which Yizhan's guarantees rest on:
//! - `message_id` is unique among the messages sent to this channel (not only per user), the
//!   same when a message is sent again, non-blank and at most 512 bytes: it is the dedupe key.
//! - The callback treats a repeated `Idempotency-Key` as done (answers 2xx without showing the
//!   text again): a part whose answer was lost (a timeout, a 5xx) is sent again, so a
//!   failure after sending is reported [`ChannelError::Transient`], not
//!   [`ChannelError::MaybeDelivered`].
//! - A 429 or 503 may carry `Retry-After` in seconds: every send to the callback waits that
//!   long (at most 10 minutes).
//!
//! Register it in a binary of your own, which then runs as `yizhan` does:
//!
//! ```ignore
//! fn main() {
//!     let mut kinds = yizhan::channels::ChannelKinds::builtin();
//!     kinds.register(yizhan_plugin_example::HttpJson::KIND, |settings, http| {
//!         Ok(std::sync::Arc::new(yizhan_plugin_example::HttpJson::from_settings(settings, http.clone())?))
//!     });
//!     yizhan::cli::main_with(kinds)
//! }
//! ```
//!
//! and configure it like any channel:
//!
//! ```toml
//! [[channels]]
//! id = "intranet"
//! kind = "http_json"
//! token = "a-long-random-string"
//! callback_url = "http://intranet.example/bot/answers"
//! ```
#![warn(missing_docs)]

use serde::Deserialize;
use yizhan_channel_core::{
    constant_time_eq, BoxFuture, Channel, ChannelError, ChannelId, ChannelSettings, Conversation, ConversationKind,
    Delivery, DeliveryReceipt, Envelope, Method, ReplyHandle, Segment, Sender, WebhookOutcome, WebhookRequest,
    WebhookResponse,
};

/// The plugin's config keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpJsonSettings {
    /// The bearer token callers must present.
    pub token: String,
    /// Where answers are POSTed.
    pub callback_url: String,
}

/// Written by hand: settings end up in logs, and neither the token nor the callback URL
/// (whose query may carry a key) may go with them.
impl std::fmt::Debug for HttpJsonSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpJsonSettings").field("token", &"<redacted>").field("callback_url", &"<redacted>").finish()
    }
}

#[derive(Deserialize)]
struct Inbound {
    message_id: String,
    user: String,
    text: String,
}

/// See the crate docs.
pub struct HttpJson {
    id: ChannelId,
    settings: HttpJsonSettings,
    http: reqwest::Client,
}

impl HttpJson {
    /// The config `kind`.
    pub const KIND: &'static str = "http_json";

    /// Builds the channel from its `[[channels]]` entry.
    pub fn from_settings(settings: &ChannelSettings, http: reqwest::Client) -> Result<Self, ChannelError> {
        let parsed: HttpJsonSettings = settings.parse()?;
        if parsed.token.len() < 8 {
            return Err(ChannelError::Misconfigured(format!(
                "channel {:?}: `token` must be at least 8 characters",
                settings.id.as_str()
            )));
        }
        // Checked here, once, rather than failing (and being retried) at every delivery.
        let url_ok = reqwest::Url::parse(&parsed.callback_url)
            .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some());
        if !url_ok {
            // Not quoted: a callback URL may carry a secret in its query (see `deliver`).
            return Err(ChannelError::Misconfigured(format!(
                "channel {:?}: `callback_url` is not an http(s) URL with a host",
                settings.id.as_str()
            )));
        }
        Ok(Self { id: settings.id.clone(), settings: parsed, http })
    }
}

impl Channel for HttpJson {
    fn id(&self) -> &ChannelId {
        &self.id
    }

    fn kind(&self) -> &str {
        Self::KIND
    }

    fn handle_webhook(&self, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
        // The scheme's name in any case (RFC 7235), the token as given.
        let presented = request
            .header("authorization")
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        if !constant_time_eq(presented.as_bytes(), self.settings.token.as_bytes()) {
            return Err(ChannelError::BadSignature("missing or wrong bearer token".into()));
        }
        if request.method != Method::Post {
            return Err(ChannelError::Unsupported("only POST carries messages".into()));
        }
        let inbound: Inbound =
            serde_json::from_slice(&request.body).map_err(|error| ChannelError::Malformed(error.to_string()))?;
        // A blank user would put every such caller into one shared conversation.
        if inbound.user.trim().is_empty() {
            return Err(ChannelError::Malformed("`user` is blank".into()));
        }
        let received_at_ms = yizhan_channel_core::unix_millis(request.received_at);
        let envelope = Envelope {
            id: Envelope::new_id(),
            channel: self.id.clone(),
            channel_kind: Self::KIND.into(),
            platform_message_id: inbound.message_id.clone(),
            received_at_ms,
            conversation: Conversation { kind: ConversationKind::Direct, id: inbound.user.clone() },
            sender: Sender { id: inbound.user, name: None },
            content: vec![Segment::Text { text: inbound.text }],
            mentions_self: true,
            reply_handle: ReplyHandle(serde_json::json!({ "in_reply_to": inbound.message_id })),
        };
        // The core's rule for ids (the dedupe key not blank; no id over 512 bytes or with
        // control characters): the caller hears what is wrong, and the core need not refuse
        // the webhook as a plugin's bug.
        if !envelope.has_usable_ids() {
            return Err(ChannelError::Malformed(
                "`message_id` is blank, or it or `user` is over 512 bytes or holds control characters".into(),
            ));
        }
        Ok(WebhookOutcome::Accepted { envelopes: vec![envelope], ack: WebhookResponse::json(r#"{"ok":true}"#) })
    }

    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
        Box::pin(async move {
            let body = serde_json::json!({
                "user": delivery.recipient.id,
                "text": delivery.reply.text,
                "in_reply_to": delivery.reply_handle.0.get("in_reply_to"),
            });
            let response = self
                .http
                .post(&self.settings.callback_url)
                .header("Idempotency-Key", &delivery.delivery_id)
                .json(&body)
                .send()
                .await
                .map_err(|error| {
                    // Without the URL: a callback URL may carry a secret in its query. With the
                    // causes (refused, DNS, TLS, timed out), which the error's own text leaves out.
                    let misconfigured = error.is_builder();
                    let error = error.without_url();
                    let mut reason = format!("callback failed: {error}");
                    let mut cause = std::error::Error::source(&error);
                    while let Some(inner) = cause {
                        reason.push_str(&format!(": {inner}"));
                        cause = inner.source();
                    }
                    if misconfigured {
                        ChannelError::Misconfigured(reason)
                    } else {
                        ChannelError::Transient { reason, retry_after: None }
                    }
                })?;
            let status = response.status();
            // A timeout, a rate limit or the server's own trouble: worth another try (the
            // callback drops a repeated `Idempotency-Key`, see the crate docs), as soon as it
            // says.
            if status.is_server_error() || matches!(status.as_u16(), 408 | 429) {
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.trim().parse::<u64>().ok())
                    .filter(|seconds| *seconds > 0)
                    .map(std::time::Duration::from_secs);
                return Err(ChannelError::Transient { reason: format!("callback answered {status}"), retry_after });
            }
            // The core's client follows no redirect (it would turn the POST into a bodiless GET).
            if status.is_redirection() {
                return Err(ChannelError::Misconfigured(format!(
                    "callback answered {status}, a redirect: set `callback_url` to the address it points to"
                )));
            }
            if !status.is_success() {
                return Err(ChannelError::Refused {
                    code: i64::from(status.as_u16()),
                    reason: "callback refused".into(),
                });
            }
            Ok(DeliveryReceipt::default())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn channel(callback_url: &str) -> Result<HttpJson, ChannelError> {
        let settings = ChannelSettings {
            id: ChannelId::parse("intranet").map_err(ChannelError::Misconfigured)?,
            kind: HttpJson::KIND.into(),
            table: serde_json::json!({"token": "a-long-token", "callback_url": callback_url}),
        };
        HttpJson::from_settings(&settings, reqwest::Client::new())
    }

    #[test]
    fn it_passes_the_core_conformance_kit() {
        let channel = channel("http://127.0.0.1:9/answers").unwrap_or_else(|e| panic!("{e}"));
        // Signed with the bearer token, so that the garbage reaches the JSON parser too.
        yizhan_channel_core::testkit::check_signed_channel(&channel, &|request| {
            request.headers.push(("Authorization".into(), "Bearer a-long-token".into()));
        });
    }

    fn signed(body: String) -> WebhookRequest {
        WebhookRequest {
            method: Method::Post,
            query: vec![],
            raw_query: String::new(),
            headers: vec![("Authorization".into(), "Bearer a-long-token".into())],
            body: body.into_bytes().into(),
            received_at: SystemTime::now(),
        }
    }

    #[test]
    fn a_message_and_its_retry_are_accepted_alike() {
        let channel = channel("http://127.0.0.1:9/answers").unwrap_or_else(|e| panic!("{e}"));
        let request = signed(r#"{"message_id":"m1","user":"u","text":"你好"}"#.to_owned());
        yizhan_channel_core::testkit::accepts_a_message_and_its_retry_alike(&channel, &request);
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case_and_the_token_exactly() {
        let channel = channel("http://127.0.0.1:9/answers").unwrap_or_else(|e| panic!("{e}"));
        let body = r#"{"message_id":"m1","user":"u","text":"hi"}"#;
        for (header, accepted) in [
            ("bearer a-long-token", true),
            ("BEARER a-long-token", true),
            ("Bearer A-LONG-TOKEN", false),
            ("a-long-token", false),
        ] {
            let mut request = signed(body.to_owned());
            request.headers = vec![("Authorization".into(), header.into())];
            let outcome = channel.handle_webhook(&request);
            assert_eq!(outcome.is_ok(), accepted, "{header}: {outcome:?}");
        }
    }

    #[test]
    fn settings_print_without_their_secrets() {
        let settings =
            HttpJsonSettings { token: "a-long-token".into(), callback_url: "https://x/?key=k-secret".into() };
        let printed = format!("{settings:?}");
        assert!(!printed.contains("a-long-token") && !printed.contains("k-secret"), "{printed}");
    }

    #[test]
    fn a_message_from_a_blank_user_is_refused() {
        let channel = channel("http://127.0.0.1:9/answers").unwrap_or_else(|e| panic!("{e}"));
        let request = signed(r#"{"message_id":"m1","user":"  ","text":"hi"}"#.to_owned());
        assert!(matches!(channel.handle_webhook(&request), Err(ChannelError::Malformed(_))));
    }

    /// The caller's bad input, refused as such (the core would otherwise log it as this
    /// plugin's bug).
    #[test]
    fn a_blank_or_overlong_message_id_is_refused() {
        let channel = channel("http://127.0.0.1:9/answers").unwrap_or_else(|e| panic!("{e}"));
        for id in [" ".to_owned(), "m".repeat(513)] {
            let request = signed(serde_json::json!({"message_id": id, "user": "u", "text": "hi"}).to_string());
            assert!(matches!(channel.handle_webhook(&request), Err(ChannelError::Malformed(_))), "{id:.10}");
        }
        let request = signed(serde_json::json!({"message_id": "m".repeat(512), "user": "u", "text": "hi"}).to_string());
        assert!(matches!(channel.handle_webhook(&request), Ok(WebhookOutcome::Accepted { .. })));
    }

    #[test]
    fn a_callback_url_that_is_not_http_is_refused_at_start() {
        for url in ["intranet/answers?key=S3CRET", "ftp://host/x?key=S3CRET", "http://"] {
            match channel(url) {
                Err(ChannelError::Misconfigured(message)) => assert!(!message.contains("S3CRET"), "{message}"),
                other => panic!("{url}: {:?}", other.map(|_| ())),
            }
        }
    }
}
