//! Yizhan's channel for Feishu (飞书) / Lark bots: event subscription over HTTP (v2 events),
//! replies through the IM API, and answers that stream into a CardKit card.
//!
//! # Layout
//! - [`settings`]: [`FeishuSettings`], the channel's config section.
//! - [`crypto`]: decryption of `{"encrypt": …}` bodies and the `X-Lark-Signature` check.
//! - `inbound`: decrypted callback JSON → challenge answer, envelope, or an ignored event.
//! - [`message`] and [`split`]: answer text → text messages or markdown cards that fit Feishu's
//!   size limits; the streaming card; idempotency keys.
//! - `api`: tenant token, replies, CardKit calls, error-code triage.
//!
//! # Design decisions
//! - **Authenticate before reading.** With an Encrypt Key, every event must carry a valid
//!   signature (`sha256(timestamp + nonce + key + body)`, compared in constant time) and a
//!   timestamp inside the replay window; only URL verification, which Feishu does not sign, is
//!   answered without one. The verification token is checked in every mode. Without an Encrypt
//!   Key the token is the only proof of origin, so configuring the key is recommended.
//! - **Dedupe on the message id.** Feishu redelivers one message under new `event_id`s for
//!   hours; [`Envelope::platform_message_id`](yizhan_channel_core::Envelope::platform_message_id) is the `om_…` message id, so the core drops those.
//! - **Groups need a mention.** An envelope from a group has `mentions_self` only when the bot
//!   was @-mentioned (identified by `bot_open_id`, or any mention when that is unset), unless
//!   `require_mention_in_groups` is off. The bot's own `@_user_N` placeholder is removed from the
//!   text; other people's become `@Name`.
//! - **Text for chat, cards for documents.** With streaming on (the default) a model's answer
//!   streams into a CardKit card (below). Parts sent as messages (the parts after a card's, fixed
//!   replies, every answer while streaming is off or paused) go out as `text` when short and
//!   plain, otherwise as a card (JSON 2.0) with one markdown element. Every send carries the delivery
//!   id as Feishu's idempotency `uuid`, so a retried part is shown once.
//! - **Streaming through CardKit**, not message edits: text edits have an undocumented per-message
//!   cap, while a CardKit card takes up to 10 updates a second and types out the new text itself.
//! - **Never exceed the per-chat send rate.** Feishu allows 5 QPS to one user and 5 QPS per group
//!   shared by all bots (PROTOCOLS §4.7). Every call that sends or updates a message in a chat
//!   (reply, streaming-card send, CardKit content and settings updates) first waits on a per-chat
//!   sliding-window limiter (`chat_qps` per second, default 5); nothing is dropped, and since the
//!   core awaits each part, waiting keeps order. Stream handles carry the `chat_id` for this.
//! - **Stay within the app's CardKit budget** (`cardkit_per_minute`, default Feishu's 1000, and
//!   50 a second; counted per channel instance). Card creations and intermediate updates use at
//!   most four fifths of it and are skipped when it is spent (the answer is then sent whole, or
//!   the card catches up at a later update); finishes use the rest, waiting up to 10 s.
//! - **A model cannot @-mention anyone**: `<at …>` tags in answers are defused before sending.
//! - **Error codes are triaged, not passed through**, as in the 公众号 channel: the app's rate
//!   limits (HTTP 429, 99991400) are transient with Feishu's advised delay, a chat's (230020)
//!   transient without one (so that it holds back only that part), oversized content is
//!   refused, missing scopes and bad
//!   credentials are misconfigurations logged once per code.
#![warn(missing_docs)]

mod api;
pub mod crypto;
mod inbound;
pub mod message;
pub mod settings;

pub use settings::FeishuSettings;
/// Splitting is the shared splitter (`yizhan-channel-common`); the code-fence repair on top of
/// it is Feishu's ([`message`]).
pub use yizhan_channel_common::split;

use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing::{debug, info, warn};
use yizhan_channel_common::api::retry_transient;
use yizhan_channel_common::limiter::{RateLimiter, Window};
use yizhan_channel_common::unix_millis;
use yizhan_channel_core::{
    constant_time_eq, BoxFuture, Capabilities, Channel, ChannelError, ChannelId, ChannelSettings, Delivery,
    DeliveryReceipt, Method, Reply, StreamHandle, WebhookOutcome, WebhookRequest, WebhookResponse,
};

/// The channel kind, as written in config (`kind = "feishu"`).
pub const KIND: &str = "feishu";

/// At most 5 updates a second per card are shown smoothly (and CardKit takes at most 10
/// operations a second per card), so the core waits this long between stream updates.
const MIN_STREAM_INTERVAL: Duration = Duration::from_millis(200);
/// Tries at ending a card's streaming mode once it holds the whole answer.
const END_STREAMING_ATTEMPTS: u32 = 3;
/// Tries at sending a streaming card (with one uuid, so at most one card reaches the chat).
const CARD_SEND_ATTEMPTS: u32 = 3;
/// How long answers are sent whole after Feishu refused to create a streaming card.
const STREAMING_PAUSE: Duration = Duration::from_secs(600);

