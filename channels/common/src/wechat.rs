//! The WeChat family's push messages (公众号 and 企业微信 share one XML layout): required
//! fields, the content segment of each `MsgType`, and the dedupe key.
//!
//! Only event names differ between the two platforms, so each channel passes its own event
//! mapping to [`message_segment`].

use crate::xml::Fields;
use yizhan_channel_core::{ChannelError, Event, Segment};

/// Fields a push cannot do without; a missing one makes the push malformed (400).
pub trait RequiredFields {
    /// The trimmed value; absent or blank is an error.
    fn required(&self, name: &str) -> Result<&str, ChannelError>;
    /// A finite number; absent or garbage is an error.
    fn number(&self, name: &str) -> Result<f64, ChannelError>;
}

impl RequiredFields for Fields {
    fn required(&self, name: &str) -> Result<&str, ChannelError> {
        self.get(name).ok_or_else(|| ChannelError::Malformed(format!("field <{name}> is missing or empty")))
    }

    fn number(&self, name: &str) -> Result<f64, ChannelError> {
        self.optional_number(name)
            .ok_or_else(|| ChannelError::Malformed(format!("field <{name}> is missing or not a number")))
    }
}

/// The content of a push of type `msg_type`; `event` maps `MsgType=event` pushes. Unknown types
/// become [`Event::Other`] so that nothing fails to parse.
pub fn message_segment(
    msg_type: &str,
    fields: &Fields,
    event: impl FnOnce(&Fields) -> Result<Event, ChannelError>,
) -> Result<Segment, ChannelError> {
    Ok(match msg_type {
        "text" => Segment::Text { text: fields.raw("Content").unwrap_or_default().to_owned() },
        "image" => Segment::Image { url: fields.owned("PicUrl"), media_id: fields.owned("MediaId") },
        "voice" => Segment::Voice {
            media_id: fields.owned("MediaId"),
            format: fields.owned("Format"),
            recognition: fields.owned("Recognition"),
        },
        "video" | "shortvideo" => {
            Segment::Video { media_id: fields.owned("MediaId"), thumb_media_id: fields.owned("ThumbMediaId") }
        }
        "location" => Segment::Location {
            latitude: fields.number("Location_X")?,
            longitude: fields.number("Location_Y")?,
            scale: fields.optional_number("Scale"),
            label: fields.owned("Label"),
        },
        "link" => Segment::Link {
            title: fields.owned("Title"),
            description: fields.owned("Description"),
            url: fields.required("Url")?.to_owned(),
        },
        "event" => Segment::Event(event(fields)?),
        other => Segment::Event(Event::Other { name: format!("msgtype:{other}") }),
    })
}

/// The event of a `MsgType=event` push: `platform` maps the platform's own names (given lower
/// case, with the `EventKey`) first, then the ones both share. Names are compared without case,
/// as the platforms write some in upper case (`SCAN`, `CLICK`, `LOCATION`) and may change it.
/// Nothing is refused: a push without a name, or a location report without a position (the
/// user denied it), is [`Event::Other`], as a refusal would only bring the platform's retries
/// and the user its error page.
pub fn event(fields: &Fields, platform: impl FnOnce(&str, Option<String>) -> Option<Event>) -> Event {
    let name = fields.get("Event").unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    let key = fields.owned("EventKey");
    match lower.as_str() {
        "unsubscribe" => Event::Unsubscribe,
        "location" => match (fields.number("Latitude"), fields.number("Longitude")) {
            (Ok(latitude), Ok(longitude)) => {
                Event::Location { latitude, longitude, precision: fields.optional_number("Precision") }
            }
            _ => Event::Other { name: name.to_owned() },
        },
        "click" => Event::MenuClick { key: key.unwrap_or_default() },
        "view" => Event::MenuView { url: key.unwrap_or_default() },
        own => platform(own, key).unwrap_or_else(|| Event::Other { name: name.to_owned() }),
    }
}

/// The dedupe key (PROTOCOLS §2.4, §3.2): `MsgId` for messages; for events, which carry no id,
/// sender + `CreateTime` as the platform suggests, plus `Event` and `EventKey`: two different
/// events often share a second (`subscribe` and the `LOCATION` report on entering, two menu
/// clicks), and a retry repeats every field.
///
/// An `EventKey` longer than [`MAX_KEY_IN_DEDUPE`] (a menu's URL, up to 1 KiB) is kept as its
/// SHA-256 digest, so that keys stay short.
pub fn dedupe_key(fields: &Fields, sender: &str) -> Result<String, ChannelError> {
    match fields.get("MsgId") {
        Some(msg_id) => Ok(msg_id.to_owned()),
        None => {
            let event_key = fields.get("EventKey").unwrap_or_default();
            let event_key = if event_key.len() > MAX_KEY_IN_DEDUPE {
                use sha2::Digest;
                std::borrow::Cow::Owned(format!("sha256:{}", hex::encode(sha2::Sha256::digest(event_key.as_bytes()))))
            } else {
                std::borrow::Cow::Borrowed(event_key)
            };
            Ok(format!(
                "{sender}:{}:{}:{event_key}",
                fields.required("CreateTime")?,
                fields.get("Event").unwrap_or_default(),
            ))
        }
    }
}

