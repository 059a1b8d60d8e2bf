//! The outbound half: the stable access token, customer-service (客服) sends and the typing
//! indicator, with WeChat's error codes sorted into what the core should do about them.
//!
//! Invariants:
//! - The app secret and the access token never appear in a log line or an error: transport
//!   errors are stripped of their URL (which carries the token) and platform messages are
//!   scrubbed of both values.
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

/// How long one API call may take before it fails (a send: `MaybeDelivered`, since it may have
/// arrived; a token fetch: transient), unless the hub's client has a shorter timeout. Generous: WeChat usually answers in well under a second, but a
/// hung connection must not stall a delivery forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Refresh the token this long before WeChat's expiry (PROTOCOLS §2.6: the stable token is
/// always returned with at least 300 s left, and the old one stays valid for 5 min).
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

/// How long the account waits after errcode 45009 (the daily API quota) before its next call:
/// the core's longest account pause, so that its retries span about two hours, time for an
/// administrator to clear the quota.
const DAILY_QUOTA_PAUSE: Duration = Duration::from_secs(600);

/// Codes that mean "this access token is no good": invalid (40001, 40014) or expired (42001).
const TOKEN_REJECTED: [i64; 3] = [40001, 40014, 42001];

/// WeChat's API for one account.
pub(crate) struct Api {
    channel: ChannelId,
    http: reqwest::Client,
    /// `https://api.weixin.qq.com` or a stand-in, without a trailing slash.
    base: String,
    app_id: String,
    /// Secret: only ever put into the stable_token request body.
    app_secret: String,
    tokens: TokenCache,
    /// Misconfiguration codes already logged; cleared when a call succeeds again.
    reported: ReportOnce,
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

    /// Sends one text message through the customer-service API.
    pub(crate) async fn send_text(&self, openid: &str, content: &str) -> Result<DeliveryReceipt, ChannelError> {
        let body = json!({"touser": openid, "msgtype": "text", "text": {"content": content}});
        let answer = self.call("/cgi-bin/message/custom/send", &body).await?;
        let platform_message_id = match answer.get("msgid") {
            Some(Value::Number(id)) => Some(id.to_string()),
            Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
            _ => None,
        };
        Ok(DeliveryReceipt { platform_message_id })
    }

