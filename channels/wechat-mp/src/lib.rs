//! Yizhan's channel for WeChat Official Accounts (公众号, "MP"), in all three message encryption
//! modes: plaintext (明文模式), compatible (兼容模式) and safe (安全模式).
//!
//! # Layout
//! - [`settings`]: [`WechatMpSettings`], the channel's config section.
//! - [`signature`]: the `sha1(sort(token, timestamp, nonce))` signature on every webhook call,
//!   and the `msg_signature` that also covers an encrypted body.
//! - `inbound`: pushed XML → `Envelope`, for every message type and event.
//! - [`markdown`] and [`split`]: LLM markdown → plain text → parts WeChat accepts.
//! - `passive`: the XML answer carried in the webhook response (the 5-second path).
//! - `api`: stable access token, customer-service sends and typing, error-code triage.
//!
//! # Design decisions
//! - **Stable token, normal mode.** `/cgi-bin/stable_token` with `force_refresh: false` returns
//!   the same token to every caller while it is valid, so several hub instances (or a restart)
//!   never invalidate each other's token, unlike the classic `/cgi-bin/token`. A token WeChat
//!   rejects (40001/40014/42001) is refreshed and the send retried exactly once.
//! - **Error codes are triaged, not passed through.** Codes only an operator can fix (IP
//!   whitelist, wrong AppID/AppSecret) become [`ChannelError::Misconfigured`] with the fix in
//!   the message, logged once per code rather than once per message; quota and window errors
//!   become [`ChannelError::Refused`] so the core can park the answer; busy and rate limits become
//!   [`ChannelError::Transient`].
//! - **Plain text out.** WeChat renders no markdown, so answers are converted to plain text
//!   before splitting; splitting prefers paragraph, line and sentence breaks because the
//!   customer-service quota (5 messages per user message) makes every part count.
//! - **Nothing fails to parse.** Unknown message types and events become
//!   [`Event::Other`](yizhan_channel_core::Event::Other); only broken XML or a push without
//!   sender or type is refused.
//! - **Encrypted pushes (安全模式 / 兼容模式).** A POST with `encrypt_type=aes` is checked with
//!   `msg_signature` over the body's `<Encrypt>` (never with the 3-field `signature`, which
//!   does not cover the body; PROTOCOLS §0.4) and the replay window, then decrypted with
//!   [`yizhan_channel_wechat_crypto`] (receive id = `app_id`) and parsed like a plaintext push.
//!   In 兼容模式 the body also carries the plaintext fields; they are ignored, because only
//!   `<Encrypt>` is signed. Any crypto failure is [`ChannelError::BadSignature`] (401); an
//!   encrypted push while no `encoding_aes_key` is configured is
//!   [`ChannelError::Misconfigured`] (after its signature checked out, so strangers cannot
//!   trigger the operator alarm).
//! - **Key rotation.** With `previous_encoding_aes_key` set, a push the current key cannot open
//!   is tried with the previous one.
//! - **How the passive reply knows it must encrypt.** `handle_webhook` records it in the
//!   envelope's reply handle: `{"account": "gh_…", "encrypted": true, "key": "current"}` (or
//!   `"previous"`: the key that opened the push); plaintext pushes keep `{"account": "gh_…"}`.
//!   [`passive_reply`](Channel::passive_reply) encrypts when the handle says so (or the request
//!   it is given has `encrypt_type=aes`), with that key, the request's `nonce` and the hub's
//!   receipt time as `TimeStamp`, and wraps it in the encrypted reply XML (PROTOCOLS §1). The
//!   handle is journaled with the envelope, so this survives a restart; it holds no secret.
//!
//! # Security note
//! In plaintext mode WeChat signs the query (token, timestamp, nonce), not the body. The
//! signature plus the replay window prove a URL was issued by WeChat recently; they cannot
//! prove the body was not swapped by someone who captured a signed URL within the window. Safe
//! mode (`msg_signature` over the encrypted body) closes that gap, so once an EncodingAESKey is
//! configured a plaintext push is refused (401) unless `accept_plaintext` is on, for the few
//! minutes of a switch from 明文模式. Without a key, serve the webhook over HTTPS.
#![warn(missing_docs)]

