//! Webhook handling through the public `Channel` API: signed fixture pushes for every message
//! type and event, malformed bodies, passive replies, rendering, and the core's conformance kit.

use bytes::Bytes;
use serde_json::json;
use std::time::{Duration, SystemTime};
use yizhan_channel_core::{
    Channel, ChannelError, ChannelId, ChannelSettings, ConversationKind, Envelope, Event, Method, Reply, Segment,
    WebhookOutcome, WebhookRequest,
};
use yizhan_channel_wechat_mp::{signature::signature, WechatMp};

const TOKEN: &str = "test-token";
const NOW: u64 = 1_714_036_504;

fn channel() -> WechatMp {
    channel_with(json!({}))
}

fn channel_with(extra: serde_json::Value) -> WechatMp {
    let mut table = json!({
        "app_id": "wx0123456789", "app_secret": "app-secret", "token": TOKEN,
        "api_base": "http://127.0.0.1:9/",
    });
    if let (Some(table), Some(extra)) = (table.as_object_mut(), extra.as_object()) {
        table.extend(extra.clone());
    }
    let settings = ChannelSettings {
        id: ChannelId::parse("mp-main").unwrap_or_else(|e| panic!("{e}")),
        kind: "wechat_mp".into(),
        table,
    };
    WechatMp::from_settings(&settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"))
}

fn signed_post(body: &str) -> WebhookRequest {
    signed(Method::Post, body, NOW, NOW)
}

fn signed(method: Method, body: &str, timestamp: u64, now: u64) -> WebhookRequest {
    let (ts, nonce) = (timestamp.to_string(), "1514711492".to_owned());
    let query = vec![
        ("signature".to_owned(), signature(TOKEN, &ts, &nonce)),
        ("timestamp".to_owned(), ts),
        ("nonce".to_owned(), nonce),
        ("openid".to_owned(), "oFromUser".to_owned()),
    ];
    let raw_query = query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    WebhookRequest {
        method,
        query,
        raw_query,
        headers: vec![("content-type".into(), "text/xml".into())],
        body: Bytes::from(body.to_owned()),
        received_at: SystemTime::UNIX_EPOCH + Duration::from_secs(now),
    }
}

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}.xml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Handles a signed fixture push and returns its only envelope.
fn envelope(name: &str) -> Envelope {
    match channel().handle_webhook(&signed_post(&fixture(name))) {
        Ok(WebhookOutcome::Accepted { mut envelopes, ack }) => {
            assert_eq!(ack.body, Bytes::from_static(b"success"), "{name}");
            assert_eq!(envelopes.len(), 1, "{name}");
            envelopes.remove(0)
        }
        other => panic!("{name}: {other:?}"),
    }
}

fn only_segment(name: &str) -> Segment {
    let envelope = envelope(name);
    assert_eq!(envelope.content.len(), 1, "{name}");
    envelope.content[0].clone()
}

fn only_event(name: &str) -> Event {
    match only_segment(name) {
        Segment::Event(event) => event,
        other => panic!("{name}: not an event: {other:?}"),
    }
}

/// Every kind of push, retried by WeChat a minute later, is the same message to the core's
/// dedupe, and its envelope reads back from the journal.
#[test]
fn every_push_and_its_retry_are_accepted_alike() {
    let names = [
        "text",
        "text_plain",
        "image",
        "voice",
        "voice_recognition",
        "video",
        "shortvideo",
        "location",
        "link",
        "unknown_msgtype",
        "event_click",
        "event_location",
        "event_other",
        "event_scan",
        "event_subscribe",
        "event_subscribe_qrscene",
        "event_unsubscribe",
        "event_view",
    ];
    for name in names {
        yizhan_channel_core::testkit::accepts_a_message_and_its_retry_alike(&channel(), &signed_post(&fixture(name)));
    }
}

