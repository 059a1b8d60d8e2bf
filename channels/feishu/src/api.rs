//! The outbound half: the tenant access token, replies, and CardKit streaming, with Feishu's
//! error codes sorted into what the core should do about them.
//!
//! Invariants:
//! - The app secret and the tenant token never appear in a log line or an error: the token only
//!   travels in the `Authorization` header, transport errors are stripped of their URL, and
//!   platform messages are scrubbed of both values.
//! - A rejected token is invalidated, refetched and the call retried once, never in a loop.
//! - Each misconfiguration code is logged at error level once per channel until a call succeeds
//!   again, so a broken setup does not produce one error line per message.
//! - Ids that go into a URL path are checked to be plain `[A-Za-z0-9_-]` first.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;
use tracing::{debug, error, warn};
use yizhan_channel_common::api::{scrub, transport_failure, ReportOnce};
use yizhan_channel_core::{AccessToken, ChannelError, ChannelId, TokenCache};

/// How long one API call may take before it counts as a transient failure, unless the hub's
/// client has a shorter timeout. A hung connection must not stall a delivery forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Refresh the token this long before its expiry. Feishu hands out a *new* token only once the
/// old one has under 30 minutes left (PROTOCOLS §4.6), so a smaller margin would refetch the same
/// token again and again near the end of its life.
const TOKEN_MARGIN: Duration = Duration::from_secs(30 * 60);

/// Codes that mean "this tenant token is no good": missing (99991661), invalid tenant / app
/// token (99991663, 99991664), invalid token (99991668).
const TOKEN_REJECTED: [i64; 4] = [99991661, 99991663, 99991664, 99991668];

/// The API gateway's rate limit (99991400): for the whole app.
const APP_RATE_LIMITED: i64 = 99991400;

/// IM's per-chat / per-user send limit (230020): for one chat only (other bots in a group share
/// its budget), so it must not hold back the app's other chats the way the gateway's does.
const CHAT_RATE_LIMITED: i64 = 230020;

/// How long to wait after a rate limit when Feishu does not say: its limits are per second.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A rate limit's advice is capped, so a garbled header cannot park a delivery for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Feishu's code for a reply to a message that was recalled.
const RECALLED: i64 = 230011;

/// Where a reply goes: under the user's message when we have its id, else into the chat.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) message_id: Option<&'a str>,
    pub(crate) chat_id: Option<&'a str>,
    /// Whether an answer to a recalled message goes into the chat instead: in a direct chat,
    /// not in a group, where the asker took the question back from everyone.
    pub(crate) into_chat_if_recalled: bool,
}

/// Feishu's API for one app.
pub(crate) struct Api {
    channel: ChannelId,
    http: reqwest::Client,
    /// `https://open.feishu.cn` or a stand-in, without a trailing slash.
    base: String,
    app_id: String,
    /// Secret: only ever put into the token request body.
    app_secret: String,
    tokens: TokenCache,
    /// Misconfiguration codes already logged; cleared when a call succeeds again.
    reported: ReportOnce,
}

/// One HTTP exchange, before its code is judged.
struct Answer {
    status: StatusCode,
    /// The JSON object Feishu answered with, if it did (it does for errors too, often with 4xx).
    json: Option<Value>,
    /// From `x-ogw-ratelimit-reset` or `Retry-After`.
    retry_after: Option<Duration>,
}

impl Answer {
    /// Feishu's `code`; `None` when the body carried none.
    fn code(&self) -> Option<i64> {
        self.json.as_ref().and_then(|json| json.get("code")).and_then(Value::as_i64)
    }

    fn message(&self) -> &str {
        self.json.as_ref().and_then(|json| json.get("msg")).and_then(Value::as_str).unwrap_or_default()
    }

    fn succeeded(&self) -> bool {
        self.status.is_success() && self.code() == Some(0)
    }

    fn data_str(&self, key: &str) -> Option<String> {
        self.json
            .as_ref()
            .and_then(|json| json.get("data"))
            .and_then(|data| data.get(key))
            .and_then(Value::as_str)
            .filter(|value| !value.is_empty())
            .map(str::to_owned)
    }
}

impl Api {
    pub(crate) fn new(
        channel: ChannelId,
        http: reqwest::Client,
        base: String,
        app_id: String,
        app_secret: String,
    ) -> Self {
        Self {
            channel,
            http,
            base,
            app_id,
            app_secret,
            tokens: TokenCache::new(TOKEN_MARGIN),
            reported: ReportOnce::new(),
        }
    }

