//! Pushed XML → [`Envelope`]: every message type and event WeChat documents, and a neutral
//! fallback for the ones it adds later.
//!
//! Invariants: parsing never panics; a body that is not well-formed XML, or lacks the fields
//! every push has (`ToUserName`, `FromUserName`, `MsgType`), is [`ChannelError::Malformed`]; an
//! unknown message type or event is kept as [`Event::Other`] rather than refused.

use quick_xml::events::Event as XmlEvent;
use quick_xml::Reader;
use std::collections::HashMap;
use yizhan_channel_core::{
    ChannelError, ChannelId, Conversation, ConversationKind, Envelope, Event, ReplyHandle, Segment,
    Sender,
};

/// The text of the root element's direct children, by element name (`MsgType` → `text`).
///
/// WeChat pushes are flat; the few nested elements some events carry (`ScanCodeInfo`,
/// `SendPicsInfo`) contribute only their direct text, which no field we read needs.
#[derive(Debug, Default)]
pub(crate) struct Fields(HashMap<String, String>);

impl Fields {
    /// The raw value, untrimmed (message text keeps its whitespace).
    pub(crate) fn raw(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// The trimmed value, `None` when absent or blank.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.raw(name).map(str::trim).filter(|value| !value.is_empty())
    }

    fn owned(&self, name: &str) -> Option<String> {
        self.get(name).map(str::to_owned)
    }

    fn required(&self, name: &str) -> Result<&str, ChannelError> {
        self.get(name).ok_or_else(|| malformed(format!("element <{name}> is missing or empty")))
    }

    /// A finite number; a coordinate that is absent or garbage makes the push malformed.
    fn number(&self, name: &str) -> Result<f64, ChannelError> {
        self.optional_number(name)
            .ok_or_else(|| malformed(format!("element <{name}> is missing or not a number")))
    }

    /// A finite number, or `None`. Non-finite values are dropped because envelopes are
    /// journaled as JSON, which cannot carry NaN.
    fn optional_number(&self, name: &str) -> Option<f64> {
        self.get(name).and_then(|value| value.parse::<f64>().ok()).filter(|value| value.is_finite())
    }
}

fn malformed(reason: impl Into<String>) -> ChannelError {
    ChannelError::Malformed(reason.into())
}

/// Reads the root's child elements from a pushed body.
pub(crate) fn parse_fields(body: &[u8]) -> Result<Fields, ChannelError> {
    let text = std::str::from_utf8(body).map_err(|_| malformed("body is not UTF-8"))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = Reader::from_str(text);
    let mut fields = HashMap::new();
    let mut depth = 0usize;
    let mut seen_root = false;
    // The child element being read: its name and its text and CDATA chunks.
    let mut current: Option<(String, Vec<Chunk>)> = None;
    loop {
        let event = reader.read_event().map_err(|error| {
            malformed(format!("invalid XML near byte {}: {error}", reader.error_position()))
        })?;
        match event {
            XmlEvent::Start(start) => {
                if depth == 0 {
                    if seen_root {
                        return Err(malformed("more than one root element"));
                    }
                    seen_root = true;
                } else if depth == 1 {
                    current = Some((element_name(start.name().as_ref())?, Vec::new()));
                }
                depth += 1;
            }
            XmlEvent::Empty(start) => {
                if depth == 0 {
                    if seen_root {
                        return Err(malformed("more than one root element"));
                    }
                    seen_root = true;
                } else if depth == 1 {
                    fields.entry(element_name(start.name().as_ref())?).or_insert_with(String::new);
                }
            }
            XmlEvent::End(_) => {
                depth = depth.checked_sub(1).ok_or_else(|| malformed("unexpected closing tag"))?;
                if depth == 1 {
                    if let Some((name, chunks)) = current.take() {
                        // NOTE: the first occurrence wins; WeChat never repeats a field.
                        fields.entry(name).or_insert_with(|| join_chunks(chunks));
                    }
                }
            }
            XmlEvent::Text(text) => {
                let text = text
                    .unescape()
                    .map_err(|error| malformed(format!("bad character reference: {error}")))?;
                if depth == 0 && !text.trim().is_empty() {
                    return Err(malformed("text outside the root element"));
                }
                if depth == 2 {
                    if let Some((_, chunks)) = current.as_mut() {
                        chunks.push(Chunk::Text(text.into_owned()));
                    }
                }
            }
            XmlEvent::CData(data) => {
                if depth == 0 {
                    return Err(malformed("CDATA outside the root element"));
                }
                if depth == 2 {
                    let data = data.decode().map_err(|_| malformed("CDATA is not UTF-8"))?;
                    if let Some((_, chunks)) = current.as_mut() {
                        chunks.push(Chunk::CData(data.into_owned()));
                    }
                }
            }
            // NOTE: refused rather than ignored: WeChat never sends one, and entity definitions
            // are how XML bombs start.
            XmlEvent::DocType(_) => return Err(malformed("DOCTYPE is not allowed")),
            XmlEvent::Decl(_) | XmlEvent::PI(_) | XmlEvent::Comment(_) => {}
            XmlEvent::Eof => break,
        }
    }
    if !seen_root {
        return Err(malformed("no XML element in the body"));
    }
    if depth != 0 {
        return Err(malformed("the root element is not closed"));
    }
    Ok(Fields(fields))
}

