//! 飞书 bot, end to end: events in, replies and streamed cards out.

use crate::helpers::*;
use std::time::Duration;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};
use yizhan::channels::ChannelKinds;

async fn feishu_api(server: &MockServer) {
    Mock::given(method("POST"))
        .and(path("/open-apis/auth/v3/tenant_access_token/internal"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"code":0,"msg":"ok","tenant_access_token":"t-1","expire":7200})),
        )
        .mount(server)
        .await;
    Mock::given(method("POST"))
        .and(path("/open-apis/cardkit/v1/cards"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"code":0,"msg":"ok","data":{"card_id":"card_1"}})),
        )
        .mount(server)
        .await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/open-apis/im/v1/messages/[^/]+/reply$"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"code":0,"msg":"ok","data":{"message_id":"om_answer"}})),
        )
        .mount(server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/open-apis/cardkit/v1/cards/card_1/elements/answer/content"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"code":0,"msg":"ok"})))
        .mount(server)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/open-apis/cardkit/v1/cards/card_1/settings"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"code":0,"msg":"ok"})))
        .mount(server)
        .await;
}

async fn spawn_feishu(streaming: bool, llm_delay: Duration) -> TestApp {
    spawn_feishu_with(streaming, llm_delay, &[]).await
}

/// [`spawn_feishu`] with environment overrides.
async fn spawn_feishu_with(streaming: bool, llm_delay: Duration, env: &[(&str, &str)]) -> TestApp {
    let llm = MockServer::start().await;
    echo_llm(&llm, llm_delay).await;
    spawn_feishu_for(llm, streaming, env).await
}

/// A Feishu channel asking `llm`, with environment overrides.
async fn spawn_feishu_for(llm: MockServer, streaming: bool, env: &[(&str, &str)]) -> TestApp {
    let feishu = MockServer::start().await;
    feishu_api(&feishu).await;
    let config = format!(
        "{}\n[[channels]]\nid = \"fs\"\nkind = \"feishu\"\napp_id = \"cli_test\"\napp_secret = \"secret\"\n\
         verification_token = \"vtoken\"\nbot_open_id = \"ou_bot\"\nstreaming = {streaming}\napi_base = \"{}\"\n",
        base_config(&llm, &feishu),
        feishu.uri()
    );
    spawn_with(&config, env, ChannelKinds::builtin(), feishu, llm).await
}

fn event(message_id: &str, chat_type: &str, text: &str, mentions: serde_json::Value) -> serde_json::Value {
    // A fresh event id each time, as Feishu's redeliveries have (the dedupe key is the message id).
    serde_json::json!({
        "schema": "2.0",
        "header": {"event_id": format!("ev-{message_id}-{}", yizhan_channel_core::Envelope::new_id()), "event_type": "im.message.receive_v1",
                   "create_time": "1608725989000", "token": "vtoken", "app_id": "cli_test", "tenant_key": "t"},
        "event": {
            "sender": {"sender_id": {"open_id": "ou_alice", "user_id": "alice", "union_id": "on_a"}, "sender_type": "user"},
            "message": {"message_id": message_id, "create_time": "1609073151345", "chat_id": "oc_chat",
                        "chat_type": chat_type, "message_type": "text",
                        "content": serde_json::json!({"text": text}).to_string(), "mentions": mentions}
        }
    })
}

impl TestApp {
    async fn post_feishu(&self, body: &serde_json::Value) -> (u16, String) {
        let response = self.http.post(self.webhook_url("fs")).json(body).send().await.unwrap_or_else(|e| panic!("{e}"));
        (response.status().as_u16(), response.text().await.unwrap_or_default())
    }

    async fn feishu_calls(&self, method_name: &str, suffix: &str) -> Vec<Request> {
        self.wechat
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.method.as_str() == method_name && r.url.path().ends_with(suffix))
            .collect()
    }
}

fn body(request: &Request) -> serde_json::Value {
    serde_json::from_slice(&request.body).unwrap_or_default()
}

#[actix_web::test]
async fn the_url_challenge_is_answered_and_a_wrong_token_is_401() {
    let app = spawn_feishu(false, Duration::ZERO).await;
    let challenge = serde_json::json!({"challenge": "ajls384kdjx98XX", "token": "vtoken", "type": "url_verification"});
    let (status, text) = app.post_feishu(&challenge).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap_or_default()["challenge"], "ajls384kdjx98XX");
    let wrong = serde_json::json!({"challenge": "x", "token": "nope", "type": "url_verification"});
    assert_eq!(app.post_feishu(&wrong).await.0, 401);
}

const ENCRYPT_KEY: &str = "the encrypt key";

