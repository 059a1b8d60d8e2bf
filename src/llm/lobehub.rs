//! The LobeHub backend: a configured LobeHub agent through the supported external REST API
//! (`/api/v1/responses`, streamed), or a plain model through `/api/v1/chat` (not streamed).
//!
//! Invariants: Responses events are dispatched on the JSON `type` field (the SSE `event:` name is
//! only a fallback), reasoning events are ignored, and the API key only travels in a sensitive
//! `Authorization` header. The legacy `/webapi/chat/{provider}` route is deliberately not used
//! (PROTOCOLS §5: internal, obfuscated auth, unstable shape).

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use tracing::warn;
use yizhan_channel_core::BoxFuture;

use super::backend::{ChatMessage, CompletionRequest, DeltaSink, LlmBackend, LlmError, Role};
use super::sse::{self, ResponseBody};
use super::think::{ThinkFilter, VisibleAnswer};

/// How long an error body may take to arrive after an error status.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest `/api/v1/chat` body read.
const MAX_CHAT_BODY_BYTES: usize = 4 * 1024 * 1024;

/// How many content parts' deltas are told apart (see the agent route's stream loop).
const MAX_NUMBERED_PARTS: usize = 256;

/// What the LobeHub backend needs to know. Deserializable so it can sit in the config file as-is.
#[derive(Clone, Deserialize)]
pub struct LobeHubSettings {
    /// The LobeHub server root (e.g. `https://lobe.example.com`); `/api/v1/…` is appended. A
    /// trailing slash is tolerated.
    pub base_url: String,
    /// A LobeHub API key (`sk-lh-…`, scope `model:invoke`), sent as a Bearer token when set.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// The agent to run (`agt_…`). When set, `/api/v1/responses` is used so the agent's own
    /// system prompt, tools and knowledge apply; when unset, `/api/v1/chat` with `model`.
    #[serde(default)]
    pub agent_id: Option<String>,
    /// The model for `/api/v1/chat` (ignored with an agent). LobeHub's default when unset.
    #[serde(default)]
    pub model: Option<String>,
    /// The provider for `/api/v1/chat` (ignored with an agent). LobeHub's default when unset.
    #[serde(default)]
    pub provider: Option<String>,
    /// Remove a `<think>…</think>` block that opens an answer (a model behind LobeHub that
    /// inlines its reasoning).
    #[serde(default = "default_true")]
    pub strip_think: bool,
    /// Send the `user` field (`channel:openid`) on the agent route (the chat route has none).
    #[serde(default = "default_true")]
    pub send_user: bool,
}

fn default_true() -> bool {
    true
}

impl LobeHubSettings {
    /// Settings for `base_url` with no key, no agent and LobeHub's default model.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            agent_id: None,
            model: None,
            provider: None,
            strip_think: true,
            send_user: true,
        }
    }
}

impl fmt::Debug for LobeHubSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // NOTE: written by hand so the API key's presence, never its value, is shown.
        f.debug_struct("LobeHubSettings")
            // A proxy's credentials may be in it.
            .field("base_url", &crate::config::without_credentials(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "[REDACTED]"))
            .field("agent_id", &self.agent_id)
            .field("model", &self.model)
            .field("provider", &self.provider)
            .field("strip_think", &self.strip_think)
            .field("send_user", &self.send_user)
            .finish()
    }
}

/// Talks to a LobeHub 2.x server. One HTTP attempt per call; retries belong to
/// [`LlmClient`](super::client::LlmClient).
#[derive(Debug, Clone)]
pub struct LobeHubBackend {
    settings: LobeHubSettings,
    /// The server root without a trailing slash.
    base: String,
    /// Shared so all backends reuse one connection pool.
    http: reqwest::Client,
}

impl LobeHubBackend {
    /// A backend using `http` (see [`build_http_client`](super::client::build_http_client)).
    pub fn new(settings: LobeHubSettings, http: reqwest::Client) -> Self {
        let base = settings.base_url.trim_end_matches('/').to_owned();
        Self { settings, base, http }
    }

