//! The `yizhan` command line, shared by the built-in binary and plugin binaries: a binary that
//! adds channel kinds calls [`main_with`] with them and gets the same flags, logging, limits and
//! exit as `yizhan` itself.

use crate::channels::ChannelKinds;
use crate::{config::Config, startup, startup::Application, telemetry};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Yizhan (驿站): relays WeChat, WeCom and Feishu messages to an LLM and back.
#[derive(Parser)]
#[command(name = "yizhan", version)]
struct Cli {
    /// The config file [env: YIZHAN_CONFIG] [default: yizhan.toml]
    // Not clap's `env`: it takes an empty YIZHAN_CONFIG (as compose files write an unset
    // variable) for a missing value and names `--config` in its error, which nobody typed.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Validate the config file and exit.
    Check,
}

/// Parses the command line, then serves (or checks the config) with `kinds`, and exits the
/// process: 0 after a graceful stop, 1 with the error on standard error.
///
/// A plugin binary's `main`:
///
/// ```no_run
/// let kinds = yizhan::channels::ChannelKinds::builtin();
/// // kinds.register("my_platform", |settings, http| …);
/// yizhan::cli::main_with(kinds)
/// ```
pub fn main_with(kinds: ChannelKinds) -> ! {
    let runtime = actix_web::rt::System::new();
    let code = match runtime.block_on(serve(kinds)) {
        Ok(()) => 0,
        Err(error) => {
            // The error and its causes, without the backtrace anyhow would add under
            // RUST_BACKTRACE (which many set everywhere): a config mistake should read as one.
            eprintln!("Error: {error:#}");
            1
        }
    };
    // Not by dropping the runtime: that waits, without a bound, for its blocking tasks (a DNS
    // lookup stuck on an unreachable resolver), past the bound the stop kept. What the exit had
    // to write is written by now (or given up on, logged).
    std::process::exit(code)
}

async fn serve(kinds: ChannelKinds) -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init();
    let path = cli
        .config
        .or_else(|| std::env::var_os("YIZHAN_CONFIG").filter(|value| !value.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("yizhan.toml"));
    let config = Config::load(&path)?;
    if let Some(Command::Check) = cli.command {
        startup::check(&config, &kinds)?;
        for warning in config.warnings() {
            eprintln!("warning: {warning}");
        }
        println!("{}: OK ({} channels)", path.display(), config.channels.len());
        return Ok(());
    }
    crate::http::raise_open_file_limit();
    let app = Application::build_with(config, kinds).await.context("Failed to start Yizhan")?;
    app.run_until_stopped().await.context("Server failed")
}
