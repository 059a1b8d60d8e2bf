//! The `wechat_mp` section of the config file, parsed and checked once at startup.
//!
//! Invariant: a [`WechatMpSettings`] that passed [`validate`](WechatMpSettings::validate) has a
//! non-empty app id, app secret and token, an `http(s)` API base without a trailing slash, a
//! part limit large enough for any UTF-8 character, and EncodingAESKeys that are either absent
//! or well-formed (43 characters of `[A-Za-z0-9]`), with no previous key without a current one.

use serde::Deserialize;
use std::fmt;
use std::time::Duration;
use yizhan_channel_core::ChannelError;

/// The smallest `max_part_bytes` accepted: below this a part could not hold a sentence, and the
/// splitter needs at least 4 bytes to fit any UTF-8 character.
pub const MIN_PART_BYTES: usize = 64;

/// One 公众号 account's settings.
///
/// Unknown keys are refused, so that a misspelt key is reported instead of silently leaving a
/// setting at its default (the core takes its own keys out of the table first).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WechatMpSettings {
    /// The account's AppID (开发者ID), from 设置与开发 → 基本配置; needed for the access token.
    pub app_id: String,
    /// The AppSecret (开发者密码). Secret: never logged, never put in an error.
    pub app_secret: String,
    /// The Token entered in the server configuration (服务器配置); it signs every webhook call.
    /// Secret: anyone who has it can forge pushes.
    pub token: String,
    /// Where the WeChat API lives; configurable so tests (and proxies) can stand in for it.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// How far (seconds) a webhook's `timestamp` may be from our clock before the call is
    /// refused as a replay. 0 disables the check, for hosts whose clock cannot be trusted.
    #[serde(default = "default_replay_window_secs")]
    pub replay_window_secs: u64,
    /// The largest text part sent in one message, in UTF-8 bytes. WeChat documents no limit;
    /// 2048 is the community-measured one (errcode 45002 beyond it), hence configurable.
    #[serde(default = "default_max_part_bytes")]
    pub max_part_bytes: usize,
    /// The EncodingAESKey (消息加解密密钥, 43 characters) from 服务器配置, needed for 安全模式 and
    /// 兼容模式 pushes (`encrypt_type=aes`). Without it such pushes are refused as
    /// misconfigured. Blank counts as absent. Secret: it decrypts every message.
    #[serde(default)]
    pub encoding_aes_key: Option<String>,
    /// The EncodingAESKey before the last change, kept for a while after rotating: pushes
    /// already encrypted with it still open, and are answered with it. Remove it once no
    /// message needs it. Blank counts as absent. Secret.
    #[serde(default)]
    pub previous_encoding_aes_key: Option<String>,
    /// With an `encoding_aes_key`, whether plaintext pushes (明文模式, no `encrypt_type=aes`)
    /// are still accepted. Off by default: their 3-field signature covers neither the body nor
    /// the method, so anyone who saw one signed URL (a proxy's access log) could post a forged
    /// plaintext message as any user within the replay window and read the answer in the
    /// response. Turn it on only for the minutes of a switch from 明文模式 to 安全模式.
    #[serde(default)]
    pub accept_plaintext: bool,
}

fn default_api_base() -> String {
    "https://api.weixin.qq.com".to_owned()
}

fn default_replay_window_secs() -> u64 {
    300
}

fn default_max_part_bytes() -> usize {
    2048
}

// NOTE: hand-written so that the secret, the token and the AES key can never reach a log line
// through `{:?}`.
impl fmt::Debug for WechatMpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WechatMpSettings")
            .field("app_id", &self.app_id)
            .field("app_secret", &"<redacted>")
            .field("token", &"<redacted>")
            .field("api_base", &self.api_base)
            .field("replay_window_secs", &self.replay_window_secs)
            .field("max_part_bytes", &self.max_part_bytes)
            .field("encoding_aes_key", &self.encoding_aes_key.as_ref().map(|_| "<redacted>"))
            .field("previous_encoding_aes_key", &self.previous_encoding_aes_key.as_ref().map(|_| "<redacted>"))
            .field("accept_plaintext", &self.accept_plaintext)
            .finish()
    }
}

