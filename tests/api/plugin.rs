//! A plugin channel from `examples/plugin-channel`, registered through the public API.

use crate::helpers::*;
use std::sync::Arc;
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yizhan::channels::ChannelKinds;
use yizhan_plugin_example::HttpJson;

#[actix_web::test]
async fn a_plugin_channel_receives_and_answers_through_the_core() {
    let (llm, callback) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    Mock::given(method("POST")).and(path("/answers")).respond_with(ResponseTemplate::new(200)).mount(&callback).await;
    let config = format!(
        "{}\n[[channels]]\nid = \"intranet\"\nkind = \"http_json\"\ntoken = \"plugin-secret-token\"\ncallback_url = \"{}/answers\"\n",
        base_config(&llm, &callback),
        callback.uri()
    );
    let mut kinds = ChannelKinds::builtin();
    kinds.register(HttpJson::KIND, |settings, http| Ok(Arc::new(HttpJson::from_settings(settings, http.clone())?)));
    let app = spawn_with(&config, &[], kinds, callback, llm).await;

    let unauthorized = app
        .http
        .post(app.webhook_url("intranet"))
        .json(&serde_json::json!({"message_id":"m0","user":"alice","text":"hi"}))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or_default();
    assert_eq!(unauthorized, 401);

    let response = app
        .http
        .post(app.webhook_url("intranet"))
        .bearer_auth("plugin-secret-token")
        .json(&serde_json::json!({"message_id":"m1","user":"alice","text":"插件你好"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 200);
    app.wait_until_idle().await;
    let answers: Vec<serde_json::Value> = app
        .wechat
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.url.path() == "/answers")
        .map(|r| serde_json::from_slice(&r.body).unwrap_or_default())
        .collect();
    assert_eq!(answers, [serde_json::json!({"user":"alice","text":"答：插件你好","in_reply_to":"m1"})]);

    // A plugin that hands over a blank id is refused, not deduplicated into silence.
    for blank in ["", "  "] {
        let refused = app
            .http
            .post(app.webhook_url("intranet"))
            .bearer_auth("plugin-secret-token")
            .json(&serde_json::json!({"message_id": blank, "user":"bob", "text":"没有编号"}))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or_default();
        assert_eq!(refused, 400);
    }
    assert!(app.metrics().await.contains(r#"yizhan_webhook_requests_total{channel="intranet",outcome="malformed"} 2"#));
}