#[test]
fn a_text_message_becomes_a_direct_envelope_with_the_account_in_its_reply_handle() {
    let envelope = envelope("text");
    assert_eq!(envelope.channel.as_str(), "mp-main");
    assert_eq!(envelope.channel_kind, "wechat_mp");
    assert_eq!(envelope.platform_message_id, "1234567890123456");
    assert_eq!(envelope.received_at_ms, NOW as i64 * 1000);
    assert_eq!(envelope.conversation.kind, ConversationKind::Direct);
    assert_eq!(envelope.conversation.id, "oFromUser");
    assert_eq!(envelope.sender.id, "oFromUser");
    assert!(envelope.mentions_self);
    assert_eq!(envelope.reply_handle.0, json!({"account": "gh_toUser", "create_time": 1_348_831_860}));
    assert_eq!(envelope.text(), "你好，  请帮我写**一首诗** <b>&amp;</b>");
    assert_eq!(envelope.id.len(), 28); // the contract crate's time-ordered id: 12 + 16 hex digits
}

#[test]
fn plain_text_values_without_cdata_are_unescaped_and_unknown_elements_ignored() {
    let envelope = envelope("text_plain");
    assert_eq!(envelope.text(), "a < b && c");
    assert_eq!(envelope.platform_message_id, "42");
}

#[test]
fn every_message_type_is_parsed() {
    assert_eq!(
        only_segment("image"),
        Segment::Image {
            url: Some("http://mmbiz.qpic.cn/this_is_a_url".into()),
            media_id: Some("media_id_image".into()),
        }
    );
    assert_eq!(
        only_segment("voice"),
        Segment::Voice { media_id: Some("media_id_voice".into()), format: Some("amr".into()), recognition: None }
    );
    assert_eq!(
        only_segment("voice_recognition"),
        Segment::Voice {
            media_id: Some("media_id_voice".into()),
            format: Some("speex".into()),
            recognition: Some("今天天气怎么样".into()),
        }
    );
    assert_eq!(envelope("voice_recognition").text(), "今天天气怎么样");
    assert_eq!(
        only_segment("video"),
        Segment::Video { media_id: Some("media_id_video".into()), thumb_media_id: Some("thumb_media_id".into()) }
    );
    assert_eq!(
        only_segment("shortvideo"),
        Segment::Video { media_id: Some("media_id_shortvideo".into()), thumb_media_id: Some("thumb_media_id".into()) }
    );
    assert_eq!(
        only_segment("location"),
        Segment::Location {
            latitude: 23.134521,
            longitude: 113.358803,
            scale: Some(20.0),
            label: Some("位置信息".into()),
        }
    );
    assert_eq!(
        only_segment("link"),
        Segment::Link {
            title: Some("公众平台官网链接".into()),
            description: Some("公众平台官网链接".into()),
            url: "https://mp.weixin.qq.com/".into(),
        }
    );
}

#[test]
fn every_documented_event_is_parsed() {
    assert_eq!(only_event("event_subscribe"), Event::Subscribe { scene: None });
    assert_eq!(only_event("event_subscribe_qrscene"), Event::Subscribe { scene: Some("123".into()) });
    assert_eq!(only_event("event_unsubscribe"), Event::Unsubscribe);
    assert_eq!(only_event("event_scan"), Event::Scan { scene: Some("SCENE_VALUE".into()) });
    assert_eq!(
        only_event("event_location"),
        Event::Location { latitude: 23.137466, longitude: 113.352425, precision: Some(119.38504) }
    );
    assert_eq!(only_event("event_click"), Event::MenuClick { key: "V1001_TODAY_MUSIC".into() });
    assert_eq!(only_event("event_view"), Event::MenuView { url: "http://www.qq.com/".into() });
    assert_eq!(only_event("event_other"), Event::Other { name: "scancode_push".into() });
}

#[test]
fn an_unknown_message_type_is_kept_as_an_other_event() {
    assert_eq!(only_event("unknown_msgtype"), Event::Other { name: "msgtype:miniprogrampage".into() });
    assert_eq!(envelope("unknown_msgtype").platform_message_id, "1234567890123464");
}

#[test]
fn events_are_deduplicated_by_sender_create_time_event_and_key() {
    assert_eq!(envelope("event_subscribe").platform_message_id, "oFromUser:123456789:subscribe:");
    assert_eq!(envelope("event_click").platform_message_id, "oFromUser:123456793:CLICK:V1001_TODAY_MUSIC");
}