    /// The settings in use.
    pub fn settings(&self) -> &LobeHubSettings {
        &self.settings
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.post(format!("{}{path}", self.base));
        match &self.settings.api_key {
            // `bearer_auth` marks the header sensitive, so it is redacted from reqwest's Debug.
            Some(key) => request.bearer_auth(key.expose_secret()),
            None => request,
        }
    }

    /// Runs the agent via the OpenAI-Responses-shaped route.
    async fn complete_with_agent(
        &self,
        agent_id: &str,
        request: &CompletionRequest,
        first_token_timeout: Duration,
        on_delta: &mut DeltaSink,
    ) -> Result<String, LlmError> {
        let deadline = Instant::now() + first_token_timeout;
        let body = ResponsesBody {
            model: agent_id,
            stream: true,
            input: request
                .messages
                .iter()
                .map(|message| InputItem { kind: "message", role: message.role, content: &message.content })
                .collect(),
            user: (self.settings.send_user && !request.user.is_empty()).then_some(request.user.as_str()),
            metadata: Metadata { channel: &request.channel_kind },
        };
        let http_request =
            self.post("/api/v1/responses").header(reqwest::header::ACCEPT, "text/event-stream").json(&body);
        // Once sent, the agent may have run its tools and stored the turn on LobeHub's side: a
        // transport failure after that is not a reason to run it again.
        let response = sse::send_before(sse::send_once(http_request), deadline, first_token_timeout).await?;
        if !response.status().is_success() {
            return Err(sse::status_error(response, ERROR_BODY_TIMEOUT, self.api_key()).await);
        }

        let mut answer = VisibleAnswer::new(ThinkFilter::new(self.settings.strip_think), on_delta);
        match sse::open_body(response, deadline, first_token_timeout).await? {
            ResponseBody::Json(bytes) => {
                let json: Value = serde_json::from_slice(&bytes)
                    .map_err(|error| LlmError::Protocol(format!("response is not JSON: {error}")))?;
                if let Some(message) = response_failure(&json) {
                    return Err(LlmError::Stream(message));
                }
                if let Some(text) = response_text(&json) {
                    answer.push(&text)?;
                }
            }
            ResponseBody::Events(mut events) => {
                // Whether any text was taken (then `response.completed` must not repeat it).
                let mut saw_text = false;
                // The content parts whose text came as deltas (their `done` repeats it), and the
                // part text came from last (parts of another output item, such as the words
                // before and after a tool call, are set apart).
                let mut streamed_parts: HashSet<(u64, u64)> = HashSet::new();
                let mut last_part: Option<(u64, u64)> = None;
                // A delta without its indices could be any part's: every `done` is then taken
                // as a repeat once text came (the rule for servers that number nothing).
                let mut unnumbered_deltas = false;
                // An agent that reasons or calls tools before its first visible word is working:
                // such events meet the first-token deadline (see `shows_work`).
                let mut working = false;
                // The Responses protocol ends every stream with `response.completed`,
                // `.incomplete` or `.failed`; one that ends without is cut off.
                let mut ended = false;
                while let Some((event_name, json)) = sse::next_json_event(
                    &mut events,
                    working || answer.has_started(),
                    deadline,
                    first_token_timeout,
                    "lobehub",
                )
                .await?
                {
                    let kind = json.get("type").and_then(Value::as_str).or(event_name.as_deref()).unwrap_or_default();
                    if shows_work(kind, &json) {
                        working = true;
                        answer.progressed();
                    }
                    match kind {
                        "response.output_text.delta" => {
                            if let Some(delta) = json.get("delta").and_then(Value::as_str).filter(|d| !d.is_empty()) {
                                let part = content_part(&json);
                                unnumbered_deltas |= json.get("output_index").is_none();
                                // Numbers are the server's: past a few hundred parts (no answer
                                // has them), the rule for unnumbered deltas, not a set as large
                                // as the stream.
                                if streamed_parts.len() < MAX_NUMBERED_PARTS || streamed_parts.contains(&part) {
                                    streamed_parts.insert(part);
                                } else {
                                    unnumbered_deltas = true;
                                }
                                push_part(&mut answer, &mut last_part, part, delta)?;
                                saw_text = true;
                            }
                        }
                        // The whole text of one content part; only needed when no deltas came
                        // for it.
                        "response.output_text.done"
                            if !(streamed_parts.contains(&content_part(&json)) || unnumbered_deltas && saw_text) =>
                        {
                            if let Some(text) = json.get("text").and_then(Value::as_str).filter(|t| !t.is_empty()) {
                                push_part(&mut answer, &mut last_part, content_part(&json), text)?;
                                saw_text = true;
                            }
                        }
                        "response.completed" | "response.incomplete" => {
                            let response = json.get("response").unwrap_or(&Value::Null);
                            if !saw_text {
                                if let Some(text) = response_text(response) {
                                    answer.push(&text)?;
                                }
                            }
                            if kind == "response.incomplete" {
                                let reason = incomplete_reason(response);
                                if !answer.has_started() {
                                    return Err(LlmError::Stream(format!("response incomplete: {reason}")));
                                }
                                let reason = sse::redact(reason, self.api_key());
                                warn!(backend = "lobehub", %reason, "LLM answer is incomplete.");
                            }
                            ended = true;
                            break;
                        }
                        "response.failed" => {
                            let message = json
                                .get("response")
                                .and_then(response_failure)
                                .unwrap_or_else(|| "response failed".to_owned());
                            return Err(LlmError::Stream(message));
                        }
                        "error" => {
                            let message =
                                sse::error_message(&json).unwrap_or_else(|| "error event in stream".to_owned());
                            return Err(LlmError::Stream(message));
                        }
                        // A bare `{"error": …}` without a type (a proxy in front of LobeHub).
                        "" if json.get("error").is_some_and(|error| !error.is_null()) => {
                            let message =
                                sse::error_message(&json).unwrap_or_else(|| "error event in stream".to_owned());
                            return Err(LlmError::Stream(message));
                        }
                        // created / in_progress / output_item.* / reasoning.* / content_part.*
                        _ => {}
                    }
                }
                if !ended {
                    answer.ended_abruptly();
                    if !answer.has_started() {
                        return Err(LlmError::Stream("the stream ended before response.completed".to_owned()));
                    }
                    // What was shown stays (as for `response.incomplete`), but not silently.
                    warn!(
                        backend = "lobehub",
                        "The stream ended before response.completed; the answer may be cut off."
                    );
                }
            }
        }
        answer.finish()
    }

