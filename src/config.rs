//! Typed configuration: a TOML file, overridden by `YIZHAN__SECTION__KEY` environment variables.
//!
//! Invariants: a `Config` that loaded is valid (every bound positive, every channel id unique and
//! well-formed), and a failure names the offending key. Secrets are `SecretString`s, which never
//! print.
//!
//! Environment overrides: `YIZHAN__LLM__API_KEY=sk-…` sets `[llm] api_key`;
//! `YIZHAN__CHANNELS__<ID>__APP_SECRET=…` sets `app_secret` of the `[[channels]]` entry whose id
//! is `<ID>` (case-insensitive, `-` written as `_`). A value is read as TOML (a number, a boolean,
//! an array) unless the file already holds that key as a string or the key's name is that of a
//! secret or identifier (`is_string_key`); a value read that way that a core key's type refuses
//! is taken as text instead (`YIZHAN__MESSAGES__AI_LABEL=false`; a channel's own keys keep the
//! type they are read as). Quote a value (`'"123"'`) to force
//! a string.

use anyhow::{anyhow, bail, Context};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use yizhan_channel_core::{ChannelId, ChannelSettings};

/// The whole configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP server.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where state lives.
    #[serde(default)]
    pub store: StoreConfig,
    /// The model.
    pub llm: LlmConfig,
    /// Conversations.
    #[serde(default)]
    pub session: SessionConfig,
    /// Sending answers.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// What users see in the hub's own words.
    #[serde(default)]
    pub messages: MessagesConfig,
    /// The platform accounts.
    #[serde(default)]
    pub channels: Vec<ChannelConfig>,
}

/// `[server]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port to listen on (`0.0.0.0:8080`; port 0 picks a free one).
    pub bind: String,
    /// Largest webhook body accepted; larger gets 413.
    pub body_limit_bytes: usize,
    /// How long a webhook body may take to arrive after its headers; slower gets 408.
    pub body_timeout_ms: u64,
    /// HTTP worker threads (at most 1024); 0 means one per core.
    pub workers: usize,
    /// How long a graceful shutdown may take before in-flight work is abandoned to recovery.
    pub shutdown_timeout_secs: u64,
    /// A connection with no request in progress for this long is closed: one left holding a
    /// half-sent request head, which actix-web would keep forever (see `http::stalled_connections`).
    pub stalled_connection_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0:8080".into(),
            body_limit_bytes: 1024 * 1024,
            body_timeout_ms: 5000,
            workers: 0,
            shutdown_timeout_secs: 10,
            stalled_connection_secs: 60,
        }
    }
}

/// Which store implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In process memory: fast, lost on restart. For tests and trials.
    Memory,
    /// Embedded SQLite file: durable, the default.
    Sqlite,
}

/// `[store]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `memory` or `sqlite`.
    pub kind: StoreKind,
    /// The SQLite file (created with its directory on first run).
    pub path: PathBuf,
    /// How long a platform message id is remembered to recognise retries. Must exceed the
    /// longest platform retry interval (Feishu retries for hours).
    pub dedupe_ttl_secs: u64,
    /// Conversation history and finished journal entries older than this are pruned.
    pub retention_days: u64,
    /// SQLite: `power_loss` (fsync before acknowledging) or `process_crash` (no fsync; survives
    /// `kill -9` but not power loss).
    pub durability: crate::store::Durability,
    /// SQLite: about how long, in microseconds, a batch of the inbound log (accepted messages,
    /// finishes) waits for more before it is written and flushed (0: at once); fewer, larger
    /// batches leave the HTTP workers more CPU under load (`SqliteOptions::commit_delay`). At
    /// most [`MAX_COMMIT_DELAY_US`].
    pub commit_delay_us: u64,
}

/// The longest `store.commit_delay_us` taken: every acknowledgement waits up to this long.
pub const MAX_COMMIT_DELAY_US: u64 = 100_000;

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Sqlite,
            path: PathBuf::from("data/yizhan.db"),
            dedupe_ttl_secs: 24 * 3600,
            retention_days: 30,
            durability: crate::store::Durability::PowerLoss,
            commit_delay_us: u64::try_from(crate::store::COMMIT_DELAY.as_micros()).unwrap_or(0),
        }
    }
}

/// Which LLM API to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmBackendKind {
    /// OpenAI Chat Completions (OpenAI, Ollama, vLLM, DeepSeek, Qwen, one-api …).
    Openai,
    /// LobeHub's external REST API (`/api/v1/responses` with an agent, `/api/v1/chat` without).
    Lobehub,
}

/// `[llm]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// `openai` or `lobehub`.
    #[serde(default = "default_backend")]
    pub backend: LlmBackendKind,
    /// For `openai`: the API root ending in `/v1`; for `lobehub`: the server root.
    pub base_url: String,
    /// Bearer key; better set through `YIZHAN__LLM__API_KEY`.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// Model name (`openai`), or model for LobeHub's `/api/v1/chat`.
    #[serde(default)]
    pub model: Option<String>,
    /// LobeHub agent id (`agt_…`): selects `/api/v1/responses`.
    #[serde(default)]
    pub agent_id: Option<String>,
    /// LobeHub provider for `/api/v1/chat`.
    #[serde(default)]
    pub provider: Option<String>,
    /// The default persona; channels may set their own. Unset: a Chinese assistant persona,
    /// except for a LobeHub agent, which has its own (see [`LlmConfig::system_prompt`]).
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Requests to the model at once (at most 1048576).
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Requests allowed to wait for a slot; beyond that users get the `busy` message.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
    /// TCP/TLS connect timeout.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time to the model's first token, reasoning included (a reasoning model may think long
    /// before its first visible word); after that, twice this without a byte received (keep-alive
    /// comments count) ends the answer as stalled, and `total_timeout_secs` applies.
    #[serde(default = "default_first_token_timeout_secs")]
    pub first_token_timeout_secs: u64,
    /// Time to the whole answer, retries included.
    #[serde(default = "default_total_timeout_secs")]
    pub total_timeout_secs: u64,
    /// Retries on connect errors, 429 and 5xx before the first byte.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Sampling temperature, when set.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Answer length cap, when set.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Ask for the usage chunk (`stream_options.include_usage`); some gateways reject it.
    #[serde(default)]
    pub include_usage: bool,
    /// Send the OpenAI `user` field (Ollama ignores it; some gateways reject it).
    #[serde(default = "default_true")]
    pub send_user: bool,
    /// Remove `<think>…</think>` from answers of models that inline their reasoning.
    #[serde(default = "default_true")]
    pub strip_think: bool,
    /// The model's chat template opens the `<think>` block in the prompt (QwQ, DeepSeek-R1 or
    /// Qwen3 thinking models served without a reasoning parser): only `</think>` is streamed.
    #[serde(default)]
    pub think_open_in_prompt: bool,
    /// LLM calls failing in a row (no connection, 429/5xx, timeouts) after which
    /// the circuit breaker stops asking for `breaker_cooldown_secs` and users get the apology at
    /// once; 0 disables it.
    #[serde(default = "default_breaker_threshold")]
    pub breaker_threshold: u32,
    /// How long the open breaker refuses calls before one probe is let through.
    #[serde(default = "default_breaker_cooldown_secs")]
    pub breaker_cooldown_secs: u64,
}

fn default_breaker_threshold() -> u32 {
    5
}
fn default_breaker_cooldown_secs() -> u64 {
    30
}

fn default_backend() -> LlmBackendKind {
    LlmBackendKind::Openai
}
fn default_system_prompt() -> String {
    "你是一个乐于助人的 AI 助手。请用简洁、友好的中文回答。".into()
}

