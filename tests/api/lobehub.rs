//! The `lobehub` backend, end to end.

use crate::helpers::*;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yizhan::channels::ChannelKinds;

#[actix_web::test]
async fn a_lobehub_agent_answers_through_the_responses_api() {
    let (lobe, wechat) = (MockServer::start().await, MockServer::start().await);
    wechat_ok(&wechat).await;
    let events = [
        r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_1","status":"in_progress"}}"#,
        r#"{"type":"response.output_text.delta","sequence_number":1,"output_index":0,"content_index":0,"delta":"你好，"}"#,
        r#"{"type":"response.output_text.delta","sequence_number":2,"output_index":0,"content_index":0,"delta":"我是 Lobe。"}"#,
        r#"{"type":"response.completed","sequence_number":3,"response":{"id":"resp_1","status":"completed","output_text":"你好，我是 Lobe。"}}"#,
    ];
    let body: String = events
        .iter()
        .map(|data| {
            let kind = serde_json::from_str::<serde_json::Value>(data).unwrap_or_default()["type"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            format!("event: {kind}\ndata: {data}\n\n")
        })
        .collect();
    Mock::given(method("POST"))
        .and(path("/api/v1/responses"))
        .and(header("authorization", "Bearer sk-lh-test"))
        .and(body_partial_json(serde_json::json!({"model": "agt_test", "stream": true})))
        .respond_with(
            ResponseTemplate::new(200).insert_header("content-type", "text/event-stream").set_body_string(body),
        )
        .mount(&lobe)
        .await;
    let config = base_config(&lobe, &wechat)
        .replace("backend = \"openai\"", "backend = \"lobehub\"\nagent_id = \"agt_test\"")
        .replace(&format!("base_url = \"{}/v1\"", lobe.uri()), &format!("base_url = \"{}\"", lobe.uri()))
        .replace("api_key = \"sk-test\"", "api_key = \"sk-lh-test\"");
    let app = spawn_with(&config, &[], ChannelKinds::builtin(), wechat, lobe).await;
    app.post_text("oUser1", 1, "你是谁？").await;
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["text"]["content"], "你好，我是 Lobe。");
    let requests = app.llm_requests().await;
    assert_eq!(requests.len(), 1);
    let request: serde_json::Value = serde_json::from_slice(&requests[0].body).unwrap_or_default();
    let input = request["input"].as_array().cloned().unwrap_or_default();
    assert_eq!(input.last().map(|item| item["content"].clone()), Some(serde_json::json!("你是谁？")));
}
