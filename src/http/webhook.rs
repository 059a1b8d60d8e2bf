//! `GET|POST /webhooks/{channel_id}`: verify, parse, dedupe, journal, dispatch, acknowledge.
//!
//! Invariant: nothing here waits for the model but a held 公众号 attempt (bounded by WeChat's
//! window). The other awaits are the store's journal write, which must complete before the
//! platform is told the message arrived.

use crate::config::ReplyMode;
use crate::delivery::passive::{retries_span, AttemptKind, HeldAnswer, PassiveJob, PASSIVE_ATTEMPTS};
use crate::delivery::send_parts;
use crate::http::stalled_connections::ConnectionWatch;
use crate::hub::{ChannelEntry, Hub};
use crate::metrics::GaugeHeld;
use crate::routing::Router;
use crate::store::Acceptance;
use actix_web::http::Method as HttpMethod;
use actix_web::{web, HttpRequest, HttpResponse};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use yizhan_channel_core::{
    Channel, ChannelError, ChannelId, Envelope, Event, Method, Reply, Segment, WebhookOutcome, WebhookRequest,
    WebhookResponse,
};

/// What the HTTP handlers share.
pub struct AppState {
    /// The core's wiring.
    pub hub: Hub,
    /// Where accepted envelopes go.
    pub router: Router,
    /// How webhook bodies are read.
    pub body: BodyLimits,
    /// Throttles the log lines of refused requests.
    pub refusals: RefusalLog,
}

/// Log lines for refused webhooks, at most one per channel and outcome every
/// [`REFUSAL_LOG_EVERY`], saying how many were left out since: anyone can send refused
/// requests, and must not be able to fill the disk with log lines (the metrics count each one).
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// By (channel label, outcome), both from a bounded set: when one was last logged, and how
    /// many went unlogged since.
    last: std::sync::Mutex<std::collections::HashMap<RefusalKind, (Instant, u64)>>,
}

/// A channel label and an outcome.
type RefusalKind = (String, &'static str);

/// See [`RefusalLog`].
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl RefusalLog {
    /// Whether to log this refusal now; if so, how many of its kind went unlogged before it.
    pub fn admit(&self, channel: &str, outcome: &'static str) -> Option<u64> {
        self.admit_at(channel, outcome, Instant::now())
    }

    fn admit_at(&self, channel: &str, outcome: &'static str, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match last.get_mut(&(channel.to_owned(), outcome)) {
            Some((logged_at, left_out)) if now.saturating_duration_since(*logged_at) < REFUSAL_LOG_EVERY => {
                *left_out += 1;
                None
            }
            Some((logged_at, left_out)) => {
                *logged_at = now;
                Some(std::mem::take(left_out))
            }
            None => {
                last.insert((channel.to_owned(), outcome), (now, 0));
                Some(0)
            }
        }
    }
}

/// How webhook bodies are read (`[server]`).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body accepted (`body_limit_bytes`); larger gets 413.
    pub max_bytes: usize,
    /// How long a body may take to arrive once its headers have (`body_timeout_ms`; a
    /// connection's first request head is bounded by actix-web's request timeout, a later one
    /// is not: see README, Operations). Platforms send a few KiB at once; a body
    /// still trickling in after this holds a connection for nothing, and would eat a passive
    /// reply's 5 seconds. Slower gets 408.
    pub timeout: Duration,
}

/// Why a webhook's body was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyRefused {
    /// Larger than the limit (413).
    TooLarge,
    /// Not complete within [`BodyLimits::timeout`] (408).
    TooSlow,
    /// Compressed (415): no platform compresses webhooks, and a small compressed body can
    /// expand far beyond the limit before it could be checked.
    Encoded,
    /// The connection failed mid-body (400; the client is most likely gone).
    Broken,
}

impl BodyRefused {
    fn response(self) -> (&'static str, HttpResponse) {
        use actix_web::http::StatusCode;
        match self {
            Self::TooLarge => ("body_too_large", plain(StatusCode::PAYLOAD_TOO_LARGE, "body too large")),
            Self::TooSlow => ("body_timeout", plain(StatusCode::REQUEST_TIMEOUT, "body too slow")),
            Self::Encoded => {
                ("body_encoded", plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, "compressed bodies are not accepted"))
            }
            Self::Broken => ("body_broken", plain(StatusCode::BAD_REQUEST, "body not read")),
        }
    }
}

/// `Content-Encoding` values that compress (RFC 9110 and common use).
const COMPRESSIONS: [&str; 7] = ["gzip", "x-gzip", "deflate", "br", "zstd", "compress", "x-compress"];