    /// Replies to the user's message (or, without one, posts into the chat) and returns the new
    /// message's id. `uuid` makes a retried send show up once (Feishu dedupes it for an hour).
    pub(crate) async fn send(
        &self,
        target: Target<'_>,
        msg_type: &str,
        content: &str,
        uuid: &str,
    ) -> Result<Option<String>, ChannelError> {
        let into_chat = |chat_id: &str| {
            let body = json!({"receive_id": chat_id, "msg_type": msg_type, "content": content, "uuid": uuid});
            async move {
                self.call(Method::POST, "/open-apis/im/v1/messages", &[("receive_id_type", "chat_id")], &body).await
            }
        };
        let answer = match (target.message_id, target.chat_id) {
            (Some(message_id), chat_id) => {
                let path = format!("/open-apis/im/v1/messages/{}/reply", path_id("message_id", message_id)?);
                let body = json!({"msg_type": msg_type, "content": content, "uuid": uuid});
                match (self.call(Method::POST, &path, &[], &body).await, chat_id) {
                    // The user recalled the question while it was being answered: in a direct
                    // chat the answer goes into the chat instead of being lost (in a group it
                    // is not posted for everyone: refused, recorded as failed).
                    (Err(ChannelError::Refused { code: RECALLED, .. }), Some(chat_id))
                        if target.into_chat_if_recalled =>
                    {
                        into_chat(chat_id).await?
                    }
                    (answer, _) => answer?,
                }
            }
            (None, Some(chat_id)) => into_chat(chat_id).await?,
            (None, None) => {
                return Err(ChannelError::Malformed(
                    "the reply handle names neither a message nor a chat; it is not from this channel".into(),
                ))
            }
        };
        Ok(answer.data_str("message_id"))
    }

    /// Creates a CardKit card entity from card JSON 2.0 and returns its `card_id`.
    pub(crate) async fn create_card(&self, card: &str) -> Result<String, ChannelError> {
        let body = json!({"type": "card_json", "data": card});
        let answer = self.call(Method::POST, "/open-apis/cardkit/v1/cards", &[], &body).await?;
        answer.data_str("card_id").ok_or_else(|| transient("Feishu created a card but returned no card_id"))
    }

    /// Replaces one element's text (the full text so far; Feishu types out the new suffix).
    pub(crate) async fn set_element_content(
        &self,
        card_id: &str,
        element_id: &str,
        content: &str,
        sequence: u64,
        uuid: &str,
    ) -> Result<(), ChannelError> {
        let path = format!(
            "/open-apis/cardkit/v1/cards/{}/elements/{}/content",
            path_id("card_id", card_id)?,
            path_id("element_id", element_id)?
        );
        let body = json!({"content": content, "sequence": sequence, "uuid": uuid});
        self.call(Method::PUT, &path, &[], &body).await.map(drop)
    }

    /// Replaces a card entity whole with `card` (card JSON 2.0): works whether or not the card is
    /// in streaming mode.
    pub(crate) async fn replace_card(
        &self,
        card_id: &str,
        card: &str,
        sequence: u64,
        uuid: &str,
    ) -> Result<(), ChannelError> {
        let path = format!("/open-apis/cardkit/v1/cards/{}", path_id("card_id", card_id)?);
        let body = json!({"card": {"type": "card_json", "data": card}, "sequence": sequence, "uuid": uuid});
        self.call(Method::PUT, &path, &[], &body).await.map(drop)
    }

    /// Turns streaming mode off, which makes the card a normal (forwardable, final) card.
    pub(crate) async fn end_streaming(&self, card_id: &str, sequence: u64) -> Result<(), ChannelError> {
        let path = format!("/open-apis/cardkit/v1/cards/{}/settings", path_id("card_id", card_id)?);
        let settings = json!({"config": {"streaming_mode": false}}).to_string();
        let body = json!({"settings": settings, "sequence": sequence});
        self.call(Method::PATCH, &path, &[], &body).await.map(drop)
    }

