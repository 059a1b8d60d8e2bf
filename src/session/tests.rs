//! Actor-level tests of the session protocol: creation, retirement, ordering, and no loss under
//! concurrent dispatch while sessions retire.

use super::*;
use crate::config::{MessagesConfig, SessionConfig};
use crate::delivery::{ChannelActor, RetryPolicy};
use crate::hub::{ChannelEntry, HubInner};
use crate::llm::client::LlmClientSettings;
use crate::llm::{DeltaSink, LlmActor, LlmBackend, LlmClient};
use crate::metrics::Metrics;
use crate::store::MemoryStore;
use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;
use yizhan_channel_core::{
    BoxFuture, Channel, ChannelError, ChannelId, Conversation, ConversationKind, Delivery, DeliveryReceipt, Reply,
    ReplyHandle, Sender, WebhookOutcome, WebhookRequest,
};

/// Answers "答：<question>" after `delay`, tracking how many calls overlap.
struct EchoBackend {
    delay: Duration,
    running: AtomicUsize,
    max_running: AtomicUsize,
    /// How many messages (history included) the last request carried.
    last_request_messages: AtomicUsize,
}

impl LlmBackend for EchoBackend {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn complete<'a>(
        &'a self,
        request: &'a CompletionRequest,
        _first_token_timeout: Duration,
        _on_delta: &'a mut DeltaSink,
    ) -> BoxFuture<'a, Result<String, LlmError>> {
        Box::pin(async move {
            self.last_request_messages.store(request.messages.len(), Ordering::SeqCst);
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            if !self.delay.is_zero() {
                actix::clock::sleep(self.delay).await;
            }
            self.running.fetch_sub(1, Ordering::SeqCst);
            let question = request.messages.last().map(|m| m.content.clone()).unwrap_or_default();
            Ok(format!("答：{question}"))
        })
    }
}

/// Records every delivered part. With `streaming` set, it streams answers, and notes at each
/// finished stream what the store then held as the answer's pending parts.
struct RecordingChannel {
    id: ChannelId,
    delivered: Mutex<Vec<Delivery>>,
    streaming: std::sync::atomic::AtomicBool,
    store: std::sync::OnceLock<Arc<dyn crate::store::Store>>,
    recorded_at_finish: Mutex<Vec<Option<Vec<Delivery>>>>,
    /// Breaks this store for good once a part is delivered (a failed fsync just then).
    breaks_on_deliver: std::sync::OnceLock<Arc<MemoryStore>>,
    /// Sends and stream finishes are refused for good.
    refuses: std::sync::atomic::AtomicBool,
    /// Streams finished (or tried).
    finishes: AtomicUsize,
}

impl Channel for RecordingChannel {
    fn id(&self) -> &ChannelId {
        &self.id
    }

    fn kind(&self) -> &str {
        "recording"
    }

    fn handle_webhook(&self, _request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
        Err(ChannelError::Unsupported("test channel".into()))
    }

    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
        if self.refuses.load(Ordering::SeqCst) {
            return Box::pin(async { Err(ChannelError::Refused { code: 1, reason: "refused for a test".into() }) });
        }
        self.delivered.lock().unwrap_or_else(|p| p.into_inner()).push(delivery.clone());
        if let Some(store) = self.breaks_on_deliver.get() {
            store.broken.store(true, Ordering::SeqCst);
        }
        Box::pin(async { Ok(DeliveryReceipt::default()) })
    }

    fn capabilities(&self) -> yizhan_channel_core::Capabilities {
        yizhan_channel_core::Capabilities { streaming: self.streaming.load(Ordering::SeqCst), ..Default::default() }
    }

    fn begin_stream<'a>(
        &'a self,
        _target: &'a Delivery,
    ) -> BoxFuture<'a, Result<yizhan_channel_core::StreamHandle, ChannelError>> {
        Box::pin(async { Ok(yizhan_channel_core::StreamHandle(serde_json::Value::Null)) })
    }

    fn update_stream<'a>(
        &'a self,
        _handle: &'a yizhan_channel_core::StreamHandle,
        _text_so_far: &'a str,
        _sequence: u64,
    ) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(async { Ok(()) })
    }

    fn finish_stream<'a>(
        &'a self,
        _handle: &'a yizhan_channel_core::StreamHandle,
        _full_text: &'a str,
        _sequence: u64,
    ) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
        Box::pin(async move {
            self.finishes.fetch_add(1, Ordering::SeqCst);
            if self.refuses.load(Ordering::SeqCst) {
                return Err(ChannelError::Refused { code: 1, reason: "refused for a test".into() });
            }
            if let Some(store) = self.store.get() {
                let unfinished = store.unfinished().await.unwrap_or_default();
                let mut recorded = self.recorded_at_finish.lock().unwrap_or_else(|p| p.into_inner());
                recorded.extend(unfinished.into_iter().map(|entry| entry.pending_parts));
            }
            Ok(DeliveryReceipt::default())
        })
    }

    /// Panics on an answer containing "💥": a stand-in for a bug inside a session's turn. Parts
    /// are cut at each "✂"; an answer with "∅" renders to nothing (a plugin's renderer that
    /// keeps nothing of it).
    fn render(&self, reply: &Reply) -> Vec<Reply> {
        assert!(!reply.text.contains('💥'), "a bug in the middle of a turn");
        if reply.text.contains('∅') {
            return Vec::new();
        }
        reply.text.split('✂').map(|text| Reply { text: text.to_owned() }).collect()
    }
}

