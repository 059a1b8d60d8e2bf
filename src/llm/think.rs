//! Turns raw streamed answer text into what a chat user may see: the `<think>…</think>` block
//! that opens an answer removed (when enabled) and leading whitespace dropped. Models put their
//! reasoning first; a `<think>` later in the answer is the answer talking about the tag (or
//! quoting it in code) and is kept.
//!
//! Invariants: tags may be split across pieces at any character; at most one tag's length of
//! text is held back, so memory stays constant however long a reasoning block runs; an unclosed
//! block at the end of the answer is dropped, never shown.

use super::backend::{DeltaSink, LlmError};

/// The tag that opens an inline reasoning block (DeepSeek-R1, QwQ, Qwen3 via some servers).
const OPEN: &str = "<think>";
/// The tag that closes it.
const CLOSE: &str = "</think>";

/// A streaming filter over answer pieces.
///
/// Besides removing reasoning blocks it holds back whitespace at the very start of the answer:
/// models put blank lines after a removed block, and the returned answer is trimmed anyway, so
/// the user should not receive a whitespace-only first message either. This also keeps
/// whitespace from counting as the "first token".
#[derive(Debug, Clone, Default)]
pub struct ThinkFilter {
    /// Whether `<think>` blocks are removed; per model, because some models legitimately talk
    /// about the tag and most never emit it.
    strip_think: bool,
    /// Currently inside a `<think>` block.
    inside: bool,
    /// Text held back because it may be the start of a tag.
    pending: String,
    /// Some non-whitespace text has been emitted, so whitespace is no longer leading.
    started: bool,
    /// The text so far, while the answer may still be inside a reasoning block whose `<think>`
    /// the chat template wrote into the prompt (see [`ThinkFilter::opened_by_prompt`]): dropped
    /// at the first `</think>`, shown if the answer ends without one.
    held: Option<String>,
}

impl ThinkFilter {
    /// A filter; `strip_think` enables the removal of `<think>` blocks.
    pub fn new(strip_think: bool) -> Self {
        Self { strip_think, ..Self::default() }
    }

    /// For models whose chat template ends the prompt with `<think>` (QwQ, DeepSeek-R1 and
    /// Qwen3 thinking models served without a reasoning parser): their output starts inside the
    /// reasoning block and only its `</think>` is seen. Until then nothing is shown; an answer
    /// that ends without `</think>` did not reason and is shown whole. Only with `strip_think`.
    pub fn opened_by_prompt(mut self, opened: bool) -> Self {
        self.held = (opened && self.strip_think).then(String::new);
        self
    }

    /// Feeds the next raw piece and returns the text now safe to show (possibly empty).
    pub fn push(&mut self, piece: &str) -> String {
        if let Some(held) = self.held.as_mut() {
            // Only the new piece, and a tag's length before it, can hold a new `</think>`.
            let mut from = held.len().saturating_sub(CLOSE.len() - 1);
            while !held.is_char_boundary(from) {
                from -= 1;
            }
            held.push_str(piece);
            if let Some(at) = held[from..].find(CLOSE) {
                let after = held[from + at + CLOSE.len()..].to_owned();
                self.held = None;
                return self.push(&after);
            }
            if held.len() > MAX_ANSWER_BYTES {
                // Too long to be shown anyway: from here on it is reasoning like any other.
                let keep = partial_tag_suffix(held, CLOSE);
                self.pending = held[held.len() - keep..].to_owned();
                self.held = None;
                self.inside = true;
            }
            return String::new();
        }
        let mut input = std::mem::take(&mut self.pending);
        input.push_str(piece);
        if !self.strip_think {
            return self.visible(input);
        }
        let mut out = String::new();
        let mut rest: &str = &input;
        loop {
            if self.inside {
                if let Some(at) = rest.find(CLOSE) {
                    rest = &rest[at + CLOSE.len()..];
                    self.inside = false;
                    continue;
                }
                let keep = partial_tag_suffix(rest, CLOSE);
                self.pending = rest[rest.len() - keep..].to_owned();
                break;
            }
            if let Some(at) = rest.find(OPEN) {
                let opens_answer = !self.started && out.trim().is_empty() && rest[..at].trim().is_empty();
                out.push_str(&rest[..at]);
                rest = &rest[at + OPEN.len()..];
                if opens_answer {
                    self.inside = true;
                } else {
                    out.push_str(OPEN);
                }
                continue;
            }
            let keep = partial_tag_suffix(rest, OPEN);
            out.push_str(&rest[..rest.len() - keep]);
            self.pending = rest[rest.len() - keep..].to_owned();
            break;
        }
        self.visible(out)
    }

    /// The stream ended without the server saying the answer was complete (no closing chunk, no
    /// `[DONE]`, no terminal event): held text may be reasoning cut off by a failure, never to
    /// be shown.
    pub fn ended_abruptly(&mut self) {
        self.cut_short();
    }

    /// The model stopped before its answer was done (its token limit, a content filter): text
    /// held in case the prompt opened a reasoning block is reasoning cut off before its
    /// `</think>`, never to be shown.
    pub fn cut_short(&mut self) {
        if self.held.take().is_some() {
            self.inside = true;
            self.pending.clear();
        }
    }

