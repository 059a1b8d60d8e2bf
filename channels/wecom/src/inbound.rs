//! Callback bodies → fields → [`Envelope`]: the outer envelope (`ToUserName`, `Encrypt`,
//! `AgentID`) and the decrypted message, in XML or in WeCom's JSON callback variant.
//!
//! Invariants: parsing never panics; a body that is neither well-formed XML nor a JSON object is
//! [`ChannelError::Malformed`]; a decrypted message without sender or type is `Malformed`; an
//! unknown message type or event is kept as [`Event::Other`] rather than refused. Element names
//! are matched without case, because the JSON variant spells them differently (`tousername`,
//! `AgentId`).
//!
//! The XML reader is the shared one (`yizhan_channel_common::xml`); WeCom's element layout is
//! the same as the 公众号's.

use serde_json::Value;
use yizhan_channel_common::wechat::{dedupe_key, message_segment, RequiredFields};
use yizhan_channel_common::xml::{read_xml, Fields};
use yizhan_channel_core::{
    ChannelError, ChannelId, Conversation, ConversationKind, Envelope, Event, ReplyHandle, Sender,
};

/// The format a callback arrived in; the decrypted message has the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `<xml>…</xml>`, the classic callback.
    Xml,
    /// `{"tousername", "encrypt", "agentid"}`, the JSON callback.
    Json,
}

fn malformed(reason: impl Into<String>) -> ChannelError {
    ChannelError::Malformed(reason.into())
}

/// Tells XML from JSON by the first non-blank byte (a UTF-8 BOM is skipped).
pub(crate) fn sniff(body: &[u8]) -> Result<Format, ChannelError> {
    let body = without_bom(body);
    match body.iter().find(|byte| !byte.is_ascii_whitespace()) {
        Some(b'<') => Ok(Format::Xml),
        Some(b'{') => Ok(Format::Json),
        Some(_) => Err(malformed("body is neither XML nor a JSON object")),
        None => Err(malformed("body is empty")),
    }
}

/// `body` without a leading UTF-8 byte-order mark (serde_json refuses one; the XML reader
/// skips it itself).
fn without_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(body)
}

/// Reads a body in the given format.
pub(crate) fn parse(body: &[u8], format: Format) -> Result<Fields, ChannelError> {
    match format {
        Format::Xml => parse_xml(body),
        Format::Json => parse_json(body),
    }
}

/// Reads the top-level members of a JSON object. Strings are taken as they are, numbers and
/// booleans in their JSON spelling (so a 64-bit `MsgId` keeps every digit); nested values are
/// ignored, as nested XML elements are.
pub(crate) fn parse_json(body: &[u8]) -> Result<Fields, ChannelError> {
    let value: Value =
        serde_json::from_slice(without_bom(body)).map_err(|error| malformed(format!("invalid JSON: {error}")))?;
    let Value::Object(members) = value else {
        return Err(malformed("the JSON body is not an object"));
    };
    let mut fields = Fields::ignoring_case();
    for (name, value) in members {
        let text = match value {
            Value::String(text) => text,
            Value::Number(number) => number.to_string(),
            Value::Bool(flag) => flag.to_string(),
            Value::Null | Value::Array(_) | Value::Object(_) => continue,
        };
        fields.insert(&name, text);
    }
    Ok(fields)
}

/// Reads the root's child elements from an XML body (names matched without case).
pub(crate) fn parse_xml(body: &[u8]) -> Result<Fields, ChannelError> {
    let mut fields = Fields::ignoring_case();
    read_xml(body, &mut fields).map_err(|error| malformed(error.0))?;
    Ok(fields)
}