impl LlmConfig {
    /// The persona sent first in every request: the configured one, or by default a Chinese
    /// assistant persona, except for a LobeHub agent (`agent_id`), whose own system prompt is
    /// the point of that route and would be contradicted by ours.
    pub fn system_prompt(&self) -> String {
        match &self.system_prompt {
            Some(prompt) => prompt.clone(),
            None if self.backend == LlmBackendKind::Lobehub
                && self.agent_id.as_deref().is_some_and(|id| !id.trim().is_empty()) =>
            {
                String::new()
            }
            None => default_system_prompt(),
        }
    }
}
fn default_max_concurrency() -> usize {
    16
}
fn default_max_waiting() -> usize {
    512
}
fn default_connect_timeout_ms() -> u64 {
    3_000
}
fn default_first_token_timeout_secs() -> u64 {
    30
}
fn default_total_timeout_secs() -> u64 {
    120
}
fn default_max_retries() -> u32 {
    2
}
fn default_true() -> bool {
    true
}

impl LlmConfig {
    /// Connect timeout as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

/// `[session]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Earlier turns (a question and its answer) sent with each question.
    pub history_max_turns: usize,
    /// Characters of earlier turns sent at most; the oldest turns go first.
    pub history_max_chars: usize,
    /// A conversation's actor retires after this long without messages (its history stays in
    /// the store).
    pub idle_timeout_secs: u64,
    /// Messages one user may have waiting behind the one being answered; more get `busy`.
    pub max_pending: usize,
    /// Conversations kept in memory at once (each an actor and its history window, until
    /// `idle_timeout_secs` of silence); a message opening one more gets `busy`.
    pub max_sessions: usize,
    /// Dedicated session threads (at most 1024); 0 runs each session on the HTTP worker that first saw its
    /// conversation, which avoids a cross-thread wake-up per message (measured: see README).
    pub threads: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            history_max_turns: 10,
            history_max_chars: 6_000,
            idle_timeout_secs: 600,
            max_pending: 16,
            max_sessions: 100_000,
            threads: 0,
        }
    }
}

/// `[delivery]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Sends of one part before it is given up (recorded as failed, or parked in `auto` mode); a
    /// send that may have arrived is sent once more at most, then recorded failed, never parked.
    /// The default's retries span about 2.5–5
    /// minutes, so a platform API's brief outage does not cost answers.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt, with jitter.
    pub retry_base_delay_ms: u64,
    /// Longest retry delay. A wait the platform asks for (`retry_after`) is not cut to it: it
    /// pauses the channel's sends for as long as asked (see `delivery::AccountPause`).
    pub retry_max_delay_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self { max_attempts: 12, retry_base_delay_ms: 500, retry_max_delay_ms: 60_000 }
    }
}

/// `[messages]`: the hub's own words to users.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessagesConfig {
    /// When the LLM queue is full.
    pub busy: String,
    /// When the LLM failed.
    pub apology: String,
    /// After `/reset`.
    pub reset_done: String,
    /// Words that clear the conversation.
    pub reset_commands: Vec<String>,
    /// For messages the bot cannot read (pictures, files …).
    pub unsupported: String,
    /// For a new follower; says that the assistant is an AI.
    pub welcome: String,
    /// For a voice message the platform could not transcribe.
    pub voice_unrecognized: String,
    /// Put before the first AI answer to each user (empty: never).
    pub ai_label: String,
    /// Put `ai_label` before every AI answer, not only the first.
    pub ai_label_every_reply: bool,
    /// Words that fetch the rest of a parked answer.
    pub continue_commands: Vec<String>,
    /// Appended when the rest of an answer waits for the continue word.
    pub more_hint: String,
    /// Put before an earlier answer delivered late, with the user's next message.
    pub parked_prefix: String,
    /// Answer to the continue word when nothing is parked.
    pub nothing_parked: String,
    /// Left in a streamed card (Feishu) whose final text could not be written, when the answer
    /// is sent as messages instead.
    pub answer_below: String,
}

impl Default for MessagesConfig {
    fn default() -> Self {
        Self {
            busy: "当前咨询人数较多，请稍后再试。".into(),
            apology: "抱歉，AI 助手暂时无法回答，请稍后再试。".into(),
            reset_done: "好的，已清空对话记录，我们重新开始吧。".into(),
            reset_commands: vec!["/reset".into(), "重置".into(), "清空对话".into()],
            unsupported: "抱歉，我目前只能理解文字消息，请用文字描述你的问题。".into(),
            welcome: "你好！我是 AI 助手（回答由人工智能生成），有什么可以帮你？".into(),
            voice_unrecognized: "抱歉，没有听清你的语音，请发送文字消息。".into(),
            ai_label: "「以下内容由AI生成」".into(),
            ai_label_every_reply: false,
            continue_commands: vec!["继续".into()],
            more_hint: "（回复「继续」查看剩余内容）".into(),
            parked_prefix: "【你上一条消息的回复】".into(),
            nothing_parked: "没有待查看的内容了，请直接提问吧。".into(),
            answer_below: "（完整回答见下方消息）".into(),
        }
    }
}

/// How a channel answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyMode {
    /// Acknowledge at once, answer through the platform's send API.
    Push,
    /// Answer only inside the webhook response (accounts without send permission); what does
    /// not fit waits for the user's next message or the continue word.
    Passive,
    /// Answer inside the webhook response when ready in time, else through the send API. The
    /// default for platforms with passive replies (WeChat).
    Auto,
}

/// What a menu button does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MenuAction {
    /// Answer with this fixed text.
    #[serde(default)]
    pub reply: Option<String>,
    /// Ask the model this, as if the user had typed it.
    #[serde(default)]
    pub prompt: Option<String>,
}

/// One `[[channels]]` entry: the keys the core reads, plus the channel's own keys.
#[derive(Debug)]
pub struct ChannelConfig {
    /// What the core reads.
    pub core: ChannelCoreConfig,
    /// The channel's own keys, for its parser (its `Debug` shows key names only).
    pub settings: ChannelSettings,
}

/// The keys of a `[[channels]]` entry that the core reads.
#[derive(Debug, Deserialize)]
pub struct ChannelCoreConfig {
    /// Appears in the webhook URL.
    pub id: String,
    /// Selects the channel implementation.
    pub kind: String,
    /// This account's persona; falls back to `[llm] system_prompt`.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// How answers go back; default `auto` where the platform has passive replies, else `push`.
    #[serde(default)]
    pub reply_mode: Option<ReplyMode>,
    /// Override of the platform's passive-reply window (tests; proxies that add latency).
    #[serde(default)]
    pub passive_window_ms: Option<u64>,
    /// Attempts stop taking the answer this long before their deadline; the last one then
    /// answers `success`, or with the user's oldest parked answer.
    #[serde(default = "default_passive_margin_ms")]
    pub passive_margin_ms: u64,
    /// Parts the send API may carry per user message; default 5 on platforms with passive
    /// replies (the 公众号 customer-service quota), unlimited elsewhere; 0 means unlimited.
    #[serde(default)]
    pub send_quota_per_message: Option<usize>,
    /// Menu keys (WeChat CLICK, WeCom click) mapped to a fixed reply or a prompt.
    #[serde(default)]
    pub menu: std::collections::HashMap<String, MenuAction>,
    /// In group chats: one conversation per group (`shared`) or per member (`per_user`).
    #[serde(default)]
    pub group_context: GroupContext,
    /// Every other key: the channel's own, moved to [`ChannelSettings::table`] (so empty once
    /// loaded), where the built-in channels refuse keys they do not know (a misspelt key is an
    /// error, not a silently ignored setting).
    #[serde(flatten)]
    pub channel_keys: toml::Table,
}

/// Whose context a group message continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupContext {
    /// Everyone in the group shares one conversation.
    #[default]
    Shared,
    /// Each member has their own conversation within the group.
    PerUser,
}

