//! Webhook handling through the public `Channel` API: URL verification (plain and encrypted),
//! signatures and replay windows, fixture events for each message type, group mention rules,
//! redelivery, malformed bodies, and the core's conformance kit.

use aes::cipher::{block_padding::Pkcs7, BlockEncryptMut, KeyIvInit};
use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime};
use yizhan_channel_core::{
    testkit, Channel, ChannelError, ChannelId, ChannelSettings, ConversationKind, Envelope, Event, Method, Segment,
    WebhookOutcome, WebhookRequest,
};
use yizhan_channel_feishu::{crypto, Feishu};

const TOKEN: &str = "vt-0123456789abcdef";
const ENCRYPT_KEY: &str = "ek-secret-key";
const NOW: u64 = 1_700_000_000;

fn channel_with(extra: Value) -> Feishu {
    let mut table = json!({
        "app_id": "cli_9f5343c580712544", "app_secret": "app-secret", "verification_token": TOKEN,
        "api_base": "http://127.0.0.1:9/",
    });
    if let (Some(table), Some(extra)) = (table.as_object_mut(), extra.as_object()) {
        table.extend(extra.clone());
    }
    let settings = ChannelSettings {
        id: ChannelId::parse("fs-main").unwrap_or_else(|e| panic!("{e}")),
        kind: "feishu".into(),
        table,
    };
    Feishu::from_settings(&settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"))
}

fn plain_channel() -> Feishu {
    channel_with(json!({}))
}

fn encrypted_channel() -> Feishu {
    channel_with(json!({"encrypt_key": ENCRYPT_KEY}))
}

fn request(body: &str, headers: Vec<(String, String)>) -> WebhookRequest {
    WebhookRequest {
        method: Method::Post,
        query: vec![],
        raw_query: String::new(),
        headers,
        body: Bytes::from(body.to_owned()),
        received_at: SystemTime::UNIX_EPOCH + Duration::from_secs(NOW),
    }
}

fn post(body: &str) -> WebhookRequest {
    request(body, vec![("content-type".into(), "application/json".into())])
}

/// Encrypts like Feishu: key = SHA-256(encrypt_key), random-ish IV in front, AES-256-CBC, PKCS#7.
fn encrypt(key: &str, plaintext: &str) -> String {
    let key = Sha256::digest(key.as_bytes());
    let iv = [0x5a_u8; 16];
    let encryptor = cbc::Encryptor::<aes::Aes256>::new_from_slices(&key, &iv).unwrap_or_else(|e| panic!("{e}"));
    let mut buf = iv.to_vec();
    buf.extend(encryptor.encrypt_padded_vec_mut::<Pkcs7>(plaintext.as_bytes()));
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// An encrypted, signed event call, as Feishu sends it with an Encrypt Key.
fn signed(plaintext: &str, timestamp: u64) -> WebhookRequest {
    let body = json!({"encrypt": encrypt(ENCRYPT_KEY, plaintext)}).to_string();
    let (ts, nonce) = (timestamp.to_string(), "13a5e1c4".to_owned());
    let signature = crypto::signature(&ts, &nonce, ENCRYPT_KEY, body.as_bytes());
    request(
        &body,
        vec![
            ("x-lark-request-timestamp".into(), ts),
            ("x-lark-request-nonce".into(), nonce),
            ("x-lark-signature".into(), signature),
        ],
    )
}

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.replace("VERIFICATION_TOKEN", TOKEN)
}

fn accepted(channel: &Feishu, request: &WebhookRequest) -> Envelope {
    match channel.handle_webhook(request) {
        Ok(WebhookOutcome::Accepted { mut envelopes, ack }) => {
            assert_eq!(ack.status, 200);
            assert_eq!(ack.body, Bytes::from_static(b"{}"));
            assert_eq!(ack.content_type, "application/json");
            assert_eq!(envelopes.len(), 1);
            envelopes.remove(0)
        }
        other => panic!("{other:?}"),
    }
}

fn envelope(name: &str) -> Envelope {
    accepted(&plain_channel(), &post(&fixture(name)))
}

fn responded(outcome: Result<WebhookOutcome, ChannelError>) -> Value {
    match outcome {
        Ok(WebhookOutcome::Respond(response)) => {
            assert_eq!(response.status, 200);
            assert_eq!(response.content_type, "application/json");
            serde_json::from_slice(&response.body).unwrap_or_else(|e| panic!("{e}"))
        }
        other => panic!("{other:?}"),
    }
}

fn is_bad_signature(outcome: &Result<WebhookOutcome, ChannelError>) -> bool {
    matches!(outcome, Err(ChannelError::BadSignature(_)))
}

// --- URL verification -------------------------------------------------------------------------

/// Every message, retried by Feishu a minute later (plain, or encrypted and signed), is the same
/// message to the core's dedupe, and its envelope reads back from the journal.
#[test]
fn every_message_and_its_retry_are_accepted_alike() {
    for name in ["text_p2p", "text_group_mentions", "text_group_plain", "image_p2p", "post_p2p"] {
        yizhan_channel_core::testkit::accepts_a_message_and_its_retry_alike(&plain_channel(), &post(&fixture(name)));
        let signed = signed(&fixture(name), NOW);
        yizhan_channel_core::testkit::accepts_a_message_and_its_retry_alike(&encrypted_channel(), &signed);
    }
}

#[test]
fn plain_url_verification_echoes_the_challenge() {
    let body = json!({"challenge": "ajls384kdjx98XX", "token": TOKEN, "type": "url_verification"}).to_string();
    let answer = responded(plain_channel().handle_webhook(&post(&body)));
    assert_eq!(answer, json!({"challenge": "ajls384kdjx98XX"}));
}

#[test]
fn plain_url_verification_with_a_wrong_or_missing_token_is_refused() {
    for body in [
        json!({"challenge": "c", "token": "wrong", "type": "url_verification"}),
        json!({"challenge": "c", "type": "url_verification"}),
    ] {
        assert!(is_bad_signature(&plain_channel().handle_webhook(&post(&body.to_string()))), "{body}");
    }
}

#[test]
fn encrypted_url_verification_is_answered_without_signature_headers() {
    let inner = json!({"challenge": "ajls384kdjx98XX", "token": TOKEN, "type": "url_verification"}).to_string();
    let body = json!({"encrypt": encrypt(ENCRYPT_KEY, &inner)}).to_string();
    let answer = responded(encrypted_channel().handle_webhook(&post(&body)));
    assert_eq!(answer, json!({"challenge": "ajls384kdjx98XX"}));
}

#[test]
fn encrypted_url_verification_with_a_wrong_token_is_refused() {
    let inner = json!({"challenge": "c", "token": "wrong", "type": "url_verification"}).to_string();
    let body = json!({"encrypt": encrypt(ENCRYPT_KEY, &inner)}).to_string();
    assert!(is_bad_signature(&encrypted_channel().handle_webhook(&post(&body))));
}

#[test]
fn a_plain_url_verification_fails_when_an_encrypt_key_is_set() {
    // The console has no Encrypt Key (Feishu encrypts every callback once it has one): passing
    // its check would only have every event refused for want of a signature after it.
    let body = json!({"challenge": "c", "token": TOKEN, "type": "url_verification"}).to_string();
    match encrypted_channel().handle_webhook(&post(&body)) {
        Err(ChannelError::Misconfigured(reason)) => assert!(reason.contains("加密策略"), "{reason}"),
        other => panic!("not refused as a misconfiguration: {other:?}"),
    }
    // With a wrong token it is just a stranger's request.
    let body = json!({"challenge": "c", "token": "wrong", "type": "url_verification"}).to_string();
    assert!(is_bad_signature(&encrypted_channel().handle_webhook(&post(&body))));
}

#[test]
fn url_verification_encrypted_with_another_key_is_refused() {
    let inner = json!({"challenge": "c", "token": TOKEN, "type": "url_verification"}).to_string();
    let body = json!({"encrypt": encrypt("another key", &inner)}).to_string();
    assert!(is_bad_signature(&encrypted_channel().handle_webhook(&post(&body))));
}

// --- Signatures -------------------------------------------------------------------------------

#[test]
fn a_signed_encrypted_event_is_accepted() {
    let envelope = accepted(&encrypted_channel(), &signed(&fixture("text_p2p"), NOW));
    assert_eq!(envelope.text(), "你好，今天天气怎么样？");
}

#[test]
fn a_bad_signature_is_refused() {
    let mut request = signed(&fixture("text_p2p"), NOW);
    for (name, value) in &mut request.headers {
        if name == "x-lark-signature" {
            value.replace_range(0..1, if value.starts_with('0') { "1" } else { "0" });
        }
    }
    assert!(is_bad_signature(&encrypted_channel().handle_webhook(&request)));
}

#[test]
fn a_signature_over_another_body_is_refused() {
    let good = signed(&fixture("text_p2p"), NOW);
    let other = signed(&fixture("text_group_plain"), NOW);
    let forged = WebhookRequest { body: other.body, ..good };
    assert!(is_bad_signature(&encrypted_channel().handle_webhook(&forged)));
}

#[test]
fn an_event_without_signature_headers_is_refused_when_an_encrypt_key_is_set() {
    let body = json!({"encrypt": encrypt(ENCRYPT_KEY, &fixture("text_p2p"))}).to_string();
    assert!(is_bad_signature(&encrypted_channel().handle_webhook(&post(&body))));
    // Nor may a plaintext event slip past the signature by not being encrypted.
    assert!(is_bad_signature(&encrypted_channel().handle_webhook(&post(&fixture("text_p2p")))));
}

#[test]
fn unsigned_encrypted_bodies_are_refused_alike_whatever_they_decrypt_to() {
    // Telling a padding error from a plaintext that is not JSON would be a padding oracle: a
    // stranger could decrypt captured callbacks through us. Every unsigned body that is not a
    // good URL verification gets the one refusal.
    let bodies = [
        encrypt(ENCRYPT_KEY, "hello world"),
        encrypt(ENCRYPT_KEY, "{\"no\": \"type\"}"),
        encrypt(ENCRYPT_KEY, &json!({"type": "url_verification", "token": TOKEN}).to_string()),
        encrypt("another key", "hello world"),
        "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=".to_owned(),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned(),
        "not base64!".to_owned(),
    ];
    for encrypted in bodies {
        let body = json!({"encrypt": encrypted}).to_string();
        let outcome = encrypted_channel().handle_webhook(&post(&body));
        assert!(is_bad_signature(&outcome), "{encrypted}: {outcome:?}");
    }
    let outcome = encrypted_channel().handle_webhook(&post(r#"{"encrypt": 7}"#));
    assert!(is_bad_signature(&outcome), "{outcome:?}");
}

#[test]
fn a_signed_body_that_decrypts_to_something_other_than_json_is_malformed() {
    // Authenticated first, so telling this apart tells a stranger nothing.
    let outcome = encrypted_channel().handle_webhook(&signed("hello world", NOW));
    assert!(matches!(outcome, Err(ChannelError::Malformed(_))), "{outcome:?}");
}

#[test]
fn a_stale_timestamp_is_refused_even_with_a_good_signature() {
    // The default window covers Feishu's retries, about 7 h: 27,000 s.
    let stale = signed(&fixture("text_p2p"), NOW - 27_001);
    assert!(is_bad_signature(&encrypted_channel().handle_webhook(&stale)));
    let future = signed(&fixture("text_p2p"), NOW + 27_001);
    assert!(is_bad_signature(&encrypted_channel().handle_webhook(&future)));
    let six_hours_old = signed(&fixture("text_p2p"), NOW - 6 * 3600 - 60);
    assert!(encrypted_channel().handle_webhook(&six_hours_old).is_ok());
    let narrow = channel_with(json!({"encrypt_key": ENCRYPT_KEY, "replay_window_secs": 300}));
    assert!(is_bad_signature(&narrow.handle_webhook(&signed(&fixture("text_p2p"), NOW - 301))));
    assert!(narrow.handle_webhook(&signed(&fixture("text_p2p"), NOW - 299)).is_ok());
    let unchecked = channel_with(json!({"encrypt_key": ENCRYPT_KEY, "replay_window_secs": 0}));
    assert!(unchecked.handle_webhook(&stale).is_ok());
}

#[test]
fn a_signed_event_must_still_carry_the_verification_token() {
    let wrong = fixture("text_p2p").replace(TOKEN, "someone-else");
    assert!(is_bad_signature(&encrypted_channel().handle_webhook(&signed(&wrong, NOW))));
}

#[test]
fn a_plain_event_with_a_wrong_or_missing_token_is_refused() {
    let wrong = fixture("text_p2p").replace(TOKEN, "wrong");
    assert!(is_bad_signature(&plain_channel().handle_webhook(&post(&wrong))));
    let mut missing: Value = serde_json::from_str(&fixture("text_p2p")).unwrap_or_default();
    if let Some(header) = missing["header"].as_object_mut() {
        header.remove("token");
    }
    assert!(is_bad_signature(&plain_channel().handle_webhook(&post(&missing.to_string()))));
}

// --- Messages ---------------------------------------------------------------------------------

#[test]
fn a_p2p_text_message_becomes_a_direct_envelope() {
    let envelope = envelope("text_p2p");
    assert_eq!(envelope.channel.as_str(), "fs-main");
    assert_eq!(envelope.channel_kind, "feishu");
    assert_eq!(envelope.platform_message_id, "om_5ce6d572455d361153b7cb51da133945");
    assert_eq!(envelope.conversation.kind, ConversationKind::Direct);
    assert_eq!(envelope.conversation.id, "oc_5ce6d572455d361153b7xx51da133945");
    assert_eq!(envelope.sender.id, "ou_84aad35d084aa403a838cf73ee18467");
    assert_eq!(envelope.content, vec![Segment::Text { text: "你好，今天天气怎么样？".into() }]);
    assert!(envelope.mentions_self);
    assert_eq!(envelope.received_at_ms, (NOW * 1000) as i64);
    assert_eq!(
        envelope.reply_handle.0,
        json!({
            "message_id": "om_5ce6d572455d361153b7cb51da133945",
            "chat_id": "oc_5ce6d572455d361153b7xx51da133945",
            "chat_type": "p2p",
            "event_id": "5e3702a84e847582be8db7fb73283c02",
        })
    );
}

#[test]
fn a_group_message_without_a_mention_does_not_address_the_bot() {
    let envelope = envelope("text_group_plain");
    assert_eq!(envelope.conversation.kind, ConversationKind::Group);
    assert_eq!(envelope.conversation.id, "oc_group_1");
    assert_eq!(envelope.sender.id, "ou_member");
    assert!(!envelope.mentions_self);
    assert_eq!(envelope.reply_handle.0["chat_type"], "group");
}

#[test]
fn a_group_message_without_a_mention_addresses_the_bot_when_mentions_are_not_required() {
    let channel = channel_with(json!({"require_mention_in_groups": false}));
    assert!(accepted(&channel, &post(&fixture("text_group_plain"))).mentions_self);
}

#[test]
fn a_group_mention_of_the_configured_bot_is_stripped_and_addresses_it() {
    let channel = channel_with(json!({"bot_open_id": "ou_bot"}));
    let envelope = accepted(&channel, &post(&fixture("text_group_mentions")));
    assert!(envelope.mentions_self);
    assert_eq!(envelope.text(), "帮我问问 @Tom 的意见");
    assert!(!envelope.text().contains("@_user_"));
    let mentions: Vec<&Segment> = envelope.content.iter().filter(|s| matches!(s, Segment::Mention { .. })).collect();
    assert_eq!(
        mentions,
        vec![
            &Segment::Mention { id: "ou_bot".into(), name: Some("驿站助手".into()), is_self: true },
            &Segment::Mention { id: "ou_tom".into(), name: Some("Tom".into()), is_self: false },
        ]
    );
}

#[test]
fn a_group_mention_of_someone_else_does_not_address_the_configured_bot() {
    let channel = channel_with(json!({"bot_open_id": "ou_another_bot"}));
    let envelope = accepted(&channel, &post(&fixture("text_group_mentions")));
    assert!(!envelope.mentions_self);
    assert_eq!(envelope.text(), "@驿站助手 帮我问问 @Tom 的意见");
}

#[test]
fn without_bot_open_id_the_first_group_mention_counts_as_the_bot_and_the_others_stay_named() {
    let envelope = envelope("text_group_mentions");
    assert!(envelope.mentions_self);
    assert_eq!(envelope.text(), "帮我问问 @Tom 的意见");
}

#[test]
fn without_bot_open_id_an_at_all_neither_addresses_the_bot_nor_counts_as_it() {
    let at_all = fixture("text_group_mentions")
        .replace(
            r#"{"key": "@_user_1", "id": {"union_id": "on_bot", "user_id": "", "open_id": "ou_bot"}, "name": "驿站助手", "tenant_key": "t"},
        "#,
            r#"{"key": "@_all", "id": {"union_id": "", "user_id": "", "open_id": ""}, "name": "所有人", "tenant_key": "t"},
        {"key": "@_user_3", "id": {"union_id": "on_bot", "user_id": "", "open_id": "ou_bot"}, "name": "驿站助手", "tenant_key": "t"},
        "#,
        )
        .replace(r#"@_user_1 帮我问问"#, r#"@_all @_user_3 帮我问问"#);
    assert!(at_all.contains("@_all @_user_3"), "fixture changed");
    let envelope = accepted(&plain_channel(), &post(&at_all));
    assert!(envelope.mentions_self);
    assert!(!envelope.text().contains("驿站助手"), "the bot's own @ is not in the question: {}", envelope.text());
    // An announcement to everyone alone does not address the bot.
    let mentions = fixture("text_group_mentions");
    let (Some(start), Some(end)) = (mentions.find(r#""mentions": ["#), mentions.rfind(']')) else {
        panic!("fixture changed");
    };
    let only_all = format!(
        "{}{}{}",
        &mentions[..start],
        r#""mentions": [{"key": "@_all", "id": {"union_id": "", "user_id": "", "open_id": ""}, "name": "所有人", "tenant_key": "t"}]"#,
        &mentions[end + 1..]
    )
    .replace(r#"@_user_1 帮我问问 @_user_2 的意见"#, r#"@_all 周五团建"#);
    assert!(only_all.contains("@_all 周五团建"), "fixture changed");
    assert!(!accepted(&plain_channel(), &post(&only_all)).mentions_self);
}

#[test]
fn a_post_is_flattened_to_text_and_keeps_its_images() {
    let envelope = envelope("post_p2p");
    assert_eq!(envelope.text(), "周报\n请总结这份文档 (https://example.com/doc)\n\n```go\nfmt.Println(1)\n```");
    assert!(envelope.content.contains(&Segment::Image { url: None, media_id: Some("img_v2_post_1".into()) }));
}

#[test]
fn a_null_mention_list_is_the_same_as_none() {
    let null_mentions = fixture("text_p2p").replace("\"mentions\": []", "\"mentions\": null");
    assert!(null_mentions.contains("null"));
    assert_eq!(accepted(&plain_channel(), &post(&null_mentions)).text(), "你好，今天天气怎么样？");
}

#[test]
fn an_image_message_carries_its_image_key() {
    let envelope = envelope("image_p2p");
    assert_eq!(
        envelope.content,
        vec![Segment::Image { url: None, media_id: Some("img_v2_041b28e3-5680-48c2-9af2-497ace79333g".into()) }]
    );
    assert_eq!(envelope.text(), "");
}

#[test]
fn an_unreadable_message_type_is_kept_as_a_named_event_and_a_sticker_as_a_picture() {
    let with_type = |kind: &str, content: &str| {
        fixture("text_p2p")
            .replace("\"message_type\": \"text\"", &format!("\"message_type\": \"{kind}\""))
            .replace(r#"{\"text\":\"你好，今天天气怎么样？\"}"#, content)
    };
    let shared = accepted(&plain_channel(), &post(&with_type("share_chat", r#"{\"chat_id\":\"oc_x\"}"#)));
    assert_eq!(shared.event(), Some(&Event::Other { name: "message:share_chat".into() }));
    let sticker = accepted(&plain_channel(), &post(&with_type("sticker", r#"{\"file_key\":\"v2_sticker\"}"#)));
    assert_eq!(sticker.content, vec![Segment::Image { url: None, media_id: Some("v2_sticker".into()) }]);
}

#[test]
fn a_redelivered_message_keeps_its_platform_message_id() {
    let first = envelope("text_p2p");
    let redelivered =
        fixture("text_p2p").replace("5e3702a84e847582be8db7fb73283c02", "ffffffffffffffffffffffffffffffff");
    let second = accepted(&plain_channel(), &post(&redelivered));
    assert_eq!(first.platform_message_id, second.platform_message_id);
    assert_ne!(first.id, second.id);
    assert_eq!(second.reply_handle.0["event_id"], "ffffffffffffffffffffffffffffffff");
}

#[test]
fn other_events_are_acknowledged_and_dispatch_nothing() {
    assert_eq!(responded(plain_channel().handle_webhook(&post(&fixture("chat_entered")))), json!({}));
    let v1 = json!({"uuid": "u", "token": TOKEN, "ts": "1", "type": "event_callback", "event": {"type": "message"}});
    assert_eq!(responded(plain_channel().handle_webhook(&post(&v1.to_string()))), json!({}));
    // Even ignored events must be authentic.
    let forged = fixture("chat_entered").replace(TOKEN, "wrong");
    assert!(is_bad_signature(&plain_channel().handle_webhook(&post(&forged))));
}

#[test]
fn malformed_bodies_are_malformed() {
    for body in ["", "{", "[1,2]", "\"x\"", "\u{feff}{}x"] {
        let outcome = plain_channel().handle_webhook(&post(body));
        assert!(matches!(outcome, Err(ChannelError::Malformed(_))), "{body:?}: {outcome:?}");
    }
    // Authentic but broken: the content is not JSON, or required fields are missing.
    let broken_content = fixture("text_p2p").replace(r#"{\"text\":\"你好，今天天气怎么样？\"}"#, "not json");
    let outcome = plain_channel().handle_webhook(&post(&broken_content));
    assert!(matches!(outcome, Err(ChannelError::Malformed(_))), "{outcome:?}");
    let no_message_id = fixture("text_p2p").replace("\"message_id\"", "\"msg_id\"");
    let outcome = plain_channel().handle_webhook(&post(&no_message_id));
    assert!(matches!(outcome, Err(ChannelError::Malformed(_))), "{outcome:?}");
}

#[test]
fn the_channel_passes_the_core_conformance_kit() {
    testkit::check_channel(&plain_channel());
    testkit::check_channel(&encrypted_channel());
    testkit::check_channel(&channel_with(json!({"max_part_bytes": 100})));
}