#[test]
fn malformed_or_incomplete_bodies_are_refused_as_malformed() {
    let text = fixture("text");
    let bodies = [
        String::new(),
        "<xml>".to_owned(),
        "not xml at all".to_owned(),
        text.replace("</xml>", ""),
        text.replace("</Content>", "</Contents>"),
        text.replace("<FromUserName><![CDATA[oFromUser]]></FromUserName>", ""),
        text.replace("<MsgType><![CDATA[text]]></MsgType>", ""),
        text.replace("<MsgType><![CDATA[text]]></MsgType>", "<MsgType></MsgType>"),
        fixture("location").replace("23.134521", "north"),
        fixture("event_subscribe").replace("<CreateTime>123456789</CreateTime>", ""),
    ];
    for body in bodies {
        let outcome = channel().handle_webhook(&signed_post(&body));
        assert!(matches!(outcome, Err(ChannelError::Malformed(_))), "accepted {body:?}: {outcome:?}");
    }
    // An event without its name is kept, as one of another kind (refused, WeChat would retry
    // it and show the user its error page), as WeCom's are.
    let nameless = fixture("event_click").replace("<Event><![CDATA[CLICK]]></Event>", "");
    let outcome = channel().handle_webhook(&signed_post(&nameless));
    let content = match &outcome {
        Ok(WebhookOutcome::Accepted { envelopes, .. }) => envelopes.first().map(|envelope| envelope.content.clone()),
        _ => None,
    };
    assert!(
        matches!(content.as_deref(), Some([Segment::Event(Event::Other { name })]) if name.is_empty()),
        "{outcome:?}"
    );
}

#[test]
fn a_push_with_a_bad_signature_or_stale_timestamp_is_refused() {
    let body = fixture("text");
    let mut forged = signed_post(&body);
    forged.query[0].1 = signature("other-token", &NOW.to_string(), "1514711492");
    assert!(matches!(channel().handle_webhook(&forged), Err(ChannelError::BadSignature(_))));

    let stale = signed(Method::Post, &body, NOW - 301, NOW);
    assert!(matches!(channel().handle_webhook(&stale), Err(ChannelError::BadSignature(_))));
    let future = signed(Method::Post, &body, NOW + 301, NOW);
    assert!(matches!(channel().handle_webhook(&future), Err(ChannelError::BadSignature(_))));
    let inside = signed(Method::Post, &body, NOW - 299, NOW);
    assert!(channel().handle_webhook(&inside).is_ok());

    let disabled = channel_with(json!({"replay_window_secs": 0}));
    assert!(disabled.handle_webhook(&signed(Method::Post, &body, 1, NOW)).is_ok());
}

