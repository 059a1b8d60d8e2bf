//! The `feishu` section of the config file, parsed and checked once at startup.
//!
//! Invariant: a [`FeishuSettings`] that passed [`validate`](FeishuSettings::validate) has a
//! non-empty app id, app secret and verification token, an `http(s)` API base without a trailing
//! slash, optional values that are either `None` or non-blank, and a part limit between
//! [`MIN_PART_BYTES`] and [`MAX_PART_BYTES`].

use serde::Deserialize;
use std::fmt;
use std::time::Duration;
use yizhan_channel_core::ChannelError;

/// The smallest `max_part_bytes` accepted: below this a part could not hold a sentence (and the
/// code-fence repair in rendering needs some room of its own).
pub const MIN_PART_BYTES: usize = 64;

/// The largest `max_part_bytes` accepted. Feishu takes text messages up to 150 KB, but JSON
/// escaping of newlines and quotes can nearly double a text's size in the request, so parts are
/// kept well below that.
pub const MAX_PART_BYTES: usize = 100_000;

/// One Feishu (飞书) bot's settings.
///
/// Unknown keys are refused, so that a misspelt key is reported instead of silently leaving a
/// setting at its default (the core takes its own keys out of the table first).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeishuSettings {
    /// The app's App ID (`cli_…`), from 开发者后台 → 凭证与基础信息; needed for the tenant token.
    pub app_id: String,
    /// The App Secret. Secret: never logged, never put in an error.
    pub app_secret: String,
    /// The Verification Token from 事件与回调 → 加密策略. Without an Encrypt Key it is the only
    /// proof that a webhook call comes from Feishu. Secret.
    pub verification_token: String,
    /// The Encrypt Key from 事件与回调 → 加密策略. When set, Feishu encrypts every callback and
    /// signs every event, and this channel refuses events that are not signed. Secret.
    #[serde(default)]
    pub encrypt_key: Option<String>,
    /// Where the Feishu API lives (`https://open.larksuite.com` for Lark); configurable so tests
    /// and proxies can stand in for it.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// How far (seconds) a signed event's `X-Lark-Request-Timestamp` may be from our clock before
    /// the call is refused as a replay. 0 disables the check, for hosts whose clock cannot be
    /// trusted. Only signed (Encrypt Key) events carry a timestamp. The default, 7.5 h, covers
    /// Feishu's retries (15 s, 5 min, 1 h, 6 h) in case a retry keeps its first timestamp;
    /// replays inside it are already caught by the dedupe window (24 h by default).
    #[serde(default = "default_replay_window_secs")]
    pub replay_window_secs: u64,
    /// Show answers while they are written, in a CardKit streaming card (needs the
    /// `cardkit:card:write` scope and Feishu ≥ 7.20 on the reader's side).
    #[serde(default = "default_true")]
    pub streaming: bool,
    /// In group chats, answer only messages that @-mention the bot. Turning this off needs the
    /// "获取群组中所有消息" scope, or Feishu never sends the other messages anyway.
    #[serde(default = "default_true")]
    pub require_mention_in_groups: bool,
    /// The largest answer part sent in one message, in UTF-8 bytes. Feishu refuses cards and rich
    /// text over 30 KB (code 230025); rendering also shrinks a part whose card would not fit.
    #[serde(default = "default_max_part_bytes")]
    pub max_part_bytes: usize,
    /// The bot's own `open_id` (`ou_…`), so an @-mention of the bot can be told from an
    /// @-mention of someone else. When unset, any @-mention in a group counts as addressing the
    /// bot: Feishu only pushes group messages that mention the bot unless the app has the
    /// "all group messages" scope.
    #[serde(default)]
    pub bot_open_id: Option<String>,
    /// Messages sent or updated per second in one chat (replies, card sends, CardKit updates).
    /// Feishu allows 5 QPS to one user and 5 QPS per group **shared by all bots** in it
    /// (PROTOCOLS §4.7), so lower this when other bots share your groups. Sends beyond it wait;
    /// nothing is dropped.
    #[serde(default = "default_chat_qps")]
    pub chat_qps: u32,
    /// CardKit calls (card creations, content updates, streaming mode ends) per minute, counted
    /// per channel: Feishu allows 1000 per app (and 50 a second, PROTOCOLS §4.8), which a few
    /// answers streamed at once would pass. New cards and intermediate updates use at most four
    /// fifths of it, and none while a finish waits for a slot; beyond that they are skipped
    /// (the answer goes whole, or the card catches up later). A finish waits for a slot at most
    /// 10 s. At least 5.
    #[serde(default = "default_cardkit_per_minute")]
    pub cardkit_per_minute: u32,
}

