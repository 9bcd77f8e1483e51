//! `redirect-user`: the command line. Each command lives in its module; this only wires.

use anyhow::Result;
use clap::{Parser, Subcommand};
use redirect_user::cli;

#[derive(Parser)]
#[command(
    name = "redirect-user",
    version,
    about = "eBPF traffic redirection for ambient meshes"
)]
struct Cli {
    /// Log lines as text (colour only on a terminal) or as JSON objects, one per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "REDIRECT_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). Colour codes only when
/// stderr is a terminal: `kubectl logs` and log files get plain lines.
fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Node agent and proxy in one process (the DaemonSet default).
    Run {
        #[command(flatten)]
        agent: cli::AgentArgs,
        /// Open the DNS listeners (15053) in every pod.
        #[arg(long)]
        dns: bool,
        /// On SIGTERM, go on serving this long, then exit.
        #[arg(long, default_value_t = 5)]
        drain_secs: u64,
        #[command(flatten)]
        mesh: cli::MeshArgs,
    },
    /// The node agent alone: serves the node-agent protocol socket for any proxy.
    NodeAgent {
        #[command(flatten)]
        agent: cli::AgentArgs,
    },
    /// The proxy alone: connects to a node agent's socket.
    Proxy {
        #[command(flatten)]
        proxy: cli::ProxyArgs,
    },
    /// Local control of a running agent's pods.
    Pod {
        #[command(subcommand)]
        cmd: cli::PodCommand,
    },
    /// Install or remove the chained CNI plugin (binary and configuration).
    Cni {
        #[command(subcommand)]
        cmd: cli::CniCommand,
    },
    /// Enrolled pods, proxies and per-pod counters of a running agent.
    Status {
        #[command(flatten)]
        control: cli::ControlArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove everything of ours from this node: a running agent hands over, every pod
    /// is released, then the programs, pinned state, CNI plugin and state directory go.
    Uninstall(redirect_user::uninstall::UninstallArgs),
    /// Build pods in namespaces, enrol them, send real traffic, clean up.
    Demo,
    /// Connect from inside a network namespace, send a line, print the line that comes
    /// back: shows where a pod's traffic really goes.
    Probe(redirect_user::probe::ProbeArgs),
}

/// glibc gives a thread that meets contention on its arena an arena of its own (up to 8
/// per core), and each keeps the pages it touched: with the runtime's blocking pool
/// starting and ending threads all the time, the agent's resident memory grew in steps
/// of megabytes under load (the soak). Two arenas bound it; `MALLOC_ARENA_MAX` in the
/// environment still decides when set.
fn bound_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: only sets an allocator tunable, before any other thread exists.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

fn main() -> Result<()> {
    bound_malloc_arenas();
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Run {
            agent,
            dns,
            drain_secs,
            mesh,
        } => {
            let socket = agent.socket.clone();
            rt.block_on(cli::run(
                agent,
                cli::ProxyArgs {
                    socket,
                    dns,
                    drain_secs,
                    mesh,
                    admin: cli::ProxyAdminArgs::off(),
                },
            ))
        }
        Command::NodeAgent { agent } => rt.block_on(cli::node_agent(agent)),
        Command::Proxy { proxy } => rt.block_on(cli::proxy(proxy)),
        Command::Pod { cmd } => rt.block_on(cli::pod(cmd)),
        Command::Cni { cmd } => cli::cni(cmd),
        Command::Status { control, json } => rt.block_on(cli::status(control, json)),
        Command::Uninstall(args) => rt.block_on(redirect_user::uninstall::run(args)),
        Command::Demo => rt.block_on(redirect_user::demo::run()),
        Command::Probe(args) => redirect_user::probe::run(&args),
    }
}
