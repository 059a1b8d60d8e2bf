//! Decrypted callback JSON → what it asks for: a URL-verification challenge, a message
//! [`Envelope`], or an event the bot ignores.
//!
//! Invariants: parsing never panics; a body that is not a JSON object, or a message event that
//! lacks the fields every message has (`message_id`, `chat_id`, `chat_type`, `message_type`,
//! `content`, the sender's `open_id`), is [`ChannelError::Malformed`]; a message type this
//! channel does not read is kept as a neutral segment rather than refused. Authentication is the
//! caller's job and happens before any of this looks at the event.

use serde::Deserialize;
use serde_json::Value;
use yizhan_channel_core::{
    ChannelError, ChannelId, Conversation, ConversationKind, Envelope, Event, ReplyHandle, Segment, Sender,
};

/// The event type of a message sent to the bot (v2 schema).
pub(crate) const MESSAGE_RECEIVED: &str = "im.message.receive_v1";

/// The most mentions read from one message; Feishu allows far fewer, this only bounds the work
/// an odd payload can cause.
const MAX_MENTIONS: usize = 200;

fn malformed(reason: impl Into<String>) -> ChannelError {
    ChannelError::Malformed(reason.into())
}

/// Parses bytes that must hold one JSON object.
pub(crate) fn parse_object(bytes: &[u8], what: &str) -> Result<Value, ChannelError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(malformed(format!("{what} is not a JSON object"))),
        Err(error) => Err(malformed(format!("{what} is not valid JSON: {error}"))),
    }
}

/// What a (decrypted) callback is.
#[derive(Debug)]
pub(crate) enum Callback {
    /// The console checks the request URL; answer with the challenge.
    UrlVerification {
        /// The verification token it carries at top level.
        token: Option<String>,
        /// Echoed back verbatim.
        challenge: String,
    },
    /// A v2 event (`schema: "2.0"`).
    EventV2 {
        /// `header.token`.
        token: Option<String>,
        /// `header.event_type`.
        event_type: String,
        /// `header.event_id`: new for every delivery of a redelivered message, so only for logs.
        event_id: String,
        /// `event`.
        event: Value,
    },
    /// A v1 event (`type: "event_callback"`) or anything else carrying a top-level token. Never
    /// dispatched: apps created today get v2 events.
    Other {
        /// The top-level `token`.
        token: Option<String>,
        /// A name for the logs.
        name: String,
    },
}

impl Callback {
    /// Classifies a callback body. Only the shape is read here; nothing is trusted yet.
    pub(crate) fn parse(body: &Value) -> Result<Self, ChannelError> {
        let text = |value: &Value, key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
        if body.get("type").and_then(Value::as_str) == Some("url_verification") {
            let challenge =
                text(body, "challenge").ok_or_else(|| malformed("url_verification without a `challenge` string"))?;
            return Ok(Self::UrlVerification { token: text(body, "token"), challenge });
        }
        if let Some(header) = body.get("header").filter(|_| body.get("schema").is_some()) {
            return Ok(Self::EventV2 {
                token: text(header, "token"),
                event_type: text(header, "event_type").unwrap_or_default(),
                event_id: text(header, "event_id").unwrap_or_default(),
                event: body.get("event").cloned().unwrap_or(Value::Null),
            });
        }
        let name = body
            .get("event")
            .and_then(|event| text(event, "type"))
            .or_else(|| text(body, "type"))
            .unwrap_or_else(|| "unknown".to_owned());
        Ok(Self::Other { token: text(body, "token"), name })
    }

    /// The verification token the callback claims.
    pub(crate) fn token(&self) -> Option<&str> {
        match self {
            Self::UrlVerification { token, .. } | Self::EventV2 { token, .. } | Self::Other { token, .. } => {
                token.as_deref()
            }
        }
    }
}

/// A user's ids; which are present depends on the app's scopes.
#[derive(Debug, Default, Deserialize)]
struct UserIds {
    #[serde(default)]
    open_id: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    union_id: Option<String>,
}