    /// Asks a plain model via `/api/v1/chat`, which does not stream: the whole answer is passed to
    /// `on_delta` once. Only the caller's total timeout bounds it: the response head comes once
    /// the whole answer is generated, so a first-token deadline would cut every long answer.
    async fn complete_with_model(
        &self,
        request: &CompletionRequest,
        on_delta: &mut DeltaSink,
    ) -> Result<String, LlmError> {
        let body = ChatBody {
            messages: &request.messages,
            model: self.settings.model.as_deref(),
            provider: self.settings.provider.as_deref(),
        };
        let http_request = self.post("/api/v1/chat").json(&body);
        // Asked again only if the model cannot have run: the answer comes whole at the end, so
        // a connection lost after sending, or a gateway's timeout (502, 504, Cloudflare's 524),
        // may come after it was generated, and billed. Only no connection, 429 and 503 (refused
        // before any work) stay retryable.
        let mut response = sse::send_once(http_request).await?;
        if !response.status().is_success() {
            return Err(sse::status_error(response, ERROR_BODY_TIMEOUT, self.api_key()).await);
        }
        let (bytes, truncated) = sse::read_body_limited(&mut response, MAX_CHAT_BODY_BYTES)
            .await
            .map_err(|error| LlmError::Stream(sse::describe_reqwest_error(error)))?;
        if truncated {
            return Err(LlmError::Protocol(format!("response body larger than {MAX_CHAT_BODY_BYTES} bytes")));
        }
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|error| LlmError::Protocol(format!("response is not JSON: {error}")))?;
        if json.get("success").and_then(Value::as_bool) != Some(true) {
            let message = sse::error_message(&json)
                .or_else(|| json.get("data").and_then(sse::error_message))
                .unwrap_or_else(|| "LobeHub reported failure without a message".to_owned());
            return Err(LlmError::Stream(message));
        }
        let content = json
            .pointer("/data/content")
            .and_then(Value::as_str)
            .ok_or_else(|| LlmError::Protocol("no data.content in the answer".to_owned()))?;
        let mut answer = VisibleAnswer::new(ThinkFilter::new(self.settings.strip_think), on_delta);
        answer.push(content)?;
        answer.finish()
    }
}