fn default_passive_margin_ms() -> u64 {
    500
}

pub use yizhan_channel_common::api::without_credentials;

/// Values of the example config that are not placeholders by their look (an AES key must be
/// 43 characters of base64) and that no real account has.
const EXAMPLE_VALUES: &[&str] = &["jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"];

/// Brackets the key inside a `[[channels]]` entry at the start of an error message, for
/// [`key_error`] to append to the entry's path. A control character: no serde message has one.
const NESTED_KEY: char = '\u{1f}';

/// "config key `path`: message" for a deserialisation error at `path`: with the key inside a
/// channel entry appended (see [`NESTED_KEY`]), and a missing field named as the key it is
/// (serde says "missing field `llm`" at the path `.`, the table holding it).
fn key_error(path: &str, message: &str) -> String {
    // toml's messages go on with "\nin `table`" (the path says where) and a line break.
    let first_line = message.lines().next().unwrap_or_default();
    let message = yizhan_channel_core::without_value(first_line);
    let missing = yizhan_channel_core::missing_field(&message);
    match (missing, path) {
        (Some(field), ".") => format!("config key `{field}` is missing"),
        (Some(field), _) => format!("config key `{path}.{field}` is missing"),
        (None, _) => format!("config key `{path}`: {message}"),
    }
}

/// The full path of a deserialisation error at `path` and its message: the key inside a
/// channel entry, if the message carries one (see [`NESTED_KEY`]), appended to the entry's.
fn nested_path(path: String, message: String) -> (String, String) {
    match message.strip_prefix(NESTED_KEY).and_then(|rest| rest.split_once(NESTED_KEY)) {
        Some((".", inner_message)) => (path, inner_message.to_owned()),
        Some((inner, inner_message)) => (format!("{path}.{inner}"), inner_message.to_owned()),
        None => (path, message),
    }
}

impl<'de> Deserialize<'de> for ChannelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let table = toml::Value::deserialize(deserializer)?;
        // The key inside the entry travels in the message (see `NESTED_KEY`): serde's own path
        // stops at the entry, `channels[2]`.
        let mut core: ChannelCoreConfig = serde_path_to_error::deserialize(table).map_err(|error| {
            let key = error.path().to_string();
            D::Error::custom(format!("{NESTED_KEY}{key}{NESTED_KEY}{}", error.into_inner()))
        })?;
        let id = ChannelId::parse(&core.id).map_err(D::Error::custom)?;
        // Moved, not copied: they hold the channel's secrets, and only `ChannelSettings` keeps
        // them out of `Debug` output.
        let json = serde_json::to_value(std::mem::take(&mut core.channel_keys)).map_err(D::Error::custom)?;
        let settings = ChannelSettings { id, kind: core.kind.clone(), table: json };
        Ok(Self { core, settings })
    }
}

/// How long a built-in platform retries a webhook it got no answer to (PROTOCOLS): Feishu up to
/// four times over about seven hours (15 s, 5 min, 1 h, 6 h), WeChat and WeCom three times
/// within seconds. Plugins' platforms are not known here.
fn platform_retry_span(kind: &str) -> Option<Duration> {
    match kind {
        "feishu" => Some(Duration::from_secs(7 * 3600 + 10 * 60)),
        "wechat_mp" | "wecom" => Some(Duration::from_secs(60)),
        _ => None,
    }
}

/// The most threads `server.workers` or `session.threads` may ask for.
const MAX_THREADS: usize = 1024;

/// The most LLM requests at once `llm.max_concurrency` may allow: far beyond any model
/// server's, and far within what a semaphore can count.
const MAX_LLM_CONCURRENCY: usize = 1 << 20;

