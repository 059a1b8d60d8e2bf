//! The outbound API against a local wiremock server: tenant-token caching and refresh, reply
//! bodies (idempotency uuid, text vs card), error triage, and CardKit streaming. Nothing here
//! reaches the internet.

use serde_json::{json, Value};
use std::time::Duration;
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};
use yizhan_channel_core::{
    Channel, ChannelError, ChannelId, Conversation, ConversationKind, Delivery, Reply, ReplyHandle, Sender,
    StreamHandle,
};
use yizhan_channel_feishu::{Feishu, FeishuSettings};

const SECRET: &str = "the-app-secret";
const MESSAGE_ID: &str = "om_5ce6d572455d361153b7cb51da133945";
const CHAT_ID: &str = "oc_5ce6d572455d361153b7xx51da133945";
const TOKEN_PATH: &str = "/open-apis/auth/v3/tenant_access_token/internal";

fn reply_path() -> String {
    format!("/open-apis/im/v1/messages/{MESSAGE_ID}/reply")
}

fn settings(api_base: String) -> FeishuSettings {
    serde_json::from_value(json!({
        "app_id": "cli_9f5343c580712544",
        "app_secret": SECRET,
        "verification_token": "vt",
        "api_base": format!("{api_base}/"),
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn channel_for(server: &MockServer) -> Feishu {
    let id = ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}"));
    Feishu::new(id, settings(server.uri()), reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"))
}

fn delivery_with(id: &str, text: &str, handle: Value) -> Delivery {
    Delivery {
        delivery_id: id.into(),
        channel: ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}")),
        conversation: Conversation { kind: ConversationKind::Direct, id: CHAT_ID.into() },
        recipient: Sender { id: "ou_user".into(), name: None },
        reply_handle: ReplyHandle(handle),
        reply: Reply::text(text),
    }
}

fn delivery(id: &str, text: &str) -> Delivery {
    let handle = json!({"message_id": MESSAGE_ID, "chat_id": CHAT_ID, "chat_type": "p2p", "event_id": "e1"});
    delivery_with(id, text, handle)
}

fn ok(data: Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"code": 0, "msg": "success", "data": data}))
}

async fn mount_token(server: &MockServer, token: &str, times: u64) {
    token_mock(token).up_to_n_times(times).expect(times).mount(server).await;
}

fn token_mock(token: &str) -> Mock {
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .and(body_json(json!({"app_id": "cli_9f5343c580712544", "app_secret": SECRET})))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"code": 0, "msg": "ok", "tenant_access_token": token, "expire": 7200})),
        )
}

async fn mount_reply(server: &MockServer, token: &str, answer: ResponseTemplate, times: u64) {
    Mock::given(method("POST"))
        .and(path(reply_path()))
        .and(header("authorization", format!("Bearer {token}").as_str()))
        .respond_with(answer)
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

/// The message content, itself a JSON string inside the body.
fn content_of(body: &Value) -> Value {
    serde_json::from_str(body["content"].as_str().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"))
}

fn assert_no_secrets(error: &ChannelError, token: &str) {
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(SECRET), "secret leaked: {shown}");
    assert!(!shown.contains(token), "token leaked: {shown}");
}

#[tokio::test]
async fn the_token_is_fetched_once_for_several_replies() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    mount_reply(&server, "t-TOKEN1", ok(json!({"message_id": "om_sent"})), 3).await;
    let channel = channel_for(&server);

    for (id, text) in [("d1", "第一条"), ("d2", "second"), ("d3", "三")] {
        let receipt = channel.deliver(&delivery(id, text)).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(receipt.platform_message_id.as_deref(), Some("om_sent"));
    }
    let bodies: Vec<Value> = requests_to(&server, &reply_path()).await.iter().map(json_body).collect();
    assert_eq!(
        bodies,
        vec![
            json!({"msg_type": "text", "content": "{\"text\":\"第一条\"}", "uuid": "d1"}),
            json!({"msg_type": "text", "content": "{\"text\":\"second\"}", "uuid": "d2"}),
            json!({"msg_type": "text", "content": "{\"text\":\"三\"}", "uuid": "d3"}),
        ]
    );
}