/// Feishu's encryption of a callback (`{"encrypt": …}`): AES-256-CBC under SHA-256 of the
/// Encrypt Key, the IV first.
fn encrypted(event: &serde_json::Value) -> Vec<u8> {
    use aes::cipher::{BlockEncryptMut, KeyIvInit};
    use base64::Engine as _;
    use sha2::Digest as _;
    let key = sha2::Sha256::digest(ENCRYPT_KEY.as_bytes());
    let iv = [7u8; 16];
    let ciphertext = cbc::Encryptor::<aes::Aes256>::new_from_slices(&key, &iv)
        .unwrap_or_else(|e| panic!("{e}"))
        .encrypt_padded_vec_mut::<aes::cipher::block_padding::Pkcs7>(event.to_string().as_bytes());
    let encrypt = base64::engine::general_purpose::STANDARD.encode([iv.as_slice(), &ciphertext].concat());
    serde_json::json!({ "encrypt": encrypt }).to_string().into_bytes()
}

impl TestApp {
    /// Posts `body` as Feishu does with an Encrypt Key: signed over the exact bytes sent.
    async fn post_feishu_signed(&self, body: Vec<u8>, signed_body: &[u8]) -> u16 {
        let (timestamp, nonce) = (now().to_string(), "a-nonce");
        let signature = yizhan_channel_feishu::crypto::signature(&timestamp, nonce, ENCRYPT_KEY, signed_body);
        let request = self
            .http
            .post(self.webhook_url("fs"))
            .header("Content-Type", "application/json")
            .header("X-Lark-Request-Timestamp", timestamp)
            .header("X-Lark-Request-Nonce", nonce)
            .header("X-Lark-Signature", signature)
            .body(body);
        request.send().await.unwrap_or_else(|e| panic!("{e}")).status().as_u16()
    }
}

/// With an Encrypt Key, events come encrypted and signed over the raw body: one so is answered,
/// and one unsigned, or signed over other bytes, is refused over HTTP without asking the model.
#[actix_web::test]
async fn with_an_encrypt_key_signed_encrypted_events_are_answered_and_unsigned_ones_refused() {
    let app = spawn_feishu_with(false, Duration::ZERO, &[("YIZHAN__CHANNELS__FS__ENCRYPT_KEY", ENCRYPT_KEY)]).await;
    let unsigned = encrypted(&event("om_unsigned", "p2p", "没签名", serde_json::json!([])));
    let response = app.http.post(app.webhook_url("fs")).body(unsigned).send().await;
    assert_eq!(response.unwrap_or_else(|e| panic!("{e}")).status().as_u16(), 401);
    let tampered = encrypted(&event("om_tampered", "p2p", "改过", serde_json::json!([])));
    let other = encrypted(&event("om_other", "p2p", "别的", serde_json::json!([])));
    assert_eq!(app.post_feishu_signed(tampered, &other).await, 401);

    let signed = encrypted(&event("om_signed", "p2p", "加密的", serde_json::json!([])));
    assert_eq!(app.post_feishu_signed(signed.clone(), &signed).await, 200);
    app.wait_until_idle().await;
    let replies = app.feishu_calls("POST", "/reply").await;
    assert_eq!(replies.len(), 1, "only the signed event is answered");
    assert!(replies[0].url.path().ends_with("/om_signed/reply"));
    let content = body(&replies[0])["content"].as_str().map(str::to_owned).unwrap_or_default();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&content).unwrap_or_default()["text"], "答：加密的");
    assert_eq!(app.llm_requests().await.len(), 1);
}

#[actix_web::test]
async fn a_redelivered_event_is_answered_once_with_a_text_reply() {
    let app = spawn_feishu(false, Duration::ZERO).await;
    let message = event("om_p2p_1", "p2p", "你好", serde_json::json!([]));
    assert_eq!(app.post_feishu(&message).await.0, 200);
    // Feishu redelivers under a new event id.
    let again = event("om_p2p_1", "p2p", "你好", serde_json::json!([]));
    assert_eq!(app.post_feishu(&again).await.0, 200);
    app.wait_until_idle().await;
    let replies = app.feishu_calls("POST", "/om_p2p_1/reply").await;
    assert_eq!(replies.len(), 1);
    let reply = body(&replies[0]);
    assert_eq!(reply["msg_type"], "text");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(reply["content"].as_str().unwrap_or("{}")).unwrap_or_default()
            ["text"],
        "答：你好"
    );
    assert!(reply["uuid"].as_str().is_some_and(|uuid| !uuid.is_empty() && uuid.len() <= 50));
}

