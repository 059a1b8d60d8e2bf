//! One inbound message, whatever platform it came from.
//!
//! Envelopes are serialisable because the core journals them before acknowledging the platform.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The configured id of one channel account (the `{channel_id}` in `/webhooks/{channel_id}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChannelId(String);

impl ChannelId {
    /// Parses a channel id: 1–64 characters of `[A-Za-z0-9_-]`, so it is safe in URLs, logs
    /// and metric labels.
    pub fn parse(value: &str) -> Result<Self, String> {
        let ok = !value.is_empty()
            && value.len() <= 64
            && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(format!("channel id {value:?} must be 1-64 characters of letters, digits, '_' or '-'"))
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a conversation is one-to-one or a group; groups may share one context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationKind {
    /// A user talking to the bot alone.
    Direct,
    /// A group chat the bot is a member of.
    Group,
}

/// Where a message was said.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Conversation {
    /// Direct or group.
    pub kind: ConversationKind,
    /// The platform's id of the conversation (for direct chats, usually the user's id).
    pub id: String,
}

/// Who said it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    /// The platform's user id (openid, userid, open_id …).
    pub id: String,
    /// A display name, when the platform sends one.
    pub name: Option<String>,
}

/// A platform event that is not a message of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The user followed the account; `scene` is set when they came through a parameter QR code.
    Subscribe {
        /// The QR scene (without WeChat's `qrscene_` prefix).
        scene: Option<String>,
    },
    /// The user unfollowed; nothing can be sent to them any more.
    Unsubscribe,
    /// A follower scanned a parameter QR code.
    Scan {
        /// The QR scene id.
        scene: Option<String>,
    },
    /// The platform reported the user's location (coordinates that are not finite numbers are
    /// journaled as 0).
    Location {
        /// Latitude.
        latitude: f64,
        /// Longitude.
        longitude: f64,
        /// Precision in metres, when given.
        precision: Option<f64>,
    },
    /// A custom menu button was clicked.
    MenuClick {
        /// The configured menu key.
        key: String,
    },
    /// A menu link was opened.
    MenuView {
        /// The URL that was opened.
        url: String,
    },
    /// The user opened the chat with the bot (WeCom `enter_agent`, Feishu p2p chat entered).
    EnterChat,
    /// Anything else; kept so that nothing fails to parse.
    Other {
        /// The platform's event name.
        name: String,
    },
}

/// One piece of a message's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Segment {
    /// Plain text.
    Text {
        /// The text, untrimmed.
        text: String,
    },
    /// A picture.
    Image {
        /// A URL the picture can be fetched from.
        url: Option<String>,
        /// The platform's media id.
        media_id: Option<String>,
    },
    /// A voice message.
    Voice {
        /// The platform's media id.
        media_id: Option<String>,
        /// Audio format (amr, speex …).
        format: Option<String>,
        /// The platform's speech recognition result, when it provides one.
        recognition: Option<String>,
    },
    /// A video or short video.
    Video {
        /// The platform's media id.
        media_id: Option<String>,
        /// The thumbnail's media id.
        thumb_media_id: Option<String>,
    },
    /// A file.
    File {
        /// The platform's key or media id.
        media_id: Option<String>,
        /// The file name.
        name: Option<String>,
    },
    /// A shared location. Coordinates that are not finite numbers are journaled as 0.
    Location {
        /// Latitude.
        latitude: f64,
        /// Longitude.
        longitude: f64,
        /// Map zoom level.
        scale: Option<f64>,
        /// A place name.
        label: Option<String>,
    },
    /// A shared link.
    Link {
        /// Title.
        title: Option<String>,
        /// Description.
        description: Option<String>,
        /// URL.
        url: String,
    },
    /// An @-mention.
    Mention {
        /// The mentioned user's id.
        id: String,
        /// The mentioned user's name.
        name: Option<String>,
        /// Whether the bot itself was mentioned.
        is_self: bool,
    },
    /// A platform event. Alone in its envelope: beside text, the envelope is read as the event
    /// and the text is not answered.
    Event(Event),
}

/// Opaque data a channel needs to answer this message (a message id to reply to, a passive
/// reply slot …). The core stores and returns it untouched.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReplyHandle(pub serde_json::Value);

/// One inbound message in the form every part of the core understands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Assigned by the hub; unique per accepted message. The hub sets it (and `channel` and
    /// `channel_kind`) on every envelope a webhook returns, whatever the channel put there.
    pub id: String,
    /// The channel account it arrived on (set by the hub).
    pub channel: ChannelId,
    /// The channel kind (`wechat_mp`, `wecom`, `feishu`, or a plugin's; set by the hub).
    pub channel_kind: String,
    /// The platform's id for this message: the dedupe key. It must differ between messages, be
    /// the same on every retry of one, and be non-blank (see [`Envelope::has_usable_ids`]: the
    /// core refuses a webhook otherwise). For events without one, the channel builds it from
    /// what a retry repeats (WeChat: sender, create time, event and event key), never from the
    /// time it was received.
    pub platform_message_id: String,
    /// When the message was received, Unix milliseconds. Set by the channel (from
    /// [`WebhookRequest::received_at`](crate::WebhookRequest)); after a restart the core uses
    /// it to tell whether the platform may still retry the message.
    pub received_at_ms: i64,
    /// Where it was said.
    pub conversation: Conversation,
    /// Who said it.
    pub sender: Sender,
    /// What was said.
    pub content: Vec<Segment>,
    /// Whether the bot was @-mentioned. Group messages without a mention are not answered;
    /// in direct chats the core ignores it (every message there is for the bot).
    pub mentions_self: bool,
    /// What the channel needs to answer.
    pub reply_handle: ReplyHandle,
}