impl LlmBackend for LobeHubBackend {
    fn name(&self) -> &'static str {
        "lobehub"
    }

    fn complete<'a>(
        &'a self,
        request: &'a CompletionRequest,
        first_token_timeout: Duration,
        on_delta: &'a mut DeltaSink,
    ) -> BoxFuture<'a, Result<String, LlmError>> {
        Box::pin(async move {
            let result = match self.settings.agent_id.as_deref().filter(|id| !id.is_empty()) {
                Some(agent_id) => self.complete_with_agent(agent_id, request, first_token_timeout, on_delta).await,
                None => self.complete_with_model(request, on_delta).await,
            };
            result.map_err(|error| error.redacting(self.api_key()))
        })
    }

    /// A 5xx other than 503 (a gateway's timeout, Cloudflare's 524) may come after LobeHub took
    /// the request: the chat route's answer, which comes whole at the end, may have been
    /// generated (and billed), and an agent may have run its tools and stored the turn. Asked
    /// again only when refused before any work (429, 503) or not reached at all.
    fn may_repeat(&self, error: &LlmError) -> bool {
        !matches!(error, LlmError::Status { status, .. } if *status >= 500 && *status != 503)
    }

    fn probe(&self) -> Option<BoxFuture<'_, Result<(), LlmError>>> {
        // The route LobeHub offers for this (PROTOCOLS §5).
        let url = format!("{}/api/v1/health", self.base);
        Some(Box::pin(async move { sse::probe(&self.http, &url, self.api_key()).await }))
    }
}

impl LobeHubBackend {
    fn api_key(&self) -> Option<&str> {
        self.settings.api_key.as_ref().map(|key| key.expose_secret())
    }
}

/// Which content part a Responses event is about: its `output_index` and `content_index`.
fn content_part(event: &Value) -> (u64, u64) {
    let index = |name: &str| event.get(name).and_then(Value::as_u64).unwrap_or(0);
    (index("output_index"), index("content_index"))
}

/// Pushes `text` of content `part`, after a blank line when the text before it came from
/// another output item.
fn push_part(
    answer: &mut VisibleAnswer<'_>,
    last_part: &mut Option<(u64, u64)>,
    part: (u64, u64),
    text: &str,
) -> Result<(), LlmError> {
    if last_part.is_some_and(|last| last.0 != part.0) {
        answer.push("\n\n")?;
    }
    *last_part = Some(part);
    answer.push(text)
}

/// Whether a Responses event shows the agent producing something: any delta (text, reasoning,
/// tool arguments), reasoning, or an output item other than the answer's message (a tool call,
/// which may run for a while without further events). Scaffolding (`created`, `in_progress`,
/// the message item and its content part being opened) does not count.
fn shows_work(kind: &str, json: &Value) -> bool {
    kind.ends_with(".delta")
        || kind.contains("reasoning")
        || (kind.starts_with("response.output_item.")
            && json.pointer("/item/type").and_then(Value::as_str).is_some_and(|item| item != "message"))
}

/// `/api/v1/responses` request.
#[derive(Serialize)]
struct ResponsesBody<'a> {
    /// The agent id: LobeHub resolves `model` to the agent.
    model: &'a str,
    stream: bool,
    input: Vec<InputItem<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    metadata: Metadata<'a>,
}

