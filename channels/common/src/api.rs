//! Pieces every platform API client needs: error-code bookkeeping that logs a misconfiguration
//! once, scrubbing secrets from platform text, and transport errors without their URL.
//!
//! Invariant: text these helpers produce never contains a secret they were given, nor a request
//! URL (whose query may carry a token or secret).

use serde_json::Value;
use std::collections::HashSet;
use std::sync::Mutex;
use yizhan_channel_core::ChannelError;

/// How many characters of platform text an error keeps; it ends up in logs and journals.
pub const MAX_MESSAGE_CHARS: usize = 200;

/// The misconfiguration codes already reported, so that a broken setup is logged once per code
/// rather than once per message, and again if it comes back after calls succeeded.
#[derive(Debug, Default)]
pub struct ReportOnce {
    codes: Mutex<HashSet<i64>>,
}

impl ReportOnce {
    /// Nothing reported yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `code` is new since the last [`reset`](Self::reset): the caller logs it then.
    pub fn first(&self, code: i64) -> bool {
        self.codes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(code)
    }

    /// A call succeeded: whatever was misconfigured is fixed, so report it again if it returns.
    pub fn reset(&self) {
        let mut codes = self.codes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !codes.is_empty() {
            codes.clear();
        }
    }
}

/// Removes every non-empty `secrets` value from platform text before it goes into an error, and
/// bounds its length to [`MAX_MESSAGE_CHARS`] (plus `…`).
pub fn scrub(message: &str, secrets: &[&str]) -> String {
    let mut clean = message.to_owned();
    for secret in secrets {
        if !secret.is_empty() {
            clean = clean.replace(secret, "<redacted>");
        }
    }
    match clean.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((end, _)) => format!("{}…", &clean[..end]),
        None => clean,
    }
}

