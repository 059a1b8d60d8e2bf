//! The plaintext passive-reply XML: an answer carried in the webhook's own HTTP response.
//!
//! Invariant: whatever the text holds, the output is well-formed XML whose `Content` reads back
//! as that text (less the control characters XML 1.0 cannot carry).

use yizhan_channel_common::wechat::is_xml_char;

/// Builds `<xml>…<MsgType>text</MsgType><Content>…</Content></xml>` (PROTOCOLS §2.4): To and
/// From swapped relative to the push, so `to_openid` is the user and `from_account` the
/// account's `gh_` id.
pub(crate) fn text_reply_xml(to_openid: &str, from_account: &str, create_time: i64, content: &str) -> String {
    format!(
        "<xml><ToUserName>{}</ToUserName><FromUserName>{}</FromUserName>\
         <CreateTime>{create_time}</CreateTime><MsgType><![CDATA[text]]></MsgType>\
         <Content>{}</Content></xml>",
        cdata(to_openid),
        cdata(from_account),
        cdata(content),
    )
}

/// Whether a reply with `text` would show nothing: only whitespace once the characters XML
/// cannot carry are dropped (an empty `Content` makes WeChat show 该公众号暂时无法提供服务).
pub(crate) fn shows_nothing(text: &str) -> bool {
    text.chars().filter(|&ch| is_xml_char(ch)).all(char::is_whitespace)
}

/// Wraps `text` in CDATA. A `]]>` inside would end the section early, so it is split across two
/// sections (`]]` ends one, `>` starts the next), which readers join back into the same text.
fn cdata(text: &str) -> String {
    let clean: String = text.chars().filter(|&ch| is_xml_char(ch)).collect();
    format!("<![CDATA[{}]]>", clean.replace("]]>", "]]]]><![CDATA[>"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::parse_fields;

    #[test]
    fn a_reply_parses_back_to_the_same_fields() {
        let content = "你好 <b>&amp; ]]> end ]]]]> x]]";
        let xml = text_reply_xml("o_user", "gh_acct", 1_714_036_504, content);
        let fields = parse_fields(xml.as_bytes()).unwrap_or_else(|e| panic!("{e}: {xml}"));
        assert_eq!(fields.get("ToUserName"), Some("o_user"));
        assert_eq!(fields.get("FromUserName"), Some("gh_acct"));
        assert_eq!(fields.get("CreateTime"), Some("1714036504"));
        assert_eq!(fields.get("MsgType"), Some("text"));
        assert_eq!(fields.raw("Content"), Some(content));
    }

    #[test]
    fn control_characters_are_dropped_so_the_xml_stays_valid() {
        let xml = text_reply_xml("o", "gh", 1, "a\u{0}b\u{1b}c\nd");
        let fields = parse_fields(xml.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fields.raw("Content"), Some("abc\nd"));
    }

    #[test]
    fn a_text_of_control_characters_shows_nothing() {
        assert!(shows_nothing("\u{7}"));
        assert!(shows_nothing(" \u{1b}\u{0}\n"));
        assert!(!shows_nothing("\u{7}a"));
    }
}
