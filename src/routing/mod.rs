//! From an accepted envelope to the work it asks for, and to the session that does it.
//!
//! Invariant: every accepted envelope either reaches a session, is answered with the busy text,
//! or is finished as needing no answer; none is left unfinished in the journal by routing.

use crate::config::{MenuAction, MessagesConfig};
use crate::hub::Hub;
use crate::session::{DispatchError, Job, SessionRegistry};
use futures_util::FutureExt;
use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use yizhan_channel_core::{ConversationKind, Delivery, Envelope, Event, Segment};

/// Identifies one conversation context: channel + conversation (+ sender in groups).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey(String);

impl SessionKey {
    /// The key for an envelope. Direct chats are keyed by conversation; group chats by group,
    /// or by group and member when `group_per_user`.
    pub fn for_envelope(envelope: &Envelope, group_per_user: bool) -> Self {
        let (conversation, sender) = (escaped(&envelope.conversation.id), escaped(&envelope.sender.id));
        match envelope.conversation.kind {
            ConversationKind::Direct => Self(format!("{}:d:{conversation}", envelope.channel)),
            ConversationKind::Group if group_per_user => {
                Self(format!("{}:g:{conversation}:{sender}", envelope.channel))
            }
            ConversationKind::Group => Self(format!("{}:g:{conversation}", envelope.channel)),
        }
    }

    /// The key as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A conversation's busy reply on its way (see [`Router::busy_replies`](Router)); dropped when it
/// has gone, or when its task ends any other way (a panic in a plugin's `render`), so that the
/// conversation is not left marked for good.
struct BusyReplyOnItsWay {
    busy_replies: BusyReplies,
    key: SessionKey,
}

/// See [`Router::busy_replies`](Router).
type BusyReplies = Arc<dashmap::DashSet<SessionKey, foldhash::fast::RandomState>>;

impl Drop for BusyReplyOnItsWay {
    fn drop(&mut self) {
        self.busy_replies.remove(&self.key);
    }
}

/// A platform id as a part of a key: `:` (the separator) and `%` written as `%3A` and `%25`,
/// so that group `a:b` with member `c` and group `a` with member `b:c` stay apart. The built-in
/// platforms' ids have neither, so their keys (and stored history) are as they always were.
fn escaped(id: &str) -> std::borrow::Cow<'_, str> {
    if id.contains([':', '%']) {
        id.replace('%', "%25").replace(':', "%3A").into()
    } else {
        id.into()
    }
}

/// What an envelope asks of the hub.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// A question for the model.
    Ask(String),
    /// A fixed answer (welcome, "I only read text").
    Say(String),
    /// The continue word: the oldest parked answer text for the user, taken when the session
    /// gets to it (after the turns queued before it, which may park more), or the
    /// nothing-parked text.
    Continue,
    /// Forget the conversation, then confirm.
    Reset,
    /// The unsent parts of an answer the last run recorded: sent in the conversation's order
    /// (after what was accepted before it, before what came after), never asked again.
    Resend(Vec<Delivery>),
}

/// Whether `question` (a message's trimmed text) is one of the continue words, which fetch
/// parked text on channels that park answers.
pub fn is_continue_word(messages: &MessagesConfig, question: &str) -> bool {
    is_command(&messages.continue_commands, question)
}

/// Whether `text` is one of `commands`, as users type or say them: case, full-width forms and
/// closing punctuation aside (「继续。」, WeChat's voice recognition adds the 。; a phone makes
/// 「More」 of `more`; 「／ｒｅｓｅｔ」).
fn is_command(commands: &[String], text: &str) -> bool {
    let said = command_form(text);
    !said.is_empty() && commands.iter().any(|command| command_form(command) == said)
}

/// `text` as commands are compared: trimmed, without closing punctuation, full-width ASCII
/// forms made half-width, lower case.
fn command_form(text: &str) -> String {
    const CLOSING: &[char] = &['。', '.', '！', '!', '？', '?', '～', '~', '，', ',', '、', '…'];
    text.trim()
        .chars()
        .map(|ch| match u32::from(ch) {
            // FULLWIDTH EXCLAMATION MARK .. FULLWIDTH TILDE, and the ideographic space.
            code @ 0xFF01..=0xFF5E => char::from_u32(code - 0xFEE0).unwrap_or(ch),
            0x3000 => ' ',
            _ => ch,
        })
        .collect::<String>()
        .trim()
        .trim_end_matches(CLOSING)
        .trim()
        .to_lowercase()
}

