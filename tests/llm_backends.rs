//! The LLM backends against local wiremock servers (127.0.0.1 only; nothing reaches the internet).

#[path = "support/raw_http.rs"]
mod raw_http;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use secrecy::SecretString;
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};
use yizhan::llm::backend::{ChatMessage, CompletionRequest, DeltaSink, LlmBackend, LlmError, Role};
use yizhan::llm::client::{build_http_client, LlmClient, LlmClientSettings};
use yizhan::llm::lobehub::{LobeHubBackend, LobeHubSettings};
use yizhan::llm::openai::{OpenAiBackend, OpenAiSettings};

const SECRET: &str = "sk-test-never-leak";
const TIMEOUT: Duration = Duration::from_secs(5);

fn request() -> CompletionRequest {
    CompletionRequest {
        messages: vec![
            ChatMessage::new(Role::System, "You are terse."),
            ChatMessage::new(Role::User, "早"),
            ChatMessage::new(Role::Assistant, "早！"),
            ChatMessage::new(Role::User, "你好"),
        ],
        user: "wx-main:oUser123".into(),
        channel_kind: "wechat_mp".into(),
    }
}

/// A sink that records every piece of text it receives (an empty piece only says the model is
/// at work: see `recorder_with_progress`).
fn recorder() -> (DeltaSink, Arc<Mutex<Vec<String>>>) {
    let (sink, seen, _) = recorder_with_progress();
    (sink, seen)
}

/// What a recorder saw: the pieces of text, and how many empty pieces came.
type Seen = Arc<Mutex<Vec<String>>>;

/// [`recorder`], with a count of the empty pieces (reasoning, held text) as well.
fn recorder_with_progress() -> (DeltaSink, Seen, Arc<Mutex<usize>>) {
    let (seen, progress) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(0)));
    let (sink_seen, sink_progress) = (Arc::clone(&seen), Arc::clone(&progress));
    let sink: DeltaSink = Box::new(move |piece: &str| {
        if piece.is_empty() {
            *sink_progress.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        } else {
            sink_seen.lock().unwrap_or_else(PoisonError::into_inner).push(piece.to_owned());
        }
    });
    (sink, seen, progress)
}

fn pieces(seen: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    seen.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// An SSE body with one `data:` event per item.
fn sse(events: &[&str]) -> String {
    events.iter().map(|event| format!("data: {event}\n\n")).collect()
}

fn chunk(content: &str) -> String {
    json!({"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",
           "choices":[{"index":0,"delta":{"content":content},"finish_reason":null}]})
    .to_string()
}

fn streaming(body: impl Into<String>) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.into().into_bytes(), "text/event-stream")
}

fn openai_settings(server: &MockServer) -> OpenAiSettings {
    let mut settings = OpenAiSettings::new(format!("{}/v1/", server.uri()), "qwen3:8b");
    settings.api_key = Some(SecretString::from(SECRET));
    settings
}

fn openai(settings: OpenAiSettings) -> OpenAiBackend {
    OpenAiBackend::new(settings, build_http_client(Duration::from_secs(2)))
}

async fn complete(backend: &dyn LlmBackend) -> (Result<String, LlmError>, Vec<String>) {
    let (mut sink, seen) = recorder();
    let result = backend.complete(&request(), TIMEOUT, &mut sink).await;
    (result, pieces(&seen))
}

async fn only_request_body(server: &MockServer) -> (Request, Value) {
    let requests = server.received_requests().await.unwrap_or_default();
    assert_eq!(requests.len(), 1, "exactly one request expected");
    let request = requests.into_iter().next().expect("one request");
    let body: Value = serde_json::from_slice(&request.body).expect("JSON request body");
    (request, body)
}

// ---------------------------------------------------------------------------------------------
// OpenAI-compatible backend
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn openai_streams_the_answer_and_sends_the_expected_request() {
    let server = MockServer::start().await;
    let body = sse(&[
        &json!({"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}).to_string(),
        &chunk("你"),
        &chunk("好"),
        &json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}).to_string(),
        "[DONE]",
    ]);
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", format!("Bearer {SECRET}").as_str()))
        .and(header("accept", "text/event-stream"))
        .respond_with(streaming(body))
        .expect(1)
        .mount(&server)
        .await;

    let (result, seen) = complete(&openai(openai_settings(&server))).await;

    assert_eq!(result.ok().as_deref(), Some("你好"));
    assert_eq!(seen, vec!["你", "好"]);
    let (_, body) = only_request_body(&server).await;
    assert_eq!(
        body,
        json!({
            "model": "qwen3:8b",
            "messages": [
                {"role":"system","content":"You are terse."},
                {"role":"user","content":"早"},
                {"role":"assistant","content":"早！"},
                {"role":"user","content":"你好"}
            ],
            "stream": true
        })
    );
}

#[tokio::test]
async fn openai_sends_optional_fields_only_when_enabled_and_no_authorization_without_a_key() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(streaming(sse(&[&chunk("ok"), "[DONE]"]))).mount(&server).await;
    let mut settings = openai_settings(&server);
    settings.api_key = None;
    settings.include_usage = true;
    settings.send_user = true;
    settings.temperature = Some(0.5);
    settings.max_tokens = Some(256);

    let (result, _) = complete(&openai(settings)).await;

    assert_eq!(result.ok().as_deref(), Some("ok"));
    let (request, body) = only_request_body(&server).await;
    assert!(request.headers.get("authorization").is_none());
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    assert_eq!(body["user"], json!("wx-main:oUser123"));
    assert_eq!(body["temperature"], json!(0.5));
    assert_eq!(body["max_tokens"], json!(256));
}

