//! The outbound API against a local wiremock server: token caching and refresh, sends, typing,
//! and the error-code triage. Nothing here reaches the internet.

use serde_json::{json, Value};
use std::time::Duration;
use wiremock::matchers::{body_json, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};
use yizhan_channel_core::{
    Channel, ChannelError, ChannelId, Conversation, ConversationKind, Delivery, Envelope, Event, Reply, ReplyHandle,
    Segment, Sender,
};
use yizhan_channel_wechat_mp::{WechatMp, WechatMpSettings};

const SECRET: &str = "the-app-secret";
const OPENID: &str = "oUser123";

fn settings(api_base: String) -> WechatMpSettings {
    serde_json::from_value(json!({
        "app_id": "wx0123456789",
        "app_secret": SECRET,
        "token": "tok",
        "api_base": format!("{api_base}/"),
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn channel_for(server: &MockServer) -> WechatMp {
    channel_with_client(server, reqwest::Client::new())
}

fn channel_with_client(server: &MockServer, http: reqwest::Client) -> WechatMp {
    let id = ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}"));
    WechatMp::new(id, settings(server.uri()), http).unwrap_or_else(|e| panic!("{e}"))
}

fn delivery(text: &str) -> Delivery {
    Delivery {
        delivery_id: "d1".into(),
        channel: ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}")),
        conversation: Conversation { kind: ConversationKind::Direct, id: OPENID.into() },
        recipient: Sender { id: OPENID.into(), name: None },
        reply_handle: ReplyHandle(json!({"account": "gh_acct"})),
        reply: Reply::text(text),
    }
}

fn envelope() -> Envelope {
    Envelope {
        id: Envelope::new_id(),
        channel: ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}")),
        channel_kind: "wechat_mp".into(),
        platform_message_id: "1".into(),
        received_at_ms: 0,
        conversation: Conversation { kind: ConversationKind::Direct, id: OPENID.into() },
        sender: Sender { id: OPENID.into(), name: None },
        content: vec![Segment::Event(Event::Subscribe { scene: None })],
        mentions_self: true,
        reply_handle: ReplyHandle(json!({"account": "gh_acct"})),
    }
}

fn token_request() -> Value {
    json!({
        "grant_type": "client_credential",
        "appid": "wx0123456789",
        "secret": SECRET,
        "force_refresh": false,
    })
}

async fn mount_token(server: &MockServer, token: &str, times: u64) {
    Mock::given(method("POST"))
        .and(path("/cgi-bin/stable_token"))
        .and(body_json(token_request()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"access_token": token, "expires_in": 7200})))
        .up_to_n_times(times)
        .expect(times)
        .mount(server)
        .await;
}

async fn mount_send(server: &MockServer, token: &str, answer: Value, times: u64) {
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .and(query_param("access_token", token))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer))
        .expect(times)
        .mount(server)
        .await;
}

async fn requests_to(server: &MockServer, wanted: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|request| request.url.path() == wanted)
        .collect()
}

fn json_body(request: &Request) -> Value {
    serde_json::from_slice(&request.body).unwrap_or_else(|e| panic!("{e}"))
}

/// No error, whatever its kind, may carry the secret or the token.
fn assert_no_secrets(error: &ChannelError, token: &str) {
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(SECRET), "secret leaked: {shown}");
    assert!(!shown.contains(token), "token leaked: {shown}");
}

#[tokio::test]
async fn the_token_is_fetched_once_for_several_sends() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", json!({"errcode": 0, "errmsg": "ok", "msgid": 9001}), 3).await;
    let channel = channel_for(&server);

    for text in ["第一条", "second", "三"] {
        let receipt = channel.deliver(&delivery(text)).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(receipt.platform_message_id.as_deref(), Some("9001"));
    }

    let sends = requests_to(&server, "/cgi-bin/message/custom/send").await;
    let bodies: Vec<Value> = sends.iter().map(json_body).collect();
    assert_eq!(
        bodies,
        vec![
            json!({"touser": OPENID, "msgtype": "text", "text": {"content": "第一条"}}),
            json!({"touser": OPENID, "msgtype": "text", "text": {"content": "second"}}),
            json!({"touser": OPENID, "msgtype": "text", "text": {"content": "三"}}),
        ]
    );
    for send in &sends {
        assert_eq!(send.url.query(), Some("access_token=TOKEN1"));
        assert_eq!(send.headers.get("content-type").and_then(|v| v.to_str().ok()), Some("application/json"));
    }
}

