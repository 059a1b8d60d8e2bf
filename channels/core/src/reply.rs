//! What goes back to the platform.

use crate::{ChannelId, Conversation, ReplyHandle, Sender};
use serde::{Deserialize, Serialize};

/// An answer in markdown-ish text. Channels render it for their platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The text.
    pub text: String,
}

impl Reply {
    /// A reply with this text.
    pub fn text(text: impl Into<String>) -> Self {
        Self { text: text.into() }
    }
}

/// One rendered part on its way to one conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Stable across retries of this part; platforms that support idempotency keys (Feishu
    /// `uuid`) get it so a retried send is not shown twice. Today `{envelope id}-{part index}`
    /// (`-live` for a streamed message's start), about 30 ASCII characters; a platform whose
    /// key is shorter should hash it rather than cut it (two parts must not share a key).
    pub delivery_id: String,
    /// The channel account to send from.
    pub channel: ChannelId,
    /// Where to send.
    pub conversation: Conversation,
    /// Who asked (the addressee in direct chats).
    pub recipient: Sender,
    /// The channel's data from the inbound envelope.
    pub reply_handle: ReplyHandle,
    /// The part, already rendered by [`Channel::render`](crate::Channel::render).
    pub reply: Reply,
}

/// What the platform said when it accepted a part.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryReceipt {
    /// The platform's id for the sent message, when it returns one.
    pub platform_message_id: Option<String>,
}
