//! The outbound API against a local wiremock server: callback → deliver, token caching and
//! refresh, the error-code triage, splitting, logging. Nothing here reaches the internet.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};
use yizhan_channel_core::{Channel, ChannelError, Delivery, Reply, ReplyHandle, WebhookOutcome};
use yizhan_channel_wecom::Wecom;

fn channel_for(server: &MockServer) -> Wecom {
    channel_with(json!({"api_base": format!("{}/", server.uri())}))
}

fn channel_for_with(server: &MockServer, extra: Value) -> Wecom {
    let mut settings = json!({"api_base": server.uri()});
    if let (Some(settings), Some(extra)) = (settings.as_object_mut(), extra.as_object()) {
        settings.extend(extra.clone());
    }
    channel_with(settings)
}

async fn mount_token(server: &MockServer, token: &str, times: u64) {
    Mock::given(method("GET"))
        .and(path("/cgi-bin/gettoken"))
        .and(query_param("corpid", CORP))
        .and(query_param("corpsecret", SECRET))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": 7200})),
        )
        .up_to_n_times(times)
        .expect(times)
        .mount(server)
        .await;
}

async fn mount_send(server: &MockServer, token: &str, answer: Value, times: u64) {
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/send"))
        .and(query_param("access_token", token))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer))
        .expect(times)
        .mount(server)
        .await;
}

/// `message/send` answers each of `answers` once, in order.
async fn mount_send_answers(server: &MockServer, answers: impl IntoIterator<Item = ResponseTemplate>) {
    for answer in answers {
        Mock::given(method("POST"))
            .and(path("/cgi-bin/message/send"))
            .respond_with(answer)
            .up_to_n_times(1)
            .mount(server)
            .await;
    }
}

fn ok_answer() -> Value {
    json!({"errcode": 0, "errmsg": "ok", "invaliduser": "", "invalidparty": "", "invalidtag": "", "unlicenseduser": "", "msgid": "MSGID1", "response_code": "rc"})
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

fn send_body(user: &str, msgtype: &str, content: &str) -> Value {
    json!({
        "touser": user, "msgtype": msgtype, "agentid": AGENT, msgtype: {"content": content},
        "safe": 0, "enable_duplicate_check": 1, "duplicate_check_interval": 900,
    })
}

/// No error, whatever its kind, may carry the secret or the token.
fn assert_no_secrets(error: &ChannelError, token: &str) {
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(SECRET), "secret leaked: {shown}");
    assert!(!shown.contains(token), "token leaked: {shown}");
}

async fn deliver_err(channel: &Wecom, text: &str) -> ChannelError {
    match channel.deliver(&delivery(text)).await {
        Err(error) => error,
        Ok(receipt) => panic!("delivered: {receipt:?}"),
    }
}

#[tokio::test]
async fn an_encrypted_callback_is_answered_through_message_send() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", ok_answer(), 1).await;
    let channel = channel_for(&server);

    // The callback, as WeCom would push it.
    let envelope = match channel.handle_webhook(&xml_callback(&fixture("text.xml"))) {
        Ok(WebhookOutcome::Accepted { mut envelopes, .. }) => envelopes.remove(0),
        other => panic!("{other:?}"),
    };
    // The core renders the answer and delivers each part to the sender.
    let parts = channel.render(&Reply::text("**收到**：你好"));
    assert_eq!(parts.len(), 1);
    let delivery = Delivery {
        delivery_id: "d1".into(),
        channel: envelope.channel.clone(),
        conversation: envelope.conversation.clone(),
        recipient: envelope.sender.clone(),
        reply_handle: envelope.reply_handle.clone(),
        reply: parts[0].clone(),
    };
    let receipt = channel.deliver(&delivery).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(receipt.platform_message_id.as_deref(), Some("MSGID1"));

    let sends = requests_to(&server, "/cgi-bin/message/send").await;
    assert_eq!(sends.len(), 1);
    // A message of this run, within a window of its start: no duplicate check (see `repeats`).
    let mut expected = send_body(USER, "markdown", "**收到**：你好");
    expected["enable_duplicate_check"] = json!(0);
    assert_eq!(json_body(&sends[0]), expected);
    assert_eq!(sends[0].url.query(), Some("access_token=TOKEN1"));
    assert_eq!(sends[0].headers.get("content-type").and_then(|v| v.to_str().ok()), Some("application/json"));
}