#[tokio::test]
async fn concurrent_replies_share_one_token_fetch() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    mount_reply(&server, "t-TOKEN1", ok(json!({"message_id": "om_sent"})), 8).await;
    let channel = channel_for(&server);
    let deliveries: Vec<Delivery> = (0..8).map(|i| delivery(&format!("d{i}"), "hi")).collect();
    let results = futures_util::future::join_all(deliveries.iter().map(|d| channel.deliver(d))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

#[tokio::test]
async fn an_invalid_token_is_refreshed_once_and_the_reply_delivered() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    mount_token(&server, "t-TOKEN2", 1).await;
    let rejected = ResponseTemplate::new(400)
        .set_body_json(json!({"code": 99991663, "msg": "Invalid access token for authorization."}));
    mount_reply(&server, "t-TOKEN1", rejected, 1).await;
    mount_reply(&server, "t-TOKEN2", ok(json!({"message_id": "om_sent"})), 2).await;
    let channel = channel_for(&server);

    assert!(channel.deliver(&delivery("d1", "hi")).await.is_ok());
    // The fresh token is cached: the next reply fetches nothing.
    assert!(channel.deliver(&delivery("d2", "again")).await.is_ok());
    assert_eq!(requests_to(&server, TOKEN_PATH).await.len(), 2);
    // The retry carries the same idempotency key, so Feishu cannot show it twice.
    let uuids: Vec<Value> =
        requests_to(&server, &reply_path()).await.iter().map(|r| json_body(r)["uuid"].clone()).collect();
    assert_eq!(uuids, vec![json!("d1"), json!("d1"), json!("d2")]);
}

#[tokio::test]
async fn a_token_rejected_twice_is_transient_and_not_retried_in_a_loop() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"code": 0, "tenant_access_token": "t-TOKEN1", "expire": 7200})),
        )
        .expect(2)
        .mount(&server)
        .await;
    let rejected = ResponseTemplate::new(400).set_body_json(json!({"code": 99991668, "msg": "token invalid"}));
    mount_reply(&server, "t-TOKEN1", rejected, 2).await;
    let error = channel_for(&server).deliver(&delivery("d1", "hi")).await.err();
    let error = error.unwrap_or_else(|| panic!("delivered despite a rejected token"));
    assert!(error.is_retryable(), "{error}");
    assert_no_secrets(&error, "t-TOKEN1");
}

#[tokio::test]
async fn formatted_or_long_answers_go_out_as_a_json_2_markdown_card() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    mount_reply(&server, "t-TOKEN1", ok(json!({"message_id": "om_sent"})), 2).await;
    let channel = channel_for(&server);
    let markdown = "## 结论\n\n- **第一**\n- 第二\n\n```rust\nfn main() {}\n```";
    assert!(channel.deliver(&delivery("d1", markdown)).await.is_ok());
    let long_plain = "很长的回答。".repeat(100);
    assert!(channel.deliver(&delivery("d2", &long_plain)).await.is_ok());

    let bodies: Vec<Value> = requests_to(&server, &reply_path()).await.iter().map(json_body).collect();
    for (body, text) in bodies.iter().zip([markdown, long_plain.as_str()]) {
        assert_eq!(body["msg_type"], "interactive");
        let card = content_of(body);
        // JSON 2.0: the 1.0 markdown element shows headings, quotes and tables as raw text.
        assert_eq!(card["schema"], "2.0");
        assert_eq!(card["body"]["elements"], json!([{"tag": "markdown", "content": text}]));
    }
}

#[tokio::test]
async fn a_long_delivery_id_is_hashed_into_feishus_fifty_character_uuid() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    mount_reply(&server, "t-TOKEN1", ok(json!({"message_id": "om_sent"})), 2).await;
    let channel = channel_for(&server);
    let long_id = format!("{}:{}:part-1", "a".repeat(32), "b".repeat(32));
    assert!(channel.deliver(&delivery(&long_id, "hi")).await.is_ok());
    assert!(channel.deliver(&delivery(&long_id, "hi")).await.is_ok());
    let uuids: Vec<String> = requests_to(&server, &reply_path())
        .await
        .iter()
        .map(|r| json_body(r)["uuid"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(uuids[0].len() <= 50 && !uuids[0].is_empty(), "{uuids:?}");
    assert_eq!(uuids[0], uuids[1], "a retried part must keep its key");
}

/// Expects one post of the text `hi` (delivery `d1`) into the chat, answered `om_new`.
async fn mount_chat_create_of_hi(server: &MockServer) {
    Mock::given(method("POST"))
        .and(path("/open-apis/im/v1/messages"))
        .and(query_param("receive_id_type", "chat_id"))
        .and(body_json(
            json!({"receive_id": CHAT_ID, "msg_type": "text", "content": "{\"text\":\"hi\"}", "uuid": "d1"}),
        ))
        .respond_with(ok(json!({"message_id": "om_new"})))
        .expect(1)
        .mount(server)
        .await;
}

#[tokio::test]
async fn without_a_message_id_the_answer_is_posted_into_the_chat() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    mount_chat_create_of_hi(&server).await;
    let receipt = channel_for(&server).deliver(&delivery_with("d1", "hi", json!({"chat_id": CHAT_ID}))).await;
    assert_eq!(receipt.ok().and_then(|r| r.platform_message_id).as_deref(), Some("om_new"));
}