#[test]
fn a_signed_get_is_answered_with_echostr() {
    let mut request = signed(Method::Get, "", NOW, NOW);
    request.query.push(("echostr".into(), "4375120948345356249".into()));
    match channel().handle_webhook(&request) {
        Ok(WebhookOutcome::Respond(response)) => {
            assert_eq!(response.body, Bytes::from_static(b"4375120948345356249"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn safe_mode_requests_with_a_forged_msg_signature_are_refused_not_misparsed() {
    let mut request =
        signed_post("<xml><ToUserName><![CDATA[gh_toUser]]></ToUserName><Encrypt><![CDATA[abc]]></Encrypt></xml>");
    request.query.push(("encrypt_type".into(), "aes".into()));
    request.query.push(("msg_signature".into(), "0".repeat(40)));
    assert!(matches!(channel().handle_webhook(&request), Err(ChannelError::BadSignature(_))));
}

#[test]
fn a_passive_reply_carries_the_text_back_with_to_and_from_swapped() {
    let channel = channel();
    let request = signed_post(&fixture("text"));
    let envelope = envelope("text");
    let text = "答案：a]]>b <x> & 结束";
    let response = channel.passive_reply(&request, &envelope, &Reply::text(text)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status, 200);
    assert!(response.content_type.starts_with("application/xml"));
    let xml = std::str::from_utf8(&response.body).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(values(xml, "ToUserName"), "oFromUser");
    assert_eq!(values(xml, "FromUserName"), "gh_toUser");
    assert_eq!(values(xml, "CreateTime"), NOW.to_string());
    assert_eq!(values(xml, "MsgType"), "text");
    assert_eq!(values(xml, "Content"), text);
}

#[test]
fn an_empty_passive_reply_is_answered_success() {
    let request = signed_post(&fixture("text"));
    // Control characters XML cannot carry would leave an empty Content too.
    for text in ["  ", "\u{7}", "\u{1b}\u{0} "] {
        let response =
            channel().passive_reply(&request, &envelope("text"), &Reply::text(text)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(response.body, Bytes::from_static(b"success"), "{text:?}");
    }
}

/// Reads one element's text back with quick-xml's reader, independently of the crate's parser.
fn values(xml: &str, element: &str) -> String {
    use quick_xml::events::Event as XmlEvent;
    let mut reader = quick_xml::Reader::from_str(xml);
    let (mut inside, mut out) = (false, String::new());
    loop {
        match reader.read_event() {
            Ok(XmlEvent::Start(start)) => inside = start.name().as_ref() == element.as_bytes(),
            Ok(XmlEvent::End(_)) => inside = false,
            Ok(XmlEvent::Text(text)) if inside => out.push_str(&text.unescape().unwrap_or_default()),
            Ok(XmlEvent::CData(data)) if inside => out.push_str(&data.decode().unwrap_or_default()),
            Ok(XmlEvent::Eof) => return out,
            Ok(_) => {}
            Err(error) => panic!("reply is not well-formed XML: {error}: {xml}"),
        }
    }
}

#[test]
fn a_long_markdown_answer_renders_to_plain_parts_within_the_limit() {
    let mut answer = String::from("## 回答\n\n");
    for i in 1..=40 {
        answer.push_str(&format!(
            "{i}. **第{i}点**：这是一个比较长的解释，包含`代码`和[链接](https://example.com/{i})。\n"
        ));
    }
    answer.push_str("\n```\nlet x = 1;\n```\n");
    let parts = channel().render(&Reply::text(answer));
    assert!(parts.len() >= 2);
    for part in &parts {
        assert!(part.text.len() <= 2048 && !part.text.trim().is_empty());
        assert!(!part.text.contains("**") && !part.text.contains("##") && !part.text.contains('`'));
    }
    let all: String = parts.iter().map(|p| p.text.as_str()).collect::<Vec<_>>().join("\n");
    assert!(
        all.starts_with("回答\n\n1. 第1点：这是一个比较长的解释，包含代码和链接 (https://example.com/1)。"),
        "{all}"
    );
    assert!(all.contains("40. 第40点"));
    assert!(all.ends_with("let x = 1;"));
}

#[test]
fn a_three_thousand_character_chinese_answer_splits_at_sentence_ends() {
    let sentence = "这是一个关于人工智能的详细回答，它需要被拆分成多条消息发送。";
    let answer = sentence.repeat(3000 / sentence.chars().count() + 1);
    let parts = channel().render(&Reply::text(answer.clone()));
    assert_eq!(parts.iter().map(|p| p.text.as_str()).collect::<String>(), answer);
    assert!(parts.len() >= 5);
    for part in &parts {
        assert!(part.text.len() <= 2048);
        assert!(part.text.ends_with('。'));
    }
}

#[test]
fn the_part_limit_comes_from_settings() {
    let channel = channel_with(json!({"max_part_bytes": 600}));
    assert_eq!(channel.capabilities().max_part_bytes, 600);
    let parts = channel.render(&Reply::text("字".repeat(1000)));
    assert!(parts.iter().all(|p| p.text.len() <= 600));
    assert_eq!(parts.iter().map(|p| p.text.chars().count()).sum::<usize>(), 1000);
}

#[test]
fn the_channel_passes_the_core_conformance_kit() {
    yizhan_channel_core::testkit::check_channel(&channel());
    yizhan_channel_core::testkit::check_channel(&channel_with(json!({"max_part_bytes": 64})));
    yizhan_channel_core::testkit::check_channel(&channel_with(json!({"replay_window_secs": 0})));
}
