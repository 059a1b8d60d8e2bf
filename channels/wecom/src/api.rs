//! The outbound half: the access token and app messages (`message/send`), with WeCom's error
//! codes sorted into what the core should do about them.
//!
//! Invariants:
//! - The app secret and the access token never appear in a log line or an error: transport
//!   errors are stripped of their URL (whose query carries one or the other) and platform
//!   messages are scrubbed of both values.
//! - A rejected access token is refreshed and the call retried once, never in a loop.
//! - Each misconfiguration code is logged at error level once per channel until a call
//!   succeeds again, so a broken setup does not produce one error line per message.

use serde_json::{json, Value};
use std::time::Duration;
use tracing::{debug, error, warn};
use yizhan_channel_common::api::{
    maybe_delivered, safe_to_repeat, scrub, wechat_call_errcode, wechat_errcode, wechat_family_exchange, ReportOnce,
};
use yizhan_channel_core::{AccessToken, ChannelError, ChannelId, DeliveryReceipt, TokenCache};

/// How long one API call may take before it fails (a send without the duplicate check:
/// `MaybeDelivered`, since it may have arrived; a token fetch or a checked send: transient),
/// unless the hub's client has a shorter timeout. Generous: WeCom usually answers in well under a second, but a
/// hung connection must not stall a delivery forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Refresh the token this long before WeCom's expiry, so it never expires mid-call.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

/// Codes that mean "this access token is no good": invalid (40001, 40014) or expired (42001).
const TOKEN_REJECTED: [i64; 3] = [40001, 40014, 42001];

/// How long to back off after 45009 (API frequency limit). WeCom documents the limits per
/// minute and per hour without saying which one was hit; a minute is the shortest that helps.
const FREQUENCY_BACKOFF: Duration = Duration::from_secs(60);

/// WeCom's duplicate-message check window for `message/send`, in seconds: a part retried after
/// a lost answer is not shown twice (doc path/90236; default 1800, maximum 4 h). It outlasts a
/// part's retries with the default delivery settings (12 sends, each up to a 10 s timeout, and
/// between them the backoff or a minute's account pause at a frequency limit: 13 minutes,
/// `the_duplicate_check_outlasts_a_parts_retries`), and no more: which part sent a text is
/// known in memory only (`repeats`), so for a window after a start new parts go without the
/// check, and the shorter that is the better.
pub(crate) const DUPLICATE_CHECK_SECS: u64 = 900;

/// How much longer than WeCom's duplicate-check window the channel remembers a send (`repeats`):
/// WeCom counts from when a message arrives, up to a request's timeout after the send began,
/// and in whole seconds.
pub(crate) const DUPLICATE_CHECK_MARGIN: Duration = Duration::from_secs(REQUEST_TIMEOUT.as_secs() + 2);

/// Which call an errcode came from; a few codes mean different things in each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// `GET /cgi-bin/gettoken`.
    Token,
    /// An API call with a token.
    Call,
}

/// The message type of an app message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MsgType {
    Markdown,
    Text,
}

impl MsgType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Markdown => "markdown",
            Self::Text => "text",
        }
    }
}

/// WeCom's API for one self-built app.
pub(crate) struct Api {
    channel: ChannelId,
    http: reqwest::Client,
    /// `https://qyapi.weixin.qq.com` or a stand-in, without a trailing slash.
    base: String,
    corp_id: String,
    /// Secret: only ever put into the gettoken query.
    corp_secret: String,
    agent_id: i64,
    tokens: TokenCache,
    /// Misconfiguration codes already logged; cleared when a call succeeds again.
    reported: ReportOnce,
}

impl Api {
    pub(crate) fn new(
        channel: ChannelId,
        http: reqwest::Client,
        base: String,
        corp_id: String,
        corp_secret: String,
        agent_id: i64,
    ) -> Self {
        Self {
            channel,
            http,
            base,
            corp_id,
            corp_secret,
            agent_id,
            tokens: TokenCache::new(TOKEN_MARGIN),
            reported: ReportOnce::new(),
        }
    }

