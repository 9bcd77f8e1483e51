//! `cargo xtask fuzz`: builds the cargo-fuzz targets of `redirect-user/fuzz/` with the
//! nightly toolchain and runs each in turn for a while. New inputs go to a scratch
//! corpus under `target/fuzz/`, the committed seeds are only read; a crash's input is
//! written under `target/fuzz/artifacts/<target>/`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{setup, workspace_root};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// How one target's run went.
struct Outcome {
    target: String,
    runs: Option<u64>,
    crash: Option<String>,
    log: PathBuf,
}

pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    install_cargo_fuzz()?;
    let fuzz_dir = workspace_root().join("redirect-user/fuzz");
    let out_dir = workspace_root().join("target/fuzz");
    let mut targets = list_targets(&fuzz_dir)?;
    if let Some(t) = only {
        if !targets.iter().any(|x| x == t) {
            bail!("no fuzz target {t:?} (there are: {})", targets.join(", "));
        }
        targets.retain(|x| x == t);
    }
    println!("xtask: building the fuzz targets (nightly, cargo-fuzz)");
    let mut build = cargo_fuzz(&fuzz_dir, &out_dir, "build");
    if let Some(t) = only {
        build.arg(t);
    }
    let status = build.status().context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    let mut outcomes = Vec::new();
    for t in &targets {
        println!("xtask: fuzzing {t} for {seconds} s");
        outcomes.push(run_one(&fuzz_dir, &out_dir, t, seconds)?);
    }
    println!("\n{:<18} {:>14}  result", "target", "runs");
    for o in &outcomes {
        let runs = o.runs.map_or("?".to_string(), |r| r.to_string());
        let result = match &o.crash {
            Some(path) => format!("CRASH, input in {path} (log {})", o.log.display()),
            None => "no crash".to_string(),
        };
        println!("{:<18} {runs:>14}  {result}", o.target);
    }
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crash.is_some())
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "crash found in {}: fix it, and keep the input under redirect-user/fuzz/regressions/<target>/",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// The targets, by their file names in `fuzz_targets/`.
fn list_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut targets: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".rs"))
                .map(str::to_string)
        })
        .collect();
    targets.sort();
    Ok(targets)
}

/// `cargo fuzz <sub>` with the nightly toolchain, the options every call shares: release
/// with debug assertions (overflows are findings too), no sanitizer (the code under
/// test is safe Rust; a panic is what the targets look for), our target directory.
fn cargo_fuzz(fuzz_dir: &Path, out_dir: &Path, sub: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", setup::NIGHTLY, "cargo", "fuzz", sub])
        .args(["--release", "--debug-assertions", "--sanitizer", "none"])
        .arg("--fuzz-dir")
        .arg(fuzz_dir)
        .arg("--target-dir")
        .arg(out_dir.join("build"))
        .current_dir(workspace_root())
        .env("PATH", setup::path_with_tools().unwrap_or_default())
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS");
    cmd
}

fn run_one(fuzz_dir: &Path, out_dir: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let scratch = out_dir.join("corpus").join(target);
    let artifacts = out_dir.join("artifacts").join(target);
    let logs = out_dir.join("logs");
    for d in [&scratch, &artifacts, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let seeds = fuzz_dir.join("corpus").join(target);
    let log = logs.join(format!("{target}.log"));
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = cargo_fuzz(fuzz_dir, out_dir, "run");
    // New inputs go to the first directory only: the committed seeds stay as they are.
    cmd.arg(target).arg(&scratch).arg(&seeds).arg("--").args([
        format!("-max_total_time={seconds}"),
        "-print_final_stats=1".into(),
        "-timeout=30".into(),
        "-rss_limit_mb=2048".into(),
        format!("-artifact_prefix={}/", artifacts.display()),
    ]);
    let status = cmd
        .stdout(Stdio::from(log_file.try_clone()?))
        .stderr(Stdio::from(log_file))
        .status()
        .with_context(|| format!("running cargo fuzz run {target}"))?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let runs = text
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok());
    let written = text.lines().find_map(|l| {
        l.split_once("Test unit written to ")
            .map(|(_, p)| p.trim().to_string())
    });
    let crash = match (status.success(), written) {
        (true, _) => None,
        (false, Some(p)) => Some(p),
        (false, None) => Some(format!("(none written; exit {status})")),
    };
    Ok(Outcome {
        target: target.to_string(),
        runs,
        crash,
        log,
    })
}

/// cargo-fuzz, built from crates.io into the tools directory when no `cargo fuzz` is
/// found.
fn install_cargo_fuzz() -> Result<()> {
    let path = setup::path_with_tools()?;
    let have = Command::new("rustup")
        .args(["run", setup::NIGHTLY, "cargo", "fuzz", "--version"])
        .env("PATH", &path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(());
    }
    println!("xtask: building cargo-fuzz {CARGO_FUZZ_VERSION} (a few minutes, once)");
    let status = Command::new("cargo")
        .args(["install", "--locked"])
        .arg(format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"))
        .arg("--root")
        .arg(setup::tools_dir())
        .status()
        .context("cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("installing cargo-fuzz failed ({status})");
    }
    Ok(())
}
