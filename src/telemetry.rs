//! Logging: `tracing` to stdout, filtered by `RUST_LOG` (default `info`), as JSON when
//! `YIZHAN_LOG_FORMAT=json`. Panics are logged through tracing too.

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber and the panic hook. Call once, from `main`.
pub fn init() {
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let json = std::env::var("YIZHAN_LOG_FORMAT").is_ok_and(|format| format.trim().eq_ignore_ascii_case("json"));
    // Colours only on a terminal: journald, `docker logs` and files got escape codes.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(colours);
    let installed = if json { builder.json().try_init() } else { builder.try_init() };
    if installed.is_err() {
        return;
    }
    let logged = PanicLog::default();
    std::panic::set_hook(Box::new(move |info| {
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        // Once a minute per place: a channel that panics on some input (caught, answered 500)
        // would otherwise let anyone flood the log.
        let Some(left_out) = logged.due(&location, std::time::Instant::now()) else { return };
        // Quoted and cut short: a slicing panic quotes the string it sliced, a user's text.
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|text| (*text).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let panic: String = format!("{payload:?}").chars().take(PANIC_TEXT_CHARS).collect();
        tracing::error!(%location, %panic, left_out, "Panic; this is a bug.");
    }));
}

/// How much of a panic's message is logged.
const PANIC_TEXT_CHARS: usize = 200;

/// How often, at most, panics at one place are logged.
const PANIC_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// When panics were last logged, per place (places are code locations: a bounded set), and
/// how many were left out since.
#[derive(Default)]
struct PanicLog(std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>);

impl PanicLog {
    /// `Some(left out since the last one logged)` when a panic at `location` is to be logged.
    fn due(&self, location: &str, now: std::time::Instant) -> Option<u64> {
        let mut places = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match places.get_mut(location) {
            Some((last, left_out)) if now.duration_since(*last) < PANIC_LOG_EVERY => {
                *left_out += 1;
                None
            }
            Some((last, left_out)) => {
                *last = now;
                Some(std::mem::take(left_out))
            }
            None => {
                places.insert(location.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

/// The filter for `RUST_LOG`'s value `spec`: `info` for whatever it leaves unsaid, so that an
/// empty value (`RUST_LOG=` from a compose file or unit) does not silence every log, panics
/// included; a value that does not parse is said so on stderr (logging is not up yet) and
/// `info` used.
fn log_filter(spec: Option<&str>) -> EnvFilter {
    let builder = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into());
    let spec = spec.unwrap_or("").trim();
    builder.parse(spec).unwrap_or_else(|error| {
        eprintln!("RUST_LOG={spec:?} is not a log filter ({error}); logging at info");
        EnvFilter::new("info")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_are_logged_once_a_minute_per_place_with_a_count() {
        let log = PanicLog::default();
        let start = std::time::Instant::now();
        assert_eq!(log.due("a.rs:1:1", start), Some(0));
        for _ in 0..3 {
            assert_eq!(log.due("a.rs:1:1", start + std::time::Duration::from_secs(1)), None);
        }
        assert_eq!(log.due("b.rs:2:2", start + std::time::Duration::from_secs(1)), Some(0));
        assert_eq!(log.due("a.rs:1:1", start + PANIC_LOG_EVERY), Some(3));
    }

    #[test]
    fn an_empty_or_broken_rust_log_logs_at_info_and_a_given_one_is_kept() {
        for spec in [None, Some(""), Some("  "), Some("yizhan=[")] {
            assert_eq!(log_filter(spec).max_level_hint(), Some(LevelFilter::INFO), "{spec:?}");
        }
        assert_eq!(log_filter(Some("debug")).max_level_hint(), Some(LevelFilter::DEBUG));
        assert_eq!(log_filter(Some("warn")).max_level_hint(), Some(LevelFilter::WARN));
    }
}