impl UserIds {
    /// The most useful non-empty id: `open_id` is per-app and always present for users.
    fn best(&self) -> Option<&str> {
        [&self.open_id, &self.union_id, &self.user_id]
            .into_iter()
            .filter_map(|id| id.as_deref())
            .find(|id| !id.is_empty())
    }
}

#[derive(Debug, Deserialize)]
struct MessageEvent {
    sender: EventSender,
    message: EventMessage,
}

#[derive(Debug, Deserialize)]
struct EventSender {
    #[serde(default)]
    sender_id: UserIds,
}

#[derive(Debug, Deserialize)]
struct EventMessage {
    message_id: String,
    chat_id: String,
    chat_type: String,
    message_type: String,
    content: String,
    /// Absent (or `null`) when nobody was mentioned.
    #[serde(default)]
    mentions: Option<Vec<EventMention>>,
}

#[derive(Debug, Deserialize)]
struct EventMention {
    /// The placeholder in the text: `@_user_1`.
    key: String,
    #[serde(default)]
    id: UserIds,
    #[serde(default)]
    name: Option<String>,
}

/// What `im.message.receive_v1` parsing needs to know about the channel.
pub(crate) struct Context<'a> {
    pub(crate) channel: &'a ChannelId,
    pub(crate) kind: &'a str,
    pub(crate) received_at_ms: i64,
    /// The bot's own `open_id`, when configured.
    pub(crate) bot_open_id: Option<&'a str>,
    /// Whether group messages must mention the bot to be answered.
    pub(crate) require_mention_in_groups: bool,
}

/// One mention, resolved: whether it is the bot, and what the LLM should read in its place.
struct Mention {
    key: String,
    id: String,
    name: Option<String>,
    is_self: bool,
}

impl Mention {
    /// The bot's own mention disappears (it is addressing, not content); anyone else's becomes
    /// `@Name`, so "what does @Tom think" keeps its meaning.
    fn replacement(&self) -> String {
        if self.is_self {
            String::new()
        } else {
            format!("@{}", self.name.as_deref().filter(|name| !name.is_empty()).unwrap_or(&self.id))
        }
    }
}

/// What the caller learns besides the envelope.
pub(crate) struct Parsed {
    pub(crate) envelope: Envelope,
    /// A group mention was taken as the bot's only because `bot_open_id` is not configured.
    pub(crate) assumed_self_mention: bool,
    /// A group message mentions people, none of them the configured `bot_open_id`: a sign the
    /// setting is wrong (open_ids differ per app), where Feishu sends only messages that
    /// mention the bot.
    pub(crate) bot_not_among_mentions: bool,
}