#[tokio::test]
async fn openai_tolerates_keep_alives_empty_choices_odd_finish_reasons_and_usage_chunks() {
    let server = MockServer::start().await;
    let body = format!(
        ": keep-alive\r\n\r\n{}{}{}{}{}{}{}",
        sse(&[&json!({"choices":[{"index":0,"delta":{"content":null},"finish_reason":""}]}).to_string()])
            .replace('\n', "\r\n"),
        ": ping\n\n",
        sse(&[&json!({"choices":[{"index":0,"delta":{},"finish_reason":null}]}).to_string()]),
        sse(&[&json!({"choices":[{"index":0,"delta":{"content":"Hel"}}],"usage":{}}).to_string()]),
        sse(&[&json!({"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"eos_token"}]}).to_string()]),
        sse(&[&json!({"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}).to_string()]),
        sse(&["[DONE]"]),
    );
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;

    let (result, seen) = complete(&openai(openai_settings(&server))).await;

    assert_eq!(result.ok().as_deref(), Some("Hello"));
    assert_eq!(seen, vec!["Hel", "lo"]);
}

#[tokio::test]
async fn openai_accepts_a_stream_that_ends_without_done_and_ignores_anything_after_done() {
    let server = MockServer::start().await;
    // No [DONE] and no trailing blank line.
    let without_done = format!("data: {}\n\ndata: {}", chunk("a"), chunk("b"));
    Mock::given(method("POST"))
        .and(path("/one/chat/completions"))
        .respond_with(streaming(without_done))
        .mount(&server)
        .await;
    let after_done = sse(&[&chunk("x"), "[DONE]", &chunk("ignored")]);
    Mock::given(method("POST"))
        .and(path("/two/chat/completions"))
        .respond_with(streaming(after_done))
        .mount(&server)
        .await;

    let one = OpenAiSettings { base_url: format!("{}/one", server.uri()), ..openai_settings(&server) };
    let two = OpenAiSettings { base_url: format!("{}/two", server.uri()), ..openai_settings(&server) };
    assert_eq!(complete(&openai(one)).await.0.ok().as_deref(), Some("ab"));
    assert_eq!(complete(&openai(two)).await.0.ok().as_deref(), Some("x"));
}

#[tokio::test]
async fn openai_never_forwards_reasoning_fields() {
    let server = MockServer::start().await;
    let body = sse(&[
        &json!({"choices":[{"index":0,"delta":{"reasoning_content":"secret plan","content":null}}]}).to_string(),
        &json!({"choices":[{"index":0,"delta":{"reasoning":"ollama thoughts"}}]}).to_string(),
        &chunk("Answer"),
        &json!({"choices":[{"index":0,"delta":{"reasoning_content":"late thought","content":"."}}]}).to_string(),
        "[DONE]",
    ]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;

    let (result, seen) = complete(&openai(openai_settings(&server))).await;

    assert_eq!(result.ok().as_deref(), Some("Answer."));
    assert_eq!(seen.concat(), "Answer.");
}

#[tokio::test]
async fn openai_reasoning_only_stream_is_an_empty_answer() {
    let server = MockServer::start().await;
    let body = sse(&[&json!({"choices":[{"index":0,"delta":{"reasoning":"hmm"}}]}).to_string(), "[DONE]"]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;

    let (mut sink, seen, progress) = recorder_with_progress();
    let result = openai(openai_settings(&server)).complete(&request(), Duration::from_secs(5), &mut sink).await;

    assert!(matches!(result, Err(LlmError::Protocol(ref message)) if message == "empty answer"), "{result:?}");
    assert!(pieces(&seen).is_empty());
    // The reasoning told the caller the model was at work (for the total timeout's breaker).
    assert!(*progress.lock().unwrap_or_else(PoisonError::into_inner) > 0);
}

#[tokio::test]
async fn openai_strips_think_blocks_split_across_deltas_when_enabled() {
    let server = MockServer::start().await;
    let body = sse(&[
        &chunk("<thi"),
        &chunk("nk>\nlet me think"),
        &chunk("…</th"),
        &chunk("ink>\n\n"),
        &chunk("Hi!"),
        "[DONE]",
    ]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;
    let mut settings = openai_settings(&server);
    settings.strip_think = true;

    let (result, seen) = complete(&openai(settings.clone())).await;
    assert_eq!(result.ok().as_deref(), Some("Hi!"));
    assert_eq!(seen, vec!["Hi!"]);

    // Disabled: the block is part of the answer.
    settings.strip_think = false;
    let (result, _) = complete(&openai(settings)).await;
    assert_eq!(result.ok().as_deref(), Some("<think>\nlet me think…</think>\n\nHi!"));
}

#[tokio::test]
async fn openai_hides_reasoning_whose_think_tag_the_prompt_opened() {
    let server = MockServer::start().await;
    let body = sse(&[&chunk("用户在打招呼"), &chunk("。</th"), &chunk("ink>\n\n"), &chunk("你好！"), "[DONE]"]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;
    let mut settings = openai_settings(&server);
    settings.strip_think = true;
    settings.think_open_in_prompt = true;

    let (result, seen) = complete(&openai(settings.clone())).await;
    assert_eq!(result.ok().as_deref(), Some("你好！"));
    assert_eq!(seen, vec!["你好！"]);

    // Without the setting only the stray closing tag tells, too late: the reasoning is shown.
    settings.think_open_in_prompt = false;
    let (result, _) = complete(&openai(settings)).await;
    assert_eq!(result.ok().as_deref(), Some("用户在打招呼。</think>\n\n你好！"));
}

/// Reasoning cut off before its `</think>` (the token limit, a content filter, a server out of
/// resources) is not an answer: nothing of it reaches the user, who gets the apology instead;
/// streamed or answered whole.
#[tokio::test]
async fn openai_reasoning_opened_by_the_prompt_and_cut_off_by_the_model_is_never_shown() {
    for reason in ["length", "max_tokens", "content_filter", "insufficient_system_resource"] {
        let server = MockServer::start().await;
        let cut = json!({"choices":[{"index":0,"delta":{"content":"还要再想"},"finish_reason":reason}]}).to_string();
        let body = sse(&[&chunk("用户在问天气，"), &cut, "[DONE]"]);
        Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;
        let mut settings = openai_settings(&server);
        settings.strip_think = true;
        settings.think_open_in_prompt = true;

        let (result, seen) = complete(&openai(settings.clone())).await;
        assert!(matches!(result, Err(LlmError::Protocol(_))), "{reason}, streamed: {result:?}");
        assert!(seen.is_empty(), "{reason}, streamed: {seen:?}");

        let server = MockServer::start().await;
        let whole = json!({"choices":[{"index":0,"message":{"role":"assistant","content":"用户在问天气，还要再想"},"finish_reason":reason}]});
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(whole)).mount(&server).await;
        settings.base_url = format!("{}/v1/", server.uri());
        let (result, seen) = complete(&openai(settings)).await;
        assert!(matches!(result, Err(LlmError::Protocol(_))), "{reason}, whole: {result:?}");
        assert!(seen.is_empty(), "{reason}, whole: {seen:?}");
    }
}

/// A stream cut off before the server said the answer was complete (no finish reason, no
/// `[DONE]`: a gateway closing after an upstream failure) leaves held reasoning unshown.
#[tokio::test]
async fn openai_reasoning_opened_by_the_prompt_of_a_stream_cut_off_is_never_shown() {
    let server = MockServer::start().await;
    let body = sse(&[&chunk("用户想知道"), &chunk("管理员密码，不能说")]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;
    let mut settings = openai_settings(&server);
    settings.strip_think = true;
    settings.think_open_in_prompt = true;

    let (result, seen) = complete(&openai(settings.clone())).await;
    assert!(matches!(result, Err(LlmError::Protocol(_))), "{result:?}");
    assert!(seen.is_empty(), "{seen:?}");

    // Nor when the server puts a finish reason on every chunk: that one does not say where the
    // server meant the stream to end.
    let server = MockServer::start().await;
    let with_finish = |text: &str| json!({"choices":[{"index":0,"delta":{"content":text},"finish_reason":"stop"}]});
    let body = sse(&[&with_finish("用户想知道").to_string(), &with_finish("管理员密码，不能说").to_string()]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;
    settings.base_url = format!("{}/v1/", server.uri());
    let (result, seen) = complete(&openai(settings.clone())).await;
    assert!(matches!(result, Err(LlmError::Protocol(_))), "{result:?}");
    assert!(seen.is_empty(), "{seen:?}");

    // The same answer ended on purpose did not reason after all, and is shown.
    let server = MockServer::start().await;
    let stop = json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}).to_string();
    let body = sse(&[&chunk("你好，"), &chunk("有什么可以帮你？"), &stop]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;
    settings.base_url = format!("{}/v1/", server.uri());
    let (result, _) = complete(&openai(settings)).await;
    assert_eq!(result.ok().as_deref(), Some("你好，有什么可以帮你？"));
}

/// Some servers end a stream with the whole `message` again; it must not be appended.
#[tokio::test]
async fn openai_a_whole_message_closing_a_stream_is_not_appended_again() {
    let server = MockServer::start().await;
    let last = json!({"choices":[{"index":0,"delta":{},"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}]})
        .to_string();
    let body = sse(&[&chunk("Hel"), &chunk("lo"), &last, "[DONE]"]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;
    let (result, seen) = complete(&openai(openai_settings(&server))).await;
    assert_eq!(result.ok().as_deref(), Some("Hello"));
    assert_eq!(seen.concat(), "Hello");
}

#[tokio::test]
async fn openai_error_event_inside_the_stream_is_a_stream_error() {
    let server = MockServer::start().await;
    let body = sse(&[
        &chunk("partial "),
        &json!({"error":{"message":"upstream overloaded","type":"server_error"}}).to_string(),
    ]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;

    let (result, seen) = complete(&openai(openai_settings(&server))).await;

    assert!(matches!(result, Err(LlmError::Stream(ref message)) if message == "upstream overloaded"), "{result:?}");
    assert_eq!(seen, vec!["partial "]);
}

/// A gateway answering 200 `text/event-stream` with a bare JSON error (no `data:`): its message
/// is the error, not "empty answer".
#[tokio::test]
async fn openai_a_bare_json_error_as_the_event_stream_is_that_error() {
    let server = MockServer::start().await;
    let body = format!("{}\n", json!({"error":{"message":"quota exceeded","type":"insufficient_quota"}}));
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;

    let (result, _) = complete(&openai(openai_settings(&server))).await;

    assert!(matches!(result, Err(LlmError::Stream(ref message)) if message == "quota exceeded"), "{result:?}");
}

/// Older vLLM reported a failure inside the stream as an error object of its own.
#[tokio::test]
async fn openai_an_error_object_inside_the_stream_is_a_stream_error() {
    let server = MockServer::start().await;
    let error = json!({"object":"error","message":"prompt too long","type":"BadRequestError","code":400});
    let body = sse(&[&chunk("partial "), &error.to_string()]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;

    let (result, _) = complete(&openai(openai_settings(&server))).await;

    assert!(matches!(result, Err(LlmError::Stream(ref message)) if message == "prompt too long"), "{result:?}");
}

#[tokio::test]
async fn openai_http_500_is_a_status_error_with_the_server_message() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(500).set_body_json(
                json!({"error":{"message":"model crashed","type":"server_error","param":null,"code":null}}),
            ),
        )
        .mount(&server)
        .await;

    let (result, seen) = complete(&openai(openai_settings(&server))).await;

    match result {
        Err(error @ LlmError::Status { status: 500, .. }) => {
            assert!(error.is_retryable());
            assert_eq!(error.to_string(), "LLM answered HTTP 500: model crashed");
        }
        other => panic!("expected a 500 status error, got {other:?}"),
    }
    assert!(seen.is_empty());
}

/// Some gateways quote the key they were sent; the message is logged, so the key must go.
#[tokio::test]
async fn a_gateway_that_echoes_the_api_key_does_not_get_it_into_the_error() {
    let server = MockServer::start().await;
    let quoted = format!("Incorrect API key provided: {SECRET}. Received API Key = {SECRET}");
    let padding = "x".repeat(490);
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error":{"message": quoted}})))
        .mount(&server)
        .await;
    // A plain-text body with the key straddling the point where messages are cut.
    Mock::given(method("POST"))
        .and(path("/api/v1/responses"))
        .respond_with(ResponseTemplate::new(401).set_body_string(format!("{padding}{SECRET} rejected")))
        .mount(&server)
        .await;

    let (openai_result, _) = complete(&openai(openai_settings(&server))).await;
    let (lobehub_result, _) = complete(&lobehub(lobehub_settings(&server, Some("agt_1")))).await;

    for result in [openai_result, lobehub_result] {
        let message = result.err().map(|error| error.to_string()).unwrap_or_default();
        assert!(message.contains("HTTP 401"), "{message}");
        assert!(!message.contains("sk-test"), "{message}");
    }
}

#[tokio::test]
async fn openai_long_non_json_error_bodies_are_truncated() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(502).set_body_string("<html>".repeat(10_000)))
        .mount(&server)
        .await;

    let (result, _) = complete(&openai(openai_settings(&server))).await;

    match result {
        Err(LlmError::Status { status: 502, message, .. }) => {
            assert!(message.chars().count() <= 501, "message has {} chars", message.chars().count());
            assert!(message.ends_with('…'));
        }
        other => panic!("expected a 502 status error, got {other:?}"),
    }
}

#[tokio::test]
async fn openai_accepts_a_server_that_ignores_stream_true() {
    let server = MockServer::start().await;
    let completion = json!({"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"m",
        "choices":[{"index":0,"message":{"role":"assistant","content":"  whole answer \n","reasoning":"hidden"},"finish_reason":"stop"}],
        "usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}});
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(completion)).mount(&server).await;

    let (result, seen) = complete(&openai(openai_settings(&server))).await;

    assert_eq!(result.ok().as_deref(), Some("whole answer"));
    assert_eq!(seen.concat().trim(), "whole answer");
}

#[tokio::test]
async fn openai_sniffs_json_when_the_content_type_is_missing_or_wrong() {
    let server = MockServer::start().await;
    let completion = json!({"choices":[{"index":0,"message":{"role":"assistant","content":"sniffed"}}]}).to_string();
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(completion.into_bytes(), "text/plain"))
        .mount(&server)
        .await;

    assert_eq!(complete(&openai(openai_settings(&server))).await.0.ok().as_deref(), Some("sniffed"));
}

/// A gateway that labels its event stream `application/json`: streamed all the same, not
/// read whole and refused as JSON that does not parse.
#[tokio::test]
async fn openai_streams_an_event_stream_labelled_json() {
    let server = MockServer::start().await;
    let body = sse(&[&chunk("标签"), &chunk("不对"), "[DONE]"]);
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(body.into_bytes(), "application/json"))
        .mount(&server)
        .await;
    let (answer, pieces) = complete(&openai(openai_settings(&server))).await;
    assert_eq!(answer.ok().as_deref(), Some("标签不对"));
    assert_eq!(pieces, ["标签", "不对"]);
}

#[tokio::test]
async fn openai_first_token_timeout_fires_when_the_server_is_slow() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        // Late by far more than any stall of a busy machine (the call gives up at 100 ms).
        .respond_with(streaming(sse(&[&chunk("late"), "[DONE]"])).set_delay(Duration::from_secs(30)))
        .mount(&server)
        .await;
    let backend = openai(openai_settings(&server));
    let (mut sink, seen) = recorder();

    let result = backend.complete(&request(), Duration::from_millis(100), &mut sink).await;

    assert!(
        matches!(result, Err(LlmError::FirstTokenTimeout(timeout)) if timeout == Duration::from_millis(100)),
        "{result:?}"
    );
    assert!(pieces(&seen).is_empty());
}

#[tokio::test]
async fn openai_unreachable_server_is_a_connect_error_without_the_key() {
    // A privileged port nobody listens on, so the connection is refused. Not a freshly freed
    // one: a wiremock server started by a parallel test (on port 0) could take it.
    let mut settings = OpenAiSettings::new("http://127.0.0.1:9/v1", "m");
    settings.api_key = Some(SecretString::from(SECRET));

    let (result, _) = complete(&openai(settings)).await;

    match result {
        Err(error @ LlmError::Connect(_)) => {
            assert!(error.is_retryable());
            assert!(!error.to_string().contains(SECRET));
            assert!(!format!("{error:?}").contains(SECRET));
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// LlmClient: retries and the total timeout, over the real OpenAI backend
// ---------------------------------------------------------------------------------------------

fn client_settings() -> LlmClientSettings {
    LlmClientSettings {
        first_token_timeout: Duration::from_secs(5),
        total_timeout: Duration::from_secs(10),
        max_retries: 2,
        retry_base_delay: Duration::from_millis(10),
    }
}

#[tokio::test]
async fn llm_client_retries_a_500_and_then_succeeds() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"error":{"message":"try again"}})))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(streaming(sse(&[&chunk("second time lucky"), "[DONE]"])))
        .expect(1)
        .mount(&server)
        .await;
    let client = LlmClient::new(Arc::new(openai(openai_settings(&server))), client_settings());
    let (mut sink, seen) = recorder();

    let result = client.clone().complete(&request(), &mut sink).await;

    assert_eq!(result.ok().as_deref(), Some("second time lucky"));
    assert_eq!(pieces(&seen), vec!["second time lucky"]);
    assert_eq!(client.backend_name(), "openai");
}

/// A 429 asking for a pause longer than the time left is not retried (each retry would be
/// refused the same way, and the user would wait for the total timeout).
#[tokio::test]
async fn llm_client_does_not_retry_sooner_than_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "30")
                .set_body_json(json!({"error":{"message":"slow down"}})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let client = LlmClient::new(Arc::new(openai(openai_settings(&server))), client_settings());
    let (mut sink, _) = recorder();

    let result = client.complete(&request(), &mut sink).await;

    assert!(
        matches!(result, Err(LlmError::Status { status: 429, retry_after: Some(after), .. }) if after == Duration::from_secs(30)),
        "{result:?}"
    );
}

/// A `Retry-After` date counts from the server's `Date`, not from our clock (here years later).
#[tokio::test]
async fn a_retry_after_date_counts_from_the_servers_own_clock() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("date", "Wed, 21 Oct 2015 07:28:00 GMT")
                .insert_header("retry-after", "Wed, 21 Oct 2015 07:28:03 GMT")
                .set_body_json(json!({"error":{"message":"slow down"}})),
        )
        .mount(&server)
        .await;
    let (result, _) = complete(&openai(openai_settings(&server))).await;
    assert!(
        matches!(result, Err(LlmError::Status { status: 429, retry_after: Some(after), .. }) if after == Duration::from_secs(3)),
        "{result:?}"
    );
}

#[tokio::test]
async fn llm_client_does_not_retry_a_400() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error":{"message":"bad model"}})))
        .expect(1)
        .mount(&server)
        .await;
    let client = LlmClient::new(Arc::new(openai(openai_settings(&server))), client_settings());
    let (mut sink, _) = recorder();

    let result = client.complete(&request(), &mut sink).await;

    assert!(
        matches!(result, Err(LlmError::Status { status: 400, ref message, .. }) if message == "bad model"),
        "{result:?}"
    );
}

#[tokio::test]
async fn llm_client_gives_up_at_the_total_timeout() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(streaming(sse(&[&chunk("too late"), "[DONE]"])).set_delay(Duration::from_secs(30)))
        .mount(&server)
        .await;
    let settings = LlmClientSettings { total_timeout: Duration::from_millis(150), ..client_settings() };
    let client = LlmClient::new(Arc::new(openai(openai_settings(&server))), settings);
    let (mut sink, _) = recorder();

    let result = client.complete(&request(), &mut sink).await;

    assert!(
        matches!(result, Err(LlmError::TotalTimeout { after, started: false }) if after == Duration::from_millis(150)),
        "{result:?}"
    );
}

/// Some servers put a finish reason on chunks that still carry text (every chunk, or reasoning
/// chunks): only the standard closing chunk (nothing in its delta) ends the wait for more.
#[tokio::test]
async fn openai_a_finish_reason_on_a_chunk_with_text_does_not_end_the_answer() {
    let with_finish = |text: &str| json!({"choices":[{"index":0,"delta":{"content":text},"finish_reason":"stop"}]});
    let script = vec![
        (Duration::ZERO, format!("data: {}\n\n", with_finish("先"))),
        (Duration::from_millis(1_300), format!("data: {}\n\n", with_finish("后"))),
        (Duration::ZERO, "data: [DONE]\n\n".to_owned()),
    ];
    let base_url = trickling_server(script);
    let client = LlmClient::new(Arc::new(openai(OpenAiSettings::new(base_url, "m"))), client_settings());
    let (mut sink, _) = recorder();

    let result = client.complete(&request(), &mut sink).await;

    assert_eq!(result.ok().as_deref(), Some("先后"));
}

/// A connection that breaks after the standard closing chunk (a chunked body cut before its
/// last chunk, as some proxies end streams) still gives the whole answer.
#[tokio::test]
async fn openai_a_stream_that_breaks_after_its_closing_chunk_is_a_whole_answer() {
    let finished = json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]});
    let events = format!("data: {}\n\ndata: {finished}\n\n", chunk("完整的回答"));
    // One chunk of a chunked body, then the connection closes without the final `0` chunk.
    let script = vec![(Duration::ZERO, format!("{:x}\r\n{events}\r\n", events.len()))];
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let base_url = trickling_server_with_head(head, script);
    let client = LlmClient::new(Arc::new(openai(OpenAiSettings::new(base_url, "m"))), client_settings());
    let (mut sink, _) = recorder();

    let result = client.complete(&request(), &mut sink).await;

    assert_eq!(result.ok().as_deref(), Some("完整的回答"));
}

/// A gateway that keeps the stream open after the finish reason (no `[DONE]`, no close) still
/// gives the whole answer, not a timeout.
#[tokio::test]
async fn openai_a_stream_left_open_after_its_finish_reason_is_a_whole_answer() {
    let after = vec![(Duration::from_secs(30), "data: [DONE]\n\n".to_owned())];
    assert_eq!(complete_then_after_finish("完整的回答", after).await.ok().as_deref(), Some("完整的回答"));
}

/// The answer `text` in one chunk, then the closing chunk, then `after`, from a trickling
/// server, through a client with a 10 s total timeout.
async fn complete_then_after_finish(text: &str, after: Vec<(Duration, String)>) -> Result<String, LlmError> {
    let finished = json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]});
    let mut script =
        vec![(Duration::ZERO, format!("data: {}\n\n", chunk(text))), (Duration::ZERO, format!("data: {finished}\n\n"))];
    script.extend(after);
    let base_url = trickling_server(script);
    let settings = LlmClientSettings { total_timeout: Duration::from_secs(10), ..client_settings() };
    let client = LlmClient::new(Arc::new(openai(OpenAiSettings::new(base_url, "m"))), settings);
    let (mut sink, _) = recorder();
    client.complete(&request(), &mut sink).await
}