/// Builds the envelope for one decrypted message or event.
///
/// The conversation is always direct: a self-built app's callbacks come from one member talking
/// to the app (group chats created through `appchat` push nothing back).
pub(crate) fn to_envelope(
    fields: &Fields,
    channel: &ChannelId,
    kind: &str,
    received_at_ms: i64,
    run: &str,
) -> Result<Envelope, ChannelError> {
    let userid = fields.required("FromUserName")?;
    let msg_type = fields.required("MsgType")?;
    let content = vec![message_segment(msg_type, fields, event)?];
    // Dedupe key (PROTOCOLS §3.2): MsgId for messages, sender + CreateTime for events.
    let platform_message_id = dedupe_key(fields, userid)?;
    let agent_id = fields.get("AgentID").and_then(|id| id.parse::<i64>().ok());
    Ok(Envelope {
        id: Envelope::new_id(),
        channel: channel.clone(),
        channel_kind: kind.to_owned(),
        platform_message_id,
        received_at_ms,
        conversation: Conversation { kind: ConversationKind::Direct, id: userid.to_owned() },
        sender: Sender { id: userid.to_owned(), name: None },
        content,
        mentions_self: true,
        // Which run accepted it: a part of a message from before a restart is sent differently
        // (see `repeats`).
        reply_handle: ReplyHandle(serde_json::json!({ "agent_id": agent_id, "run": run })),
    })
}

/// The event a signed callback reports. Lenient: an event WeCom sends without its name or with
/// fields missing is `Other` (nothing to answer), not a malformed request that WeCom would retry
/// three times, each logged as an error.
fn event(fields: &Fields) -> Result<Event, ChannelError> {
    Ok(yizhan_channel_common::wechat::event(fields, |name, _key| match name {
        "enter_agent" => Some(Event::EnterChat),
        // A member joined the app's visible range; WeCom sends no QR scene for apps.
        "subscribe" => Some(Event::Subscribe { scene: None }),
        _ => None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(xml: &str) -> Result<Fields, ChannelError> {
        parse_xml(xml.as_bytes())
    }

    #[test]
    fn names_are_matched_without_case() {
        let parsed = fields("<xml><AgentId>7</AgentId></xml>").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.get("AgentID"), Some("7"));
        let parsed =
            parse_json(br#"{"tousername":"ww1","Encrypt":"x","agentid":218}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.get("ToUserName"), Some("ww1"));
        assert_eq!(parsed.get("encrypt"), Some("x"));
        assert_eq!(parsed.get("AgentID"), Some("218"));
    }

    #[test]
    fn json_numbers_keep_every_digit_and_nested_values_are_ignored() {
        let parsed = parse_json(br#"{"MsgId":4561255354251345929,"Nested":{"a":1},"List":[1],"N":null}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.get("MsgId"), Some("4561255354251345929"));
        assert_eq!(parsed.get("Nested"), None);
        assert_eq!(parsed.get("List"), None);
        assert_eq!(parsed.get("N"), None);
    }

    #[test]
    fn broken_json_is_malformed() {
        for body in ["", "{", "[1]", "\"s\"", "{\"a\":}"] {
            assert!(matches!(parse_json(body.as_bytes()), Err(ChannelError::Malformed(_))), "{body:?}");
        }
    }

    #[test]
    fn the_format_is_told_by_the_first_byte() {
        assert_eq!(sniff(b"  <xml/>").ok(), Some(Format::Xml));
        assert_eq!(sniff(b"\xEF\xBB\xBF{}").ok(), Some(Format::Json));
        let with_bom = parse_json(b"\xEF\xBB\xBF{\"MsgId\": 7}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(with_bom.get("MsgId"), Some("7"));
        assert!(sniff(b"").is_err());
        assert!(sniff(b" \n").is_err());
        assert!(sniff(b"hello").is_err());
    }

    #[test]
    fn broken_documents_are_malformed() {
        for body in ["", "<xml>", "<!DOCTYPE x [<!ENTITY a \"b\">]><xml><a>&a;</a></xml>"] {
            assert!(matches!(fields(body), Err(ChannelError::Malformed(_))), "accepted {body:?}");
        }
        assert!(matches!(parse_xml(b"<xml>\xff</xml>"), Err(ChannelError::Malformed(_))));
    }

    #[test]
    fn wecoms_own_events_are_mapped() {
        let enter = fields("<xml><Event>enter_agent</Event></xml>").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(event(&enter), Ok(Event::EnterChat)));
        let joined =
            fields("<xml><Event>subscribe</Event><EventKey>x</EventKey></xml>").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(event(&joined), Ok(Event::Subscribe { scene: None })));
    }

    #[test]
    fn non_finite_coordinates_are_refused() {
        let parsed = fields("<xml><Location_X>NaN</Location_X><Location_Y>1</Location_Y></xml>")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(parsed.number("Location_X").is_err());
        assert_eq!(parsed.optional_number("Location_Y"), Some(1.0));
    }
}
