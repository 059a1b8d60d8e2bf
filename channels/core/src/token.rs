//! A single-flight cache for platform access tokens.
//!
//! Every platform hands out a short-lived token (WeChat `access_token`, WeCom `access_token`,
//! Feishu `tenant_access_token`). Refreshing too often invalidates tokens or burns a daily quota,
//! so the cache refreshes shortly before expiry, lets only one refresh run at a time, and makes
//! concurrent callers wait for that one instead of starting their own. When that one fails, the
//! callers that waited for it get its error rather than each trying again in turn (with a
//! token endpoint that hangs, the last of them would wait one timeout per caller ahead).

use crate::ChannelError;
use std::future::Future;
use std::sync::RwLock;
use std::time::Duration;
use tokio::time::Instant;

/// A token as the platform returned it. (`Debug` leaves the value out: it is a live credential.)
#[derive(Clone)]
pub struct AccessToken {
    /// The token.
    pub value: String,
    /// How long the platform says it stays valid.
    pub expires_in: Duration,
}

#[derive(Clone)]
struct Cached {
    value: String,
    refresh_at: Instant,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken").field("value", &"<redacted>").field("expires_in", &self.expires_in).finish()
    }
}

impl std::fmt::Debug for Cached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cached").field("value", &"<redacted>").field("refresh_at", &self.refresh_at).finish()
    }
}

/// A fetch that failed, and when.
#[derive(Debug)]
struct Failed {
    at: Instant,
    error: ChannelError,
}

/// Caches one account's token. Share it (`Arc`) between everything that calls the platform.
#[derive(Debug)]
pub struct TokenCache {
    cached: RwLock<Option<Cached>>,
    // NOTE: held across the fetch on purpose: it is what makes the refresh single-flight. It
    // guards the last fetch's failure, for the callers that waited for that fetch.
    refresh: tokio::sync::Mutex<Option<Failed>>,
    /// Refresh this long before the platform's expiry, so a token never expires mid-call.
    margin: Duration,
}

impl TokenCache {
    /// A cache that refreshes `margin` before expiry (WeChat: 5 min; Feishu: 30 min).
    pub fn new(margin: Duration) -> Self {
        Self { cached: RwLock::new(None), refresh: tokio::sync::Mutex::new(None), margin }
    }

    fn fresh(&self) -> Option<String> {
        let guard = self.cached.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.as_ref().filter(|cached| Instant::now() < cached.refresh_at).map(|cached| cached.value.clone())
    }

    /// Returns the cached token, or runs `fetch` (once, however many callers wait) to get one.
    pub async fn get<F, Fut>(&self, fetch: F) -> Result<String, ChannelError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<AccessToken, ChannelError>>,
    {
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let arrived = Instant::now();
        let mut last_failure = self.refresh.lock().await;
        // Someone else may have refreshed while we waited for the lock.
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        // Or failed to, after we arrived: that was the fetch we waited for.
        if let Some(failed) = last_failure.as_ref().filter(|failed| failed.at > arrived) {
            return Err(failed.error.clone());
        }
        let token = match fetch().await {
            Ok(token) => token,
            Err(error) => {
                *last_failure = Some(Failed { at: Instant::now(), error: error.clone() });
                return Err(error);
            }
        };
        *last_failure = None;
        // Capped: the lifetime comes from the platform (or a proxy at a configured base URL), and
        // `Instant + Duration` panics on overflow; no platform issues tokens for over a day. A
        // token that lives no longer than the margin is used for half its life, rather than
        // fetched again by every caller.
        let claimed = token.expires_in.min(MAX_TOKEN_LIFETIME);
        // At least a few seconds: a lifetime of 0 (a proxy that leaves `expires_in` out) would
        // have every call fetch a token; one the platform refuses is fetched again anyway.
        let lifetime =
            if claimed > self.margin { claimed - self.margin } else { claimed / 2 }.max(SHORTEST_TOKEN_REUSE);
        let mut guard = self.cached.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = Some(Cached { value: token.value.clone(), refresh_at: Instant::now() + lifetime });
        Ok(token.value)
    }

    /// Forgets `rejected` after the platform refused it, so the next `get` fetches a new one.
    /// A token that was already replaced by another caller is left alone.
    pub fn invalidate(&self, rejected: &str) {
        let mut guard = self.cached.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.as_ref().is_some_and(|cached| cached.value == rejected) {
            *guard = None;
        }
    }
}