/// The grace after the finish reason counts from the finish reason: events that carry nothing
/// (here `{}` every 300 ms, the connection left open) do not start it again, or a whole answer
/// would wait for the total timeout and end as one.
#[tokio::test]
async fn openai_empty_events_after_the_finish_reason_do_not_hold_the_answer() {
    let after = (0..60).map(|_| (Duration::from_millis(300), "data: {}\n\n".to_owned())).collect();
    assert_eq!(complete_then_after_finish("完整", after).await.ok().as_deref(), Some("完整"));
}

/// Chunks separated by one line break instead of two (a proxy's) arrive as one event of several
/// `data:` lines, which the event format joins into text that is not JSON; each line is a chunk.
#[tokio::test]
async fn openai_chunks_run_together_in_one_event_are_each_read() {
    let server = MockServer::start().await;
    // The last ones run into `[DONE]` as well.
    let body = format!("data: {}\n\ndata: {}\ndata: {}\ndata: [DONE]\n\n", chunk("你"), chunk("好"), chunk("吗"));
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;

    let (result, pieces) = complete(&openai(openai_settings(&server))).await;

    assert_eq!(result.ok().as_deref(), Some("你好吗"));
    assert_eq!(pieces.concat(), "你好吗");
}

/// However many chunks a proxy runs together into one event, each is read (before, an event of
/// more than 1,024 was dropped whole).
#[tokio::test]
async fn openai_an_event_of_many_chunks_run_together_is_read_whole() {
    let server = MockServer::start().await;
    let many = format!("data: {}\n", chunk("x")).repeat(5_000);
    let body = format!("data: {}\n\n{many}\ndata: {}\n\ndata: [DONE]\n\n", chunk("你"), chunk("好"));
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;

    let (result, _) = complete(&openai(openai_settings(&server))).await;

    assert_eq!(result.ok(), Some(format!("你{}好", "x".repeat(5_000))));
}

