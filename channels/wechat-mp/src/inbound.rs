//! Pushed XML → [`Envelope`]: every message type and event WeChat documents, and a neutral
//! fallback for the ones it adds later.
//!
//! Invariants: parsing never panics; a body that is not well-formed XML, or lacks the fields
//! every push has (`ToUserName`, `FromUserName`, `MsgType`), is [`ChannelError::Malformed`]; an
//! unknown message type or event is kept as [`Event::Other`] rather than refused.

use yizhan_channel_common::wechat::{dedupe_key, message_segment, RequiredFields};
use yizhan_channel_common::xml::{read_xml, Fields};
use yizhan_channel_core::{
    ChannelError, ChannelId, Conversation, ConversationKind, Envelope, Event, ReplyHandle, Sender,
};

fn malformed(reason: impl Into<String>) -> ChannelError {
    ChannelError::Malformed(reason.into())
}

/// Reads the root's child elements from a pushed body (names matched exactly).
pub(crate) fn parse_fields(body: &[u8]) -> Result<Fields, ChannelError> {
    if body.trim_ascii_start().starts_with(b"{") {
        // The console's other 数据格式; every push would fail the same way, so say how to fix it.
        return Err(ChannelError::Unsupported(
            "the push is JSON: set 数据格式 to XML in the 公众号 console (基本配置 → 服务器配置)".into(),
        ));
    }
    let mut fields = Fields::new();
    read_xml(body, &mut fields).map_err(|error| malformed(error.0))?;
    Ok(fields)
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
    let content = vec![message_segment(msg_type, fields, event)?];
    // Dedupe key (PROTOCOLS §2.4): MsgId for messages, sender + CreateTime for events.
    let platform_message_id = dedupe_key(fields, openid)?;
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
        // When WeChat says the user sent it (`Mp::sent_at_ms`); absent when unreadable.
        reply_handle: ReplyHandle(serde_json::json!({
            "account": account,
            "create_time": fields.get("CreateTime").and_then(|time| time.trim().parse::<i64>().ok()),
        })),
    })
}

fn event(fields: &Fields) -> Result<Event, ChannelError> {
    Ok(yizhan_channel_common::wechat::event(fields, |name, key| match name {
        "subscribe" => Some(Event::Subscribe {
            scene: key
                .map(|key| key.strip_prefix("qrscene_").map(str::to_owned).unwrap_or(key))
                .filter(|scene| !scene.is_empty()),
        }),
        "scan" => Some(Event::Scan { scene: key }),
        _ => None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(xml: &str) -> Result<Fields, ChannelError> {
        parse_fields(xml.as_bytes())
    }

    #[test]
    fn broken_documents_are_malformed() {
        for body in ["", "<xml>", "<!DOCTYPE x [<!ENTITY a \"b\">]><xml><a>&a;</a></xml>"] {
            assert!(matches!(fields(body), Err(ChannelError::Malformed(_))), "accepted {body:?}");
        }
        assert!(matches!(parse_fields(b"<xml>\xff</xml>"), Err(ChannelError::Malformed(_))));
        // JSON (the console's other data format) is refused with the way out.
        let json = br#" {"ToUserName":"gh_1","FromUserName":"o1","MsgType":"text","Content":"hi","MsgId":1}"#;
        assert!(matches!(parse_fields(json), Err(ChannelError::Unsupported(why)) if why.contains("XML")));
    }

    #[test]
    fn names_are_matched_exactly() {
        let parsed = fields("<xml><MsgType>text</MsgType></xml>").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.get("MsgType"), Some("text"));
        assert_eq!(parsed.get("msgtype"), None);
    }

    #[test]
    fn the_accounts_own_events_are_mapped() {
        let scan = fields("<xml><Event>SCAN</Event><EventKey>7</EventKey></xml>").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(event(&scan), Ok(Event::Scan { scene: Some(ref scene) }) if scene == "7"));
        let subscribe = fields("<xml><Event>subscribe</Event><EventKey>qrscene_9</EventKey></xml>")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(event(&subscribe), Ok(Event::Subscribe { scene: Some(ref scene) }) if scene == "9"));
    }

    #[test]
    fn non_finite_coordinates_are_refused() {
        let parsed = fields("<xml><Location_X>NaN</Location_X><Location_Y>1</Location_Y></xml>")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(parsed.number("Location_X").is_err());
        assert_eq!(parsed.optional_number("Location_Y"), Some(1.0));
    }
}