/// The signature headers Feishu adds to events when an Encrypt Key is configured.
const TIMESTAMP_HEADER: &str = "x-lark-request-timestamp";
const NONCE_HEADER: &str = "x-lark-request-nonce";
const SIGNATURE_HEADER: &str = "x-lark-signature";

/// One Feishu app (bot).
pub struct Feishu {
    id: ChannelId,
    /// Validated settings (normalised `api_base`, blank optionals as `None`).
    settings: FeishuSettings,
    api: api::Api,
    /// Whether the "set `bot_open_id`" advice was logged already; once per process is enough.
    bot_identity_advised: AtomicBool,
    /// Whether the doubt about `bot_open_id` was logged (once per run).
    bot_identity_doubted: AtomicBool,
    /// Whether the "subscribe to v2 message events" warning was logged already.
    v1_messages_warned: AtomicBool,
    /// Until when streaming is paused: Feishu refused to create a streaming card as
    /// misconfigured (no CardKit scope, say), so answers are sent whole for
    /// [`STREAMING_PAUSE`] instead of a failed call and a warning per message; then a card is
    /// tried again, so a scope granted in the console needs no restart.
    streaming_paused_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// Sends and updates per chat, `chat_qps` per second: Feishu's per-user and per-group limit.
    chat_limiter: RateLimiter,
    /// Every CardKit call of this channel (the app's, when one process serves it), within
    /// Feishu's per-app limits (`cardkit_per_minute`, and 50 a second).
    cardkit_limiter: RateLimiter,
    /// Card creations and intermediate updates, within four fifths of `cardkit_limiter`'s room:
    /// skipped when it is spent (the answer sent whole, the card catching up later); the rest
    /// is for finishes, which wait for a slot (a bounded time).
    cardkit_update_limiter: RateLimiter,
    /// Finishes waiting for a CardKit slot: while any does, no card is started or updated.
    finishes_waiting: std::sync::atomic::AtomicUsize,
    /// Held while a skippable CardKit call counts its slots (see `take_cardkit_slot`).
    cardkit_decision: std::sync::Mutex<()>,
}

/// The one key of the app-wide CardKit limiters.
const CARDKIT: &str = "cardkit";