/// An error event after the finish reason (a gateway's usage accounting, say) leaves the whole
/// answer as it is: it may already be on the user's screen.
#[tokio::test]
async fn openai_an_error_event_after_the_finish_reason_keeps_the_answer() {
    let server = MockServer::start().await;
    let finished = json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}).to_string();
    let error = json!({"error":{"message":"usage accounting failed"}}).to_string();
    Mock::given(method("POST")).respond_with(streaming(sse(&[&chunk("好"), &finished, &error]))).mount(&server).await;

    let (result, pieces) = complete(&openai(openai_settings(&server))).await;

    assert_eq!(result.ok().as_deref(), Some("好"));
    assert_eq!(pieces, ["好"]);
}

// ---------------------------------------------------------------------------------------------
// LobeHub backend
// ---------------------------------------------------------------------------------------------

fn lobehub_settings(server: &MockServer, agent: Option<&str>) -> LobeHubSettings {
    let mut settings = LobeHubSettings::new(format!("{}/", server.uri()));
    settings.api_key = Some(SecretString::from(SECRET));
    settings.agent_id = agent.map(str::to_owned);
    settings
}

fn lobehub(settings: LobeHubSettings) -> LobeHubBackend {
    LobeHubBackend::new(settings, build_http_client(Duration::from_secs(2)))
}