/// Buffer reserved for a body before it arrives; platform bodies are a few KiB.
const INITIAL_BODY_CAPACITY: usize = 16 * 1024;

/// Reads a webhook's body: uncompressed, within `limits`.
async fn read_body(
    request: &HttpRequest,
    mut payload: web::Payload,
    limits: BodyLimits,
) -> Result<web::Bytes, BodyRefused> {
    let limit = limits.max_bytes;
    use futures_util::StreamExt;
    let headers = request.headers();
    // Only real compressions: a meaningless value (`utf-8`) was always read as it is.
    let encoded = headers.get(actix_web::http::header::CONTENT_ENCODING).is_some_and(|encoding| {
        encoding.as_bytes().split(|&byte| byte == b',').any(|coding| {
            let coding = coding.trim_ascii();
            COMPRESSIONS.iter().any(|known| coding.eq_ignore_ascii_case(known.as_bytes()))
        })
    });
    if encoded {
        return Err(BodyRefused::Encoded);
    }
    let declared = headers
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok())
        .and_then(|length| length.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(BodyRefused::TooLarge);
    }
    let read = async {
        // Not the declared length: a client that claims a large body and sends nothing would
        // hold that much memory for the whole timeout.
        let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0).min(INITIAL_BODY_CAPACITY));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|_| BodyRefused::Broken)?;
            if body.len() + chunk.len() > limit {
                return Err(BodyRefused::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(limits.timeout, read).await.unwrap_or(Err(BodyRefused::TooSlow))
}

fn respond(response: WebhookResponse) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(response.status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status).content_type(response.content_type).body(response.body)
}

fn plain(status: actix_web::http::StatusCode, text: &'static str) -> HttpResponse {
    HttpResponse::build(status).content_type("text/plain; charset=utf-8").body(text)
}

/// The webhook endpoint for every channel.
pub async fn webhook(
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let mut response = handle(request, path, payload, state.clone()).await;
    // Stopping (the flag is never cleared, so asking once the request is handled covers a stop
    // that began before it): a kept-alive connection would otherwise go on carrying new messages
    // after the server stopped accepting connections, into the last second before the workers
    // stop.
    if state.hub.passive.is_closing() {
        response.head_mut().set_connection_type(actix_web::http::ConnectionType::Close);
    }
    response
}