/// WeCom's duplicate check stops a resent part from showing twice, but would also swallow a
/// different message with the same text (the apology while the model is down).
#[tokio::test]
async fn a_resend_asks_for_the_duplicate_check_but_a_new_message_with_the_same_text_does_not() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", ok_answer(), 4).await;
    let channel = channel_for(&server);
    let apology = |id: &str| Delivery { delivery_id: id.into(), ..delivery("抱歉，出了点问题。") };
    for id in ["e1-0", "e1-0", "e2-0", "e2-0"] {
        channel.deliver(&apology(id)).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let checks: Vec<Value> = requests_to(&server, "/cgi-bin/message/send")
        .await
        .iter()
        .map(|request| json_body(request)["enable_duplicate_check"].clone())
        .collect();
    assert_eq!(checks, [json!(1), json!(1), json!(0), json!(0)]);
}

/// Within a window of the start, a part of this run's message goes without the check (the last
/// run may have sent the same text to the member: the check would swallow this one), and a part
/// of a message the last run accepted (resumed after a restart) with it (the last run may have
/// sent that very part).
#[tokio::test]
async fn after_a_start_only_parts_of_the_last_runs_messages_ask_for_the_duplicate_check() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", ok_answer(), 3).await;
    let channel = channel_for(&server);
    let this_run = match channel.handle_webhook(&xml_callback(&fixture("text.xml"))) {
        Ok(WebhookOutcome::Accepted { envelopes, .. }) => envelopes[0].reply_handle.clone(),
        other => panic!("{other:?}"),
    };
    let mut earlier_run = this_run.clone();
    earlier_run.0["run"] = json!("an earlier run");
    let part = |id: &str, reply_handle: &ReplyHandle| Delivery {
        delivery_id: id.into(),
        reply_handle: reply_handle.clone(),
        ..delivery(&format!("回答 {id}"))
    };
    for part in [part("now-0", &this_run), part("resumed-0", &earlier_run)] {
        channel.deliver(&part).await.unwrap_or_else(|e| panic!("{e}"));
    }
    // A handle of an earlier version, without the run: an earlier run's.
    channel.deliver(&delivery("另一句")).await.unwrap_or_else(|e| panic!("{e}"));
    let checks: Vec<Value> = requests_to(&server, "/cgi-bin/message/send")
        .await
        .iter()
        .map(|request| json_body(request)["enable_duplicate_check"].clone())
        .collect();
    assert_eq!(checks, [json!(0), json!(1), json!(1)]);
}

#[tokio::test]
async fn text_format_sends_text_messages() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", ok_answer(), 1).await;
    let channel = channel_for_with(&server, json!({"reply_format": "text"}));
    let parts = channel.render(&Reply::text("**收到**"));
    channel.deliver(&delivery(&parts[0].text)).await.unwrap_or_else(|e| panic!("{e}"));
    let sends = requests_to(&server, "/cgi-bin/message/send").await;
    assert_eq!(json_body(&sends[0]), send_body(USER, "text", "收到"));
}

/// The WeChat family refuses JSON with `\u001b`-style escapes (公众号 errcode 40033): a model's
/// answer copying terminal output must not lose the whole part.
#[tokio::test]
async fn control_characters_are_not_sent() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", ok_answer(), 1).await;
    let channel = channel_for_with(&server, json!({"reply_format": "text"}));
    channel.deliver(&delivery("终端输出\u{1b}[31m红\u{7}\t完")).await.unwrap_or_else(|e| panic!("{e}"));
    let sends = requests_to(&server, "/cgi-bin/message/send").await;
    assert_eq!(json_body(&sends[0]), send_body(USER, "text", "终端输出[31m红\t完"));
}

#[tokio::test]
async fn the_token_is_fetched_once_for_several_sends() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", ok_answer(), 3).await;
    let channel = channel_for(&server);
    for text in ["第一条", "second", "三"] {
        channel.deliver(&delivery(text)).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let bodies: Vec<Value> = requests_to(&server, "/cgi-bin/message/send").await.iter().map(json_body).collect();
    assert_eq!(
        bodies,
        vec![
            send_body(USER, "markdown", "第一条"),
            send_body(USER, "markdown", "second"),
            send_body(USER, "markdown", "三"),
        ]
    );
    assert_eq!(requests_to(&server, "/cgi-bin/gettoken").await.len(), 1);
}