/// Builds the envelope for an `im.message.receive_v1` event.
pub(crate) fn message_envelope(ctx: &Context<'_>, event_id: &str, event: &Value) -> Result<Parsed, ChannelError> {
    let event =
        MessageEvent::deserialize(event).map_err(|error| malformed(format!("im.message.receive_v1 event: {error}")))?;
    let message = event.message;
    for (name, value) in [("message_id", &message.message_id), ("chat_id", &message.chat_id)] {
        if value.trim().is_empty() {
            return Err(malformed(format!("message.{name} is empty")));
        }
    }
    let sender_id = event.sender.sender_id.best().ok_or_else(|| malformed("sender.sender_id has no id"))?.to_owned();
    let group = message.chat_type != "p2p";
    let kind = if group { ConversationKind::Group } else { ConversationKind::Direct };

    let mut assumed_self_mention = false;
    let listed: Vec<&EventMention> =
        message.mentions.iter().flatten().take(MAX_MENTIONS).filter(|mention| !mention.key.is_empty()).collect();
    // `@所有人` is listed like a person, without one: it never addresses the bot.
    let is_everyone = |mention: &EventMention| mention.key == "@_all" || mention.id.best().is_none();
    let first_person = listed.iter().position(|mention| !is_everyone(mention));
    let mentions: Vec<Mention> = listed
        .iter()
        .enumerate()
        .map(|(index, mention)| {
            let is_self = match ctx.bot_open_id {
                Some(bot) => mention.id.open_id.as_deref() == Some(bot),
                // Unknown identity: in a group, the first person mentioned (Feishu lists them in
                // order) is taken as the bot, as in "@bot what does @Tom think"; the others stay
                // people, named.
                None => {
                    assumed_self_mention |= group;
                    group && Some(index) == first_person
                }
            };
            Mention {
                key: mention.key.clone(),
                id: mention.id.best().unwrap_or(&mention.key).to_owned(),
                name: mention.name.clone(),
                is_self,
            }
        })
        .collect();

    let mut content = read_content(&message.message_type, &message.content, &mentions)?;
    content.extend(mentions.iter().map(|mention| Segment::Mention {
        id: mention.id.clone(),
        name: mention.name.clone(),
        is_self: mention.is_self,
    }));
    let mentioned = mentions.iter().any(|mention| mention.is_self);
    let mentions_self = !group || mentioned || !ctx.require_mention_in_groups;

    let reply_handle = ReplyHandle(serde_json::json!({
        "message_id": message.message_id,
        "chat_id": message.chat_id,
        "chat_type": message.chat_type,
        "event_id": event_id,
    }));
    let envelope = Envelope {
        id: Envelope::new_id(),
        channel: ctx.channel.clone(),
        channel_kind: ctx.kind.to_owned(),
        // NOTE: the message id, not the event id: Feishu redelivers one message under new event
        // ids for hours, and the core dedupes on this field.
        platform_message_id: message.message_id,
        received_at_ms: ctx.received_at_ms,
        conversation: Conversation { kind, id: message.chat_id },
        sender: Sender { id: sender_id, name: None },
        content,
        mentions_self,
        reply_handle,
    };
    // Only where unmentioned messages go unanswered (and Feishu sends group messages only when
    // they mention the bot, unless the app may read them all).
    let bot_not_among_mentions =
        group && ctx.require_mention_in_groups && ctx.bot_open_id.is_some() && first_person.is_some() && !mentioned;
    Ok(Parsed { envelope, assumed_self_mention: assumed_self_mention && mentioned, bot_not_among_mentions })
}

/// The segments of one message's `content` (a JSON string: parsed a second time here).
fn read_content(message_type: &str, content: &str, mentions: &[Mention]) -> Result<Vec<Segment>, ChannelError> {
    let parse = || -> Result<Value, ChannelError> {
        parse_object(content.as_bytes(), &format!("the content of a {message_type} message"))
    };
    let text = |value: &Value, key: &str| {
        value.get(key).and_then(Value::as_str).filter(|text| !text.is_empty()).map(str::to_owned)
    };
    let segments = match message_type {
        "text" => {
            let value = parse()?;
            let raw = value.get("text").and_then(Value::as_str).unwrap_or_default();
            text_segment(replace_mentions(raw, mentions))
        }
        "post" => {
            let value = parse()?;
            let mut images = Vec::new();
            let flat = flatten_post(&value, mentions, &mut images);
            let mut segments = text_segment(flat);
            segments.extend(images.into_iter().map(|key| Segment::Image { url: None, media_id: Some(key) }));
            segments
        }
        "image" => {
            let value = parse()?;
            vec![Segment::Image { url: None, media_id: text(&value, "image_key") }]
        }
        "file" => {
            let value = parse()?;
            vec![Segment::File { media_id: text(&value, "file_key"), name: text(&value, "file_name") }]
        }
        "audio" => {
            let value = parse()?;
            vec![Segment::Voice { media_id: text(&value, "file_key"), format: None, recognition: None }]
        }
        "media" => {
            let value = parse()?;
            vec![Segment::Video { media_id: text(&value, "file_key"), thumb_media_id: text(&value, "image_key") }]
        }
        // A sticker is a picture: the user is told, as for any picture, that only text is read
        // (as an event it would get no answer at all).
        "sticker" => {
            let value = parse()?;
            vec![Segment::Image { url: None, media_id: text(&value, "file_key") }]
        }
        // Shared chats and users, cards, red packets, merged forwards, system notices …: nothing
        // the model can read, and some are not the user's words. Kept as a named event so the
        // envelope is never empty.
        other => vec![Segment::Event(Event::Other { name: format!("message:{other}") })],
    };
    Ok(segments)
}

