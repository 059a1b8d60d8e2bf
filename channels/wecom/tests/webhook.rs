//! Callback handling through the public `Channel` API: the official WeCom vectors, encrypted
//! fixture callbacks for every message type and event (XML and JSON), replay, wrong-corp and
//! wrong-app cases, rendering, and the core's conformance kit.

mod common;

use bytes::Bytes;
use common::*;
use serde_json::json;
use yizhan_channel_core::{
    testkit, Channel, ChannelError, ConversationKind, Envelope, Event, Method, Reply, Segment, WebhookOutcome,
    WebhookRequest,
};
use yizhan_channel_wechat_crypto::KeySlot;
use yizhan_channel_wecom::Wecom;

/// A channel configured like the official vectors: token `QDG6eK`, corp `wx5823bf96d3bd56c7`,
/// agent 218.
fn vector_channel(corp: &str) -> Wecom {
    channel_with(json!({
        "token": "QDG6eK",
        "encoding_aes_key": "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C",
        "corp_id": corp,
        "agent_id": 218,
    }))
}

fn str_of<'a>(value: &'a serde_json::Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_else(|| panic!("{key} missing"))
}

fn unix(value: &serde_json::Value) -> u64 {
    str_of(value, "timestamp").parse().unwrap_or_else(|e| panic!("{e}"))
}

/// The POST of an official vector: its query, its body (given or built from `encrypt`), received
/// at its own timestamp (so the replay window passes).
fn vector_post(inputs: &serde_json::Value) -> WebhookRequest {
    let query = vec![
        ("msg_signature".to_owned(), str_of(inputs, "msg_signature").to_owned()),
        ("timestamp".to_owned(), str_of(inputs, "timestamp").to_owned()),
        ("nonce".to_owned(), str_of(inputs, "nonce").to_owned()),
    ];
    let body = inputs["post_body_xml"].as_str().map(str::to_owned).unwrap_or_else(|| {
        format!(
            "<xml><ToUserName><![CDATA[x]]></ToUserName><Encrypt><![CDATA[{}]]></Encrypt><AgentID><![CDATA[218]]></AgentID></xml>",
            str_of(inputs, "encrypt")
        )
    });
    request(Method::Post, query, &body, unix(inputs))
}

/// Handles a callback and returns its only envelope, checking the empty-200 acknowledgement.
fn accept(channel: &Wecom, request: &WebhookRequest) -> Envelope {
    match channel.handle_webhook(request) {
        Ok(WebhookOutcome::Accepted { mut envelopes, ack }) => {
            assert_eq!(ack.status, 200);
            assert!(ack.body.is_empty(), "ack must be empty: {:?}", ack.body);
            assert_eq!(envelopes.len(), 1);
            envelopes.remove(0)
        }
        other => panic!("{other:?}"),
    }
}

fn fixture_envelope(name: &str) -> Envelope {
    accept(&channel(), &xml_callback(&fixture(&format!("{name}.xml"))))
}

fn only_segment(name: &str) -> Segment {
    let envelope = fixture_envelope(name);
    assert_eq!(envelope.content.len(), 1, "{name}");
    envelope.content[0].clone()
}

fn rejected(channel: &Wecom, request: &WebhookRequest) -> ChannelError {
    match channel.handle_webhook(request) {
        Err(error) => error,
        Ok(outcome) => panic!("accepted: {outcome:?}"),
    }
}

// --- Official vectors -------------------------------------------------------------------------

/// Every callback, retried by WeCom a minute later, is the same message to the core's dedupe,
/// and its envelope reads back from the journal.
#[test]
fn every_callback_and_its_retry_are_accepted_alike() {
    let names = [
        "text",
        "image",
        "voice",
        "video",
        "location",
        "link",
        "unknown_msgtype",
        "event_click",
        "event_enter_agent",
        "event_location",
        "event_other",
        "event_subscribe",
        "event_unsubscribe",
        "event_view",
    ];
    for name in names {
        let request = xml_callback(&fixture(&format!("{name}.xml")));
        yizhan_channel_core::testkit::accepts_a_message_and_its_retry_alike(&channel(), &request);
    }
}