    /// Ends the answer: returns held-back text that turned out not to be a tag. An unclosed
    /// reasoning block is dropped.
    pub fn finish(&mut self) -> String {
        if let Some(held) = self.held.take() {
            // No `</think>` came, so the prompt opened no block: the text is filtered as any
            // answer is, and a block the model opened itself (and never closed) is dropped.
            let mut shown = self.push(&held);
            shown.push_str(&self.finish());
            return shown;
        }
        let pending = std::mem::take(&mut self.pending);
        if self.inside {
            self.inside = false;
            return String::new();
        }
        self.visible(pending)
    }

    fn visible(&mut self, text: String) -> String {
        if self.started {
            return text;
        }
        let trimmed = text.trim_start();
        if trimmed.is_empty() {
            return String::new();
        }
        self.started = true;
        trimmed.to_owned()
    }
}

/// The length of the longest proper prefix of `tag` that `text` ends with.
///
/// `tag` is ASCII, so the returned cut is always on a character boundary of `text`.
fn partial_tag_suffix(text: &str, tag: &str) -> usize {
    let bytes = text.as_bytes();
    let tag = tag.as_bytes();
    let longest = bytes.len().min(tag.len().saturating_sub(1));
    (1..=longest).rev().find(|&len| bytes.ends_with(&tag[..len])).unwrap_or(0)
}

/// The largest answer kept in memory; far above any chat message, a guard against a server that
/// streams forever within the total timeout.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// The visible answer of one backend attempt: filters raw pieces, forwards each visible piece to
/// the caller's sink and keeps the concatenation.
///
/// Invariant: the returned answer is exactly the concatenation of the pieces given to the sink,
/// trimmed, so what the user saw streaming and what is stored in history agree.
pub(crate) struct VisibleAnswer<'s> {
    filter: ThinkFilter,
    text: String,
    sink: &'s mut DeltaSink,
}

impl<'s> VisibleAnswer<'s> {
    /// An empty answer that forwards to `sink` what `filter` lets through.
    pub(crate) fn new(filter: ThinkFilter, sink: &'s mut DeltaSink) -> Self {
        Self { filter, text: String::new(), sink }
    }

    /// Feeds a raw content piece.
    pub(crate) fn push(&mut self, raw: &str) -> Result<(), LlmError> {
        let visible = self.filter.push(raw);
        if visible.is_empty() && !raw.is_empty() {
            // Held back (a `<think>` block): the model is at work all the same.
            self.progressed();
        }
        self.emit(visible)
    }

    /// Tells the caller's sink, with an empty piece, that the model is producing something not
    /// shown (reasoning): a call cut by the total timeout after that was answering, not failing.
    pub(crate) fn progressed(&mut self) {
        (self.sink)("");
    }

    /// The model stopped before its answer was done (`finish_reason: length`, `content_filter` …).
    pub(crate) fn cut_short(&mut self) {
        self.filter.cut_short();
    }

    /// The stream ended without the server saying the answer was complete (see
    /// [`ThinkFilter::ended_abruptly`]).
    pub(crate) fn ended_abruptly(&mut self) {
        self.filter.ended_abruptly();
    }

    /// Whether visible text has reached the sink (the first-token deadline is then met).
    pub(crate) fn has_started(&self) -> bool {
        !self.text.is_empty()
    }

    /// The whole visible answer, trimmed; an answer with nothing visible is a protocol error.
    pub(crate) fn finish(mut self) -> Result<String, LlmError> {
        let visible = self.filter.finish();
        self.emit(visible)?;
        let answer = self.text.trim();
        if answer.is_empty() {
            return Err(LlmError::Protocol("empty answer".to_owned()));
        }
        Ok(answer.to_owned())
    }

