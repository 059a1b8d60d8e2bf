//! The default backend: any OpenAI-compatible Chat Completions server (OpenAI, Ollama, vLLM,
//! one-api/new-api, DeepSeek, DashScope, LiteLLM, …), streamed over SSE.
//!
//! Invariants: reasoning (`delta.reasoning_content`, `delta.reasoning`, `message.reasoning`) is
//! never forwarded; parsing works on `serde_json::Value` so every tolerated oddity of PROTOCOLS §5
//! (empty `choices`, `finish_reason` of any shape, null/missing `content`, `usage: {}`) is simply
//! absent data, never a parse failure; the API key only ever travels in a sensitive header.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use tracing::{debug, warn};
use yizhan_channel_core::BoxFuture;

use super::backend::{ChatMessage, CompletionRequest, DeltaSink, LlmBackend, LlmError};
use super::sse::{self, ResponseBody};
use super::think::{ThinkFilter, VisibleAnswer};

/// How long an error body may take to arrive after an error status.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a response body or stream chunk is an error report: an `error` member, or (vLLM
/// before 0.6) `{"object":"error","message":…}`.
fn reports_an_error(json: &Value) -> bool {
    json.get("error").is_some_and(|error| !error.is_null())
        || json.get("object").and_then(Value::as_str) == Some("error")
}

/// How long a stream may stay open after its finish reason (see `complete_once`).
const AFTER_FINISH_GRACE: Duration = Duration::from_secs(1);

/// What the OpenAI-compatible backend needs to know. Deserializable so it can sit in the config
/// file as-is.
#[derive(Clone, Deserialize)]
pub struct OpenAiSettings {
    /// The API root including `/v1`, e.g. `http://127.0.0.1:11434/v1`; `/chat/completions` is
    /// appended. A trailing slash is tolerated.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …` only when set (local Ollama/vLLM need none).
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// The model name the server knows (`gpt-4o-mini`, `qwen3:8b`, …).
    pub model: String,
    /// Sent only when set, so the server's default applies otherwise.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Sent only when set.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Ask for the usage chunk (`stream_options.include_usage`). Off by default: some gateways
    /// reject unknown fields.
    #[serde(default)]
    pub include_usage: bool,
    /// Send the request's end-user id as `user` (abuse tracking). Off in these settings unless
    /// set; the config's `[llm] send_user` turns it on by default (README, Configuration).
    #[serde(default)]
    pub send_user: bool,
    /// Remove inline `<think>…</think>` blocks from the answer (DeepSeek-R1, QwQ, …).
    #[serde(default)]
    pub strip_think: bool,
    /// The model's chat template ends the prompt with `<think>`, so its answer starts inside the
    /// reasoning block (see [`ThinkFilter::opened_by_prompt`]).
    #[serde(default)]
    pub think_open_in_prompt: bool,
}

impl OpenAiSettings {
    /// Settings with every optional knob off: no key, server-default sampling, no usage chunk,
    /// no `user` field, no think-stripping.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            model: model.into(),
            temperature: None,
            max_tokens: None,
            include_usage: false,
            send_user: false,
            strip_think: false,
            think_open_in_prompt: false,
        }
    }
}

impl fmt::Debug for OpenAiSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // NOTE: written by hand so the API key's presence, never its value, is shown.
        f.debug_struct("OpenAiSettings")
            // A proxy's credentials may be in it.
            .field("base_url", &crate::config::without_credentials(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "[REDACTED]"))
            .field("model", &self.model)
            .field("temperature", &self.temperature)
            .field("max_tokens", &self.max_tokens)
            .field("include_usage", &self.include_usage)
            .field("send_user", &self.send_user)
            .field("strip_think", &self.strip_think)
            .field("think_open_in_prompt", &self.think_open_in_prompt)
            .finish()
    }
}

/// Talks to an OpenAI-compatible `/chat/completions` endpoint. One HTTP attempt per call;
/// retries belong to [`LlmClient`](super::client::LlmClient).
#[derive(Debug, Clone)]
pub struct OpenAiBackend {
    settings: OpenAiSettings,
    /// `{base_url}/chat/completions`, computed once.
    url: String,
    /// Shared so all backends reuse one connection pool.
    http: reqwest::Client,
}