/// The user recalled the question while it was being answered: the reply is refused, and the
/// answer goes into the chat instead of being lost.
#[tokio::test]
async fn an_answer_to_a_recalled_message_goes_into_the_chat() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    let recalled = ResponseTemplate::new(400).set_body_json(json!({"code": 230011, "msg": "message recalled"}));
    mount_reply(&server, "t-TOKEN1", recalled, 1).await;
    mount_chat_create_of_hi(&server).await;
    let receipt = channel_for(&server).deliver(&delivery("d1", "hi")).await;
    assert_eq!(receipt.ok().and_then(|r| r.platform_message_id).as_deref(), Some("om_new"));
}

/// In a group the asker took the question back from everyone: the answer is not posted there
/// (refused, so the core records it as failed with the reason).
#[tokio::test]
async fn an_answer_to_a_message_recalled_in_a_group_is_not_posted_into_the_group() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    let recalled = ResponseTemplate::new(400).set_body_json(json!({"code": 230011, "msg": "message recalled"}));
    mount_reply(&server, "t-TOKEN1", recalled, 1).await;
    Mock::given(method("POST"))
        .and(path("/open-apis/im/v1/messages"))
        .respond_with(ok(json!({})))
        .expect(0)
        .mount(&server)
        .await;
    let handle = json!({"message_id": MESSAGE_ID, "chat_id": CHAT_ID, "chat_type": "group", "event_id": "e1"});
    let mut in_group = delivery_with("d1", "hi", handle);
    in_group.conversation.kind = ConversationKind::Group;
    match channel_for(&server).deliver(&in_group).await {
        Err(ChannelError::Refused { code: 230011, reason }) => assert!(reason.contains("recalled"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn content_too_large_is_refused_with_a_clear_reason() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    let too_large = ResponseTemplate::new(400)
        .set_body_json(json!({"code": 230025, "msg": "The length of the message content reaches its limit."}));
    mount_reply(&server, "t-TOKEN1", too_large, 1).await;
    match channel_for(&server).deliver(&delivery("d1", "hi")).await {
        Err(ChannelError::Refused { code: 230025, reason }) => assert!(reason.contains("max_part_bytes"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn rate_limits_are_transient_with_feishus_advised_delay() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    Mock::given(method("POST"))
        .and(path(reply_path()))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("x-ogw-ratelimit-reset", "2")
                .set_body_json(json!({"code": 99991400, "msg": "request trigger frequency limit"})),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(reply_path()))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"code": 230020, "msg": "rate limited"})))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(reply_path()))
        .respond_with(ResponseTemplate::new(503).set_body_string("<html>unavailable</html>"))
        .mount(&server)
        .await;
    let channel = channel_for(&server);
    match channel.deliver(&delivery("d1", "hi")).await {
        Err(ChannelError::Transient { retry_after, .. }) => assert_eq!(retry_after, Some(Duration::from_secs(2))),
        other => panic!("{other:?}"),
    }
    // A chat's own limit: retried, without holding back the app's other chats.
    match channel.deliver(&delivery("d1", "hi")).await {
        Err(ChannelError::Transient { retry_after, .. }) => assert_eq!(retry_after, None),
        other => panic!("{other:?}"),
    }
    let error = channel.deliver(&delivery("d1", "hi")).await.err();
    assert!(matches!(error, Some(ChannelError::Transient { .. })), "{error:?}");
}