/// Decides what an envelope asks for; `None` when it needs no answer (unfollow, opening the
/// chat, menu views, location reports, unknown menu keys, group chatter without a mention).
pub fn classify<S: std::hash::BuildHasher>(
    envelope: &Envelope,
    messages: &MessagesConfig,
    menu: &HashMap<String, MenuAction, S>,
) -> Option<Work> {
    if let Some(event) = envelope.event() {
        return match event {
            Event::Subscribe { .. } => Some(Work::Say(messages.welcome.clone())),
            // WeCom sends `enter_agent` each time a member opens the app's chat: a welcome on each
            // would repeat all day. The first AI answer carries the AI label instead.
            Event::EnterChat => None,
            Event::MenuClick { key } => match menu.get(key) {
                Some(MenuAction { reply: Some(reply), .. }) => Some(Work::Say(reply.clone())),
                Some(MenuAction { prompt: Some(prompt), .. }) => Some(Work::Ask(prompt.clone())),
                _ => {
                    tracing::info!(channel = %envelope.channel, %key, "Menu key without a configured action.");
                    None
                }
            },
            _ => None,
        };
    }
    // In a direct chat every message is addressed to the bot, whatever a channel set.
    if envelope.conversation.kind == ConversationKind::Group && !envelope.mentions_self {
        return None;
    }
    let text = envelope.text();
    let question = text.trim();
    if !question.is_empty() {
        let is_reset = is_command(&messages.reset_commands, question);
        return Some(if is_reset { Work::Reset } else { Work::Ask(question.to_owned()) });
    }
    // A blank recognition (or text, from a plugin) is none: not something else to apologise for.
    let unrecognized_voice = envelope.content.iter().any(|segment| {
        matches!(segment, Segment::Voice { recognition, .. } if recognition.as_deref().is_none_or(|r| r.trim().is_empty()))
    });
    if unrecognized_voice {
        return Some(Work::Say(messages.voice_unrecognized.clone()));
    }
    let has_content = envelope.content.iter().any(|segment| match segment {
        Segment::Mention { .. } => false,
        Segment::Text { text } => !text.trim().is_empty(),
        _ => true,
    });
    has_content.then(|| Work::Say(messages.unsupported.clone()))
}

/// Routes accepted envelopes to sessions.
#[derive(Clone)]
pub struct Router {
    hub: Hub,
    sessions: SessionRegistry,
    /// Conversations with a busy reply on its way: one at a time each. A flood would otherwise
    /// start a task per message, all waiting behind the platform's rate limits.
    busy_replies: BusyReplies,
}

impl Router {
    /// A router over the hub's sessions.
    pub fn new(hub: Hub, sessions: SessionRegistry) -> Self {
        Self { hub, sessions, busy_replies: Arc::default() }
    }

    /// The session registry (for metrics and shutdown).
    pub fn sessions(&self) -> &SessionRegistry {
        &self.sessions
    }

    /// Sends an accepted envelope on its way; returns whether an answer will follow. Never
    /// waits for the model. Must be called from inside an actix system (sessions start on the
    /// current arbiter).
    pub fn dispatch(&self, envelope: Envelope) -> bool {
        self.route(envelope, false)
    }

    /// [`dispatch`](Self::dispatch) for a message the last run accepted and did not answer: its
    /// conversation's queue bound does not apply (see [`SessionRegistry::dispatch_resumed`]).
    pub fn dispatch_resumed(&self, envelope: Envelope) -> bool {
        self.route(envelope, true)
    }

    /// Queues the unsent parts of an answer the last run recorded to `envelope`, in its
    /// conversation's order (see [`Work::Resend`]).
    pub fn resend_resumed(&self, envelope: Envelope, parts: Vec<Delivery>) {
        let key = self.hub.session_key(&envelope);
        let job = Job { envelope, work: Work::Resend(parts) };
        if let Err(DispatchError::Overloaded(job) | DispatchError::TooManySessions(job)) =
            self.sessions.dispatch_resumed(key, job)
        {
            // Not bounded, so never refused; sent at once rather than lost if it ever were.
            let (hub, Job { envelope, work }) = (self.hub.clone(), *job);
            if let Work::Resend(parts) = work {
                actix::spawn(async move { crate::delivery::resend(&hub, &envelope, parts).await });
            }
        }
    }

