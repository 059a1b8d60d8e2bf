//! 公众号 plaintext mode, end to end.

use crate::helpers::*;
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yizhan::channels::ChannelKinds;

#[actix_web::test]
async fn a_text_message_is_acknowledged_and_answered_through_the_customer_service_api() {
    let app = spawn_app(&[], Duration::ZERO).await;
    let (status, body) = app.post_text("oUser1", 1001, "你好").await;
    assert_eq!((status, body.as_str()), (200, "success"));
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["touser"], "oUser1");
    assert_eq!(sent[0]["msgtype"], "text");
    assert_eq!(sent[0]["text"]["content"], "答：你好");
    let token_fetches = app.wechat.received_requests().await.unwrap_or_default();
    let send = token_fetches.iter().find(|r| r.url.path() == "/cgi-bin/message/custom/send");
    assert_eq!(
        send.and_then(|r| r.url.query_pairs().find(|(k, _)| k == "access_token"))
            .map(|(_, v)| v.into_owned())
            .as_deref(),
        Some("TOKEN-1")
    );
}

#[actix_web::test]
async fn the_second_message_carries_the_first_turn_as_context() {
    let app = spawn_app(&[], Duration::ZERO).await;
    app.post_text("oUser1", 1, "我叫小明").await;
    app.wait_until_idle().await;
    app.post_text("oUser1", 2, "我叫什么？").await;
    app.wait_until_idle().await;
    let requests = app.llm_requests().await;
    assert_eq!(requests.len(), 2);
    let body: serde_json::Value = serde_json::from_slice(&requests[1].body).unwrap_or_default();
    let messages: Vec<(String, String)> = body["messages"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|m| (m["role"].as_str().unwrap_or("").to_owned(), m["content"].as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(messages[0].0, "system");
    assert_eq!(
        &messages[1..],
        [
            ("user".to_owned(), "我叫小明".to_owned()),
            ("assistant".to_owned(), "答：我叫小明".to_owned()),
            ("user".to_owned(), "我叫什么？".to_owned()),
        ]
    );
}

#[actix_web::test]
async fn one_msg_id_posted_three_times_is_answered_once() {
    let app = spawn_app(&[], Duration::from_millis(200)).await;
    for _ in 0..3 {
        let (status, body) = app.post_text("oUser1", 4242, "重复的问题").await;
        assert_eq!((status, body.as_str()), (200, "success"));
    }
    app.wait_until_idle().await;
    assert_eq!(app.llm_requests().await.len(), 1);
    assert_eq!(app.sent_messages().await.len(), 1);
    let metrics = app.metrics().await;
    assert!(metrics.contains("yizhan_webhook_requests_total{channel=\"mp\",outcome=\"duplicate\"} 2"), "{metrics}");
}

#[actix_web::test]
async fn a_bad_signature_is_rejected_with_401_and_never_reaches_the_llm() {
    let app = spawn_app(&[], Duration::ZERO).await;
    let url = format!("{}?signature=0000&timestamp={}&nonce=1", app.webhook_url(CHANNEL), now());
    let response = app.http.post(url).body(text_xml("oUser1", 1, "hi")).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 401);
    let stale = format!("{}?{}", app.webhook_url(CHANNEL), signed_query(now() - 3_600));
    let response =
        app.http.post(stale).body(text_xml("oUser1", 2, "hi")).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 401);
    app.wait_until_idle().await;
    assert!(app.llm_requests().await.is_empty());
    assert!(app.sent_messages().await.is_empty());
}

#[actix_web::test]
async fn url_verification_echoes_echostr_only_with_a_valid_signature() {
    let app = spawn_app(&[], Duration::ZERO).await;
    let ts = now().to_string();
    let good = format!(
        "{}?signature={}&timestamp={ts}&nonce=42&echostr=hello123",
        app.webhook_url(CHANNEL),
        signature(WECHAT_TOKEN, &ts, "42")
    );
    let response = app.http.get(good).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.text().await.unwrap_or_default(), "hello123");
    let bad = format!("{}?signature=bad&timestamp={ts}&nonce=42&echostr=hello123", app.webhook_url(CHANNEL));
    assert_eq!(app.http.get(bad).send().await.map(|r| r.status().as_u16()).unwrap_or_default(), 401);
}