#[actix_web::test]
async fn a_sticker_gets_the_text_only_reply_without_asking_the_model() {
    let app = spawn_feishu(false, Duration::ZERO).await;
    let mut sticker = event("om_sticker_1", "p2p", "", serde_json::json!([]));
    sticker["event"]["message"]["message_type"] = "sticker".into();
    sticker["event"]["message"]["content"] = serde_json::json!({"file_key": "v2_sticker"}).to_string().into();
    assert_eq!(app.post_feishu(&sticker).await.0, 200);
    app.wait_until_idle().await;
    let replies = app.feishu_calls("POST", "/om_sticker_1/reply").await;
    assert_eq!(replies.len(), 1);
    let content = body(&replies[0])["content"].as_str().unwrap_or_default().to_owned();
    assert!(content.contains("只能理解文字消息"), "{content}");
    assert!(app.llm_requests().await.is_empty());
}

#[actix_web::test]
async fn in_groups_only_mentions_of_the_bot_are_answered_without_the_placeholder() {
    let app = spawn_feishu(false, Duration::ZERO).await;
    let plain = event("om_g_1", "group", "大家好", serde_json::json!([]));
    assert_eq!(app.post_feishu(&plain).await.0, 200);
    let mentions = serde_json::json!([{"key": "@_user_1", "id": {"open_id": "ou_bot", "user_id": "", "union_id": "on_bot"}, "name": "驿站"}]);
    let asked = event("om_g_2", "group", "@_user_1 今天天气如何", mentions);
    assert_eq!(app.post_feishu(&asked).await.0, 200);
    app.wait_until_idle().await;
    assert!(app.feishu_calls("POST", "/om_g_1/reply").await.is_empty());
    assert_eq!(app.feishu_calls("POST", "/om_g_2/reply").await.len(), 1);
    let requests = app.llm_requests().await;
    assert_eq!(requests.len(), 1);
    assert_eq!(last_user_message(&requests[0]), "今天天气如何");
}

#[actix_web::test]
async fn a_streamed_answer_updates_the_card_in_order_and_ends_with_the_whole_answer() {
    let app = spawn_feishu(true, Duration::from_millis(50)).await;
    let question = "请详细介绍一下驿站这个项目的设计";
    assert_eq!(app.post_feishu(&event("om_s_1", "p2p", question, serde_json::json!([]))).await.0, 200);
    app.wait_until_idle().await;
    assert_eq!(app.feishu_calls("POST", "/cardkit/v1/cards").await.len(), 1);
    let reply = app.feishu_calls("POST", "/om_s_1/reply").await;
    assert_eq!(reply.len(), 1);
    assert_eq!(body(&reply[0])["msg_type"], "interactive");
    let updates = app.feishu_calls("PUT", "/elements/answer/content").await;
    assert!(!updates.is_empty());
    let sequences: Vec<u64> = updates.iter().filter_map(|r| body(r)["sequence"].as_u64()).collect();
    assert_eq!(sequences.len(), updates.len(), "every update carries its sequence");
    assert!(sequences.windows(2).all(|pair| pair[0] < pair[1]), "{sequences:?}");
    let last = updates.last().map(body).unwrap_or_default();
    assert_eq!(last["content"], format!("答：{question}"));
    let settings = app.feishu_calls("PATCH", "/cards/card_1/settings").await;
    assert_eq!(settings.len(), 1);
    assert!(body(&settings[0])["sequence"].as_u64() > sequences.last().copied());
    let metrics = app.metrics().await;
    assert!(metrics.contains("yizhan_answers_total{channel=\"fs\",path=\"streamed\"} 1"), "{metrics}");
    assert!(!metrics.contains("path=\"push\""), "{metrics}");
}

/// A model that fails after part of its answer streamed into the card: the card keeps that
/// part, with the apology below it, instead of the apology replacing what the user was reading.
#[actix_web::test]
async fn a_streamed_answer_cut_short_keeps_its_text_with_the_apology_below() {
    let llm = MockServer::start().await;
    let chunk = serde_json::json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"半截回答"},"finish_reason":null}]});
    let failure = serde_json::json!({"error":{"message":"upstream overloaded","type":"server_error"}});
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "text/event-stream")
                .set_body_string(format!("data: {chunk}\n\ndata: {failure}\n\n")),
        )
        .mount(&llm)
        .await;
    let app = spawn_feishu_for(llm, true, &[]).await;
    assert_eq!(app.post_feishu(&event("om_cut_1", "p2p", "讲个故事", serde_json::json!([]))).await.0, 200);
    app.wait_until_idle().await;
    let updates = app.feishu_calls("PUT", "/elements/answer/content").await;
    let last = updates.last().map(body).unwrap_or_default();
    assert_eq!(last["content"], "半截回答\n\n抱歉，AI 助手暂时无法回答，请稍后再试。", "{updates:?}");
    assert_eq!(app.llm_requests().await.len(), 1, "not asked again once text was shown");
}