/// One conversation line as a Responses `message` input item.
///
/// Our system prompt goes out with role `system`, not `developer`: the Responses schema accepts
/// both, but `system` is understood by every provider LobeHub may forward to, while `developer`
/// is OpenAI-specific. The agent's own system prompt still applies on LobeHub's side.
#[derive(Serialize)]
struct InputItem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    role: Role,
    content: &'a str,
}

#[derive(Serialize)]
struct Metadata<'a> {
    channel: &'a str,
}

/// `/api/v1/chat` request; unset model/provider are left out so LobeHub's defaults apply.
#[derive(Serialize)]
struct ChatBody<'a> {
    messages: &'a [ChatMessage],
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
}

/// The answer text of a Responses `response` object: `output_text`, else the concatenated
/// `output[*].content[*].text` of `output_text` parts.
fn response_text(response: &Value) -> Option<String> {
    if let Some(text) = response.get("output_text").and_then(Value::as_str).filter(|text| !text.is_empty()) {
        return Some(text.to_owned());
    }
    let text: String = response
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("content").and_then(Value::as_array))
        .flatten()
        .filter(|part| part.get("type").and_then(Value::as_str) == Some("output_text"))
        .filter_map(|part| part.get("text").and_then(Value::as_str))
        .collect();
    (!text.is_empty()).then_some(text)
}

/// The failure message of a Responses `response` object, if it failed.
fn response_failure(response: &Value) -> Option<String> {
    let has_error = response.get("error").is_some_and(|error| !error.is_null());
    let failed = response.get("status").and_then(Value::as_str) == Some("failed");
    if !has_error && !failed {
        return None;
    }
    Some(sse::error_message(response).unwrap_or_else(|| "response failed".to_owned()))
}

/// Why a response is incomplete (`incomplete_details.reason`, e.g. `max_output_tokens`), cut to
/// the length of an error message: it is the server's text, logged and kept in errors.
fn incomplete_reason(response: &Value) -> String {
    let reason = response.pointer("/incomplete_details/reason").and_then(Value::as_str).unwrap_or("unknown");
    sse::truncate_chars(reason, sse::MAX_ERROR_MESSAGE_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn output_text_is_preferred_over_output_parts() {
        let response = json!({"output_text":"direct","output":[{"content":[{"type":"output_text","text":"parts"}]}]});
        assert_eq!(response_text(&response), Some("direct".to_owned()));
    }

    #[test]
    fn output_parts_of_type_output_text_are_concatenated_when_output_text_is_absent() {
        let response = json!({"output":[
            {"type":"reasoning","content":[{"type":"reasoning_text","text":"hidden"}]},
            {"type":"message","content":[{"type":"output_text","text":"Hel"},{"type":"refusal","refusal":"x"}]},
            {"type":"message","content":[{"type":"output_text","text":"lo"}]}
        ]});
        assert_eq!(response_text(&response), Some("Hello".to_owned()));
        assert_eq!(response_text(&json!({"output":[]})), None);
        assert_eq!(response_text(&Value::Null), None);
    }

    #[test]
    fn a_failed_response_reports_its_error_message() {
        let failed = json!({"status":"failed","error":{"code":"server_error","message":"model exploded"}});
        assert_eq!(response_failure(&failed), Some("model exploded".to_owned()));
        assert_eq!(response_failure(&json!({"status":"completed","error":null})), None);
    }

    #[test]
    fn the_system_prompt_becomes_a_system_message_item() {
        let item = InputItem { kind: "message", role: Role::System, content: "Be brief." };
        let json = serde_json::to_value(&item).expect("serializable");
        assert_eq!(json, json!({"type":"message","role":"system","content":"Be brief."}));
    }

    #[test]
    fn settings_debug_output_never_shows_the_api_key() {
        let mut settings = LobeHubSettings::new("http://proxy-user:proxy-pass@x");
        settings.api_key = Some(SecretString::from("sk-lh-secret"));
        let shown = format!("{settings:?}");
        assert!(!shown.contains("sk-lh-secret"));
        assert!(!shown.contains("proxy-pass"), "{shown}");
    }
}