/// A bare HTTP error without Feishu's `code` comes from something in between (a proxy, a wrong
/// address): a timeout is worth a retry, a 404 needs an operator.
#[tokio::test]
async fn bare_http_errors_are_read_like_the_other_platforms() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    for (status, times) in [(408, 1), (404, 1)] {
        Mock::given(method("POST"))
            .and(path(reply_path()))
            .respond_with(ResponseTemplate::new(status).set_body_string("<html>proxy</html>"))
            .up_to_n_times(times)
            .mount(&server)
            .await;
    }
    let channel = channel_for(&server);
    let timed_out = channel.deliver(&delivery("d1", "hi")).await.err();
    assert!(matches!(timed_out, Some(ChannelError::Transient { .. })), "{timed_out:?}");
    let not_found = channel.deliver(&delivery("d1", "hi")).await.err();
    assert!(matches!(not_found, Some(ChannelError::Misconfigured(_))), "{not_found:?}");
}

#[tokio::test]
async fn a_wrong_app_secret_is_a_misconfiguration_and_nothing_is_sent() {
    for code in [10014, 10003] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .respond_with(
                ResponseTemplate::new(400)
                    .set_body_json(json!({"code": code, "msg": format!("app secret invalid {SECRET}")})),
            )
            .mount(&server)
            .await;
        let error = channel_for(&server).deliver(&delivery("d1", "hi")).await.err();
        let error = error.unwrap_or_else(|| panic!("{code} delivered"));
        assert_eq!(error.label(), "misconfigured", "{code}: {error}");
        assert_no_secrets(&error, "never-issued");
        assert!(requests_to(&server, &reply_path()).await.is_empty());
    }
}