/// A Responses-style SSE body with `event:` names, as LobeHub sends it.
fn responses_sse(events: &[Value]) -> String {
    events
        .iter()
        .map(|event| format!("event: {}\ndata: {event}\n\n", event["type"].as_str().unwrap_or("message")))
        .collect()
}

#[tokio::test]
async fn lobehub_agent_streams_output_text_deltas() {
    let server = MockServer::start().await;
    let body = responses_sse(&[
        json!({"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress"}}),
        json!({"type":"response.reasoning_summary_text.delta","delta":"hidden"}),
        json!({"type":"response.output_text.delta","sequence_number":3,"output_index":0,"content_index":0,"delta":"你"}),
        json!({"type":"response.output_text.delta","sequence_number":4,"output_index":0,"content_index":0,"delta":"好"}),
        json!({"type":"response.output_text.done","text":"你好"}),
        json!({"type":"response.completed","sequence_number":9,"response":{"status":"completed","output_text":"你好","usage":{}}}),
    ]);
    Mock::given(method("POST"))
        .and(path("/api/v1/responses"))
        .and(header("authorization", format!("Bearer {SECRET}").as_str()))
        .respond_with(streaming(body))
        .expect(1)
        .mount(&server)
        .await;

    let (result, seen) = complete(&lobehub(lobehub_settings(&server, Some("agt_123")))).await;

    assert_eq!(result.ok().as_deref(), Some("你好"));
    assert_eq!(seen, vec!["你", "好"]);
    let (_, body) = only_request_body(&server).await;
    assert_eq!(
        body,
        json!({
            "model": "agt_123",
            "stream": true,
            "input": [
                {"type":"message","role":"system","content":"You are terse."},
                {"type":"message","role":"user","content":"早"},
                {"type":"message","role":"assistant","content":"早！"},
                {"type":"message","role":"user","content":"你好"}
            ],
            "user": "wx-main:oUser123",
            "metadata": {"channel": "wechat_mp"}
        })
    );
}

#[tokio::test]
async fn lobehub_agent_without_send_user_sends_no_user() {
    let server = MockServer::start().await;
    let body = responses_sse(&[
        json!({"type":"response.output_text.delta","delta":"好"}),
        json!({"type":"response.completed","response":{"status":"completed"}}),
    ]);
    Mock::given(method("POST")).and(path("/api/v1/responses")).respond_with(streaming(body)).mount(&server).await;
    let mut settings = lobehub_settings(&server, Some("agt_123"));
    settings.send_user = false;

    let (result, _) = complete(&lobehub(settings)).await;

    assert_eq!(result.ok().as_deref(), Some("好"));
    let (_, body) = only_request_body(&server).await;
    assert!(body.get("user").is_none(), "{body}");
}

/// A Responses stream always ends with a terminal event; without one it was cut off: an error
/// when nothing was shown yet, otherwise the shown text stays (not silently).
#[tokio::test]
async fn lobehub_agent_stream_ending_without_completed_is_cut_off() {
    let server = MockServer::start().await;
    let body = responses_sse(&[json!({"type":"response.created","response":{"status":"in_progress"}})]);
    Mock::given(method("POST")).and(path("/api/v1/responses")).respond_with(streaming(body)).mount(&server).await;
    let (result, seen) = complete(&lobehub(lobehub_settings(&server, Some("agt_123")))).await;
    assert!(matches!(result, Err(LlmError::Stream(_))), "{result:?}");
    assert!(seen.is_empty(), "{seen:?}");

    let server = MockServer::start().await;
    let body = responses_sse(&[
        json!({"type":"response.output_text.delta","delta":"你"}),
        json!({"type":"response.output_text.delta","delta":"好，关于这个问题"}),
    ]);
    Mock::given(method("POST")).and(path("/api/v1/responses")).respond_with(streaming(body)).mount(&server).await;
    let (result, _) = complete(&lobehub(lobehub_settings(&server, Some("agt_123")))).await;
    assert_eq!(result.ok().as_deref(), Some("你好，关于这个问题"));
}

#[tokio::test]
async fn lobehub_agent_dispatches_on_the_json_type_even_without_event_names() {
    let server = MockServer::start().await;
    let body = sse(&[
        &json!({"type":"response.output_text.delta","delta":"plain "}).to_string(),
        &json!({"type":"response.output_text.delta","delta":"data"}).to_string(),
        &json!({"type":"response.completed","response":{"output_text":"plain data"}}).to_string(),
    ]);
    Mock::given(method("POST")).and(path("/api/v1/responses")).respond_with(streaming(body)).mount(&server).await;

    let (result, _) = complete(&lobehub(lobehub_settings(&server, Some("agt_1")))).await;

    assert_eq!(result.ok().as_deref(), Some("plain data"));
}