    /// Calls an API with the tenant token, refreshing a rejected token once.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: &Value,
    ) -> Result<Answer, ChannelError> {
        let url = format!("{}{path}", self.base);
        let token = self.tenant_token().await?;
        let answer = self.exchange(method.clone(), &url, query, Some(&token), body).await?;
        if answer.succeeded() {
            self.recovered();
            return Ok(answer);
        }
        if !answer.code().is_some_and(|code| TOKEN_REJECTED.contains(&code)) {
            return Err(self.classify(&answer, Some(&token)));
        }
        debug!(channel = %self.channel, code = answer.code(), "Tenant token rejected; fetching a new one.");
        self.tokens.invalidate(&token);
        let token = self.tenant_token().await?;
        let answer = self.exchange(method, &url, query, Some(&token), body).await?;
        if answer.succeeded() {
            self.recovered();
            return Ok(answer);
        }
        match answer.code() {
            Some(code) if TOKEN_REJECTED.contains(&code) => {
                self.tokens.invalidate(&token);
                warn!(channel = %self.channel, code, "Fresh tenant token rejected too.");
                Err(transient(format!("Feishu rejected a freshly fetched tenant token (code {code})")))
            }
            _ => Err(self.classify(&answer, Some(&token))),
        }
    }

    async fn tenant_token(&self) -> Result<String, ChannelError> {
        self.tokens.get(|| self.fetch_token()).await
    }

    /// `POST /open-apis/auth/v3/tenant_access_token/internal` (self-built apps).
    async fn fetch_token(&self) -> Result<AccessToken, ChannelError> {
        let url = format!("{}/open-apis/auth/v3/tenant_access_token/internal", self.base);
        let body = json!({"app_id": self.app_id, "app_secret": self.app_secret});
        let answer = self.exchange(Method::POST, &url, &[], None, &body).await?;
        if !answer.succeeded() {
            let code = answer.code().unwrap_or(0);
            let retryable = answer.status.is_server_error()
                || answer.status == StatusCode::TOO_MANY_REQUESTS
                || [APP_RATE_LIMITED, CHAT_RATE_LIMITED].contains(&code)
                || answer.code().is_none();
            if retryable {
                return Err(self.classify(&answer, None));
            }
            let hint = match code {
                10003 => "Feishu does not know the app_id, or the app is not installed in this tenant; check `app_id`",
                10014 => "Feishu rejected the app_secret; copy the current App Secret from 开发者后台 → 凭证与基础信息",
                _ => "Feishu refused the tenant token; check `app_id` and `app_secret` against 开发者后台 → 凭证与基础信息",
            };
            return Err(self.misconfigured(code, hint, answer.message(), None));
        }
        let value = answer
            .json
            .as_ref()
            .and_then(|json| json.get("tenant_access_token"))
            .and_then(Value::as_str)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| transient("Feishu's token answer has no tenant_access_token"))?;
        // Default to the documented 2 h if Feishu leaves the lifetime out.
        let expire = answer.json.as_ref().and_then(|json| json.get("expire")).and_then(Value::as_u64).unwrap_or(7200);
        debug!(channel = %self.channel, expire, "Tenant token fetched.");
        Ok(AccessToken { value: value.to_owned(), expires_in: Duration::from_secs(expire) })
    }

    /// Sends one request and reads the answer, whatever its status.
    ///
    /// The deadline is a backstop around the whole exchange rather than reqwest's per-request
    /// timeout, which would override a shorter timeout the hub configured on its client.
    async fn exchange(
        &self,
        method: Method,
        url: &str,
        query: &[(&str, &str)],
        token: Option<&str>,
        body: &Value,
    ) -> Result<Answer, ChannelError> {
        let mut request = self.http.request(method, url).json(body);
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let exchange = async {
            let response = request.send().await.map_err(transport_error)?;
            let status = response.status();
            let retry_after = retry_after(response.headers());
            let bytes = yizhan_channel_common::api::read_bounded(response)
                .await
                .map_err(transport_error)?
                .ok_or_else(|| transient("Feishu's answer is larger than 1 MiB"))?;
            Ok::<_, ChannelError>((status, retry_after, bytes))
        };
        let (status, retry_after, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| transient("request to Feishu timed out"))??;
        let json = match serde_json::from_slice::<Value>(&bytes) {
            Ok(value @ Value::Object(_)) => Some(value),
            _ => None,
        };
        Ok(Answer { status, json, retry_after })
    }

    /// Sorts a failed answer into what the core should do (PROTOCOLS §4.7, §4.8).
    fn classify(&self, answer: &Answer, token: Option<&str>) -> ChannelError {
        let message = self.scrub(answer.message(), token);
        let code = answer.code();
        if code == Some(CHAT_RATE_LIMITED) {
            // No `retry_after`: that would pause every send of the app (see the core's
            // `AccountPause`); this part backs off on its own.
            return transient(format!("Feishu's per-chat rate limit (code {CHAT_RATE_LIMITED}: {message})"));
        }
        if answer.status == StatusCode::TOO_MANY_REQUESTS || code == Some(APP_RATE_LIMITED) {
            return ChannelError::Transient {
                reason: format!(
                    "Feishu rate limit (HTTP {}, code {}: {message})",
                    answer.status.as_u16(),
                    code.unwrap_or(0)
                ),
                retry_after: Some(answer.retry_after.unwrap_or(DEFAULT_RETRY_AFTER)),
            };
        }
        if answer.status.is_server_error() {
            return transient(format!(
                "Feishu answered HTTP {} (code {}: {message})",
                answer.status,
                code.unwrap_or(0)
            ));
        }
        let Some(code) = code else {
            if answer.status.is_success() {
                return transient("Feishu's answer is not a JSON object with a code");
            }
            // Not Feishu's own answer (a proxy's, a wrong address): read as the other channels
            // read a bare HTTP error (a 408 is worth a retry, a 404 needs an operator).
            let status = answer.status.as_u16();
            let misconfigured = |code, hint: &str, message: &str| self.misconfigured(code, hint, message, token);
            return yizhan_channel_common::api::status_error("Feishu", status, misconfigured).unwrap_or_else(|| {
                ChannelError::Refused { code: i64::from(status), reason: format!("Feishu answered HTTP {status}") }
            });
        };
        let hint = match code {
            99991672 => Some(
                "the app lacks an API scope (im:message / im:message:send_as_bot for replies, cardkit:card:write \
                 for streaming); add it in 开发者后台 → 权限管理 and publish a new app version",
            ),
            230006 => Some("the app's bot capability is off; enable it in 开发者后台 → 应用能力 → 机器人 and publish"),
            10003 | 10014 => Some("Feishu rejected the app credentials; check `app_id` and `app_secret`"),
            _ => None,
        };
        if let Some(hint) = hint {
            return self.misconfigured(code, hint, &message, token);
        }
        let meaning = match code {
            230025 => {
                "the message is larger than Feishu accepts (30 KB for cards, 150 KB for text); lower `max_part_bytes`"
            }
            230002 => "the bot is not in this chat (removed from the group?)",
            230013 => "the user is outside the app's availability range (可用范围)",
            RECALLED => "the message to reply to was recalled",
            _ => "Feishu refused the call",
        };
        ChannelError::Refused { code, reason: format!("{meaning} ({message})") }
    }

    /// Builds the operator-facing error and logs it, once per code until calls succeed again.
    fn misconfigured(&self, code: i64, hint: &str, message: &str, token: Option<&str>) -> ChannelError {
        let message = self.scrub(message, token);
        let first = self.reported.first(code);
        if first {
            error!(channel = %self.channel, code, hint, "Channel misconfigured; sends fail until an operator fixes it.");
        }
        ChannelError::Misconfigured(format!("{hint} (code {code}: {message})"))
    }

    /// A call succeeded: a misconfiguration seen earlier is fixed, so log it again if it returns.
    fn recovered(&self) {
        self.reported.reset();
    }

    /// Removes the secret and the token from platform text before it goes into an error, and
    /// bounds its length (it ends up in logs and journals).
    fn scrub(&self, message: &str, token: Option<&str>) -> String {
        scrub(message, &[&self.app_secret, token.unwrap_or_default()])
    }
}