/// The longest id (message, conversation, sender) the core takes from a channel.
pub const MAX_ID_BYTES: usize = 512;

/// Milliseconds since the Unix epoch (negative before it), saturating instead of overflowing:
/// an envelope's `received_at_ms`, from [`WebhookRequest::received_at`](crate::WebhookRequest).
pub fn unix_millis(at: std::time::SystemTime) -> i64 {
    match at.duration_since(std::time::SystemTime::UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

impl Envelope {
    /// Whether its ids are what ids are, as the core requires of every envelope a channel
    /// accepts (it refuses the webhook with 400 otherwise): the platform message id not blank,
    /// and it, the conversation's and the sender's at most [`MAX_ID_BYTES`] and without
    /// control characters (they key sessions and appear in logs).
    pub fn has_usable_ids(&self) -> bool {
        let id_like = |id: &str| id.len() <= MAX_ID_BYTES && !id.chars().any(char::is_control);
        !self.platform_message_id.trim().is_empty()
            && [&self.platform_message_id, &self.conversation.id, &self.sender.id].into_iter().all(|id| id_like(id))
    }

    /// All text segments joined by newlines; a voice message's recognition counts as text.
    pub fn text(&self) -> String {
        let mut parts = Vec::new();
        for segment in &self.content {
            match segment {
                Segment::Text { text } => parts.push(text.as_str()),
                Segment::Voice { recognition: Some(text), .. } => parts.push(text.as_str()),
                _ => {}
            }
        }
        parts.join("\n")
    }

    /// The event, if this envelope is one.
    pub fn event(&self) -> Option<&Event> {
        self.content.iter().find_map(|segment| match segment {
            Segment::Event(event) => Some(event),
            _ => None,
        })
    }

    /// A fresh hub-side id: milliseconds since the epoch then 64 random bits, in hex (28
    /// characters). Time first, so ids sort by arrival and land at the end of store indexes
    /// instead of on random pages.
    pub fn new_id() -> String {
        use rand::Rng;
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or_default();
        let random: u64 = rand::thread_rng().gen();
        format!("{millis:012x}{random:016x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_ids_are_restricted_to_url_and_label_safe_characters() {
        assert!(ChannelId::parse("mp-main_1").is_ok());
        assert!(ChannelId::parse("").is_err());
        assert!(ChannelId::parse("a/b").is_err());
        assert!(ChannelId::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn new_ids_are_unique_and_sort_by_time() {
        let first = Envelope::new_id();
        let second = Envelope::new_id();
        assert_eq!(first.len(), 28);
        assert_ne!(first, second);
        assert!(first[..12] <= second[..12]);
    }

    #[test]
    fn envelope_text_joins_text_and_voice_recognition() {
        let envelope = Envelope {
            id: Envelope::new_id(),
            channel: ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}")),
            channel_kind: "test".into(),
            platform_message_id: "1".into(),
            received_at_ms: 0,
            conversation: Conversation { kind: ConversationKind::Direct, id: "u".into() },
            sender: Sender { id: "u".into(), name: None },
            content: vec![
                Segment::Text { text: "a".into() },
                Segment::Voice { media_id: None, format: None, recognition: Some("b".into()) },
            ],
            mentions_self: true,
            reply_handle: ReplyHandle::default(),
        };
        assert_eq!(envelope.text(), "a\nb");
        let json = serde_json::to_string(&envelope).unwrap_or_default();
        let back: Envelope = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, envelope);
    }

    #[test]
    fn unix_millis_handles_times_before_the_epoch() {
        use std::time::{Duration, SystemTime};
        assert_eq!(unix_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(1500)), 1500);
        assert_eq!(unix_millis(SystemTime::UNIX_EPOCH - Duration::from_millis(1500)), -1500);
    }

    #[test]
    fn usable_ids_are_not_blank_short_and_without_control_characters() {
        let with = |message: &str, conversation: &str, sender: &str| Envelope {
            id: Envelope::new_id(),
            channel: ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}")),
            channel_kind: "test".into(),
            platform_message_id: message.into(),
            received_at_ms: 0,
            conversation: Conversation { kind: ConversationKind::Direct, id: conversation.into() },
            sender: Sender { id: sender.into(), name: None },
            content: vec![],
            mentions_self: true,
            reply_handle: ReplyHandle::default(),
        };
        let long = "i".repeat(MAX_ID_BYTES + 1);
        assert!(with("m1", "c1", "u1").has_usable_ids());
        assert!(with(&"i".repeat(MAX_ID_BYTES), "c1", "u1").has_usable_ids());
        for (message, conversation, sender) in [
            (" ", "c1", "u1"),
            (long.as_str(), "c1", "u1"),
            ("m1", &long, "u1"),
            ("m1", "c1", &long),
            ("m\n1", "c1", "u1"),
            ("m1", "c1", "u\u{0}"),
        ] {
            assert!(!with(message, conversation, sender).has_usable_ids(), "{message:?} {conversation:?} {sender:?}");
        }
    }
}