#[tokio::test]
async fn a_missing_scope_is_a_misconfiguration_that_says_what_to_do() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    let denied = ResponseTemplate::new(400).set_body_json(
        json!({"code": 99991672, "msg": "Access denied. One of the following scopes is required: [im:message]"}),
    );
    mount_reply(&server, "t-TOKEN1", denied, 1).await;
    match channel_for(&server).deliver(&delivery("d1", "hi")).await {
        Err(ChannelError::Misconfigured(message)) => {
            assert!(message.contains("权限管理") && message.contains("99991672"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn network_failures_and_timeouts_are_transient() {
    // A privileged port nobody listens on. Not a freshly freed one: a wiremock server started
    // by a parallel test (on port 0) could take it.
    let uri = "http://127.0.0.1:9".to_owned();
    let id = ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}"));
    let channel = Feishu::new(id.clone(), settings(uri), reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"));
    let error = channel.deliver(&delivery("d1", "hi")).await.err();
    assert!(matches!(error, Some(ChannelError::Transient { .. })), "{error:?}");

    let server = MockServer::start().await;
    // A 100 ms client timeout may expire before the token request even arrives on a loaded
    // machine: the same transient outcome, so the token call is not counted.
    token_mock("t-SLOW").mount(&server).await;
    Mock::given(method("POST"))
        .and(path(reply_path()))
        .respond_with(ok(json!({})).set_delay(Duration::from_millis(500)))
        .mount(&server)
        .await;
    let http = reqwest::Client::builder().timeout(Duration::from_millis(100)).build().unwrap_or_else(|e| panic!("{e}"));
    let channel = Feishu::new(id, settings(server.uri()), http).unwrap_or_else(|e| panic!("{e}"));
    let error = channel.deliver(&delivery("d1", "hi")).await.err();
    let error = error.unwrap_or_else(|| panic!("delivered despite a timeout"));
    assert!(error.is_retryable(), "{error}");
    assert_no_secrets(&error, "t-SLOW");
}

#[tokio::test]
async fn an_empty_part_is_not_sent() {
    let server = MockServer::start().await;
    assert!(channel_for(&server).deliver(&delivery("d1", " \n")).await.is_ok());
    assert!(server.received_requests().await.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn a_forged_reply_handle_cannot_steer_the_call_elsewhere() {
    let server = MockServer::start().await;
    let forged = delivery_with("d1", "hi", json!({"message_id": "../../auth/v3/x"}));
    assert!(matches!(channel_for(&server).deliver(&forged).await, Err(ChannelError::Malformed(_))));
    let empty = delivery_with("d1", "hi", json!({}));
    assert!(matches!(channel_for(&server).deliver(&empty).await, Err(ChannelError::Malformed(_))));
    assert!(server.received_requests().await.unwrap_or_default().is_empty());
}

// --- Streaming --------------------------------------------------------------------------------

async fn mount_streaming(server: &MockServer) {
    Mock::given(method("POST"))
        .and(path("/open-apis/cardkit/v1/cards"))
        .respond_with(ok(json!({"card_id": "7355372766134157313"})))
        .expect(1)
        .mount(server)
        .await;
    mount_reply(server, "t-TOKEN1", ok(json!({"message_id": "om_card"})), 1).await;
    Mock::given(method("PUT"))
        .and(path("/open-apis/cardkit/v1/cards/7355372766134157313/elements/answer/content"))
        .and(header("authorization", "Bearer t-TOKEN1"))
        .respond_with(ok(json!({})))
        .mount(server)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/open-apis/cardkit/v1/cards/7355372766134157313/settings"))
        .and(header("authorization", "Bearer t-TOKEN1"))
        .respond_with(ok(json!({})))
        .expect(1)
        .mount(server)
        .await;
}

#[tokio::test]
async fn an_answer_streams_through_a_cardkit_card_in_order() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    mount_streaming(&server).await;
    let channel = channel_for(&server);
    assert!(channel.capabilities().streaming);

    let target = delivery("d-stream", "");
    let handle = channel.begin_stream(&target).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        handle,
        StreamHandle(json!({
            "card_id": "7355372766134157313", "element_id": "answer", "message_id": "om_card", "chat_id": CHAT_ID,
        }))
    );
    let full = "驿站是**古代**传递文书的地方。";
    for (sequence, text) in [(1, "驿站"), (2, "驿站是**古代**"), (3, "")] {
        channel.update_stream(&handle, text, sequence).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let receipt = channel.finish_stream(&handle, full, 4).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(receipt.platform_message_id.as_deref(), Some("om_card"));

    // 1. The card entity: JSON 2.0 in streaming mode, one markdown element named `answer`.
    let created = json_body(&requests_to(&server, "/open-apis/cardkit/v1/cards").await[0]);
    assert_eq!(created["type"], "card_json");
    let card: Value = serde_json::from_str(created["data"].as_str().unwrap_or_default()).unwrap_or_default();
    assert_eq!(card["schema"], "2.0");
    assert_eq!(card["config"]["streaming_mode"], true);
    assert_eq!(card["config"]["update_multi"], true);
    assert_eq!(card["body"]["elements"][0]["element_id"], "answer");
    assert_eq!(card["body"]["elements"][0]["tag"], "markdown");

    // 2. The reply that shows it, with its own idempotency key.
    let reply = json_body(&requests_to(&server, &reply_path()).await[0]);
    assert_eq!(reply["msg_type"], "interactive");
    assert_eq!(content_of(&reply), json!({"type": "card", "data": {"card_id": "7355372766134157313"}}));
    let uuid = reply["uuid"].as_str().unwrap_or_default();
    assert!(!uuid.is_empty() && uuid.len() <= 50 && uuid != "d-stream", "{uuid}");

    // 3. Content updates with increasing sequences (the blank one skipped), the last = full text.
    let puts: Vec<Value> =
        requests_to(&server, "/open-apis/cardkit/v1/cards/7355372766134157313/elements/answer/content")
            .await
            .iter()
            .map(json_body)
            .collect();
    let sequences: Vec<i64> = puts.iter().map(|p| p["sequence"].as_i64().unwrap_or(-1)).collect();
    assert_eq!(sequences, vec![1, 2, 4]);
    let texts: Vec<&str> = puts.iter().map(|p| p["content"].as_str().unwrap_or_default()).collect();
    assert_eq!(texts, vec!["驿站", "驿站是**古代**", full]);
    assert!(puts.iter().all(|p| p["uuid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 50)));

    // 4. Streaming mode off, after the final text.
    let patch = json_body(&requests_to(&server, "/open-apis/cardkit/v1/cards/7355372766134157313/settings").await[0]);
    assert_eq!(patch["sequence"], 5);
    let settings: Value = serde_json::from_str(patch["settings"].as_str().unwrap_or_default()).unwrap_or_default();
    assert_eq!(settings, json!({"config": {"streaming_mode": false}}));
    let order: Vec<String> = server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| format!("{} {}", r.method, r.url.path()))
        .filter(|line| !line.contains("tenant_access_token"))
        .collect();
    assert!(order.first().is_some_and(|l| l == "POST /open-apis/cardkit/v1/cards"), "{order:#?}");
    assert!(order.last().is_some_and(|l| l.starts_with("PATCH")), "{order:#?}");
}

/// An update the card's size cut short is written, then refused onwards (the core then stops
/// updating): every longer text would write the same, spending the rate limits for nothing.
#[tokio::test]
async fn an_update_that_fills_the_card_asks_for_no_more() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    Mock::given(method("PUT"))
        .and(path("/open-apis/cardkit/v1/cards/7355372766134157313/elements/answer/content"))
        .respond_with(ok(json!({})))
        .expect(2)
        .mount(&server)
        .await;
    let channel = channel_for(&server);
    let handle = StreamHandle(json!({
        "card_id": "7355372766134157313", "element_id": "answer", "message_id": "om_card", "chat_id": CHAT_ID,
    }));
    channel.update_stream(&handle, "驿站", 1).await.unwrap_or_else(|e| panic!("{e}"));
    // Quotes and line breaks take twice their bytes once escaped: 29,000 bytes do not fit.
    let over = "\"\n".repeat(14_500);
    let full = channel.update_stream(&handle, &over, 2).await;
    assert!(matches!(full, Err(ChannelError::Unsupported(_))), "{full:?}");
    let written = requests_to(&server, "/open-apis/cardkit/v1/cards/7355372766134157313/elements/answer/content").await;
    assert_eq!(written.len(), 2, "the full card is written once");
}

/// Content updates need streaming mode, which Feishu closes after a while (and an earlier run's
/// finish closed for a card resumed after a restart): a refused final write replaces the card
/// whole with the answer, as a final card, instead of leaving it cut off above a second copy.
#[tokio::test]
async fn a_card_whose_streaming_mode_closed_is_replaced_whole_with_the_answer() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    Mock::given(method("PUT"))
        .and(path("/open-apis/cardkit/v1/cards/7355372766134157313/elements/answer/content"))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({"code": 300309, "msg": "streaming mode is closed"})),
        )
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/open-apis/cardkit/v1/cards/7355372766134157313"))
        .respond_with(ok(json!({})))
        .expect(1)
        .mount(&server)
        .await;
    let channel = channel_for(&server);
    let handle = StreamHandle(json!({
        "card_id": "7355372766134157313", "element_id": "answer", "message_id": "om_card", "chat_id": CHAT_ID,
    }));
    let full = "驿站是**古代**传递文书的地方。";
    let receipt = channel.finish_stream(&handle, full, 9).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(receipt.platform_message_id.as_deref(), Some("om_card"));
    let replaced = json_body(&requests_to(&server, "/open-apis/cardkit/v1/cards/7355372766134157313").await[0]);
    assert_eq!((replaced["sequence"].as_i64(), replaced["card"]["type"].as_str()), (Some(10), Some("card_json")));
    let card: Value = serde_json::from_str(replaced["card"]["data"].as_str().unwrap_or_default()).unwrap_or_default();
    assert_eq!(card["config"]["streaming_mode"], false);
    assert_eq!(card["body"]["elements"][0]["content"], full);
    // A final card: no streaming mode left to end.
    assert!(requests_to(&server, "/open-apis/cardkit/v1/cards/7355372766134157313/settings").await.is_empty());
}

/// If the card cannot be replaced either (deleted, say), the finish fails as the write did: the
/// core then sends the answer as messages.
#[tokio::test]
async fn a_refused_finish_whose_card_cannot_be_replaced_fails() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    for card_path in [
        "/open-apis/cardkit/v1/cards/7355372766134157313/elements/answer/content",
        "/open-apis/cardkit/v1/cards/7355372766134157313",
    ] {
        Mock::given(method("PUT"))
            .and(path(card_path))
            .respond_with(ResponseTemplate::new(400).set_body_json(json!({"code": 300309, "msg": "closed"})))
            .mount(&server)
            .await;
    }
    let handle = StreamHandle(json!({"card_id": "7355372766134157313", "element_id": "answer"}));
    let finished = channel_for(&server).finish_stream(&handle, "完整", 3).await;
    assert!(matches!(finished, Err(ChannelError::Refused { code: 300309, .. })), "{finished:?}");
}

/// The whole answer so far is streamed; past what a card request can carry the update shows its
/// start instead of being refused (which froze the card mid-answer).
#[tokio::test]
async fn a_streamed_answer_longer_than_a_card_holds_shows_its_start() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    mount_streaming(&server).await;
    let channel = channel_for(&server);
    let handle = channel.begin_stream(&delivery("d-long", "")).await.unwrap_or_else(|e| panic!("{e}"));
    let long = "长\"文\n".repeat(20_000);
    // Mentions are defused (lengthened) before sending, and must be counted as sent.
    let mentions = "<at id=x>".repeat(5_000);
    for (sequence, text) in [(1, &long), (2, &mentions)] {
        // Written, and no more asked for (see `an_update_that_fills_the_card_asks_for_no_more`).
        let written = channel.update_stream(&handle, text, sequence).await;
        assert!(matches!(written, Err(ChannelError::Unsupported(_))), "{written:?}");
    }
    let puts = requests_to(&server, "/open-apis/cardkit/v1/cards/7355372766134157313/elements/answer/content").await;
    let shown = json_body(&puts[0])["content"].as_str().unwrap_or_default().to_owned();
    assert!(!shown.is_empty() && long.starts_with(&shown), "{} bytes", shown.len());
    for put in &puts {
        assert!(put.body.len() <= 30_000, "{} bytes", put.body.len());
    }
    channel.finish_stream(&handle, &shown, 3).await.unwrap_or_else(|e| panic!("{e}"));
}

/// A few answers streamed at once would pass Feishu's per-app CardKit limit and freeze their
/// cards: intermediate updates beyond four fifths of `cardkit_per_minute` are skipped, and the
/// finish still finds room.
#[tokio::test]
async fn streaming_updates_stay_within_the_apps_cardkit_budget() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    mount_streaming(&server).await;
    let mut settings = settings(server.uri());
    settings.cardkit_per_minute = 20;
    settings.chat_qps = 1_000;
    let id = ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}"));
    let channel = Feishu::new(id, settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"));
    let handle = channel.begin_stream(&delivery("d-budget", "")).await.unwrap_or_else(|e| panic!("{e}"));
    let content = "/open-apis/cardkit/v1/cards/7355372766134157313/elements/answer/content";
    let mut skipped = 0;
    for sequence in 1..=20 {
        let text = "字".repeat(usize::try_from(sequence).unwrap_or(1));
        match channel.update_stream(&handle, &text, sequence).await {
            Ok(()) => {}
            // Not `Ok`: the core must not take the card as showing it; it tries again later.
            Err(ChannelError::Transient { retry_after: Some(_), .. }) => skipped += 1,
            Err(error) => panic!("{error}"),
        }
    }
    // 20 a minute, four fifths of it for the card's creation and updates: 15 updates sent.
    assert_eq!((requests_to(&server, content).await.len(), skipped), (15, 5));
    // The creation and the updates took 16 slots: the finish's two fit in the rest.
    channel.finish_stream(&handle, "完整", 21).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(requests_to(&server, content).await.len(), 16);
}