    /// Sends one app message to one member, asking WeCom to drop it if an identical one went to
    /// them within [`DUPLICATE_CHECK_SECS`] when `duplicate_check` is set.
    pub(crate) async fn send(
        &self,
        userid: &str,
        msg_type: MsgType,
        content: &str,
        duplicate_check: bool,
    ) -> Result<DeliveryReceipt, ChannelError> {
        let kind = msg_type.as_str();
        let mut body = json!({
            "touser": userid,
            "msgtype": kind,
            "agentid": self.agent_id,
            "safe": 0,
            "enable_duplicate_check": u8::from(duplicate_check),
            "duplicate_check_interval": DUPLICATE_CHECK_SECS,
        });
        if let Some(members) = body.as_object_mut() {
            members.insert(kind.to_owned(), json!({ "content": content }));
        }
        let answer = self.call("/cgi-bin/message/send", &body).await.map_err(|error| {
            // A send that may have reached WeCom (its answer lost) is sent again in full only
            // when WeCom drops the copy; without the check, it would show once per resend.
            if duplicate_check {
                safe_to_repeat(error)
            } else {
                error
            }
        })?;
        // With one recipient WeCom normally answers 81013, but a partial failure is reported
        // with errcode 0 and the member listed here.
        let invalid = answer.get("invaliduser").and_then(Value::as_str).unwrap_or_default();
        if !invalid.trim().is_empty() {
            return Err(ChannelError::Refused {
                code: 81013,
                reason: format!(
                    "WeCom listed the recipient as invalid (invaliduser {invalid:?}): not a member, left the corp, or outside the app's visible range (可见范围)"
                ),
            });
        }
        // Reported the same way: a member without an interface licence (接口许可) for the app
        // is not reached either.
        let unlicensed = answer.get("unlicenseduser").and_then(Value::as_str).unwrap_or_default();
        if !unlicensed.trim().is_empty() {
            return Err(ChannelError::Refused {
                code: 0,
                reason: format!(
                    "WeCom listed the recipient as unlicensed (unlicenseduser {unlicensed:?}): the member needs an interface licence (接口许可) for this app"
                ),
            });
        }
        let platform_message_id = match answer.get("msgid") {
            Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
            Some(Value::Number(id)) => Some(id.to_string()),
            _ => None,
        };
        Ok(DeliveryReceipt { platform_message_id })
    }

