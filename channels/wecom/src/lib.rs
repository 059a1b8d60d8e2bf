//! Yizhan's channel for WeCom (企业微信) self-built apps (自建应用).
//!
//! # Layout
//! - [`settings`]: [`WecomSettings`], the channel's config section.
//! - `inbound`: callback bodies (XML or JSON) → fields → `Envelope`, for every message type and
//!   event.
//! - [`markdown`] and [`split`]: LLM markdown → WeCom's markdown subset (or plain text) → parts
//!   of at most `max_part_bytes`.
//! - The per-member rate limiter that makes sends wait rather than be dropped, the splitter and
//!   the markdown renderer are shared ones (`yizhan-channel-common`).
//! - `api`: access token, `message/send`, error-code triage.
//! - Verification and decryption are the shared `yizhan-channel-wechat-crypto` crate's
//!   (WXBizMsgCrypt, receive id = corp id).
//!
//! # Design decisions
//! - **Everything is encrypted.** WeCom signs (`msg_signature` over the ciphertext) and
//!   encrypts every callback, the GET URL check included. Any verification or decryption
//!   failure — wrong signature, stale timestamp, wrong key, a frame addressed to another corp —
//!   is [`ChannelError::BadSignature`] (401), and no input can make the channel panic.
//! - **Acknowledge, then send.** Callbacks are answered with an empty 200 at once (WeCom's
//!   "no passive reply"), and answers go out through `message/send`, which has no 5-second
//!   deadline and no size-one limit.
//! - **Callbacks for another app are ignored, not refused.** Such a callback is authentic
//!   (signed with our token, addressed to our corp) — typically the same URL and keys were
//!   configured on two apps. Answering 401 would only make WeCom retry it three times, so it is
//!   acknowledged with an empty 200, dispatched nowhere, and logged once per foreign AgentID.
//! - **Never exceed the send limits.** WeCom silently drops messages beyond 30 per minute and
//!   1000 per hour from one app to one member, so `deliver` waits for room (per member, both
//!   windows) instead of sending and losing the part. The core awaits each part before sending
//!   the next, so waiting keeps order.
//! - **Error codes are triaged, not passed through.** Codes only an operator can fix (IP not in
//!   企业可信IP, wrong corp id / secret / agent id) become [`ChannelError::Misconfigured`] with the
//!   fix in the message, logged once per code; "no valid recipient" (81013) is
//!   [`ChannelError::Refused`]; busy and frequency limits are [`ChannelError::Transient`]. A
//!   rejected token is refreshed and the send retried exactly once.
//! - **Instances are independent.** Every `[[channels]]` entry (one app of one corp) owns its
//!   crypto state, token cache and rate limiter; nothing is global.
//! - **Duplicate check except on repeated texts.** A part's first send asks WeCom to drop it if an
//!   identical message went to the member in the last 15 minutes, and so do its resends, so a
//!   part retried after a lost answer (retries span up to about 13 minutes, account pauses
//!   included) or resent after a quick restart is not shown twice. A *different* part with the same text (the apology while
//!   the model is down, an answer repeated word for word) is sent without the check, or WeCom
//!   would swallow it (`repeats`); a failure of such a send after it went out is
//!   `MaybeDelivered`: sent once more at most. For 15 minutes after a start, which part sent
//!   what before it is unknown: parts of messages accepted before the start are sent with the
//!   check, parts of later ones without it.
#![warn(missing_docs)]

mod api;
mod inbound;
pub mod markdown;
mod repeats;
pub mod settings;

pub use settings::{ReplyFormat, WecomSettings};
/// Splitting is the shared splitter (`yizhan-channel-common`).
pub use yizhan_channel_common::{split, split_text};

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;
use tracing::{debug, info, warn};
use yizhan_channel_common::limiter::{RateLimiter, Window};
use yizhan_channel_common::unix_millis;
use yizhan_channel_core::{
    BoxFuture, Capabilities, Channel, ChannelError, ChannelId, ChannelSettings, Delivery, DeliveryReceipt, Method,
    Reply, WebhookOutcome, WebhookRequest, WebhookResponse,
};
use yizhan_channel_wechat_crypto::{CryptoError, Decrypted, WxCrypto};

/// The channel kind, as written in config (`kind = "wecom"`).
pub const KIND: &str = "wecom";

/// At most this many foreign AgentIDs are remembered for log-once, so a flood of forged-looking
/// (but validly signed) callbacks cannot grow memory.
const MAX_FOREIGN_AGENTS_LOGGED: usize = 32;

