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

/// Drops the turns no later window can use: those older than the current one (a turn left out
/// of it never comes back in, since newer turns only take more of the bounds), but for the
/// newest, which tells that the user was answered before (the AI label is for a first
/// contact). What a session caches between messages, for `idle_timeout_secs`, is then its
/// window and at most that one turn, whatever the answers' lengths.
pub(super) fn keep_usable(turns: &mut Vec<Turn>, max_turns: usize, max_chars: usize) {
    let usable = history_window(turns, max_turns, max_chars).len().max(1);
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
        let mut cached: Vec<Turn> = Vec::new();
        for size in [5_000, 100, 100, 1_000, 40_000, 10, 3_000, 3_000, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 900] {
            let turn = turns(&[size]).remove(0);
            all.push(turn.clone());
            cached.push(turn);
            keep_usable(&mut cached, 10, 6_000);
            assert_eq!(history_window(&cached, 10, 6_000), history_window(&all, 10, 6_000));
            // The window, or the newest turn alone when not even it fits.
            let window = history_window(&cached, 10, 6_000).len();
            assert!(cached.len() == window.max(1), "{} turns cached for a window of {window}", cached.len());
            assert_eq!(cached.last(), all.last());
        }
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