#[actix_web::test]
async fn an_llm_failure_still_gets_the_user_an_apology() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(500).set_body_string(r#"{"error":{"message":"boom"}}"#))
        .mount(&llm)
        .await;
    wechat_ok(&wechat).await;
    let config = base_config(&llm, &wechat);
    let app =
        spawn_with(&config, &[("YIZHAN__MESSAGES__APOLOGY", "抱歉，出错了")], ChannelKinds::builtin(), wechat, llm)
            .await;
    app.post_text("oUser1", 7, "你好").await;
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["text"]["content"], "抱歉，出错了");
}

/// After a run of server failures the breaker stops asking the LLM: the next users get the
/// apology at once instead of each waiting for their own failure.
#[actix_web::test]
async fn an_llm_that_keeps_failing_is_not_asked_again_until_the_breaker_cools_down() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(503).set_body_string(r#"{"error":{"message":"down"}}"#))
        .mount(&llm)
        .await;
    wechat_ok(&wechat).await;
    let config = base_config(&llm, &wechat);
    let env = [
        ("YIZHAN__MESSAGES__APOLOGY", "抱歉，出错了"),
        ("YIZHAN__LLM__MAX_RETRIES", "0"),
        ("YIZHAN__LLM__BREAKER_THRESHOLD", "2"),
        ("YIZHAN__LLM__BREAKER_COOLDOWN_SECS", "3600"),
    ];
    let app = spawn_with(&config, &env, ChannelKinds::builtin(), wechat, llm).await;
    for user in 0..4u64 {
        app.post_text(&format!("oDown{user}"), 300 + user, "你好").await;
        app.wait_until_idle().await;
    }
    let sent = app.sent_messages().await;
    assert_eq!(sent.len(), 4);
    assert!(sent.iter().all(|message| message["text"]["content"] == "抱歉，出错了"), "{sent:?}");
    assert_eq!(app.llm_requests().await.len(), 2, "two failures open the breaker");
    let metrics = app.metrics().await;
    assert!(metrics.contains("yizhan_llm_breaker_open 1"), "{metrics}");
    assert!(metrics.contains(r#"yizhan_llm_errors_total{backend="openai",kind="circuit_open"} 2"#), "{metrics}");
}

#[actix_web::test]
async fn a_token_rejected_with_40001_is_refreshed_once_and_the_answer_delivered() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/stable_token"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"access_token":"OLD","expires_in":7200})),
        )
        .up_to_n_times(1)
        .mount(&wechat)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/stable_token"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"access_token":"NEW","expires_in":7200})),
        )
        .mount(&wechat)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .and(wiremock::matchers::query_param("access_token", "OLD"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"errcode":40001,"errmsg":"invalid credential"})),
        )
        .mount(&wechat)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .and(wiremock::matchers::query_param("access_token", "NEW"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"errcode":0,"errmsg":"ok"})))
        .mount(&wechat)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/typing"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"errcode":0})))
        .mount(&wechat)
        .await;
    let config = base_config(&llm, &wechat);
    let app = spawn_with(&config, &[], ChannelKinds::builtin(), wechat, llm).await;
    app.post_text("oUser1", 9, "你好").await;
    app.wait_until_idle().await;
    let requests = app.wechat.received_requests().await.unwrap_or_default();
    let token_fetches = requests.iter().filter(|r| r.url.path() == "/cgi-bin/stable_token").count();
    assert_eq!(token_fetches, 2);
    let sends: Vec<String> = requests
        .iter()
        .filter(|r| r.url.path() == "/cgi-bin/message/custom/send")
        .filter_map(|r| r.url.query_pairs().find(|(k, _)| k == "access_token").map(|(_, v)| v.into_owned()))
        .collect();
    assert_eq!(sends, ["OLD", "NEW"]);
}