    fn route(&self, envelope: Envelope, resumed: bool) -> bool {
        let entry = self.hub.channels.get(&envelope.channel);
        let menu = entry.as_ref().map(|entry| &entry.menu);
        let can_park = entry.as_ref().is_some_and(|entry| entry.can_park());
        let empty = HashMap::new();
        let mut work = classify(&envelope, &self.hub.messages, menu.unwrap_or(&empty));
        if let (Some(Work::Ask(text)), true) = (&work, can_park) {
            if is_continue_word(&self.hub.messages, text) {
                work = Some(Work::Continue);
            }
        }
        let Some(work) = work else {
            tracing::debug!(channel = %envelope.channel, message = %envelope.platform_message_id, "Nothing to answer.");
            let hub = self.hub.clone();
            actix::spawn(async move { hub.finish(&envelope.id).await });
            return false;
        };
        let key = self.hub.session_key(&envelope);
        let job = Job { envelope, work };
        let dispatched =
            if resumed { self.sessions.dispatch_resumed(key, job) } else { self.sessions.dispatch(key, job) };
        match dispatched {
            Ok(()) => true,
            Err(DispatchError::Overloaded(job)) => self.answer_busy(*job, "session_queue"),
            Err(DispatchError::TooManySessions(job)) => self.answer_busy(*job, "sessions"),
        }
    }