async fn handle(
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let started = Instant::now();
    let hub = &state.hub;
    let Some(entry) = ChannelId::parse(&path).ok().and_then(|id| hub.channels.get(&id)) else {
        hub.metrics
            .webhook_requests
            .with_label_values(&[crate::config::UNKNOWN_CHANNEL_LABEL, "unknown_channel"])
            .inc();
        if let Some(left_out) = state.refusals.admit(crate::config::UNKNOWN_CHANNEL_LABEL, "unknown_channel") {
            // Cut: the path is the caller's, of any length.
            let channel: String = path.chars().take(64).collect();
            // Debug-quoted: a percent-encoded line break in the path must not forge a log line.
            tracing::info!(?channel, left_out, "Webhook for an unknown channel.");
        }
        return plain(actix_web::http::StatusCode::NOT_FOUND, "unknown channel");
    };
    let channel = &entry.channel;
    let label = channel.id().as_str();
    let method = match *request.method() {
        HttpMethod::GET => Method::Get,
        HttpMethod::POST => Method::Post,
        _ => {
            hub.metrics.webhook_requests.with_label_values(&[label, "method_not_allowed"]).inc();
            return plain(actix_web::http::StatusCode::METHOD_NOT_ALLOWED, "use GET or POST");
        }
    };
    let body = match read_body(&request, payload, state.body).await {
        Ok(body) => body,
        Err(refused) => {
            let (outcome, response) = refused.response();
            if let Some(left_out) = state.refusals.admit(label, outcome) {
                tracing::info!(channel = %label, ?refused, left_out, "Webhook body refused.");
            }
            hub.metrics.webhook_requests.with_label_values(&[label, outcome]).inc();
            return response;
        }
    };
    let raw_query = request.query_string().to_owned();
    let query: Vec<(String, String)> = serde_urlencoded::from_str(&raw_query).unwrap_or_default();
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    let webhook_request = WebhookRequest { method, query, raw_query, headers, body, received_at: SystemTime::now() };

    // A panic in a channel (a plugin's bug) must not unwind through the worker, which would
    // drop every other connection it holds, held passive attempts included.
    let handled = match std::panic::catch_unwind(AssertUnwindSafe(|| channel.handle_webhook(&webhook_request))) {
        Ok(handled) => handled,
        Err(_panic) => {
            if let Some(left_out) = state.refusals.admit(label, "channel_panicked") {
                tracing::error!(channel = %label, left_out, "The channel panicked handling a webhook (a bug); answered 500.");
            }
            hub.metrics.webhook_requests.with_label_values(&[label, "channel_panicked"]).inc();
            return plain(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR, "internal error");
        }
    };
    let (outcome, response) = match handled {
        Err(error) => {
            if let Some(left_out) = state.refusals.admit(label, error.label()) {
                // Cut and Debug-quoted: a (plugin) channel's reason may quote the unsigned body.
                let reason = crate::llm::sse::truncate_chars(&error.to_string(), 300);
                tracing::warn!(channel = %label, ?reason, left_out, "Webhook rejected.");
            }
            let status = actix_web::http::StatusCode::from_u16(error.http_status())
                .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST);
            (error.label(), plain(status, error.label()))
        }
        Ok(WebhookOutcome::Respond(response)) => ("responded", respond(response)),
        Ok(WebhookOutcome::Accepted { envelopes, .. }) if envelopes.iter().any(|e| !e.has_usable_ids()) => {
            // A blank id would make every later message of the channel a "retry" of the first,
            // and the ids are stored and logged: refuse rather than drop messages silently, or
            // key sessions by megabytes (a plugin's bug, or its caller's input).
            if let Some(left_out) = state.refusals.admit(label, "malformed") {
                tracing::error!(channel = %label, left_out, "Webhook refused: a message without usable ids (a blank platform message id, or an id over 512 bytes or with control characters).");
            }
            ("malformed", plain(actix_web::http::StatusCode::BAD_REQUEST, "malformed"))
        }
        Ok(WebhookOutcome::Accepted { mut envelopes, ack }) => {
            // The hub's fields, whatever the channel put there: a plugin that left `id` blank
            // or reused one would make every other message a store error while one is open, and
            // one naming another channel would have its answers dropped or sent from another
            // account.
            for envelope in &mut envelopes {
                envelope.id = Envelope::new_id();
                envelope.channel = channel.id().clone();
                envelope.channel_kind = channel.kind().to_owned();
                only_finite_numbers(envelope);
            }
            // Only a single message can be answered inside the response.
            let hold = entry.holds_for_passive() && envelopes.len() == 1;
            // In a task of its own: once the store has an envelope, it must be dispatched even
            // if this handler is dropped (the platform hung up, shutdown), or the platform's
            // retry would find it journaled, be acknowledged as a duplicate, and nobody would
            // answer it before the next restart.
            let journaled = actix_web::rt::spawn(journal_and_dispatch(state.clone(), envelopes, hold)).await;
            let Journaled { outcome, failed, held, again } = journaled.unwrap_or_else(|error| {
                tracing::error!(channel = %label, %error, "Journaling a message panicked; this is a bug.");
                Journaled { outcome: "duplicate", failed: true, held: None, again: None }
            });
            if failed {
                ("store_error", plain(actix_web::http::StatusCode::SERVICE_UNAVAILABLE, "try again"))
            } else if let Some((job, envelope)) = held {
                // Counted once, by how the attempt ended; its duration is the answer's, not an
                // acknowledgement's, so it stays out of the ack histogram.
                let connection = request.conn_data::<ConnectionWatch>().cloned();
                let (path, response) =
                    hold_for_answer(hub, entry, &webhook_request, started, connection, envelope, job, ack).await;
                hub.metrics.webhook_requests.with_label_values(&[label, path]).inc();
                return response;
            } else if let Some(again) = again {
                match reply_again(channel.as_ref(), &webhook_request, again) {
                    Some(response) => ("passive_again", respond(response)),
                    None => (outcome, respond(ack)),
                }
            } else {
                (outcome, respond(ack))
            }
        }
    };
    hub.metrics.webhook_requests.with_label_values(&[label, outcome]).inc();
    hub.metrics.webhook_ack_seconds.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
    response
}

/// The channel's passive reply; a panic (a plugin's bug) is an error, handled as one.
fn passive_reply(
    channel: &dyn Channel,
    request: &WebhookRequest,
    envelope: &Envelope,
    reply: &Reply,
) -> Result<WebhookResponse, ChannelError> {
    std::panic::catch_unwind(AssertUnwindSafe(|| channel.passive_reply(request, envelope, reply))).unwrap_or_else(
        |_panic| {
            Err(ChannelError::Unsupported(format!(
                "channel {} panicked building a passive reply (a bug)",
                channel.id()
            )))
        },
    )
}