enum Chunk {
    Text(String),
    CData(String),
}

/// An element's value. When it holds CDATA, the whitespace around the CDATA is formatting, not
/// content, so whitespace-only text chunks are dropped.
fn join_chunks(chunks: Vec<Chunk>) -> String {
    let has_cdata = chunks.iter().any(|chunk| matches!(chunk, Chunk::CData(_)));
    chunks
        .into_iter()
        .filter_map(|chunk| match chunk {
            Chunk::CData(data) => Some(data),
            Chunk::Text(text) if has_cdata && text.trim().is_empty() => None,
            Chunk::Text(text) => Some(text),
        })
        .collect()
}

fn element_name(raw: &[u8]) -> Result<String, ChannelError> {
    std::str::from_utf8(raw).map(str::to_owned).map_err(|_| malformed("element name is not UTF-8"))
}

/// Builds the envelope for one push.
pub(crate) fn to_envelope(
    fields: &Fields,
    channel: &ChannelId,
    kind: &str,
    received_at_ms: i64,
) -> Result<Envelope, ChannelError> {
    let openid = fields.required("FromUserName")?;
    let account = fields.required("ToUserName")?;
    let msg_type = fields.required("MsgType")?;
    let content = segments(msg_type, fields)?;
    // Dedupe key (PROTOCOLS §2.4): MsgId for messages, sender + CreateTime for events.
    let platform_message_id = match fields.get("MsgId") {
        Some(msg_id) => msg_id.to_owned(),
        None => format!("{openid}:{}", fields.required("CreateTime")?),
    };
    Ok(Envelope {
        id: Envelope::new_id(),
        channel: channel.clone(),
        channel_kind: kind.to_owned(),
        platform_message_id,
        received_at_ms,
        conversation: Conversation { kind: ConversationKind::Direct, id: openid.to_owned() },
        sender: Sender { id: openid.to_owned(), name: None },
        content,
        mentions_self: true,
        reply_handle: ReplyHandle(serde_json::json!({ "account": account })),
    })
}

fn segments(msg_type: &str, fields: &Fields) -> Result<Vec<Segment>, ChannelError> {
    let segment = match msg_type {
        "text" => Segment::Text { text: fields.raw("Content").unwrap_or_default().to_owned() },
        "image" => Segment::Image { url: fields.owned("PicUrl"), media_id: fields.owned("MediaId") },
        "voice" => Segment::Voice {
            media_id: fields.owned("MediaId"),
            format: fields.owned("Format"),
            recognition: fields.owned("Recognition"),
        },
        "video" | "shortvideo" => Segment::Video {
            media_id: fields.owned("MediaId"),
            thumb_media_id: fields.owned("ThumbMediaId"),
        },
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
    };
    Ok(vec![segment])
}

