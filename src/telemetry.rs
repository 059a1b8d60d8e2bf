//! Logging: `tracing` to stdout, filtered by `RUST_LOG` (default `info`), as JSON when
//! `YIZHAN_LOG_FORMAT=json`. Panics are logged through tracing too.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber and the panic hook. Call once, from `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("YIZHAN_LOG_FORMAT").is_ok_and(|format| format == "json");
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