/// The passive reply given lately to a message (`again`: its envelope and text), built again
/// for a platform retry of it, which proves the first did not arrive in time.
fn reply_again(channel: &dyn Channel, request: &WebhookRequest, again: (Envelope, String)) -> Option<WebhookResponse> {
    let (envelope, text) = again;
    match passive_reply(channel, request, &envelope, &Reply::text(text)) {
        Ok(response) => {
            tracing::warn!(channel = %channel.id(), message = %envelope.platform_message_id, "A passive reply arrived too late; given again to the retry.");
            Some(response)
        }
        Err(error) => {
            tracing::error!(channel = %channel.id(), %error, "Could not build a passive reply again; its text is lost.");
            None
        }
    }
}

/// Replaces a location's coordinates that are not finite numbers (a plugin's `"nan".parse()`)
/// by 0 (and a scale so by none): JSON has no NaN, the journal would hold `null` where a
/// number must be, and the message could not be read back after a crash.
fn only_finite_numbers(envelope: &mut Envelope) {
    for segment in &mut envelope.content {
        let (latitude, longitude, extra) = match segment {
            Segment::Location { latitude, longitude, scale, .. } => (latitude, longitude, scale),
            Segment::Event(Event::Location { latitude, longitude, precision }) => (latitude, longitude, precision),
            _ => continue,
        };
        for coordinate in [latitude, longitude] {
            if !coordinate.is_finite() {
                *coordinate = 0.0;
            }
        }
        *extra = extra.filter(|number| number.is_finite());
    }
}

/// What [`journal_and_dispatch`] did with a webhook's envelopes.
struct Journaled {
    /// `accepted` if any envelope was new, else `duplicate`.
    outcome: &'static str,
    /// The store failed: do not acknowledge, so the platform retries.
    failed: bool,
    /// The passive-reply job the response waits for, with its envelope.
    held: Option<(Arc<PassiveJob>, Envelope)>,
    /// A retry of a message already answered passively: that reply (envelope and text) did
    /// not arrive in time, so this attempt gives it again.
    again: Option<(Envelope, String)>,
}

/// Journals each envelope and dispatches the new ones; with `hold` (one envelope, passive
/// replies), also finds the job the webhook response will wait for.
async fn journal_and_dispatch(state: web::Data<AppState>, envelopes: Vec<Envelope>, hold: bool) -> Journaled {
    let hub = &state.hub;
    let mut journaled = Journaled { outcome: "duplicate", failed: false, held: None, again: None };
    for envelope in envelopes {
        let label = envelope.channel.as_str();
        match hub.store.accept(&envelope, hub.dedupe_ttl).await {
            Ok(Acceptance::New) => {
                journaled.outcome = "accepted";
                hub.metrics.journal_open.inc();
                tracing::debug!(channel = %label, message = %envelope.platform_message_id, "Message accepted.");
                if hold {
                    // Opened before dispatch, so the answer always finds its job.
                    let job = hub.passive.open(&envelope);
                    if state.router.dispatch(envelope.clone()) {
                        journaled.held = Some((job, envelope));
                    } else {
                        hub.passive.close(&envelope.channel, &envelope.platform_message_id);
                    }
                } else {
                    state.router.dispatch(envelope);
                }
            }
            Ok(Acceptance::Duplicate) => {
                tracing::debug!(channel = %label, message = %envelope.platform_message_id, "Platform retry.");
                if hold {
                    // A retry of a message still being answered attaches to its job, and
                    // answers as the envelope that was journaled, not as its own.
                    journaled.held = hub.passive.get(&envelope.channel, &envelope.platform_message_id).map(|job| {
                        let journaled_envelope = job.envelope().clone();
                        (job, journaled_envelope)
                    });
                    if journaled.held.is_none() {
                        journaled.again = hub.passive.reply_again(&envelope.channel, &envelope.platform_message_id);
                    }
                }
            }
            Err(error) => {
                // Not acknowledged, so the platform retries; what was journaled dedupes.
                tracing::error!(channel = %label, %error, "Failed to journal a message.");
                journaled.failed = true;
                break;
            }
        }
    }
    journaled
}