impl WechatMpSettings {
    /// Checks the settings and normalises `api_base` (trims whitespace and trailing slashes).
    /// Errors name the offending key, never its value when the value is a secret.
    pub fn validate(mut self) -> Result<Self, ChannelError> {
        for (key, value) in [("app_id", &self.app_id), ("app_secret", &self.app_secret), ("token", &self.token)] {
            if value.trim().is_empty() {
                return Err(ChannelError::Misconfigured(format!(
                    "wechat_mp: `{key}` is empty; copy it from the 公众号 后台 (设置与开发 → 基本配置)"
                )));
            }
        }
        for (key, value) in [("app_id", &self.app_id), ("app_secret", &self.app_secret), ("token", &self.token)] {
            if value != value.trim() {
                return Err(ChannelError::Misconfigured(format!(
                    "wechat_mp: `{key}` has leading or trailing whitespace (an env file's trailing space?); \
                     signatures and the access token would never match"
                )));
            }
        }
        self.api_base = yizhan_channel_common::api::platform_api_base(&self.api_base)
            .map_err(|problem| ChannelError::Misconfigured(format!("wechat_mp: `api_base` {problem}")))?;
        if self.max_part_bytes < MIN_PART_BYTES {
            return Err(ChannelError::Misconfigured(format!(
                "wechat_mp: `max_part_bytes` is {}, below the minimum of {MIN_PART_BYTES}",
                self.max_part_bytes
            )));
        }
        self.encoding_aes_key = checked_aes_key("encoding_aes_key", self.encoding_aes_key.take())?;
        self.previous_encoding_aes_key =
            checked_aes_key("previous_encoding_aes_key", self.previous_encoding_aes_key.take())?;
        if self.previous_encoding_aes_key.is_some() && self.encoding_aes_key.is_none() {
            return Err(ChannelError::Misconfigured(
                "wechat_mp: `previous_encoding_aes_key` is set but `encoding_aes_key` is not; set the \
                 current EncodingAESKey too"
                    .into(),
            ));
        }
        Ok(self)
    }

    /// The replay window as a duration (zero: disabled).
    pub fn replay_window(&self) -> Duration {
        Duration::from_secs(self.replay_window_secs)
    }
}

