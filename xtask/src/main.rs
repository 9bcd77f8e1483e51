//! Project tasks: `cargo xtask <task>`. Each task installs what it needs first
//! (apt packages, the nightly rust-src component, bpf-linker, a bpffs mount) or stops
//! with one line saying what is missing and how to get it.

mod fuzz;
mod image;
mod oci;
mod setup;
mod signals;

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, demo, test and benchmark the redirection engine")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (idempotent).
    Setup,
    /// Build the eBPF object (with BTF) that the loader embeds.
    BuildEbpf {
        /// Build without optimisations (the verifier may then reject the programs).
        #[arg(long)]
        debug: bool,
    },
    /// Build everything (eBPF object, then the loader and CLI, release).
    Build,
    /// Run the demo: namespaces, programs and traffic on this machine's kernel.
    Demo,
    /// Measure, side by side in one run (results in target/bench/; installs iperf3 and
    /// wrk, the load tools of the mesh bench, if missing).
    Bench {
        /// The short variant (fewer pods).
        #[arg(long)]
        quick: bool,
    },
    /// The real agent with pods enrolled and released in a loop under traffic: checks
    /// that memory, fds, map entries, links, routes and tc filters come back and that
    /// release cost stays flat as the notes fill (results in target/bench/soak.*).
    Soak {
        /// How long the loop runs.
        #[arg(long, default_value_t = 3.0)]
        minutes: f64,
    },
    /// Build the container image offline from the local build (no registry, no base
    /// image): an OCI archive in target/image/ for `ctr images import`, `podman load`.
    Image,
    /// Fuzz every decoder of untrusted bytes (cargo-fuzz, nightly): each target of
    /// redirect-user/fuzz in turn; fails on a crash.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Run every test: unit tests and the privileged integration tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = signals::install().and_then(|()| run(cli)) {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Setup => setup::all(),
        Task::BuildEbpf { debug } => {
            setup::toolchain()?;
            build_ebpf(!debug)
        }
        Task::Build => {
            setup::all()?;
            build_ebpf(true)?;
            cargo(&["build", "--release", "-p", "redirect-user"])
        }
        Task::Demo => {
            setup::all()?;
            build_ebpf(true)?;
            cargo(&["build", "--release", "-p", "redirect-user"])?;
            let bin = workspace_root().join("target/release/redirect-user");
            let status = signals::status(Command::new(&bin).arg("demo"))
                .with_context(|| format!("running {}", bin.display()))?;
            if !status.success() {
                bail!("the demo failed ({status})");
            }
            Ok(())
        }
        Task::Bench { quick } => {
            setup::all()?;
            setup::bench_tools();
            build_ebpf(true)?;
            // The enrolment bench measures the real agent process's memory.
            cargo(&["build", "--release", "-p", "redirect-user"])?;
            for bench in ["enrol", "mesh"] {
                let mut a = vec!["bench", "-p", "redirect-tests", "--bench", bench, "--"];
                if quick {
                    a.push("--quick");
                }
                cargo(&a)?;
            }
            println!(
                "xtask: results in {}",
                workspace_root().join("target/bench").display()
            );
            Ok(())
        }
        Task::Soak { minutes } => {
            setup::all()?;
            build_ebpf(true)?;
            cargo(&["build", "--release", "-p", "redirect-user", "--bins"])?;
            let minutes = minutes.to_string();
            cargo(&[
                "bench",
                "-p",
                "redirect-tests",
                "--bench",
                "soak",
                "--",
                "--minutes",
                &minutes,
            ])
        }
        Task::Image => {
            setup::toolchain()?;
            build_ebpf(true)?;
            cargo(&["build", "--release", "-p", "redirect-user", "--bins"])?;
            let (path, size) = image::build()?;
            println!(
                "xtask: image {} in {} ({:.1} MiB); load it with `ctr -n k8s.io images import {}` or `podman load -i {}`",
                image::NAME,
                path.display(),
                size as f64 / (1024.0 * 1024.0),
                path.display(),
                path.display()
            );
            Ok(())
        }
        Task::Fuzz { seconds, target } => {
            // The library under test embeds the eBPF object.
            setup::toolchain()?;
            build_ebpf(true)?;
            fuzz::run(seconds, target.as_deref())
        }
        Task::Test { args } => {
            setup::all()?;
            build_ebpf(true)?;
            // The tests run the CLI as a separate process (an app in another cgroup), and
            // the CNI plugin as a runtime does: both binaries of the package are built.
            cargo(&["build", "--release", "-p", "redirect-user", "--bins"])?;
            let mut a = vec!["test", "--workspace", "--release"];
            if !args.is_empty() {
                a.push("--");
                a.extend(args.iter().map(String::as_str));
            }
            cargo(&a)
        }
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The eBPF object the loader embeds (see redirect-user/build.rs).
pub fn ebpf_object(release: bool) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    workspace_root().join(format!("target/bpfel-unknown-none/{profile}/redirect-ebpf"))
}

fn build_ebpf(release: bool) -> Result<()> {
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        setup::NIGHTLY,
        "cargo",
        "build",
        "-Z",
        "build-std=core",
    ])
    .args([
        "--target",
        "bpfel-unknown-none",
        "-p",
        "redirect-ebpf",
        "--bin",
        "redirect-ebpf",
    ])
    .current_dir(workspace_root())
    // Debug info is what bpf-linker turns into BTF.
    .env(
        "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
        "-C debuginfo=2 -C link-arg=--btf",
    )
    .env("PATH", setup::path_with_tools()?)
    .env("LD_LIBRARY_PATH", setup::nightly_lib_dir()?)
    .env_remove("RUSTC")
    .env_remove("RUSTC_WRAPPER")
    .env_remove("RUSTFLAGS");
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .context("running cargo +nightly for the eBPF object")?;
    if !status.success() {
        bail!("building the eBPF object failed ({status})");
    }
    println!("xtask: eBPF object at {}", ebpf_object(release).display());
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = signals::status(Command::new(cargo).args(args).current_dir(workspace_root()))
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
