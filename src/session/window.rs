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

#[cfg(test)]
mod tests {
    use super::*;

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