struct Fixture {
    registry: SessionRegistry,
    store: Arc<dyn crate::store::Store>,
    channel: Arc<RecordingChannel>,
    backend: Arc<EchoBackend>,
    metrics: Metrics,
}

fn fixture(llm_delay: Duration, idle_timeout: Duration, max_pending: usize) -> Fixture {
    fixture_on(Arc::new(MemoryStore::new(10)), llm_delay, idle_timeout, max_pending)
}

fn fixture_on(
    store: Arc<dyn crate::store::Store>,
    llm_delay: Duration,
    idle_timeout: Duration,
    max_pending: usize,
) -> Fixture {
    fixture_bounded(store, llm_delay, idle_timeout, max_pending, usize::MAX)
}

fn fixture_bounded(
    store: Arc<dyn crate::store::Store>,
    llm_delay: Duration,
    idle_timeout: Duration,
    max_pending: usize,
    max_sessions: usize,
) -> Fixture {
    fixture_with_window(store, llm_delay, idle_timeout, max_pending, max_sessions, None)
}

/// [`fixture_bounded`] with the channel's `passive_window`.
fn fixture_with_window(
    store: Arc<dyn crate::store::Store>,
    llm_delay: Duration,
    idle_timeout: Duration,
    max_pending: usize,
    max_sessions: usize,
    passive_window: Option<Duration>,
) -> Fixture {
    let metrics = Metrics::new();
    let store_handle = store.clone();
    let backend = Arc::new(EchoBackend {
        delay: llm_delay,
        running: AtomicUsize::new(0),
        max_running: AtomicUsize::new(0),
        last_request_messages: AtomicUsize::new(0),
    });
    let client = LlmClient::new(
        backend.clone(),
        LlmClientSettings {
            first_token_timeout: Duration::from_secs(60),
            total_timeout: Duration::from_secs(60),
            max_retries: 0,
            retry_base_delay: Duration::from_millis(1),
        },
    );
    let llm = LlmActor::new(client, 64, 100_000, metrics.clone()).start();
    let id = ChannelId::parse("rec").unwrap_or_else(|e| panic!("{e}"));
    let channel = Arc::new(RecordingChannel {
        id: id.clone(),
        delivered: Mutex::new(Vec::new()),
        streaming: Default::default(),
        store: std::sync::OnceLock::new(),
        recorded_at_finish: Mutex::new(Vec::new()),
        breaks_on_deliver: std::sync::OnceLock::new(),
        refuses: Default::default(),
        finishes: AtomicUsize::new(0),
    });
    let _ = channel.store.set(store.clone());
    let policy =
        RetryPolicy { max_attempts: 1, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(1) };
    let outbound =
        ChannelActor::new(channel.clone(), store.clone(), policy, metrics.clone(), Default::default()).start();
    let mut channels = HashMap::with_hasher(foldhash::fast::RandomState::default());
    channels.insert(
        id,
        ChannelEntry {
            channel: channel.clone(),
            outbound,
            system_prompt: String::new(),
            group_per_user: false,
            reply_mode: crate::config::ReplyMode::Push,
            passive_window,
            passive_margin: Duration::from_millis(500),
            menu: Default::default(),
            // Never reached here; set so that answers can be parked (and the continue word fetches them).
            send_quota: Some(1_000),
        },
    );
    let hub = Hub::new(HubInner {
        store,
        llm,
        channels,
        messages: MessagesConfig { ai_label: String::new(), ..MessagesConfig::default() },
        session: SessionConfig {
            history_max_turns: 4,
            history_max_chars: 1_000,
            idle_timeout_secs: 1,
            max_pending,
            max_sessions,
            threads: 0,
        },
        dedupe_ttl: Duration::from_secs(60),
        metrics: metrics.clone(),
        passive: Default::default(),
        resumed_streams: Default::default(),
    });
    Fixture {
        registry: SessionRegistry::new(hub, idle_timeout, Vec::new()),
        store: store_handle,
        channel,
        backend,
        metrics,
    }
}