/// One WeCom self-built app.
pub struct Wecom {
    id: ChannelId,
    /// Validated settings (normalised `api_base` and keys).
    settings: WecomSettings,
    /// Token, EncodingAESKey(s) and corp id: verifies and decrypts callbacks.
    crypto: WxCrypto,
    api: api::Api,
    limiter: RateLimiter,
    /// Which part last sent each text to each member, for WeCom's duplicate check.
    recent_sends: repeats::RecentSends,
    /// This run's id, in the reply handle of every message it accepts: a message with another
    /// (or none, an earlier version's) is an earlier run's. Not the time: clocks step.
    run: String,
    /// Foreign AgentIDs already logged.
    foreign_agents: Mutex<HashSet<String>>,
}

impl Wecom {
    /// The kind, as written in config (same as the crate-level [`KIND`]).
    pub const KIND: &'static str = KIND;

    /// Builds the channel from already-parsed settings, validating them first. `http` is shared
    /// with the rest of the hub so connections are pooled.
    pub fn new(id: ChannelId, settings: WecomSettings, http: reqwest::Client) -> Result<Self, ChannelError> {
        let settings = settings.validate()?;
        let crypto = WxCrypto::new(
            &settings.token,
            &settings.encoding_aes_key,
            settings.previous_encoding_aes_key.as_deref(),
            &settings.corp_id,
        )
        .map_err(|error| ChannelError::Misconfigured(format!("wecom: {error}")))?;
        let api = api::Api::new(
            id.clone(),
            http,
            settings.api_base.clone(),
            settings.corp_id.clone(),
            settings.corp_secret.clone(),
            settings.agent_id,
        );
        let limiter = member_limiter(settings.rate_per_minute, settings.rate_per_hour);
        Ok(Self {
            id,
            settings,
            crypto,
            api,
            limiter,
            recent_sends: repeats::RecentSends::new(
                Duration::from_secs(api::DUPLICATE_CHECK_SECS) + api::DUPLICATE_CHECK_MARGIN,
            ),
            run: yizhan_channel_core::Envelope::new_id(),
            foreign_agents: Mutex::new(HashSet::new()),
        })
    }

    /// Builds the channel from its `[[channels]]` entry; unknown keys (the core's) are ignored.
    pub fn from_settings(settings: &ChannelSettings, http: reqwest::Client) -> Result<Wecom, ChannelError> {
        if settings.kind != Self::KIND {
            return Err(ChannelError::Misconfigured(format!(
                "channel {:?} has kind {:?}, not {:?}",
                settings.id.as_str(),
                settings.kind,
                Self::KIND
            )));
        }
        let parsed: WecomSettings = settings.parse()?;
        Self::new(settings.id.clone(), parsed, http)
    }

    /// The validated settings.
    pub fn settings(&self) -> &WecomSettings {
        &self.settings
    }

    /// Checks `msg_signature` over `encrypt`, then the replay window, then decrypts (checking
    /// the corp id). The timestamp is checked after the signature, so an unsigned caller learns
    /// nothing about our clock, and before decryption, so a replay costs no AES work.
    fn open(&self, request: &WebhookRequest, encrypt: &str) -> Result<Decrypted, ChannelError> {
        let param = |name: &str| {
            request
                .query_param(name)
                .ok_or_else(|| ChannelError::BadSignature(format!("query parameter `{name}` is missing")))
        };
        let (msg_signature, timestamp, nonce) = (param("msg_signature")?, param("timestamp")?, param("nonce")?);
        self.crypto.verify_msg_signature(msg_signature, timestamp, nonce, encrypt).map_err(rejected)?;
        request.check_timestamp(timestamp, self.settings.replay_window())?;
        self.crypto.decrypt(encrypt).map_err(rejected)
    }

    /// GET: the URL check. WeCom sends an encrypted `echostr` and wants its plaintext back,
    /// exactly (no quotes, no newline).
    fn verify_url(&self, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
        let echostr = request
            .query_param("echostr")
            .ok_or_else(|| ChannelError::BadSignature("query parameter `echostr` is missing".into()))?;
        // NOTE: base64 has no spaces; a space here is a `+` that reached a form decoder
        // unescaped, and the signature is over the `+`.
        let echostr = echostr.replace(' ', "+");
        let opened = self.open(request, &echostr)?;
        // A POST's `msg_signature` covers the same four fields, with its `<Encrypt>` where the
        // echostr goes: without this check, anyone who saw a callback (its URL and body) could
        // replay it as a URL check within the window and be answered its decrypted message.
        // WeCom's echostr is a short random string of digits.
        let echo_like = (1..=128).contains(&opened.message.len())
            && opened.message.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        if !echo_like {
            return Err(ChannelError::BadSignature("the echostr does not decrypt to an echo string".into()));
        }
        debug!(channel = %self.id, "Callback URL verified.");
        Ok(WebhookOutcome::Respond(WebhookResponse::text(opened.message)))
    }