mod api;
mod inbound;
mod passive;
pub mod settings;
pub mod signature;

pub use settings::WechatMpSettings;
/// Markdown → plain text and splitting are the shared ones (`yizhan-channel-common`).
pub use yizhan_channel_common::{markdown, split, split_text};

use std::time::Duration;
use tracing::debug;
use yizhan_channel_common::unix_millis;
use yizhan_channel_core::{
    BoxFuture, Capabilities, Channel, ChannelError, ChannelId, ChannelSettings, Delivery, DeliveryReceipt, Envelope,
    Method, Reply, WebhookOutcome, WebhookRequest, WebhookResponse,
};
use yizhan_channel_wechat_crypto::{KeySlot, WxCrypto};

/// The channel kind, as written in config (`kind = "wechat_mp"`).
pub const KIND: &str = "wechat_mp";

/// How long WeChat waits for a passive reply before it gives up and retries (PROTOCOLS §2.4).
const PASSIVE_REPLY_WINDOW: Duration = Duration::from_secs(5);

/// One 公众号 account.
pub struct WechatMp {
    id: ChannelId,
    /// Validated settings (normalised `api_base`).
    settings: WechatMpSettings,
    /// Present when an `encoding_aes_key` is configured: opens encrypted pushes and encrypts
    /// their passive replies.
    crypto: Option<WxCrypto>,
    api: api::Api,
}

impl WechatMp {
    /// The kind, as written in config (same as the crate-level [`KIND`]).
    pub const KIND: &'static str = KIND;

    /// Builds the channel from already-parsed settings, validating them first. `http` is shared
    /// with the rest of the hub so connections are pooled.
    pub fn new(id: ChannelId, settings: WechatMpSettings, http: reqwest::Client) -> Result<Self, ChannelError> {
        let settings = settings.validate()?;
        let crypto = match &settings.encoding_aes_key {
            Some(key) => Some(
                WxCrypto::new(&settings.token, key, settings.previous_encoding_aes_key.as_deref(), &settings.app_id)
                    .map_err(|error| ChannelError::Misconfigured(format!("wechat_mp: `encoding_aes_key`: {error}")))?,
            ),
            None => None,
        };
        let api = api::Api::new(
            id.clone(),
            http,
            settings.api_base.clone(),
            settings.app_id.clone(),
            settings.app_secret.clone(),
        );
        Ok(Self { id, settings, crypto, api })
    }

    /// Builds the channel from its `[[channels]]` entry; unknown keys (the core's) are ignored.
    pub fn from_settings(settings: &ChannelSettings, http: reqwest::Client) -> Result<WechatMp, ChannelError> {
        if settings.kind != Self::KIND {
            return Err(ChannelError::Misconfigured(format!(
                "channel {:?} has kind {:?}, not {:?}",
                settings.id.as_str(),
                settings.kind,
                Self::KIND
            )));
        }
        let parsed: WechatMpSettings = settings.parse()?;
        Self::new(settings.id.clone(), parsed, http)
    }

    /// The validated settings.
    pub fn settings(&self) -> &WechatMpSettings {
        &self.settings
    }