/// Counts a finish as waiting for a CardKit slot for as long as it lives.
struct FinishWaiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for FinishWaiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a finish waits at most for a CardKit slot before it fails (the core then sends the
/// answer as messages): waiters are not served in order, and the caller sets no bound.
const FINISH_SLOT_WAIT: Duration = Duration::from_secs(10);

/// Feishu's per-app limit on CardKit calls per second (PROTOCOLS §4.8).
const CARDKIT_PER_SECOND: u32 = 50;

impl Feishu {
    /// The kind, as written in config (same as the crate-level [`KIND`]).
    pub const KIND: &'static str = KIND;

    /// Builds the channel from already-parsed settings, validating them first. `http` is shared
    /// with the rest of the hub so connections are pooled.
    pub fn new(id: ChannelId, settings: FeishuSettings, http: reqwest::Client) -> Result<Self, ChannelError> {
        let settings = settings.validate()?;
        if settings.encrypt_key.is_none() {
            // Without it nothing proves a callback came from Feishu but the verification
            // token, which every callback carries in its body: one leaked body (a proxy's
            // log) lets anyone post events, and have the bot answer into any of its chats.
            warn!(
                channel = %id,
                "No `encrypt_key`: callbacks are not signed, only the verification token in their body is checked; \
                 set an Encrypt Key in the Feishu console (事件与回调 > 加密策略) and the same key here"
            );
        }
        let api = api::Api::new(
            id.clone(),
            http,
            settings.api_base.clone(),
            settings.app_id.clone(),
            settings.app_secret.clone(),
        );
        // NOTE: no slack: unlike WeCom, Feishu answers an excess send with a retryable rate-limit
        // code instead of dropping it, so an occasional early slot costs a retry, not a message.
        let chat_limiter = RateLimiter::new(&[Window::new(settings.chat_qps, Duration::from_secs(1))]);
        let per_minute = settings.cardkit_per_minute;
        let cardkit_limiter = RateLimiter::new(&[
            Window::new(CARDKIT_PER_SECOND, Duration::from_secs(1)),
            Window::new(per_minute, Duration::from_secs(60)),
        ]);
        let cardkit_update_limiter = RateLimiter::new(&[
            Window::new(CARDKIT_PER_SECOND * 4 / 5, Duration::from_secs(1)),
            // At least one slot a minute kept back for finishes (the setting is at least 5).
            Window::new(per_minute - (per_minute / 5).max(1), Duration::from_secs(60)),
        ]);
        Ok(Self {
            id,
            settings,
            api,
            bot_identity_advised: AtomicBool::new(false),
            bot_identity_doubted: AtomicBool::new(false),
            v1_messages_warned: AtomicBool::new(false),
            streaming_paused_until: std::sync::Mutex::new(None),
            chat_limiter,
            cardkit_limiter,
            cardkit_update_limiter,
            finishes_waiting: std::sync::atomic::AtomicUsize::new(0),
            cardkit_decision: std::sync::Mutex::new(()),
        })
    }

    /// Builds the channel from its `[[channels]]` entry; unknown keys (the core's) are ignored.
    pub fn from_settings(settings: &ChannelSettings, http: reqwest::Client) -> Result<Feishu, ChannelError> {
        if settings.kind != Self::KIND {
            return Err(ChannelError::Misconfigured(format!(
                "channel {:?} has kind {:?}, not {:?}",
                settings.id.as_str(),
                settings.kind,
                Self::KIND
            )));
        }
        let parsed: FeishuSettings = settings.parse()?;
        Self::new(settings.id.clone(), parsed, http)
    }

    /// The validated settings.
    pub fn settings(&self) -> &FeishuSettings {
        &self.settings
    }

    /// The constant-time verification-token check every callback passes.
    fn check_token(&self, token: Option<&str>) -> Result<(), ChannelError> {
        let given = token.unwrap_or_default();
        if given.is_empty() || !constant_time_eq(given.as_bytes(), self.settings.verification_token.as_bytes()) {
            return Err(ChannelError::BadSignature("verification token missing or wrong".into()));
        }
        Ok(())
    }

    /// Checks an event's signature headers against `encrypt_key`: all three present, the
    /// timestamp inside the replay window, the signature right.
    fn check_signature(&self, request: &WebhookRequest, encrypt_key: &str) -> Result<(), ChannelError> {
        let header = |name: &str| {
            request.header(name).ok_or_else(|| ChannelError::BadSignature(format!("event without the `{name}` header")))
        };
        let (timestamp, nonce, signature) =
            (header(TIMESTAMP_HEADER)?, header(NONCE_HEADER)?, header(SIGNATURE_HEADER)?);
        if !crypto::signature_matches(signature, timestamp, nonce, encrypt_key, &request.body) {
            return Err(ChannelError::BadSignature("X-Lark-Signature does not match".into()));
        }
        request.check_timestamp(timestamp, self.settings.replay_window())
    }

    /// The callback as plain JSON: decrypted when it is `{"encrypt": …}`.
    fn plaintext(&self, body: Value) -> Result<Value, ChannelError> {
        let Some(encrypted) = body.get("encrypt") else { return Ok(body) };
        let key = self.settings.encrypt_key.as_deref().ok_or_else(|| {
            ChannelError::BadSignature("the callback is encrypted but no `encrypt_key` is configured".into())
        })?;
        let encrypted =
            encrypted.as_str().ok_or_else(|| ChannelError::Malformed("`encrypt` is not a string".into()))?;
        // A payload that does not decrypt was not made with our key: not from Feishu (for us).
        let plain = crypto::decrypt(key, encrypted).map_err(|error| ChannelError::BadSignature(error.to_string()))?;
        inbound::parse_object(plain.as_bytes(), "the decrypted callback")
    }

    /// With an Encrypt Key in the console Feishu encrypts every callback, URL verification
    /// included: one that comes in plain text, bearing our token, says the console has none,
    /// and every event would then come unsigned and be refused. Failing the console's check, with
    /// what to do, beats passing it and refusing every message after.
    fn plaintext_challenge_problem(&self, body: &Value) -> Option<ChannelError> {
        let callback = inbound::Callback::parse(body).ok()?;
        self.challenge_answer(&callback)?.ok()?;
        Some(ChannelError::Misconfigured(
            "a URL verification came unencrypted while `encrypt_key` is set: the Feishu console has no \
             Encrypt Key (事件与回调 > 加密策略); set the same key there, or remove `encrypt_key`"
                .into(),
        ))
    }

    /// The answer to `body` if it is a URL verification bearing our token, else `None`,
    /// whatever was wrong with it (see `handle_webhook`).
    fn url_verification(&self, body: Value) -> Option<WebhookOutcome> {
        let callback = inbound::Callback::parse(&self.plaintext(body).ok()?).ok()?;
        self.challenge_answer(&callback)?.ok()
    }

    /// For a URL verification, its answer (the challenge) once its token checks out; `None`
    /// for any other callback.
    fn challenge_answer(&self, callback: &inbound::Callback) -> Option<Result<WebhookOutcome, ChannelError>> {
        let inbound::Callback::UrlVerification { challenge, .. } = callback else { return None };
        Some(
            self.check_token(callback.token())
                .map(|()| WebhookOutcome::Respond(WebhookResponse::json(json!({"challenge": challenge}).to_string()))),
        )
    }

    /// A message event, authenticated: one envelope, acknowledged with `{}`.
    fn accept_message(
        &self,
        request: &WebhookRequest,
        event_id: &str,
        event: &Value,
    ) -> Result<WebhookOutcome, ChannelError> {
        let context = inbound::Context {
            channel: &self.id,
            kind: Self::KIND,
            received_at_ms: unix_millis(request.received_at),
            bot_open_id: self.settings.bot_open_id.as_deref(),
            require_mention_in_groups: self.settings.require_mention_in_groups,
        };
        let parsed = inbound::message_envelope(&context, event_id, event)?;
        if parsed.assumed_self_mention && !self.bot_identity_advised.swap(true, Ordering::Relaxed) {
            info!(
                channel = %self.id,
                "Treating any @-mention in a group as addressing the bot (the first as the bot's); set `bot_open_id` to tell mentions apart."
            );
        }
        if parsed.bot_not_among_mentions && !self.bot_identity_doubted.swap(true, Ordering::Relaxed) {
            warn!(
                channel = %self.id,
                "A group message @-mentions people, none of them `bot_open_id`: it is not answered. If the bot was mentioned, \
                 `bot_open_id` is wrong (open_ids differ per app: take the bot's own from this app's events, or from \
                 /open-apis/bot/v3/info with this app's token). Logged once."
            );
        }
        let envelope = parsed.envelope;
        debug!(
            channel = %self.id,
            message_id = %envelope.platform_message_id,
            event_id,
            mentions_self = envelope.mentions_self,
            "Message accepted."
        );
        Ok(WebhookOutcome::Accepted { envelopes: vec![envelope], ack: WebhookResponse::json("{}") })
    }

    /// Waits until the chat behind `key` may get another message or update (see the crate
    /// docs), logging a wait.
    async fn wait_for_chat(&self, key: &str) {
        let waited = self.chat_limiter.acquire(key).await;
        if !waited.is_zero() {
            debug!(
                channel = %self.id,
                chat = %key,
                waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                "Send waited for Feishu's per-chat rate limit."
            );
        }
    }

    /// Sends one message part with the delivery's idempotency key.
    async fn send_part(&self, delivery: &Delivery) -> Result<DeliveryReceipt, ChannelError> {
        let target = ReplyTarget::from_handle(&delivery.reply_handle.0)?;
        let body = message::message_body(&delivery.reply.text);
        let uuid = message::idempotency_key(&delivery.delivery_id);
        self.wait_for_chat(target.limit_key()).await;
        let platform_message_id =
            self.api.send(target.as_api(&delivery.conversation.kind), body.msg_type, &body.content, &uuid).await?;
        Ok(DeliveryReceipt { platform_message_id })
    }

    /// Whether streaming is paused after a refused card (see `streaming_paused_until`).
    fn streaming_paused(&self) -> bool {
        let until = self.streaming_paused_until.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        until.is_some_and(|until| std::time::Instant::now() < until)
    }

    fn pause_streaming(&self, error: &ChannelError) {
        let mut until = self.streaming_paused_until.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *until = Some(std::time::Instant::now() + STREAMING_PAUSE);
        warn!(channel = %self.id, %error, pause_secs = STREAMING_PAUSE.as_secs(),
            "Feishu refused a streaming card; answers are sent whole for a while (grant the app \
             cardkit:card:write, or set streaming = false).");
    }

    async fn start_stream(&self, target: &Delivery) -> Result<StreamHandle, ChannelError> {
        let reply_target = ReplyTarget::from_handle(&target.reply_handle.0)?;
        // A card only when the app's CardKit budget has room for it now, within the share updates
        // may use (what is left is the finishes'): otherwise the answer is sent whole at once
        // rather than waiting here before the model is even asked.
        if !self.take_cardkit_slot() {
            // `Unsupported`, as for streaming turned off: no streamed answer now, nothing failed.
            return Err(ChannelError::Unsupported(
                "the app's CardKit budget is spent for now; sending the answer whole".into(),
            ));
        }
        // NOTE: one CardKit slot for create + send. Creating the card entity puts nothing in the
        // chat, so it takes no slot of the chat's rate; each send try below does.
        let card_id = match self.api.create_card(&message::streaming_card(&target.reply.text)).await {
            Ok(card_id) => card_id,
            Err(error @ ChannelError::Misconfigured(_)) => {
                // Only a refused card pauses streaming: a refused send fails the whole answer
                // anyway, and says nothing about CardKit.
                self.pause_streaming(&error);
                return Err(error);
            }
            Err(error) => return Err(error),
        };
        let content = json!({"type": "card", "data": {"card_id": card_id}}).to_string();
        // NOTE: bound to the card as well as the delivery. If the core falls back to `deliver`
        // for this delivery, its uuid must differ from this one (or Feishu would answer with this
        // card message instead of sending the text); and a retried `begin_stream` makes a new
        // card, which must be sent rather than deduplicated into the old card's message.
        let uuid = message::idempotency_key(&format!("stream:{}:{card_id}", target.delivery_id));
        // Retried with the same uuid, which Feishu dedupes: a send whose answer was lost must
        // not leave an empty card in the chat beside the answer sent whole.
        // Each try waits for the chat's rate (5 a second, shared by every bot in a group): a
        // retry after 230020 would otherwise go out into the same limit.
        let sent = retry_transient(&self.id, "Sending a streaming card", CARD_SEND_ATTEMPTS, |_| async {
            self.wait_for_chat(reply_target.limit_key()).await;
            self.api.send(reply_target.as_api(&target.conversation.kind), "interactive", &content, &uuid).await
        })
        .await;
        let message_id = match sent {
            Ok(message_id) => message_id,
            Err(error) => {
                // A send that timed out may still have reached the chat: its card must not stay
                // there in streaming mode, above the answer the core now sends whole (best effort;
                // ending a card never sent changes nothing anyone sees). Not after a refusal,
                // which says the card is not there.
                if error.is_retryable() && self.take_cardkit_slot() {
                    self.wait_for_chat(reply_target.limit_key()).await;
                    if let Err(ended) = self.api.end_streaming(&card_id, 1).await {
                        debug!(channel = %self.id, %card_id, error = %ended, "Could not end the streaming mode of a card whose send failed.");
                    }
                }
                return Err(error);
            }
        };
        debug!(channel = %self.id, %card_id, "Streaming card sent.");
        Ok(StreamHandle(json!({
            "card_id": card_id,
            "element_id": message::STREAM_ELEMENT_ID,
            "message_id": message_id,
            "chat_id": reply_target.chat_id,
        })))
    }

    /// Counts a CardKit call that may be skipped, if both the share for creations and updates
    /// (four fifths) and the app's whole budget have room now, and no finish is waiting for a
    /// slot; counts nothing otherwise (a slot of one counted while the other refuses would be
    /// spent on nothing).
    fn take_cardkit_slot(&self) -> bool {
        // Finishes first: a card started is worth more than one more card or update.
        if self.finishes_waiting.load(Ordering::SeqCst) > 0 {
            return false;
        }
        // The share is only ever counted here, under this lock: once it has room, its
        // `try_acquire` cannot fail, so a refusal of the whole budget leaves nothing counted.
        let _deciding = self.cardkit_decision.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.cardkit_update_limiter.next_room(CARDKIT).is_none()
            && self.cardkit_limiter.try_acquire(CARDKIT)
            && self.cardkit_update_limiter.try_acquire(CARDKIT)
    }

    /// Waits (at most [`FINISH_SLOT_WAIT`]) for a CardKit slot for a finish, which may use the
    /// whole budget.
    async fn finish_slot(&self) -> Result<(), ChannelError> {
        if self.cardkit_limiter.try_acquire(CARDKIT) {
            return Ok(());
        }
        self.finishes_waiting.fetch_add(1, Ordering::SeqCst);
        let _counted = FinishWaiting(&self.finishes_waiting);
        match tokio::time::timeout(FINISH_SLOT_WAIT, self.cardkit_limiter.acquire(CARDKIT)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(ChannelError::Transient {
                reason: "no room in the app's CardKit budget to finish a card".into(),
                retry_after: None,
            }),
        }
    }

    /// Writes `text` into the card: an intermediate update (`last: false`) is skipped when the
    /// app's CardKit budget for updates is spent (the card catches up at the next one); the
    /// final text waits for room.
    async fn stream_text(
        &self,
        handle: &StreamHandle,
        text: &str,
        sequence: u64,
        last: bool,
    ) -> Result<(), ChannelError> {
        if text.trim().is_empty() {
            return Ok(());
        }
        let stream = StreamTarget::from_handle(handle)?;
        let uuid = message::idempotency_key(&format!("{}:{}:{sequence}", stream.card_id, stream.element_id));
        let (text, full) = message::stream_content_and_whether_full(text, self.settings.max_part_bytes);
        if last {
            self.finish_slot().await?;
        } else if !self.take_cardkit_slot() {
            // Not `Ok`: the core must not take the card as showing this text. It sends the
            // text so far after the pause, at the answer's next change (or the finish).
            let free_at = self.cardkit_update_limiter.next_room(CARDKIT).max(self.cardkit_limiter.next_room(CARDKIT));
            let free_in =
                free_at.map_or(Duration::ZERO, |at| at.saturating_duration_since(tokio::time::Instant::now()));
            return Err(ChannelError::Transient {
                reason: "streaming update skipped: the app's CardKit budget is spent for now".into(),
                retry_after: Some(free_in.max(Duration::from_millis(200))),
            });
        }
        self.wait_for_chat(stream.limit_key()).await;
        self.api.set_element_content(stream.card_id, stream.element_id, &text, sequence, &uuid).await?;
        if full && !last {
            // Written; every later update would write the same, spending the chat's and the
            // app's rates for nothing: the core stops updating on a refusal.
            return Err(ChannelError::Unsupported(
                "the card holds all it can; no more updates until the finish".into(),
            ));
        }
        Ok(())
    }

    /// Replaces the streamed card whole with its final text (see `end_stream`).
    async fn replace_with_final(
        &self,
        stream: &StreamTarget<'_>,
        text: &str,
        sequence: u64,
    ) -> Result<(), ChannelError> {
        let text = message::stream_content(text, self.settings.max_part_bytes);
        let uuid = message::idempotency_key(&format!("{}:whole:{sequence}", stream.card_id));
        self.finish_slot().await?;
        self.wait_for_chat(stream.limit_key()).await;
        self.api.replace_card(stream.card_id, &message::final_card(&text), sequence, &uuid).await
    }

    async fn end_stream(
        &self,
        handle: &StreamHandle,
        full_text: &str,
        sequence: u64,
    ) -> Result<DeliveryReceipt, ChannelError> {
        let stream = StreamTarget::from_handle(handle)?;
        if let Err(error) = self.stream_text(handle, full_text, sequence, true).await {
            if !matches!(error, ChannelError::Refused { .. }) || full_text.trim().is_empty() {
                return Err(error);
            }
            // Refused for good: most likely streaming mode is closed (Feishu closes it after a
            // while; an earlier run's finish may have; a card resumed after a restart is both).
            // The content API needs streaming mode, replacing the whole card does not; it ends
            // as a final card, so there is no streaming mode left to end either.
            let replaced = self.replace_with_final(&stream, full_text, sequence.saturating_add(1)).await;
            return match replaced {
                Ok(()) => Ok(DeliveryReceipt { platform_message_id: stream.message_id.map(str::to_owned) }),
                // Worth another try (a rate limit, the CardKit budget): the caller retries, and
                // waits as asked before its note.
                Err(replace_error) if replace_error.is_retryable() => Err(replace_error),
                Err(replace_error) => {
                    warn!(channel = %self.id, card_id = stream.card_id, error = %replace_error,
                        "Could not replace a card whose content was refused either.");
                    Err(error)
                }
            };
        }
        // From here the card shows the whole answer. Failing to end streaming must not fail the
        // finish: the core would then send the answer again and the user read it twice. At
        // worst the card stays in streaming mode until Feishu closes it by itself.
        let stream = &stream;
        let ended = retry_transient(&self.id, "Ending a card's streaming mode", END_STREAMING_ATTEMPTS, |attempt| {
            // A higher sequence each time: the platform may have applied the failed one.
            let sequence = sequence.saturating_add(u64::from(attempt));
            async move {
                self.finish_slot().await?;
                self.wait_for_chat(stream.limit_key()).await;
                self.api.end_streaming(stream.card_id, sequence).await
            }
        })
        .await;
        if let Err(error) = ended {
            warn!(channel = %self.id, card_id = stream.card_id, %error,
                "Could not end a card's streaming mode; it holds the whole answer, which is not sent again.");
        }
        Ok(DeliveryReceipt { platform_message_id: stream.message_id.map(str::to_owned) })
    }
}

/// The parts of a reply handle a send needs.
struct ReplyTarget<'a> {
    message_id: Option<&'a str>,
    chat_id: Option<&'a str>,
}