fn job(user: &str, question: &str) -> (SessionKey, Job) {
    let envelope = Envelope {
        id: Envelope::new_id(),
        channel: ChannelId::parse("rec").unwrap_or_else(|e| panic!("{e}")),
        channel_kind: "recording".into(),
        platform_message_id: Envelope::new_id(),
        received_at_ms: 0,
        conversation: Conversation { kind: ConversationKind::Direct, id: user.into() },
        sender: Sender { id: user.into(), name: None },
        content: vec![],
        mentions_self: true,
        reply_handle: ReplyHandle::default(),
    };
    (SessionKey::for_envelope(&envelope, false), Job { envelope, work: Work::Ask(question.into()) })
}

impl Fixture {
    fn delivered(&self) -> Vec<Delivery> {
        self.channel.delivered.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn wait_for_deliveries(&self, count: usize) {
        for _ in 0..100_000 {
            if self.delivered().len() >= count {
                return;
            }
            actix::clock::sleep(Duration::from_millis(1)).await;
        }
        panic!("only {} of {count} deliveries arrived", self.delivered().len());
    }
}

#[actix::test]
async fn session_is_created_on_demand_and_retired_when_idle() {
    tokio::time::pause();
    let fixture = fixture(Duration::ZERO, Duration::from_secs(60), 16);
    assert!(fixture.registry.is_empty());
    let (key, job) = job("u1", "你好");
    fixture.registry.dispatch(key, job).unwrap_or_else(|_| panic!("dispatch"));
    assert_eq!(fixture.registry.len(), 1);
    fixture.wait_for_deliveries(1).await;
    assert_eq!(fixture.metrics.sessions_alive.get(), 1);
    actix::clock::sleep(Duration::from_secs(30)).await;
    assert_eq!(fixture.registry.len(), 1, "not idle long enough yet");
    actix::clock::sleep(Duration::from_secs(80)).await;
    assert!(fixture.registry.is_empty(), "idle session should have retired");
    assert_eq!(fixture.metrics.sessions_alive.get(), 0);
}

#[actix::test]
async fn one_user_is_served_in_order_and_one_at_a_time() {
    tokio::time::pause();
    let fixture = fixture(Duration::from_millis(100), Duration::from_secs(60), 16);
    for i in 0..6 {
        let (key, job) = job("u1", &format!("q{i}"));
        fixture.registry.dispatch(key, job).unwrap_or_else(|_| panic!("dispatch"));
    }
    fixture.wait_for_deliveries(6).await;
    let texts: Vec<String> = fixture.delivered().into_iter().map(|d| d.reply.text).collect();
    assert_eq!(texts, (0..6).map(|i| format!("答：q{i}")).collect::<Vec<_>>());
    assert_eq!(fixture.backend.max_running.load(Ordering::SeqCst), 1);
}

#[actix::test]
async fn different_users_are_served_concurrently() {
    tokio::time::pause();
    let fixture = fixture(Duration::from_millis(100), Duration::from_secs(60), 16);
    for user in 0..5 {
        let (key, job) = job(&format!("u{user}"), "q");
        fixture.registry.dispatch(key, job).unwrap_or_else(|_| panic!("dispatch"));
    }
    fixture.wait_for_deliveries(5).await;
    assert_eq!(fixture.backend.max_running.load(Ordering::SeqCst), 5);
}

#[actix::test]
async fn a_user_over_the_pending_bound_gets_the_busy_reply() {
    tokio::time::pause();
    let fixture = fixture(Duration::from_millis(100), Duration::from_secs(60), 2);
    let router = crate::routing::Router::new(fixture.registry.0.hub.clone(), fixture.registry.clone());
    let answered: Vec<bool> = (0..6)
        .map(|i| {
            let (_, mut job) = job("u1", "");
            job.envelope.content = vec![yizhan_channel_core::Segment::Text { text: format!("q{i}") }];
            router.dispatch(job.envelope)
        })
        .collect();
    assert_eq!(answered, [true, true, true, false, false, false]);
    fixture.wait_for_deliveries(3).await;
    let busy = MessagesConfig::default().busy;
    // Nothing ran yet while the six arrived: two fit the bound; of the four over it, the first
    // is told to retry, and the rest, while that busy reply is on its way, are not told again.
    let mut texts: Vec<String> = fixture.delivered().into_iter().map(|d| d.reply.text).collect();
    texts.sort();
    let mut expected = vec!["答：q0".to_owned(), "答：q1".to_owned(), busy.clone()];
    expected.sort();
    assert_eq!(texts, expected);
    assert_eq!(fixture.registry.0.hub.metrics.shed.with_label_values(&["session_queue"]).get(), 4);
    // Once it has gone, the next message over the bound is told again.
    for i in 6..9 {
        let (_, mut job) = job("u1", "");
        job.envelope.content = vec![yizhan_channel_core::Segment::Text { text: format!("q{i}") }];
        router.dispatch(job.envelope);
    }
    fixture.wait_for_deliveries(6).await;
    let busy_replies = fixture.delivered().into_iter().filter(|d| d.reply.text == busy).count();
    assert_eq!(busy_replies, 2);
}

/// A flood of new users cannot hold unbounded memory: past `max_sessions` a new conversation is
/// answered busy (and counted), while the ones kept go on; once one retires, there is room.
#[actix::test]
async fn a_new_conversation_over_the_session_bound_gets_the_busy_reply() {
    tokio::time::pause();
    let fixture =
        fixture_bounded(Arc::new(MemoryStore::new(10)), Duration::from_millis(100), Duration::from_secs(5), 16, 2);
    let router = crate::routing::Router::new(fixture.registry.0.hub.clone(), fixture.registry.clone());
    let asking = |user: &str, text: &str| {
        let (_, mut job) = job(user, "");
        job.envelope.content = vec![yizhan_channel_core::Segment::Text { text: text.into() }];
        job.envelope
    };
    for user in ["u1", "u2", "u3"] {
        router.dispatch(asking(user, "问"));
    }
    // A kept conversation is not refused.
    router.dispatch(asking("u1", "再问"));
    fixture.wait_for_deliveries(4).await;
    let mut sent: Vec<(String, String)> =
        fixture.delivered().into_iter().map(|d| (d.recipient.id, d.reply.text)).collect();
    sent.sort();
    let busy = MessagesConfig::default().busy;
    assert_eq!(
        sent,
        [
            ("u1".to_owned(), "答：再问".to_owned()),
            ("u1".to_owned(), "答：问".to_owned()),
            ("u2".to_owned(), "答：问".to_owned()),
            ("u3".to_owned(), busy),
        ]
    );
    assert_eq!(fixture.registry.len(), 2);
    assert_eq!(fixture.registry.0.count.load(Ordering::SeqCst), 2);
    assert_eq!(fixture.registry.0.hub.metrics.shed.with_label_values(&["sessions"]).get(), 1);
    // Once they retire, the count falls with them, and a new conversation is taken.
    for _ in 0..100 {
        if fixture.registry.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!((fixture.registry.len(), fixture.registry.0.count.load(Ordering::SeqCst)), (0, 0));
    router.dispatch(asking("u3", "又问"));
    fixture.wait_for_deliveries(5).await;
    assert!(fixture.delivered().iter().any(|d| d.recipient.id == "u3" && d.reply.text == "答：又问"));
    assert_eq!(fixture.registry.0.hub.metrics.shed.with_label_values(&["sessions"]).get(), 1);
}

#[actix::test]
async fn a_continue_word_answered_busy_leaves_the_parked_text_for_the_next_one() {
    tokio::time::pause();
    let fixture = fixture(Duration::from_millis(100), Duration::from_secs(60), 1);
    let hub = fixture.registry.0.hub.clone();
    let router = crate::routing::Router::new(hub.clone(), fixture.registry.clone());
    let channel = ChannelId::parse("rec").unwrap_or_else(|e| panic!("{e}"));
    hub.passive.park(&channel, "u1", "e0", "早先的回答".into());
    let say = |text: &str| {
        let (_, mut job) = job("u1", "");
        job.envelope.content = vec![yizhan_channel_core::Segment::Text { text: text.into() }];
        assert!(router.dispatch(job.envelope));
    };
    // A bound of one: the session has not taken q0 off its queue yet (it runs on this thread),
    // so the continue word finds the queue full and is answered busy.
    say("q0");
    say("继续");
    fixture.wait_for_deliveries(2).await;
    assert!(hub.passive.has_parked(&channel, "u1"), "the parked text must survive the busy reply");
    say("继续");
    fixture.wait_for_deliveries(3).await;
    let texts: Vec<String> = fixture.delivered().into_iter().map(|d| d.reply.text).collect();
    assert_eq!(texts[2], "早先的回答");
    assert!(!hub.passive.has_parked(&channel, "u1"));
}

/// The continue word takes parked text when its turn comes, not when it arrives: what the turn
/// queued before it parks (the rest of a long answer), it brings; and a stop before its turn
/// leaves the text parked (saved) rather than taken by a message that was never answered.
#[actix::test]
async fn a_continue_word_takes_what_the_turns_before_it_parked() {
    tokio::time::pause();
    let fixture = fixture(Duration::from_millis(100), Duration::from_secs(60), 4);
    let hub = fixture.registry.0.hub.clone();
    let router = crate::routing::Router::new(hub.clone(), fixture.registry.clone());
    let channel = ChannelId::parse("rec").unwrap_or_else(|e| panic!("{e}"));
    let say = |text: &str| {
        let (_, mut job) = job("u1", "");
        job.envelope.content = vec![yizhan_channel_core::Segment::Text { text: text.into() }];
        assert!(router.dispatch(job.envelope));
    };
    say("长问题");
    say("继续");
    // Parked while the first turn still runs (as its rest beyond the quota would be).
    hub.passive.park(&channel, "u1", "e-long", "后半段".into());
    fixture.wait_for_deliveries(2).await;
    let texts: Vec<String> = fixture.delivered().into_iter().map(|d| d.reply.text).collect();
    assert_eq!(texts, ["答：长问题", "后半段"]);
    assert!(!hub.passive.has_parked(&channel, "u1"));
}

/// Four arbiters dispatch 2,000 messages to 8 users while sessions retire after 1 ms of silence:
/// every message must be answered exactly once.
#[actix::test]
async fn no_message_is_lost_while_sessions_retire() {
    let fixture = fixture(Duration::ZERO, Duration::from_millis(1), 100_000);
    let arbiters: Vec<Arbiter> = (0..4).map(|_| Arbiter::new()).collect();
    for (a, arbiter) in arbiters.iter().enumerate() {
        let registry = fixture.registry.clone();
        arbiter.spawn(async move {
            for i in 0..500 {
                let (key, job) = job(&format!("u{}", i % 8), &format!("a{a}-m{i}"));
                if registry.dispatch(key, job).is_err() {
                    panic!("dispatch refused");
                }
                if i % 25 == 0 {
                    // Let sessions go idle and retire between bursts.
                    actix::clock::sleep(Duration::from_millis(10)).await;
                }
            }
        });
    }
    fixture.wait_for_deliveries(2_000).await;
    // Whether sessions retired during the bursts depends on the scheduler (a loaded machine may
    // keep all eight busy throughout); after every one has retired, each user's next message
    // must start a new session.
    for _ in 0..100_000 {
        if fixture.registry.is_empty() {
            break;
        }
        actix::clock::sleep(Duration::from_millis(1)).await;
    }
    assert!(fixture.registry.is_empty(), "idle sessions did not retire");
    for user in 0..8 {
        let (key, job) = job(&format!("u{user}"), &format!("after-{user}"));
        assert!(fixture.registry.dispatch(key, job).is_ok());
    }
    fixture.wait_for_deliveries(2_008).await;
    let mut texts: Vec<String> = fixture.delivered().into_iter().map(|d| d.reply.text).collect();
    texts.sort();
    let mut expected: Vec<String> = (0..4).flat_map(|a| (0..500).map(move |i| format!("答：a{a}-m{i}"))).collect();
    expected.extend((0..8).map(|user| format!("答：after-{user}")));
    expected.sort();
    assert_eq!(texts, expected);
    let sessions_started = fixture.registry.0.generations.load(Ordering::SeqCst);
    assert!(sessions_started >= 16, "sessions never retired and restarted ({sessions_started} started)");
    for arbiter in arbiters {
        arbiter.stop();
    }
}

/// A bug that panics in the middle of a turn must not cost the messages queued behind it: they
/// are answered, in order, by the same session.
#[actix::test]
async fn a_reset_whose_history_cannot_be_cleared_says_so_and_keeps_the_conversation() {
    let store = Arc::new(MemoryStore::new(10));
    let fixture = fixture_on(store.clone(), Duration::ZERO, Duration::from_secs(60), 16);
    let (key, first) = job("u1", "第一");
    fixture.registry.dispatch(key.clone(), first).unwrap_or_else(|_| panic!("dispatch"));
    fixture.wait_for_deliveries(1).await;
    store.refuse_writes.store(true, Ordering::SeqCst);
    let (_, mut reset) = job("u1", "/reset");
    reset.work = Work::Reset;
    fixture.registry.dispatch(key.clone(), reset).unwrap_or_else(|_| panic!("dispatch"));
    fixture.wait_for_deliveries(2).await;
    assert_eq!(fixture.delivered()[1].reply.text, MessagesConfig::default().apology);
    let (_, second) = job("u1", "第二");
    fixture.registry.dispatch(key, second).unwrap_or_else(|_| panic!("dispatch"));
    fixture.wait_for_deliveries(3).await;
    // The first turn (question and answer) is still in the conversation the model sees.
    assert_eq!(fixture.backend.last_request_messages.load(Ordering::SeqCst), 3);
}

#[actix::test]
async fn a_message_whose_finish_fails_is_no_longer_counted_open() {
    let store = Arc::new(MemoryStore::new(10));
    let fixture = fixture_on(store.clone(), Duration::ZERO, Duration::from_secs(60), 16);
    store.refuse_writes.store(true, Ordering::SeqCst);
    // As the webhook counts an accepted message.
    fixture.metrics.journal_open.inc();
    let (key, job) = job("u1", "问");
    fixture.registry.dispatch(key, job).unwrap_or_else(|_| panic!("dispatch"));
    fixture.wait_for_deliveries(1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while fixture.metrics.journal_open.get() != 0 && std::time::Instant::now() < deadline {
        actix::clock::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(fixture.metrics.journal_open.get(), 0, "a shutdown would wait its whole bound for it");
}

/// A fixture on a memory store the test can break or make refuse, and that store; the model
/// answers after `llm_delay`.
fn fixture_on_memory(llm_delay: Duration) -> (Arc<MemoryStore>, Fixture) {
    let store = Arc::new(MemoryStore::new(10));
    let fixture = fixture_on(store.clone(), llm_delay, Duration::from_secs(60), 16);
    (store, fixture)
}

impl Fixture {
    /// Dispatches a question counted open, as the webhook counts each message it accepts.
    fn ask_accepted(&self, user: &str, question: &str) -> SessionKey {
        self.metrics.journal_open.inc();
        let (key, job) = job(user, question);
        self.registry.dispatch(key.clone(), job).unwrap_or_else(|_| panic!("dispatch"));
        key
    }

    /// Asserts that nothing was sent, nor a streamed card finished, nor the message finished in
    /// `store`: it is left for the restart.
    fn assert_left_for_the_restart(&self, store: &MemoryStore) {
        assert!(self.delivered().is_empty(), "{:?}", self.delivered());
        assert_eq!(self.channel.finishes.load(Ordering::SeqCst), 0, "a streamed card was finished");
        assert_eq!(store.finished.load(Ordering::SeqCst), 0);
    }

    /// Waits until no message is counted open (the webhook counts each it accepts).
    async fn wait_until_none_open(&self) {
        for _ in 0..100_000 {
            if self.metrics.journal_open.get() == 0 {
                return;
            }
            actix::clock::sleep(Duration::from_millis(1)).await;
        }
        panic!("{} messages still open", self.metrics.journal_open.get());
    }
}

/// A store broken for good (a failed fsync) before a question is asked: nothing is asked or
/// sent (nor streamed into a card), the message is left for the restart the store needs.
#[actix::test]
async fn a_question_the_broken_store_could_not_record_an_answer_to_is_not_asked() {
    tokio::time::pause();
    let (store, fixture) = fixture_on_memory(Duration::ZERO);
    store.broken.store(true, Ordering::SeqCst);
    fixture.ask_accepted("u1", "问");
    fixture.wait_until_none_open().await;
    fixture.assert_left_for_the_restart(&store);
    assert_eq!(fixture.backend.last_request_messages.load(Ordering::SeqCst), 0, "the model was asked");
}

/// A store that breaks while the model writes records no answer: sent anyway (here: written into
/// the card being streamed), it could be marked neither sent nor finished, and the restart the
/// store needs would answer the message again.
#[actix::test]
async fn an_answer_the_broken_store_could_not_record_is_left_for_the_restart_not_sent() {
    tokio::time::pause();
    let (store, fixture) = fixture_on_memory(Duration::from_millis(100));
    fixture.channel.streaming.store(true, Ordering::SeqCst);
    fixture.ask_accepted("u1", "问");
    actix::clock::sleep(Duration::from_millis(50)).await;
    assert_eq!(fixture.backend.running.load(Ordering::SeqCst), 1, "the model is writing");
    store.broken.store(true, Ordering::SeqCst);
    fixture.wait_until_none_open().await;
    fixture.assert_left_for_the_restart(&store);
}

/// The store breaking while an answer goes out stops it there: the parts not yet sent are the
/// restart's, which would otherwise send them again.
#[actix::test]
async fn parts_after_the_store_broke_are_left_for_the_restart() {
    tokio::time::pause();
    let (store, fixture) = fixture_on_memory(Duration::ZERO);
    let _ = fixture.channel.breaks_on_deliver.set(store.clone());
    fixture.ask_accepted("u1", "一✂二✂三");
    fixture.wait_until_none_open().await;
    let texts: Vec<String> = fixture.delivered().into_iter().map(|d| d.reply.text).collect();
    assert_eq!(texts, ["答：一"]);
}

/// A streamed answer that reached no one (its card's finish refused, and then the messages
/// too) is not in the history the next question carries.
#[actix::test]
async fn a_streamed_answer_that_reached_no_one_leaves_no_turn() {
    tokio::time::pause();
    let fixture = fixture(Duration::ZERO, Duration::from_secs(60), 16);
    fixture.channel.streaming.store(true, Ordering::SeqCst);
    fixture.channel.refuses.store(true, Ordering::SeqCst);
    let key = fixture.ask_accepted("u1", "第一");
    fixture.wait_until_none_open().await;
    fixture.channel.refuses.store(false, Ordering::SeqCst);
    // As a message, which the channel notes.
    fixture.channel.streaming.store(false, Ordering::SeqCst);
    let (_, second) = job("u1", "第二");
    fixture.registry.dispatch(key, second).unwrap_or_else(|_| panic!("dispatch"));
    fixture.wait_for_deliveries(1).await;
    assert_eq!(fixture.backend.last_request_messages.load(Ordering::SeqCst), 1, "the question alone");
}

/// A finish the store failed to write (a full disk) is tried again until it is written: left
/// open, the message would be resumed by the next start, its parked parts sent again.
#[actix::test]
async fn a_failed_finish_is_written_on_a_later_try() {
    tokio::time::pause();
    let (store, fixture) = fixture_on_memory(Duration::ZERO);
    store.refuse_writes.store(true, Ordering::SeqCst);
    fixture.ask_accepted("u1", "问");
    fixture.wait_for_deliveries(1).await;
    fixture.wait_until_none_open().await;
    actix::clock::sleep(Duration::from_secs(5)).await;
    assert_eq!(store.finished.load(Ordering::SeqCst), 0, "refused so far");
    store.refuse_writes.store(false, Ordering::SeqCst);
    for _ in 0..1_000 {
        if store.finished.load(Ordering::SeqCst) == 1 {
            break;
        }
        actix::clock::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(store.finished.load(Ordering::SeqCst), 1);
}

/// An answer is sent only once it is recorded: sent before, a crash ahead of the finish would
/// have the next start ask the model again, and the user would get a second answer.
#[actix::test]
async fn an_answer_that_cannot_be_recorded_yet_is_sent_once_it_is() {
    tokio::time::pause();
    let (store, fixture) = fixture_on_memory(Duration::ZERO);
    store.refuse_records.store(true, Ordering::SeqCst);
    fixture.ask_accepted("u1", "问");
    actix::clock::sleep(Duration::from_secs(120)).await;
    assert!(fixture.delivered().is_empty(), "sent before it was recorded");
    store.refuse_records.store(false, Ordering::SeqCst);
    fixture.wait_for_deliveries(1).await;
    fixture.wait_until_none_open().await;
    let texts: Vec<String> = fixture.delivered().into_iter().map(|d| d.reply.text).collect();
    assert_eq!(texts, ["答：问"]);
    assert_eq!(store.finished.load(Ordering::SeqCst), 1);
}

/// Blank parts a renderer made are not sent (a platform would refuse them and fail the
/// answer); a real answer it rendered to nothing is sent as it is, not left unanswered.
#[actix::test]
async fn blank_parts_are_dropped_and_an_answer_rendered_to_nothing_is_sent_unrendered() {
    tokio::time::pause();
    let (_store, fixture) = fixture_on_memory(Duration::ZERO);
    fixture.ask_accepted("u1", "a✂ ✂b");
    fixture.wait_for_deliveries(2).await;
    fixture.ask_accepted("u2", "∅");
    fixture.wait_for_deliveries(3).await;
    fixture.wait_until_none_open().await;
    let mut texts: Vec<String> = fixture.delivered().into_iter().map(|d| d.reply.text).collect();
    texts.sort();
    assert_eq!(texts, ["b", "答：a", "答：∅"]);
}

#[actix::test]
async fn messages_queued_behind_a_turn_that_panicked_are_still_answered() {
    tokio::time::pause();
    let fixture = fixture(Duration::ZERO, Duration::from_secs(60), 16);
    for question in ["💥", "q1", "q2"] {
        let (key, next) = job("u1", question);
        fixture.registry.dispatch(key, next).unwrap_or_else(|_| panic!("dispatch"));
    }
    fixture.wait_for_deliveries(3).await;
    let texts: Vec<String> = fixture.delivered().into_iter().map(|d| d.reply.text).collect();
    // The message whose turn panicked is answered (and finished), not left for a restart, and
    // in its place in the conversation.
    assert_eq!(texts, [MessagesConfig::default().apology.as_str(), "答：q1", "答：q2"]);
    assert_eq!(fixture.registry.len(), 1);
    assert_eq!(fixture.metrics.sessions_alive.get(), 1);
    assert_eq!(fixture.registry.0.generations.load(Ordering::SeqCst), 1, "no second session was started");
}

/// A streamed answer is recorded, whole, before its stream is finished: a crash in between then
/// sends the saved text at the next start instead of asking the model again.
#[actix::test]
async fn a_streamed_answer_is_recorded_before_its_stream_is_finished() {
    // The SQLite store: the memory store keeps no journal or outbox to look at.
    let dir = std::env::temp_dir().join(format!("yizhan-stream-{}-{}", std::process::id(), Envelope::new_id()));
    // Small segments and no fsync: nothing here depends on the disk, and a loaded machine must
    // not make the test slow.
    let options = crate::store::SqliteOptions {
        durability: crate::store::Durability::ProcessCrash,
        log_segment_bytes: 64 << 10,
        ..Default::default()
    };
    let store = crate::store::SqliteStore::open(&dir.join("yizhan.db"), options).unwrap_or_else(|e| panic!("{e}"));
    let fixture = fixture_on(Arc::new(store), Duration::ZERO, Duration::from_secs(60), 16);
    fixture.channel.streaming.store(true, Ordering::SeqCst);
    let (key, job) = job("u1", "流");
    let accepted = fixture.store.accept(&job.envelope, Duration::from_secs(60)).await;
    assert!(matches!(accepted, Ok(crate::store::Acceptance::New)), "{accepted:?}");
    fixture.registry.dispatch(key, job).unwrap_or_else(|_| panic!("dispatch"));
    let recorded = || fixture.channel.recorded_at_finish.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while recorded().is_empty() && std::time::Instant::now() < deadline {
        actix::clock::sleep(Duration::from_millis(1)).await;
    }
    assert!(!recorded().is_empty(), "the stream was never finished");
    let at_finish = recorded();
    let texts: Vec<Option<Vec<String>>> = at_finish
        .into_iter()
        .map(|parts| parts.map(|parts| parts.into_iter().map(|part| part.reply.text).collect()))
        .collect();
    assert_eq!(texts, [Some(vec!["答：流".to_owned()])], "the whole answer was pending when the stream ended");
    while !fixture.store.unfinished().await.is_ok_and(|open| open.is_empty()) && std::time::Instant::now() < deadline {
        actix::clock::sleep(Duration::from_millis(1)).await;
    }
    assert!(fixture.store.unfinished().await.is_ok_and(|open| open.is_empty()), "finished once the stream ended");
    assert!(fixture.delivered().is_empty(), "streamed, not also sent as a message");
    drop(fixture);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An answer held for a platform retry that never comes is pushed by the fallback timer: two of
/// the platform's windows and half a second after it was ready, or once no retry can come any
/// more (a message resumed after a restart, say), whichever is sooner; and counted.
#[actix::test]
async fn an_answer_no_platform_retry_takes_is_pushed_by_the_fallback_timer_and_counted() {
    tokio::time::pause();
    let window = Duration::from_secs(5);
    // Received now: two windows and a half second. Received 19.7 s ago: retries can come for
    // 20 s (a window per attempt, and one more), so 0.3 s at most (less the real time between
    // setting its age and opening its job, when the age is read from the wall clock).
    let cases = [
        (0, Duration::from_millis(10_500)..Duration::from_millis(10_600)),
        (19_700, Duration::ZERO..Duration::from_millis(310)),
    ];
    for (received_ago_ms, pushed_within) in cases {
        let store = Arc::new(MemoryStore::new(10));
        let fixture = fixture_with_window(store, Duration::ZERO, Duration::from_secs(60), 16, usize::MAX, Some(window));
        let hub = fixture.registry.0.hub.clone();
        let (key, mut job) = job("u1", "等重试");
        job.envelope.received_at_ms =
            yizhan_channel_common::unix_millis(std::time::SystemTime::now()) - received_ago_ms;
        let _held_for_a_retry = hub.passive.open(&job.envelope);
        let started = actix::clock::Instant::now();
        fixture.registry.dispatch(key, job).unwrap_or_else(|_| panic!("dispatch"));
        fixture.wait_for_deliveries(1).await;
        // Paused time: the virtual clock, not a real wait (the wall clock stands still).
        let elapsed = started.elapsed();
        assert!(pushed_within.contains(&elapsed), "pushed after {elapsed:?}");
        let texts: Vec<String> = fixture.delivered().into_iter().map(|d| d.reply.text).collect();
        assert_eq!(texts, ["答：等重试"]);
        assert_eq!(fixture.metrics.passive_fallback_pushes.with_label_values(&["rec"]).get(), 1);
    }
}