    /// A POST: plaintext pushes are checked with the 3-field signature (refused outright once an
    /// EncodingAESKey is configured, unless `accept_plaintext`), encrypted ones
    /// (`encrypt_type=aes`) with `msg_signature`; either becomes one envelope.
    fn accept_push(&self, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
        let encrypt_type = request.query_param("encrypt_type").unwrap_or("raw");
        let (fields, key) = if encrypt_type.eq_ignore_ascii_case("aes") {
            let (fields, key) = self.open_encrypted(request)?;
            (fields, Some(key))
        } else {
            // Signature first: an unsigned caller learns nothing of how the account is set up.
            signature::verify(request, &self.settings.token, self.settings.replay_window())?;
            if self.crypto.is_some() && !self.settings.accept_plaintext {
                return Err(ChannelError::BadSignature(
                    "a plaintext push to an account with an `encoding_aes_key`: only pushes with \
                     `encrypt_type=aes` and `msg_signature` are accepted (set `accept_plaintext` \
                     while switching from 明文模式)"
                        .into(),
                ));
            }
            if !encrypt_type.eq_ignore_ascii_case("raw") {
                return Err(ChannelError::Unsupported(format!(
                    "encrypt_type={encrypt_type}: only raw (明文模式) and aes (兼容模式/安全模式) exist"
                )));
            }
            (inbound::parse_fields(&request.body)?, None)
        };
        let mut envelope = inbound::to_envelope(&fields, &self.id, Self::KIND, unix_millis(request.received_at))?;
        if let (Some(key), Some(handle)) = (key, envelope.reply_handle.0.as_object_mut()) {
            handle.insert("encrypted".into(), serde_json::Value::Bool(true));
            handle.insert("key".into(), serde_json::Value::from(key.as_str()));
        }
        debug!(
            channel = %self.id,
            msg_type = fields.get("MsgType").unwrap_or_default(),
            message_id = %envelope.platform_message_id,
            encrypted = key.is_some(),
            key = key.map(KeySlot::as_str).unwrap_or("none"),
            "Push accepted."
        );
        Ok(WebhookOutcome::Accepted { envelopes: vec![envelope], ack: WebhookResponse::text("success") })
    }

    /// 安全模式 / 兼容模式: verify `msg_signature` over `<Encrypt>` and the replay window, then
    /// decrypt and parse the inner XML. The plaintext fields of a 兼容模式 body are ignored:
    /// only `<Encrypt>` is signed.
    fn open_encrypted(
        &self,
        request: &WebhookRequest,
    ) -> Result<(yizhan_channel_common::xml::Fields, KeySlot), ChannelError> {
        if request.query_param("msg_signature").is_none() {
            return Err(ChannelError::BadSignature(
                "encrypt_type=aes but query parameter `msg_signature` is missing (`signature` does not \
                 cover the body and is not accepted in its place)"
                    .into(),
            ));
        }
        let outer = inbound::parse_fields(&request.body)?;
        let encrypt = outer
            .get("Encrypt")
            .ok_or_else(|| ChannelError::Malformed("encrypt_type=aes but the body has no <Encrypt>".into()))?;
        signature::verify_encrypted(request, &self.settings.token, encrypt, self.settings.replay_window())?;
        let crypto = self.crypto.as_ref().ok_or_else(|| {
            ChannelError::Misconfigured(format!(
                "wechat_mp channel {:?} received an encrypted push (安全模式/兼容模式, encrypt_type=aes) \
                 but has no `encoding_aes_key`; copy the 消息加解密密钥 from 设置与开发 → 基本配置 → \
                 服务器配置 into the channel's settings, or switch the account to 明文模式",
                self.id.as_str()
            ))
        })?;
        // NOTE: every crypto failure is the sender's (a wrong key or appid on their side, or a
        // forgery), never a reason to retry: 401.
        let decrypted = crypto.decrypt(encrypt).map_err(|error| ChannelError::BadSignature(error.to_string()))?;
        let fields = inbound::parse_fields(decrypted.message.as_bytes())?;
        Ok((fields, decrypted.key))
    }