    /// POSTs to an API that takes `?access_token=`, refreshing a rejected token once.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, ChannelError> {
        let url = format!("{}{path}", self.base);
        let token = self.access_token().await?;
        let answer = self.post_json(&url, &token, body).await?;
        let (code, message) = wechat_call_errcode(&answer, "WeCom").map_err(maybe_delivered)?;
        if code == 0 {
            self.recovered();
            return Ok(answer);
        }
        if !TOKEN_REJECTED.contains(&code) {
            return Err(self.classify(Stage::Call, code, &message, Some(&token)));
        }
        debug!(channel = %self.channel, code, "Access token rejected; fetching a new one.");
        self.tokens.invalidate(&token);
        let token = self.access_token().await?;
        let answer = self.post_json(&url, &token, body).await?;
        match wechat_call_errcode(&answer, "WeCom").map_err(maybe_delivered)? {
            (0, _) => {
                self.recovered();
                Ok(answer)
            }
            (code, _) if TOKEN_REJECTED.contains(&code) => {
                self.tokens.invalidate(&token);
                warn!(channel = %self.channel, code, "Fresh access token rejected too.");
                // Not at once: each retry fetches another token, against gettoken's own limit.
                Err(ChannelError::Transient {
                    reason: format!("WeCom rejected a freshly fetched access token (errcode {code})"),
                    retry_after: Some(FREQUENCY_BACKOFF),
                })
            }
            (code, message) => Err(self.classify(Stage::Call, code, &message, Some(&token))),
        }
    }

    async fn access_token(&self) -> Result<String, ChannelError> {
        self.tokens.get(|| self.fetch_token()).await
    }

    /// `GET /cgi-bin/gettoken?corpid=…&corpsecret=…`. The token belongs to this (corp, app
    /// secret) pair; WeCom returns the same one to every caller while it is valid.
    async fn fetch_token(&self) -> Result<AccessToken, ChannelError> {
        let url = format!("{}/cgi-bin/gettoken", self.base);
        let request =
            self.http.get(&url).query(&[("corpid", self.corp_id.as_str()), ("corpsecret", self.corp_secret.as_str())]);
        // Asking again for a token shows nobody anything.
        let answer = self.exchange(request).await.map_err(safe_to_repeat)?;
        match wechat_errcode(&answer) {
            (0, _) => {}
            (code, message) => return Err(self.classify(Stage::Token, code, &message, None)),
        }
        let value = answer
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| transient("WeCom's gettoken answer has no access_token"))?;
        // Default to the documented 7200 s if WeCom leaves the lifetime out.
        let expires_in = answer.get("expires_in").and_then(Value::as_u64).unwrap_or(7200);
        debug!(channel = %self.channel, expires_in, "Access token fetched.");
        Ok(AccessToken { value: value.to_owned(), expires_in: Duration::from_secs(expires_in) })
    }

    async fn post_json(&self, url: &str, token: &str, body: &Value) -> Result<Value, ChannelError> {
        self.exchange(self.http.post(url).query(&[("access_token", token)]).json(body)).await
    }

    /// Sends a request and returns the JSON object WeCom answered with, whatever its errcode (see
    /// [`wechat_family_exchange`]: a failure once the request may have gone out is
    /// `MaybeDelivered`).
    async fn exchange(&self, request: reqwest::RequestBuilder) -> Result<Value, ChannelError> {
        let misconfigured = |code: i64, hint: &str, message: &str| self.misconfigured(code, hint, message, None);
        wechat_family_exchange(request, "WeCom", REQUEST_TIMEOUT, misconfigured).await
    }

    /// Sorts an errcode into what the core should do (PROTOCOLS §3.4, doc path/90313).
    fn classify(&self, stage: Stage, code: i64, message: &str, token: Option<&str>) -> ChannelError {
        let hint = match (stage, code) {
            (_, 60020) => Some(
                "WeCom refuses calls from this server's IP: add this server's IP to the app's 企业可信IP \
                 (应用管理 → the app → 企业可信IP)",
            ),
            (Stage::Token, 40001) | (Stage::Token, 40091) | (_, 41004) => Some(
                "WeCom rejected `corp_secret`: copy the app's current Secret (应用管理 → the app → Secret; \
                 it changes when reset), not the 通讯录 or another app's",
            ),
            (_, 40013) | (_, 41002) => Some("WeCom rejected `corp_id`: copy the 企业ID from 我的企业 → 企业信息"),
            (_, 40056) => Some(
                "WeCom rejected `agent_id`: set it to the app's AgentId (应用管理 → the app), the app whose \
                 Secret is `corp_secret`",
            ),
            (_, 301002) => Some(
                "`corp_secret` belongs to a different app than `agent_id`: use the Secret of the app with \
                 this AgentId",
            ),
            (_, 48002) => Some(
                "the app may not call this API: an administrator must grant it (应用管理 → the app → API \
                 permissions), or use a self-built app (自建应用)",
            ),
            _ => None,
        };
        if let Some(hint) = hint {
            return self.misconfigured(code, hint, message, token);
        }
        let message = self.scrub(message, token);
        let meaning = match code {
            -1 => return transient(format!("WeCom is busy (errcode -1: {message})")),
            45009 | 45033 => {
                return ChannelError::Transient {
                    reason: format!("WeCom's API frequency limit was hit (errcode {code}: {message})"),
                    retry_after: Some(FREQUENCY_BACKOFF),
                }
            }
            81013 => {
                "no valid recipient: the member does not exist, left the corp, or is outside the app's \
                 visible range (可见范围)"
            }
            40003 => "invalid userid",
            44004 => "the message is empty",
            45002 => "content too long; lower `max_part_bytes`",
            _ => "WeCom refused the call",
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
        ChannelError::Misconfigured(format!("{hint} (errcode {code}: {message})"))
    }

    /// A call succeeded: a misconfiguration seen earlier is fixed, so log it again if it comes back.
    fn recovered(&self) {
        self.reported.reset();
    }

    /// Removes the secret and the token from platform text before it goes into an error, and
    /// bounds its length (it ends up in logs and journals).
    fn scrub(&self, message: &str, token: Option<&str>) -> String {
        scrub(message, &[&self.corp_secret, token.unwrap_or_default()])
    }
}

