//! Builds the actors, the channel directory and the HTTP server from a [`Config`].

use crate::channels::ChannelKinds;
use crate::config::{Config, LlmBackendKind, ReplyMode, StoreKind};
use crate::delivery::{ChannelActor, RetryPolicy, SendGate};
use crate::http::{
    healthz, keep_body_until_sent, metrics as metrics_route, watch_for_stalls, webhook, AppState, BodyLimits,
};
use crate::hub::{ChannelEntry, Hub, HubInner};
use crate::llm::client::{build_http_client, LlmClientSettings};
use crate::llm::lobehub::{LobeHubBackend, LobeHubSettings};
use crate::llm::openai::{OpenAiBackend, OpenAiSettings};
use crate::llm::{LlmActor, LlmBackend, LlmClient, LlmError};
use crate::metrics::Metrics;
use crate::routing::Router;
use crate::session::SessionRegistry;
use crate::store::{MemoryStore, SqliteOptions, SqliteStore, Store};
use actix::{Actor, Arbiter};
use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

/// Seconds actix-web waits for open connections (a held 公众号 attempt, keep-alive) after the
/// wait for answers: held answers are pushed or parked by then, and acknowledgements are quick.
const CONNECTION_DRAIN_SECS: u64 = 1;

/// A built, not yet running, Yizhan.
pub struct Application {
    port: u16,
    server: Server,
    hub: Hub,
    shutdown_timeout: Duration,
    retention: Duration,
    /// Where an earlier version's graceful stop saved parked answers (durable stores only; set
    /// when parked answers are saved in the store, see `spawn_parked_saver`).
    parked_file: Option<std::path::PathBuf>,
    /// The model's client and `base_url`, for the start-up probe.
    llm_probe: (LlmClient, String),
    /// The actor threads (LLM, delivery, sessions), stopped at exit before the store's flush.
    arbiters: Vec<Arbiter>,
    /// Closed at exit, before the delivery thread stops (see `write_what_is_left`).
    send_gate: SendGate,
    /// SIGTERM/SIGINT, listened for from the start of `build`: one that comes while the store
    /// opens or the last run's messages resume then stops Yizhan gracefully once it serves,
    /// instead of killing it outright (the signals' default).
    signals: Signals,
}

/// Stops an application's actor threads (LLM, delivery, sessions) when dropped. For an
/// application that is never stopped by a signal (a test's): its actors would otherwise go on
/// after it, retrying sends into stand-in servers that later tests reuse.
pub struct ActorThreads(Vec<actix::ArbiterHandle>);

impl Drop for ActorThreads {
    fn drop(&mut self) {
        for arbiter in &self.0 {
            arbiter.stop();
        }
    }
}

fn build_llm_client(config: &Config) -> anyhow::Result<LlmClient> {
    let llm = &config.llm;
    let http = build_http_client(llm.connect_timeout());
    let backend: Arc<dyn LlmBackend> = match llm.backend {
        LlmBackendKind::Openai => Arc::new(OpenAiBackend::new(
            OpenAiSettings {
                base_url: llm.base_url.clone(),
                api_key: llm.api_key.clone(),
                model: llm.model.clone().unwrap_or_default(),
                temperature: llm.temperature,
                max_tokens: llm.max_tokens,
                include_usage: llm.include_usage,
                send_user: llm.send_user,
                strip_think: llm.strip_think,
                think_open_in_prompt: llm.think_open_in_prompt,
            },
            http,
        )),
        LlmBackendKind::Lobehub => Arc::new(LobeHubBackend::new(
            LobeHubSettings {
                base_url: llm.base_url.clone(),
                api_key: llm.api_key.clone(),
                agent_id: llm.agent_id.clone(),
                model: llm.model.clone(),
                provider: llm.provider.clone(),
                strip_think: llm.strip_think,
                send_user: llm.send_user,
            },
            http,
        )),
    };
    Ok(LlmClient::new(
        backend,
        LlmClientSettings {
            first_token_timeout: Duration::from_secs(llm.first_token_timeout_secs),
            total_timeout: Duration::from_secs(llm.total_timeout_secs),
            max_retries: llm.max_retries,
            retry_base_delay: Duration::from_millis(200),
        },
    ))
}

