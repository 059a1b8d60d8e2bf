//! What every LLM backend implements, and the errors it reports.

use std::time::Duration;
use yizhan_channel_core::BoxFuture;

/// Who said a line of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The persona / instructions.
    System,
    /// The chat user.
    User,
    /// The model.
    Assistant,
}

/// One line of the conversation sent to the model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: String,
}

impl ChatMessage {
    /// A line with this role and content.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }
}

/// One completion to produce.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// System prompt first (if any), then history, then the new user message.
    pub messages: Vec<ChatMessage>,
    /// A stable, non-secret id of the end user (e.g. `wx-main:oUser123`), sent as OpenAI's
    /// `user` field where the backend accepts it, for the provider's abuse tracking.
    pub user: String,
    /// The channel kind the message came from, passed as metadata where supported.
    pub channel_kind: String,
}

/// Receives the answer's text as it streams in: visible text only (reasoning is never passed),
/// and from a backend also empty pieces, which only say the model is at work on something not
/// shown (the client takes them, and passes on text only).
pub type DeltaSink = Box<dyn FnMut(&str) + Send>;

/// Why a completion failed.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// Could not connect or the request failed before any response byte arrived.
    #[error("could not reach the LLM: {0}")]
    Connect(String),
    /// The connection failed after a request that must not be sent twice went out: the server
    /// may have done the work (see [`LlmBackend::may_repeat`]); or a started answer went quiet
    /// (no byte for twice the first-token timeout: stalled).
    #[error("lost the LLM's answer: {0}")]
    Lost(String),
    /// The server answered with an error status before streaming anything.
    #[error("LLM answered HTTP {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The server's error message (never includes our API key).
        message: String,
        /// How long the server asked to be left alone (`Retry-After` in seconds, on a 429 or
        /// 503).
        retry_after: Option<Duration>,
    },
    /// No first token within the first-token timeout.
    #[error("no first token within {0:?}")]
    FirstTokenTimeout(Duration),
    /// The whole answer took longer than the total timeout.
    #[error("no complete answer within {after:?}")]
    TotalTimeout {
        /// The total timeout.
        after: Duration,
        /// Whether any of the answer, or its reasoning, had come by then (a slow but working
        /// server).
        started: bool,
    },
    /// The stream broke or carried an error event after it started.
    #[error("LLM stream failed: {0}")]
    Stream(String),
    /// The response could not be understood.
    #[error("unexpected LLM response: {0}")]
    Protocol(String),
    /// Too many requests waiting; the caller should tell the user to retry later.
    #[error("LLM queue full ({0} waiting)")]
    Overloaded(usize),
    /// Not asked: the circuit breaker is open after a run of server failures, for about this
    /// much longer (see [`super::breaker`]).
    #[error("LLM not asked: it failed repeatedly (circuit breaker open for another {0:?})")]
    Unavailable(Duration),
}

impl LlmError {
    /// Whether retrying the same request may succeed and cannot duplicate visible output:
    /// connect errors, 429 and 5xx, all before the first byte.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect(_) => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// The same error with `secret` (the backend's API key, which a gateway may quote back in a
    /// message) replaced wherever the server's words are kept.
    pub fn redacting(self, secret: Option<&str>) -> Self {
        let clean = |text: String| super::sse::redact(text, secret);
        match self {
            Self::Connect(message) => Self::Connect(clean(message)),
            Self::Lost(message) => Self::Lost(clean(message)),
            Self::Status { status, message, retry_after } => {
                Self::Status { status, message: clean(message), retry_after }
            }
            Self::Stream(message) => Self::Stream(clean(message)),
            Self::Protocol(message) => Self::Protocol(clean(message)),
            other => other,
        }
    }

    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Lost(_) => "lost",
            Self::Status { .. } => "status",
            Self::FirstTokenTimeout(_) => "first_token_timeout",
            Self::TotalTimeout { .. } => "total_timeout",
            Self::Stream(_) => "stream",
            Self::Protocol(_) => "protocol",
            Self::Overloaded(_) => "overloaded",
            Self::Unavailable(_) => "circuit_open",
        }
    }
}

/// One way of asking a model. Implementations make exactly one HTTP attempt; retries and the
/// total timeout belong to the caller ([`LlmClient`](super::LlmClient)).
pub trait LlmBackend: Send + Sync + 'static {
    /// A short name for logs and metrics (`openai`, `lobehub`).
    fn name(&self) -> &'static str;

    /// Produces the whole answer, calling `on_delta` with each piece of visible text as it
    /// arrives (and with an empty piece when reasoning, or text held back, arrives). Must return [`LlmError::FirstTokenTimeout`] when nothing arrives within
    /// `first_token_timeout` of sending.
    fn complete<'a>(
        &'a self,
        request: &'a CompletionRequest,
        first_token_timeout: Duration,
        on_delta: &'a mut DeltaSink,
    ) -> BoxFuture<'a, Result<String, LlmError>>;

    /// Whether a request that failed with `error` (a retryable one) may be sent again. False
    /// where the server may have done the work before failing (an answer that comes whole at
    /// the end, behind a gateway's timeout): asking again could bill it twice.
    fn may_repeat(&self, _error: &LlmError) -> bool {
        true
    }

    /// A cheap request showing whether the server is reachable and takes the key, asked once at
    /// start-up so that a wrong `base_url` or key shows in the log before the first user meets
    /// the apology; `None` for a backend without one.
    fn probe(&self) -> Option<BoxFuture<'_, Result<(), LlmError>>> {
        None
    }
}