impl OpenAiBackend {
    /// A backend using `http` (see [`build_http_client`](super::client::build_http_client)).
    pub fn new(settings: OpenAiSettings, http: reqwest::Client) -> Self {
        let url = format!("{}/chat/completions", settings.base_url.trim_end_matches('/'));
        Self { settings, url, http }
    }

    /// The settings in use.
    pub fn settings(&self) -> &OpenAiSettings {
        &self.settings
    }

    async fn complete_once(
        &self,
        request: &CompletionRequest,
        first_token_timeout: Duration,
        on_delta: &mut DeltaSink,
    ) -> Result<String, LlmError> {
        let deadline = Instant::now() + first_token_timeout;
        let body = RequestBody {
            model: &self.settings.model,
            messages: &request.messages,
            stream: true,
            stream_options: self.settings.include_usage.then_some(StreamOptions { include_usage: true }),
            temperature: self.settings.temperature,
            max_tokens: self.settings.max_tokens,
            user: (self.settings.send_user && !request.user.is_empty()).then_some(request.user.as_str()),
        };
        let mut http_request =
            self.http.post(&self.url).header(reqwest::header::ACCEPT, "text/event-stream").json(&body);
        if let Some(key) = &self.settings.api_key {
            // `bearer_auth` marks the header sensitive, so it is redacted from reqwest's Debug.
            http_request = http_request.bearer_auth(key.expose_secret());
        }
        let response = sse::send_before(sse::send(http_request), deadline, first_token_timeout).await?;
        if !response.status().is_success() {
            return Err(sse::status_error(response, ERROR_BODY_TIMEOUT, self.api_key()).await);
        }

        let mut answer = VisibleAnswer::new(
            ThinkFilter::new(self.settings.strip_think).opened_by_prompt(self.settings.think_open_in_prompt),
            on_delta,
        );
        // Why the model stopped before its answer was done, if it said so.
        let mut cut_by: Option<&'static str> = None;
        match sse::open_body(response, deadline, first_token_timeout).await? {
            ResponseBody::Json(bytes) => {
                let json: Value = serde_json::from_slice(&bytes)
                    .map_err(|error| LlmError::Protocol(format!("response is not JSON: {error}")))?;
                if reports_an_error(&json) {
                    let message = sse::error_message(&json).unwrap_or_else(|| "error response".to_owned());
                    return Err(LlmError::Stream(message));
                }
                for choice in first_choices(&json) {
                    if let Some(text) = choice.get("message").and_then(|message| content_text(message.get("content"))) {
                        answer.push(&text)?;
                    }
                    if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                        if let Some(cut) = cut_reason(reason) {
                            cut_by = cut_by.or(Some(cut));
                            answer.cut_short();
                        }
                    }
                }
            }
            ResponseBody::Events(mut events) => {
                // Reasoning (or an inline `<think>` block) counts as the model answering for the
                // first-token deadline, though none of it is shown: a reasoning model may think
                // for longer than that deadline before its first visible word.
                let mut thinking = false;
                let mut saw_delta_text = false;
                // The standard last chunk: a finish reason with nothing in its delta. Some
                // servers put a finish reason on every chunk, or on reasoning chunks, so only
                // this one says that nothing but usage and `[DONE]` follows.
                let mut closing_chunk_seen = false;
                // When the grace after the closing chunk ends (set when it comes): counted from
                // there, not per event, so that events carrying nothing cannot hold a whole
                // answer until the total timeout.
                let mut grace_ends: Option<tokio::time::Instant> = None;
                loop {
                    let next = sse::next_json_event(
                        &mut events,
                        thinking || answer.has_started(),
                        deadline,
                        first_token_timeout,
                        "openai",
                    );
                    let next = if closing_chunk_seen {
                        // After the finish reason only a usage chunk and `[DONE]` may follow; a
                        // gateway that then neither ends nor closes the stream must not turn a
                        // whole answer into a timeout.
                        let grace_ends =
                            *grace_ends.get_or_insert_with(|| tokio::time::Instant::now() + AFTER_FINISH_GRACE);
                        match tokio::time::timeout_at(grace_ends, next).await {
                            Ok(Ok(next)) => next,
                            // The answer is whole; a connection that then breaks (a proxy that
                            // drops the chunked body's end) must not turn it into an apology.
                            Ok(Err(LlmError::Stream(error))) => {
                                let error = sse::redact(error, self.api_key());
                                debug!(backend = "openai", %error, "The stream broke after its finish reason; answer taken.");
                                None
                            }
                            Ok(Err(error)) => return Err(error),
                            Err(_elapsed) => {
                                debug!(
                                    backend = "openai",
                                    "The stream stayed open after its finish reason; answer taken."
                                );
                                None
                            }
                        }
                    } else {
                        next.await?
                    };
                    let Some((event_name, json)) = next else { break };
                    if reports_an_error(&json) || event_name.as_deref() == Some("error") {
                        let message = sse::error_message(&json).unwrap_or_else(|| "error event in stream".to_owned());
                        if closing_chunk_seen {
                            // As a break after the finish reason: the answer is whole (and may
                            // be on the user's screen already).
                            let error = sse::redact(message, self.api_key());
                            warn!(backend = "openai", %error, "An error event followed the finish reason; answer taken.");
                            break;
                        }
                        return Err(LlmError::Stream(message));
                    }
                    for choice in first_choices(&json) {
                        let progress = shows_progress(choice);
                        thinking |= progress;
                        if progress {
                            answer.progressed();
                        }
                        // NOTE: only `content` is read; `reasoning_content` / `reasoning` stay private.
                        let delta = choice.get("delta").and_then(|delta| content_text(delta.get("content")));
                        saw_delta_text |= delta.as_deref().is_some_and(|text| !text.is_empty());
                        // A whole `message` in a stream is the answer of a server that does not
                        // stream; after deltas it repeats them (some servers end a stream so).
                        let piece = delta.or_else(|| {
                            (!saw_delta_text)
                                .then(|| choice.get("message").and_then(|message| content_text(message.get("content"))))
                                .flatten()
                        });
                        let brought = progress || piece.as_deref().is_some_and(|piece| !piece.is_empty());
                        if let Some(piece) = piece {
                            answer.push(&piece)?;
                        }
                        if let Some(reason) =
                            choice.get("finish_reason").and_then(Value::as_str).filter(|r| !r.is_empty())
                        {
                            debug!(backend = "openai", finish_reason = reason, "Stream finished.");
                            closing_chunk_seen |= !brought;
                            if let Some(cut) = cut_reason(reason) {
                                cut_by = cut_by.or(Some(cut));
                                answer.cut_short();
                            }
                        }
                    }
                    if let Some(usage) = json.get("usage").filter(|usage| usage.is_object()) {
                        let prompt_tokens = usage.get("prompt_tokens").and_then(Value::as_u64);
                        let completion_tokens = usage.get("completion_tokens").and_then(Value::as_u64);
                        debug!(backend = "openai", prompt_tokens, completion_tokens, "LLM usage reported.");
                    }
                }
                // Not a finish reason on a chunk with text: some servers put one on every chunk,
                // so it does not say the stream ended where the server meant it to.
                if !(closing_chunk_seen || events.saw_done()) {
                    answer.ended_abruptly();
                    if answer.has_started() {
                        // What was shown stays (the user has seen it), but not silently: a
                        // gateway that closed after an upstream failure cut it.
                        warn!(backend = "openai", "The stream ended without its finish; the answer may be cut off.");
                    }
                }
            }
        }
        let answer = answer.finish()?;
        if let Some(finish_reason) = cut_by {
            // Delivered as it stands (the user has seen it, or would rather have it than an
            // apology), but an operator should know: a `max_tokens` too small, a filter.
            warn!(
                backend = "openai",
                finish_reason, "The model stopped before its answer was done; sent as it stands."
            );
        }
        Ok(answer)
    }
}

