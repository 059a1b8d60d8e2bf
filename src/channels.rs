//! The channel kinds this build knows, and how a `[[channels]]` entry becomes a channel.
//!
//! Built-in kinds are behind cargo features; plugin kinds are added with
//! [`ChannelKinds::register`] before the application is built.

use std::collections::HashMap;
use std::sync::Arc;
use yizhan_channel_core::{Channel, ChannelError, ChannelSettings};

/// Makes a channel from its config entry and the shared HTTP client.
pub type ChannelFactory =
    Box<dyn Fn(&ChannelSettings, &reqwest::Client) -> Result<Arc<dyn Channel>, ChannelError> + Send + Sync>;

/// Channel kinds by config name.
pub struct ChannelKinds(HashMap<String, ChannelFactory>);

impl ChannelKinds {
    /// No kinds at all.
    pub fn empty() -> Self {
        Self(HashMap::new())
    }

    /// The kinds compiled into this build.
    pub fn builtin() -> Self {
        #[allow(unused_mut)]
        let mut kinds = Self::empty();
        #[cfg(feature = "wechat-mp")]
        kinds.register(yizhan_channel_wechat_mp::WechatMp::KIND, |settings, http| {
            let channel = yizhan_channel_wechat_mp::WechatMp::from_settings(settings, http.clone())?;
            Ok(Arc::new(channel) as Arc<dyn Channel>)
        });
        #[cfg(feature = "wecom")]
        kinds.register(yizhan_channel_wecom::Wecom::KIND, |settings, http| {
            let channel = yizhan_channel_wecom::Wecom::from_settings(settings, http.clone())?;
            Ok(Arc::new(channel) as Arc<dyn Channel>)
        });
        #[cfg(feature = "feishu")]
        kinds.register(yizhan_channel_feishu::Feishu::KIND, |settings, http| {
            let channel = yizhan_channel_feishu::Feishu::from_settings(settings, http.clone())?;
            Ok(Arc::new(channel) as Arc<dyn Channel>)
        });
        kinds
    }

    /// Adds (or replaces) a kind.
    pub fn register<F>(&mut self, kind: &str, factory: F) -> &mut Self
    where
        F: Fn(&ChannelSettings, &reqwest::Client) -> Result<Arc<dyn Channel>, ChannelError> + Send + Sync + 'static,
    {
        self.0.insert(kind.to_owned(), Box::new(factory));
        self
    }

    /// Builds the channel for one config entry.
    pub fn build(&self, settings: &ChannelSettings, http: &reqwest::Client) -> Result<Arc<dyn Channel>, ChannelError> {
        let factory = self.0.get(&settings.kind).ok_or_else(|| {
            let mut known: Vec<&str> = self.0.keys().map(String::as_str).collect();
            known.sort_unstable();
            ChannelError::Misconfigured(format!(
                "channel {:?}: unknown kind {:?} (this build knows: {})",
                settings.id.as_str(),
                settings.kind,
                known.join(", ")
            ))
        })?;
        let channel = factory(settings, http)?;
        // Answers, dedupe and the channel's settings go by the id its envelopes carry, which
        // the hub takes from `id()`: it must be the configured one (a plugin's bug otherwise).
        if channel.id() != &settings.id {
            return Err(ChannelError::Misconfigured(format!(
                "channel {:?}: the {} channel kind built a channel whose id() is {:?}, not the configured id",
                settings.id.as_str(),
                settings.kind,
                channel.id().as_str()
            )));
        }
        Ok(channel)
    }
}

impl Default for ChannelKinds {
    fn default() -> Self {
        Self::builtin()
    }
}