    fn emit(&mut self, visible: String) -> Result<(), LlmError> {
        if visible.is_empty() {
            return Ok(());
        }
        if self.text.len().saturating_add(visible.len()) > MAX_ANSWER_BYTES {
            return Err(LlmError::Protocol(format!("answer larger than {MAX_ANSWER_BYTES} bytes")));
        }
        (self.sink)(&visible);
        self.text.push_str(&visible);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(strip: bool, pieces: &[&str]) -> String {
        let mut filter = ThinkFilter::new(strip);
        let mut out: String = pieces.iter().map(|piece| filter.push(piece)).collect();
        out.push_str(&filter.finish());
        out
    }

    #[test]
    fn a_leading_think_block_and_the_blank_lines_after_it_are_removed() {
        assert_eq!(run(true, &["<think>\nhmm, greet them\n</think>\n\n你好！"]), "你好！");
    }

    #[test]
    fn tags_split_across_pieces_are_still_recognised() {
        assert_eq!(run(true, &["<th", "ink>secret</thi", "nk>", "\n\nHi", " there"]), "Hi there");
        assert_eq!(run(true, &["<", "t", "h", "i", "n", "k", ">", "x", "<", "/", "think", ">ok"]), "ok");
    }

    #[test]
    fn every_split_point_gives_the_same_visible_text() {
        let sample = "<think>计划 plan</think>\n\n答案 <b> is < 3 and <think>more</think>done.";
        for split in 0..=sample.len() {
            if !sample.is_char_boundary(split) {
                continue;
            }
            let (left, right) = sample.split_at(split);
            assert_eq!(run(true, &[left, right]), "答案 <b> is < 3 and <think>more</think>done.", "split at {split}");
        }
    }

    fn run_opened_by_prompt(pieces: &[&str]) -> String {
        let mut filter = ThinkFilter::new(true).opened_by_prompt(true);
        let mut out: String = pieces.iter().map(|piece| filter.push(piece)).collect();
        out.push_str(&filter.finish());
        out
    }

    #[test]
    fn reasoning_opened_by_the_prompt_is_removed_up_to_its_closing_tag() {
        assert_eq!(run_opened_by_prompt(&["用户在打招呼", "。</think>\n\n你好！"]), "你好！");
        let sample = "想一想 <b>\n</think>\n\n答案 <think>x</think>done.";
        for split in (0..=sample.len()).filter(|&at| sample.is_char_boundary(at)) {
            let (left, right) = sample.split_at(split);
            assert_eq!(run_opened_by_prompt(&[left, right]), "答案 <think>x</think>done.", "split at {split}");
        }
        // A template that does not open the block after all: the model's own tag is reasoning too.
        assert_eq!(run_opened_by_prompt(&["<think>hmm</think>", "好的"]), "好的");
    }

    #[test]
    fn an_answer_opened_by_the_prompt_that_never_closes_the_block_is_shown_whole() {
        assert_eq!(run_opened_by_prompt(&["你好", "！今天 </thi", "nking>"]), "你好！今天 </thinking>");
        // Unless the model opened a block itself: that is reasoning, dropped unclosed.
        assert_eq!(run_opened_by_prompt(&["<think>用户想知道", "密码"]), "");
        assert_eq!(run_opened_by_prompt(&["答案里提到 <think> 标签"]), "答案里提到 <think> 标签");
        // Without strip_think there is nothing to strip.
        let mut filter = ThinkFilter::new(false).opened_by_prompt(true);
        assert_eq!(filter.push("a</think>b"), "a</think>b");
    }

    #[test]
    fn reasoning_opened_by_the_prompt_and_cut_at_the_token_limit_is_never_shown() {
        let mut filter = ThinkFilter::new(true).opened_by_prompt(true);
        assert_eq!(filter.push("用户想知道"), "");
        filter.cut_short();
        assert_eq!(filter.finish(), "");
    }

    #[test]
    fn reasoning_opened_by_the_prompt_past_the_answer_limit_is_dropped_not_kept() {
        let mut filter = ThinkFilter::new(true).opened_by_prompt(true);
        let chunk = "想".repeat(1 << 16);
        for _ in 0..=MAX_ANSWER_BYTES / chunk.len() {
            assert_eq!(filter.push(&chunk), "");
        }
        assert!(filter.held.is_none() && filter.inside);
        assert_eq!(filter.push("</thi"), "");
        assert_eq!(filter.push("nk>答案"), "答案");
    }

    #[test]
    fn an_unclosed_block_at_the_end_is_dropped() {
        assert_eq!(run(true, &["<think>only thoughts"]), "");
        assert_eq!(run(true, &["\n  <think>only", " thoughts"]), "");
    }

    #[test]
    fn a_think_tag_inside_the_answer_is_text() {
        let answer = "Use the tag `<think>` to mark reasoning. More tips: keep it short.";
        assert_eq!(run(true, &[answer]), answer);
        assert_eq!(run(true, &["Answer.", "<think>never closed"]), "Answer.<think>never closed");
        let code = "例子：\n```\n<think>plan</think>\nAnswer\n```";
        assert_eq!(run(true, &["<think>私下</think>", code]), code);
    }

    #[test]
    fn held_reasoning_of_a_stream_that_ended_abruptly_is_never_shown() {
        let mut filter = ThinkFilter::new(true).opened_by_prompt(true);
        assert_eq!(filter.push("用户想知道密码"), "");
        filter.ended_abruptly();
        assert_eq!(filter.finish(), "");
    }

    #[test]
    fn text_that_merely_looks_like_the_start_of_a_tag_is_released_at_the_end() {
        assert_eq!(run(true, &["a <thi"]), "a <thi");
        assert_eq!(run(true, &["x <", "y"]), "x <y");
    }

    #[test]
    fn nothing_is_stripped_when_disabled_except_leading_whitespace() {
        assert_eq!(run(false, &["\n <think>a</think> b"]), "<think>a</think> b");
    }

    #[test]
    fn whitespace_only_pieces_at_the_start_are_held_back() {
        let mut filter = ThinkFilter::new(true);
        assert_eq!(filter.push("\n\n"), "");
        assert_eq!(filter.push("  Hi"), "Hi");
        assert_eq!(filter.push(" \n"), " \n");
    }
}
