//! The `wecom` section of the config file, parsed and checked once at startup.
//!
//! Invariant: a [`WecomSettings`] that passed [`validate`](WecomSettings::validate) has a
//! non-empty corp id, secret and token, a positive agent id, EncodingAESKeys of the documented
//! shape (43 characters of `[A-Za-z0-9]` decoding to 32 bytes), an `http(s)` API base without a trailing slash, a part
//! limit large enough for any UTF-8 character, and rate limits of at least one message.

use serde::Deserialize;
use std::fmt;
use std::time::Duration;
use yizhan_channel_core::ChannelError;

/// The smallest `max_part_bytes` accepted: below this a part could not hold a sentence, and the
/// splitter needs at least 4 bytes to fit any UTF-8 character.
pub const MIN_PART_BYTES: usize = 64;

/// The largest `max_part_bytes` accepted: WeCom cuts text and markdown content beyond it and
/// still answers errcode 0 (doc path/90236).
pub const MAX_PART_BYTES: usize = 2048;

/// WeCom's send limits from one app to one member; it drops what exceeds them without an error.
const MAX_RATE_PER_MINUTE: u32 = 30;
const MAX_RATE_PER_HOUR: u32 = 1000;

/// How answers are sent: WeCom's `markdown` message type or plain `text`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyFormat {
    /// `msgtype: markdown`: headings, bold, links and inline code render in the WeCom client.
    /// Members who read the app through the WeChat plug-in (微信插件) see no markdown messages at
    /// all, so corps that rely on it should choose `text`.
    #[default]
    Markdown,
    /// `msgtype: text`: markdown is converted to readable plain text first.
    Text,
}

/// One WeCom self-built app's settings.
///
/// Unknown keys are refused, so that a misspelt key is reported instead of silently leaving a
/// setting at its default (the core takes its own keys out of the table first).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WecomSettings {
    /// The corp id (企业ID, 我的企业 → 企业信息). It is the `receiveid` inside every encrypted
    /// callback, so callbacks for another corp are refused, and it fetches the access token.
    pub corp_id: String,
    /// The app's Secret (应用管理 → the app → Secret). Secret: never logged, never in an error.
    pub corp_secret: String,
    /// The app's AgentId; messages are sent as this app, and callbacks for another app are
    /// ignored.
    pub agent_id: i64,
    /// The Token of the app's 接收消息 (API) settings; it signs every callback. Secret.
    pub token: String,
    /// The EncodingAESKey of the same settings page (43 characters). Secret.
    pub encoding_aes_key: String,
    /// The EncodingAESKey before the last rotation, tried when the current one fails, so that
    /// callbacks in flight while the key is changed in the admin console are not lost. Secret.
    #[serde(default)]
    pub previous_encoding_aes_key: Option<String>,
    /// Where the WeCom API lives; configurable so tests (and proxies) can stand in for it.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// How far (seconds) a callback's `timestamp` may be from our clock before the call is
    /// refused as a replay. 0 disables the check, for hosts whose clock cannot be trusted.
    #[serde(default = "default_replay_window_secs")]
    pub replay_window_secs: u64,
    /// `markdown` (default) or `text`.
    #[serde(default)]
    pub reply_format: ReplyFormat,
    /// The largest part sent in one message, in UTF-8 bytes. WeCom truncates text and markdown
    /// content beyond 2048 bytes (doc path/90236), hence the default.
    #[serde(default = "default_max_part_bytes")]
    pub max_part_bytes: usize,
    /// Messages per member per minute. WeCom silently drops messages beyond 30 per minute from
    /// one app to one member, so deliveries wait instead of exceeding it.
    #[serde(default = "default_rate_per_minute")]
    pub rate_per_minute: u32,
    /// Messages per member per hour (WeCom: 1000, excess silently dropped).
    #[serde(default = "default_rate_per_hour")]
    pub rate_per_hour: u32,
}

fn default_api_base() -> String {
    "https://qyapi.weixin.qq.com".to_owned()
}

fn default_replay_window_secs() -> u64 {
    300
}

fn default_max_part_bytes() -> usize {
    MAX_PART_BYTES
}

fn default_rate_per_minute() -> u32 {
    MAX_RATE_PER_MINUTE
}

fn default_rate_per_hour() -> u32 {
    MAX_RATE_PER_HOUR
}