    /// Answers a job no session takes (`bound`: which one it is over) with the busy text, once
    /// per conversation while that answer is on its way. Returns whether it is answered.
    fn answer_busy(&self, job: Job, bound: &'static str) -> bool {
        self.hub.metrics.shed.with_label_values(&[bound]).inc();
        let (hub, envelope) = (self.hub.clone(), job.envelope);
        let key = hub.session_key(&envelope);
        if !self.busy_replies.insert(key.clone()) {
            // Told already, by a busy reply still on its way.
            tracing::debug!(channel = %envelope.channel, bound, "Over a bound; finished unanswered (told busy already).");
            actix::spawn(async move { hub.finish(&envelope.id).await });
            return false;
        }
        tracing::warn!(channel = %envelope.channel, bound, "Over a bound (too many messages waiting in one conversation, or too many conversations); answered busy.");
        // A continue word took nothing yet: the parked text waits for the next one.
        let on_its_way = BusyReplyOnItsWay { busy_replies: self.busy_replies.clone(), key };
        actix::spawn(async move {
            let busy = hub.messages.busy.clone();
            let answered = crate::delivery::answer(&hub, &envelope, on_its_way.key.as_str(), None, busy.into());
            // A panic (a plugin's render, say) must not leave the message open: a graceful stop
            // would wait for it until its bound.
            if AssertUnwindSafe(answered).catch_unwind().await.is_err() {
                tracing::error!(channel = %envelope.channel, "The busy reply panicked (a bug); the message is finished unanswered.");
                hub.passive.close(&envelope.channel, &envelope.platform_message_id);
                hub.finish(&envelope.id).await;
            }
            drop(on_its_way);
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yizhan_channel_core::{ChannelId, Conversation, ReplyHandle, Sender};

    fn envelope(content: Vec<Segment>) -> Envelope {
        Envelope {
            id: Envelope::new_id(),
            channel: ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}")),
            channel_kind: "wechat_mp".into(),
            platform_message_id: "1".into(),
            received_at_ms: 0,
            conversation: Conversation { kind: ConversationKind::Direct, id: "u1".into() },
            sender: Sender { id: "u1".into(), name: None },
            content,
            mentions_self: true,
            reply_handle: ReplyHandle::default(),
        }
    }

    #[test]
    fn text_is_a_question_and_reset_words_reset() {
        let messages = MessagesConfig::default();
        let ask = classify(&envelope(vec![Segment::Text { text: "  你好 ".into() }]), &messages, &HashMap::new());
        assert_eq!(ask, Some(Work::Ask("你好".into())));
        for word in ["/reset", "/RESET", "重置", "清空对话", "重置。", "重置！", "／ｒｅｓｅｔ", "/Reset."]
        {
            let reset = classify(&envelope(vec![Segment::Text { text: word.into() }]), &messages, &HashMap::new());
            assert_eq!(reset, Some(Work::Reset), "{word}");
        }
        // Only closing punctuation: a question that goes on is a question.
        let question = classify(&envelope(vec![Segment::Text { text: "重置密码".into() }]), &messages, &HashMap::new());
        assert_eq!(question, Some(Work::Ask("重置密码".into())));
    }

    #[test]
    fn blank_text_needs_no_answer_and_a_blank_recognition_is_an_unrecognised_voice() {
        let messages = MessagesConfig::default();
        let blank = classify(&envelope(vec![Segment::Text { text: " \u{3000}".into() }]), &messages, &HashMap::new());
        assert_eq!(blank, None);
        let voice = Segment::Voice { media_id: None, format: None, recognition: Some(" ".into()) };
        let voice = classify(&envelope(vec![voice]), &messages, &HashMap::new());
        assert_eq!(voice, Some(Work::Say(messages.voice_unrecognized.clone())));
    }

    #[test]
    fn continue_words_are_matched_as_users_type_or_say_them() {
        let messages =
            MessagesConfig { continue_commands: vec!["继续".into(), "more".into()], ..MessagesConfig::default() };
        for said in ["继续", "继续。", " 继续！ ", "More", "MORE.", "ｍｏｒｅ"] {
            assert!(is_continue_word(&messages, said), "{said}");
        }
        for said in ["继续说", "more please", "。", ""] {
            assert!(!is_continue_word(&messages, said), "{said}");
        }
    }

    #[test]
    fn session_keys_of_different_conversations_differ_whatever_their_ids_hold() {
        let key = |group: &str, member: &str| {
            let mut envelope = envelope(vec![]);
            envelope.conversation = Conversation { kind: ConversationKind::Group, id: group.into() };
            envelope.sender = Sender { id: member.into(), name: None };
            SessionKey::for_envelope(&envelope, true)
        };
        assert_ne!(key("a:b", "c"), key("a", "b:c"));
        assert_ne!(key("a%3Ab", "c"), key("a:b", "c"));
        assert_eq!(key("oGroup", "oMember").as_str(), "mp:g:oGroup:oMember");
        assert_eq!(SessionKey::for_envelope(&envelope(vec![]), false).as_str(), "mp:d:u1");
    }

    #[test]
    fn group_chatter_needs_a_mention_and_a_direct_message_never_does() {
        let messages = MessagesConfig::default();
        let mut unmentioned = envelope(vec![Segment::Text { text: "你好".into() }]);
        unmentioned.mentions_self = false;
        assert_eq!(classify(&unmentioned, &messages, &HashMap::new()), Some(Work::Ask("你好".into())));
        unmentioned.conversation.kind = ConversationKind::Group;
        assert_eq!(classify(&unmentioned, &messages, &HashMap::new()), None);
    }

    #[test]
    fn events_get_a_welcome_or_nothing() {
        let messages = MessagesConfig::default();
        let welcome =
            classify(&envelope(vec![Segment::Event(Event::Subscribe { scene: None })]), &messages, &HashMap::new());
        assert_eq!(welcome, Some(Work::Say(messages.welcome.clone())));
        assert_eq!(classify(&envelope(vec![Segment::Event(Event::Unsubscribe)]), &messages, &HashMap::new()), None);
        assert_eq!(classify(&envelope(vec![Segment::Event(Event::EnterChat)]), &messages, &HashMap::new()), None);
    }

    #[test]
    fn pictures_get_the_unsupported_text_and_voice_uses_recognition() {
        let messages = MessagesConfig::default();
        let image = classify(
            &envelope(vec![Segment::Image { url: None, media_id: Some("m".into()) }]),
            &messages,
            &HashMap::new(),
        );
        assert_eq!(image, Some(Work::Say(messages.unsupported.clone())));
        let voice = envelope(vec![Segment::Voice { media_id: None, format: None, recognition: Some("天气".into()) }]);
        assert_eq!(classify(&voice, &messages, &HashMap::new()), Some(Work::Ask("天气".into())));
        let silent = envelope(vec![Segment::Voice { media_id: None, format: None, recognition: None }]);
        assert_eq!(classify(&silent, &messages, &HashMap::new()), Some(Work::Say(messages.voice_unrecognized.clone())));
    }

    #[test]
    fn menu_clicks_map_to_replies_or_prompts() {
        let messages = MessagesConfig::default();
        let mut menu = HashMap::new();
        menu.insert("HELLO".to_owned(), MenuAction { reply: Some("你好！".into()), prompt: None });
        menu.insert("ASK".to_owned(), MenuAction { reply: None, prompt: Some("介绍一下产品".into()) });
        let click = |key: &str| envelope(vec![Segment::Event(Event::MenuClick { key: key.into() })]);
        assert_eq!(classify(&click("HELLO"), &messages, &menu), Some(Work::Say("你好！".into())));
        assert_eq!(classify(&click("ASK"), &messages, &menu), Some(Work::Ask("介绍一下产品".into())));
        assert_eq!(classify(&click("OTHER"), &messages, &menu), None);
    }

    #[test]
    fn session_keys_separate_channels_and_conversations() {
        let a = envelope(vec![]);
        let mut b = a.clone();
        b.conversation.id = "u2".into();
        assert_ne!(SessionKey::for_envelope(&a, false), SessionKey::for_envelope(&b, false));
        assert_eq!(SessionKey::for_envelope(&a, false).as_str(), "mp:d:u1");
        let mut group = a.clone();
        group.conversation = Conversation { kind: ConversationKind::Group, id: "oc_1".into() };
        assert_eq!(SessionKey::for_envelope(&group, false).as_str(), "mp:g:oc_1");
        assert_eq!(SessionKey::for_envelope(&group, true).as_str(), "mp:g:oc_1:u1");
    }
}