impl Config {
    /// Reads `path`, applies the process environment's overrides, and validates.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => bail!(
                "config file {} not found: pass --config PATH or set YIZHAN_CONFIG (start from \
                 examples/yizhan.example.toml)",
                path.display()
            ),
            Err(error) => return Err(error).with_context(|| format!("Failed to read config file {}", path.display())),
        };
        Self::from_toml(&text, overrides_from_env()?).with_context(|| format!("Invalid config file {}", path.display()))
    }

    /// Parses TOML text with the given environment overrides (tests pass their own).
    pub fn from_toml(text: &str, env: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Self> {
        // Only the position and the parser's message: its default display quotes the line,
        // which may hold a secret.
        let value: toml::Value = toml::from_str(text).map_err(|error| {
            let at = error.span().map(|span| line_and_column(text, span.start));
            match at {
                Some((line, column)) => {
                    anyhow!("Failed to parse TOML at line {line}, column {column}: {}", error.message())
                }
                None => anyhow!("Failed to parse TOML: {}", error.message()),
            }
        })?;
        let overrides: Vec<(String, String)> =
            env.into_iter().filter(|(name, _)| name.starts_with("YIZHAN__")).collect();
        // Overrides read as typed values that the key's type refused: applied as text instead.
        let mut as_text: HashSet<usize> = HashSet::new();
        // What the typed reading of each such key met: the error to report if the text fails too
        // (`-1` for a count is better told as an invalid value than as an unexpected string).
        let mut typed_errors: std::collections::HashMap<String, String> = std::collections::HashMap::new();
        let mut config: Config = loop {
            let mut attempt = value.clone();
            let mut typed_at: Vec<(String, usize)> = Vec::new();
            for (index, (name, raw)) in overrides.iter().enumerate() {
                let path = name.strip_prefix("YIZHAN__").unwrap_or(name);
                let typed = apply_override(&mut attempt, path, raw, as_text.contains(&index))
                    .with_context(|| format!("Failed to apply environment variable {name}"))?;
                if let Some(serde_path) = typed {
                    typed_at.push((serde_path, index));
                }
            }
            match serde_path_to_error::deserialize::<_, Config>(attempt) {
                Ok(config) => break config,
                Err(error) => {
                    let (path, message) = nested_path(error.path().to_string(), error.into_inner().to_string());
                    // The last override of a key is the one that counts.
                    match typed_at.iter().rev().find(|(at, _)| *at == path) {
                        Some((_, index)) if as_text.insert(*index) => {
                            typed_errors.insert(path, message);
                            continue;
                        }
                        _ => {
                            let message = typed_errors.remove(&path).unwrap_or(message);
                            bail!("{}", key_error(&path, &message))
                        }
                    }
                }
            }
        };
        // `YIZHAN__LLM__API_KEY=` (an empty variable, as compose files leave them) means none,
        // not an empty `Authorization: Bearer`.
        if config.llm.api_key.as_ref().is_some_and(|key| key.expose_secret().is_empty()) {
            config.llm.api_key = None;
        }
        config.validate()?;
        Ok(config)
    }

    /// The channel keys still holding one of the example config's placeholders (a
    /// `replace-with-…` text, or the sample AES key from WeCom's documentation), named
    /// `channels[id].key`: a newcomer's config loads with them, but the platform refuses
    /// every call, or every callback fails its check.
    pub fn placeholders(&self) -> Vec<String> {
        let mut found = Vec::new();
        for entry in &self.channels {
            let Some(table) = entry.settings.table.as_object() else { continue };
            for (key, value) in table {
                let Some(text) = value.as_str() else { continue };
                if text.starts_with("replace-with-") || EXAMPLE_VALUES.contains(&text) {
                    found.push(format!("channels[{}].{key}", entry.core.id));
                }
            }
        }
        found
    }

    /// What the start logs and `yizhan check` prints as warnings: placeholders left from the
    /// example, and a dedupe window shorter than a channel's platform retries.
    pub fn warnings(&self) -> Vec<String> {
        let placeholders = self.placeholders().into_iter().map(|key| {
            format!(
                "config key `{key}` is still the example's placeholder; that channel cannot work until it is replaced"
            )
        });
        let short_dedupe = self.dedupe_shorter_than_retries().into_iter().map(|(channel, retries_for)| {
            format!(
                "config key `store.dedupe_ttl_secs` ({}) is shorter than channel `{channel}`'s platform retries a webhook ({} s): a late retry would be answered again",
                self.store.dedupe_ttl_secs,
                retries_for.as_secs()
            )
        });
        placeholders.chain(short_dedupe).collect()
    }

    /// The channels whose platform goes on retrying an unanswered webhook for longer than
    /// `store.dedupe_ttl_secs`, with how long it does: a retry that comes after the claim lapsed
    /// is answered again (for the start-up and `check` warnings).
    pub fn dedupe_shorter_than_retries(&self) -> Vec<(String, Duration)> {
        let ttl = Duration::from_secs(self.store.dedupe_ttl_secs);
        self.channels
            .iter()
            .filter_map(|entry| {
                let retries_for = platform_retry_span(&entry.settings.kind)?;
                (ttl < retries_for).then(|| (entry.core.id.clone(), retries_for))
            })
            .collect()
    }

    fn validate(&self) -> anyhow::Result<()> {
        let positive = [
            ("server.body_limit_bytes", self.server.body_limit_bytes as u64),
            ("server.body_timeout_ms", self.server.body_timeout_ms),
            ("server.stalled_connection_secs", self.server.stalled_connection_secs),
            ("llm.max_concurrency", self.llm.max_concurrency as u64),
            ("llm.first_token_timeout_secs", self.llm.first_token_timeout_secs),
            ("llm.total_timeout_secs", self.llm.total_timeout_secs),
            ("llm.connect_timeout_ms", self.llm.connect_timeout_ms),
            ("session.idle_timeout_secs", self.session.idle_timeout_secs),
            ("session.max_pending", self.session.max_pending as u64),
            ("session.max_sessions", self.session.max_sessions as u64),
            ("delivery.max_attempts", u64::from(self.delivery.max_attempts)),
            ("store.dedupe_ttl_secs", self.store.dedupe_ttl_secs),
        ];
        for (key, value) in positive {
            if value == 0 {
                bail!("config key `{key}` must be greater than 0");
            }
        }
        // Each is an OS thread started at once; a typo's million would fail the start with a
        // panic in the runtime instead of an error naming the key.
        for (key, value) in [("server.workers", self.server.workers), ("session.threads", self.session.threads)] {
            if value > MAX_THREADS {
                bail!("config key `{key}` is {value}; at most {MAX_THREADS} threads (0: one per core, or none)");
            }
        }
        if self.store.commit_delay_us > MAX_COMMIT_DELAY_US {
            bail!(
                "config key `store.commit_delay_us` is {} µs; at most {MAX_COMMIT_DELAY_US} (every acknowledgement waits up to that long)",
                self.store.commit_delay_us
            );
        }
        // A semaphore's permits; beyond its maximum the LLM actor would panic at its start and
        // every user get the apology, so "unlimited" is refused here, by name.
        if self.llm.max_concurrency > MAX_LLM_CONCURRENCY {
            bail!("config key `llm.max_concurrency` is {}; at most {MAX_LLM_CONCURRENCY}", self.llm.max_concurrency);
        }
        if self.llm.base_url.trim().is_empty() {
            bail!("config key `llm.base_url` must not be empty");
        }
        if self.llm.base_url.trim() != self.llm.base_url {
            // Sent as written, a trailing space would be part of every request's path.
            bail!("config key `llm.base_url` has spaces or line breaks around it");
        }
        // Caught here, not at the first message: reqwest would refuse each request before sending
        // it, and every user would get the apology.
        if let Some(problem) = yizhan_channel_common::api::base_url_problem(&self.llm.base_url) {
            bail!("config key `llm.base_url`: {problem}");
        }
        if let Some(key) = &self.llm.api_key {
            // Not quoted: it is a secret. A trailing newline (a key read from a file) is the usual cause.
            if reqwest::header::HeaderValue::from_str(&format!("Bearer {}", key.expose_secret())).is_err() {
                bail!("config key `llm.api_key` cannot be sent in an HTTP header (a line break or control character?)");
            }
        }
        match self.llm.backend {
            LlmBackendKind::Openai if self.llm.model.as_deref().unwrap_or("").is_empty() => {
                bail!("config key `llm.model` is required for the openai backend")
            }
            _ => {}
        }
        // Each would make every request fail, or be ignored without a word; refused here
        // rather than found in the answers.
        // OpenAI's range, which most compatible servers keep (LobeHub is sent no temperature).
        let openai = self.llm.backend == LlmBackendKind::Openai;
        if let Some(temperature) = self.llm.temperature.filter(|t| openai && !(0.0..=2.0).contains(t)) {
            bail!("config key `llm.temperature`: {temperature} is outside 0 to 2, which OpenAI's API refuses");
        }
        if self.llm.max_tokens == Some(0) {
            bail!("config key `llm.max_tokens` is 0: no answer would have room for a word");
        }
        if self.llm.think_open_in_prompt && !self.llm.strip_think {
            bail!("config key `llm.think_open_in_prompt` needs `llm.strip_think = true`: without it the reasoning is shown");
        }
        if self.llm.think_open_in_prompt && !openai {
            bail!("config key `llm.think_open_in_prompt` is for the openai backend; LobeHub sends no reasoning text");
        }
        let seconds = |ms: u64| ms / 1000;
        let mut durations = vec![
            ("server.body_timeout_ms".to_owned(), seconds(self.server.body_timeout_ms)),
            ("server.shutdown_timeout_secs".to_owned(), self.server.shutdown_timeout_secs),
            ("server.stalled_connection_secs".to_owned(), self.server.stalled_connection_secs),
            ("store.dedupe_ttl_secs".to_owned(), self.store.dedupe_ttl_secs),
            ("store.retention_days".to_owned(), self.store.retention_days.saturating_mul(86_400)),
            ("llm.connect_timeout_ms".to_owned(), seconds(self.llm.connect_timeout_ms)),
            ("llm.first_token_timeout_secs".to_owned(), self.llm.first_token_timeout_secs),
            ("llm.total_timeout_secs".to_owned(), self.llm.total_timeout_secs),
            ("llm.breaker_cooldown_secs".to_owned(), self.llm.breaker_cooldown_secs),
            ("session.idle_timeout_secs".to_owned(), self.session.idle_timeout_secs),
            ("delivery.retry_base_delay_ms".to_owned(), seconds(self.delivery.retry_base_delay_ms)),
            ("delivery.retry_max_delay_ms".to_owned(), seconds(self.delivery.retry_max_delay_ms)),
        ];
        for (index, channel) in self.channels.iter().enumerate() {
            durations.push((format!("channels[{index}].passive_margin_ms"), seconds(channel.core.passive_margin_ms)));
            if let Some(window) = channel.core.passive_window_ms {
                durations.push((format!("channels[{index}].passive_window_ms"), seconds(window)));
            }
        }
        // Durations are added to clock readings (deadlines, expiries), which an absurd value
        // (u64::MAX meant as "never") would overflow, panicking on the first message.
        for (key, value) in durations {
            if value > LONGEST_DURATION_SECS {
                bail!("config key `{key}` is more than ten years");
            }
        }
        for (index, channel) in self.channels.iter().enumerate() {
            let mut keys: Vec<&String> = channel.core.menu.keys().collect();
            keys.sort();
            for key in keys {
                match &channel.core.menu[key] {
                    MenuAction { reply: Some(_), prompt: Some(_) } => bail!(
                        "config key `channels[{index}].menu.{key}`: set `reply` (a fixed answer) or `prompt` (a \
                         question for the model), not both"
                    ),
                    MenuAction { reply: None, prompt: None } => {
                        bail!("config key `channels[{index}].menu.{key}`: set `reply` or `prompt`")
                    }
                    _ => {}
                }
            }
        }
        let mut seen = HashSet::new();
        for (index, channel) in self.channels.iter().enumerate() {
            // Environment overrides address a channel as `YIZHAN__CHANNELS__<ID>__KEY`: an id
            // that would then hold `__` or end with `_` could not be told from the separators,
            // and its secrets could not come from there. (One that starts with `_` can: the
            // variable's `___` splits as `__` then `_…`.)
            let addressed = addressed_id(&channel.core.id);
            if addressed.contains("__") || addressed.ends_with('_') {
                bail!(
                    "config key `channels[{index}].id`: {:?} cannot be addressed by environment overrides \
                     (no `-` or `_` at its end, nor two in a row)",
                    channel.core.id
                );
            }
            if channel.core.id == UNKNOWN_CHANNEL_LABEL {
                bail!(
                    "config key `channels[{index}].id`: {UNKNOWN_CHANNEL_LABEL:?} is reserved (metrics count requests \
                     to unknown channels under it)"
                );
            }
            if !seen.insert(addressed) {
                bail!(
                    "config key `channels[{index}].id`: duplicate channel id {:?} (ids must differ in more than \
                     case or `-`/`_`, which environment overrides cannot tell apart)",
                    channel.core.id
                );
            }
        }
        Ok(())
    }
}