// NOTE: hand-written so that the secret, the token and the AES keys can never reach a log line
// through `{:?}`.
impl fmt::Debug for WecomSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WecomSettings")
            .field("corp_id", &self.corp_id)
            .field("corp_secret", &"<redacted>")
            .field("agent_id", &self.agent_id)
            .field("token", &"<redacted>")
            .field("encoding_aes_key", &"<redacted>")
            .field("previous_encoding_aes_key", &self.previous_encoding_aes_key.as_ref().map(|_| "<redacted>"))
            .field("api_base", &self.api_base)
            .field("replay_window_secs", &self.replay_window_secs)
            .field("reply_format", &self.reply_format)
            .field("max_part_bytes", &self.max_part_bytes)
            .field("rate_per_minute", &self.rate_per_minute)
            .field("rate_per_hour", &self.rate_per_hour)
            .finish()
    }
}

fn misconfigured(message: String) -> ChannelError {
    ChannelError::Misconfigured(format!("wecom: {message}"))
}

impl WecomSettings {
    /// Checks the settings and normalises `api_base` (trims whitespace and trailing slashes) and
    /// the AES keys (trims whitespace). Errors name the offending key, never a secret's value.
    pub fn validate(mut self) -> Result<Self, ChannelError> {
        for (key, value, place) in [
            ("corp_id", &self.corp_id, "我的企业 → 企业信息 → 企业ID"),
            ("corp_secret", &self.corp_secret, "应用管理 → the app → Secret"),
            ("token", &self.token, "应用管理 → the app → 接收消息 → 设置API接收"),
        ] {
            if value.trim().is_empty() {
                return Err(misconfigured(format!("`{key}` is empty; copy it from the WeCom admin console ({place})")));
            }
        }
        for (key, value) in [("corp_id", &self.corp_id), ("corp_secret", &self.corp_secret), ("token", &self.token)] {
            if value != value.trim() {
                return Err(misconfigured(format!(
                    "`{key}` has leading or trailing whitespace (an env file's trailing space?); signatures, the \
                     corp check and the access token would never match"
                )));
            }
        }
        if self.agent_id <= 0 {
            return Err(misconfigured(format!(
                "`agent_id` is {}; use the app's AgentId (应用管理 → the app), a positive number",
                self.agent_id
            )));
        }
        self.encoding_aes_key = self.encoding_aes_key.trim().to_owned();
        check_aes_key("encoding_aes_key", &self.encoding_aes_key)?;
        if let Some(previous) = self.previous_encoding_aes_key.take() {
            let previous = previous.trim().to_owned();
            // An empty value means "no previous key", which is what a template config holds.
            if !previous.is_empty() {
                check_aes_key("previous_encoding_aes_key", &previous)?;
                self.previous_encoding_aes_key = Some(previous);
            }
        }
        self.api_base = yizhan_channel_common::api::platform_api_base(&self.api_base)
            .map_err(|problem| misconfigured(format!("`api_base` {problem}")))?;
        if !(MIN_PART_BYTES..=MAX_PART_BYTES).contains(&self.max_part_bytes) {
            return Err(misconfigured(format!(
                "`max_part_bytes` is {}; it must be {MIN_PART_BYTES} to {MAX_PART_BYTES} (WeCom cuts text and \
                 markdown beyond {MAX_PART_BYTES} bytes without an error)",
                self.max_part_bytes
            )));
        }
        for (key, value, most) in [
            ("rate_per_minute", self.rate_per_minute, MAX_RATE_PER_MINUTE),
            ("rate_per_hour", self.rate_per_hour, MAX_RATE_PER_HOUR),
        ] {
            if value == 0 || value > most {
                return Err(misconfigured(format!(
                    "`{key}` is {value}; it must be 1 to {most} (WeCom silently drops messages beyond \
                     {MAX_RATE_PER_MINUTE} per minute and {MAX_RATE_PER_HOUR} per hour to one member)"
                )));
            }
        }
        Ok(self)
    }

    /// The replay window as a duration (zero: disabled).
    pub fn replay_window(&self) -> Duration {
        Duration::from_secs(self.replay_window_secs)
    }
}