#[test]
fn the_official_url_verification_vector_answers_the_plaintext_exactly() {
    let vector = vector("wecom_verify_url_QDG6eK");
    let inputs = &vector["inputs"];
    let raw_query = str_of(inputs, "raw_query");
    let mut request = request(Method::Get, decode_query(raw_query), "", unix(inputs));
    request.raw_query = raw_query.to_owned();
    assert_eq!(request.query_param("echostr"), Some(str_of(inputs, "echostr")), "decoding the raw query");

    let channel = vector_channel(str_of(inputs, "receiveid"));
    match channel.handle_webhook(&request) {
        Ok(WebhookOutcome::Respond(response)) => {
            assert_eq!(response.status, 200);
            assert_eq!(response.body, Bytes::from(str_of(&vector["expected"], "response_body").to_owned()));
            assert_eq!(response.body, Bytes::from_static(b"1616140317555161061"));
            assert!(response.content_type.starts_with("text/plain"));
        }
        other => panic!("{other:?}"),
    }
}

/// A callback's signature covers the same fields as a URL check's, with its `<Encrypt>` in the
/// echostr's place: replayed as a GET, it must not be answered with the decrypted message.
#[test]
fn a_callback_replayed_as_a_url_check_is_refused_not_decrypted() {
    let vector = vector("wecom_decrypt_msg_QDG6eK");
    let inputs = &vector["inputs"];
    let query = vec![
        ("msg_signature".to_owned(), str_of(inputs, "msg_signature").to_owned()),
        ("timestamp".to_owned(), str_of(inputs, "timestamp").to_owned()),
        ("nonce".to_owned(), str_of(inputs, "nonce").to_owned()),
        ("echostr".to_owned(), str_of(inputs, "encrypt").to_owned()),
    ];
    let request = request(Method::Get, query, "", unix(inputs));
    let error = rejected(&vector_channel(str_of(inputs, "receiveid")), &request);
    assert!(matches!(error, ChannelError::BadSignature(_)), "{error:?}");
}

#[test]
fn a_plus_turned_into_a_space_by_a_form_decoder_still_verifies() {
    let vector = vector("wecom_verify_url_QDG6eK");
    let inputs = &vector["inputs"];
    let query = decode_query(str_of(inputs, "raw_query"))
        .into_iter()
        .map(|(k, v)| if k == "echostr" { (k, v.replace('+', " ")) } else { (k, v) })
        .collect();
    let request = request(Method::Get, query, "", unix(inputs));
    let outcome = vector_channel(str_of(inputs, "receiveid")).handle_webhook(&request);
    assert!(matches!(outcome, Ok(WebhookOutcome::Respond(_))), "{outcome:?}");
}

#[test]
fn the_official_message_vector_is_decrypted_into_a_text_envelope() {
    let vector = vector("wecom_decrypt_msg_QDG6eK");
    let inputs = &vector["inputs"];
    let channel = vector_channel(str_of(inputs, "receiveid"));
    let envelope = accept(&channel, &vector_post(inputs));
    assert_eq!(envelope.content, vec![Segment::Text { text: "hello".into() }]);
    assert_eq!(envelope.platform_message_id, "4561255354251345929");
    assert_eq!(envelope.sender.id, "mycreate");
    assert_eq!(envelope.conversation.id, "mycreate");
    assert_eq!(envelope.conversation.kind, ConversationKind::Direct);
    assert_eq!(envelope.channel_kind, "wecom");
    assert_eq!(envelope.channel.as_str(), "wecom-main");
    assert!(envelope.mentions_self);
    assert_eq!(envelope.received_at_ms, 1_409_659_813_000);
}

#[test]
fn the_official_vectors_outside_the_replay_window_are_refused() {
    let vector = vector("wecom_decrypt_msg_QDG6eK");
    let inputs = &vector["inputs"];
    let mut request = vector_post(inputs);
    request.received_at += std::time::Duration::from_secs(301);
    let error = rejected(&vector_channel(str_of(inputs, "receiveid")), &request);
    assert!(matches!(error, ChannelError::BadSignature(_)), "{error:?}");
}