    /// Encrypts a passive reply when the push was encrypted: the reply handle records it (and
    /// which key opened the push); a request with `encrypt_type=aes` counts too, in case the
    /// handle was written by an older version.
    fn seal_passive(
        &self,
        request: &WebhookRequest,
        envelope: &Envelope,
        xml: String,
    ) -> Result<WebhookResponse, ChannelError> {
        let handle = &envelope.reply_handle.0;
        let encrypted = handle.get("encrypted").and_then(serde_json::Value::as_bool).unwrap_or(false)
            || request.query_param("encrypt_type").is_some_and(|kind| kind.eq_ignore_ascii_case("aes"));
        if !encrypted {
            return Ok(WebhookResponse::xml(xml));
        }
        let key = match handle.get("key").and_then(serde_json::Value::as_str) {
            Some(slot) => slot.parse::<KeySlot>().map_err(ChannelError::Malformed)?,
            None => KeySlot::Current,
        };
        let crypto = self.crypto.as_ref().ok_or_else(|| {
            ChannelError::Misconfigured(format!(
                "wechat_mp channel {:?} must encrypt a passive reply but has no `encoding_aes_key`",
                self.id.as_str()
            ))
        })?;
        let nonce = request
            .query_param("nonce")
            .ok_or_else(|| ChannelError::Malformed("the encrypted push's request has no `nonce`".into()))?;
        let body = crypto.reply_xml(&xml, request.received_at_unix(), nonce, key).map_err(ChannelError::from)?;
        Ok(WebhookResponse::xml(body))
    }
}

impl std::fmt::Debug for WechatMp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WechatMp").field("id", &self.id).field("settings", &self.settings).finish()
    }
}

impl Channel for WechatMp {
    fn id(&self) -> &ChannelId {
        &self.id
    }

