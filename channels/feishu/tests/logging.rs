//! Logging of misconfigurations: once per code, never with secrets.
//!
//! NOTE: alone in its own test binary on purpose. `tracing` caches per-callsite interest
//! globally, so a test in the same process that hits the `error!` callsite first, on another
//! thread without a subscriber, can make this test's thread-local subscriber miss the line.

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yizhan_channel_core::testkit::capture_logs;
use yizhan_channel_core::{Channel, ChannelId, Conversation, ConversationKind, Delivery, Reply, ReplyHandle, Sender};
use yizhan_channel_feishu::{Feishu, FeishuSettings};

const SECRET: &str = "the-app-secret";
const TOKEN_PATH: &str = "/open-apis/auth/v3/tenant_access_token/internal";

fn channel_for(server: &MockServer) -> Feishu {
    let settings: FeishuSettings = serde_json::from_value(json!({
        "app_id": "cli_9f5343c580712544",
        "app_secret": SECRET,
        "verification_token": "vt",
        "api_base": server.uri(),
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let id = ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}"));
    Feishu::new(id, settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"))
}

fn delivery(id: &str, text: &str) -> Delivery {
    Delivery {
        delivery_id: id.into(),
        channel: ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}")),
        conversation: Conversation { kind: ConversationKind::Direct, id: "oc_1".into() },
        recipient: Sender { id: "ou_user".into(), name: None },
        reply_handle: ReplyHandle(json!({"message_id": "om_1", "chat_id": "oc_1"})),
        reply: Reply::text(text),
    }
}

#[tokio::test]
async fn a_wrong_secret_is_logged_once_per_code_not_per_message_and_never_with_secrets() {
    // NOTE: a current-thread test runtime, so the thread-local default covers every await.
    let (captured, _guard) = capture_logs();

    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"code": 10014, "msg": format!("app secret invalid: {SECRET}")})),
        )
        .mount(&server)
        .await;
    let channel = channel_for(&server);
    for i in 0..5 {
        assert!(channel.deliver(&delivery(&format!("d{i}"), "hi")).await.is_err());
    }
    let lines = captured.lines();
    let errors = lines.iter().filter(|line| line.contains("ERROR")).count();
    assert_eq!(errors, 1, "{lines:#?}");
    assert!(lines.iter().any(|line| line.contains("10014") && line.contains("channel=fs")), "{lines:#?}");
    for line in &lines {
        assert!(!line.contains(SECRET), "secret in log: {line}");
    }
}

#[tokio::test]
async fn a_channel_without_an_encrypt_key_warns_that_its_callbacks_are_unsigned() {
    let (captured, _guard) = capture_logs();
    let server = MockServer::start().await;
    let _unsigned = channel_for(&server);
    let warned =
        |lines: &[String]| lines.iter().filter(|line| line.contains("WARN") && line.contains("encrypt_key")).count();
    assert_eq!(warned(&captured.lines()), 1, "{:#?}", captured.lines());

    let settings: FeishuSettings = serde_json::from_value(json!({
        "app_id": "cli_9f5343c580712544",
        "app_secret": SECRET,
        "verification_token": "vt",
        "encrypt_key": "the-encrypt-key",
        "api_base": server.uri(),
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let id = ChannelId::parse("fs2").unwrap_or_else(|e| panic!("{e}"));
    let _signed = Feishu::new(id, settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"));
    let lines = captured.lines();
    assert_eq!(warned(&lines), 1, "no second warning: {lines:#?}");
    assert!(!lines.iter().any(|line| line.contains("the-encrypt-key") || line.contains(SECRET)), "{lines:#?}");
}