/// The `channel` label of requests to a channel id that is not configured.
pub const UNKNOWN_CHANNEL_LABEL: &str = "_unknown";

/// The longest duration any setting may hold (ten years, in seconds).
const LONGEST_DURATION_SECS: u64 = 10 * 365 * 86_400;

/// The process environment's `YIZHAN__*` variables. Others are not read, so that an unrelated
/// variable that is not UTF-8 cannot stop Yizhan; one of ours that is not is named.
fn overrides_from_env() -> anyhow::Result<Vec<(String, String)>> {
    std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.into_string().ok().filter(|name| name.starts_with("YIZHAN__"))?;
            Some(match value.into_string() {
                Ok(value) => Ok((name, value)),
                Err(_) => Err(anyhow!("environment variable {name} is not valid UTF-8")),
            })
        })
        .collect()
}

/// Names whose values are secrets or identifiers: an override stays a string even if it looks
/// like a number. Decided by the key's last word, so that `first_token_timeout_secs`,
/// `max_tokens` or `retry_base_delay_ms` stay numbers.
fn is_string_key(key: &str, in_channel: bool) -> bool {
    // A channel's `agent_id` is WeCom's numeric AgentId; `[llm] agent_id` is a LobeHub id.
    if in_channel && key == "agent_id" {
        return false;
    }
    let last_word = key.rsplit('_').next().unwrap_or(key);
    ["secret", "token", "key", "id", "password", "url", "base", "prompt", "bind", "path", "model", "provider"]
        .contains(&last_word)
}

/// A channel id as environment overrides address it: case-insensitive, `-` written `_`.
fn addressed_id(id: &str) -> String {
    id.to_ascii_lowercase().replace('-', "_")
}

/// Sets the key `path` (an environment variable's name less `YIZHAN__`) to `raw`, as text if
/// `as_text`. Returns the key's path as the config's deserializer names it (`messages.ai_label`)
/// when `raw` was read as a typed TOML value, which may not be what the key takes. (A channel's
/// keys are read by its own settings type, whose errors name the channel only: those keep the
/// type their reading gives, see `is_string_key`.)
fn apply_override(root: &mut toml::Value, path: &str, raw: &str, as_text: bool) -> anyhow::Result<Option<String>> {
    let segments: Vec<String> = path.split("__").map(|segment| segment.to_ascii_lowercase()).collect();
    if segments.iter().any(String::is_empty) {
        bail!("empty key segment");
    }
    let mut node = root;
    let mut index = 0;
    // The key's path as the deserializer names it, one element per level.
    let mut serde_path: Vec<String> = Vec::new();
    while index + 1 < segments.len() {
        let segment = &segments[index];
        let table = node.as_table_mut().ok_or_else(|| anyhow!("`{segment}` is not a table"))?;
        if segment == "channels" {
            // Channels are addressed by id, not by position.
            match segments.len() - index {
                2 => bail!("names a channel but no key in it (`YIZHAN__CHANNELS__<ID>__<KEY>`)"),
                // Other overrides address the channel by it: which of them found it would
                // depend on the order of the environment.
                3 if segments[index + 2] == "id" => bail!("a channel's `id` cannot be overridden"),
                _ => {}
            }
            let wanted = addressed_id(&segments[index + 1]);
            let entries = table
                .get_mut("channels")
                .and_then(toml::Value::as_array_mut)
                .ok_or_else(|| anyhow!("there is no [[channels]] entry"))?;
            let position = entries
                .iter()
                .position(|entry| {
                    entry.get("id").and_then(toml::Value::as_str).map(addressed_id) == Some(wanted.clone())
                })
                .ok_or_else(|| anyhow!("no [[channels]] entry has id {wanted:?}"))?;
            serde_path.push(format!("channels[{position}]"));
            node = &mut entries[position];
            index += 2;
            continue;
        }
        let segment = existing_key(table, segment)?;
        serde_path.push(segment.clone());
        node = table.entry(segment).or_insert_with(|| toml::Value::Table(toml::map::Map::new()));
        index += 1;
    }
    let in_channel = segments.first().is_some_and(|first| first == "channels");
    let key = segments.last().cloned().unwrap_or_default();
    let table = node.as_table_mut().ok_or_else(|| anyhow!("parent of `{key}` is not a table"))?;
    let key = existing_key(table, &key)?;
    let existing_is_string = table.get(&key).map(toml::Value::is_str);
    let parsed = parse_scalar(raw);
    let value = match (existing_is_string, parsed) {
        // Quoted to force a string: the text inside, whether or not the file sets the key.
        (_, Some(toml::Value::String(text))) => toml::Value::String(text),
        _ if as_text => toml::Value::String(raw.to_owned()),
        (Some(true), _) | (None, None) => toml::Value::String(raw.to_owned()),
        (None, Some(_)) if is_string_key(&key, in_channel) => toml::Value::String(raw.to_owned()),
        (_, Some(value)) => value,
        (Some(false), None) => toml::Value::String(raw.to_owned()),
    };
    let typed = !value.is_str();
    serde_path.push(key.clone());
    table.insert(key, value);
    Ok(typed.then(|| serde_path.join(".")))
}

/// The key of `table` that `segment` (lower-cased, as every variable name segment is) names:
/// the file's own spelling when it has one in another case (menu keys are the platform's, and
/// often upper-case: `ABOUT`), else `segment`. Two keys differing only in case cannot be told
/// apart from the environment.
fn existing_key(table: &toml::Table, segment: &str) -> anyhow::Result<String> {
    let mut matching = table.keys().filter(|key| key.eq_ignore_ascii_case(segment));
    match (matching.next(), matching.next()) {
        (Some(key), None) => Ok(key.clone()),
        (None, _) => Ok(segment.to_owned()),
        (Some(first), Some(second)) => {
            bail!("`{first}` and `{second}` differ only in case; set this key in the file")
        }
    }
}