/// Checks an EncodingAESKey with the crypto crate (43 characters of `[A-Za-z0-9]` that decode
/// to 32 bytes), naming the key but never echoing its value.
fn check_aes_key(key: &str, value: &str) -> Result<(), ChannelError> {
    yizhan_channel_wechat_crypto::validate_encoding_aes_key(value).map_err(|error| {
        misconfigured(format!(
            "`{key}` is not a valid EncodingAESKey ({error}); copy the 43 characters from 接收消息 → 设置API接收"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";

    fn base() -> serde_json::Value {
        json!({
            "corp_id": "ww1", "corp_secret": "s", "agent_id": 1000002, "token": "t",
            "encoding_aes_key": KEY,
        })
    }

    fn with(changes: serde_json::Value) -> serde_json::Value {
        let mut table = base();
        if let (Some(table), Some(changes)) = (table.as_object_mut(), changes.as_object()) {
            for (key, value) in changes {
                if value.is_null() {
                    table.remove(key);
                } else {
                    table.insert(key.clone(), value.clone());
                }
            }
        }
        table
    }

    fn parse(value: serde_json::Value) -> Result<WecomSettings, String> {
        serde_json::from_value::<WecomSettings>(value)
            .map_err(|e| e.to_string())
            .and_then(|s| s.validate().map_err(|e| e.to_string()))
    }

    #[test]
    fn defaults_apply_and_unknown_keys_are_refused() {
        let misspelt = parse(with(json!({"reply_fromat": "text"})));
        assert!(misspelt.as_ref().is_err_and(|e| e.contains("reply_fromat")), "{misspelt:?}");
        let settings = parse(base()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.api_base, "https://qyapi.weixin.qq.com");
        assert_eq!(settings.replay_window_secs, 300);
        assert_eq!(settings.reply_format, ReplyFormat::Markdown);
        assert_eq!(settings.max_part_bytes, 2048);
        assert_eq!(settings.rate_per_minute, 30);
        assert_eq!(settings.rate_per_hour, 1000);
        assert!(settings.previous_encoding_aes_key.is_none());
    }

    #[test]
    fn the_reply_format_is_markdown_or_text() {
        let settings = parse(with(json!({"reply_format": "text"}))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.reply_format, ReplyFormat::Text);
        let error = parse(with(json!({"reply_format": "html"}))).err().unwrap_or_default();
        assert!(error.contains("html"), "{error}");
    }

    #[test]
    fn a_trailing_slash_on_the_api_base_is_tolerated() {
        let settings = parse(with(json!({"api_base": "http://127.0.0.1:9/"}))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.api_base, "http://127.0.0.1:9");
    }

    #[test]
    fn errors_name_the_offending_key() {
        let cases = [
            (json!({"corp_id": ""}), "`corp_id`"),
            (json!({"corp_secret": " "}), "`corp_secret`"),
            (json!({"token": ""}), "`token`"),
            (json!({"token": "t "}), "`token`"),
            (json!({"agent_id": 0}), "`agent_id`"),
            (json!({"encoding_aes_key": "short"}), "`encoding_aes_key`"),
            (json!({"encoding_aes_key": format!("{}+", &KEY[..42])}), "`encoding_aes_key`"),
            (json!({"previous_encoding_aes_key": "short"}), "`previous_encoding_aes_key`"),
            (json!({"api_base": "ftp://x"}), "`api_base`"),
            (json!({"api_base": "https://proxy.example/#frag"}), "fragment"),
            (json!({"corp_secret": "s\n"}), "`corp_secret`"),
            (json!({"max_part_bytes": 3}), "`max_part_bytes`"),
            (json!({"max_part_bytes": 4000}), "`max_part_bytes`"),
            (json!({"rate_per_minute": 0}), "`rate_per_minute`"),
            (json!({"rate_per_minute": 60}), "`rate_per_minute`"),
            (json!({"rate_per_hour": 0}), "`rate_per_hour`"),
            (json!({"rate_per_hour": 1001}), "`rate_per_hour`"),
            (json!({"corp_id": null}), "corp_id"),
            (json!({"agent_id": "x"}), "invalid type"),
        ];
        for (change, named) in cases {
            let error = parse(with(change.clone())).err().unwrap_or_default();
            assert!(error.contains(named), "{change}: {error}");
        }
        let typo = parse(with(json!({"api_base": "htps://user:hunter2@proxy.example"}))).err().unwrap_or_default();
        assert!(typo.contains("`api_base`") && !typo.contains("hunter2"), "{typo}");
    }

    #[test]
    fn an_empty_previous_key_means_none() {
        let settings = parse(with(json!({"previous_encoding_aes_key": ""}))).unwrap_or_else(|e| panic!("{e}"));
        assert!(settings.previous_encoding_aes_key.is_none());
    }

    #[test]
    fn debug_output_hides_the_secrets() {
        let settings = parse(with(json!({
            "corp_secret": "very-secret", "token": "tok-secret",
            "previous_encoding_aes_key": "A".repeat(43),
        })))
        .unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{settings:?}");
        for secret in ["very-secret", "tok-secret", KEY, &"A".repeat(43)] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("ww1") && shown.contains("1000002"));
    }
}