fn event(fields: &Fields) -> Result<Event, ChannelError> {
    let name = fields.required("Event")?;
    let key = fields.owned("EventKey");
    // WeChat writes most event names in lower case and some in upper case (`SCAN`, `CLICK`);
    // compare without case so a change of spelling does not turn them into `Other`.
    let event = match name.to_ascii_lowercase().as_str() {
        "subscribe" => Event::Subscribe {
            scene: key
                .map(|key| key.strip_prefix("qrscene_").map(str::to_owned).unwrap_or(key))
                .filter(|scene| !scene.is_empty()),
        },
        "unsubscribe" => Event::Unsubscribe,
        "scan" => Event::Scan { scene: key },
        "location" => Event::Location {
            latitude: fields.number("Latitude")?,
            longitude: fields.number("Longitude")?,
            precision: fields.optional_number("Precision"),
        },
        "click" => Event::MenuClick { key: key.unwrap_or_default() },
        "view" => Event::MenuView { url: key.unwrap_or_default() },
        _ => Event::Other { name: name.to_owned() },
    };
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(xml: &str) -> Result<Fields, ChannelError> {
        parse_fields(xml.as_bytes())
    }

    #[test]
    fn cdata_and_plain_text_values_are_both_read() {
        let parsed = fields(
            "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><CreateTime>123</CreateTime>\
             <Content> <![CDATA[a]]>]]&gt;<![CDATA[b]]> </Content></xml>",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.get("ToUserName"), Some("gh_1"));
        assert_eq!(parsed.get("CreateTime"), Some("123"));
        assert_eq!(parsed.raw("Content"), Some("a]]>b"));
    }

    #[test]
    fn entities_in_plain_text_are_unescaped_and_unknown_ones_refused() {
        let parsed = fields("<xml><Content>a &lt;b&gt; &amp; &#x4F60;</Content></xml>")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.raw("Content"), Some("a <b> & 你"));
        assert!(matches!(fields("<xml><Content>&bogus;</Content></xml>"), Err(ChannelError::Malformed(_))));
    }

    #[test]
    fn nested_and_unknown_elements_are_ignored() {
        let parsed = fields(
            "<?xml version=\"1.0\"?><xml><!-- c --><Unknown>x</Unknown>\
             <ScanCodeInfo><ScanType>qrcode</ScanType></ScanCodeInfo><MsgType>event</MsgType><Empty/></xml>",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.get("MsgType"), Some("event"));
        assert_eq!(parsed.get("ScanType"), None);
        assert_eq!(parsed.raw("Empty"), Some(""));
    }

    #[test]
    fn broken_documents_are_malformed() {
        for body in [
            "",
            "   ",
            "<xml>",
            "<xml><a></b></xml>",
            "<xml></xml><xml></xml>",
            "hello",
            "<xml><a>1</a></xml>trailing",
            "<!DOCTYPE x [<!ENTITY a \"b\">]><xml><a>&a;</a></xml>",
            "{\"json\": true}",
        ] {
            assert!(matches!(fields(body), Err(ChannelError::Malformed(_))), "accepted {body:?}");
        }
        assert!(matches!(parse_fields(b"<xml>\xff</xml>"), Err(ChannelError::Malformed(_))));
    }

    #[test]
    fn non_finite_coordinates_are_refused() {
        let parsed = fields("<xml><Location_X>NaN</Location_X><Location_Y>1</Location_Y></xml>")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(parsed.number("Location_X").is_err());
        assert_eq!(parsed.optional_number("Location_Y"), Some(1.0));
    }
}