/// 公众号 sends carry no idempotency key: a send that may have arrived (here a gateway's 504,
/// as for a timeout) is sent once more at most, not `max_attempts` times, then recorded failed.
#[actix_web::test]
async fn a_send_that_may_have_arrived_goes_out_twice_at_most() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/stable_token"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"access_token":"T","expires_in":7200})),
        )
        .mount(&wechat)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(504).set_body_string("<html>gateway timeout</html>"))
        .mount(&wechat)
        .await;
    let config = base_config(&llm, &wechat);
    let app =
        spawn_with(&config, &[("YIZHAN__DELIVERY__MAX_ATTEMPTS", "6")], ChannelKinds::builtin(), wechat, llm).await;
    app.post_text("oUser1", 77, "你好").await;
    app.wait_until_idle().await;
    let requests = app.wechat.received_requests().await.unwrap_or_default();
    let sends = requests.iter().filter(|r| r.url.path() == "/cgi-bin/message/custom/send").count();
    assert_eq!(sends, 2);
    let metrics = app.metrics().await;
    assert!(metrics.contains(r#"yizhan_deliveries_total{channel="mp",outcome="maybe_delivered"} 1"#), "{metrics}");
}

#[actix_web::test]
async fn reset_clears_the_history_and_confirms() {
    let app = spawn_app(&[], Duration::ZERO).await;
    app.post_text("oUser1", 1, "第一句").await;
    app.wait_until_idle().await;
    app.post_text("oUser1", 2, "/reset").await;
    app.wait_until_idle().await;
    app.post_text("oUser1", 3, "第二句").await;
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    assert_eq!(sent[1]["text"]["content"], "好的，已清空对话记录，我们重新开始吧。");
    let requests = app.llm_requests().await;
    assert_eq!(requests.len(), 2, "the reset itself asks no LLM");
    let body: serde_json::Value = serde_json::from_slice(&requests[1].body).unwrap_or_default();
    let roles: Vec<&str> =
        body["messages"].as_array().map(|m| m.iter().filter_map(|m| m["role"].as_str()).collect()).unwrap_or_default();
    assert_eq!(roles, ["system", "user"]);
}

#[actix_web::test]
async fn a_subscribe_event_gets_the_welcome_and_an_unsubscribe_gets_nothing() {
    let app = spawn_app(&[], Duration::ZERO).await;
    let event = |name: &str| {
        format!(
            "<xml><ToUserName>gh_test</ToUserName><FromUserName>oFan</FromUserName><CreateTime>{}</CreateTime>\
             <MsgType>event</MsgType><Event>{name}</Event></xml>",
            now()
        )
    };
    assert_eq!(app.post_signed(&event("subscribe")).await.0, 200);
    assert_eq!(app.post_signed(&event("unsubscribe")).await.0, 200);
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    assert_eq!(sent.len(), 1);
    assert!(sent[0]["text"]["content"].as_str().unwrap_or_default().contains("AI"));
    assert!(app.llm_requests().await.is_empty());
}

#[actix_web::test]
async fn a_full_llm_queue_gets_the_busy_reply_instead_of_a_hang() {
    // The first question's timeout far off: its apology would be a fourth message.
    let app = spawn_app(
        &[
            ("YIZHAN__LLM__MAX_CONCURRENCY", "1"),
            ("YIZHAN__LLM__MAX_WAITING", "0"),
            ("YIZHAN__LLM__FIRST_TOKEN_TIMEOUT_SECS", "3600"),
            ("YIZHAN__LLM__TOTAL_TIMEOUT_SECS", "3600"),
        ],
        Duration::from_secs(600),
    )
    .await;
    // The only slot is taken (the model does not answer within this test) …
    app.post_text("oBusy0", 100, "问题").await;
    wait_for("the first question asked", || async { app.llm_requests().await.len() == 1 }).await;
    // … so every later question is told at once that the service is busy.
    for user in 1..4 {
        app.post_text(&format!("oBusy{user}"), 100 + user, "问题").await;
    }
    wait_for("three busy replies", || async { app.sent_messages().await.len() >= 3 }).await;
    let sent = app.sent_messages().await;
    assert!(sent.iter().all(|m| m["text"]["content"] == "当前咨询人数较多，请稍后再试。"), "{sent:?}");
    assert_eq!(app.llm_requests().await.len(), 1);
}

#[actix_web::test]
async fn two_hundred_users_at_once_with_a_slow_llm_are_all_answered() {
    let app = spawn_app(&[("YIZHAN__LLM__MAX_CONCURRENCY", "256")], Duration::from_millis(500)).await;
    let posts = (0..200u64).map(|user| {
        let app = &app;
        async move { app.post_text(&format!("oMany{user}"), 10_000 + user, &format!("问题{user}")).await }
    });
    let results = futures_util::future::join_all(posts).await;
    assert!(results.iter().all(|(status, body)| *status == 200 && body == "success"));
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    assert_eq!(sent.len(), 200);
    for user in 0..200 {
        let to = format!("oMany{user}");
        let message = sent.iter().find(|m| m["touser"] == to.as_str());
        assert_eq!(message.map(|m| m["text"]["content"].clone()), Some(serde_json::json!(format!("答：问题{user}"))));
    }
}