impl<'a> ReplyTarget<'a> {
    fn from_handle(handle: &'a Value) -> Result<Self, ChannelError> {
        let field = |key: &str| handle.get(key).and_then(Value::as_str).filter(|value| !value.is_empty());
        let target = Self { message_id: field("message_id"), chat_id: field("chat_id") };
        if target.message_id.is_none() && target.chat_id.is_none() {
            return Err(ChannelError::Malformed(
                "the reply handle names neither a message nor a chat; it is not from this channel".into(),
            ));
        }
        Ok(target)
    }

    /// The API's target for a delivery into a conversation of `kind`.
    fn as_api(&self, kind: &yizhan_channel_core::ConversationKind) -> api::Target<'a> {
        let into_chat_if_recalled = matches!(kind, yizhan_channel_core::ConversationKind::Direct);
        api::Target { message_id: self.message_id, chat_id: self.chat_id, into_chat_if_recalled }
    }

    /// The per-chat limiter's key: the chat, or (for a handle without one) the message replied
    /// to, which stands for its chat.
    fn limit_key(&self) -> &'a str {
        self.chat_id.or(self.message_id).unwrap_or_default()
    }
}

/// The parts of a [`StreamHandle`] made by `begin_stream`.
struct StreamTarget<'a> {
    card_id: &'a str,
    element_id: &'a str,
    message_id: Option<&'a str>,
    /// The chat the card was sent to; absent in handles made before it was recorded.
    chat_id: Option<&'a str>,
}