fn build_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    // One turn more than a session loads: the newest turn is taken out again when its answer
    // reached no one (`Store::forget_turn`), and the oldest, trimmed when it went in, must
    // still be there then.
    let max_turns_kept = config.session.history_max_turns.max(1).saturating_add(1);
    match config.store.kind {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::new(max_turns_kept))),
        StoreKind::Sqlite => {
            let options = SqliteOptions {
                max_turns_kept,
                durability: config.store.durability,
                commit_delay: Duration::from_micros(config.store.commit_delay_us),
                ..SqliteOptions::default()
            };
            let store = SqliteStore::open(&config.store.path, options).with_context(|| {
                format!("Failed to open the SQLite store {} (config key `store.path`)", config.store.path.display())
            })?;
            tracing::info!(path = %config.store.path.display(), "SQLite store open.");
            Ok(Arc::new(store))
        }
    }
}

/// Validates what `build` would, without binding or connecting: the config, every channel's
/// own settings, that `server.bind` is an address, and that `store.path` can be a database
/// file. For `yizhan check`.
pub fn check(config: &Config, kinds: &ChannelKinds) -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    let bind = &config.server.bind;
    let addresses = bind.to_socket_addrs().with_context(|| format!("`server.bind` = {bind:?} is not an address"))?;
    anyhow::ensure!(addresses.count() > 0, "`server.bind` = {bind:?} names no address");
    if config.store.kind == StoreKind::Sqlite {
        let path = &config.store.path;
        anyhow::ensure!(!path.is_dir(), "`store.path` = {} is a directory, not a database file", path.display());
        // The first ancestor that exists must be a directory (the rest is created at start).
        if let Some(existing) = path.ancestors().skip(1).find(|ancestor| ancestor.exists()) {
            anyhow::ensure!(
                existing.is_dir(),
                "`store.path` = {}: {} is not a directory",
                path.display(),
                existing.display()
            );
        }
    }
    let http = reqwest::Client::new();
    for entry in &config.channels {
        let channel = kinds.build(&entry.settings, &http).map_err(|error| anyhow::anyhow!("{error}"))?;
        let capabilities = channel.capabilities();
        let (passive_window, _) = reply_path(entry, capabilities.passive_reply_window)?;
        more_hint_fits(config, entry, passive_window, capabilities.max_part_bytes)?;
    }
    Ok(())
}

/// Parts the send API may carry per user message (`None`: unlimited): the configured number
/// (0 = unlimited), else 5 where the platform has passive replies (the 公众号 quota).
fn send_quota(entry: &crate::config::ChannelConfig, passive_window: Option<Duration>) -> Option<usize> {
    match entry.core.send_quota_per_message {
        Some(0) => None,
        Some(quota) => Some(quota),
        None => passive_window.map(|_| 5),
    }
}

/// Where answers can be parked (a passive window or a send quota), the continue hint goes at
/// the end of a part: it must leave room for text, or every part would be the hint alone (and
/// over the limit) and the answer would never move on.
fn more_hint_fits(
    config: &Config,
    entry: &crate::config::ChannelConfig,
    passive_window: Option<Duration>,
    max_part_bytes: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        max_part_bytes > 0,
        "channel {:?} ({}) says its parts hold 0 bytes (`max_part_bytes`): nothing could be sent",
        entry.core.id,
        entry.core.kind
    );
    let can_park = passive_window.is_some() || send_quota(entry, passive_window).is_some();
    let hint = config.messages.more_hint.len() + 1;
    if can_park && hint > max_part_bytes / 2 {
        anyhow::bail!(
            "config key `messages.more_hint` is {} bytes, too long for channel {:?}, whose parts hold {max_part_bytes} \
             bytes: keep it under half of that",
            hint - 1,
            entry.core.id
        );
    }
    // Parked text goes out under this prefix: a prefix that fills the part with the hint would be
    // all the user ever saw, parked again (prefix included) at each 「继续」. A few characters
    // of text at least must fit beside them.
    const TEXT_ROOM: usize = 16;
    let prefix = config.messages.parked_prefix.len() + 1;
    if can_park && prefix + hint + TEXT_ROOM > max_part_bytes {
        anyhow::bail!(
            "config keys `messages.parked_prefix` and `messages.more_hint` take {} bytes together, too long for \
             channel {:?}, whose parts hold {max_part_bytes} bytes: keep them {TEXT_ROOM} bytes under that at least",
            prefix + hint - 2,
            entry.core.id
        );
    }
    Ok(())
}