/// Calls `call(attempt)` (attempt 1, 2, …) until it succeeds, fails for good, or `attempts`
/// were made, waiting 250 ms × attempt after each transient failure, or as long as the platform
/// asked (`retry_after`, at most [`LONGEST_HINTED_WAIT`]) if that is longer: retrying inside a
/// rate limit's window only spends the attempts. Only for calls whose retry is safe:
/// deduplicated by the platform (a uuid), or made with a fresh sequence each time.
pub async fn retry_transient<T, Fut>(
    channel: &yizhan_channel_core::ChannelId,
    what: &str,
    attempts: u32,
    mut call: impl FnMut(u32) -> Fut,
) -> Result<T, yizhan_channel_core::ChannelError>
where
    Fut: std::future::Future<Output = Result<T, yizhan_channel_core::ChannelError>>,
{
    let mut attempt = 1;
    loop {
        match call(attempt).await {
            Err(error) if error.is_retryable() && attempt < attempts => {
                tracing::debug!(%channel, attempt, %error, "{what} failed; retrying.");
                let backoff = std::time::Duration::from_millis(250) * attempt;
                let hinted = match &error {
                    yizhan_channel_core::ChannelError::Transient { retry_after: Some(wait), .. } => {
                        (*wait).min(LONGEST_HINTED_WAIT)
                    }
                    _ => std::time::Duration::ZERO,
                };
                tokio::time::sleep(backoff.max(hinted)).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// The longest [`retry_transient`] waits for a platform's `retry_after` before its next try.
pub const LONGEST_HINTED_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest platform API answer read: tokens, message ids and errors are far smaller. A
/// misbehaving proxy at `api_base` cannot make a channel buffer more than this.
pub const MAX_API_ANSWER_BYTES: usize = 1 << 20;

/// Reads an API answer's body, at most [`MAX_API_ANSWER_BYTES`]; `None` when it is larger.
pub async fn read_bounded(mut response: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_API_ANSWER_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// `url` with any password in it (`https://user:token@proxy/v1`), and any query or fragment
/// (`…/v1?key=sk-…`), replaced, for logs and errors: secrets are never logged. Text that is not
/// a URL is kept up to its last `@`, if any, and up to its first `?` or `#`.
pub fn without_credentials(url: &str) -> String {
    match reqwest::Url::parse(url.trim()) {
        Ok(mut parsed) if parsed.host().is_some() => {
            let credentials = parsed.password().is_some() || !parsed.username().is_empty();
            if !credentials && parsed.query().is_none() && parsed.fragment().is_none() {
                return url.to_owned();
            }
            if credentials {
                // A lone user name may be the secret (`https://sk-…@gateway/v1`). Neither setter
                // can fail for a URL that has a host.
                let _ = parsed.set_password(parsed.password().map(|_| "***"));
                let _ = parsed.set_username("***");
            }
            if parsed.query().is_some() {
                parsed.set_query(Some("***"));
            }
            if parsed.fragment().is_some() {
                parsed.set_fragment(Some("***"));
            }
            parsed.to_string()
        }
        _ => {
            let (head, tail) = url.split_at(url.find(['?', '#']).unwrap_or(url.len()));
            let head = match head.rfind('@') {
                Some(at) => format!("***{}", &head[at..]),
                None => head.to_owned(),
            };
            match tail.chars().next() {
                Some(mark) => format!("{head}{mark}***"),
                None => head,
            }
        }
    }
}
/// Why `url` cannot be a base URL that API paths are appended to (`None` if it can): not an
/// http:// or https:// URL with a host, or one with a query or fragment (`…/v1?key=x` would
/// become `…/v1?key=x/chat/completions`). The reason shows the URL without its credentials.
pub fn base_url_problem(url: &str) -> Option<String> {
    let shown = without_credentials(url);
    let parsed = reqwest::Url::parse(url.trim())
        .ok()
        .filter(|parsed| matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some());
    match parsed {
        None => Some(format!("{shown:?} is not an http:// or https:// URL with a host")),
        Some(parsed) if parsed.query().is_some() || parsed.fragment().is_some() => Some(format!(
            "{shown:?} has a query or fragment, which the API paths would be appended to; \
             use a header or the API key setting for credentials"
        )),
        Some(_) => None,
    }
}

/// A platform's API base as the channels keep it: checked as [`base_url_problem`] does, without
/// surrounding whitespace or trailing slashes (paths are appended with their own `/`).
pub fn platform_api_base(url: &str) -> Result<String, String> {
    match base_url_problem(url) {
        Some(problem) => Err(problem),
        None => Ok(url.trim().trim_end_matches('/').to_owned()),
    }
}

/// The reason for a network-level failure talking to `platform` (`"WeChat"`): `request to
/// WeChat timed out`, or `request to WeChat failed: …` with the error's sources.
///
/// NOTE: `reqwest::Error`'s Display includes the URL, whose query may carry an access token or
/// secret, so the URL is removed before the error is formatted. Its sources (connect, TLS, I/O
/// errors) never contain the query.
pub fn transport_failure(error: reqwest::Error, platform: &str) -> String {
    if error.is_timeout() {
        return format!("request to {platform} timed out");
    }
    let error = error.without_url();
    let mut reason = format!("request to {platform} failed: {error}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    reason
}

/// Whether a failure talking to a platform after the request went out may have left the request
/// acted on: the platform got it and its answer was lost. For a send without an idempotency key
/// this is [`ChannelError::MaybeDelivered`] (sent once more at most, not up to every attempt).
/// Not a connect error (nothing was sent), not 502 or 503 (what a proxy answers when it could
/// not reach the platform, during an outage that retries must outlast; as 408 and 429, the
/// request was not taken); any other 5xx (500, 504, a CDN's 520–524) may have passed the
/// request on and got no answer. (A 502 after the platform took the request is the rare
/// exception.)
pub fn gateway_may_have_passed_on(status: u16) -> bool {
    (500..=599).contains(&status) && !matches!(status, 502 | 503)
}

/// `error`, as a failure that may have left the request acted on ([`ChannelError::Transient`]
/// becomes [`ChannelError::MaybeDelivered`]).
pub fn maybe_delivered(error: ChannelError) -> ChannelError {
    match error {
        ChannelError::Transient { reason, .. } => ChannelError::MaybeDelivered(reason),
        other => other,
    }
}

/// `error`, for a request whose repetition does no harm (a token fetch, or a send the platform
/// drops as a copy): [`ChannelError::MaybeDelivered`] becomes [`ChannelError::Transient`].
pub fn safe_to_repeat(error: ChannelError) -> ChannelError {
    match error {
        ChannelError::MaybeDelivered(reason) => ChannelError::Transient { reason, retry_after: None },
        other => other,
    }
}

/// Sends `request` to a WeChat-family API (公众号, WeCom) and returns the JSON object it answered
/// with, whatever its errcode, within `deadline` (a backstop around the whole exchange rather
/// than reqwest's per-request timeout, which would override a shorter timeout the hub
/// configured on its client).
///
/// A failure once the request may have gone out (a timeout or a broken connection after
/// connecting, an answer too large or not a JSON object, a 5xx that [may have passed the
/// request on](gateway_may_have_passed_on)) is [`ChannelError::MaybeDelivered`]: the caller
/// turns it back into a transient error ([`safe_to_repeat`]) where repeating does no harm.
/// HTTP errors go through [`status_error`] with `misconfigured`.
pub async fn wechat_family_exchange(
    request: reqwest::RequestBuilder,
    platform: &str,
    deadline: std::time::Duration,
    misconfigured: impl FnOnce(i64, &str, &str) -> ChannelError,
) -> Result<Value, ChannelError> {
    let after_sending = ChannelError::MaybeDelivered;
    let exchange = async {
        let response = request.send().await.map_err(|error| {
            let connect = error.is_connect();
            let reason = transport_failure(error, platform);
            if connect {
                ChannelError::Transient { reason, retry_after: None }
            } else {
                after_sending(reason)
            }
        })?;
        let status = response.status();
        let bytes = read_bounded(response)
            .await
            .map_err(|error| after_sending(transport_failure(error, platform)))?
            .ok_or_else(|| after_sending(format!("{platform}'s answer is larger than 1 MiB")))?;
        Ok::<_, ChannelError>((status, bytes))
    };
    let (status, bytes) = tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| after_sending(format!("request to {platform} timed out")))??;
    // A gateway's (the platform's own errors come as errcodes with 200).
    match status_error(platform, status.as_u16(), misconfigured) {
        Some(error) if gateway_may_have_passed_on(status.as_u16()) => return Err(maybe_delivered(error)),
        Some(error) => return Err(error),
        None => {}
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(answer @ Value::Object(_)) => Ok(answer),
        _ => Err(after_sending(format!("{platform}'s answer is not a JSON object"))),
    }
}

/// The WeChat family's (公众号, WeCom) `errcode` (0 when absent, as in successful token answers)
/// and `errmsg`.
pub fn wechat_errcode(answer: &Value) -> (i64, String) {
    (errcode_of(answer).unwrap_or(0), errmsg_of(answer))
}

/// [`wechat_errcode`] for an API call's answer, which always carries an errcode: one that has
/// none (or an unreadable one, from a proxy at `api_base`, say) is a transient failure, not a
/// success that would clear the part from the outbox unsent.
pub fn wechat_call_errcode(answer: &Value, platform: &str) -> Result<(i64, String), ChannelError> {
    match errcode_of(answer) {
        Some(code) => Ok((code, errmsg_of(answer))),
        None => {
            Err(ChannelError::Transient { reason: format!("{platform}'s answer has no errcode"), retry_after: None })
        }
    }
}

/// `errcode` read leniently: a number, a whole float (`45047.0`) or a quoted number, as a proxy
/// may rewrite it.
fn errcode_of(answer: &Value) -> Option<i64> {
    match answer.get("errcode")? {
        Value::Number(number) => number.as_i64().or_else(|| {
            number.as_f64().filter(|code| code.fract() == 0.0 && code.abs() < 1e15).map(|code| code as i64)
        }),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

fn errmsg_of(answer: &Value) -> String {
    answer.get("errmsg").and_then(Value::as_str).unwrap_or_default().to_owned()
}

/// The error a WeChat-family API's HTTP status means, `None` for a success. These APIs answer
/// their own errors with 200 and an errcode, so another status comes from the way there (a
/// proxy at `api_base`) or a broken server: 5xx, 429 and 408 are transient; 401, 403, 404, 405
/// and 407 (a wrong address, a proxy's access) and 3xx (a redirect, which the core's client
/// does not follow) need an operator, and go through `misconfigured(code, hint, message)` so the
/// channel logs them once; others are refusals.
pub fn status_error(
    platform: &str,
    status: u16,
    misconfigured: impl FnOnce(i64, &str, &str) -> ChannelError,
) -> Option<ChannelError> {
    let reason = format!("{platform} answered HTTP {status}");
    match status {
        200..=299 => None,
        408 | 429 | 500..=599 => Some(ChannelError::Transient { reason, retry_after: None }),
        401 | 403 | 404 | 405 | 407 => Some(misconfigured(
            i64::from(status),
            "the API answered with an HTTP error meant for a wrong address or a proxy; check `api_base` and any \
             proxy in front of it",
            &reason,
        )),
        // The core's client follows no redirect (one would turn a POST into a bodiless GET).
        300..=399 => Some(misconfigured(
            i64::from(status),
            "the API answered with a redirect: set `api_base` to the address it points to (https, no proxy \
             redirect in front of it)",
            &reason,
        )),
        _ => Some(ChannelError::Refused { code: i64::from(status), reason }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_base_url_takes_paths_only_without_a_query_or_fragment_and_its_secrets_are_not_shown() {
        for good in ["https://api.weixin.qq.com", "http://127.0.0.1:9/", " https://proxy.example/v1 "] {
            assert_eq!(base_url_problem(good), None, "{good}");
        }
        assert_eq!(platform_api_base(" http://127.0.0.1:9// ").as_deref(), Ok("http://127.0.0.1:9"));
        for (bad, reason) in [
            ("https://proxy.example/?key=sk-secret", "query"),
            ("https://proxy.example/#sk-secret", "fragment"),
            ("htps://user:sk-secret@proxy.example", "not an http"),
            ("ftp://proxy.example", "not an http"),
            ("", "not an http"),
        ] {
            let problem = base_url_problem(bad).unwrap_or_default();
            assert!(problem.contains(reason) && !problem.contains("sk-secret"), "{bad}: {problem}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_as_long_as_the_platform_asked_within_a_bound() {
        use std::time::Duration;
        use yizhan_channel_core::{ChannelError, ChannelId};
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        for (asked, waited) in [
            (None, Duration::from_millis(250)),
            (Some(Duration::from_millis(100)), Duration::from_millis(250)),
            (Some(Duration::from_secs(2)), Duration::from_secs(2)),
            (Some(Duration::from_secs(600)), LONGEST_HINTED_WAIT),
        ] {
            let started = tokio::time::Instant::now();
            let result = retry_transient(&channel, "test", 2, |attempt| async move {
                if attempt == 1 {
                    Err(ChannelError::Transient { reason: "rate limited".into(), retry_after: asked })
                } else {
                    Ok(started.elapsed())
                }
            })
            .await;
            assert_eq!(result.ok(), Some(waited), "{asked:?}");
        }
    }

    #[test]
    fn a_code_is_first_once_until_reset() {
        let reported = ReportOnce::new();
        assert!(reported.first(40164));
        assert!(!reported.first(40164));
        assert!(reported.first(40013));
        reported.reset();
        assert!(reported.first(40164));
    }

    #[test]
    fn secrets_are_redacted_and_long_text_is_cut() {
        let clean = scrub("bad secret s3cret for token TOKEN123", &["s3cret", "TOKEN123", ""]);
        assert_eq!(clean, "bad secret <redacted> for token <redacted>");
        let long = scrub(&"长".repeat(1000), &[]);
        assert_eq!(long.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(long.ends_with('…'));
        assert_eq!(scrub("短", &[]), "短");
    }

    #[test]
    fn errcode_defaults_to_zero_and_an_empty_message() {
        assert_eq!(wechat_errcode(&json!({"errcode": 40001, "errmsg": "bad"})), (40001, "bad".to_owned()));
        assert_eq!(wechat_errcode(&json!({"access_token": "t"})), (0, String::new()));
        for quoted in [json!({"errcode": "45047"}), json!({"errcode": 45047.0}), json!({"errcode": " 45047 "})] {
            assert_eq!(wechat_errcode(&quoted).0, 45047, "{quoted}");
        }
        for unreadable in [json!({}), json!({"errcode": "x"}), json!({"errcode": null}), json!({"error": "bad"})] {
            let result = wechat_call_errcode(&unreadable, "WeChat");
            assert!(matches!(result, Err(ChannelError::Transient { .. })), "{unreadable}: {result:?}");
        }
        assert_eq!(wechat_call_errcode(&json!({"errcode": 0, "errmsg": "ok"}), "WeChat").ok(), Some((0, "ok".into())));
    }

    #[tokio::test]
    async fn transport_failures_name_the_platform_but_not_the_url() {
        let error = reqwest::Client::new()
            .get("http://127.0.0.1:9/cgi-bin/x?access_token=SECRET")
            .send()
            .await
            .err()
            .unwrap_or_else(|| panic!("port 9 answered"));
        let reason = transport_failure(error, "WeChat");
        assert!(reason.starts_with("request to WeChat "), "{reason}");
        assert!(!reason.contains("SECRET"), "{reason}");
    }
}