fn parse_scalar(raw: &str) -> Option<toml::Value> {
    let wrapped: toml::Table = toml::from_str(&format!("v = {raw}")).ok()?;
    wrapped.get("v").cloned()
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    (before.matches('\n').count() + 1, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const MINIMAL: &str = r#"
[llm]
base_url = "http://127.0.0.1:11434/v1"
model = "qwen3:8b"

[[channels]]
id = "mp-main"
kind = "wechat_mp"
app_id = "wx123"
app_secret = "file-secret"
token = "tok"
"#;

    fn load(text: &str, env: &[(&str, &str)]) -> anyhow::Result<Config> {
        Config::from_toml(text, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn a_minimal_file_loads_with_defaults() {
        let config = load(MINIMAL, &[]).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(config.server.body_limit_bytes, 1024 * 1024);
        assert_eq!(config.llm.backend, LlmBackendKind::Openai);
        assert_eq!(config.channels.len(), 1);
        assert_eq!(config.channels[0].settings.table["app_secret"], "file-secret");
        assert_eq!(config.channels[0].core.reply_mode, None);
        assert_eq!(config.channels[0].core.passive_margin_ms, 500);
    }

    #[test]
    fn thread_counts_and_llm_concurrency_beyond_their_bounds_are_refused_by_name() {
        for (name, key) in
            [("YIZHAN__SERVER__WORKERS", "server.workers"), ("YIZHAN__SESSION__THREADS", "session.threads")]
        {
            let error = load(MINIMAL, &[(name, "1000000")]).err().map(|e| format!("{e:#}"));
            assert!(error.as_deref().is_some_and(|e| e.contains(key) && e.contains("1024")), "{name}: {error:?}");
            assert!(load(MINIMAL, &[(name, "1024")]).is_ok(), "{name}");
        }
        // "Unlimited" as the largest number is refused too, instead of failing the LLM actor.
        let error = load(MINIMAL, &[("YIZHAN__LLM__MAX_CONCURRENCY", "9223372036854775807")]).err();
        let error = error.map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(error.contains("llm.max_concurrency") && error.contains("1048576"), "{error}");
        assert!(load(MINIMAL, &[("YIZHAN__LLM__MAX_CONCURRENCY", "1048576")]).is_ok());
    }

    #[test]
    fn a_commit_delay_beyond_a_tenth_of_a_second_is_refused_by_name() {
        let error = load(MINIMAL, &[("YIZHAN__STORE__COMMIT_DELAY_US", "100001")]).err().map(|e| format!("{e:#}"));
        assert!(
            error.as_deref().is_some_and(|e| e.contains("store.commit_delay_us") && e.contains("100000")),
            "{error:?}"
        );
        for delay in ["0", "100000"] {
            let config = load(MINIMAL, &[("YIZHAN__STORE__COMMIT_DELAY_US", delay)]);
            assert!(config.is_ok_and(|config| config.store.commit_delay_us.to_string() == delay), "{delay}");
        }
        let defaults = load(MINIMAL, &[]).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(defaults.store.commit_delay_us, 100);
    }

    #[test]
    fn durations_beyond_ten_years_are_refused_by_name() {
        for (name, key) in [
            ("YIZHAN__LLM__FIRST_TOKEN_TIMEOUT_SECS", "llm.first_token_timeout_secs"),
            ("YIZHAN__STORE__DEDUPE_TTL_SECS", "store.dedupe_ttl_secs"),
            ("YIZHAN__SERVER__SHUTDOWN_TIMEOUT_SECS", "server.shutdown_timeout_secs"),
            ("YIZHAN__CHANNELS__MP_MAIN__PASSIVE_WINDOW_MS", "channels[0].passive_window_ms"),
        ] {
            let error = load(MINIMAL, &[(name, "9223372036854775807")]).err().map(|e| format!("{e:#}"));
            assert!(error.as_deref().is_some_and(|e| e.contains(key) && e.contains("ten years")), "{name}: {error:?}");
        }
        let ten_years = (super::LONGEST_DURATION_SECS).to_string();
        assert!(load(MINIMAL, &[("YIZHAN__LLM__TOTAL_TIMEOUT_SECS", ten_years.as_str())]).is_ok());
    }

    #[test]
    fn environment_variables_override_sections_and_channels_by_id() {
        let config = load(
            MINIMAL,
            &[
                ("YIZHAN__LLM__API_KEY", "12345"),
                ("YIZHAN__LLM__MAX_CONCURRENCY", "3"),
                ("YIZHAN__SERVER__BIND", "127.0.0.1:0"),
                ("YIZHAN__CHANNELS__MP_MAIN__APP_SECRET", "env-secret"),
                ("YIZHAN__CHANNELS__MP_MAIN__REPLAY_WINDOW_SECS", "0"),
                ("OTHER", "ignored"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(config.llm.api_key.as_ref().map(|k| k.expose_secret().to_owned()).as_deref(), Some("12345"));
        assert_eq!(config.llm.max_concurrency, 3);
        assert_eq!(config.server.bind, "127.0.0.1:0");
        assert_eq!(config.channels[0].settings.table["app_secret"], "env-secret");
        assert_eq!(config.channels[0].settings.table["replay_window_secs"], 0);
    }

    #[test]
    fn a_quoted_override_is_the_text_inside_whether_or_not_the_file_sets_the_key() {
        let config =
            load(MINIMAL, &[("YIZHAN__CHANNELS__MP_MAIN__TOKEN", "\"123456\"")]).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(config.channels[0].settings.table["token"], "123456");
    }

    #[test]
    fn an_llm_url_without_a_scheme_or_a_key_unfit_for_a_header_is_refused_without_quoting_the_key() {
        for url in ["127.0.0.1:11434/v1", "localhost:11434/v1", "ftp://host/v1", "http://"] {
            let text = MINIMAL.replace("http://127.0.0.1:11434/v1", url);
            let error = load(&text, &[]).err().map(|e| format!("{e:#}")).unwrap_or_default();
            assert!(error.contains("llm.base_url"), "{url}: {error}");
        }
        let error = load(MINIMAL, &[("YIZHAN__LLM__API_KEY", "sk-abc\n")]).err().map(|e| format!("{e:#}"));
        let error = error.unwrap_or_default();
        assert!(error.contains("llm.api_key") && !error.contains("sk-abc"), "{error}");
        assert!(load(MINIMAL, &[("YIZHAN__LLM__API_KEY", "sk-abc")]).is_ok());
    }

    #[test]
    fn a_lobehub_agent_gets_no_persona_unless_one_is_set() {
        let config = load(MINIMAL, &[]).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(config.llm.system_prompt().contains("AI 助手"));
        let agent = [("YIZHAN__LLM__BACKEND", "lobehub"), ("YIZHAN__LLM__AGENT_ID", "agt_1")];
        let config = load(MINIMAL, &agent).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(config.llm.system_prompt(), "");
        // An empty agent id (a compose file's `YIZHAN__LLM__AGENT_ID=`) is the chat route, no agent.
        let no_agent = [("YIZHAN__LLM__BACKEND", "lobehub"), ("YIZHAN__LLM__AGENT_ID", "")];
        let config = load(MINIMAL, &no_agent).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(config.llm.system_prompt().contains("AI 助手"));
        let mut with_prompt = agent.to_vec();
        with_prompt.push(("YIZHAN__LLM__SYSTEM_PROMPT", "你是客服。"));
        let config = load(MINIMAL, &with_prompt).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(config.llm.system_prompt(), "你是客服。");
    }

    #[test]
    fn an_override_whose_typed_reading_the_key_refuses_is_taken_as_text() {
        let config = load(
            MINIMAL,
            &[
                ("YIZHAN__MESSAGES__AI_LABEL", "false"),
                ("YIZHAN__MESSAGES__WELCOME", "2024"),
                ("YIZHAN__MESSAGES__AI_LABEL_EVERY_REPLY", "true"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!((config.messages.ai_label.as_str(), config.messages.welcome.as_str()), ("false", "2024"));
        assert!(config.messages.ai_label_every_reply);
        // Neither reading fits: the key is named, with what its typed reading met.
        let error = load(MINIMAL, &[("YIZHAN__LLM__MAX_CONCURRENCY", "true")]).err().map(|e| format!("{e:#}"));
        assert!(error.unwrap_or_default().contains("llm.max_concurrency"));
        let error = load(MINIMAL, &[("YIZHAN__LLM__MAX_CONCURRENCY", "-1")]).err().map(|e| format!("{e:#}"));
        let error = error.unwrap_or_default();
        assert!(error.contains("llm.max_concurrency") && !error.contains("string"), "{error}");
    }

    #[test]
    fn overrides_of_keys_absent_from_the_file_get_the_type_their_name_implies() {
        let config = load(
            MINIMAL,
            &[
                ("YIZHAN__LLM__FIRST_TOKEN_TIMEOUT_SECS", "60"),
                ("YIZHAN__LLM__MAX_TOKENS", "800"),
                ("YIZHAN__DELIVERY__RETRY_BASE_DELAY_MS", "250"),
                ("YIZHAN__CHANNELS__MP_MAIN__TOKEN", "123456"),
                ("YIZHAN__CHANNELS__MP_MAIN__ENCODING_AES_KEY", "1234567890"),
                ("YIZHAN__CHANNELS__MP_MAIN__AGENT_ID", "1000002"),
                ("YIZHAN__LLM__AGENT_ID", "42"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(config.llm.first_token_timeout_secs, 60);
        assert_eq!(config.llm.max_tokens, Some(800));
        assert_eq!(config.delivery.retry_base_delay_ms, 250);
        let table = &config.channels[0].settings.table;
        assert_eq!((table["token"].as_str(), table["encoding_aes_key"].as_str()), (Some("123456"), Some("1234567890")));
        assert_eq!(table["agent_id"].as_i64(), Some(1_000_002));
        assert_eq!(config.llm.agent_id.as_deref(), Some("42"));
    }

    #[test]
    fn a_bad_value_is_reported_with_its_key() {
        let error = load(&MINIMAL.replace("[llm]", "[llm]\nmax_concurrency = \"many\""), &[])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(error.contains("llm.max_concurrency"), "{error}");
        let error = load(&MINIMAL.replace("[llm]", "[llm]\nmax_concurency = 3"), &[])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(error.contains("max_concurency"), "{error}");
        let error = load(&MINIMAL.replace("[llm]", "[llm]\nmax_concurrency = 0"), &[])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(error.contains("llm.max_concurrency"), "{error}");
    }

    #[test]
    fn a_missing_section_and_a_bad_key_inside_a_channel_are_named_as_keys() {
        let error = |text: &str| format!("{:#}", load(text, &[]).err().unwrap_or_else(|| panic!("accepted")));
        assert_eq!(error(""), "config key `llm` is missing");
        assert_eq!(error("[llm]\nmodel = \"m\""), "config key `llm.base_url` is missing");
        let grouped = MINIMAL.replace("token = \"tok\"", "token = \"tok\"\ngroup_context = \"per-user\"");
        assert_eq!(
            error(&grouped),
            "config key `channels[0].group_context`: unknown variant, expected `shared` or `per_user`"
        );
        let nameless = MINIMAL.replace("id = \"mp-main\"", "");
        assert_eq!(error(&nameless), "config key `channels[0].id` is missing");
    }

    #[test]
    fn an_override_of_a_core_channel_key_its_type_refuses_is_reported_at_that_key() {
        let error = load(MINIMAL, &[("YIZHAN__CHANNELS__MP_MAIN__PASSIVE_MARGIN_MS", "-1")])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(error.starts_with("config key `channels[0].passive_margin_ms`: invalid "), "{error}");
    }

    #[test]
    fn the_core_channel_keys_are_taken_out_of_the_channels_table() {
        let values = [
            ("system_prompt", "\"p\""),
            ("reply_mode", "\"push\""),
            ("passive_window_ms", "1000"),
            ("passive_margin_ms", "1"),
            ("send_quota_per_message", "1"),
            ("menu", "{}"),
            ("group_context", "\"shared\""),
        ];
        let keys: Vec<&str> = values.iter().map(|(key, _)| *key).chain(["id", "kind"]).collect();
        let mut sorted = yizhan_channel_core::settings::CORE_KEYS.to_vec();
        sorted.sort_unstable();
        let mut listed = keys.clone();
        listed.sort_unstable();
        assert_eq!(sorted, listed);
        let lines: String = values.iter().map(|(key, value)| format!("{key} = {value}\n")).collect();
        let text = MINIMAL.replace("token = \"tok\"", &format!("token = \"tok\"\n{lines}"));
        let config = load(&text, &[]).unwrap_or_else(|e| panic!("{e:#}"));
        let table = config.channels[0].settings.table.as_object().cloned().unwrap_or_default();
        assert!(keys.iter().all(|key| !table.contains_key(*key)), "{:?}", table.keys());
    }

    #[test]
    fn channel_ids_that_overrides_cannot_tell_apart_are_duplicates() {
        let second = MINIMAL.replace("id = \"mp-main\"", "id = \"MP_main\"");
        let both = format!("{MINIMAL}\n{}", &second[second.find("[[channels]]").unwrap_or(0)..]);
        let error = load(&both, &[]).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(error.contains("duplicate channel id \"MP_main\""), "{error}");
    }

    #[test]
    fn an_override_for_an_unknown_channel_is_an_error() {
        assert!(load(MINIMAL, &[("YIZHAN__CHANNELS__NOPE__TOKEN", "x")]).is_err());
    }

    /// A channel without a key, or its id (which the other overrides address it by, in an
    /// order the environment decides), cannot be overridden.
    #[test]
    fn an_override_of_a_channel_itself_or_of_its_id_is_an_error() {
        let error = |env: &[(&str, &str)]| load(MINIMAL, env).err().map(|e| format!("{e:#}")).unwrap_or_default();
        let whole = error(&[("YIZHAN__CHANNELS__MP_MAIN", "x")]);
        assert!(whole.contains("YIZHAN__CHANNELS__MP_MAIN") && whole.contains("no key"), "{whole}");
        for order in [
            [("YIZHAN__CHANNELS__MP_MAIN__ID", "other"), ("YIZHAN__CHANNELS__MP_MAIN__TOKEN", "t")],
            [("YIZHAN__CHANNELS__MP_MAIN__TOKEN", "t"), ("YIZHAN__CHANNELS__MP_MAIN__ID", "other")],
        ] {
            let id = error(&order);
            assert!(id.contains("YIZHAN__CHANNELS__MP_MAIN__ID") && id.contains("`id` cannot"), "{id}");
        }
        // An `id` deeper in a channel is an ordinary key.
        let deeper = load(MINIMAL, &[("YIZHAN__CHANNELS__MP_MAIN__MENU__ABOUT__ID", "x")]).err();
        assert!(deeper.is_none_or(|e| !format!("{e:#}").contains("`id` cannot")));
    }

    #[test]
    fn config_errors_name_the_key_or_line_but_never_the_value() {
        let numeric = MINIMAL.replace("[llm]", "[llm]\napi_key = 987654321987");
        let error = format!("{:#}", load(&numeric, &[]).err().unwrap_or_else(|| panic!("accepted")));
        assert!(error.contains("llm.api_key") && !error.contains("987654321987"), "{error}");
        let unquoted = MINIMAL.replace("[llm]", "[llm]\napi_key = sk-unquoted-secret");
        let error = format!("{:#}", load(&unquoted, &[]).err().unwrap_or_else(|| panic!("accepted")));
        assert!(error.contains("line ") && !error.contains("unquoted-secret"), "{error}");
    }

    #[test]
    fn channel_ids_are_ones_environment_overrides_can_address() {
        for id in ["mp-", "mp_", "mp--main", "mp_-main", "mp__main", "_unknown"] {
            let text = MINIMAL.replace("id = \"mp-main\"", &format!("id = \"{id}\""));
            let message = format!("{:#}", load(&text, &[]).err().unwrap_or_else(|| panic!("accepted {id}")));
            assert!(message.contains("channels[0].id"), "{message}");
        }
    }

    #[test]
    fn an_empty_api_key_is_none_and_a_base_url_with_spaces_is_refused() {
        let config = load(MINIMAL, &[("YIZHAN__LLM__API_KEY", "")]).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(config.llm.api_key.is_none());
        let spaced = MINIMAL.replace("/v1\"", "/v1 \"");
        let message = format!("{:#}", load(&spaced, &[]).err().unwrap_or_else(|| panic!("accepted")));
        assert!(message.contains("llm.base_url"), "{message}");
    }

    #[test]
    fn a_menu_button_does_one_thing() {
        for (action, error) in
            [(r#"{ reply = "你好", prompt = "介绍一下" }"#, "not both"), ("{}", "set `reply` or `prompt`")]
        {
            let text = format!("{MINIMAL}menu.HELLO = {action}\n");
            let message = format!("{:#}", load(&text, &[]).err().unwrap_or_else(|| panic!("accepted {action}")));
            assert!(message.contains("menu.HELLO") && message.contains(error), "{message}");
        }
        let one = format!("{MINIMAL}menu.HELLO = {{ reply = \"你好\" }}\n");
        load(&one, &[]).unwrap_or_else(|e| panic!("{e:#}"));
    }

    #[test]
    fn overrides_keep_the_files_spelling_of_a_key_in_another_case() {
        let text = format!("{MINIMAL}menu.ABOUT = {{ reply = \"关于\" }}\n");
        let config = load(&text, &[("YIZHAN__CHANNELS__MP_MAIN__MENU__ABOUT__REPLY", "改过")])
            .unwrap_or_else(|e| panic!("{e:#}"));
        let menu = &config.channels[0].core.menu;
        assert_eq!(menu.len(), 1, "{menu:?}");
        assert_eq!(menu.get("ABOUT"), Some(&MenuAction { reply: Some("改过".into()), prompt: None }));
        let both = format!("{MINIMAL}menu.ABOUT = {{ reply = \"a\" }}\nmenu.about = {{ reply = \"b\" }}\n");
        let error = load(&both, &[("YIZHAN__CHANNELS__MP_MAIN__MENU__ABOUT__REPLY", "x")]).err();
        let error = error.map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(error.contains("differ only in case"), "{error}");
    }

    #[test]
    fn llm_settings_every_request_would_fail_on_or_that_would_be_ignored_are_refused() {
        let cases = [
            ("temperature = -0.5", "llm.temperature"),
            ("temperature = 2.5", "llm.temperature"),
            ("temperature = nan", "llm.temperature"),
            ("max_tokens = 0", "llm.max_tokens"),
            ("think_open_in_prompt = true\nstrip_think = false", "llm.strip_think"),
            ("think_open_in_prompt = true\nbackend = \"lobehub\"", "openai backend"),
        ];
        for (lines, named) in cases {
            let text = MINIMAL.replace("model = \"qwen3:8b\"", &format!("model = \"qwen3:8b\"\n{lines}"));
            let error = load(&text, &[]).err().map(|e| format!("{e:#}")).unwrap_or_default();
            assert!(error.contains(named), "{lines}: {error}");
        }
        let fine = MINIMAL.replace("model = \"qwen3:8b\"", "model = \"qwen3:8b\"\ntemperature = 2.0\nmax_tokens = 1");
        assert!(load(&fine, &[]).is_ok());
    }

    #[test]
    fn a_base_url_with_a_query_is_refused_and_a_password_in_it_never_shown() {
        let error = |url: &str| {
            let text = MINIMAL.replace("http://127.0.0.1:11434/v1", url);
            format!("{:#}", load(&text, &[]).err().unwrap_or_else(|| panic!("accepted {url}")))
        };
        let query = error("https://gw.example/v1?key=sk-in-the-query");
        assert!(query.contains("query") && query.contains("llm.base_url"), "{query}");
        assert!(!query.contains("sk-in-the-query"), "{query}");
        let fragment = error("https://gw.example/v1#sk-in-the-fragment");
        assert!(fragment.contains("fragment") && !fragment.contains("sk-in-the-fragment"), "{fragment}");
        let not_http = error("ftp://gw.example/v1?key=sk-in-the-query");
        assert!(not_http.contains("llm.base_url") && !not_http.contains("sk-in-the-query"), "{not_http}");
        let bad = error("ftp://user:hunter2@gw.example/v1");
        assert!(bad.contains("llm.base_url") && !bad.contains("hunter2"), "{bad}");
        assert_eq!(without_credentials("https://u:hunter2@gw.example/v1"), "https://***:***@gw.example/v1");
        assert_eq!(without_credentials("https://sk-abc@gw.example/v1"), "https://***@gw.example/v1");
        assert_eq!(without_credentials("https://gw.example/v1"), "https://gw.example/v1");
        assert_eq!(without_credentials("nonsense:hunter2@x"), "***@x");
        assert_eq!(without_credentials("https://u:p@gw.example/v1?key=sk#f"), "https://***:***@gw.example/v1?***#***");
        assert_eq!(without_credentials("nonsense:hunter2@x?key=sk#f"), "***@x?***");
        assert_eq!(without_credentials("no url#sk"), "no url#***");
    }

    #[test]
    fn secrets_do_not_appear_in_debug_output() {
        let config = load(MINIMAL, &[("YIZHAN__LLM__API_KEY", "sk-very-secret")]).unwrap_or_else(|e| panic!("{e:#}"));
        let debug = format!("{config:?}");
        assert!(!debug.contains("sk-very-secret") && !debug.contains("file-secret"), "{debug}");
        assert!(debug.contains("app_secret"), "key names are shown: {debug}");
    }

    /// A dedupe window shorter than a platform's retries is warned about, per channel.
    #[test]
    fn a_dedupe_window_shorter_than_a_platforms_retries_is_found() {
        let text = include_str!("../examples/yizhan.example.toml");
        let found = |ttl: &str| {
            let config = load(text, &[("YIZHAN__STORE__DEDUPE_TTL_SECS", ttl)]).unwrap_or_else(|e| panic!("{e:#}"));
            config.dedupe_shorter_than_retries().into_iter().map(|(channel, _)| channel).collect::<Vec<_>>()
        };
        assert_eq!(found("86400"), Vec::<String>::new());
        assert_eq!(found("3600"), ["feishu-main"]);
        assert_eq!(found("30"), ["mp-main", "wecom-main", "feishu-main"]);
        let config = load(text, &[("YIZHAN__STORE__DEDUPE_TTL_SECS", "3600")]).unwrap_or_else(|e| panic!("{e:#}"));
        let warnings = config.warnings();
        assert!(
            warnings.iter().any(|w| w.contains("`feishu-main`") && w.contains("store.dedupe_ttl_secs")),
            "{warnings:?}"
        );
        assert!(warnings.iter().any(|w| w.contains("channels[mp-main].app_secret")), "{warnings:?}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../examples/yizhan.example.toml");
        let config = load(text, &[]).unwrap_or_else(|e| panic!("{e:#}"));
        // Its credentials are placeholders, which `yizhan check` and the start warn about.
        let placeholders = config.placeholders();
        for key in ["channels[mp-main].app_secret", "channels[wecom-main].encoding_aes_key"] {
            assert!(placeholders.iter().any(|found| found == key), "{key} not in {placeholders:?}");
        }
        let replaced = load(text, &[("YIZHAN__CHANNELS__MP_MAIN__APP_SECRET", "a-real-secret")])
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(!replaced.placeholders().contains(&"channels[mp-main].app_secret".to_owned()));
        assert_eq!(load(MINIMAL, &[]).map(|config| config.placeholders().len()).ok(), Some(0));
    }
}
