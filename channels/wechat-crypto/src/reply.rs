//! [`EncryptedReply`]: an encrypted, signed passive reply and its two wire forms.
//!
//! Invariant: whatever the nonce holds (it is echoed from the request URL), the XML stays
//! well-formed and the JSON stays valid.

/// An encrypted passive reply: the ciphertext and the `msg_signature` over
/// `(token, timestamp, nonce, encrypt)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedReply {
    /// The base64 ciphertext.
    pub encrypt: String,
    /// `sha1(sort(token, timestamp, nonce, encrypt))`, lower-case hex.
    pub msg_signature: String,
    /// Seconds since the epoch, chosen by the hub.
    pub timestamp: i64,
    /// The nonce the signature covers (usually the request's).
    pub nonce: String,
}

impl EncryptedReply {
    /// `<xml><Encrypt>…</Encrypt><MsgSignature>…</MsgSignature><TimeStamp>…</TimeStamp>
    /// <Nonce>…</Nonce></xml>` (PROTOCOLS §1).
    pub fn to_xml(&self) -> String {
        format!(
            "<xml><Encrypt>{}</Encrypt><MsgSignature>{}</MsgSignature><TimeStamp>{}</TimeStamp>\
             <Nonce>{}</Nonce></xml>",
            cdata(&self.encrypt),
            cdata(&self.msg_signature),
            self.timestamp,
            cdata(&self.nonce),
        )
    }

    /// `{"encrypt":…,"msgsignature":…,"timestamp":…,"nonce":…}`: the lower-case keys of WeCom's
    /// JSON callbacks and AI bot (PROTOCOLS §1), with a numeric timestamp.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "encrypt": self.encrypt,
            "msgsignature": self.msg_signature,
            "timestamp": self.timestamp,
            "nonce": self.nonce,
        })
        .to_string()
    }
}

/// Wraps `text` in CDATA; a `]]>` inside is split across two sections so it cannot end the
/// first early. Characters XML 1.0 forbids are dropped (no legitimate nonce has them).
fn cdata(text: &str) -> String {
    let clean: String = text
        .chars()
        .filter(|&ch| matches!(ch, '\t' | '\n' | '\r') || (ch >= ' ' && ch != '\u{FFFE}' && ch != '\u{FFFF}'))
        .collect();
    format!("<![CDATA[{}]]>", clean.replace("]]>", "]]]]><![CDATA[>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(nonce: &str) -> EncryptedReply {
        EncryptedReply {
            encrypt: "abc=".into(),
            msg_signature: "0f".into(),
            timestamp: 1_409_735_669,
            nonce: nonce.into(),
        }
    }

    #[test]
    fn the_xml_has_the_documented_shape() {
        assert_eq!(
            reply("1320562132").to_xml(),
            "<xml><Encrypt><![CDATA[abc=]]></Encrypt><MsgSignature><![CDATA[0f]]></MsgSignature>\
             <TimeStamp>1409735669</TimeStamp><Nonce><![CDATA[1320562132]]></Nonce></xml>"
        );
    }

    #[test]
    fn a_hostile_nonce_cannot_break_out_of_its_element() {
        let xml = reply("a]]></Nonce><Evil/>\"\u{0}").to_xml();
        assert!(xml.contains("<Nonce><![CDATA[a]]]]><![CDATA[></Nonce><Evil/>\"]]></Nonce>"), "{xml}");
        let json: serde_json::Value =
            serde_json::from_str(&reply("\"},\"x\":\"").to_json()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json["nonce"], "\"},\"x\":\"");
        assert_eq!(json["timestamp"], 1_409_735_669);
        assert_eq!(json["msgsignature"], "0f");
        assert_eq!(json["encrypt"], "abc=");
    }
}