#[test]
fn a_frame_for_another_corp_is_refused() {
    let vector = vector("neg_wecom_wrong_receiveid");
    let inputs = &vector["inputs"];
    let channel = vector_channel(str_of(inputs, "configured_receiveid"));
    let error = rejected(&channel, &vector_post(inputs));
    match error {
        ChannelError::BadSignature(reason) => assert!(reason.contains("-40005"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_tampered_signature_is_refused() {
    let vector = vector("neg_wecom_tampered_signature");
    let inputs = &vector["inputs"];
    let error = rejected(&vector_channel("wx5823bf96d3bd56c7"), &vector_post(inputs));
    match error {
        ChannelError::BadSignature(reason) => assert!(reason.contains("-40001"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_tampered_echostr_or_missing_parameter_is_refused() {
    let vector = vector("wecom_verify_url_QDG6eK");
    let inputs = &vector["inputs"];
    let channel = vector_channel(str_of(inputs, "receiveid"));
    let query = decode_query(str_of(inputs, "raw_query"));
    let tampered = query
        .iter()
        .map(|(k, v)| if k == "echostr" { (k.clone(), v.replacen('P', "Q", 1)) } else { (k.clone(), v.clone()) })
        .collect();
    let error = rejected(&channel, &request(Method::Get, tampered, "", unix(inputs)));
    assert!(matches!(error, ChannelError::BadSignature(_)), "{error:?}");
    for missing in ["msg_signature", "timestamp", "nonce", "echostr"] {
        let partial = query.iter().filter(|(k, _)| k != missing).cloned().collect();
        let error = rejected(&channel, &request(Method::Get, partial, "", unix(inputs)));
        match error {
            ChannelError::BadSignature(reason) => assert!(reason.contains(missing), "{reason}"),
            other => panic!("{missing}: {other:?}"),
        }
    }
}

// --- Message types and events ----------------------------------------------------------------

#[test]
fn a_text_message_keeps_its_text_and_ids() {
    let envelope = fixture_envelope("text");
    assert_eq!(envelope.content, vec![Segment::Text { text: " 你好，<b>世界</b> ".into() }]);
    assert_eq!(envelope.platform_message_id, "4561255354251345929");
    assert_eq!(envelope.sender.id, USER);
    assert_eq!(envelope.conversation.id, USER);
    assert_eq!(envelope.reply_handle.0["agent_id"], json!(AGENT));
    assert!(envelope.reply_handle.0["run"].as_str().is_some_and(|run| !run.is_empty()));
    assert_eq!(envelope.text(), " 你好，<b>世界</b> ");
}

#[test]
fn media_messages_carry_their_media_ids() {
    assert_eq!(
        only_segment("image"),
        Segment::Image { url: Some("https://wework.qpic.cn/p.png".into()), media_id: Some("media_img".into()) }
    );
    assert_eq!(
        only_segment("voice"),
        Segment::Voice { media_id: Some("media_voice".into()), format: Some("amr".into()), recognition: None }
    );
    assert_eq!(
        only_segment("video"),
        Segment::Video { media_id: Some("media_video".into()), thumb_media_id: Some("media_thumb".into()) }
    );
}

#[test]
fn location_and_link_messages_are_parsed() {
    assert_eq!(
        only_segment("location"),
        Segment::Location {
            latitude: 23.134521,
            longitude: 113.358803,
            scale: Some(20.0),
            label: Some("广州市海珠区".into()),
        }
    );
    assert_eq!(
        only_segment("link"),
        Segment::Link {
            title: Some("企业微信".into()),
            description: Some("链接描述".into()),
            url: "https://work.weixin.qq.com/".into(),
        }
    );
}

#[test]
fn events_map_to_core_events_and_are_keyed_by_sender_time_and_event() {
    let cases = [
        ("event_enter_agent", Event::EnterChat),
        ("event_subscribe", Event::Subscribe { scene: None }),
        ("event_unsubscribe", Event::Unsubscribe),
        ("event_click", Event::MenuClick { key: "MENU_HELP".into() }),
        ("event_view", Event::MenuView { url: "https://work.weixin.qq.com/".into() }),
        ("event_location", Event::Location { latitude: 23.104105, longitude: 113.320107, precision: Some(65.0) }),
        ("event_other", Event::Other { name: "taskcard_click".into() }),
    ];
    let mut ids = Vec::new();
    for (name, expected) in cases {
        let envelope = fixture_envelope(name);
        assert_eq!(envelope.event(), Some(&expected), "{name}");
        let prefix = format!("{USER}:{NOW}:");
        assert!(envelope.platform_message_id.starts_with(&prefix), "{name}: {}", envelope.platform_message_id);
        ids.push(envelope.platform_message_id);
    }
    // Sent in the same second by the same member, they are still different messages.
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
}

#[test]
fn an_unknown_message_type_is_kept_as_an_other_event() {
    assert_eq!(
        only_segment("unknown_msgtype"),
        Segment::Event(Event::Other { name: "msgtype:miniprogram_notice".into() })
    );
}

#[test]
fn a_json_callback_round_trips() {
    let plaintext = json!({
        "ToUserName": CORP, "FromUserName": "lisi", "CreateTime": NOW, "MsgType": "text",
        "Content": "JSON 你好", "MsgId": 4561255354251345929_u64, "AgentID": AGENT,
    })
    .to_string();
    let envelope = accept(&channel(), &json_callback(&plaintext));
    assert_eq!(envelope.content, vec![Segment::Text { text: "JSON 你好".into() }]);
    assert_eq!(envelope.platform_message_id, "4561255354251345929");
    assert_eq!(envelope.sender.id, "lisi");

    let event = json!({
        "ToUserName": CORP, "FromUserName": "lisi", "CreateTime": NOW, "MsgType": "event",
        "Event": "click", "EventKey": "K1", "AgentId": AGENT,
    })
    .to_string();
    let envelope = accept(&channel(), &json_callback(&event));
    assert_eq!(envelope.event(), Some(&Event::MenuClick { key: "K1".into() }));
    assert_eq!(envelope.platform_message_id, format!("lisi:{NOW}:click:K1"));
}

#[test]
fn a_decrypted_message_without_sender_or_type_is_malformed() {
    let channel = channel();
    for plaintext in [
        "<xml><MsgType>text</MsgType><CreateTime>1</CreateTime></xml>",
        "<xml><FromUserName>u</FromUserName><CreateTime>1</CreateTime></xml>",
        "<xml><FromUserName>u</FromUserName><MsgType>event</MsgType></xml>",
        "not xml at all",
        "<xml><unclosed></xml>",
    ] {
        let error = rejected(&channel, &xml_callback(plaintext));
        assert!(matches!(error, ChannelError::Malformed(_)), "{plaintext}: {error:?}");
    }
}

// --- Replay, corp, app, keys ------------------------------------------------------------------

#[test]
fn a_stale_or_future_timestamp_is_refused_even_with_a_good_signature() {
    let channel = channel();
    let crypto = platform_crypto(CORP, KEY);
    let text = fixture("text.xml");
    for now in [NOW + 301, NOW - 301] {
        let error = rejected(&channel, &xml_callback_with(&crypto, &text, NOW, now));
        assert!(matches!(error, ChannelError::BadSignature(_)), "{error:?}");
    }
    accept(&channel, &xml_callback_with(&crypto, &text, NOW, NOW + 299));
    // A zero window disables the check.
    let lenient = channel_with(json!({"replay_window_secs": 0}));
    accept(&lenient, &xml_callback_with(&crypto, &text, NOW, NOW + 100_000));
}

#[test]
fn a_callback_encrypted_for_another_corp_is_refused() {
    let other_corp = platform_crypto("ww_someone_else", KEY);
    let error = rejected(&channel(), &xml_callback_with(&other_corp, &fixture("text.xml"), NOW, NOW));
    assert!(matches!(error, ChannelError::BadSignature(_)), "{error:?}");
}

#[test]
fn a_callback_signed_with_another_token_or_encrypted_with_another_key_is_refused() {
    let text = fixture("text.xml");
    let encrypt = platform_crypto(CORP, KEY).encrypt(&text, KeySlot::Current).unwrap_or_else(|e| panic!("{e}"));
    let body = format!("<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>");
    let forged = request(Method::Post, signed_query("other-token", &encrypt, NOW), &body, NOW);
    assert!(matches!(rejected(&channel(), &forged), ChannelError::BadSignature(_)));

    let wrong_key = xml_callback_with(&platform_crypto(CORP, OLD_KEY), &text, NOW, NOW);
    assert!(matches!(rejected(&channel(), &wrong_key), ChannelError::BadSignature(_)));
}

#[test]
fn the_previous_key_still_opens_callbacks_during_a_rotation() {
    let rotating = channel_with(json!({"previous_encoding_aes_key": OLD_KEY}));
    let old = xml_callback_with(&platform_crypto(CORP, OLD_KEY), &fixture("text.xml"), NOW, NOW);
    accept(&rotating, &old);
    let new = xml_callback_with(&platform_crypto(CORP, KEY), &fixture("text.xml"), NOW, NOW);
    accept(&rotating, &new);
}

#[test]
fn a_callback_for_another_app_of_the_corp_is_acknowledged_and_ignored() {
    let other_app = fixture("text.xml").replace("<AgentID>1000002</AgentID>", "<AgentID>1000099</AgentID>");
    match channel().handle_webhook(&xml_callback(&other_app)) {
        Ok(WebhookOutcome::Respond(response)) => {
            assert_eq!(response.status, 200);
            assert!(response.body.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_callback_without_agent_id_is_accepted() {
    let no_agent = fixture("event_subscribe.xml").replace("<AgentID>1000002</AgentID>\n", "");
    let envelope = accept(&channel(), &xml_callback(&no_agent));
    assert_eq!(envelope.event(), Some(&Event::Subscribe { scene: None }));
}

#[test]
fn garbage_bodies_and_a_missing_encrypt_are_refused() {
    let channel = channel();
    let query = signed_query(TOKEN, "x", NOW);
    for body in ["", "garbage", "<xml>", "{\"a\":", "<xml><ToUserName>a</ToUserName></xml>", "{\"tousername\":\"a\"}"] {
        let outcome = channel.handle_webhook(&request(Method::Post, query.clone(), body, NOW));
        assert!(
            matches!(outcome, Err(ChannelError::Malformed(_) | ChannelError::BadSignature(_))),
            "{body:?}: {outcome:?}"
        );
    }
}

// --- Rendering --------------------------------------------------------------------------------

#[test]
fn markdown_replies_keep_the_wecom_subset() {
    let parts = channel()
        .render(&Reply::text("## 结论\n\n**好**，见[文档](https://a.b/c)。\n\n| a | b |\n|---|---|\n| 1 | 2 |"));
    let texts: Vec<&str> = parts.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(texts, vec!["## 结论\n\n**好**，见[文档](https://a.b/c)。\n\na | b\n1 | 2"]);
}

#[test]
fn text_replies_are_plain() {
    let channel = channel_with(json!({"reply_format": "text"}));
    let parts = channel.render(&Reply::text("## 结论\n\n**好**，见[文档](https://a.b/c)。"));
    assert_eq!(parts, vec![Reply::text("结论\n\n好，见文档 (https://a.b/c)。")]);
}

#[test]
fn a_long_answer_is_split_within_the_limit_in_order() {
    let channel = channel();
    let paragraph = |n: usize| format!("第{n}段：{}", "大型语言模型的回答往往很长。".repeat(40));
    let text = (0..5).map(paragraph).collect::<Vec<_>>().join("\n\n");
    let parts = channel.render(&Reply::text(text.clone()));
    assert!(parts.len() >= 3, "{}", parts.len());
    for part in &parts {
        assert!(part.text.len() <= 2048, "{}", part.text.len());
        assert!(part.text.ends_with('。'), "cut mid-sentence: {}", part.text);
    }
    let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    let joined: String = parts.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(squash(&joined), squash(&text));
}

/// A bold run longer than a part is closed at the cut and reopened in the next part, instead
/// of both showing a stray `**`.
#[test]
fn bold_cut_across_parts_stays_bold() {
    let text = format!("**{}**", "重点 ".repeat(500).trim_end());
    let parts = channel().render(&Reply::text(text));
    assert!(parts.len() >= 2, "{}", parts.len());
    for part in &parts {
        assert!(part.text.len() <= 2048, "{}", part.text.len());
        assert!(part.text.starts_with("**") && part.text.ends_with("**"), "{}", part.text);
        assert_eq!(part.text.matches("**").count(), 2, "{}", part.text);
    }
}

#[test]
fn an_empty_answer_renders_to_no_parts() {
    assert!(channel().render(&Reply::text("  \n\n ")).is_empty());
}

// --- Conformance and robustness ---------------------------------------------------------------

#[test]
fn the_channel_passes_the_core_conformance_kit() {
    testkit::check_channel(&channel());
    testkit::check_channel(&channel_with(json!({"reply_format": "text", "max_part_bytes": 100})));
}

/// A tiny deterministic generator, so the robustness tests need no extra dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % below.max(1)
    }
}

#[test]
fn random_plaintexts_inside_valid_encryption_never_panic() {
    let fragments = [
        "<xml>",
        "</xml>",
        "<MsgType>",
        "</MsgType>",
        "<![CDATA[",
        "]]>",
        "text",
        "event",
        "<Event>",
        "</Event>",
        "<FromUserName>",
        "</FromUserName>",
        "<AgentID>",
        "</AgentID>",
        "1000002",
        "&lt;",
        "&",
        "<",
        ">",
        "<a/>",
        "{",
        "}",
        "\"MsgType\":",
        "\"x\"",
        ",",
        "\u{0}",
        "好",
        "<CreateTime>",
        "</CreateTime>",
        "1",
        "location",
        "<Location_X>",
        "</Location_X>",
        "NaN",
        "enter_agent",
    ];
    let channel = channel_with(json!({"replay_window_secs": 0}));
    let crypto = platform_crypto(CORP, KEY);
    let mut rng = Lcg(13);
    for _ in 0..500 {
        let len = rng.next(30);
        let plaintext: String = (0..len).map(|_| fragments[rng.next(fragments.len())]).collect();
        let _ = channel.handle_webhook(&xml_callback_with(&crypto, &plaintext, NOW, NOW));
    }
}

#[test]
fn random_bodies_and_queries_never_panic() {
    let fragments = [
        "<xml>",
        "</xml>",
        "<Encrypt>",
        "</Encrypt>",
        "<![CDATA[",
        "]]>",
        "AAAA",
        "====",
        "+/",
        "{\"encrypt\":",
        "\"",
        "}",
        "\u{0}",
        "好",
        "<",
        "&",
    ];
    let channel = channel();
    let mut rng = Lcg(17);
    for _ in 0..1000 {
        let len = rng.next(20);
        let body: String = (0..len).map(|_| fragments[rng.next(fragments.len())]).collect();
        let encrypt = body.clone();
        for method in [Method::Get, Method::Post] {
            let mut query = signed_query(TOKEN, &encrypt, NOW);
            query.push(("echostr".into(), encrypt.clone()));
            let _ = channel.handle_webhook(&request(method, query, &body, NOW));
        }
    }
}

#[test]
fn a_valid_signature_over_garbage_ciphertext_is_refused_not_panicked() {
    let channel = channel();
    for encrypt in ["", "AAAA", "not base64!", "AAAAAAAAAAAAAAAAAAAAAA==", &"A".repeat(64)] {
        let body = format!("<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>");
        let outcome = channel.handle_webhook(&request(Method::Post, signed_query(TOKEN, encrypt, NOW), &body, NOW));
        assert!(outcome.is_err(), "{encrypt:?}");
        let mut query = signed_query(TOKEN, encrypt, NOW);
        query.push(("echostr".into(), encrypt.to_owned()));
        assert!(channel.handle_webhook(&request(Method::Get, query, "", NOW)).is_err(), "{encrypt:?}");
    }
}

#[test]
fn two_instances_are_independent() {
    // Two apps of two corps: each opens only its own callbacks.
    let first = channel();
    let second = channel_with(json!({"corp_id": "ww_other", "agent_id": 7}));
    let for_second = fixture("text.xml").replace("<AgentID>1000002</AgentID>", "<AgentID>7</AgentID>");
    let request = xml_callback_with(&platform_crypto("ww_other", KEY), &for_second, NOW, NOW);
    accept(&second, &request);
    assert!(matches!(rejected(&first, &request), ChannelError::BadSignature(_)));
}
