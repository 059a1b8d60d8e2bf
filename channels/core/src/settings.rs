//! A channel's own section of the config file.

use crate::{ChannelError, ChannelId};
use serde::de::DeserializeOwned;

/// One `[[channels]]` entry: the id, the kind, and everything else as a JSON table the channel
/// parses into its own settings type.
#[derive(Clone)]
pub struct ChannelSettings {
    /// The configured id.
    pub id: ChannelId,
    /// The configured kind.
    pub kind: String,
    /// The entry's keys for the channel itself: the core takes out its own (`id`, `kind`,
    /// `system_prompt`, `reply_mode`, `passive_window_ms`, `passive_margin_ms`,
    /// `send_quota_per_message`, `menu`, `group_context`), so a channel's settings type can
    /// refuse unknown keys (`#[serde(deny_unknown_fields)]`), as the built-in channels do. A
    /// plugin cannot have keys of its own under these names.
    pub table: serde_json::Value,
}

impl ChannelSettings {
    /// Parses the entry into the channel's settings type. The error names the offending key,
    /// never its value (it may be a secret).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ChannelError> {
        serde_path_to_error::deserialize(self.table.clone()).map_err(|error| {
            let key = error.path().to_string();
            let message = without_value(&error.into_inner().to_string());
            let (id, kind) = (self.id.as_str(), &self.kind);
            let missing = missing_field(&message);
            ChannelError::Misconfigured(match missing {
                Some(field) if key == "." => format!(
                    "channel {id:?} ({kind}): key `{field}` is missing (in the file, or as \
                     YIZHAN__CHANNELS__{}__{})",
                    id.to_ascii_uppercase().replace('-', "_"),
                    field.to_ascii_uppercase()
                ),
                // The channel lists only its own keys; a misspelt core key is as likely.
                _ if message.starts_with("unknown field") => format!(
                    "channel {id:?} ({kind}): key `{key}`: {message}; or one every channel has: {}",
                    CORE_KEYS.join(", ")
                ),
                _ => format!("channel {id:?} ({kind}): key `{key}`: {message}"),
            })
        })
    }
}

/// The keys of a `[[channels]]` entry the core reads itself (see [`ChannelSettings::table`]).
pub const CORE_KEYS: &[&str] = &[
    "id",
    "kind",
    "system_prompt",
    "reply_mode",
    "passive_window_ms",
    "passive_margin_ms",
    "send_quota_per_message",
    "menu",
    "group_context",
];

/// A serde error message without the value it complains about: "invalid type: integer
/// `12345678`, expected a string" becomes "invalid type: integer, expected a string". Config
/// values can be secrets (a numeric token, a secret in the wrong key), and these messages are
/// printed and logged.
pub fn without_value(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: ", "unknown variant "] {
        let Some(rest) = message.strip_prefix(prefix) else { continue };
        // The value comes first, so the last ", expected" is serde's own, whatever the value.
        let Some(expected_at) = rest.rfind(", expected ") else { break };
        let unexpected = &rest[..expected_at];
        let what = unexpected.find(['`', '"']).map_or(unexpected, |value_at| unexpected[..value_at].trim_end());
        return format!("{}{}", format!("{prefix}{what}").trim_end(), &rest[expected_at..]);
    }
    message.to_owned()
}

/// The field a serde "missing field `x`" message names, to be reported as the key it is.
pub fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `").and_then(|rest| rest.strip_suffix('`'))
}

// NOTE: the table holds secrets (app secrets, tokens), so Debug shows only the key names.
impl std::fmt::Debug for ChannelSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> =
            self.table.as_object().map(|table| table.keys().map(String::as_str).collect()).unwrap_or_default();
        f.debug_struct("ChannelSettings").field("id", &self.id).field("kind", &self.kind).field("keys", &keys).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_lose_the_value_and_keep_what_was_expected() {
        let cases = [
            ("invalid type: integer `20240101123456`, expected a string", "invalid type: integer, expected a string"),
            ("invalid type: string \"s3cret, expected x\", expected u64", "invalid type: string, expected u64"),
            (
                "invalid value: string \"hunter2\", expected one of `a`, `b`",
                "invalid value: string, expected one of `a`, `b`",
            ),
            ("invalid type: map, expected a string", "invalid type: map, expected a string"),
            ("unknown variant `sk-live-123`, expected `push` or `auto`", "unknown variant, expected `push` or `auto`"),
            ("unknown field `tokn`, expected `token`", "unknown field `tokn`, expected `token`"),
        ];
        for (message, expected) in cases {
            assert_eq!(without_value(message), expected);
        }
    }

    #[test]
    fn a_settings_error_names_the_key_and_not_its_value() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Settings {
            token: String,
        }
        let settings = ChannelSettings {
            id: ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}")),
            kind: "wechat_mp".into(),
            table: serde_json::json!({"token": 20240101123456_u64}),
        };
        let error = match settings.parse::<Settings>() {
            Ok(parsed) => panic!("parsed {parsed:?}"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains("`token`") && !error.contains("20240101123456"), "{error}");
    }

    #[test]
    fn a_missing_key_is_named_with_its_environment_variable_and_a_misspelt_one_with_the_core_keys() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Settings {
            app_secret: String,
        }
        let settings = |table| ChannelSettings {
            id: ChannelId::parse("mp-main").unwrap_or_else(|e| panic!("{e}")),
            kind: "wechat_mp".into(),
            table,
        };
        let error = |table| match settings(table).parse::<Settings>() {
            Ok(parsed) => panic!("parsed {parsed:?}"),
            Err(error) => error.to_string(),
        };
        assert_eq!(
            error(serde_json::json!({})),
            "channel misconfigured: channel \"mp-main\" (wechat_mp): key `app_secret` is missing (in the file, or as \
             YIZHAN__CHANNELS__MP_MAIN__APP_SECRET)"
        );
        let misspelt = error(serde_json::json!({"app_secret": "s", "reply_mod": "push"}));
        assert!(misspelt.contains("`reply_mod`") && misspelt.contains("reply_mode, "), "{misspelt}");
    }
}