#[tokio::test]
async fn concurrent_sends_share_one_token_fetch() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", json!({"errcode": 0, "errmsg": "ok"}), 8).await;
    let channel = channel_for(&server);
    let deliveries: Vec<Delivery> = (0..8).map(|i| delivery(&format!("m{i}"))).collect();
    let results = futures_util::future::join_all(deliveries.iter().map(|d| channel.deliver(d))).await;
    assert!(results.iter().all(Result::is_ok));
}

#[tokio::test]
async fn a_rejected_token_is_refreshed_once_and_the_send_retried() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_token(&server, "TOKEN2", 1).await;
    mount_send(&server, "TOKEN1", json!({"errcode": 40001, "errmsg": "invalid credential"}), 1).await;
    mount_send(&server, "TOKEN2", json!({"errcode": 0, "errmsg": "ok"}), 2).await;
    let channel = channel_for(&server);

    assert!(channel.deliver(&delivery("hi")).await.is_ok());
    // The fresh token is cached: the next send fetches nothing.
    assert!(channel.deliver(&delivery("again")).await.is_ok());
    assert_eq!(requests_to(&server, "/cgi-bin/stable_token").await.len(), 2);
}

#[tokio::test]
async fn a_token_rejected_twice_is_transient_and_not_retried_in_a_loop() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/stable_token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"access_token": "TOKEN1", "expires_in": 7200})))
        .expect(2)
        .mount(&server)
        .await;
    mount_send(&server, "TOKEN1", json!({"errcode": 42001, "errmsg": "access_token expired"}), 2).await;
    let error = channel_for(&server).deliver(&delivery("hi")).await.err();
    let error = error.unwrap_or_else(|| panic!("delivered despite a rejected token"));
    assert!(error.is_retryable(), "{error}");
    assert_no_secrets(&error, "TOKEN1");
}

#[tokio::test]
async fn no_customer_service_permission_is_refused() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", json!({"errcode": 48001, "errmsg": "api unauthorized rid: 1"}), 1).await;
    let error = channel_for(&server).deliver(&delivery("hi")).await.err();
    match error {
        Some(ChannelError::Refused { code: 48001, reason }) => assert!(reason.contains("客服"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn window_and_quota_errors_are_refused_with_their_code() {
    for code in [45015, 45047, 43004, 40003] {
        let server = MockServer::start().await;
        mount_token(&server, "TOKEN1", 1).await;
        mount_send(&server, "TOKEN1", json!({"errcode": code, "errmsg": "x"}), 1).await;
        let error = channel_for(&server).deliver(&delivery("hi")).await.err();
        assert!(matches!(error, Some(ChannelError::Refused { code: c, .. }) if c == code), "{code}: {error:?}");
    }
}

#[tokio::test]
async fn a_busy_platform_is_transient() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", json!({"errcode": -1, "errmsg": "system error"}), 1).await;
    let error = channel_for(&server).deliver(&delivery("hi")).await.err();
    assert!(matches!(error, Some(ChannelError::Transient { .. })), "{error:?}");
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_transient() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"errcode": 45011, "errmsg": "minute quota"})))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(502).set_body_string("<html>bad gateway</html>"))
        .mount(&server)
        .await;
    let channel = channel_for(&server);
    match channel.deliver(&delivery("hi")).await {
        Err(ChannelError::Transient { retry_after, .. }) => assert_eq!(retry_after, Some(Duration::from_secs(60))),
        other => panic!("{other:?}"),
    }
    let error = channel.deliver(&delivery("hi")).await.err();
    assert!(matches!(error, Some(ChannelError::Transient { .. })), "{error:?}");
}