    fn kind(&self) -> &str {
        Self::KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            passive_reply_window: Some(PASSIVE_REPLY_WINDOW),
            markdown: false,
            max_part_bytes: self.settings.max_part_bytes,
            ..Capabilities::default()
        }
    }

    /// GET: URL verification (never encrypted, even in 安全模式), answered with `echostr`.
    /// POST: a message or event push, plaintext or encrypted, one envelope, acknowledged with
    /// `success`. Every call must carry a valid signature (`msg_signature` for encrypted pushes)
    /// and a timestamp inside the replay window.
    fn handle_webhook(&self, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
        match request.method {
            Method::Get => {
                signature::verify(request, &self.settings.token, self.settings.replay_window())?;
                let echostr = request
                    .query_param("echostr")
                    .ok_or_else(|| ChannelError::BadSignature("query parameter `echostr` is missing".into()))?;
                Ok(WebhookOutcome::Respond(WebhookResponse::text(echostr.to_owned())))
            }
            Method::Post => self.accept_push(request),
        }
    }

    /// Markdown → plain text, split into parts of at most `max_part_bytes`. An answer with no
    /// visible text renders to no parts.
    fn render(&self, reply: &Reply) -> Vec<Reply> {
        let plain = markdown::to_plain_text(&reply.text);
        split::split_text(&plain, self.settings.max_part_bytes).into_iter().map(Reply::text).collect()
    }

    /// `CreateTime` (seconds) of the push.
    fn sent_at_ms(&self, envelope: &Envelope) -> Option<i64> {
        envelope.reply_handle.0.get("create_time")?.as_i64()?.checked_mul(1_000)
    }

    /// The passive-reply XML for `reply`, which should be one part from
    /// [`render`](Channel::render): plaintext, or wrapped in the encrypted reply XML when the push
    /// was encrypted (see the crate docs). An empty reply is answered with a plain `success`
    /// (WeChat then shows nothing and does not retry, in every mode) rather than with an empty
    /// `Content`.
    fn passive_reply(
        &self,
        request: &WebhookRequest,
        envelope: &Envelope,
        reply: &Reply,
    ) -> Result<WebhookResponse, ChannelError> {
        if passive::shows_nothing(&reply.text) {
            return Ok(WebhookResponse::text("success"));
        }
        let account = envelope
            .reply_handle
            .0
            .get("account")
            .and_then(serde_json::Value::as_str)
            .filter(|account| !account.is_empty())
            .ok_or_else(|| {
                ChannelError::Malformed(
                    "the envelope's reply handle names no account; it is not from this channel".into(),
                )
            })?;
        let xml = passive::text_reply_xml(&envelope.sender.id, account, request.received_at_unix(), &reply.text);
        self.seal_passive(request, envelope, xml)
    }

    /// Sends one part as a customer-service text message to the recipient's openid.
    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
        Box::pin(async move {
            if passive::shows_nothing(&delivery.reply.text) {
                debug!(channel = %self.id, delivery = %delivery.delivery_id, "Empty part skipped.");
                return Ok(DeliveryReceipt::default());
            }
            let text = yizhan_channel_common::wechat::without_control_characters(&delivery.reply.text);
            self.api.send_text(&delivery.recipient.id, &text).await
        })
    }

    /// "对方正在输入…" for 15 s. Answered `Ok` when WeChat declines only because the user has not
    /// written in the last 30 s or the indicator is already shown.
    fn typing<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(self.api.typing(&envelope.sender.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;
    use std::time::SystemTime;

    fn channel(window: u64) -> WechatMp {
        let settings = ChannelSettings {
            id: ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}")),
            kind: WechatMp::KIND.into(),
            table: json!({

                "app_id": "wx1", "app_secret": "secret", "token": "AAAAA",
                "replay_window_secs": window,
            }),
        };
        WechatMp::from_settings(&settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn request(method: Method, query: &str, body: &str, now: u64) -> WebhookRequest {
        WebhookRequest {
            method,
            query: query
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            raw_query: query.to_owned(),
            headers: vec![],
            body: Bytes::from(body.to_owned()),
            received_at: SystemTime::UNIX_EPOCH + Duration::from_secs(now),
        }
    }

    const DOC_QUERY: &str = "signature=f464b24fc39322e44b38aa78f5edd27bd1441696&echostr=4375120948345356249\
                             &timestamp=1714036504&nonce=1514711492";

    #[test]
    fn the_documented_url_verification_echoes_echostr() {
        let outcome = channel(0).handle_webhook(&request(Method::Get, DOC_QUERY, "", 2_000_000_000));
        match outcome {
            Ok(WebhookOutcome::Respond(response)) => {
                assert_eq!(response.status, 200);
                assert_eq!(response.body, Bytes::from_static(b"4375120948345356249"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_stale_timestamp_is_refused_even_with_a_good_signature() {
        let outcome = channel(300).handle_webhook(&request(Method::Get, DOC_QUERY, "", 1_714_036_504 + 301));
        assert!(matches!(outcome, Err(ChannelError::BadSignature(_))));
        let fresh = channel(300).handle_webhook(&request(Method::Get, DOC_QUERY, "", 1_714_036_504 + 299));
        assert!(fresh.is_ok());
    }

    #[test]
    fn a_wrong_signature_or_missing_parameter_is_refused() {
        let forged = DOC_QUERY.replace("f464b24f", "f464b24e");
        let outcome = channel(0).handle_webhook(&request(Method::Get, &forged, "", 0));
        assert!(matches!(outcome, Err(ChannelError::BadSignature(_))));
        let missing = DOC_QUERY.replace("nonce=", "nonc=");
        let outcome = channel(0).handle_webhook(&request(Method::Get, &missing, "", 0));
        assert!(matches!(outcome, Err(ChannelError::BadSignature(_))));
        let no_echo = DOC_QUERY.replace("echostr=", "echo=");
        let outcome = channel(0).handle_webhook(&request(Method::Get, &no_echo, "", 0));
        assert!(matches!(outcome, Err(ChannelError::BadSignature(_))));
    }

    #[test]
    fn safe_mode_pushes_with_a_bad_msg_signature_are_refused() {
        let query = format!("{DOC_QUERY}&encrypt_type=aes&msg_signature=abc");
        let outcome = channel(0).handle_webhook(&request(Method::Post, &query, "<xml><Encrypt>x</Encrypt></xml>", 0));
        assert!(matches!(outcome, Err(ChannelError::BadSignature(_))));
    }

    #[test]
    fn an_unknown_encrypt_type_is_unsupported_after_the_signature_check() {
        let query = format!("{DOC_QUERY}&encrypt_type=sm4");
        let outcome = channel(0).handle_webhook(&request(Method::Post, &query, "<xml/>", 0));
        assert!(matches!(outcome, Err(ChannelError::Unsupported(_))));
    }

    #[test]
    fn capabilities_offer_the_five_second_passive_window_and_no_markdown() {
        let capabilities = channel(0).capabilities();
        assert_eq!(capabilities.passive_reply_window, Some(Duration::from_secs(5)));
        assert!(!capabilities.markdown);
        assert_eq!(capabilities.max_part_bytes, 2048);
    }

    #[test]
    fn a_settings_entry_of_another_kind_is_refused() {
        let settings = ChannelSettings {
            id: ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}")),
            kind: "feishu".into(),
            table: json!({"app_id": "a", "app_secret": "s", "token": "t"}),
        };
        assert!(matches!(
            WechatMp::from_settings(&settings, reqwest::Client::new()),
            Err(ChannelError::Misconfigured(_))
        ));
    }

    /// A tiny deterministic generator, so the robustness tests need no extra dependency.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, below: usize) -> usize {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % below.max(1)
        }
    }

    #[test]
    fn rendering_random_markdown_never_panics_and_honours_the_limit() {
        let alphabet = [
            "*",
            "**",
            "_",
            "`",
            "```",
            "#",
            "## ",
            "- ",
            "1. ",
            "> ",
            "[",
            "]",
            "(",
            ")",
            "!",
            "<",
            ">",
            "|",
            "\n",
            "\n\n",
            " ",
            "    ",
            "好",
            "。",
            "😀",
            "é",
            "a",
            "word",
            ".",
            "http://x.y/z",
            "\t",
            "---",
            "~~",
            "<br>",
            "&amp;",
            "]]>",
        ];
        let mut rng = Lcg(7);
        for limit in [64, 100, 2048] {
            let channel = channel_with_limit(limit);
            for _ in 0..300 {
                let len = rng.next(400);
                let text: String = (0..len).map(|_| alphabet[rng.next(alphabet.len())]).collect();
                for part in channel.render(&Reply::text(text.clone())) {
                    assert!(!part.text.trim().is_empty(), "empty part from {text:?}");
                    assert!(part.text.len() <= limit, "over {limit}: {text:?}");
                }
            }
        }
    }

    #[test]
    fn random_bodies_never_panic_the_webhook() {
        let fragments = [
            "<xml>",
            "</xml>",
            "<MsgType>",
            "</MsgType>",
            "<![CDATA[",
            "]]>",
            "text",
            "event",
            "<Event>",
            "</Event>",
            "<FromUserName>",
            "</FromUserName>",
            "<ToUserName>",
            "</ToUserName>",
            "o",
            "&lt;",
            "&",
            "<",
            ">",
            "<a/>",
            "<?xml?>",
            "<!--",
            "-->",
            "\u{0}",
            "好",
            "<CreateTime>",
            "</CreateTime>",
            "1",
        ];
        let channel = channel(0);
        let mut rng = Lcg(11);
        for _ in 0..2000 {
            let len = rng.next(30);
            let body: String = (0..len).map(|_| fragments[rng.next(fragments.len())]).collect();
            let _ = channel.handle_webhook(&request(Method::Post, DOC_QUERY, &body, 0));
        }
    }

    fn channel_with_limit(limit: usize) -> WechatMp {
        let settings: WechatMpSettings = serde_json::from_value(json!({
            "app_id": "wx1", "app_secret": "secret", "token": "AAAAA", "max_part_bytes": limit,
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let id = ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}"));
        WechatMp::new(id, settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"))
    }
}