impl<'a> StreamTarget<'a> {
    fn from_handle(handle: &'a StreamHandle) -> Result<Self, ChannelError> {
        let field = |key: &str| handle.0.get(key).and_then(Value::as_str).filter(|value| !value.is_empty());
        let card_id = field("card_id").ok_or_else(|| {
            ChannelError::Malformed("the stream handle has no card_id; it is not from this channel".into())
        })?;
        Ok(Self {
            card_id,
            element_id: field("element_id").unwrap_or(message::STREAM_ELEMENT_ID),
            message_id: field("message_id"),
            chat_id: field("chat_id"),
        })
    }

    /// The per-chat limiter's key: the chat, or the card for a handle without one.
    fn limit_key(&self) -> &'a str {
        self.chat_id.unwrap_or(self.card_id)
    }
}

impl std::fmt::Debug for Feishu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feishu").field("id", &self.id).field("settings", &self.settings).finish()
    }
}

impl Channel for Feishu {
    fn id(&self) -> &ChannelId {
        &self.id
    }

    fn kind(&self) -> &str {
        Self::KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            passive_reply_window: None,
            markdown: true,
            max_part_bytes: self.settings.max_part_bytes,
            streaming: self.settings.streaming && !self.streaming_paused(),
            min_stream_interval: MIN_STREAM_INTERVAL,
        }
    }

    /// POST only. URL verification is answered with its challenge once its token checks out;
    /// `im.message.receive_v1` becomes one envelope acknowledged with `{}`; other events are
    /// answered `{}` and dispatch nothing. With an Encrypt Key, events must be signed.
    fn handle_webhook(&self, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
        if request.method != Method::Post {
            return Err(ChannelError::Unsupported("Feishu calls the webhook with POST only".into()));
        }
        let body = inbound::parse_object(&request.body, "the body")?;
        // With an Encrypt Key the signature is checked before anything is decrypted. Only URL
        // verification comes unsigned ("不包括请求网址校验"), so a callback without a valid
        // signature is read as one, and every way it can fail (no decryption, no JSON, not a
        // URL verification, wrong token) is the same refusal: were a padding error told apart
        // from a plaintext that is not JSON, a stranger could decrypt captured callbacks
        // through us, a block at a time (a CBC padding oracle).
        let signature = self.settings.encrypt_key.as_deref().map(|key| self.check_signature(request, key));
        if let Some(Err(refused)) = signature {
            if body.get("encrypt").is_none() {
                return Err(self.plaintext_challenge_problem(&body).unwrap_or(refused));
            }
            return match self.url_verification(body) {
                Some(answer) => Ok(answer),
                None => Err(refused),
            };
        }
        let callback = inbound::Callback::parse(&self.plaintext(body)?)?;
        // Without an Encrypt Key nothing is signed: the token is the proof.
        if let Some(answer) = self.challenge_answer(&callback) {
            return answer;
        }
        self.check_token(callback.token())?;
        match &callback {
            inbound::Callback::EventV2 { event_type, event_id, event, .. }
                if event_type == inbound::MESSAGE_RECEIVED =>
            {
                self.accept_message(request, event_id, event)
            }
            inbound::Callback::EventV2 { event_type, .. } => {
                debug!(channel = %self.id, event_type = %event_type, "Event ignored.");
                Ok(WebhookOutcome::Respond(WebhookResponse::json("{}")))
            }
            inbound::Callback::Other { name, .. } => {
                if name == "message" && !self.v1_messages_warned.swap(true, Ordering::Relaxed) {
                    // Acknowledged all the same (Feishu would only retry it), but the operator
                    // must learn that users are going unanswered.
                    warn!(
                        channel = %self.id,
                        "Feishu sent a schema 1.0 message event, which Yizhan does not answer: subscribe \
                         the app to the v2.0 event im.message.receive_v1 (事件订阅 → 接收消息) instead."
                    );
                }
                debug!(channel = %self.id, name = %name, "Callback ignored (not a v2 event).");
                Ok(WebhookOutcome::Respond(WebhookResponse::json("{}")))
            }
            inbound::Callback::UrlVerification { .. } => Ok(WebhookOutcome::Respond(WebhookResponse::json("{}"))),
        }
    }

    /// Splits at paragraph, line and sentence breaks into parts of at most `max_part_bytes`,
    /// keeping code fences balanced and every part's card under Feishu's 30 KB. Markdown stays
    /// markdown: cards render it.
    fn render(&self, reply: &Reply) -> Vec<Reply> {
        message::render_parts(&reply.text, self.settings.max_part_bytes).into_iter().map(Reply::text).collect()
    }

    /// Replies to the user's message with one part: a text message or a markdown card.
    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
        Box::pin(async move {
            if delivery.reply.text.trim().is_empty() {
                debug!(channel = %self.id, delivery = %delivery.delivery_id, "Empty part skipped.");
                return Ok(DeliveryReceipt::default());
            }
            self.send_part(delivery).await
        })
    }

    /// Creates a CardKit streaming card and replies with it. The handle is
    /// `{"card_id", "element_id", "message_id", "chat_id"}` (the chat keys the per-chat rate limit).
    fn begin_stream<'a>(&'a self, target: &'a Delivery) -> BoxFuture<'a, Result<StreamHandle, ChannelError>> {
        Box::pin(async move {
            if !self.settings.streaming || self.streaming_paused() {
                return Err(ChannelError::Unsupported("streaming is off for this channel".into()));
            }
            self.start_stream(target).await
        })
    }

    /// Writes the text so far into the card (a blank text is skipped; the sequence gap is fine).
    fn update_stream<'a>(
        &'a self,
        handle: &'a StreamHandle,
        text_so_far: &'a str,
        sequence: u64,
    ) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(self.stream_text(handle, text_so_far, sequence, false))
    }

    /// Writes the full text with `sequence`, then ends streaming mode with `sequence + 1`; if the
    /// card no longer takes text (streaming mode closed), replaces it whole with a final card
    /// holding the text, with `sequence + 1`.
    fn finish_stream<'a>(
        &'a self,
        handle: &'a StreamHandle,
        full_text: &'a str,
        sequence: u64,
    ) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
        Box::pin(self.end_stream(handle, full_text, sequence))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::SystemTime;

    fn channel(extra: Value) -> Feishu {
        let mut table = json!({

            "app_id": "cli_1", "app_secret": "secret", "verification_token": "vtoken",
            "api_base": "http://127.0.0.1:9",
        });
        if let (Some(table), Some(extra)) = (table.as_object_mut(), extra.as_object()) {
            table.extend(extra.clone());
        }
        let settings =
            ChannelSettings { id: ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}")), kind: KIND.into(), table };
        Feishu::from_settings(&settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn post(body: &str) -> WebhookRequest {
        WebhookRequest {
            method: Method::Post,
            query: vec![],
            raw_query: String::new(),
            headers: vec![],
            body: Bytes::from(body.to_owned()),
            received_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    #[test]
    fn capabilities_follow_the_settings() {
        let capabilities = channel(json!({})).capabilities();
        assert_eq!(capabilities.passive_reply_window, None);
        assert!(capabilities.markdown && capabilities.streaming);
        assert_eq!(capabilities.max_part_bytes, 30_000);
        assert_eq!(capabilities.min_stream_interval, Duration::from_millis(200));
        let quiet = channel(json!({"streaming": false, "max_part_bytes": 4000})).capabilities();
        assert!(!quiet.streaming);
        assert_eq!(quiet.max_part_bytes, 4000);
    }

    #[test]
    fn get_requests_are_unsupported() {
        let mut request = post("{}");
        request.method = Method::Get;
        assert!(matches!(channel(json!({})).handle_webhook(&request), Err(ChannelError::Unsupported(_))));
    }

    #[test]
    fn a_settings_entry_of_another_kind_is_refused() {
        let settings = ChannelSettings {
            id: ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}")),
            kind: "wechat_mp".into(),
            table: json!({"app_id": "a", "app_secret": "s", "verification_token": "t"}),
        };
        assert!(matches!(
            Feishu::from_settings(&settings, reqwest::Client::new()),
            Err(ChannelError::Misconfigured(_))
        ));
    }

    #[test]
    fn an_encrypted_body_without_a_configured_key_is_refused() {
        let outcome =
            channel(json!({})).handle_webhook(&post(r#"{"encrypt":"P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk="}"#));
        assert!(matches!(outcome, Err(ChannelError::BadSignature(_))), "{outcome:?}");
    }

    #[test]
    fn an_encrypted_body_that_does_not_decrypt_with_our_key_is_refused() {
        let outcome = channel(json!({"encrypt_key": "test key2"}))
            .handle_webhook(&post(r#"{"encrypt":"P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk="}"#));
        assert!(matches!(outcome, Err(ChannelError::BadSignature(_))), "{outcome:?}");
        // Decrypts fine ("hello world") but is not JSON: unsigned, that is refused the same way
        // (see `unsigned_encrypted_bodies_are_refused_alike_whatever_they_decrypt_to`).
        let outcome = channel(json!({"encrypt_key": "test key"}))
            .handle_webhook(&post(r#"{"encrypt":"P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk="}"#));
        assert!(matches!(outcome, Err(ChannelError::BadSignature(_))), "{outcome:?}");
    }

    #[test]
    fn stream_handles_and_reply_handles_from_elsewhere_are_malformed() {
        assert!(StreamTarget::from_handle(&StreamHandle(json!({"x": 1}))).is_err());
        assert!(ReplyTarget::from_handle(&json!({"message_id": ""})).is_err());
        let handle = StreamHandle(json!({"card_id": "c1"}));
        let stream = StreamTarget::from_handle(&handle).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stream.element_id, message::STREAM_ELEMENT_ID);
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
    fn random_bodies_never_panic_the_webhook() {
        let fragments = [
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"",
            "\"schema\"",
            "\"2.0\"",
            "\"header\"",
            "\"token\"",
            "\"vtoken\"",
            "\"event\"",
            "\"message\"",
            "\"content\"",
            "\"{\\\"text\\\":1}\"",
            "\"type\"",
            "\"url_verification\"",
            "\"challenge\"",
            "\"event_type\"",
            "\"im.message.receive_v1\"",
            "\"mentions\"",
            "\"key\"",
            "\"@_user_1\"",
            "null",
            "1",
            "\"chat_type\"",
            "\"p2p\"",
            "\"encrypt\"",
            "\"AAAA\"",
            "好",
            "\\u0000",
        ];
        let plain = channel(json!({}));
        let encrypted = channel(json!({"encrypt_key": "k"}));
        let mut rng = Lcg(11);
        for _ in 0..3000 {
            let len = rng.next(40);
            let body: String = (0..len).map(|_| fragments[rng.next(fragments.len())]).collect();
            let _ = plain.handle_webhook(&post(&body));
            let _ = encrypted.handle_webhook(&post(&body));
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
            "```rust",
            "~~~",
            "#",
            "## ",
            "- ",
            "1. ",
            "> ",
            "[",
            "]",
            "(",
            ")",
            "<at id=all>",
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
            "\"",
            "\t",
            "---",
        ];
        let mut rng = Lcg(7);
        for limit in [64, 100, 2048] {
            let channel = channel(json!({"max_part_bytes": limit}));
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
}