/// The channel's passive-reply window (the platform's, or the config's override of it) and its
/// reply mode, refusing a mode the platform cannot serve.
fn reply_path(
    entry: &crate::config::ChannelConfig,
    platform_window: Option<Duration>,
) -> anyhow::Result<(Option<Duration>, ReplyMode)> {
    let passive_window = match (platform_window, entry.core.passive_window_ms) {
        // Only a shorter window makes sense (a proxy's latency; tests): the platform hangs up at
        // its own deadline, and an answer held past it would be written to a closed connection.
        (Some(platform), Some(ms)) if u128::from(ms) > platform.as_millis() => anyhow::bail!(
            "config key `channels[{}].passive_window_ms`: {ms} ms is longer than {}'s own {} ms passive window, \
             after which the platform no longer waits for the answer",
            entry.core.id,
            entry.core.kind,
            platform.as_millis()
        ),
        (Some(_), Some(ms)) => Some(Duration::from_millis(ms)),
        (None, Some(_)) => anyhow::bail!(
            "config key `channels[{}].passive_window_ms`: {} has no passive replies, so there is no window to set",
            entry.core.id,
            entry.core.kind
        ),
        (window, None) => window,
    };
    // Attempts stop taking the answer this long before their deadline: at or past the window,
    // no attempt would ever wait for one.
    if let Some(window) = passive_window.filter(|window| u128::from(entry.core.passive_margin_ms) >= window.as_millis())
    {
        anyhow::bail!(
            "config key `channels[{}].passive_margin_ms`: {} ms leaves no time in the {} ms passive window",
            entry.core.id,
            entry.core.passive_margin_ms,
            window.as_millis()
        );
    }
    let default_mode = if passive_window.is_some() { ReplyMode::Auto } else { ReplyMode::Push };
    let reply_mode = entry.core.reply_mode.unwrap_or(default_mode);
    if reply_mode != ReplyMode::Push && passive_window.is_none() {
        anyhow::bail!(
            "config key `channels[{}].reply_mode`: `{}` needs passive replies, which {} does not have",
            entry.core.id,
            format!("{reply_mode:?}").to_lowercase(),
            entry.core.kind
        );
    }
    Ok((passive_window, reply_mode))
}

