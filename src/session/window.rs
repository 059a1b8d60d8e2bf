//! Which earlier turns go to the model with a new question.

use crate::store::Turn;

/// The most recent turns that fit both bounds: at most `max_turns` turns and at most
/// `max_chars` characters of questions and answers. Whole turns only; the oldest go first.
pub fn history_window(turns: &[Turn], max_turns: usize, max_chars: usize) -> &[Turn] {
    let mut start = turns.len();
    let mut chars = 0usize;
    while start > 0 && turns.len() - start < max_turns {
        let turn = &turns[start - 1];
        let size = turn.question.chars().count() + turn.answer.chars().count();
        if chars + size > max_chars {
            break;
        }
        chars += size;
        start -= 1;
    }
    &turns[start..]
}

/// What a session keeps of its conversation between messages (for `idle_timeout_secs`): the
/// turns a later window can still use, whatever the answers' lengths, and whether the user was
/// answered before (the AI label is for a first contact), which a turn too long for any window
/// would otherwise have to be kept for.
#[derive(Debug, Default)]
pub(super) struct Cached {
    pub turns: Vec<Turn>,
    pub answered_before: bool,
}

impl Cached {
    /// From the conversation's latest turns, oldest first.
    pub fn new(mut turns: Vec<Turn>, max_turns: usize, max_chars: usize) -> Self {
        let answered_before = !turns.is_empty();
        keep_usable(&mut turns, max_turns, max_chars);
        Self { turns, answered_before }
    }

    /// Adds an answered turn.
    pub fn push(&mut self, turn: Turn, max_turns: usize, max_chars: usize) {
        self.turns.push(turn);
        self.answered_before = true;
        keep_usable(&mut self.turns, max_turns, max_chars);
    }
}

/// Drops the turns no later window can use: those older than the current one (a turn left out
/// of it never comes back in, since newer turns only take more of the bounds).
fn keep_usable(turns: &mut Vec<Turn>, max_turns: usize, max_chars: usize) {
    let usable = history_window(turns, max_turns, max_chars).len();
    let unusable = turns.len().saturating_sub(usable);
    turns.drain(..unusable);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_exactly_what_later_windows_use() {
        // Whatever comes next, a window over the trimmed cache is the window over everything.
        let mut all: Vec<Turn> = Vec::new();
        let mut cached = Cached::new(Vec::new(), 10, 6_000);
        assert!(!cached.answered_before);
        for size in [5_000, 100, 100, 1_000, 40_000, 10, 3_000, 3_000, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 900] {
            let turn = turns(&[size]).remove(0);
            all.push(turn.clone());
            cached.push(turn, 10, 6_000);
            assert_eq!(history_window(&cached.turns, 10, 6_000), history_window(&all, 10, 6_000));
            // The window alone: not even the newest turn when it does not fit.
            assert_eq!(cached.turns.len(), history_window(&all, 10, 6_000).len());
            assert!(cached.answered_before);
        }
    }

    #[test]
    fn a_turn_too_long_for_any_window_is_not_kept_but_counts_as_answered_before() {
        let loaded = Cached::new(turns(&[1, 40_000]), 10, 6_000);
        assert!(loaded.turns.is_empty());
        assert!(loaded.answered_before);
    }

    fn turns(sizes: &[usize]) -> Vec<Turn> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, size)| Turn { question: format!("{i}"), answer: "字".repeat(size.saturating_sub(1)) })
            .collect()
    }

    #[test]
    fn the_window_keeps_the_most_recent_turns_within_the_turn_limit() {
        let all = turns(&[1, 1, 1, 1, 1]);
        let window = history_window(&all, 3, 1_000);
        assert_eq!(window.iter().map(|t| t.question.as_str()).collect::<Vec<_>>(), ["2", "3", "4"]);
    }

    #[test]
    fn the_window_drops_the_oldest_turns_beyond_the_character_limit() {
        let all = turns(&[50, 30, 40]);
        let window = history_window(&all, 10, 75);
        assert_eq!(window.iter().map(|t| t.question.as_str()).collect::<Vec<_>>(), ["1", "2"]);
    }

    #[test]
    fn a_single_turn_larger_than_the_limit_is_left_out() {
        assert!(history_window(&turns(&[500]), 10, 100).is_empty());
        assert!(history_window(&turns(&[1]), 0, 100).is_empty());
        assert!(history_window(&[], 5, 100).is_empty());
    }
}