#[tokio::test]
async fn streaming_off_in_settings_refuses_to_stream() {
    let server = MockServer::start().await;
    let mut settings = settings(server.uri());
    settings.streaming = false;
    let id = ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}"));
    let channel = Feishu::new(id, settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!channel.capabilities().streaming);
    let error = channel.begin_stream(&delivery("d1", "")).await.err();
    assert!(matches!(error, Some(ChannelError::Unsupported(_))), "{error:?}");
    assert!(server.received_requests().await.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn a_failed_card_creation_is_triaged_like_a_send() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    Mock::given(method("POST"))
        .and(path("/open-apis/cardkit/v1/cards"))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"code": 99991672, "msg": "scope cardkit:card:write required"})),
        )
        .mount(&server)
        .await;
    let channel = channel_for(&server);
    let error = channel.begin_stream(&delivery("d1", "")).await.err();
    assert!(matches!(error, Some(ChannelError::Misconfigured(_))), "{error:?}");
    assert!(requests_to(&server, &reply_path()).await.is_empty());
    // Answers are sent whole for a while rather than failing a card each time.
    assert!(!channel.capabilities().streaming);
}

#[tokio::test]
async fn a_refused_card_message_does_not_pause_streaming() {
    let server = MockServer::start().await;
    mount_token(&server, "t-TOKEN1", 1).await;
    Mock::given(method("POST"))
        .and(path("/open-apis/cardkit/v1/cards"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"code": 0, "msg": "ok", "data": {"card_id": "c1"}})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(reply_path()))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({"code": 99991672, "msg": "scope im:message required"})),
        )
        .mount(&server)
        .await;
    let channel = channel_for(&server);
    let error = channel.begin_stream(&delivery("d1", "")).await.err();
    assert!(matches!(error, Some(ChannelError::Misconfigured(_))), "{error:?}");
    assert!(channel.capabilities().streaming, "the card was fine; the send scope is another matter");
}