impl Application {
    /// Builds with the built-in channel kinds. Must run inside an actix system.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with(config, ChannelKinds::builtin()).await
    }

    /// Builds with the given channel kinds (built-ins plus plugins). Must run inside an actix
    /// system.
    pub async fn build_with(config: Config, kinds: ChannelKinds) -> anyhow::Result<Self> {
        let signals = Signals::listen();
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let metrics = Metrics::new();
        let store = build_store(&config)?;
        let llm_client = build_llm_client(&config)?;
        // Logged by the probe: without a password a proxy URL may carry.
        let llm_probe = (llm_client.clone(), crate::config::without_credentials(&config.llm.base_url));
        let llm_arbiter = Arbiter::new();
        let delivery_arbiter = Arbiter::new();
        let (max_concurrency, max_waiting) = (config.llm.max_concurrency, config.llm.max_waiting);
        let breaker = crate::llm::breaker::BreakerSettings {
            threshold: config.llm.breaker_threshold,
            cooldown: Duration::from_secs(config.llm.breaker_cooldown_secs),
        };
        let llm_metrics = metrics.clone();
        let llm = LlmActor::start_in_arbiter(&llm_arbiter.handle(), move |_| {
            LlmActor::new(llm_client, max_concurrency, max_waiting, llm_metrics).with_breaker(breaker)
        });

        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            // A redirect would turn a POST into a bodiless GET (and a login page's 200 into a
            // delivery): no platform API redirects, so a 3xx is the channel's to read as an error.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("Failed to build the HTTP client for platform APIs")?;
        let policy = RetryPolicy::from(&config.delivery);
        let send_gate = SendGate::default();
        let mut channels = HashMap::with_hasher(foldhash::fast::RandomState::default());
        for entry in &config.channels {
            let channel = kinds.build(&entry.settings, &http).map_err(|error| anyhow::anyhow!("{error}"))?;
            let (actor_channel, actor_store) = (channel.clone(), store.clone());
            let (actor_policy, actor_metrics, actor_gate) = (policy.clone(), metrics.clone(), send_gate.clone());
            let outbound = ChannelActor::start_in_arbiter(&delivery_arbiter.handle(), move |_| {
                ChannelActor::new(actor_channel, actor_store, actor_policy, actor_metrics, actor_gate)
            });
            let system_prompt = entry.core.system_prompt.clone().unwrap_or_else(|| config.llm.system_prompt());
            tracing::info!(channel = %entry.settings.id, kind = %entry.settings.kind, "Channel ready.");
            let group_per_user = entry.core.group_context == crate::config::GroupContext::PerUser;
            let capabilities = channel.capabilities();
            let (passive_window, reply_mode) = reply_path(entry, capabilities.passive_reply_window)?;
            let send_quota = send_quota(entry, passive_window);
            more_hint_fits(&config, entry, passive_window, capabilities.max_part_bytes)?;
            channels.insert(
                entry.settings.id.clone(),
                ChannelEntry {
                    channel,
                    outbound,
                    system_prompt,
                    group_per_user,
                    reply_mode,
                    passive_window,
                    passive_margin: Duration::from_millis(entry.core.passive_margin_ms),
                    menu: entry.core.menu.clone(),
                    send_quota,
                },
            );
        }

        let hub = Hub::new(HubInner {
            store,
            llm,
            channels,
            messages: config.messages.clone(),
            session: config.session.clone(),
            dedupe_ttl: Duration::from_secs(config.store.dedupe_ttl_secs),
            metrics,
            passive: Default::default(),
            resumed_streams: Default::default(),
        });
        let session_arbiters: Vec<Arbiter> = (0..config.session.threads).map(|_| Arbiter::new()).collect();
        let sessions = SessionRegistry::new(
            hub.clone(),
            Duration::from_secs(config.session.idle_timeout_secs),
            session_arbiters.iter().map(Arbiter::handle).collect(),
        );
        let router = Router::new(hub.clone(), sessions);
        let parked_file = (config.store.kind == StoreKind::Sqlite).then(|| parked_file_of(&config.store.path));
        // Bound before anything the last run left is resumed: a start that fails here must not
        // have asked the model or sent parts (the next start would send them again). Until the
        // server runs, connections wait in the kernel's backlog, behind the resumed messages.
        let listener = TcpListener::bind(&config.server.bind)
            .with_context(|| format!("Failed to bind {} (config key `server.bind`)", config.server.bind))?;
        let port = listener.local_addr().context("Failed to read the bound address")?.port();
        // Not started without them: their claims would answer the platform's retries as
        // duplicates while nothing answered the messages (they stay journaled for the next
        // attempt to start).
        let pending = hub.store.unfinished().await.context(
            "Failed to read the messages the last run left unanswered (they stay journaled; fix the store and start again)",
        )?;
        if let Some(path) = &parked_file {
            // Saved from now on, the ones taken back here included (and what resumed messages
            // park before the server runs).
            hub.passive.keep_parked_durably();
            spawn_parked_saver(&hub);
            take_back_parked(&hub, &pending).await?;
            load_parked_file(&hub, path);
        }
        resume_unfinished(&hub, &router, pending);

        let body = BodyLimits {
            max_bytes: config.server.body_limit_bytes,
            timeout: Duration::from_millis(config.server.body_timeout_ms),
        };
        let state =
            web::Data::new(AppState { hub: hub.clone(), router: router.clone(), body, refusals: Default::default() });
        let stalled_after = Duration::from_secs(config.server.stalled_connection_secs);
        let mut server = HttpServer::new(move || {
            App::new()
                .wrap_fn(keep_body_until_sent)
                .app_data(state.clone())
                .route("/healthz", web::get().to(healthz))
                .route("/metrics", web::get().to(metrics_route))
                .route("/webhooks/{channel_id}", web::route().to(webhook))
        })
        .on_connect(move |connection, extensions| watch_for_stalls(connection, extensions, stalled_after))
        // Signals are handled in `run_until_stopped`, which drains accepted messages before the
        // workers (and the sessions running on them) stop.
        .disable_signals()
        // Connections get only this once the wait for answers (the configured bound) is over;
        // actix-web's graceful stop cannot be cut short once started.
        .shutdown_timeout(CONNECTION_DRAIN_SECS);
        if config.server.workers > 0 {
            server = server.workers(config.server.workers);
        }
        let server = server.listen(listener).context("Failed to start the HTTP server")?.run();
        tracing::info!(port, "Yizhan listening.");
        let mut arbiters = vec![llm_arbiter, delivery_arbiter];
        arbiters.extend(session_arbiters);
        let shutdown_timeout = Duration::from_secs(config.server.shutdown_timeout_secs);
        let retention = Duration::from_secs(config.store.retention_days.saturating_mul(86_400));
        Ok(Self {
            port,
            server,
            hub,
            shutdown_timeout,
            retention,
            parked_file,
            llm_probe,
            arbiters,
            send_gate,
            signals,
        })
    }

    /// The port the server listens on (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What stops the actor threads when dropped (see [`ActorThreads`]).
    pub fn actor_threads(&self) -> ActorThreads {
        ActorThreads(self.arbiters.iter().map(Arbiter::handle).collect())
    }

    /// Serves until SIGINT/SIGTERM, then stops gracefully: no new connections, accepted messages
    /// get up to `shutdown_timeout_secs` to be answered (sessions keep running meanwhile), then
    /// in-flight requests finish and the workers stop. Whatever is still open is in the journal
    /// and resumes at the next start. Then exit the process (`std::process::exit`) rather than
    /// drop the runtime, which waits without a bound for blocking tasks, as Yizhan's `main` does.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.spawn_retention();
        self.spawn_parked_expiry();
        self.spawn_llm_probe();
        let handle = self.server.handle();
        // Taken back at build (an earlier version's graceful stop wrote it); removed only once
        // what it held is saved in the store (a start that failed leaves it for the next one).
        if let Some(path) = &self.parked_file {
            save_parked_and_drop_legacy_file(&self.hub, path).await;
        }
        let (hub, shutdown_timeout) = (self.hub.clone(), self.shutdown_timeout);
        let mut signals = self.signals;
        actix::spawn(async move {
            signals.recv().await;
            // Listening again before anything else: an operator's second Ctrl-C or SIGTERM
            // stops the wait (what is unanswered resumes at the next start).
            let mut again = Signals::listen();
            tracing::info!("Shutting down: no new connections; answering what was accepted.");
            handle.pause().await;
            // No platform retry can reach a held passive answer any more: push those now
            // rather than after the fallback timer, which the shutdown bound may not outlast.
            for (job, held) in hub.passive.close_for_shutdown() {
                crate::delivery::spawn_push_held(&hub, job, held);
            }
            let deadline = std::time::Instant::now() + shutdown_timeout;
            while hub.metrics.journal_open.get() > 0 && std::time::Instant::now() < deadline {
                tokio::select! {
                    () = again.recv() => {
                        tracing::warn!("A second signal: stopping without waiting for the rest.");
                        break;
                    }
                    () = actix::clock::sleep(Duration::from_millis(50)) => {}
                }
            }
            // Attempts still held answer now, while their connections are open.
            hub.passive.stop_waiting();
            let open = hub.metrics.journal_open.get();
            if open > 0 {
                tracing::warn!(open, "Stopping with messages unanswered; they resume at the next start.");
            } else {
                tracing::info!("Every accepted message was answered.");
            }
            handle.stop(true).await;
        });
        let served = self.server.await;
        // Bounded as a whole: the stop has taken `shutdown_timeout_secs` and the connections'
        // drain already.
        let left = write_what_is_left(&self.hub, &self.send_gate, self.arbiters, self.parked_file.as_deref());
        if tokio::time::timeout(EXIT_WRITES_TIMEOUT, left).await.is_err() {
            tracing::error!("What was left to write at exit did not get written in time; exiting anyway.");
            // Its last reference dropped, the store would join its threads, which first finish
            // what is queued (the stuck write included): the exit would wait for the disk after
            // all. Never dropped, the threads end with the process.
            std::mem::forget(Arc::clone(&self.hub.store));
        }
        served
    }

    /// Asks the model's server once whether it is there and takes the key, and says so in the
    /// log: the start does not wait for it (the server may come up later; users get the apology
    /// until it does).
    fn spawn_llm_probe(&self) {
        let (client, base_url) = self.llm_probe.clone();
        actix::spawn(async move {
            let Some(probe) = client.probe() else { return };
            let backend = client.backend_name();
            match probe.await {
                Ok(()) => tracing::info!(backend, %base_url, "The LLM server answers."),
                Err(error) => {
                    let hint = match &error {
                        LlmError::Status { status: 401 | 403, .. } => "check `llm.api_key`",
                        LlmError::Status { status: 404, .. } => "check `llm.base_url` (and `llm.backend`)",
                        LlmError::Connect(_) => "is it running, and is `llm.base_url` right?",
                        _ => "users get the apology until it answers",
                    };
                    tracing::warn!(backend, %base_url, %error, hint, "The LLM server did not answer the start-up check.");
                }
            }
        });
    }

    /// Forgets, hourly, the parked answers of users for whom nothing was parked or taken for
    /// [`parked_lifetime`].
    fn spawn_parked_expiry(&self) {
        let (hub, lifetime) = (self.hub.clone(), parked_lifetime(self.retention));
        actix::spawn(async move {
            let mut interval = actix::clock::interval(Duration::from_secs(3_600));
            loop {
                interval.tick().await;
                let Some(cutoff) = std::time::Instant::now().checked_sub(lifetime) else {
                    continue;
                };
                let forgotten = hub.passive.forget_parked_before(cutoff);
                if forgotten > 0 {
                    tracing::info!(
                        forgotten,
                        days = lifetime.as_secs() / 86_400,
                        "Forgot parked answers left untouched."
                    );
                }
            }
        });
    }

    /// Prunes history and finished journal entries older than the retention period, at start
    /// and then hourly.
    fn spawn_retention(&self) {
        if self.retention.is_zero() {
            return;
        }
        let (store, retention) = (self.hub.store.clone(), self.retention);
        actix::spawn(async move {
            let mut interval = actix::clock::interval(Duration::from_secs(3_600));
            loop {
                interval.tick().await;
                // `checked_sub`: a retention longer than the epoch (a huge `retention_days`) keeps all.
                let before = std::time::SystemTime::now().checked_sub(retention).unwrap_or(std::time::UNIX_EPOCH);
                match store.prune(before).await {
                    Ok(0) => {}
                    Ok(rows) => tracing::info!(rows, "Pruned old history and journal entries."),
                    Err(error) => tracing::warn!(%error, "Pruning failed; retrying in an hour."),
                }
            }
        });
    }
}