#[tokio::test]
async fn concurrent_sends_share_one_token_fetch() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", ok_answer(), 8).await;
    let channel = channel_for(&server);
    let deliveries: Vec<Delivery> = (0..8).map(|i| delivery_to(&format!("user{i}"), "hi")).collect();
    let results = futures_util::future::join_all(deliveries.iter().map(|d| channel.deliver(d))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_and_the_send_retried() {
    for code in [42001, 40014, 40001] {
        let server = MockServer::start().await;
        mount_token(&server, "TOKEN1", 1).await;
        mount_token(&server, "TOKEN2", 1).await;
        mount_send(&server, "TOKEN1", json!({"errcode": code, "errmsg": "access_token expired"}), 1).await;
        mount_send(&server, "TOKEN2", ok_answer(), 2).await;
        let channel = channel_for(&server);
        assert!(channel.deliver(&delivery("hi")).await.is_ok(), "{code}");
        // The fresh token is cached: the next send fetches nothing.
        assert!(channel.deliver(&delivery("again")).await.is_ok(), "{code}");
        assert_eq!(requests_to(&server, "/cgi-bin/gettoken").await.len(), 2, "{code}");
    }
}

#[tokio::test]
async fn a_token_rejected_twice_is_transient_and_not_retried_in_a_loop() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/cgi-bin/gettoken"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"errcode": 0, "access_token": "TOKEN1", "expires_in": 7200})),
        )
        .expect(2)
        .mount(&server)
        .await;
    mount_send(&server, "TOKEN1", json!({"errcode": 42001, "errmsg": "access_token expired"}), 2).await;
    let error = deliver_err(&channel_for(&server), "hi").await;
    assert!(error.is_retryable(), "{error}");
    // Retried later, not at once: each retry would fetch yet another token.
    assert!(matches!(error, ChannelError::Transient { retry_after: Some(_), .. }), "{error:?}");
    assert_no_secrets(&error, "TOKEN1");
}