    /// POST: one encrypted message or event, XML or JSON.
    fn accept_callback(&self, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
        let outer = inbound::parse(&request.body, inbound::sniff(&request.body)?)?;
        let encrypt =
            outer.get("Encrypt").ok_or_else(|| ChannelError::BadSignature("the body carries no `Encrypt`".into()))?;
        let opened = self.open(request, encrypt)?;
        let plaintext = opened.message.as_bytes();
        let fields = inbound::parse(plaintext, inbound::sniff(plaintext)?)?;
        let agent = fields.get("AgentID").or_else(|| outer.get("AgentID"));
        if let Some(agent) = agent {
            if agent.parse::<i64>().ok() != Some(self.settings.agent_id) {
                self.ignore_foreign_agent(agent);
                return Ok(WebhookOutcome::Respond(WebhookResponse::empty()));
            }
        }
        let envelope =
            inbound::to_envelope(&fields, &self.id, Self::KIND, unix_millis(request.received_at), &self.run)?;
        debug!(
            channel = %self.id,
            msg_type = fields.get("MsgType").unwrap_or_default(),
            message_id = %envelope.platform_message_id,
            "Callback accepted."
        );
        Ok(WebhookOutcome::Accepted { envelopes: vec![envelope], ack: WebhookResponse::empty() })
    }

    fn ignore_foreign_agent(&self, agent: &str) {
        let agent: String = agent.chars().take(32).collect();
        let mut logged = self.foreign_agents.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if logged.len() < MAX_FOREIGN_AGENTS_LOGGED && logged.insert(agent.clone()) {
            warn!(
                channel = %self.id,
                agent_id = %agent,
                configured_agent_id = self.settings.agent_id,
                "Callback for another app of this corp ignored; give each app its own callback URL, or fix `agent_id`."
            );
        }
    }

    fn msg_type(&self) -> api::MsgType {
        match self.settings.reply_format {
            ReplyFormat::Markdown => api::MsgType::Markdown,
            ReplyFormat::Text => api::MsgType::Text,
        }
    }
}

/// Every failure to verify or open a callback means the request is not (intact and) from WeCom
/// for this corp.
fn rejected(error: CryptoError) -> ChannelError {
    ChannelError::BadSignature(error.to_string())
}

/// WeCom's send limits per member: `per_minute` in any minute and `per_hour` in any hour
/// (WeCom: 30 and 1000), excess **silently dropped** (doc path/90236: the API still answers
/// `errcode: 0`), so sends wait for room instead. A slot frees [`LIMIT_SLACK`] after its window,
/// because WeCom counts when a message *arrives*, a little after we grant it.
fn member_limiter(per_minute: u32, per_hour: u32) -> RateLimiter {
    RateLimiter::new(&[
        Window::new(per_minute, Duration::from_secs(60)),
        Window::new(per_hour, Duration::from_secs(3600)),
    ])
    .with_slack(LIMIT_SLACK)
}

/// Covers the delay between granting a slot and WeCom receiving the message, and clock
/// granularity on WeCom's side.
const LIMIT_SLACK: Duration = Duration::from_secs(1);

/// Refuses recipients that would address more than one member: `@all` (the whole corp) or a
/// `|`-separated list. Userids come from WeCom itself, so this only guards against a corrupted
/// journal or a bug sending one member's answer to everybody.
fn check_recipient(userid: &str) -> Result<(), ChannelError> {
    if userid.is_empty() || userid.eq_ignore_ascii_case("@all") || userid.contains('|') {
        return Err(ChannelError::Refused {
            code: 40003,
            reason: format!("recipient {userid:?} is not a single WeCom userid"),
        });
    }
    Ok(())
}

impl std::fmt::Debug for Wecom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wecom").field("id", &self.id).field("settings", &self.settings).finish()
    }
}

impl Channel for Wecom {
    fn id(&self) -> &ChannelId {
        &self.id
    }