/// How long parked answers wait for their user: a week
/// ([`PARKED_FOR`](crate::delivery::passive::PARKED_FOR)), or the retention period if that is
/// shorter (`0`: no pruning), which is the operator's word on how long conversation text is kept.
fn parked_lifetime(retention: Duration) -> Duration {
    if retention.is_zero() {
        crate::delivery::passive::PARKED_FOR
    } else {
        retention.min(crate::delivery::passive::PARKED_FOR)
    }
}

/// How long the exit waits, after the stop, for what is left to be written (see
/// `write_what_is_left`).
const EXIT_WRITES_TIMEOUT: Duration = Duration::from_secs(7);

/// How long, of [`EXIT_WRITES_TIMEOUT`], the exit waits for sends already on the wire.
const SEND_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long, of [`EXIT_WRITES_TIMEOUT`], the exit waits for the actor threads to stop.
const ACTOR_JOIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How many of WeChat's tries came for a message `age_ms` old, resumed now: the first only
/// while its window (less a second, for clocks and the network) is not over, as WeChat retries
/// only a try it gave up on; otherwise the next may be the last, and is answered as the last
/// (with `success` before its deadline rather than the platform's error page).
fn attempts_before_resuming(age_ms: i64, window: Duration) -> u32 {
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    if age_ms.saturating_add(1_000) < window_ms {
        1
    } else {
        2
    }
}