    /// Shows "对方正在输入" to the user. The two codes that only mean "not now" are not errors.
    pub(crate) async fn typing(&self, openid: &str) -> Result<(), ChannelError> {
        let body = json!({"touser": openid, "command": "Typing"});
        match self.call("/cgi-bin/message/custom/typing", &body).await {
            Ok(_) => Ok(()),
            // 45080: no user message in the last 30 s; 45081: already typing.
            Err(ChannelError::Refused { code: 45080 | 45081, .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Calls an API that takes `?access_token=`, refreshing a rejected token once.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, ChannelError> {
        let url = format!("{}{path}", self.base);
        let token = self.access_token().await?;
        let answer = self.post_json(&url, Some(&token), body).await?;
        let (code, message) = wechat_call_errcode(&answer, "WeChat").map_err(maybe_delivered)?;
        if code == 0 {
            self.recovered();
            return Ok(answer);
        }
        if !TOKEN_REJECTED.contains(&code) {
            return Err(self.classify(code, &message, Some(&token)));
        }
        debug!(channel = %self.channel, code, "Access token rejected; fetching a new one.");
        self.tokens.invalidate(&token);
        let token = self.access_token().await?;
        let answer = self.post_json(&url, Some(&token), body).await?;
        match wechat_call_errcode(&answer, "WeChat").map_err(maybe_delivered)? {
            (0, _) => {
                self.recovered();
                Ok(answer)
            }
            (code, _) if TOKEN_REJECTED.contains(&code) => {
                self.tokens.invalidate(&token);
                warn!(channel = %self.channel, code, "Fresh access token rejected too.");
                Err(ChannelError::Transient {
                    reason: format!("WeChat rejected a freshly fetched access token (errcode {code})"),
                    retry_after: None,
                })
            }
            (code, message) => Err(self.classify(code, &message, Some(&token))),
        }
    }

    async fn access_token(&self) -> Result<String, ChannelError> {
        self.tokens.get(|| self.fetch_token()).await
    }

    /// `POST /cgi-bin/stable_token` in normal mode (`force_refresh: false`): every hub instance
    /// gets the same token, so several instances never invalidate each other's.
    async fn fetch_token(&self) -> Result<AccessToken, ChannelError> {
        let url = format!("{}/cgi-bin/stable_token", self.base);
        let body = json!({
            "grant_type": "client_credential",
            "appid": self.app_id,
            "secret": self.app_secret,
            "force_refresh": false,
        });
        // Asking again for a token shows nobody anything.
        let answer = self.post_json(&url, None, &body).await.map_err(safe_to_repeat)?;
        match wechat_errcode(&answer) {
            (0, _) => {}
            // From stable_token, "invalid credential" means the AppSecret is wrong.
            (40001, message) => {
                return Err(self.misconfigured(
                    40001,
                    "WeChat rejected the app_secret; copy the current AppSecret from 设置与开发 → 基本配置 (it changes when reset)",
                    &message,
                    None,
                ))
            }
            (code, message) => return Err(self.classify(code, &message, None)),
        }
        let value = answer
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| transient("WeChat's stable_token answer has no access_token"))?;
        // Default to the documented 7200 s if WeChat leaves the lifetime out.
        let expires_in = answer.get("expires_in").and_then(Value::as_u64).unwrap_or(7200);
        debug!(channel = %self.channel, expires_in, "Access token fetched.");
        Ok(AccessToken { value: value.to_owned(), expires_in: Duration::from_secs(expires_in) })
    }

    /// POSTs JSON and returns the JSON object WeChat answered with, whatever its errcode (see
    /// [`wechat_family_exchange`]: a failure once the request may have gone out is
    /// `MaybeDelivered`, since WeChat's APIs take no idempotency key).
    async fn post_json(&self, url: &str, token: Option<&str>, body: &Value) -> Result<Value, ChannelError> {
        let mut request = self.http.post(url).json(body);
        if let Some(token) = token {
            request = request.query(&[("access_token", token)]);
        }
        let misconfigured = |code: i64, hint: &str, message: &str| self.misconfigured(code, hint, message, None);
        wechat_family_exchange(request, "WeChat", REQUEST_TIMEOUT, misconfigured).await
    }

    /// Sorts an errcode into what the core should do (PROTOCOLS §2.5, §2.7).
    fn classify(&self, code: i64, message: &str, token: Option<&str>) -> ChannelError {
        let message = self.scrub(message, token);
        let hint = match code {
            40164 => {
                Some("add this server's outbound IP to the 公众号 IP whitelist (设置与开发 → 基本配置 → IP白名单)")
            }
            40013 => Some("`app_id` is not a valid AppID; copy it from 设置与开发 → 基本配置"),
            40125 => Some("`app_secret` is not a valid AppSecret; copy or reset it in 设置与开发 → 基本配置"),
            41002 => Some("`app_id` is missing from the request; check the channel's `app_id`"),
            41004 => Some("`app_secret` is missing from the request; check the channel's `app_secret`"),
            89503 => {
                Some("WeChat flagged this server's IP as risky; an administrator must confirm it in the 公众号 后台")
            }
            _ => None,
        };
        if let Some(hint) = hint {
            return self.misconfigured(code, hint, &message, None);
        }
        let meaning = match code {
            -1 => return transient(format!("WeChat is busy (errcode -1: {message})")),
            // Lifted at midnight or when an administrator clears it (清零): every call until
            // then is refused the same way, so the whole account waits between tries.
            45009 => {
                return ChannelError::Transient {
                    reason: format!("daily API quota reached (errcode 45009: {message})"),
                    retry_after: Some(DAILY_QUOTA_PAUSE),
                }
            }
            45011 => {
                return ChannelError::Transient {
                    reason: format!("per-minute API quota reached (errcode 45011: {message})"),
                    retry_after: Some(Duration::from_secs(60)),
                }
            }
            48001 => "the account has no customer-service (客服) message permission (needs a verified account)",
            45015 => "outside the 48 h reply window, or the user unfollowed",
            45047 => "customer-service quota for this user used up (5 messages per user message within 48 h)",
            43004 => "the user does not follow the account",
            40003 => "invalid openid for this account",
            45002 => "content too long; lower `max_part_bytes`",
            _ => "WeChat refused the call",
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
        scrub(message, &[&self.app_secret, token.unwrap_or_default()])
    }
}

fn transient(reason: impl Into<String>) -> ChannelError {
    ChannelError::Transient { reason: reason.into(), retry_after: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> Api {
        let channel = ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}"));
        Api::new(channel, reqwest::Client::new(), "http://127.0.0.1:9".into(), "wx1".into(), "s3cret".into())
    }

    #[test]
    fn error_codes_are_sorted_into_what_the_core_should_do() {
        let api = api();
        for code in [40164, 40013, 40125, 41002, 41004] {
            assert!(matches!(api.classify(code, "x", None), ChannelError::Misconfigured(_)), "{code}");
        }
        for code in [48001, 45015, 45047, 43004, 40003, 45002, 12345] {
            assert!(
                matches!(api.classify(code, "x", None), ChannelError::Refused { code: c, .. } if c == code),
                "{code}"
            );
        }
        for code in [-1, 45009, 45011] {
            assert!(api.classify(code, "x", None).is_retryable(), "{code}");
        }
        // The quotas pause the whole account: a minute, or ten for the daily one.
        for (code, pause) in [(45011, 60), (45009, 600)] {
            let wait = match api.classify(code, "x", None) {
                ChannelError::Transient { retry_after, .. } => retry_after,
                _ => None,
            };
            assert_eq!(wait, Some(Duration::from_secs(pause)), "{code}");
        }
    }

    #[test]
    fn the_whitelist_error_says_what_to_do() {
        let message = api().classify(40164, "invalid ip 1.2.3.4", None).to_string();
        assert!(message.contains("IP whitelist") && message.contains("40164"), "{message}");
    }

    #[test]
    fn secrets_and_tokens_are_scrubbed_from_platform_messages() {
        let api = api();
        let error = api.classify(40125, "bad secret s3cret for token TOKEN123", Some("TOKEN123"));
        let shown = error.to_string();
        assert!(!shown.contains("s3cret") && !shown.contains("TOKEN123"), "{shown}");
        let error = api.classify(99999, &"长".repeat(1000), None).to_string();
        assert!(error.chars().count() < 400);
    }
}