    fn kind(&self) -> &str {
        Self::KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            passive_reply_window: None,
            markdown: self.settings.reply_format == ReplyFormat::Markdown,
            max_part_bytes: self.settings.max_part_bytes,
            ..Capabilities::default()
        }
    }

    /// GET: URL verification, answered with the decrypted `echostr`. POST: a message or event,
    /// one envelope, acknowledged with an empty 200. Both must carry a valid `msg_signature`, a
    /// timestamp inside the replay window, and a frame for the configured corp.
    fn handle_webhook(&self, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
        match request.method {
            Method::Get => self.verify_url(request),
            Method::Post => self.accept_callback(request),
        }
    }

    /// Markdown → WeCom's markdown subset (or plain text, per `reply_format`), split into parts
    /// of at most `max_part_bytes` at paragraph, line or sentence breaks (bold kept balanced
    /// across a cut). An answer with no visible text renders to no parts.
    fn render(&self, reply: &Reply) -> Vec<Reply> {
        let limit = self.settings.max_part_bytes;
        let parts = match self.settings.reply_format {
            ReplyFormat::Markdown => {
                yizhan_channel_common::markdown::split_keeping_strong(&markdown::to_wecom_markdown(&reply.text), limit)
            }
            ReplyFormat::Text => split::split_text(&markdown::to_plain_text(&reply.text), limit),
        };
        parts.into_iter().map(Reply::text).collect()
    }

    /// Sends one part to the recipient's userid as an app message, after waiting for room in
    /// the member's rate windows.
    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
        Box::pin(async move {
            // As for 公众号: the WeChat family refuses JSON carrying control characters.
            let text = yizhan_channel_common::wechat::without_control_characters(&delivery.reply.text);
            if text.trim().is_empty() {
                debug!(channel = %self.id, delivery = %delivery.delivery_id, "Empty part skipped.");
                return Ok(DeliveryReceipt::default());
            }
            let userid = delivery.recipient.id.trim();
            check_recipient(userid)?;
            let waited = self.limiter.acquire(userid).await;
            if !waited.is_zero() {
                info!(
                    channel = %self.id,
                    user = %userid,
                    waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    "Delivery waited for WeCom's per-member rate limit."
                );
            }
            let run = delivery.reply_handle.0.get("run").and_then(serde_json::Value::as_str);
            let from_an_earlier_run = run != Some(self.run.as_str());
            let duplicate_check =
                self.recent_sends.duplicate_check(userid, &text, &delivery.delivery_id, from_an_earlier_run);
            self.api.send(userid, self.msg_type(), &text, duplicate_check).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn channel_with(extra: serde_json::Value) -> Wecom {
        let mut table = json!({

            "corp_id": "ww1", "corp_secret": "s3cr3t-value", "agent_id": 1000002, "token": "tok-value",
            "encoding_aes_key": "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C",
        });
        if let (Some(table), Some(extra)) = (table.as_object_mut(), extra.as_object()) {
            table.extend(extra.clone());
        }
        let settings = ChannelSettings {
            id: ChannelId::parse("wecom").unwrap_or_else(|e| panic!("{e}")),
            kind: Wecom::KIND.into(),
            table,
        };
        Wecom::from_settings(&settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn capabilities_follow_the_reply_format() {
        let markdown = channel_with(json!({})).capabilities();
        assert!(markdown.markdown && markdown.passive_reply_window.is_none());
        assert_eq!(markdown.max_part_bytes, 2048);
        let text = channel_with(json!({"reply_format": "text", "max_part_bytes": 600})).capabilities();
        assert!(!text.markdown);
        assert_eq!(text.max_part_bytes, 600);
    }

    #[test]
    fn a_settings_entry_of_another_kind_is_refused() {
        let settings = ChannelSettings {
            id: ChannelId::parse("wecom").unwrap_or_else(|e| panic!("{e}")),
            kind: "feishu".into(),
            table: json!({}),
        };
        assert!(matches!(Wecom::from_settings(&settings, reqwest::Client::new()), Err(ChannelError::Misconfigured(_))));
    }

    #[test]
    fn recipients_that_address_more_than_one_member_are_refused() {
        for userid in ["", "@all", "@ALL", "a|b"] {
            assert!(matches!(check_recipient(userid), Err(ChannelError::Refused { .. })), "{userid:?}");
        }
        assert!(check_recipient("zhangsan").is_ok());
    }

    #[test]
    fn debug_output_hides_the_secrets() {
        let shown = format!("{:?}", channel_with(json!({})));
        for secret in ["s3cr3t-value", "tok-value", "jWmYm7"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }
}