/// An id that goes into a URL path: refused unless it is plain, so a forged reply handle cannot
/// steer a call to another endpoint.
fn path_id<'a>(name: &str, id: &'a str) -> Result<&'a str, ChannelError> {
    let plain =
        !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        Ok(id)
    } else {
        Err(ChannelError::Malformed(format!("{name} {id:?} is not a Feishu id")))
    }
}

/// How long Feishu asks us to wait, from `x-ogw-ratelimit-reset` (its gateway) or `Retry-After`.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    ["x-ogw-ratelimit-reset", "retry-after"]
        .iter()
        .filter_map(|name| headers.get(*name))
        .filter_map(|value| value.to_str().ok())
        .find_map(|value| value.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs.max(1)).min(MAX_RETRY_AFTER))
}

fn transient(reason: impl Into<String>) -> ChannelError {
    ChannelError::Transient { reason: reason.into(), retry_after: None }
}

/// A network-level failure as a transient error, without the URL (it names message ids).
fn transport_error(error: reqwest::Error) -> ChannelError {
    transient(transport_failure(error, "Feishu"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> Api {
        let channel = ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}"));
        Api::new(channel, reqwest::Client::new(), "http://127.0.0.1:9".into(), "cli_1".into(), "s3cret".into())
    }

    fn answer(status: u16, code: Option<i64>, msg: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            json: code.map(|code| json!({"code": code, "msg": msg})),
            retry_after: None,
        }
    }

    #[test]
    fn error_codes_are_sorted_into_what_the_core_should_do() {
        let api = api();
        for code in [99991672, 230006, 10014] {
            assert!(
                matches!(api.classify(&answer(400, Some(code), "x"), None), ChannelError::Misconfigured(_)),
                "{code}"
            );
        }
        for code in [230025, 230002, 230013, 12345] {
            let error = api.classify(&answer(400, Some(code), "x"), None);
            assert!(matches!(error, ChannelError::Refused { code: c, .. } if c == code), "{code}");
        }
        for (status, code) in [(200, Some(99991400)), (400, Some(230020)), (429, None), (502, None), (500, Some(1))] {
            assert!(api.classify(&answer(status, code, "x"), None).is_retryable(), "{status} {code:?}");
        }
        assert!(matches!(api.classify(&answer(404, None, ""), None), ChannelError::Misconfigured(_)));
        // A redirect (not followed: it would turn the POST into a bodiless GET) is `api_base`'s.
        for status in [301, 302, 307, 308] {
            let error = api.classify(&answer(status, None, ""), None);
            assert!(matches!(&error, ChannelError::Misconfigured(why) if why.contains("api_base")), "{error:?}");
        }
        assert!(matches!(api.classify(&answer(408, None, ""), None), ChannelError::Transient { .. }));
        assert!(matches!(api.classify(&answer(418, None, ""), None), ChannelError::Refused { code: 418, .. }));
    }

    #[test]
    fn a_rate_limit_carries_feishus_advice_or_one_second() {
        let mut limited = answer(429, Some(99991400), "too many");
        let error = api().classify(&limited, None);
        assert!(matches!(error, ChannelError::Transient { retry_after: Some(d), .. } if d == DEFAULT_RETRY_AFTER));
        limited.retry_after = Some(Duration::from_secs(7));
        let error = api().classify(&limited, None);
        assert!(matches!(error, ChannelError::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(7)));
        // One chat's limit: retried, without asking the whole app to wait.
        let mut chat_limited = answer(400, Some(230020), "too many");
        chat_limited.retry_after = Some(Duration::from_secs(7));
        let error = api().classify(&chat_limited, None);
        assert!(matches!(error, ChannelError::Transient { retry_after: None, .. }), "{error:?}");
    }

    #[test]
    fn oversized_content_is_refused_with_a_clear_reason() {
        let error = api().classify(&answer(400, Some(230025), "content too long"), None);
        assert!(error.to_string().contains("max_part_bytes"), "{error}");
    }

    #[test]
    fn secrets_and_tokens_are_scrubbed_from_platform_messages() {
        let api = api();
        let error = api.classify(&answer(400, Some(99991672), "bad s3cret for t-TOKEN"), Some("t-TOKEN"));
        let shown = error.to_string();
        assert!(!shown.contains("s3cret") && !shown.contains("t-TOKEN"), "{shown}");
        let long = api.classify(&answer(400, Some(1), &"长".repeat(1000)), None).to_string();
        assert!(long.chars().count() < 400);
    }

    #[test]
    fn ids_with_path_characters_are_refused() {
        assert!(path_id("card_id", "7355_abc-D").is_ok());
        for bad in ["", "../x", "a/b", "a?b", "om_x#"] {
            assert!(path_id("message_id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_after_headers_are_read_and_capped() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert("x-ogw-ratelimit-reset", reqwest::header::HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        headers.insert("x-ogw-ratelimit-reset", reqwest::header::HeaderValue::from_static("99999"));
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
    }
}
