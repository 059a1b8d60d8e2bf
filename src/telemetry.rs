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
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        tracing::error!(%location, panic = %info, "Panic; this is a bug.");
    }));
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
    fn an_empty_or_broken_rust_log_logs_at_info_and_a_given_one_is_kept() {
        for spec in [None, Some(""), Some("  "), Some("yizhan=[")] {
            assert_eq!(log_filter(spec).max_level_hint(), Some(LevelFilter::INFO), "{spec:?}");
        }
        assert_eq!(log_filter(Some("debug")).max_level_hint(), Some(LevelFilter::DEBUG));
        assert_eq!(log_filter(Some("warn")).max_level_hint(), Some(LevelFilter::WARN));
    }
}
