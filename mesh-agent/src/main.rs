use clap::Parser;
use mesh_agent::cli::{self, Cli, Command, InspectCommand};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => serve(Workers::Default, cli::run::run(*args)),
        Command::Inspect(InspectCommand::Maps(args)) => cli::inspect::maps(&args),
        Command::Explain(args) => cli::explain::explain(&args).map(|text| print!("{text}")),
        Command::Uninstall(args) => cli::uninstall::uninstall(&args),
        Command::EbpfLog(args) => cli::ebpf_log::ebpf_log(&args).map(|text| print!("{text}")),
        Command::Waypoint(args) => serve(
            Workers::Exactly(args.workers.into()),
            cli::waypoint::waypoint(*args),
        ),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The worker threads of a command's runtime.
enum Workers {
    /// One per CPU.
    Default,
    /// This many: 1 is a current-thread runtime (every task on one thread, no wake-ups of
    /// other workers between the tasks that carry one request).
    Exactly(usize),
}

/// Runs a long-lived command (the agent, the waypoint) on its runtime, logging.
fn serve(
    workers: Workers,
    command: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    init_logging();
    let rt = match workers {
        Workers::Exactly(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        Workers::Exactly(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
        Workers::Default => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    let result = rt.block_on(command);
    // Tasks cut at the end of a drain are dropped here; a waypoint's last access-log lines
    // (theirs included) are written after.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    mesh_agent::waypoint::access_log::flush_blocking();
    result
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
