//! The outbound API against a local wiremock server: token caching and refresh, sends, typing,
//! and the error-code triage. Nothing here reaches the internet.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use wiremock::matchers::{body_json, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yizhan_channel_core::{Channel, ChannelError, ChannelId, Delivery};
use yizhan_channel_wechat_mp::WechatMp;

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
async fn rate_limits_are_transient_and_a_gateways_server_error_may_have_been_delivered() {
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
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(504).set_body_string("<html>gateway timeout</html>"))
        .mount(&server)
        .await;
    let channel = channel_for(&server);
    match channel.deliver(&delivery("hi")).await {
        Err(ChannelError::Transient { retry_after, .. }) => assert_eq!(retry_after, Some(Duration::from_secs(60))),
        other => panic!("{other:?}"),
    }
    // A proxy that cannot reach WeChat: nothing was sent, retried as long as configured.
    let error = channel.deliver(&delivery("hi")).await.err();
    assert!(matches!(error, Some(ChannelError::Transient { .. })), "{error:?}");
    // The gateway may have passed the send on: retried once at most, not a dozen times.
    let error = channel.deliver(&delivery("hi")).await.err();
    assert!(matches!(error, Some(ChannelError::MaybeDelivered(_))), "{error:?}");
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
    assert!(matches!(no_errcode, Some(ChannelError::MaybeDelivered(_))), "{no_errcode:?}");
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
async fn a_failure_to_connect_is_transient_and_a_timeout_after_sending_may_have_been_delivered() {
    // A privileged port nobody listens on. Not a freshly freed one: a wiremock server started
    // by a parallel test (on port 0) could take it.
    let uri = "http://127.0.0.1:9".to_owned();
    let id = ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}"));
    let channel = WechatMp::new(id, settings(uri), reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"));
    let error = channel.deliver(&delivery("hi")).await.err();
    assert!(matches!(error, Some(ChannelError::Transient { .. })), "{error:?}");

    let server = MockServer::start().await;
    // A 100 ms client timeout may expire before the token request even arrives on a loaded
    // machine (transient: nothing was sent), so the token call is not counted.
    mount_token_unchecked(&server, "SLOWTOKEN").await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(500)))
        .mount(&server)
        .await;
    let http = reqwest::Client::builder().timeout(Duration::from_millis(100)).build().unwrap_or_else(|e| panic!("{e}"));
    let error = channel_with_client(&server, http).deliver(&delivery("hi")).await.err();
    let error = error.unwrap_or_else(|| panic!("delivered despite a timeout"));
    // Past connecting, whether WeChat got it is unknown (here it did, unless the machine was
    // too slow for the send to arrive in time); a transient failure sent nothing.
    let sent = !requests_to(&server, "/cgi-bin/message/custom/send").await.is_empty();
    match &error {
        ChannelError::MaybeDelivered(_) => {}
        ChannelError::Transient { .. } => assert!(!sent, "{error}"),
        other => panic!("{other:?}"),
    }
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

/// A proxy at `api_base` answering with an endless body cannot make the channel buffer it: past
/// 1 MiB the answer is a transient failure.
#[tokio::test]
async fn an_oversized_api_answer_is_a_failure_not_memory_to_fill() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_body_string(" ".repeat(2 << 20)))
        .mount(&server)
        .await;
    let error = channel_for(&server).deliver(&delivery("大")).await.err();
    assert!(
        matches!(&error, Some(ChannelError::MaybeDelivered(reason)) if reason.contains("larger than 1 MiB")),
        "{error:?}"
    );
}