/// The finish reasons that say the answer was cut off (the token limit, a content filter,
/// DeepSeek's `insufficient_system_resource`), as a static string for the log.
fn cut_reason(finish_reason: &str) -> Option<&'static str> {
    ["length", "max_tokens", "content_filter", "insufficient_system_resource"]
        .into_iter()
        .find(|cut| *cut == finish_reason)
}

impl LlmBackend for OpenAiBackend {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn complete<'a>(
        &'a self,
        request: &'a CompletionRequest,
        first_token_timeout: Duration,
        on_delta: &'a mut DeltaSink,
    ) -> BoxFuture<'a, Result<String, LlmError>> {
        Box::pin(async move {
            self.complete_once(request, first_token_timeout, on_delta)
                .await
                .map_err(|error| error.redacting(self.api_key()))
        })
    }

    fn probe(&self) -> Option<BoxFuture<'_, Result<(), LlmError>>> {
        Some(Box::pin(self.probe_models()))
    }
}

impl OpenAiBackend {
    /// `GET {base_url}/models`, which every OpenAI-compatible server answers.
    async fn probe_models(&self) -> Result<(), LlmError> {
        let url = format!("{}/models", self.settings.base_url.trim_end_matches('/'));
        sse::probe(&self.http, &url, self.api_key()).await
    }