/// The card already shows the whole answer when only ending its streaming mode fails: the
/// answer must not be sent again as a message.
#[actix_web::test]
async fn a_streamed_answer_whose_streaming_mode_cannot_be_ended_is_not_sent_twice() {
    let app = spawn_feishu(true, Duration::from_millis(50)).await;
    Mock::given(method("PATCH"))
        .and(path("/open-apis/cardkit/v1/cards/card_1/settings"))
        .respond_with(ResponseTemplate::new(503))
        .with_priority(1)
        .mount(&app.wechat)
        .await;
    assert_eq!(app.post_feishu(&event("om_s_10", "p2p", "别重复", serde_json::json!([]))).await.0, 200);
    app.wait_until_idle().await;
    assert_eq!(app.feishu_calls("PATCH", "/cards/card_1/settings").await.len(), 3, "tried three times");
    let replies = app.feishu_calls("POST", "/om_s_10/reply").await;
    assert_eq!(replies.len(), 1, "only the card; the answer is not sent a second time");
    let updates = app.feishu_calls("PUT", "/elements/answer/content").await;
    assert_eq!(updates.last().map(body).unwrap_or_default()["content"], "答：别重复");
}

#[actix_web::test]
async fn a_streamed_answer_whose_finish_failed_once_is_finished_again_not_sent_twice() {
    let app = spawn_feishu(true, Duration::from_millis(50)).await;
    Mock::given(method("PATCH"))
        .and(path("/open-apis/cardkit/v1/cards/card_1/settings"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.wechat)
        .await;
    assert_eq!(app.post_feishu(&event("om_s_9", "p2p", "再说一遍", serde_json::json!([]))).await.0, 200);
    app.wait_until_idle().await;
    let settings = app.feishu_calls("PATCH", "/cards/card_1/settings").await;
    assert_eq!(settings.len(), 2, "finished again after the failure");
    let sequences: Vec<u64> = settings.iter().filter_map(|r| body(r)["sequence"].as_u64()).collect();
    assert!(sequences[0] < sequences[1], "{sequences:?}");
    let replies = app.feishu_calls("POST", "/om_s_9/reply").await;
    assert_eq!(replies.len(), 1, "only the card; the answer is not sent a second time");
    let updates = app.feishu_calls("PUT", "/elements/answer/content").await;
    assert_eq!(updates.last().map(body).unwrap_or_default()["content"], "答：再说一遍");
}

/// When the card refuses the final text, and replacing it whole is refused too, the answer goes
/// out as a message, and the card says so (in the background, not holding the answer back)
/// instead of staying cut off and streaming above it.
#[actix_web::test]
async fn a_card_that_refuses_the_final_text_points_to_the_answer_sent_as_a_message() {
    let app = spawn_feishu(true, Duration::from_millis(50)).await;
    for card_path in
        ["/open-apis/cardkit/v1/cards/card_1/elements/answer/content", "/open-apis/cardkit/v1/cards/card_1"]
    {
        Mock::given(method("PUT"))
            .and(path(card_path))
            .and(wiremock::matchers::body_string_contains("答：写不进去"))
            .respond_with(
                ResponseTemplate::new(400).set_body_json(serde_json::json!({"code": 230099, "msg": "refused"})),
            )
            .with_priority(1)
            .mount(&app.wechat)
            .await;
    }
    assert_eq!(app.post_feishu(&event("om_s_11", "p2p", "写不进去", serde_json::json!([]))).await.0, 200);
    app.wait_until_idle().await;
    let replies = app.feishu_calls("POST", "/om_s_11/reply").await;
    assert_eq!(replies.len(), 2, "the card, then the answer as a message");
    assert!(body(&replies[1])["content"].as_str().is_some_and(|content| content.contains("答：写不进去")));
    assert_eq!(app.feishu_calls("PUT", "/cards/card_1").await.len(), 1, "a whole replacement tried once");
    wait_for("the note in the card, and its streaming ended", || async {
        let updates = app.feishu_calls("PUT", "/elements/answer/content").await;
        updates.last().map(body).unwrap_or_default()["content"] == "（完整回答见下方消息）"
            && !app.feishu_calls("PATCH", "/cards/card_1/settings").await.is_empty()
    })
    .await;
}

/// Nothing is ever parked on Feishu (no passive replies, no send quota): 「继续」 is a request
/// to the model like any other, not a lookup of parked text.
#[actix_web::test]
async fn the_continue_word_reaches_the_model_where_nothing_is_ever_parked() {
    let app = spawn_feishu(false, Duration::ZERO).await;
    assert_eq!(app.post_feishu(&event("om_go_on", "p2p", "继续", serde_json::json!([]))).await.0, 200);
    app.wait_until_idle().await;
    let asked: Vec<String> = app.llm_requests().await.iter().map(last_user_message).collect();
    assert_eq!(asked, ["继续"]);
}

/// A streamed answer longer than `max_part_bytes` ends as a card holding the first part, and the
/// rest follows as messages: the card is bound by the same limits as a message.
#[actix_web::test]
async fn a_streamed_answer_longer_than_a_part_keeps_the_card_to_one_part() {
    let app = spawn_feishu_with(true, Duration::ZERO, &[("YIZHAN__CHANNELS__FS__MAX_PART_BYTES", "200")]).await;
    let question = "长问题。".repeat(50);
    assert_eq!(app.post_feishu(&event("om_long", "p2p", &question, serde_json::json!([]))).await.0, 200);
    app.wait_until_idle().await;
    let updates = app.feishu_calls("PUT", "/elements/answer/content").await;
    let card = updates.last().map(body).unwrap_or_default()["content"].as_str().unwrap_or_default().to_owned();
    assert!(!card.is_empty() && card.len() <= 200, "{} bytes: {card}", card.len());
    let replies = app.feishu_calls("POST", "/om_long/reply").await;
    assert!(replies.len() >= 4, "the card and the rest as messages: {}", replies.len());
    let texts: String = replies[1..]
        .iter()
        .map(|reply| {
            let content: serde_json::Value =
                serde_json::from_str(body(reply)["content"].as_str().unwrap_or_default()).unwrap_or_default();
            content["text"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    let shown: String = format!("{card}{texts}").chars().filter(|c| !c.is_whitespace()).collect();
    assert_eq!(shown, format!("答：{question}"));
}

/// The card counts against `send_quota_per_message` as the message it is: a quota of 2 leaves
/// one message below it, which says that more follows on the continue word.
#[actix_web::test]
async fn a_streamed_card_counts_against_the_send_quota() {
    let env = [("YIZHAN__CHANNELS__FS__MAX_PART_BYTES", "200"), ("YIZHAN__CHANNELS__FS__SEND_QUOTA_PER_MESSAGE", "2")];
    let app = spawn_feishu_with(true, Duration::ZERO, &env).await;
    let question = "长问题。".repeat(50);
    assert_eq!(app.post_feishu(&event("om_quota", "p2p", &question, serde_json::json!([]))).await.0, 200);
    app.wait_until_idle().await;
    let replies = app.feishu_calls("POST", "/om_quota/reply").await;
    assert_eq!(replies.len(), 2, "the card and one message");
    let last = body(&replies[1]);
    let content: serde_json::Value =
        serde_json::from_str(last["content"].as_str().unwrap_or_default()).unwrap_or_default();
    assert!(content["text"].as_str().is_some_and(|text| text.contains("继续")), "{content}");
}

/// An app without the CardKit scope: the first refusal turns streaming off, so later answers
/// cost no failed call (and no warning) each.
#[actix_web::test]
async fn a_refused_streaming_card_turns_streaming_off_for_later_answers() {
    let app = spawn_feishu(true, Duration::ZERO).await;
    Mock::given(method("POST"))
        .and(path("/open-apis/cardkit/v1/cards"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"code":99991672,"msg":"Access denied"})),
        )
        .with_priority(1)
        .mount(&app.wechat)
        .await;
    for id in ["om_scope_1", "om_scope_2"] {
        assert_eq!(app.post_feishu(&event(id, "p2p", "你好", serde_json::json!([]))).await.0, 200);
        app.wait_until_idle().await;
        assert_eq!(app.feishu_calls("POST", &format!("/{id}/reply")).await.len(), 1, "answered whole");
    }
    assert_eq!(app.feishu_calls("POST", "/open-apis/cardkit/v1/cards").await.len(), 1);
}

/// A card whose send failed once is sent again (same uuid) and streamed, not dropped for a
/// whole-answer message beside a card that may have reached the chat.
#[actix_web::test]
async fn a_streaming_card_whose_send_failed_once_is_sent_again() {
    let app = spawn_feishu(true, Duration::ZERO).await;
    Mock::given(method("POST"))
        .and(path("/open-apis/im/v1/messages/om_card_retry/reply"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.wechat)
        .await;
    assert_eq!(app.post_feishu(&event("om_card_retry", "p2p", "重试", serde_json::json!([]))).await.0, 200);
    app.wait_until_idle().await;
    let replies = app.feishu_calls("POST", "/om_card_retry/reply").await;
    assert_eq!(replies.len(), 2, "the card, twice");
    assert!(replies.iter().all(|reply| body(reply)["msg_type"] == "interactive"));
    assert_eq!(body(&replies[0])["uuid"], body(&replies[1])["uuid"]);
    let updates = app.feishu_calls("PUT", "/elements/answer/content").await;
    assert_eq!(updates.last().map(body).unwrap_or_default()["content"], "答：重试");
}

/// A card whose send failed every time (a timeout may still have reached the chat) is taken out
/// of streaming mode before the answer goes whole: no "…" card left streaming above it.
#[actix_web::test]
async fn a_streaming_card_whose_send_failed_for_good_is_ended_and_the_answer_sent_whole() {
    let app = spawn_feishu(true, Duration::ZERO).await;
    Mock::given(method("POST"))
        .and(path("/open-apis/im/v1/messages/om_card_lost/reply"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(3)
        .with_priority(1)
        .mount(&app.wechat)
        .await;
    assert_eq!(app.post_feishu(&event("om_card_lost", "p2p", "丢了", serde_json::json!([]))).await.0, 200);
    app.wait_until_idle().await;
    let replies = app.feishu_calls("POST", "/om_card_lost/reply").await;
    assert_eq!(replies.len(), 4, "the card three times, then the answer");
    assert_ne!(body(&replies[3])["msg_type"], "interactive");
    assert_eq!(app.feishu_calls("PATCH", "/settings").await.len(), 1, "the card's streaming ended");
}

/// The app on the SQLite store at `db` (as a stopped run left it), streaming on Feishu, with
/// the instant stand-in LLM; the stand-in Feishu also takes updates to `card_old`.
async fn spawn_feishu_on(db: &std::path::Path) -> TestApp {
    spawn_feishu_on_with(db, true, Duration::ZERO).await
}

/// [`spawn_feishu_on`] with streaming on or off, and the LLM answering after `llm_delay`.
async fn spawn_feishu_on_with(db: &std::path::Path, streaming: bool, llm_delay: Duration) -> TestApp {
    spawn_feishu_old_card(db, streaming, llm_delay, true).await
}

/// [`spawn_feishu_on_with`], the card `card_old` in streaming mode or not: out of it, Feishu
/// refuses content writes and settings (as after its time limit, or an earlier finish), and
/// takes a whole replacement.
async fn spawn_feishu_old_card(db: &std::path::Path, streaming: bool, llm_delay: Duration, open: bool) -> TestApp {
    let (llm, feishu) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, llm_delay).await;
    feishu_api(&feishu).await;
    let answer = if open {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({"code":0,"msg":"ok"}))
    } else {
        ResponseTemplate::new(400).set_body_json(serde_json::json!({"code":300309,"msg":"streaming mode is closed"}))
    };
    for (verb, suffix) in [("PUT", "/elements/answer/content"), ("PATCH", "/settings")] {
        Mock::given(method(verb))
            .and(path(format!("/open-apis/cardkit/v1/cards/card_old{suffix}")))
            .respond_with(answer.clone())
            .mount(&feishu)
            .await;
    }
    Mock::given(method("PUT"))
        .and(path("/open-apis/cardkit/v1/cards/card_old"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"code":0,"msg":"ok"})))
        .mount(&feishu)
        .await;
    let config = format!(
        "{}\n[[channels]]\nid = \"fs\"\nkind = \"feishu\"\napp_id = \"cli_test\"\napp_secret = \"secret\"\n\
         verification_token = \"vtoken\"\nbot_open_id = \"ou_bot\"\nstreaming = {streaming}\napi_base = \"{}\"\n",
        on_sqlite(base_config(&llm, &feishu), db),
        feishu.uri()
    );
    spawn_with(&config, &[], ChannelKinds::builtin(), feishu, llm).await
}

/// What a run stopped mid-stream leaves in the store at `db`: Feishu message `message_id`
/// asking `text` accepted, its answer being streamed into the card `card_old`, and, with
/// `answered`, the answer recorded (one part, not yet written into the card).
async fn left_streaming(db: &std::path::Path, message_id: &str, text: &str, answered: Option<&str>) {
    use yizhan::store::{LiveStream, Store};
    use yizhan_channel_core::{ChannelId, Conversation, ConversationKind, Delivery, Envelope, Reply, ReplyHandle};
    let store = open_store(db);
    let envelope = Envelope {
        id: Envelope::new_id(),
        channel: ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}")),
        channel_kind: "feishu".into(),
        platform_message_id: message_id.into(),
        received_at_ms: yizhan_channel_common::unix_millis(std::time::SystemTime::now()),
        conversation: Conversation { kind: ConversationKind::Direct, id: "oc_chat".into() },
        sender: yizhan_channel_core::Sender { id: "ou_alice".into(), name: None },
        content: vec![yizhan_channel_core::Segment::Text { text: text.into() }],
        mentions_self: true,
        reply_handle: ReplyHandle(
            serde_json::json!({"message_id": message_id, "chat_id": "oc_chat", "chat_type": "p2p"}),
        ),
    };
    let accepted = store.accept(&envelope, Duration::from_secs(60)).await;
    assert!(matches!(accepted, Ok(yizhan::store::Acceptance::New)), "{accepted:?}");
    let card = serde_json::json!({"card_id": "card_old", "element_id": "answer", "message_id": "om_card", "chat_id": "oc_chat"});
    let recorded = store.record_stream(&envelope.id, &LiveStream { handle: card, sequence_base: 0 }).await;
    assert!(recorded.is_ok(), "{recorded:?}");
    if let Some(answer) = answered {
        let part = Delivery {
            delivery_id: yizhan::delivery::part_id(&envelope.id, 0),
            channel: envelope.channel.clone(),
            conversation: envelope.conversation.clone(),
            recipient: envelope.sender.clone(),
            reply_handle: envelope.reply_handle.clone(),
            reply: Reply::text(answer),
        };
        let recorded = store.record_answer(&envelope.id, "fs:d:oc_chat", None, &[part]).await;
        assert!(recorded.is_ok(), "{recorded:?}");
    }
}