/// The file next to the database where earlier versions kept parked answers across a graceful
/// restart.
fn parked_file_of(database: &std::path::Path) -> std::path::PathBuf {
    crate::store::beside(database, ".parked.json")
}

/// Takes back the parked answers the store kept (see `spawn_parked_saver`); `pending` is what
/// the last run left unfinished, which decides what becomes of text it saved as taken.
async fn take_back_parked(hub: &Hub, pending: &[crate::store::Unfinished]) -> anyhow::Result<()> {
    use crate::delivery::passive::{ParkedRecord, PassiveSlots};
    let saved = hub.store.load_parked().await.context("Failed to read the parked answers")?;
    let answered: HashMap<&str, bool> = pending
        .iter()
        .map(|unfinished| (unfinished.envelope.id.as_str(), unfinished.pending_parts.is_some()))
        .collect();
    let now = std::time::SystemTime::now();
    let (mut records, mut changed) = (Vec::with_capacity(saved.len()), std::collections::HashSet::new());
    for (json, saved_at) in saved {
        match serde_json::from_str::<ParkedRecord>(&json) {
            Ok(mut record) => {
                let since = now.duration_since(saved_at).unwrap_or_default().as_secs();
                record.age_secs = record.age_secs.saturating_add(since);
                let (had_taken, continuing) = PassiveSlots::restore_taken(&mut record, |id| answered.get(id).copied());
                if had_taken {
                    changed.insert((record.channel.clone(), record.user.clone()));
                }
                // Their answers are sent again from their parts; what of them is parked again
                // goes where the text they took was, not behind later answers.
                for (envelope_id, place) in continuing {
                    hub.passive.continue_in_place(&envelope_id, place);
                }
                records.push(record);
            }
            // Dropped from the store with the next change of that user's parked answers.
            Err(error) => tracing::error!(%error, "A user's parked answers are unreadable; skipped."),
        }
    }
    if !records.is_empty() {
        let texts = hub
            .passive
            .import_parked_with(records, |record| changed.contains(&(record.channel.clone(), record.user.clone())));
        tracing::info!(texts, "Parked answers taken back.");
    }
    Ok(())
}