    fn api_key(&self) -> Option<&str> {
        self.settings.api_key.as_ref().map(|key| key.expose_secret())
    }
}

/// The request body; optional fields are left out entirely rather than sent as `null`, because
/// strict gateways reject fields they do not know.
#[derive(Serialize)]
struct RequestBody<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// Whether a streamed choice carries any text, visible or reasoning.
fn shows_progress(choice: &Value) -> bool {
    let Some(delta) = choice.get("delta") else { return false };
    ["content", "reasoning_content", "reasoning"].iter().any(|field| match delta.get(field) {
        Some(Value::String(text)) => !text.is_empty(),
        Some(Value::Array(parts)) => !parts.is_empty(),
        _ => false,
    })
}

/// The choices that belong to the first answer (`index` 0 or absent); `choices` of any other
/// shape (missing, null, `[]`) yields nothing.
fn first_choices(json: &Value) -> impl Iterator<Item = &Value> {
    json.get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|choice| choice.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
}

/// The text of a `content` field: a string, or an array of `{type:"text", text}` parts (some
/// providers); `null`/missing/other shapes are no text.
fn content_text(content: Option<&Value>) -> Option<String> {
    match content? {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Array(parts) => {
            let text: String = parts
                .iter()
                .filter(|part| part.get("type").and_then(Value::as_str).is_none_or(|kind| kind == "text"))
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect();
            (!text.is_empty()).then_some(text)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_may_be_null_missing_empty_or_parts() {
        assert_eq!(content_text(None), None);
        assert_eq!(content_text(Some(&Value::Null)), None);
        assert_eq!(content_text(Some(&json!(""))), None);
        assert_eq!(content_text(Some(&json!("hi"))), Some("hi".to_owned()));
        let parts = json!([{"type":"text","text":"a"},{"type":"image_url"},{"text":"b"}]);
        assert_eq!(content_text(Some(&parts)), Some("ab".to_owned()));
    }

    #[test]
    fn choices_of_other_indexes_or_shapes_are_ignored() {
        let chunk = json!({"choices":[{"index":1,"delta":{"content":"no"}},{"delta":{"content":"yes"}}]});
        let picked: Vec<_> = first_choices(&chunk).collect();
        assert_eq!(picked.len(), 1);
        assert_eq!(first_choices(&json!({"choices":null})).count(), 0);
        assert_eq!(first_choices(&json!({"choices":{}})).count(), 0);
    }

    #[test]
    fn the_request_body_leaves_out_unset_options() {
        let messages = vec![ChatMessage::new(super::super::backend::Role::User, "hi")];
        let body = RequestBody {
            model: "m",
            messages: &messages,
            stream: true,
            stream_options: None,
            temperature: None,
            max_tokens: None,
            user: None,
        };
        let json = serde_json::to_value(&body).expect("serializable");
        assert_eq!(json, json!({"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}));
    }

    #[test]
    fn settings_debug_output_never_shows_the_api_key() {
        let mut settings = OpenAiSettings::new("http://proxy-user:proxy-pass@x/v1", "m");
        settings.api_key = Some(SecretString::from("sk-very-secret"));
        let shown = format!("{settings:?}");
        assert!(!shown.contains("sk-very-secret"));
        assert!(!shown.contains("proxy-pass"), "{shown}");
        assert!(shown.contains("[REDACTED]"));
    }

    #[test]
    fn a_trailing_slash_in_the_base_url_is_tolerated() {
        let backend = OpenAiBackend::new(OpenAiSettings::new("http://x/v1/", "m"), reqwest::Client::new());
        assert_eq!(backend.url, "http://x/v1/chat/completions");
    }
}