/// The longest a token is trusted, whatever lifetime the platform claims.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The shortest a token is reused, whatever lifetime the platform claims.
const SHORTEST_TOKEN_REUSE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn token(value: &str, secs: u64) -> AccessToken {
        AccessToken { value: value.into(), expires_in: Duration::from_secs(secs) }
    }

    #[tokio::test(start_paused = true)]
    async fn debug_output_leaves_the_token_out() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let got = cache.get(|| async { Ok(token("SECRET_T", 7200)) }).await;
        assert_eq!(got.ok().as_deref(), Some("SECRET_T"));
        let shown = format!("{cache:?} {:?}", token("SECRET_T", 7200));
        assert!(!shown.contains("SECRET_T") && shown.contains("redacted"), "{shown}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_refresh() {
        let cache = Arc::new(TokenCache::new(Duration::from_secs(300)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (cache, fetches) = (cache.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(|| async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(token("t1", 7200))
                    })
                    .await
            }));
        }
        for task in tasks {
            let value = task.await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(value.ok().as_deref(), Some("t1"));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_is_refreshed_before_it_expires() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let first = cache.get(|| async { Ok(token("t1", 7200)) }).await.ok();
        assert_eq!(first.as_deref(), Some("t1"));
        tokio::time::advance(Duration::from_secs(6800)).await;
        let cached = cache.get(|| async { Ok(token("t2", 7200)) }).await.ok();
        assert_eq!(cached.as_deref(), Some("t1"));
        tokio::time::advance(Duration::from_secs(200)).await;
        let renewed = cache.get(|| async { Ok(token("t2", 7200)) }).await.ok();
        assert_eq!(renewed.as_deref(), Some("t2"));
    }

    #[tokio::test]
    async fn invalidating_a_rejected_token_forces_a_fetch_but_spares_a_newer_one() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let _ = cache.get(|| async { Ok(token("t1", 7200)) }).await;
        cache.invalidate("t0");
        let still = cache.get(|| async { Ok(token("t2", 7200)) }).await.ok();
        assert_eq!(still.as_deref(), Some("t1"));
        cache.invalidate("t1");
        let renewed = cache.get(|| async { Ok(token("t2", 7200)) }).await.ok();
        assert_eq!(renewed.as_deref(), Some("t2"));
    }

    #[tokio::test]
    async fn a_failed_fetch_is_reported_and_not_cached() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let failed = cache.get(|| async { Err(ChannelError::Misconfigured("bad secret".into())) }).await;
        assert!(failed.is_err());
        let ok = cache.get(|| async { Ok(token("t1", 7200)) }).await.ok();
        assert_eq!(ok.as_deref(), Some("t1"));
    }

    #[tokio::test(start_paused = true)]
    async fn callers_that_waited_for_a_failed_fetch_get_its_error_without_fetching_again() {
        let cache = Arc::new(TokenCache::new(Duration::from_secs(300)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let (cache, fetches) = (cache.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(|| async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        Err(ChannelError::Transient { reason: "token endpoint timed out".into(), retry_after: None })
                    })
                    .await
            }));
        }
        for task in tasks {
            let result = task.await.unwrap_or_else(|e| panic!("{e}"));
            assert!(matches!(result, Err(ChannelError::Transient { .. })), "{result:?}");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // A caller that comes later tries again.
        tokio::time::advance(Duration::from_millis(1)).await;
        let later = cache.get(|| async { Ok(token("t1", 7200)) }).await;
        assert_eq!(later.ok().as_deref(), Some("t1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_shorter_lived_than_the_margin_is_used_for_half_its_life() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let first = cache.get(|| async { Ok(token("short", 200)) }).await;
        assert_eq!(first.ok().as_deref(), Some("short"));
        tokio::time::advance(Duration::from_secs(99)).await;
        let cached = cache.get(|| async { Ok(token("next", 200)) }).await;
        assert_eq!(cached.ok().as_deref(), Some("short"));
        tokio::time::advance(Duration::from_secs(2)).await;
        let renewed = cache.get(|| async { Ok(token("next", 200)) }).await;
        assert_eq!(renewed.ok().as_deref(), Some("next"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_claimed_to_live_no_time_is_still_reused_for_a_few_seconds() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let first = cache.get(|| async { Ok(token("zero", 0)) }).await;
        assert_eq!(first.ok().as_deref(), Some("zero"));
        let cached = cache.get(|| async { Ok(token("next", 0)) }).await;
        assert_eq!(cached.ok().as_deref(), Some("zero"));
        tokio::time::advance(SHORTEST_TOKEN_REUSE).await;
        let renewed = cache.get(|| async { Ok(token("next", 0)) }).await;
        assert_eq!(renewed.ok().as_deref(), Some("next"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_lifetime_is_capped_instead_of_overflowing_the_clock() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let first = cache.get(|| async { Ok(token("forever", u64::MAX)) }).await;
        assert_eq!(first.ok().as_deref(), Some("forever"));
        tokio::time::advance(MAX_TOKEN_LIFETIME).await;
        let second = cache.get(|| async { Ok(token("next", 7200)) }).await;
        assert_eq!(second.ok().as_deref(), Some("next"));
    }
}