/// Saves parked answers as they change (durable stores only), so that a crash loses none.
fn spawn_parked_saver(hub: &Hub) {
    let hub = hub.clone();
    actix::spawn(async move {
        loop {
            hub.passive.unsaved_changes().await;
            if !hub.passive.save_parked(hub.store.as_ref()).await {
                // The failed users are noted again: not in a tight loop.
                actix::clock::sleep(Duration::from_secs(1)).await;
            }
        }
    });
}

/// The end of a stop: no send begins any more, and those on the wire get at most
/// [`SEND_DRAIN_TIMEOUT`] to be answered and recorded; the actor threads are stopped and
/// waited for, at most [`ACTOR_JOIN_TIMEOUT`], so that nothing they run queues a write after
/// this (one held by a hung blocking task, a DNS lookup, is left behind); then parked answers
/// changed since the last save are saved, and the store writes what is queued (a part the
/// platform confirmed, not recorded, would be sent again by the next start). A send still
/// waiting on the platform after that is cut off and left pending, for the next start to send
/// (as is a record still waiting for room in a full store queue).
async fn write_what_is_left(
    hub: &Hub,
    send_gate: &SendGate,
    arbiters: Vec<Arbiter>,
    parked_file: Option<&std::path::Path>,
) {
    // Cut off, a send the platform took would be left pending, and sent again by the next start
    // (the 公众号's send API takes no idempotency key).
    send_gate.close();
    if !send_gate.wire_cleared(SEND_DRAIN_TIMEOUT).await {
        tracing::warn!("Sends still on the wire are cut off; their parts are sent again at the next start.");
    }
    for arbiter in &arbiters {
        arbiter.stop();
    }
    // Joined on a thread of its own, not a blocking task: the runtime's end waits for those,
    // and a thread that does not stop would hold the exit past its bound.
    let (stopped, all_stopped) = tokio::sync::oneshot::channel();
    let joiner = std::thread::Builder::new().name("actor-join".into()).spawn(move || {
        for arbiter in arbiters {
            if arbiter.join().is_err() {
                tracing::error!("An actor thread panicked while stopping.");
            }
        }
        let _ = stopped.send(());
    });
    match joiner {
        // Bounded on its own: a thread whose runtime waits for a blocking task (a DNS lookup
        // that hangs) must not leave no time for the writes below.
        Ok(_) => {
            if tokio::time::timeout(ACTOR_JOIN_TIMEOUT, all_stopped).await.is_err() {
                tracing::warn!("An actor thread did not stop in time; writing what is left anyway.");
            }
        }
        Err(error) => tracing::error!(%error, "Cannot wait for the actor threads to stop."),
    }
    if let Some(path) = parked_file {
        save_parked_and_drop_legacy_file(hub, path).await;
    }
    if let Err(error) = hub.store.flush().await {
        tracing::error!(%error, "The store failed to write what was queued at exit.");
    }
}

/// Saves parked answers changed since the last save; then, if they all are, removes the file an
/// earlier version left (taken back at build), so that a crash cannot bring back from it texts
/// shown since. Kept while a save fails: taken back again, it adds nothing already parked.
async fn save_parked_and_drop_legacy_file(hub: &Hub, path: &std::path::Path) {
    if !hub.passive.save_parked(hub.store.as_ref()).await {
        return;
    }
    if !path.exists() {
        return;
    }
    // Synced with its directory, or a power loss could bring the file back.
    let removed = std::fs::remove_file(path).and_then(|()| crate::store::sync_directory_of(path));
    match removed {
        Ok(()) => {
            tracing::info!(path = %path.display(), "Parked answers of the last stop's file saved in the store; file removed.")
        }
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "Failed to remove the parked answers' file; its texts may come back after a crash.")
        }
    }
}