/// How many of the platform's attempts came before one received at `received_at`, by the
/// message's age since `sent_at_ms` (the platform's clock, to the second): it tries again each
/// `interval` (its own passive window: WeChat's 5 s, whatever an operator's override). Counted
/// from the youngest the message may be (the second cut off), an attempt only once it is within
/// a second of when it would come, so that clocks a few seconds apart make no earlier attempt
/// up; `None` when the age is beyond the platform's attempts (a clock far off, or an old test
/// vector).
fn attempts_before(sent_at_ms: Option<i64>, received_at: SystemTime, interval: Duration) -> Option<u32> {
    let interval_ms = i64::try_from(interval.as_millis()).ok().filter(|ms| *ms > 0)?;
    let youngest_age = yizhan_channel_common::unix_millis(received_at).checked_sub(sent_at_ms?.checked_add(999)?)?;
    let span = i64::try_from(retries_span(interval).as_millis()).ok()?;
    if !(0..=span).contains(&youngest_age) {
        return None;
    }
    let before = (youngest_age + 1_000) / interval_ms;
    u32::try_from(before).ok().map(|before| before.min(PASSIVE_ATTEMPTS - 1))
}

/// The passive reply of a last attempt whose own answer is not ready: the user's oldest parked
/// text, with the continue hint when more is parked behind it or the answer will be parked too
/// (passive mode); what does not fit goes back to the front. `None` when nothing is parked, or
/// for a continue word (its own text is the front of the parked queue, and must come first).
fn reply_with_parked(
    hub: &Hub,
    entry: &ChannelEntry,
    request: &WebhookRequest,
    envelope: &Envelope,
) -> Option<WebhookResponse> {
    // A continue word brings that text itself once its turn comes (queued behind a slow one,
    // it may not have come yet): shown here too, it would come twice.
    if hub.passive.is_continuation(&envelope.id)
        || crate::routing::is_continue_word(&hub.messages, envelope.text().trim())
    {
        return None;
    }
    // The end of an earlier answer whose start is still on its way (a paused send API): it
    // comes out after that start, with a later message or the continue word.
    if hub.passive.oldest_is_still_leaving(&envelope.channel, &envelope.sender.id) {
        return None;
    }
    let parked = hub.passive.unpark(&envelope.channel, &envelope.sender.id)?;
    let limit = entry.channel.capabilities().max_part_bytes;
    let older = format!("{}\n{parked}", hub.messages.parked_prefix);
    let more = entry.reply_mode == ReplyMode::Passive || hub.passive.has_parked(&envelope.channel, &envelope.sender.id);
    let (text, rest) = if older.len() <= limit && !more {
        (older, String::new())
    } else {
        crate::delivery::fit_with_hint(&older, &hub.messages.more_hint, limit)
    };
    match passive_reply(entry.channel.as_ref(), request, envelope, &Reply::text(text.clone())) {
        Ok(response) => {
            hub.passive.remember_reply(envelope, text);
            if !rest.trim().is_empty() {
                hub.passive.put_back(&envelope.channel, &envelope.sender.id, rest);
            }
            hub.metrics.answers.with_label_values(&[envelope.channel.as_str(), "unparked"]).inc();
            Some(response)
        }
        Err(error) => {
            tracing::warn!(channel = %envelope.channel, %error, "Could not build a passive reply of parked text; it stays parked.");
            hub.passive.put_back(&envelope.channel, &envelope.sender.id, parked);
            None
        }
    }
}