/// Sequences of the requests to `card_old` ending in `suffix`, and the last one's body.
async fn old_card_calls(app: &TestApp, verb: &str, suffix: &str) -> (Vec<u64>, serde_json::Value) {
    let calls = app.feishu_calls(verb, &format!("/cards/card_old/{suffix}")).await;
    (calls.iter().filter_map(|r| body(r)["sequence"].as_u64()).collect(), calls.last().map(body).unwrap_or_default())
}

/// A stop in the middle of a streamed answer: after the restart the question is asked again
/// and its answer goes into the card the last run left cut off, numbered past anything that run
/// may have used, instead of into a second card below it.
#[actix_web::test]
async fn a_card_left_streaming_by_a_stop_gets_the_answer_asked_again() {
    let dir = std::env::temp_dir().join(format!("yizhan-feishu-resume-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    left_streaming(&db, "om_r_1", "接着说", None).await;
    let app = spawn_feishu_on(&db).await;
    app.wait_until_idle().await;
    let _ = std::fs::remove_dir_all(&dir);
    let asked: Vec<String> = app.llm_requests().await.iter().map(last_user_message).collect();
    assert_eq!(asked, ["接着说"]);
    assert!(app.feishu_calls("POST", "/cardkit/v1/cards").await.is_empty(), "no second card");
    assert!(app.feishu_calls("POST", "/om_r_1/reply").await.is_empty(), "no message besides the card");
    let (updates, last) = old_card_calls(&app, "PUT", "elements/answer/content").await;
    assert_eq!(last["content"], "答：接着说");
    assert!(updates.first().is_some_and(|first| *first > 1 << 22), "{updates:?}");
    assert!(updates.windows(2).all(|pair| pair[0] < pair[1]), "{updates:?}");
    let (ended, _) = old_card_calls(&app, "PATCH", "settings").await;
    assert!(ended.len() == 1 && updates.last() < ended.first(), "{ended:?} after {updates:?}");
}

/// A stop after the answer was recorded but before the card held it: after the restart the
/// recorded answer is written into that card (the model is not asked again, nothing is sent
/// as a message).
#[actix_web::test]
async fn a_card_left_streaming_after_its_answer_was_recorded_gets_that_answer() {
    let dir = std::env::temp_dir().join(format!("yizhan-feishu-resend-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    left_streaming(&db, "om_r_2", "问过了", Some("上次的完整回答")).await;
    let app = spawn_feishu_on(&db).await;
    app.wait_until_idle().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(app.llm_requests().await.is_empty(), "answered before the stop: not asked again");
    assert!(app.feishu_calls("POST", "/cardkit/v1/cards").await.is_empty(), "no second card");
    assert!(app.feishu_calls("POST", "/om_r_2/reply").await.is_empty(), "not sent again as a message");
    let (updates, last) = old_card_calls(&app, "PUT", "elements/answer/content").await;
    assert_eq!(last["content"], "上次的完整回答");
    assert!(updates.iter().all(|sequence| *sequence > 1 << 22), "{updates:?}");
    assert_eq!(old_card_calls(&app, "PATCH", "settings").await.0.len(), 1, "streaming ended");
    let metrics = app.metrics().await;
    assert!(metrics.contains("yizhan_answers_total{channel=\"fs\",path=\"streamed\"} 1"), "{metrics}");
}

/// The same, when the card is out of streaming mode (an earlier run's finish wrote the answer
/// and ended it, then the run stopped before finishing the message; or Feishu's time limit
/// passed): the card is replaced whole with the answer, which is not sent again as a message.
#[actix_web::test]
async fn a_card_out_of_streaming_mode_is_replaced_whole_instead_of_a_second_copy_below() {
    for (message_id, answered) in [("om_r_8", Some("上次的完整回答")), ("om_r_9", None)] {
        let dir =
            std::env::temp_dir().join(format!("yizhan-feishu-closed-{}-{}-{message_id}", std::process::id(), now()));
        let db = dir.join("yizhan.db");
        left_streaming(&db, message_id, "接着说", answered).await;
        let app = spawn_feishu_old_card(&db, true, Duration::ZERO, false).await;
        app.wait_until_idle().await;
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            app.feishu_calls("POST", &format!("/{message_id}/reply")).await.is_empty(),
            "{message_id}: a copy below"
        );
        let replaced = app.feishu_calls("PUT", "/cardkit/v1/cards/card_old").await;
        let replaced: Vec<_> = replaced.iter().filter(|r| r.url.path().ends_with("/card_old")).collect();
        assert_eq!(replaced.len(), 1, "{message_id}");
        let card: serde_json::Value =
            serde_json::from_str(body(replaced[0])["card"]["data"].as_str().unwrap_or_default()).unwrap_or_default();
        let expected = answered.unwrap_or("答：接着说");
        assert_eq!(card["body"]["elements"][0]["content"], expected, "{message_id}");
        assert_eq!(card["config"]["streaming_mode"], false);
    }
}

/// A card taken up again is recorded with its new numbering before it is used: were this run
/// to stop too, the next would number past it (Feishu refuses a sequence not above the last).
#[actix_web::test]
async fn a_card_taken_up_again_is_recorded_with_its_new_numbering_before_use() {
    let dir = std::env::temp_dir().join(format!("yizhan-feishu-renumber-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    left_streaming(&db, "om_r_3", "慢慢说", None).await;
    // The model takes longer than the test: the answer is still being written when it looks.
    let app = spawn_feishu_on_with(&db, true, Duration::from_secs(30)).await;
    wait_for("the model to be asked", || async { !app.llm_requests().await.is_empty() }).await;
    let recorded: String = {
        let conn = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap_or_else(|e| panic!("{e}"));
        conn.query_row("SELECT stream FROM live_stream", [], |row| row.get(0)).unwrap_or_else(|e| panic!("{e}"))
    };
    let _ = std::fs::remove_dir_all(&dir);
    let recorded: serde_json::Value = serde_json::from_str(&recorded).unwrap_or_default();
    assert_eq!(recorded["sequence_base"], 1 << 22, "{recorded}");
    assert_eq!(recorded["handle"]["card_id"], "card_old", "{recorded}");
    assert!(app.feishu_calls("POST", "/cardkit/v1/cards").await.is_empty(), "no second card");
}

/// With streaming turned off since the stop, the answer asked again goes as a message, and the
/// card the last run left cut off says so instead of staying as it was.
#[actix_web::test]
async fn a_card_left_streaming_says_the_answer_follows_when_streaming_is_off_now() {
    let dir = std::env::temp_dir().join(format!("yizhan-feishu-no-stream-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    left_streaming(&db, "om_r_4", "换个方式", None).await;
    let app = spawn_feishu_on_with(&db, false, Duration::ZERO).await;
    app.wait_until_idle().await;
    wait_for("the note in the old card", || async {
        !app.feishu_calls("PATCH", "/cards/card_old/settings").await.is_empty()
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let replies = app.feishu_calls("POST", "/om_r_4/reply").await;
    assert_eq!(replies.len(), 1, "the answer, as a message");
    assert!(body(&replies[0])["content"].as_str().is_some_and(|content| content.contains("答：换个方式")));
    let (_, note) = old_card_calls(&app, "PUT", "elements/answer/content").await;
    assert_eq!(note["content"], "（完整回答见下方消息）");
    assert!(app.feishu_calls("POST", "/cardkit/v1/cards").await.is_empty(), "no second card");
}