/// Takes back the parked answers an earlier version's graceful stop saved in a file beside the
/// database. The file is removed once they are saved in the store (`run_until_stopped`). A file
/// that cannot be read is set aside (as `….bad`) and logged, not fatal.
fn load_parked_file(hub: &Hub, path: &std::path::Path) {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "Failed to read the parked answers saved at the last stop.");
            return;
        }
    };
    match serde_json::from_slice::<Vec<crate::delivery::passive::ParkedRecord>>(&bytes) {
        Ok(records) => {
            let texts = hub.passive.import_parked(records);
            tracing::info!(texts, "Parked answers from the last stop taken back.");
        }
        Err(error) => {
            let bad = crate::store::beside(path, ".bad");
            tracing::error!(path = %path.display(), %error, "The parked answers' file is unreadable; set aside.");
            let _ = std::fs::rename(path, bad);
        }
    }
}

/// SIGTERM or SIGINT, listened for from the moment a [`Signals`] is created (so a signal sent
/// once the previous one was handled is never missed).
struct Signals {
    #[cfg(unix)]
    streams: Vec<tokio::signal::unix::Signal>,
}

impl Signals {
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams: Vec<_> = [SignalKind::terminate(), SignalKind::interrupt()]
                .into_iter()
                .filter_map(|kind| match signal(kind) {
                    Ok(stream) => Some(stream),
                    Err(error) => {
                        tracing::warn!(%error, ?kind, "Cannot listen for a signal; it will not stop Yizhan gracefully.");
                        None
                    }
                })
                .collect();
            Self { streams }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Completes at the next signal (never, if none could be listened for).
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            if self.streams.is_empty() {
                return std::future::pending().await;
            }
            let next = self.streams.iter_mut().map(|stream| Box::pin(stream.recv()));
            futures_util::future::select_all(next).await;
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Re-dispatches what was accepted but not finished before the last stop. Runs before the
/// server serves (the port is bound already; connections wait in the backlog), so
/// `journal_open` never reads 0 while old work is pending.
fn resume_unfinished(hub: &Hub, router: &Router, pending: Vec<crate::store::Unfinished>) {
    if pending.is_empty() {
        return;
    }
    tracing::info!(count = pending.len(), "Resuming unfinished messages.");
    hub.metrics.journal_open.add(pending.len() as i64);
    // Answers to send again go through their conversation's session like the messages asked
    // again, so each conversation's answers leave in the order its messages were accepted.
    for unfinished in pending {
        if let Some(stream) = unfinished.live_stream {
            // Taken by the message's job: the answer goes into the message the last run was
            // streaming it into, not a second one below it.
            hub.resume_stream(&unfinished.envelope.id, stream);
        }
        match unfinished.pending_parts {
            // Answered before the stop: send what is left, never ask again.
            Some(parts) => {
                // What of it the stop saved as parked is pending here too, and is parked again
                // (or sent) from these parts: taken back twice, the user would see it twice.
                let envelope = &unfinished.envelope;
                hub.passive.forget_parked_of(&envelope.channel, &envelope.sender.id, &envelope.id);
                router.resend_resumed(unfinished.envelope, parts);
            }
            None => {
                // A platform retry soon after a quick restart can still carry the answer; for an
                // older message none will come, and a job would only delay the push.
                let envelope = unfinished.envelope;
                let age_ms = yizhan_channel_common::unix_millis(std::time::SystemTime::now())
                    .saturating_sub(envelope.received_at_ms);
                let retries_may_come = |entry: &&crate::hub::ChannelEntry| {
                    let span = crate::delivery::passive::retries_span(entry.platform_window());
                    i64::try_from(span.as_millis()).is_ok_and(|span_ms| age_ms < span_ms)
                };
                let window = hub
                    .channels
                    .get(&envelope.channel)
                    .filter(|entry| entry.holds_for_passive())
                    .filter(retries_may_come)
                    // The platform's pace, not a shorter window configured for safety: its first
                    // try is not over before its own window is.
                    .map(crate::hub::ChannelEntry::platform_window);
                let job_key = window.map(|_| (envelope.channel.clone(), envelope.platform_message_id.clone()));
                if let Some(window) = window {
                    hub.passive.open(&envelope).assume_earlier_attempts(attempts_before_resuming(age_ms, window));
                }
                let answered = router.dispatch_resumed(envelope);
                if let (false, Some((channel, message_id))) = (answered, job_key) {
                    hub.passive.close(&channel, &message_id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parked_answers_are_kept_no_longer_than_the_retention_period() {
        let week = crate::delivery::passive::PARKED_FOR;
        let day = Duration::from_secs(86_400);
        assert_eq!(parked_lifetime(day), day);
        assert_eq!(parked_lifetime(30 * day), week);
        assert_eq!(parked_lifetime(Duration::ZERO), week, "no pruning: a week, as ever");
    }
}