fn transient(reason: impl Into<String>) -> ChannelError {
    ChannelError::Transient { reason: reason.into(), retry_after: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_duplicate_check_outlasts_a_parts_retries() {
        // The core's default `[delivery]`: 12 sends, backoff from 0.5 s doubling up to 60 s.
        let (sends, base, longest) = (12_u32, Duration::from_millis(500), Duration::from_secs(60));
        // Between two sends: the backoff, or, at a frequency limit, the account's pause.
        let gaps: Duration = (0..sends - 1).map(|k| (base * 2_u32.pow(k)).min(longest).max(FREQUENCY_BACKOFF)).sum();
        let horizon = REQUEST_TIMEOUT * sends + gaps;
        assert!(Duration::from_secs(DUPLICATE_CHECK_SECS) >= horizon, "{horizon:?}");
    }

    fn api() -> Api {
        let channel = ChannelId::parse("wecom").unwrap_or_else(|e| panic!("{e}"));
        Api::new(channel, reqwest::Client::new(), "http://127.0.0.1:9".into(), "ww1".into(), "s3cret".into(), 1000002)
    }

    #[test]
    fn error_codes_are_sorted_into_what_the_core_should_do() {
        let api = api();
        for code in [60020, 40013, 41002, 41004, 40056, 301002, 48002] {
            for stage in [Stage::Token, Stage::Call] {
                assert!(matches!(api.classify(stage, code, "x", None), ChannelError::Misconfigured(_)), "{code}");
            }
        }
        for code in [40001, 40091] {
            assert!(matches!(api.classify(Stage::Token, code, "x", None), ChannelError::Misconfigured(_)));
        }
        for code in [81013, 40003, 44004, 45002, 12345] {
            assert!(
                matches!(api.classify(Stage::Call, code, "x", None), ChannelError::Refused { code: c, .. } if c == code),
                "{code}"
            );
        }
        assert!(api.classify(Stage::Call, -1, "x", None).is_retryable());
        for code in [45009, 45033] {
            match api.classify(Stage::Call, code, "x", None) {
                ChannelError::Transient { retry_after, .. } => assert_eq!(retry_after, Some(FREQUENCY_BACKOFF)),
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_ip_error_says_what_to_do() {
        let message = api().classify(Stage::Call, 60020, "not allow to access from your ip", None).to_string();
        assert!(message.contains("企业可信IP") && message.contains("60020"), "{message}");
    }

    #[test]
    fn secrets_and_tokens_are_scrubbed_from_platform_messages() {
        let api = api();
        let shown =
            api.classify(Stage::Token, 40001, "bad secret s3cret for token TOKEN123", Some("TOKEN123")).to_string();
        assert!(!shown.contains("s3cret") && !shown.contains("TOKEN123"), "{shown}");
        let shown = api.classify(Stage::Call, 99999, "s3cret", None).to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        let error = api.classify(Stage::Call, 99999, &"长".repeat(1000), None).to_string();
        assert!(error.chars().count() < 400);
    }
}