fn default_api_base() -> String {
    "https://open.feishu.cn".to_owned()
}

fn default_replay_window_secs() -> u64 {
    27_000
}

fn default_true() -> bool {
    true
}

fn default_max_part_bytes() -> usize {
    30_000
}

fn default_chat_qps() -> u32 {
    5
}

fn default_cardkit_per_minute() -> u32 {
    1_000
}

// NOTE: hand-written so that the secret, the verification token and the encrypt key can never
// reach a log line through `{:?}`.
impl fmt::Debug for FeishuSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeishuSettings")
            .field("app_id", &self.app_id)
            .field("app_secret", &"<redacted>")
            .field("verification_token", &"<redacted>")
            .field("encrypt_key", &self.encrypt_key.as_ref().map(|_| "<redacted>"))
            .field("api_base", &self.api_base)
            .field("replay_window_secs", &self.replay_window_secs)
            .field("streaming", &self.streaming)
            .field("require_mention_in_groups", &self.require_mention_in_groups)
            .field("max_part_bytes", &self.max_part_bytes)
            .field("bot_open_id", &self.bot_open_id)
            .field("chat_qps", &self.chat_qps)
            .field("cardkit_per_minute", &self.cardkit_per_minute)
            .finish()
    }
}

fn misconfigured(message: String) -> ChannelError {
    ChannelError::Misconfigured(format!("feishu: {message}"))
}

impl FeishuSettings {
    /// Checks the settings and normalises them: `api_base` loses whitespace and trailing
    /// slashes, blank optional values become `None`. Errors name the offending key, never its
    /// value when the value is a secret.
    pub fn validate(mut self) -> Result<Self, ChannelError> {
        for (key, value) in [
            ("app_id", &self.app_id),
            ("app_secret", &self.app_secret),
            ("verification_token", &self.verification_token),
        ] {
            if value.trim().is_empty() {
                return Err(misconfigured(format!(
                    "`{key}` is empty; copy it from the Feishu developer console (开发者后台)"
                )));
            }
        }
        for (key, value) in [
            ("app_id", Some(&self.app_id)),
            ("app_secret", Some(&self.app_secret)),
            ("verification_token", Some(&self.verification_token)),
            ("encrypt_key", self.encrypt_key.as_ref()),
        ] {
            if value.is_some_and(|value| value != value.trim()) {
                return Err(misconfigured(format!("`{key}` has leading or trailing whitespace; it would never match")));
            }
        }
        self.encrypt_key = self.encrypt_key.filter(|key| !key.is_empty());
        self.bot_open_id = self.bot_open_id.map(|id| id.trim().to_owned()).filter(|id| !id.is_empty());
        if let Some(id) = self.bot_open_id.as_deref().filter(|id| !id.starts_with("ou_")) {
            // An App ID (`cli_…`) or a user_id never matches a mention: every group message
            // would be ignored, silently.
            return Err(misconfigured(format!(
                "`bot_open_id` {id:?} is not an open_id (those start with `ou_`; the App ID starts with `cli_`)"
            )));
        }
        self.api_base = yizhan_channel_common::api::platform_api_base(&self.api_base)
            .map_err(|problem| misconfigured(format!("`api_base` {problem}")))?;
        if !(MIN_PART_BYTES..=MAX_PART_BYTES).contains(&self.max_part_bytes) {
            return Err(misconfigured(format!(
                "`max_part_bytes` is {}, outside {MIN_PART_BYTES}..={MAX_PART_BYTES}",
                self.max_part_bytes
            )));
        }
        if self.chat_qps == 0 {
            return Err(misconfigured(
                "`chat_qps` is 0; nothing could ever be sent (Feishu allows 5 per second per chat)".to_owned(),
            ));
        }
        if self.cardkit_per_minute < 5 {
            return Err(misconfigured(format!(
                "`cardkit_per_minute` is {}; at least 5 are needed to stream a card and finish it (Feishu allows \
                 1000 per minute)",
                self.cardkit_per_minute
            )));
        }
        Ok(self)
    }

