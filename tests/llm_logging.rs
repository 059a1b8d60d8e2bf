//! What the LLM backends log of a server's own words: never the API key, never unbounded. A
//! binary of its own, because log capture is per thread and tracing caches per call site (see
//! `capture_logs`). Stand-in servers on 127.0.0.1 only.

use std::time::Duration;

use secrecy::SecretString;
use serde_json::json;
use wiremock::{Mock, MockServer, ResponseTemplate};
use yizhan::llm::backend::{ChatMessage, CompletionRequest, DeltaSink, LlmBackend, Role};
use yizhan::llm::client::build_http_client;
use yizhan::llm::lobehub::{LobeHubBackend, LobeHubSettings};
use yizhan::llm::openai::{OpenAiBackend, OpenAiSettings};
use yizhan_channel_core::testkit::capture_logs;

const SECRET: &str = "sk-test-never-leak";

fn request() -> CompletionRequest {
    CompletionRequest {
        messages: vec![ChatMessage::new(Role::User, "你好")],
        user: "wx-main:oUser123".into(),
        channel_kind: "wechat_mp".into(),
    }
}

async fn complete(backend: &dyn LlmBackend) -> Option<String> {
    let mut sink: DeltaSink = Box::new(|_: &str| {});
    backend.complete(&request(), Duration::from_secs(5), &mut sink).await.ok()
}

fn streaming(body: String) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.into_bytes(), "text/event-stream")
}

/// A gateway's text that quotes the key, and goes on long after it.
fn quoting_the_key() -> String {
    format!("quota check failed for key {SECRET}; {}", "详情".repeat(5_000))
}

#[tokio::test]
async fn an_error_event_after_the_finish_reason_is_logged_without_the_key() {
    let (captured, _guard) = capture_logs();
    let server = MockServer::start().await;
    let events = [
        json!({"choices":[{"index":0,"delta":{"content":"好"},"finish_reason":null}]}),
        json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}),
        json!({"error":{"message": quoting_the_key()}}),
    ];
    let body: String = events.iter().map(|event| format!("data: {event}\n\n")).collect();
    Mock::given(wiremock::matchers::method("POST")).respond_with(streaming(body)).mount(&server).await;
    let mut settings = OpenAiSettings::new(format!("{}/v1", server.uri()), "m");
    settings.api_key = Some(SecretString::from(SECRET));
    let backend = OpenAiBackend::new(settings, build_http_client(Duration::from_secs(2)));

    assert_eq!(complete(&backend).await.as_deref(), Some("好"));

    let lines = captured.lines();
    let logged = lines.iter().find(|line| line.contains("An error event followed the finish reason"));
    let logged = logged.unwrap_or_else(|| panic!("no warning logged: {lines:#?}"));
    assert!(logged.contains("quota check failed for key <redacted>"), "{logged}");
    assert!(lines.iter().all(|line| !line.contains(SECRET)), "{lines:#?}");
}

#[tokio::test]
async fn an_incomplete_agent_answer_logs_its_reason_cut_short_and_without_the_key() {
    let (captured, _guard) = capture_logs();
    let server = MockServer::start().await;
    let events = [
        json!({"type":"response.output_text.delta","delta":"好"}),
        json!({"type":"response.incomplete","response":{"status":"incomplete",
               "incomplete_details":{"reason": quoting_the_key()}}}),
    ];
    let body: String = events
        .iter()
        .map(|event| format!("event: {}\ndata: {event}\n\n", event["type"].as_str().unwrap_or("message")))
        .collect();
    Mock::given(wiremock::matchers::method("POST")).respond_with(streaming(body)).mount(&server).await;
    let mut settings = LobeHubSettings::new(server.uri());
    settings.api_key = Some(SecretString::from(SECRET));
    settings.agent_id = Some("agt_1".into());
    let backend = LobeHubBackend::new(settings, build_http_client(Duration::from_secs(2)));

    assert_eq!(complete(&backend).await.as_deref(), Some("好"));

    let lines = captured.lines();
    let logged = lines.iter().find(|line| line.contains("LLM answer is incomplete"));
    let logged = logged.unwrap_or_else(|| panic!("no warning logged: {lines:#?}"));
    assert!(logged.contains("quota check failed for key <redacted>"), "{logged}");
    // The reason is cut to an error message's 500 characters, not the server's 10,000.
    assert!(logged.chars().count() < 1_000, "{} characters logged", logged.chars().count());
    assert!(lines.iter().all(|line| !line.contains(SECRET)), "{lines:#?}");
}

#[tokio::test]
async fn an_answer_the_model_cut_short_is_delivered_and_logged() {
    let (captured, _guard) = capture_logs();
    let server = MockServer::start().await;
    let answer = |finish_reason: &str| {
        let events = [
            json!({"choices":[{"index":0,"delta":{"content":"第一步是"},"finish_reason":null}]}),
            json!({"choices":[{"index":0,"delta":{},"finish_reason":finish_reason}]}),
        ];
        events.iter().map(|event| format!("data: {event}\n\n")).collect::<String>() + "data: [DONE]\n\n"
    };
    let settings = OpenAiSettings::new(format!("{}/v1", server.uri()), "m");
    let backend = OpenAiBackend::new(settings, build_http_client(Duration::from_secs(2)));
    let cut = "The model stopped before its answer was done";

    Mock::given(wiremock::matchers::method("POST")).respond_with(streaming(answer("stop"))).mount(&server).await;
    assert_eq!(complete(&backend).await.as_deref(), Some("第一步是"));
    assert!(captured.lines().iter().all(|line| !line.contains(cut)), "{:#?}", captured.lines());

    server.reset().await;
    let reason = "insufficient_system_resource";
    Mock::given(wiremock::matchers::method("POST")).respond_with(streaming(answer(reason))).mount(&server).await;
    assert_eq!(complete(&backend).await.as_deref(), Some("第一步是"));
    let lines = captured.lines();
    assert!(lines.iter().any(|line| line.contains(cut) && line.contains(reason)), "{lines:#?}");
}

/// A stream that ends with neither a closing chunk nor `[DONE]` (a gateway closing after an
/// upstream failure) keeps what it brought, with a warning; one that ends properly, none.
#[tokio::test]
async fn an_openai_stream_cut_off_is_delivered_and_logged() {
    let (captured, _guard) = capture_logs();
    let server = MockServer::start().await;
    let first = json!({"choices":[{"index":0,"delta":{"content":"第一步是"},"finish_reason":null}]});
    let settings = OpenAiSettings::new(format!("{}/v1", server.uri()), "m");
    let backend = OpenAiBackend::new(settings, build_http_client(Duration::from_secs(2)));
    let cut = "The stream ended without its finish";

    let whole = format!("data: {first}\n\ndata: [DONE]\n\n");
    Mock::given(wiremock::matchers::method("POST")).respond_with(streaming(whole)).mount(&server).await;
    assert_eq!(complete(&backend).await.as_deref(), Some("第一步是"));
    assert!(captured.lines().iter().all(|line| !line.contains(cut)), "{:#?}", captured.lines());

    server.reset().await;
    Mock::given(wiremock::matchers::method("POST"))
        .respond_with(streaming(format!("data: {first}\n\n")))
        .mount(&server)
        .await;
    assert_eq!(complete(&backend).await.as_deref(), Some("第一步是"));
    let lines = captured.lines();
    assert!(lines.iter().any(|line| line.contains("WARN") && line.contains(cut)), "{lines:#?}");
}