/// Holds one webhook attempt open for the answer (see `delivery::passive`). Returns how the
/// attempt ended (`passive`, `passive_again`, `lapsed`, `pushed`, `unparked`, `empty`: the
/// webhook outcome label) and the response.
///
/// The platform's window runs from when it sent the request, so the waits are measured from
/// `started` (when the handler began), not from when the hold begins: parsing and journaling
/// come first, and a slow disk must not move the deadline.
#[allow(clippy::too_many_arguments)]
async fn hold_for_answer(
    hub: &Hub,
    entry: &ChannelEntry,
    request: &WebhookRequest,
    started: Instant,
    connection: Option<ConnectionWatch>,
    envelope: Envelope,
    job: Arc<PassiveJob>,
    ack: WebhookResponse,
) -> (&'static str, HttpResponse) {
    let window = entry.passive_window.unwrap_or_default();
    // Past this the platform may have hung up (the connection can stay half-open and this
    // handler keep running): an answer taken later could be written to no one, so it is left
    // in the job for the next attempt.
    let answer_by = window.saturating_sub(entry.passive_margin).saturating_sub(started.elapsed());
    // Earlier attempts this process never saw (refused while it restarted, or when a journal
    // write failed) still count: held for a retry after WeChat's last, an attempt would end in
    // its error page. Only for the first attempt seen: later ones are counted as they come.
    let interval = entry.channel.capabilities().passive_reply_window;
    // A panic there (a plugin's bug) only loses the estimate.
    let sent_at = std::panic::catch_unwind(AssertUnwindSafe(|| entry.channel.sent_at_ms(job.envelope())))
        .unwrap_or_else(|_panic| {
            tracing::error!(channel = %entry.channel.id(), "The channel panicked reading when a message was sent (a bug).");
            None
        });
    let unseen = interval.and_then(|interval| attempts_before(sent_at, request.received_at, interval));
    let (kind, this_attempt) = job.begin_attempt(PASSIVE_ATTEMPTS, unseen);
    // Already past it (a slow read, parse or journal write): this attempt takes nothing. The
    // answer waits for the next attempt or, after the last, is pushed.
    let too_late = answer_by.is_zero();
    let channel_label = [entry.channel.id().as_str()];
    // Counted as waiting before it counts as an attempt: whoever reads both (tests do) never
    // sees an attempt counted that is about to wait as not waiting.
    let waiting = (!too_late).then(|| GaugeHeld::new(hub.metrics.passive_waiting.with_label_values(&channel_label)));
    hub.metrics.passive_attempts.with_label_values(&channel_label).inc();
    // A later attempt began while this one waited: it takes the answer (see `PassiveJob::take`),
    // and this one must not give the answer up to the send path. Held open like any lapse while
    // the platform may still retry: if handlers began out of order and this is the connection it
    // listens to, its retry then gets the reply given meanwhile (`reply_again`). Once every
    // attempt has come, holding it would only end in the platform's error page.
    let superseded = || job.attempts_seen() > this_attempt;
    // Held open past the platform's own deadline: answering anything earlier, even `success`,
    // ends its retries. Its own window, not a shorter one configured here: a window set short
    // for safety must not answer before the platform gave up on the attempt.
    let deadline = entry.platform_window();
    let lapse = || async {
        // Not past the moment the connections close. The job may have left the map by then
        // (its answer pushed at shutdown): the slots' own signal reaches it too.
        tokio::select! {
            () = job.sleep_unless_stopped((deadline + deadline / 5).saturating_sub(started.elapsed())) => {}
            () = hub.passive.stopped() => {}
        }
        ("lapsed", respond(WebhookResponse::empty()))
    };
    let taken = match waiting {
        Some(_waiting) => job.take(this_attempt, answer_by).await,
        None => None,
    };
    // No attempt after this one will take the answer: this one takes it if it can still reply;
    // if not, an answer here is pushed now, not written into this late reply (nor left for the
    // fallback timer, two of the platform's windows away), and a later one is pushed when offered.
    let give_up = || {
        let held = job.give_up();
        if !too_late {
            return held;
        }
        if let Some(held) = held {
            tracing::info!(channel = %entry.channel.id(), "No attempt can reply with the answer in time any more; pushing it.");
            crate::delivery::spawn_push_held(hub, job.clone(), held);
        }
        None
    };
    // Whether the platform has closed this attempt's connection (see `ConnectionWatch`).
    let peer_gone = || connection.as_ref().is_some_and(ConnectionWatch::peer_closed);
    let held = match kind {
        AttemptKind::Lapse => match taken {
            Some(held) => Some(held),
            None if superseded() && job.attempts_seen() >= PASSIVE_ATTEMPTS => return ("lapsed", respond(ack)),
            None if superseded() => return lapse().await,
            // Shutting down: the platform's retry could not get in, so this attempt is the
            // last; the answer will be pushed.
            None if hub.passive.is_closing() => give_up(),
            None => return lapse().await,
        },
        AttemptKind::Last => match taken {
            Some(held) => Some(held),
            // Not the attempt the platform listens to; its last word ends nothing it waits for.
            None if superseded() => return ("lapsed", respond(ack)),
            None => give_up(),
        },
    };
    let Some(HeldAnswer { mut parts, gone }) = held else {
        if too_late {
            // Too late for the platform to read: text parked earlier stays parked.
            return ("pushed", respond(ack));
        }
        // An earlier attempt, whose handler began late, took the answer after this retry found
        // the job open: it went to a connection the platform had left, and is given again.
        let given = hub.passive.reply_again(&envelope.channel, &envelope.platform_message_id);
        if let Some(response) = given.and_then(|given| reply_again(entry.channel.as_ref(), request, given)) {
            return ("passive_again", respond(response));
        }
        // This answer comes later (pushed, or parked in passive mode); what is parked of the
        // user's earlier answers need not wait for yet another message, unless the platform has
        // hung up on this attempt: then it waits for the next one rather than be lost.
        if peer_gone() {
            return ("pushed", respond(ack));
        }
        return match reply_with_parked(hub, entry, request, &envelope) {
            Some(response) => ("unparked", respond(response)),
            None => ("pushed", respond(ack)),
        };
    };
    hub.passive.close(&envelope.channel, &envelope.platform_message_id);
    if parts.is_empty() {
        // The answer rendered to nothing (an empty welcome, say) and is already finished.
        return ("empty", respond(ack));
    }
    // The platform hung up on its last attempt before the answer came (the request queued before
    // this handler began): a reply now would reach no one, and no retry comes to be given it
    // again. The answer is pushed instead of being lost while recorded as given.
    let no_retry_comes = kind == AttemptKind::Last || hub.passive.is_closing();
    if no_retry_comes && peer_gone() {
        tracing::info!(channel = %entry.channel.id(), "The platform hung up on its last attempt; pushing the answer.");
        crate::delivery::spawn_push_held(hub, job.clone(), HeldAnswer { parts, gone });
        return ("pushed", respond(ack));
    }
    let channel = envelope.channel.as_str();
    let limit = entry.channel.capabilities().max_part_bytes;
    let first = parts.remove(0);
    let mut text = first.reply.text.clone();
    let mut unparked = None;
    // An older parked answer too long to go beside this one: the reply shows its start (with
    // the hint), and the rest of it, then this whole answer, wait for the continue word. Put
    // back without a word, it would only ever come out on a 继续 the user has no reason to send.
    let mut shown_instead = None;
    // Not when this answer is itself parked text (the continue word): the next parked text is
    // later than it and would be shown first. Nor while older parked text is still on its way
    // (as in `reply_with_parked`): a busy reply, which no session orders, would overtake it.
    let unpark = !hub.passive.is_continuation(&envelope.id)
        && !hub.passive.oldest_is_still_leaving(&envelope.channel, &envelope.sender.id);
    if let Some(parked) = unpark.then(|| hub.passive.unpark(&envelope.channel, &envelope.sender.id)).flatten() {
        let combined = format!("{}\n{parked}\n\n{text}", hub.messages.parked_prefix);
        // With more parked behind it, this answer waits its turn too: shown now, it would
        // overtake the answers still parked.
        if combined.len() <= limit && !hub.passive.has_parked(&envelope.channel, &envelope.sender.id) {
            text = combined;
        } else {
            let older = format!("{}\n{parked}", hub.messages.parked_prefix);
            let (start, rest_of_older) = crate::delivery::fit_with_hint(&older, &hub.messages.more_hint, limit);
            text = start;
            shown_instead = Some(rest_of_older);
        }
        unparked = Some(parked);
    }
    // No send API: the rest waits for the continue word, and the hint must fit too. Parked
    // only once the reply is built: otherwise the answer goes whole the other way.
    let mut rest_to_park = None;
    // (While shutting down too: parked text is saved, and the reply says more follows.)
    if shown_instead.is_none() && entry.reply_mode == ReplyMode::Passive && !parts.is_empty() {
        let rest = std::mem::take(&mut parts);
        rest_to_park = Some((crate::delivery::cut_for_hint(hub, &mut text, limit, &rest), rest));
    }
    let rest_is_parked = rest_to_park.is_some();
    let response = match passive_reply(entry.channel.as_ref(), request, &envelope, &Reply::text(text.clone())) {
        Ok(response) => {
            hub.passive.remember_reply(&envelope, text);
            if let Some((to_park, _)) = rest_to_park {
                crate::delivery::park_text(hub, &envelope, to_park);
            }
            response
        }
        Err(error) => {
            tracing::warn!(channel, %error, "Could not build the passive reply; pushing the answer.");
            if let Some(parked) = unparked {
                hub.passive.put_back(&envelope.channel, &envelope.sender.id, parked);
            }
            let mut parts = rest_to_park.map_or(parts, |(_, rest)| rest);
            parts.insert(0, first);
            // All of it goes through the send API, within the quota.
            let parts = crate::delivery::within_send_quota(hub, &envelope, parts);
            let hub = hub.clone();
            actix::spawn(async move {
                send_parts(&hub, &envelope, parts).await;
                drop(gone);
            });
            return ("pushed", respond(ack));
        }
    };
    hub.metrics.answers.with_label_values(&[channel, "passive"]).inc();
    if unparked.is_some() {
        hub.metrics.answers.with_label_values(&[channel, "unparked"]).inc();
    }
    if let Some(rest_of_older) = shown_instead {
        if !rest_of_older.trim().is_empty() {
            hub.passive.put_back(&envelope.channel, &envelope.sender.id, rest_of_older);
        }
        // This answer, whole, after the older one.
        let mut all = parts;
        all.insert(0, first);
        crate::delivery::park_behind_hint(hub, &envelope, None, limit, &all);
        let hub = hub.clone();
        actix::spawn(async move {
            hub.finish(&envelope.id).await;
            drop(gone);
        });
        return ("passive", respond(response));
    }
    // The passive reply used no quota; the rest goes through the send API within it.
    let parts = crate::delivery::within_send_quota(hub, &envelope, parts);
    let hub = hub.clone();
    // Cleared from the outbox only after this handler has returned its response (the task runs
    // once the worker is free again): a crash before the response left would otherwise lose the
    // start of the answer; a crash in between now at worst sends it once more.
    actix::spawn(async move {
        // Not when the rest is parked: the parked text starts with what the hint cut off this
        // part, and a start after a crash before the finish parks the answer again from its
        // pending parts (dropping that copy), which must then include this part (its start is
        // shown once more rather than its end lost).
        if !rest_is_parked {
            crate::delivery::clear_delivered(hub.store.as_ref(), &first).await;
        }
        if parts.is_empty() {
            hub.finish(&envelope.id).await;
        } else {
            send_parts(&hub, &envelope, parts).await;
        }
        // The session's next answer may go now: this one's reply was written before this task
        // ran, and its rest has been sent.
        drop(gone);
    });
    ("passive", respond(response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_that_is_not_a_number_is_journaled_as_one_that_reads_back() {
        let mut envelope = crate::store::test_envelope("m1");
        envelope.content = vec![
            Segment::Location {
                latitude: f64::NAN,
                longitude: f64::INFINITY,
                scale: Some(f64::NAN),
                label: Some("某地".into()),
            },
            Segment::Event(Event::Location { latitude: f64::NEG_INFINITY, longitude: 1.5, precision: Some(f64::NAN) }),
        ];
        only_finite_numbers(&mut envelope);
        let json = serde_json::to_string(&envelope).unwrap_or_else(|e| panic!("{e}"));
        let read: Envelope = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
        let [Segment::Location { latitude, longitude, scale, label }, Segment::Event(Event::Location { latitude: reported, longitude: east, precision })] =
            read.content.as_slice()
        else {
            panic!("{read:?}")
        };
        assert_eq!((*latitude, *longitude, *scale, label.as_deref()), (0.0, 0.0, None, Some("某地")));
        assert_eq!((*reported, *east, *precision), (0.0, 1.5, None));
    }

    #[test]
    fn refusals_are_logged_once_per_period_per_channel_and_outcome_with_a_count() {
        let log = RefusalLog::default();
        let start = Instant::now();
        assert_eq!(log.admit_at("mp", "unauthorized", start), Some(0));
        for _ in 0..5 {
            assert_eq!(log.admit_at("mp", "unauthorized", start + Duration::from_secs(1)), None);
        }
        // Another outcome, another channel: logged at once.
        assert_eq!(log.admit_at("mp", "malformed", start + Duration::from_secs(1)), Some(0));
        assert_eq!(log.admit_at("wecom", "unauthorized", start + Duration::from_secs(1)), Some(0));
        assert_eq!(log.admit_at("mp", "unauthorized", start + REFUSAL_LOG_EVERY), Some(5));
        assert_eq!(log.admit_at("mp", "unauthorized", start + REFUSAL_LOG_EVERY), None);
    }

    #[test]
    fn a_messages_age_tells_how_many_attempts_came_before() {
        let sent = 1_700_000_000_000_i64;
        let window = Duration::from_secs(5);
        // Received `ms` after the second WeChat stamped (it sent within that second).
        let before = |ms: u64| {
            attempts_before(Some(sent), SystemTime::UNIX_EPOCH + Duration::from_millis(sent as u64 + ms), window)
        };
        assert_eq!(before(300), None, "stamped less than a second ago: may be younger than zero, counted as they come");
        assert_eq!(before(1_300), Some(0));
        assert_eq!(before(4_900), Some(0), "a clock 3 s ahead makes up no attempt");
        assert_eq!(before(5_100), Some(1), "the second attempt, 5 s on");
        assert_eq!(before(10_000), Some(2), "the third");
        assert_eq!(before(19_000), Some(2), "within the span, never beyond the last");
        assert_eq!(before(22_000), None, "older than every attempt: a clock far off");
        assert_eq!(attempts_before(None, SystemTime::now(), window), None);
    }
}