/// One text segment, unless the text is blank (e.g. a message that was only the bot's mention).
fn text_segment(text: String) -> Vec<Segment> {
    let text = text.trim().to_owned();
    if text.is_empty() {
        Vec::new()
    } else {
        vec![Segment::Text { text }]
    }
}

/// Replaces each `@_user_N` placeholder with its mention's [`Mention::replacement`], in one pass
/// (so `@_user_1` never eats the start of `@_user_10`, and a name cannot itself be replaced).
fn replace_mentions(text: &str, mentions: &[Mention]) -> String {
    if mentions.is_empty() {
        return text.to_owned();
    }
    let mut by_length: Vec<&Mention> = mentions.iter().collect();
    by_length.sort_by_key(|mention| std::cmp::Reverse(mention.key.len()));
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('@') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        match by_length.iter().find(|mention| tail.starts_with(mention.key.as_str())) {
            Some(mention) => {
                let replacement = mention.replacement();
                let mut after = &tail[mention.key.len()..];
                if replacement.is_empty() {
                    // Drop one space after a removed mention so "@bot hi" reads "hi".
                    after = after.strip_prefix(' ').unwrap_or(after);
                }
                out.push_str(&replacement);
                rest = after;
            }
            None => {
                out.push('@');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Rich text (`post`) → plain text: the title, then one line per paragraph. Images inside it
/// are collected into `images` (their keys).
///
/// The content is either `{title, content}` directly (as in receive events) or wrapped in a
/// locale (`zh_cn`, `en_us`, …, as in sent messages); the first locale found is used.
fn flatten_post(value: &Value, mentions: &[Mention], images: &mut Vec<String>) -> String {
    let body = if value.get("content").is_some() {
        Some(value)
    } else {
        ["zh_cn", "en_us", "ja_jp"]
            .iter()
            .find_map(|locale| value.get(*locale))
            .or_else(|| value.as_object().and_then(|map| map.values().find(|v| v.get("content").is_some())))
    };
    let Some(body) = body else { return String::new() };
    let mut lines = Vec::new();
    if let Some(title) = body.get("title").and_then(Value::as_str).filter(|title| !title.trim().is_empty()) {
        lines.push(title.to_owned());
    }
    for paragraph in body.get("content").and_then(Value::as_array).into_iter().flatten() {
        let mut line = String::new();
        for element in paragraph.as_array().into_iter().flatten() {
            flatten_element(element, mentions, images, &mut line);
        }
        lines.push(line);
    }
    lines.join("\n")
}

/// Appends one post element's readable text to `line`.
fn flatten_element(element: &Value, mentions: &[Mention], images: &mut Vec<String>, line: &mut String) {
    let field = |key: &str| element.get(key).and_then(Value::as_str).unwrap_or_default();
    match field("tag") {
        "text" | "md" => line.push_str(&replace_mentions(field("text"), mentions)),
        "a" => {
            let (text, href) = (field("text"), field("href"));
            line.push_str(text);
            if !href.is_empty() && href != text {
                line.push_str(&format!(" ({href})"));
            }
        }
        "at" => {
            // In receive events `user_id` is the placeholder (`@_user_1`); resolve it like text.
            let key = field("user_id");
            match mentions.iter().find(|mention| mention.key == key) {
                Some(mention) => line.push_str(&mention.replacement()),
                None => {
                    let name = [field("user_name"), key].into_iter().find(|name| !name.is_empty());
                    if let Some(name) = name {
                        line.push('@');
                        line.push_str(name.trim_start_matches('@'));
                    }
                }
            }
        }
        "code_block" => {
            if !line.is_empty() {
                line.push('\n');
            }
            line.push_str(&format!("```{}\n{}\n```", field("language").to_ascii_lowercase(), field("text").trim_end()));
        }
        "hr" => line.push_str("\n---\n"),
        "emotion" => {
            let emoji = field("emoji_type");
            if !emoji.is_empty() {
                line.push_str(&format!("[{emoji}]"));
            }
        }
        "img" => {
            let key = field("image_key");
            if !key.is_empty() {
                images.push(key.to_owned());
            }
        }
        // Unknown or future tags: keep whatever text they carry.
        _ => line.push_str(field("text")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mention(key: &str, name: &str, is_self: bool) -> Mention {
        Mention { key: key.into(), id: format!("ou_{name}"), name: Some(name.into()), is_self }
    }

    #[test]
    fn a_placeholder_is_never_confused_with_a_longer_one() {
        let mentions = [mention("@_user_1", "Bot", true), mention("@_user_10", "Tom", false)];
        assert_eq!(replace_mentions("@_user_1 ask @_user_10 now", &mentions), "ask @Tom now");
    }

    #[test]
    fn names_that_look_like_placeholders_are_not_replaced_again() {
        let mentions = [mention("@_user_1", "@_user_2", false), mention("@_user_2", "X", false)];
        assert_eq!(replace_mentions("@_user_1", &mentions), "@@_user_2");
    }

    #[test]
    fn a_lone_at_sign_and_unknown_placeholders_stay() {
        let mentions = [mention("@_user_1", "Bot", true)];
        assert_eq!(replace_mentions("mail a@b.c @_user_9 @", &mentions), "mail a@b.c @_user_9 @");
    }

    #[test]
    fn posts_flatten_in_either_shape() {
        let direct = json!({"title": "T", "content": [[{"tag": "text", "text": "a"}, {"tag": "a", "text": "link", "href": "https://x.y"}]]});
        let mut images = Vec::new();
        assert_eq!(flatten_post(&direct, &[], &mut images), "T\nalink (https://x.y)");
        let wrapped = json!({"en_us": {"title": "", "content": [[{"tag": "text", "text": "b"}], [{"tag": "img", "image_key": "img_1"}]]}});
        assert_eq!(flatten_post(&wrapped, &[], &mut images), "b\n");
        assert_eq!(images, vec!["img_1".to_owned()]);
        assert_eq!(flatten_post(&json!({"x": 1}), &[], &mut images), "");
    }

    #[test]
    fn post_code_blocks_and_mentions_are_kept_readable() {
        let mentions = [mention("@_user_1", "Bot", true), mention("@_user_2", "Tom", false)];
        let post = json!({"content": [
            [{"tag": "at", "user_id": "@_user_1", "user_name": "Bot"}, {"tag": "text", "text": "ask "}, {"tag": "at", "user_id": "@_user_2"}],
            [{"tag": "code_block", "language": "RUST", "text": "fn main() {}\n"}],
            [{"tag": "emotion", "emoji_type": "SMILE"}, {"tag": "future", "text": "kept"}]
        ]});
        let flat = flatten_post(&post, &mentions, &mut Vec::new());
        assert_eq!(flat, "ask @Tom\n```rust\nfn main() {}\n```\n[SMILE]kept");
    }

    #[test]
    fn unknown_message_types_become_a_named_event_and_stickers_a_picture() {
        let segments = read_content("share_chat", "{\"chat_id\":\"oc_1\"}", &[]).unwrap_or_default();
        assert_eq!(segments, vec![Segment::Event(Event::Other { name: "message:share_chat".into() })]);
        let segments = read_content("sticker", "{\"file_key\":\"f\"}", &[]).unwrap_or_default();
        assert_eq!(segments, vec![Segment::Image { url: None, media_id: Some("f".into()) }]);
    }

    #[test]
    fn files_audio_and_video_keep_their_keys() {
        let file = read_content("file", r#"{"file_key":"fk","file_name":"a.pdf"}"#, &[]).unwrap_or_default();
        assert_eq!(file, vec![Segment::File { media_id: Some("fk".into()), name: Some("a.pdf".into()) }]);
        let video = read_content("media", r#"{"file_key":"fk","image_key":"ik"}"#, &[]).unwrap_or_default();
        assert_eq!(video, vec![Segment::Video { media_id: Some("fk".into()), thumb_media_id: Some("ik".into()) }]);
        assert!(read_content("text", "not json", &[]).is_err());
    }
}