/// A proxy at `api_base` may answer with HTTP errors WeChat never uses, or rewrite its JSON.
#[tokio::test]
async fn a_proxy_s_http_errors_and_answers_without_an_errcode_are_not_taken_for_success() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    for (answer, times) in [
        (ResponseTemplate::new(200).set_body_json(json!({"ok": true})), 1),
        (ResponseTemplate::new(200).set_body_json(json!({"errcode": "45047", "errmsg": "quota"})), 1),
        (ResponseTemplate::new(404).set_body_string("not found"), 1),
    ] {
        Mock::given(method("POST"))
            .and(path("/cgi-bin/message/custom/send"))
            .respond_with(answer)
            .up_to_n_times(times)
            .mount(&server)
            .await;
    }
    let channel = channel_for(&server);
    let no_errcode = channel.deliver(&delivery("hi")).await.err();
    assert!(matches!(no_errcode, Some(ChannelError::Transient { .. })), "{no_errcode:?}");
    let quoted = channel.deliver(&delivery("hi")).await.err();
    assert!(matches!(quoted, Some(ChannelError::Refused { code: 45047, .. })), "{quoted:?}");
    let not_found = channel.deliver(&delivery("hi")).await.err();
    assert!(
        matches!(not_found, Some(ChannelError::Misconfigured(ref why)) if why.contains("api_base")),
        "{not_found:?}"
    );
}

#[tokio::test]
async fn an_ip_outside_the_whitelist_is_a_misconfiguration_that_says_what_to_do() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", json!({"errcode": 40164, "errmsg": "invalid ip 203.0.113.9, not in whitelist"}), 3)
        .await;
    let channel = channel_for(&server);
    for _ in 0..3 {
        let error = channel.deliver(&delivery("hi")).await.err();
        match &error {
            Some(ChannelError::Misconfigured(message)) => {
                assert!(message.contains("IP whitelist") && message.contains("40164"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        if let Some(error) = &error {
            assert_no_secrets(error, "TOKEN1");
        }
    }
}

#[tokio::test]
async fn token_endpoint_errors_are_triaged_like_send_errors() {
    let cases = [
        (40164, "misconfigured"),
        (40013, "misconfigured"),
        (40125, "misconfigured"),
        (40001, "misconfigured"),
        (-1, "transient"),
        (45009, "transient"),
    ];
    for (code, label) in cases {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/cgi-bin/stable_token"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json!({"errcode": code, "errmsg": format!("bad {SECRET}")})),
            )
            .mount(&server)
            .await;
        let error = channel_for(&server).deliver(&delivery("hi")).await.err();
        let error = error.unwrap_or_else(|| panic!("{code} delivered"));
        assert_eq!(error.label(), label, "{code}: {error}");
        assert_no_secrets(&error, "never-issued");
        assert!(requests_to(&server, "/cgi-bin/message/custom/send").await.is_empty());
    }
}

#[tokio::test]
async fn network_failures_and_timeouts_are_transient() {
    // A port nobody listens on (wiremock pools its servers, so dropping one does not close it).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let uri = format!("http://{}", listener.local_addr().unwrap_or_else(|e| panic!("{e}")));
    drop(listener);
    let id = ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}"));
    let channel = WechatMp::new(id, settings(uri), reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"));
    let error = channel.deliver(&delivery("hi")).await.err();
    assert!(matches!(error, Some(ChannelError::Transient { .. })), "{error:?}");

    let server = MockServer::start().await;
    mount_token(&server, "SLOWTOKEN", 1).await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(500)))
        .mount(&server)
        .await;
    let http = reqwest::Client::builder().timeout(Duration::from_millis(100)).build().unwrap_or_else(|e| panic!("{e}"));
    let error = channel_with_client(&server, http).deliver(&delivery("hi")).await.err();
    let error = error.unwrap_or_else(|| panic!("delivered despite a timeout"));
    assert!(error.is_retryable(), "{error}");
    assert_no_secrets(&error, "SLOWTOKEN");
}

