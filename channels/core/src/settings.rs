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
    /// `system_prompt`, `reply_mode`, `menu` …), so a channel's settings type can refuse unknown
    /// keys (`#[serde(deny_unknown_fields)]`), as the built-in channels do.
    pub table: serde_json::Value,
}

impl ChannelSettings {
    /// Parses the entry into the channel's settings type. The error names the offending key.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ChannelError> {
        serde_json::from_value(self.table.clone()).map_err(|error| {
            ChannelError::Misconfigured(format!("channel {:?} ({}): {error}", self.id.as_str(), self.kind))
        })
    }
}

// NOTE: the table holds secrets (app secrets, tokens), so Debug shows only the key names.
impl std::fmt::Debug for ChannelSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> =
            self.table.as_object().map(|table| table.keys().map(String::as_str).collect()).unwrap_or_default();
        f.debug_struct("ChannelSettings").field("id", &self.id).field("kind", &self.kind).field("keys", &keys).finish()
    }
}
