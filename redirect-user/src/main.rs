//! `redirect-user`: the command line. Each command lives in its module; this only wires.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "redirect-user",
    version,
    about = "eBPF traffic redirection for ambient meshes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build pods in namespaces, enrol them, send real traffic, clean up.
    Demo,
    /// Connect from inside a network namespace, send a line, print the line that comes
    /// back: shows where a pod's traffic really goes.
    Probe(redirect_user::probe::ProbeArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Demo => rt.block_on(redirect_user::demo::run()),
        Command::Probe(args) => redirect_user::probe::run(&args),
    }
}