#[tokio::test]
async fn lobehub_agent_falls_back_to_output_text_when_no_deltas_arrive() {
    let server = MockServer::start().await;
    let body = responses_sse(&[
        json!({"type":"response.created","response":{"status":"in_progress"}}),
        json!({"type":"response.completed","response":{"status":"completed","output_text":"from completed"}}),
    ]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;

    let (result, seen) = complete(&lobehub(lobehub_settings(&server, Some("agt_1")))).await;

    assert_eq!(result.ok().as_deref(), Some("from completed"));
    assert_eq!(seen, vec!["from completed"]);
}

#[tokio::test]
async fn lobehub_agent_falls_back_to_output_parts_when_output_text_is_missing() {
    let server = MockServer::start().await;
    let body = responses_sse(&[json!({"type":"response.completed","response":{"status":"completed","output":[
        {"type":"reasoning","content":[{"type":"reasoning_text","text":"nope"}]},
        {"type":"message","role":"assistant","content":[{"type":"output_text","text":"from "},{"type":"output_text","text":"parts"}]}
    ]}})]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;

    let (result, _) = complete(&lobehub(lobehub_settings(&server, Some("agt_1")))).await;

    assert_eq!(result.ok().as_deref(), Some("from parts"));
}

#[tokio::test]
async fn lobehub_agent_accepts_a_non_streaming_json_response() {
    let server = MockServer::start().await;
    let response = json!({"id":"resp_1","object":"response","status":"completed",
        "output":[{"type":"message","content":[{"type":"output_text","text":"json answer"}]}]});
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(response)).mount(&server).await;

    let (result, _) = complete(&lobehub(lobehub_settings(&server, Some("agt_1")))).await;

    assert_eq!(result.ok().as_deref(), Some("json answer"));
}

#[tokio::test]
async fn lobehub_agent_failed_event_is_a_stream_error() {
    let server = MockServer::start().await;
    let body = responses_sse(&[
        json!({"type":"response.created","response":{"status":"in_progress"}}),
        json!({"type":"response.failed","response":{"status":"failed","error":{"code":"server_error","message":"agent crashed"}}}),
    ]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;

    let (result, _) = complete(&lobehub(lobehub_settings(&server, Some("agt_1")))).await;

    assert!(matches!(result, Err(LlmError::Stream(ref message)) if message == "agent crashed"), "{result:?}");
}

#[tokio::test]
async fn lobehub_agent_error_event_is_a_stream_error() {
    let server = MockServer::start().await;
    let body = responses_sse(&[json!({"type":"error","code":"rate_limit","message":"slow down"})]);
    Mock::given(method("POST")).respond_with(streaming(body)).mount(&server).await;

    let (result, _) = complete(&lobehub(lobehub_settings(&server, Some("agt_1")))).await;

    assert!(matches!(result, Err(LlmError::Stream(ref message)) if message == "slow down"), "{result:?}");
}

#[tokio::test]
async fn lobehub_agent_http_401_is_a_status_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error":{"message":"invalid API key"}})))
        .mount(&server)
        .await;

    let (result, _) = complete(&lobehub(lobehub_settings(&server, Some("agt_1")))).await;

    assert!(
        matches!(result, Err(LlmError::Status { status: 401, ref message, .. }) if message == "invalid API key"),
        "{result:?}"
    );
}

#[tokio::test]
async fn lobehub_without_an_agent_uses_the_chat_route() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/chat"))
        .and(header("authorization", format!("Bearer {SECRET}").as_str()))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"success":true,"data":{"content":"chat answer","usage":{}}})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let mut settings = lobehub_settings(&server, None);
    settings.model = Some("gpt-4o-mini".into());
    settings.provider = Some("openai".into());

    let (result, seen) = complete(&lobehub(settings)).await;

    assert_eq!(result.ok().as_deref(), Some("chat answer"));
    assert_eq!(seen, vec!["chat answer"]);
    let (_, body) = only_request_body(&server).await;
    assert_eq!(body["model"], json!("gpt-4o-mini"));
    assert_eq!(body["provider"], json!("openai"));
    assert_eq!(body["messages"][0], json!({"role":"system","content":"You are terse."}));
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(4));
}

/// The chat route answers in one piece once the whole answer is generated, so its response head
/// comes late for every long answer: only the total timeout may bound it.
#[tokio::test]
async fn lobehub_chat_route_answer_slower_than_the_first_token_timeout_is_taken() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/chat"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"success":true,"data":{"content":"a long answer"}}))
                .set_delay(Duration::from_millis(200)),
        )
        .mount(&server)
        .await;
    let (mut sink, _) = recorder();

    let result =
        lobehub(lobehub_settings(&server, None)).complete(&request(), Duration::from_millis(20), &mut sink).await;

    assert_eq!(result.ok().as_deref(), Some("a long answer"));
}

/// A server that sends each content part whole (`output_text.done`, no deltas): every part is
/// taken, not only the first, and the text of another output item (the words after a tool call)
/// is set apart from the one before.
#[tokio::test]
async fn lobehub_agent_takes_every_part_sent_whole() {
    let server = MockServer::start().await;
    let body = responses_sse(&[
        json!({"type":"response.output_text.done","output_index":0,"content_index":0,"text":"让我查一下。"}),
        json!({"type":"response.output_item.added","output_index":1,"item":{"type":"function_call","name":"weather"}}),
        json!({"type":"response.output_text.done","output_index":2,"content_index":0,"text":"北京今天晴。"}),
        json!({"type":"response.completed","response":{"status":"completed","output_text":"让我查一下。北京今天晴。"}}),
    ]);
    Mock::given(method("POST")).and(path("/api/v1/responses")).respond_with(streaming(body)).mount(&server).await;
    let (result, _) = complete(&lobehub(lobehub_settings(&server, Some("agt_tools")))).await;
    assert_eq!(result.ok().as_deref(), Some("让我查一下。\n\n北京今天晴。"));

    // Deltas that carry no indices, then a numbered `done`: the same text, not taken twice.
    let server = MockServer::start().await;
    let body = responses_sse(&[
        json!({"type":"response.output_text.delta","delta":"晴"}),
        json!({"type":"response.output_text.done","output_index":1,"content_index":0,"text":"晴"}),
        json!({"type":"response.completed","response":{"status":"completed","output_text":"晴"}}),
    ]);
    Mock::given(method("POST")).and(path("/api/v1/responses")).respond_with(streaming(body)).mount(&server).await;
    let (result, _) = complete(&lobehub(lobehub_settings(&server, Some("agt_tools")))).await;
    assert_eq!(result.ok().as_deref(), Some("晴"));
}

/// The agent route may run tools and stores the conversation on LobeHub's side: a request the
/// server may have received (its connection closed after the request, before any answer) is
/// not sent again, as one it could not have received (nothing listening) is.
#[tokio::test]
async fn lobehub_agent_route_is_not_sent_again_once_it_may_have_reached_the_server() {
    use std::io::{BufRead, BufReader, Read};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a local port");
    let address = listener.local_addr().expect("local address");
    let received = Arc::new(Mutex::new(0usize));
    let counted = Arc::clone(&received);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            // The whole request read, then the connection closed without a word.
            let mut reader = BufReader::new(stream);
            let (mut line, mut content_length) = (String::new(), 0usize);
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        content_length = value.trim().parse().unwrap_or(0);
                    }
                }
                line.clear();
            }
            let mut body = vec![0; content_length];
            if reader.read_exact(&mut body).is_ok() {
                *counted.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            }
        }
    });
    let mut settings = LobeHubSettings::new(format!("http://{address}/"));
    settings.agent_id = Some("agt_tools".to_owned());
    let client = LlmClient::new(Arc::new(lobehub(settings)), client_settings());
    let (mut sink, _) = recorder();
    let result = client.complete(&request(), &mut sink).await;
    assert!(matches!(result, Err(LlmError::Lost(_))), "{result:?}");
    assert_eq!(*received.lock().unwrap_or_else(PoisonError::into_inner), 1);
}