    /// The replay window as a duration (zero: disabled).
    pub fn replay_window(&self) -> Duration {
        Duration::from_secs(self.replay_window_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_bot_open_id_that_is_not_an_open_id_is_refused_by_name() {
        let parse = |id: &str| {
            let settings: FeishuSettings = serde_json::from_value(
                json!({"app_id": "cli_a", "app_secret": "s", "verification_token": "v", "bot_open_id": id}),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            settings.validate()
        };
        let error = parse("cli_a1b2").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("bot_open_id"), "{error}");
        assert!(parse("ou_84aad35d084aa403a838cf73ee18467").is_ok());
    }

    fn parse(value: serde_json::Value) -> Result<FeishuSettings, String> {
        serde_json::from_value::<FeishuSettings>(value)
            .map_err(|e| e.to_string())
            .and_then(|s| s.validate().map_err(|e| e.to_string()))
    }

    #[test]
    fn defaults_apply_and_unknown_keys_are_refused() {
        let misspelt =
            parse(json!({"app_id": "cli_1", "app_secret": "s", "verification_token": "v", "encrypt_kye": "k"}));
        assert!(misspelt.as_ref().is_err_and(|e| e.contains("encrypt_kye")), "{misspelt:?}");
        let settings = parse(json!({
            "app_id": "cli_1", "app_secret": "s", "verification_token": "v",
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.api_base, "https://open.feishu.cn");
        assert_eq!(settings.replay_window_secs, 27_000);
        assert!(settings.streaming);
        assert!(settings.require_mention_in_groups);
        assert_eq!(settings.max_part_bytes, 30_000);
        assert_eq!(settings.chat_qps, 5);
        assert!(settings.encrypt_key.is_none() && settings.bot_open_id.is_none());
    }

    #[test]
    fn blank_optional_values_count_as_unset() {
        let settings = parse(json!({
            "app_id": "cli_1", "app_secret": "s", "verification_token": "v",
            "encrypt_key": "", "bot_open_id": "  ", "api_base": "http://127.0.0.1:9/",
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(settings.encrypt_key.is_none() && settings.bot_open_id.is_none());
        assert_eq!(settings.api_base, "http://127.0.0.1:9");
    }

    #[test]
    fn empty_or_missing_required_keys_are_named_in_the_error() {
        let error =
            parse(json!({"app_id": "a", "app_secret": "s", "verification_token": ""})).err().unwrap_or_default();
        assert!(error.contains("`verification_token`"), "{error}");
        let error =
            parse(json!({"app_id": " ", "app_secret": "s", "verification_token": "v"})).err().unwrap_or_default();
        assert!(error.contains("`app_id`"), "{error}");
        let error = parse(json!({"app_id": "a", "verification_token": "v"})).err().unwrap_or_default();
        assert!(error.contains("app_secret"), "{error}");
    }

    #[test]
    fn a_bad_api_base_part_limit_or_padded_key_is_refused() {
        let base = json!({"app_id": "a", "app_secret": "s", "verification_token": "v"});
        let with = |key: &str, value: serde_json::Value| {
            let mut table = base.clone();
            table[key] = value;
            parse(table).err().unwrap_or_default()
        };
        assert!(with("api_base", json!("ftp://x")).contains("`api_base`"));
        let query = with("api_base", json!("https://proxy.example/?key=sk-query"));
        assert!(query.contains("`api_base`") && query.contains("query") && !query.contains("sk-query"), "{query}");
        let typo = with("api_base", json!("htps://user:hunter2@proxy.example"));
        assert!(typo.contains("`api_base`") && !typo.contains("hunter2"), "{typo}");
        assert!(with("max_part_bytes", json!(10)).contains("`max_part_bytes`"));
        assert!(with("max_part_bytes", json!(200_000)).contains("`max_part_bytes`"));
        assert!(with("encrypt_key", json!(" key")).contains("`encrypt_key`"));
        assert!(with("app_secret", json!("s ")).contains("`app_secret`"));
        assert!(with("app_id", json!("\ta")).contains("`app_id`"));
        assert!(with("chat_qps", json!(0)).contains("`chat_qps`"));
        assert!(with("cardkit_per_minute", json!(4)).contains("`cardkit_per_minute`"));
    }

    #[test]
    fn debug_output_hides_the_secrets() {
        let settings = parse(json!({
            "app_id": "cli_1", "app_secret": "very-secret", "verification_token": "vt-secret",
            "encrypt_key": "ek-secret",
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{settings:?}");
        assert!(!shown.contains("very-secret") && !shown.contains("vt-secret") && !shown.contains("ek-secret"));
        assert!(shown.contains("cli_1"));
    }
}
