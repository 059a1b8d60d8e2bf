//! Helpers shared by the integration tests: a configured channel, and callbacks encrypted and
//! signed the way WeCom does it (with the shared crypto crate).
#![allow(dead_code)]

use bytes::Bytes;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime};
use yizhan_channel_core::{
    ChannelId, ChannelSettings, Conversation, ConversationKind, Delivery, Method, Reply, ReplyHandle, Sender,
    WebhookRequest,
};
use yizhan_channel_wechat_crypto::{msg_signature, KeySlot, WxCrypto};
use yizhan_channel_wecom::Wecom;

pub const CORP: &str = "ww_corp";
pub const SECRET: &str = "the-corp-secret";
pub const TOKEN: &str = "test-token";
pub const KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";
pub const OLD_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
pub const AGENT: i64 = 1000002;
pub const NOW: u64 = 1_714_036_504;
pub const NONCE: &str = "1372623149";
pub const USER: &str = "zhangsan";

/// The channel's part of a `[[channels]]` entry (the core takes its own keys out), with `extra`
/// merged in.
pub fn table(extra: Value) -> Value {
    let mut table = json!({
        "corp_id": CORP, "corp_secret": SECRET, "agent_id": AGENT, "token": TOKEN,
        "encoding_aes_key": KEY, "api_base": "http://127.0.0.1:9/",
    });
    if let (Some(table), Some(extra)) = (table.as_object_mut(), extra.as_object()) {
        table.extend(extra.clone());
    }
    table
}

pub fn channel_with(extra: Value) -> Wecom {
    let settings = ChannelSettings {
        id: ChannelId::parse("wecom-main").unwrap_or_else(|e| panic!("{e}")),
        kind: "wecom".into(),
        table: table(extra),
    };
    Wecom::from_settings(&settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"))
}

pub fn channel() -> Wecom {
    channel_with(json!({}))
}

/// WeCom's side of the crypto: our token and key, addressed to `corp`.
pub fn platform_crypto(corp: &str, key: &str) -> WxCrypto {
    WxCrypto::new(TOKEN, key, None, corp).unwrap_or_else(|e| panic!("{e}"))
}

pub fn request(method: Method, query: Vec<(String, String)>, body: &str, now: u64) -> WebhookRequest {
    let raw_query = query.iter().map(|(k, v)| format!("{k}={}", percent_encode(v))).collect::<Vec<_>>().join("&");
    WebhookRequest {
        method,
        query,
        raw_query,
        headers: vec![],
        body: Bytes::from(body.to_owned()),
        received_at: SystemTime::UNIX_EPOCH + Duration::from_secs(now),
    }
}

/// `msg_signature`, `timestamp`, `nonce` for `encrypt`, signed with `token`.
pub fn signed_query(token: &str, encrypt: &str, timestamp: u64) -> Vec<(String, String)> {
    let timestamp = timestamp.to_string();
    vec![
        ("msg_signature".to_owned(), msg_signature(token, &timestamp, NONCE, encrypt)),
        ("timestamp".to_owned(), timestamp),
        ("nonce".to_owned(), NONCE.to_owned()),
    ]
}

/// An XML callback carrying `plaintext`, encrypted for `CORP` with `KEY`, sent at `NOW`.
pub fn xml_callback(plaintext: &str) -> WebhookRequest {
    xml_callback_with(&platform_crypto(CORP, KEY), plaintext, NOW, NOW)
}

pub fn xml_callback_with(crypto: &WxCrypto, plaintext: &str, timestamp: u64, now: u64) -> WebhookRequest {
    let encrypt = crypto.encrypt(plaintext, KeySlot::Current).unwrap_or_else(|e| panic!("{e}"));
    let body = format!(
        "<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt>\
         <AgentID><![CDATA[{AGENT}]]></AgentID></xml>"
    );
    request(Method::Post, signed_query(TOKEN, &encrypt, timestamp), &body, now)
}

/// A JSON callback (`{"tousername","encrypt","agentid"}`) carrying `plaintext`.
pub fn json_callback(plaintext: &str) -> WebhookRequest {
    let encrypt = platform_crypto(CORP, KEY).encrypt(plaintext, KeySlot::Current).unwrap_or_else(|e| panic!("{e}"));
    let body = json!({"tousername": CORP, "encrypt": encrypt, "agentid": AGENT.to_string()}).to_string();
    request(Method::Post, signed_query(TOKEN, &encrypt, NOW), &body, NOW)
}

pub fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One of the official WeCom vectors (copied from the shared `vectors/crypto.json`).
pub fn vector(name: &str) -> Value {
    let vectors: Value = serde_json::from_str(&fixture("wecom_vectors.json")).unwrap_or_else(|e| panic!("{e}"));
    vectors
        .as_array()
        .and_then(|all| all.iter().find(|v| v["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no vector {name}"))
}

/// Decodes a raw query string the way the core does: split on `&` and `=`, percent-decode.
pub fn decode_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = bytes.get(at + 1..at + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[at], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                at += 3;
            }
            (byte, _) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// A delivery of `text` to `user`.
pub fn delivery_to(user: &str, text: &str) -> Delivery {
    Delivery {
        delivery_id: format!("d-{user}-{}", text.len()),
        channel: ChannelId::parse("wecom-main").unwrap_or_else(|e| panic!("{e}")),
        conversation: Conversation { kind: ConversationKind::Direct, id: user.into() },
        recipient: Sender { id: user.into(), name: None },
        reply_handle: ReplyHandle(json!({"agent_id": AGENT})),
        reply: Reply::text(text),
    }
}

pub fn delivery(text: &str) -> Delivery {
    delivery_to(USER, text)
}