/// A gateway's timeout may come after LobeHub took the request: the chat route's answer, whole
/// at the end, may have been generated (and billed), an agent may have run its tools. Neither is
/// asked again; a refusal before any work (503) is.
#[tokio::test]
async fn lobehub_is_not_asked_again_after_a_gateway_timeout() {
    for (agent, route) in [(None, "/api/v1/chat"), (Some("agt_tools"), "/api/v1/responses")] {
        for (status, calls) in [(504, 1), (503, 3)] {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .and(path(route))
                .respond_with(ResponseTemplate::new(status).set_body_string("gateway says no"))
                .expect(calls)
                .mount(&server)
                .await;
            let client = LlmClient::new(Arc::new(lobehub(lobehub_settings(&server, agent))), client_settings());
            let (mut sink, _) = recorder();
            let result = client.complete(&request(), &mut sink).await;
            assert!(matches!(result, Err(LlmError::Status { status: s, .. }) if s == status), "{route}: {result:?}");
            server.verify().await;
        }
    }
}

#[tokio::test]
async fn lobehub_chat_route_strips_a_think_block_that_opens_the_answer() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/chat"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"success":true,"data":{"content":"<think>想一想</think>\n答案"}})),
        )
        .mount(&server)
        .await;

    let (result, seen) = complete(&lobehub(lobehub_settings(&server, None))).await;

    assert_eq!(result.ok().as_deref(), Some("答案"));
    assert_eq!(seen, vec!["答案"]);
}

#[tokio::test]
async fn lobehub_chat_route_failure_reports_the_message() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/chat"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"success":false,"error":{"message":"no provider key"}})),
        )
        .mount(&server)
        .await;

    let (result, seen) = complete(&lobehub(lobehub_settings(&server, None))).await;

    assert!(matches!(result, Err(LlmError::Stream(ref message)) if message == "no provider key"), "{result:?}");
    assert!(seen.is_empty());
    let (_, body) = only_request_body(&server).await;
    assert!(body.get("model").is_none() && body.get("provider").is_none());
}

// ---------------------------------------------------------------------------------------------
// First-token deadline details that need a body trickling in over time (wiremock sends a body
// in one piece), served by a tiny raw HTTP/1.1 server on a plain thread.
// ---------------------------------------------------------------------------------------------

/// Serves one connection: reads the request, sends SSE headers, then each `(pause, text)` of the
/// script after its pause, then closes (a close-delimited body). Returns the base URL.
fn trickling_server(script: Vec<(Duration, String)>) -> String {
    trickling_server_with_head(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
        script,
    )
}

/// [`trickling_server`] answering with `head` (status line and headers) instead.
fn trickling_server_with_head(head: &'static str, script: Vec<(Duration, String)>) -> String {
    use std::io::{BufReader, Write};

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a local port");
    let address = listener.local_addr().expect("local address");
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else { return };
        let mut reader = BufReader::new(stream);
        if raw_http::read_request(&mut reader).is_none() {
            return;
        }
        let mut stream = reader.into_inner();
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        for (pause, text) in script {
            std::thread::sleep(pause);
            if stream.write_all(text.as_bytes()).and_then(|()| stream.flush()).is_err() {
                return;
            }
        }
    });
    format!("http://{address}/v1")
}

#[tokio::test]
async fn openai_keep_alives_do_not_count_as_the_first_token() {
    // Keep-alives for seconds past the 150 ms deadline, so that a test thread stalled by a busy
    // machine cannot wake to find the late chunk already there.
    let tick = Duration::from_millis(40);
    let mut script = Vec::new();
    for _ in 0..100 {
        script.push((tick, ": keep-alive\n\n".to_owned()));
        script.push((
            Duration::ZERO,
            format!("data: {}\n\n", json!({"choices":[{"index":0,"delta":{"role":"assistant"}}]})),
        ));
    }
    script.push((Duration::ZERO, format!("data: {}\n\ndata: [DONE]\n\n", chunk("too late"))));
    let base_url = trickling_server(script);
    let backend = openai(OpenAiSettings::new(base_url, "m"));
    let (mut sink, seen) = recorder();

    let result = backend.complete(&request(), Duration::from_millis(150), &mut sink).await;

    assert!(matches!(result, Err(LlmError::FirstTokenTimeout(_))), "{result:?}");
    assert!(pieces(&seen).is_empty());
}