#[tokio::test]
async fn an_untrusted_ip_is_a_misconfiguration_that_says_what_to_do() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(
        &server,
        "TOKEN1",
        json!({"errcode": 60020, "errmsg": "not allow to access from your ip, from ip: 203.0.113.9"}),
        2,
    )
    .await;
    let channel = channel_for(&server);
    for _ in 0..2 {
        match deliver_err(&channel, "hi").await {
            ChannelError::Misconfigured(message) => {
                assert!(message.contains("企业可信IP") && message.contains("60020"), "{message}");
                assert!(!message.contains(SECRET) && !message.contains("TOKEN1"));
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn a_wrong_agent_id_is_a_misconfiguration_that_names_the_key() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", json!({"errcode": 40056, "errmsg": "invalid agentid"}), 1).await;
    match deliver_err(&channel_for(&server), "hi").await {
        ChannelError::Misconfigured(message) => {
            assert!(message.contains("`agent_id`") && message.contains("40056"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn gettoken_errors_are_triaged_and_nothing_is_sent() {
    let cases = [
        (40001, "misconfigured", "`corp_secret`"),
        (40013, "misconfigured", "`corp_id`"),
        (60020, "misconfigured", "企业可信IP"),
        (-1, "transient", "busy"),
        (45009, "transient", "frequency"),
    ];
    for (code, label, hint) in cases {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/cgi-bin/gettoken"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json!({"errcode": code, "errmsg": format!("bad {SECRET}")})),
            )
            .mount(&server)
            .await;
        let error = deliver_err(&channel_for(&server), "hi").await;
        assert_eq!(error.label(), label, "{code}: {error}");
        assert!(error.to_string().contains(hint), "{code}: {error}");
        assert_no_secrets(&error, "never-issued");
        assert!(requests_to(&server, "/cgi-bin/message/send").await.is_empty());
    }
}

#[tokio::test]
async fn no_valid_recipient_is_refused() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(
        &server,
        "TOKEN1",
        json!({"errcode": 81013, "errmsg": "user & party & tag all invalid", "invaliduser": USER}),
        1,
    )
    .await;
    match deliver_err(&channel_for(&server), "hi").await {
        ChannelError::Refused { code: 81013, reason } => assert!(reason.contains("可见范围"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_invalid_user_listed_in_a_successful_answer_is_refused() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", json!({"errcode": 0, "errmsg": "ok", "invaliduser": USER, "msgid": "m"}), 1).await;
    match deliver_err(&channel_for(&server), "hi").await {
        ChannelError::Refused { code: 81013, reason } => assert!(reason.contains(USER), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_unlicensed_user_listed_in_a_successful_answer_is_refused() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    let answer = json!({"errcode": 0, "errmsg": "ok", "invaliduser": "", "unlicenseduser": USER, "msgid": "m"});
    mount_send(&server, "TOKEN1", answer, 1).await;
    match deliver_err(&channel_for(&server), "hi").await {
        ChannelError::Refused { reason, .. } => {
            assert!(reason.contains(USER) && reason.contains("接口许可"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_frequency_limit_is_transient_with_a_back_off_hint() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    mount_send(&server, "TOKEN1", json!({"errcode": 45009, "errmsg": "api freq out of limit"}), 1).await;
    match deliver_err(&channel_for(&server), "hi").await {
        ChannelError::Transient { retry_after, .. } => assert_eq!(retry_after, Some(Duration::from_secs(60))),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn busy_server_errors_and_garbage_answers_are_transient() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    let answers = [
        ResponseTemplate::new(200).set_body_json(json!({"errcode": -1, "errmsg": "system busy"})),
        ResponseTemplate::new(502).set_body_string("<html>bad gateway</html>"),
        ResponseTemplate::new(200).set_body_string("not json"),
    ];
    mount_send_answers(&server, answers).await;
    let channel = channel_for(&server);
    for _ in 0..3 {
        let error = deliver_err(&channel, "hi").await;
        assert!(matches!(error, ChannelError::Transient { .. }), "{error:?}");
    }
}

/// A send without WeCom's duplicate check (a second message with the same text) that may have
/// reached WeCom, its answer lost, is `MaybeDelivered`: resent in full, it would show once per
/// resend. With the check, WeCom drops the copy of a resend, and such a failure stays transient;
/// a 502 (a proxy that could not reach WeCom) is transient either way.
#[tokio::test]
async fn a_send_without_the_duplicate_check_that_may_have_arrived_is_maybe_delivered() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    let answers = [
        ResponseTemplate::new(200).set_body_json(ok_answer()),
        ResponseTemplate::new(500).set_body_string("<html>internal error</html>"),
        ResponseTemplate::new(200).set_body_string("not json"),
        ResponseTemplate::new(200).set_body_json(json!({"msgid": "m"})),
        ResponseTemplate::new(502).set_body_string("<html>bad gateway</html>"),
        ResponseTemplate::new(500).set_body_string("<html>internal error</html>"),
    ];
    mount_send_answers(&server, answers).await;
    let channel = channel_for(&server);
    let part = |id: &str, text: &str| Delivery { delivery_id: id.into(), ..delivery(text) };
    channel.deliver(&part("e1-0", "抱歉")).await.unwrap_or_else(|e| panic!("{e}"));
    let mut errors = Vec::new();
    for _ in 0..4 {
        errors.push(channel.deliver(&part("e2-0", "抱歉")).await.err());
    }
    // The first send of a text asks for the check.
    errors.push(channel.deliver(&part("e3-0", "别的")).await.err());
    let kinds: Vec<&str> = errors
        .iter()
        .map(|error| match error {
            Some(ChannelError::MaybeDelivered(_)) => "maybe_delivered",
            Some(ChannelError::Transient { .. }) => "transient",
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["maybe_delivered", "maybe_delivered", "maybe_delivered", "transient", "transient"]);
    let checks: Vec<Value> = requests_to(&server, "/cgi-bin/message/send")
        .await
        .iter()
        .map(|request| json_body(request)["enable_duplicate_check"].clone())
        .collect();
    assert_eq!(checks, [json!(1), json!(0), json!(0), json!(0), json!(0), json!(1)]);
}

#[tokio::test]
async fn network_failures_and_timeouts_are_transient() {
    // A privileged port nobody listens on. Not a freshly freed one: a wiremock server started
    // by a parallel test (on port 0) could take it.
    let uri = "http://127.0.0.1:9".to_owned();
    let error = deliver_err(&channel_with(json!({"api_base": uri})), "hi").await;
    assert!(matches!(error, ChannelError::Transient { .. }), "{error:?}");
    assert_no_secrets(&error, "never-issued");

    let server = MockServer::start().await;
    // NOTE: no call-count expectation: on a loaded machine the 100 ms client timeout may expire
    // before the token request even arrives, which is the same transient outcome.
    Mock::given(method("GET"))
        .and(path("/cgi-bin/gettoken"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"errcode": 0, "access_token": "SLOWTOKEN", "expires_in": 7200})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/send"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(500)))
        .mount(&server)
        .await;
    let http = reqwest::Client::builder().timeout(Duration::from_millis(100)).build().unwrap_or_else(|e| panic!("{e}"));
    let settings = yizhan_channel_core::ChannelSettings {
        id: yizhan_channel_core::ChannelId::parse("wecom-main").unwrap_or_else(|e| panic!("{e}")),
        kind: "wecom".into(),
        table: table(json!({"api_base": server.uri()})),
    };
    let channel = Wecom::from_settings(&settings, http).unwrap_or_else(|e| panic!("{e}"));
    let error = deliver_err(&channel, "hi").await;
    assert!(error.is_retryable(), "{error}");
    assert_no_secrets(&error, "SLOWTOKEN");
}

#[tokio::test]
async fn a_long_answer_is_delivered_in_order() {
    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_answer()))
        .mount(&server)
        .await;
    let channel = channel_for(&server);
    let text = (1..=6)
        .map(|n| format!("## 第{n}节\n\n{}", "这一节讲的内容很长。".repeat(60)))
        .collect::<Vec<_>>()
        .join("\n\n");
    let parts = channel.render(&Reply::text(text));
    assert!(parts.len() >= 4, "{}", parts.len());
    for part in &parts {
        channel.deliver(&delivery(&part.text)).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let sent: Vec<String> = requests_to(&server, "/cgi-bin/message/send")
        .await
        .iter()
        .map(|request| json_body(request)["markdown"]["content"].as_str().unwrap_or_default().to_owned())
        .collect();
    let expected: Vec<String> = parts.iter().map(|part| part.text.clone()).collect();
    assert_eq!(sent, expected);
    assert!(sent.iter().all(|part| part.len() <= 2048));
    assert!(sent[0].starts_with("## 第1节"), "{}", sent[0]);
}

#[tokio::test]
async fn an_empty_part_or_a_broadcast_recipient_is_not_sent() {
    let server = MockServer::start().await;
    let channel = channel_for(&server);
    assert!(channel.deliver(&delivery(" \n")).await.is_ok());
    for user in ["@all", "a|b", ""] {
        let error = channel.deliver(&delivery_to(user, "hi")).await.err();
        assert!(matches!(error, Some(ChannelError::Refused { .. })), "{user:?}: {error:?}");
    }
    assert!(server.received_requests().await.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn two_apps_keep_their_own_tokens() {
    let first = MockServer::start().await;
    let second = MockServer::start().await;
    mount_token(&first, "FIRST", 1).await;
    mount_send(&first, "FIRST", ok_answer(), 1).await;
    Mock::given(method("GET"))
        .and(path("/cgi-bin/gettoken"))
        .and(query_param("corpid", "ww_second"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"errcode": 0, "access_token": "SECOND", "expires_in": 7200})),
        )
        .expect(1)
        .mount(&second)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/send"))
        .and(query_param("access_token", "SECOND"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_answer()))
        .expect(1)
        .mount(&second)
        .await;
    let one = channel_for(&first);
    let two = channel_for_with(&second, json!({"corp_id": "ww_second", "agent_id": 7}));
    assert!(one.deliver(&delivery("a")).await.is_ok());
    assert!(two.deliver(&delivery("b")).await.is_ok());
    assert_eq!(json_body(&requests_to(&second, "/cgi-bin/message/send").await[0])["agentid"], json!(7));
}
