use clap::{Parser, Subcommand};
use sidelight::config::Config;
use sidelight::server::Sidelight;
use std::path::PathBuf;
use std::process::ExitCode;

// glibc's allocator showed up as a fifth of the per-request instructions under load; mimalloc's
// thread-local free lists suit a proxy that allocates and frees small objects per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An observability-first sidecar proxy for LLM APIs and databases.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The YAML config file.
    #[arg(
        long,
        short,
        global = true,
        env = "SIDELIGHT_CONFIG",
        default_value = "config/sidelight.yaml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Check a config file and list every problem by field path; exits 1 if there are any.
    Validate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: invalid config:\n{e}", cli.config.display());
            return ExitCode::from(1);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Validate => {
            println!(
                "{}: ok ({} routes, {} upstreams)",
                cli.config.display(),
                config.routes.len(),
                config.upstreams.len()
            );
            ExitCode::SUCCESS
        }
        Command::Run => run(config),
    }
}

fn run(config: Config) -> ExitCode {
    sidelight::telemetry::init(&config.log);
    // Worker 0 and the admin port run here; other workers get their own threads (server.rs).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let drain = config.shutdown.drain_timeout;
        let running = match Sidelight::start(config).await {
            Ok(running) => running,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("cannot start: {e}");
                return ExitCode::from(1);
            }
        };
        shutdown_signal().await;
        tracing::info!(drain_timeout = ?drain, "shutting down: draining in-flight requests");
        if running.shutdown().await {
            tracing::info!("drained; bye");
        } else {
            tracing::warn!("drain timeout reached; remaining requests were cut");
        }
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