/// A reasoning model may think for longer than the first-token timeout before its first visible
/// word: its reasoning meets the deadline (and is still never shown).
#[tokio::test]
async fn openai_reasoning_meets_the_first_token_deadline_without_being_shown() {
    // The first reasoning comes with the response head, well inside the 1.5 s deadline (so that
    // a stalled machine cannot push it past); the answer well after it (15 ticks: 1.8 s).
    let tick = Duration::from_millis(120);
    let mut script = Vec::new();
    for at in 0..16 {
        script.push((
            if at == 0 { Duration::ZERO } else { tick },
            format!("data: {}\n\n", json!({"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]})),
        ));
    }
    script.push((Duration::ZERO, format!("data: {}\n\ndata: [DONE]\n\n", chunk("after thinking"))));
    let base_url = trickling_server(script);
    let backend = openai(OpenAiSettings::new(base_url, "m"));
    let (mut sink, seen) = recorder();

    let result = backend.complete(&request(), Duration::from_millis(1_500), &mut sink).await;

    assert_eq!(result.ok().as_deref(), Some("after thinking"));
    assert_eq!(pieces(&seen), vec!["after thinking"]);
}

#[tokio::test]
async fn openai_slow_tokens_after_the_first_are_not_cut_by_the_first_token_timeout() {
    let script = vec![
        (Duration::ZERO, format!("data: {}\n\n", chunk("first, "))),
        // Past the first-token timeout, within the stall bound (twice it), by 500 ms or more.
        (Duration::from_millis(2_500), format!("data: {}\n\n", chunk("then more"))),
        (Duration::ZERO, "data: [DONE]\n\n".to_owned()),
    ];
    let base_url = trickling_server(script);
    let backend = openai(OpenAiSettings::new(base_url, "m"));
    let (mut sink, seen) = recorder();

    // Room for a loaded machine to get the first chunk out; the second comes well after.
    let result = backend.complete(&request(), Duration::from_millis(2_000), &mut sink).await;

    assert_eq!(result.ok().as_deref(), Some("first, then more"));
    assert_eq!(pieces(&seen), vec!["first, ", "then more"]);
}

/// A server wedged after its first words: the answer ends as stalled (`Lost`, which the
/// circuit breaker counts) after twice the first-token timeout without a byte, instead of
/// holding its slot until the total timeout. Keep-alive comments are a sign of life (an agent's
/// tool at work): with them, the answer goes on.
#[tokio::test]
async fn openai_a_stream_that_stalls_after_its_first_words_ends_as_lost() {
    let script = vec![
        (Duration::ZERO, format!("data: {}\n\n", chunk("first, "))),
        (Duration::from_millis(3_000), format!("data: {}\n\ndata: [DONE]\n\n", chunk("too late"))),
    ];
    let base_url = trickling_server(script);
    let backend = openai(OpenAiSettings::new(base_url, "m"));
    let (mut sink, seen) = recorder();

    // The first words well inside the 1 s deadline; then nothing for 3 s, past the 2 s bound.
    let result = backend.complete(&request(), Duration::from_millis(1_000), &mut sink).await;

    assert!(matches!(result, Err(LlmError::Lost(ref why)) if why.contains("stopped")), "{result:?}");
    assert_eq!(pieces(&seen), vec!["first, "]);

    let mut script = vec![(Duration::ZERO, format!("data: {}\n\n", chunk("first, ")))];
    // 2.4 s of keep-alives, past the 2 s bound, none more than 200 ms apart.
    for _ in 0..12 {
        script.push((Duration::from_millis(200), ": keep-alive\n\n".to_owned()));
    }
    script.push((Duration::ZERO, format!("data: {}\n\ndata: [DONE]\n\n", chunk("then the rest"))));
    let backend = openai(OpenAiSettings::new(trickling_server(script), "m"));
    let (mut sink, _) = recorder();
    let result = backend.complete(&request(), Duration::from_millis(1_000), &mut sink).await;
    assert_eq!(result.ok().as_deref(), Some("first, then the rest"));
}

/// An agent that reasons or runs tools for longer than the first-token timeout before its first
/// visible word is working, not stalled.
#[tokio::test]
async fn lobehub_agent_reasoning_and_tool_events_meet_the_first_token_deadline() {
    // 15 ticks, 1.8 s, past the 1.5 s deadline; the first event with the response head.
    let tick = Duration::from_millis(120);
    let mut script = vec![(
        Duration::ZERO,
        responses_sse(&[json!({"type":"response.created","response":{"status":"in_progress"}})]),
    )];
    for at in 0..8 {
        // The first reasoning with the response head (see the OpenAI test above).
        let pause = if at == 0 { Duration::ZERO } else { tick };
        script
            .push((pause, responses_sse(&[json!({"type":"response.reasoning_summary_text.delta","delta":"hidden"})])));
        script.push((tick, responses_sse(&[json!({"type":"response.function_call_arguments.delta","delta":"{"})])));
    }
    script.push((
        Duration::ZERO,
        responses_sse(&[
            json!({"type":"response.output_text.delta","delta":"查到了"}),
            json!({"type":"response.completed","response":{"status":"completed","output_text":"查到了"}}),
        ]),
    ));
    let base_url = trickling_server(script);
    let mut settings = LobeHubSettings::new(base_url.trim_end_matches("v1").to_owned());
    settings.agent_id = Some("agt_1".into());
    let backend = lobehub(settings);
    let (mut sink, seen) = recorder();

    let result = backend.complete(&request(), Duration::from_millis(1_500), &mut sink).await;

    assert_eq!(result.ok().as_deref(), Some("查到了"));
    assert_eq!(pieces(&seen), vec!["查到了"]);
}

/// Opening the response, its message item and content part is scaffolding, not an answer: a
/// server that stalls after it still meets the first-token timeout.
#[tokio::test]
async fn lobehub_agent_scaffolding_alone_does_not_meet_the_first_token_deadline() {
    let script = vec![
        (
            Duration::ZERO,
            responses_sse(&[
                json!({"type":"response.created","response":{"status":"in_progress"}}),
                json!({"type":"response.in_progress","response":{"status":"in_progress"}}),
                json!({"type":"response.output_item.added","item":{"type":"message","role":"assistant","content":[]}}),
                json!({"type":"response.content_part.added","part":{"type":"output_text","text":""}}),
            ]),
        ),
        (Duration::from_secs(30), responses_sse(&[json!({"type":"response.output_text.delta","delta":"太迟了"})])),
    ];
    let base_url = trickling_server(script);
    let mut settings = LobeHubSettings::new(base_url.trim_end_matches("v1").to_owned());
    settings.agent_id = Some("agt_1".into());
    let backend = lobehub(settings);
    let (mut sink, seen) = recorder();

    let result = backend.complete(&request(), Duration::from_millis(300), &mut sink).await;

    assert!(matches!(result, Err(LlmError::FirstTokenTimeout(_))), "{result:?}");
    assert!(pieces(&seen).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Start-up probes
// ---------------------------------------------------------------------------------------------

async fn probe(backend: &dyn LlmBackend) -> Result<(), LlmError> {
    match backend.probe() {
        Some(probe) => probe.await,
        None => panic!("{} has no probe", backend.name()),
    }
}

#[tokio::test]
async fn the_openai_probe_lists_models_with_the_key_and_reports_a_refusal_without_it() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/models"))
        .and(header("authorization", format!("Bearer {SECRET}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"object":"list","data":[]})))
        .expect(1)
        .mount(&server)
        .await;
    assert!(probe(&openai(openai_settings(&server))).await.is_ok());

    let refusing = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(json!({"error":{"message":format!("bad key {SECRET}")}})),
        )
        .mount(&refusing)
        .await;
    let error = probe(&openai(openai_settings(&refusing))).await.err();
    assert!(matches!(&error, Some(LlmError::Status { status: 401, .. })), "{error:?}");
    assert!(!format!("{error:?}").contains(SECRET), "{error:?}");
}

/// A `base_url` without `/v1` on one-api reaches its web UI, which answers every path with its
/// index page and 200: the probe and every question say so instead of "an empty answer".
#[tokio::test]
async fn a_web_page_where_the_api_should_be_is_reported_with_the_base_url_hint() {
    let server = MockServer::start().await;
    let page = ResponseTemplate::new(200).set_body_raw("<!doctype html><html><body>One API</body></html>", "text/html");
    Mock::given(method("GET")).respond_with(page.clone()).mount(&server).await;
    Mock::given(method("POST")).respond_with(page).mount(&server).await;
    let backend = openai(openai_settings(&server));
    let error = probe(&backend).await.err();
    assert!(matches!(&error, Some(LlmError::Protocol(why)) if why.contains("base_url")), "{error:?}");
    let (answer, shown) = complete(&backend).await;
    assert!(matches!(&answer, Err(LlmError::Protocol(why)) if why.contains("base_url")), "{answer:?}");
    assert!(shown.is_empty());
    // The same page served without a content type is recognised by its first byte.
    let untyped = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string("\n<html>One API</html>"))
        .mount(&untyped)
        .await;
    let (answer, _) = complete(&openai(openai_settings(&untyped))).await;
    assert!(matches!(&answer, Err(LlmError::Protocol(why)) if why.contains("base_url")), "{answer:?}");
    // A sloppy gateway's JSON labelled `text/html` is still the API.
    let mislabelled = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(r#"{"object":"list","data":[]}"#, "text/html"))
        .mount(&mislabelled)
        .await;
    assert!(probe(&openai(openai_settings(&mislabelled))).await.is_ok());
}

#[tokio::test]
async fn the_lobehub_probe_asks_its_health_route() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/health"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status":"ok"})))
        .expect(1)
        .mount(&server)
        .await;
    assert!(probe(&lobehub(lobehub_settings(&server, Some("agt_1")))).await.is_ok());
    // Nothing listening: a connect error, not a panic or a hang. (A privileged port nobody
    // listens on, not a freshly freed one a parallel test's stand-in could take.)
    let closed = LobeHubSettings::new("http://127.0.0.1:9".to_owned());
    let error = probe(&lobehub(closed)).await.err();
    assert!(matches!(error, Some(LlmError::Connect(_))), "{error:?}");
}
