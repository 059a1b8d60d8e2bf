use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use yizhan::channels::ChannelKinds;
use yizhan::{config::Config, startup, startup::Application, telemetry};

/// Yizhan (驿站): relays WeChat, WeCom and Feishu messages to an LLM and back.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The config file.
    #[arg(long, env = "YIZHAN_CONFIG", default_value = "yizhan.toml", global = true)]
    config: PathBuf,
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

fn main() {
    let runtime = actix_web::rt::System::new();
    let code = match runtime.block_on(serve()) {
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

async fn serve() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init();
    let config = Config::load(&cli.config)?;
    if let Some(Command::Check) = cli.command {
        startup::check(&config, &ChannelKinds::builtin())?;
        for warning in config.warnings() {
            eprintln!("warning: {warning}");
        }
        println!("{}: OK ({} channels)", cli.config.display(), config.channels.len());
        return Ok(());
    }
    yizhan::http::raise_open_file_limit();
    let app = Application::build(config).await.context("Failed to start Yizhan")?;
    app.run_until_stopped().await.context("Server failed")
}