/// A blank key is absent; any other must have the documented shape. The error names the key,
/// never its value.
fn checked_aes_key(name: &str, key: Option<String>) -> Result<Option<String>, ChannelError> {
    let Some(key) = key.filter(|key| !key.trim().is_empty()) else {
        return Ok(None);
    };
    yizhan_channel_wechat_crypto::validate_encoding_aes_key(&key).map_err(|error| {
        ChannelError::Misconfigured(format!(
            "wechat_mp: `{name}` is not a valid EncodingAESKey ({error}); copy the 43-character \
             消息加解密密钥 from 设置与开发 → 基本配置 → 服务器配置"
        ))
    })?;
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: serde_json::Value) -> Result<WechatMpSettings, String> {
        serde_json::from_value::<WechatMpSettings>(value)
            .map_err(|e| e.to_string())
            .and_then(|s| s.validate().map_err(|e| e.to_string()))
    }

    #[test]
    fn defaults_apply_and_unknown_keys_are_refused() {
        let misspelt = parse(json!({"app_id": "wx1", "app_secret": "s", "token": "t", "encoding_aes_kye": "k"}));
        assert!(misspelt.as_ref().is_err_and(|e| e.contains("encoding_aes_kye")), "{misspelt:?}");
        let settings = parse(json!({
            "app_id": "wx1", "app_secret": "s", "token": "t",
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.api_base, "https://api.weixin.qq.com");
        assert_eq!(settings.replay_window_secs, 300);
        assert_eq!(settings.max_part_bytes, 2048);
        assert!(settings.encoding_aes_key.is_none());
    }

    #[test]
    fn a_trailing_slash_on_the_api_base_is_tolerated() {
        let settings = parse(json!({
            "app_id": "wx1", "app_secret": "s", "token": "t", "api_base": "http://127.0.0.1:9/",
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.api_base, "http://127.0.0.1:9");
    }

    #[test]
    fn empty_required_keys_are_named_in_the_error() {
        let error = parse(json!({"app_id": "wx1", "app_secret": "s", "token": ""})).err().unwrap_or_default();
        assert!(error.contains("`token`"), "{error}");
        let error = parse(json!({"app_id": " ", "app_secret": "s", "token": "t"})).err().unwrap_or_default();
        assert!(error.contains("`app_id`"), "{error}");
        let error = parse(json!({"app_secret": "s", "token": "t"})).err().unwrap_or_default();
        assert!(error.contains("app_id"), "{error}");
        for key in ["app_id", "app_secret", "token"] {
            let mut table = json!({"app_id": "wx1", "app_secret": "s", "token": "t"});
            table[key] = json!(format!("{} ", table[key].as_str().unwrap_or_default()));
            let error = parse(table).err().unwrap_or_default();
            assert!(error.contains(&format!("`{key}` has leading or trailing whitespace")), "{error}");
        }
    }

    #[test]
    fn a_bad_api_base_or_tiny_part_limit_is_refused() {
        assert!(parse(json!({"app_id": "a", "app_secret": "s", "token": "t", "api_base": "ftp://x"})).is_err());
        for (base, named) in [("https://proxy.example/?key=sk-query", "query"), ("htps://user:hunter2@proxy", "http")] {
            let error = parse(json!({"app_id": "a", "app_secret": "s", "token": "t", "api_base": base})).err();
            let error = error.unwrap_or_default();
            assert!(error.contains("`api_base`") && error.contains(named), "{error}");
            assert!(!error.contains("sk-query") && !error.contains("hunter2"), "{error}");
        }
        assert!(parse(json!({"app_id": "a", "app_secret": "s", "token": "t", "max_part_bytes": 3})).is_err());
    }

    #[test]
    fn debug_output_hides_the_secrets() {
        let settings = parse(json!({
            "app_id": "wx1", "app_secret": "very-secret", "token": "tok-secret",
            "encoding_aes_key": KEY, "previous_encoding_aes_key": OLD_KEY,
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{settings:?}");
        assert!(!shown.contains("very-secret") && !shown.contains("tok-secret"));
        assert!(!shown.contains(KEY) && !shown.contains(OLD_KEY));
    }

    const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
    const OLD_KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";

    #[test]
    fn encoding_aes_keys_are_validated_and_blank_ones_are_absent() {
        let settings = parse(json!({
            "app_id": "a", "app_secret": "s", "token": "t",
            "encoding_aes_key": KEY, "previous_encoding_aes_key": OLD_KEY,
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.encoding_aes_key.as_deref(), Some(KEY));
        assert_eq!(settings.previous_encoding_aes_key.as_deref(), Some(OLD_KEY));

        let blank = parse(json!({"app_id": "a", "app_secret": "s", "token": "t", "encoding_aes_key": " "}))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(blank.encoding_aes_key.is_none());

        let short = &KEY[..42];
        let error = parse(json!({"app_id": "a", "app_secret": "s", "token": "t", "encoding_aes_key": short}))
            .err()
            .unwrap_or_default();
        assert!(error.contains("`encoding_aes_key`") && !error.contains(short), "{error}");
        let bad = "abcdefghijklmnopqrstuvwxyz0123456789ABCDE+G";
        let error = parse(json!({
            "app_id": "a", "app_secret": "s", "token": "t",
            "encoding_aes_key": KEY, "previous_encoding_aes_key": bad,
        }))
        .err()
        .unwrap_or_default();
        assert!(error.contains("`previous_encoding_aes_key`") && !error.contains(bad), "{error}");
        let error = parse(json!({"app_id": "a", "app_secret": "s", "token": "t", "previous_encoding_aes_key": KEY}))
            .err()
            .unwrap_or_default();
        assert!(error.contains("`encoding_aes_key` is not"), "{error}");
    }
}