#[tokio::test]
async fn typing_sends_the_typing_command_to_the_sender() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/typing"))
        .and(query_param("access_token", "TOKEN1"))
        .and(body_json(json!({"touser": OPENID, "command": "Typing"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"errcode": 0, "errmsg": "ok"})))
        .expect(1)
        .mount(&server)
        .await;
    assert!(channel_for(&server).typing(&envelope()).await.is_ok());
}

#[tokio::test]
async fn typing_declined_for_lack_of_recent_interaction_is_quietly_ok() {
    for code in [45080, 45081] {
        let server = MockServer::start().await;
        mount_token(&server, "TOKEN1", 1).await;
        Mock::given(method("POST"))
            .and(path("/cgi-bin/message/custom/typing"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"errcode": code, "errmsg": "x"})))
            .expect(1)
            .mount(&server)
            .await;
        assert!(channel_for(&server).typing(&envelope()).await.is_ok(), "{code}");
    }
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/typing"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"errcode": 48001, "errmsg": "x"})))
        .mount(&server)
        .await;
    assert!(channel_for(&server).typing(&envelope()).await.is_err());
}

#[tokio::test]
async fn an_empty_part_is_not_sent() {
    let server = MockServer::start().await;
    for blank in [" \n", "\u{1b}\u{7} "] {
        let receipt = channel_for(&server).deliver(&delivery(blank)).await;
        assert!(receipt.is_ok());
    }
    assert!(server.received_requests().await.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn control_characters_are_not_sent() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", json!({"errcode": 0, "errmsg": "ok"}), 1).await;
    channel_for(&server).deliver(&delivery("终端输出\u{1b}[31m红\u{7}\t完")).await.unwrap_or_else(|e| panic!("{e}"));
    let sends = requests_to(&server, "/cgi-bin/message/custom/send").await;
    assert_eq!(json_body(&sends[0])["text"]["content"], "终端输出[31m红\t完");
}

/// Log output captured in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().map(|buffer| buffer.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).lines().map(str::to_owned).collect()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut buffer) = self.0.lock() {
            buffer.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_misconfiguration_is_logged_once_per_code_until_a_send_succeeds_and_never_with_secrets() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // NOTE: a current-thread test runtime, so the thread-local default covers every await.
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"errcode": 40164, "errmsg": "invalid ip"})))
        .up_to_n_times(5)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"errcode": 0, "errmsg": "ok"})))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"errcode": 40164, "errmsg": "invalid ip"})))
        .mount(&server)
        .await;
    let channel = channel_for(&server);

    let errors_logged = || captured.lines().iter().filter(|line| line.contains("ERROR")).count();
    for _ in 0..5 {
        assert!(channel.deliver(&delivery("hi")).await.is_err());
    }
    assert_eq!(errors_logged(), 1, "{:#?}", captured.lines());
    assert!(channel.deliver(&delivery("fixed")).await.is_ok());
    assert!(channel.deliver(&delivery("broken again")).await.is_err());
    assert_eq!(errors_logged(), 2, "{:#?}", captured.lines());

    let lines = captured.lines();
    assert!(lines.iter().any(|line| line.contains("40164") && line.contains("channel=mp")), "{lines:#?}");
    for line in &lines {
        assert!(!line.contains(SECRET) && !line.contains("TOKEN1"), "secret in log: {line}");
    }
}

/// A proxy at `api_base` answering with an endless body cannot make the channel buffer it: past
/// 1 MiB the answer is a transient failure.
#[tokio::test]
async fn an_oversized_api_answer_is_a_transient_error_not_memory_to_fill() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_body_string(" ".repeat(2 << 20)))
        .mount(&server)
        .await;
    let error = channel_for(&server).deliver(&delivery("大")).await.err();
    assert!(
        matches!(&error, Some(ChannelError::Transient { reason, .. }) if reason.contains("larger than 1 MiB")),
        "{error:?}"
    );
}