/// The longest `EventKey` kept as it is in a dedupe key.
const MAX_KEY_IN_DEDUPE: usize = 128;

/// `text` without the control characters XML cannot carry, which the WeChat family's send APIs'
/// JSON would carry as `\u001b`-style escapes they refuse (公众号 errcode 40033); tabs and line
/// breaks stay. The passive reply's XML cannot carry them either.
pub fn without_control_characters(text: &str) -> String {
    text.chars().filter(|&ch| is_xml_char(ch)).collect()
}

/// Whether XML 1.0 allows `ch` at all (even CDATA cannot carry the others, and WeChat rejects
/// documents that contain them).
pub fn is_xml_char(ch: char) -> bool {
    matches!(ch, '\t' | '\n' | '\r') || (ch >= ' ' && ch != '\u{FFFE}' && ch != '\u{FFFF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        let mut fields = Fields::new();
        for (name, value) in pairs {
            fields.insert(name, value.to_string());
        }
        fields
    }

    #[test]
    fn events_without_their_name_or_position_are_other_not_malformed() {
        let no_own = |_: &str, _: Option<String>| None;
        let report = fields(&[("Event", "LOCATION")]);
        assert!(matches!(event(&report, no_own), Event::Other { ref name } if name == "LOCATION"));
        let nameless = fields(&[("MsgType", "event")]);
        assert!(matches!(event(&nameless, no_own), Event::Other { ref name } if name.is_empty()));
        let located = fields(&[("Event", "LOCATION"), ("Latitude", "23.1"), ("Longitude", "113.3")]);
        assert!(matches!(event(&located, no_own), Event::Location { latitude, .. } if latitude == 23.1));
        let click = fields(&[("Event", "CLICK"), ("EventKey", "K")]);
        assert!(matches!(event(&click, no_own), Event::MenuClick { ref key } if key == "K"));
        // The platform's own names come first, given lower case.
        let own = fields(&[("Event", "ENTER_AGENT")]);
        assert!(matches!(event(&own, |name, _| (name == "enter_agent").then_some(Event::EnterChat)), Event::EnterChat));
    }

    #[test]
    fn messages_dedupe_on_msg_id_and_events_on_sender_and_time() {
        assert_eq!(dedupe_key(&fields(&[("MsgId", "42")]), "u").ok().as_deref(), Some("42"));
        assert_eq!(dedupe_key(&fields(&[("CreateTime", "7")]), "u").ok().as_deref(), Some("u:7::"));
        assert!(dedupe_key(&fields(&[]), "u").is_err());
        // Different events in one second are different messages; a retry repeats every field.
        let event = |name: &str, key: &str| {
            dedupe_key(&fields(&[("CreateTime", "7"), ("Event", name), ("EventKey", key)]), "u").ok()
        };
        assert_ne!(event("subscribe", ""), event("LOCATION", ""));
        assert_ne!(event("CLICK", "menu_a"), event("CLICK", "menu_b"));
        assert_eq!(event("CLICK", "menu_a"), event("CLICK", "menu_a"));
        // A long menu URL is digested: the key stays short, distinct and stable.
        let (url_a, url_b) =
            (format!("https://a.example/{}", "x".repeat(1_000)), format!("https://b.example/{}", "x".repeat(1_000)));
        let (view_a, view_b) = (event("VIEW", &url_a), event("VIEW", &url_b));
        assert!(view_a.as_ref().is_some_and(|key| key.len() < 128), "{view_a:?}");
        assert_ne!(view_a, view_b);
        assert_eq!(view_a, event("VIEW", &url_a));
    }

    #[test]
    fn a_location_without_coordinates_is_malformed_and_unknown_types_are_kept() {
        let no_event = |_: &Fields| Ok(Event::Unsubscribe);
        assert!(message_segment("location", &fields(&[("Location_X", "1")]), no_event).is_err());
        let other = message_segment("miniprogrampage", &fields(&[]), no_event).ok();
        assert_eq!(other, Some(Segment::Event(Event::Other { name: "msgtype:miniprogrampage".into() })));
    }
}
