use clap::{Parser, Subcommand};
use sidelight::config::Config;
use sidelight::server::Sidelight;
use std::path::PathBuf;
use std::process::ExitCode;

// glibc's allocator showed up as a fifth of the per-request instructions under load; mimalloc's
// thread-local free lists suit a proxy that allocates and frees small objects per request.
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// mimalloc, entered the way std's `System` enters malloc: `mimalloc::MiMalloc` always takes
/// the aligned entry points, which cost about 2% of a proxied request's instructions. Plain
/// `mi_malloc` already guarantees malloc's alignment (16 bytes, or the size when smaller), so
/// only stricter layouts need the aligned ones.
struct Allocator;

/// The alignment `mi_malloc` guarantees (`MI_MAX_ALIGN_SIZE` on 64-bit targets).
const MALLOC_ALIGN: usize = 16;

fn malloc_aligned_enough(layout: std::alloc::Layout) -> bool {
    layout.align() <= MALLOC_ALIGN && layout.align() <= layout.size()
}

// SAFETY: every call is passed on to mimalloc unchanged, except that layouts whose alignment
// plain `mi_malloc` already guarantees use the plain entry points; `mi_free` frees blocks from
// either kind.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if malloc_aligned_enough(layout) {
            libmimalloc_sys::mi_malloc(layout.size()).cast()
        } else {
            mimalloc::MiMalloc.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if malloc_aligned_enough(layout) {
            libmimalloc_sys::mi_zalloc(layout.size()).cast()
        } else {
            mimalloc::MiMalloc.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        mimalloc::MiMalloc.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let new = std::alloc::Layout::from_size_align_unchecked(new_size, layout.align());
        if malloc_aligned_enough(new) {
            libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast()
        } else {
            mimalloc::MiMalloc.realloc(ptr, layout, new_size)
        }
    }
}

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
        // Before anything else: SIGHUP's default action would end the process.
        ignore_sighup();
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

/// SIGHUP (log rotation scripts, `systemctl reload`) is logged and ignored until hot reload
/// exists; by default it would kill the process.
fn ignore_sighup() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::warn!(
                            "SIGHUP received; hot reload is not implemented yet, ignoring"
                        );
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot handle SIGHUP; it will stop the process"),
        }
    }
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
