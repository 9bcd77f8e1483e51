//! Installing what the project needs on a fresh machine, each step idempotent.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The nightly toolchain that builds the eBPF object. Never updated: bpf-linker is
/// built against its own LLVM.
pub const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Programs the demo, tests and inspection start, with the Debian package of each.
/// iptables is not a dependency of the engine: the tests and the enrolment bench run
/// the netfilter rule set it replaces, side by side with it.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("ldd", "libc-bin"),
    ("strip", "binutils"),
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("bpftool", "bpftool"),
    ("ping", "iputils-ping"),
    ("iptables-restore", "iptables"),
    ("ip6tables-restore", "iptables"),
    // The container runtime fixture (tests/src/cri.rs): containerd with its CRI plugin,
    // runc under its shims, the standard CNI plugins (Debian keeps them out of PATH),
    // busybox-static for the app image and a static C toolchain for the pause image.
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/bin/busybox", "busybox-static"),
    ("gcc", "gcc"),
    ("/usr/include/stdio.h", "libc6-dev"),
];

/// The load tools of the mesh bench (`tests/benches/mesh.rs`). Optional: without them
/// the bench leaves out their columns.
const BENCH_PACKAGES: &[(&str, &str)] = &[("iperf3", "iperf3"), ("wrk", "wrk")];

pub fn all() -> Result<()> {
    root()?;
    apt()?;
    toolchain()?;
    bpffs()
}

fn root() -> Result<()> {
    if !nix_is_root() {
        bail!("must run as root (BPF programs, namespaces): run it with sudo");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `bin` is a program on PATH, or an absolute path that must exist.
fn have(bin: &str) -> bool {
    if bin.starts_with('/') {
        return Path::new(bin).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn apt() -> Result<()> {
    apt_install(APT_PACKAGES)
}

/// Installs the bench's load tools if missing; if that fails, says so in one line and
/// goes on (the bench runs without them).
pub fn bench_tools() {
    if let Err(e) = apt_install(BENCH_PACKAGES) {
        let why = format!("{e:#}");
        println!(
            "xtask: iperf3/wrk not installed ({}): the mesh bench goes on without their columns",
            why.lines().next().unwrap_or_default()
        );
    }
}

fn apt_install(packages: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = packages
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!(
            "missing {}: install them with your package manager",
            missing.join(", ")
        );
    }
    println!("xtask: installing {}", missing.join(", "));
    run_quiet(Command::new("apt-get").arg("update"), "apt-get update")?;
    run_quiet(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
        "apt-get install",
    )
}

fn run_quiet(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The nightly toolchain with rust-src, and bpf-linker built against its LLVM.
pub fn toolchain() -> Result<()> {
    let sysroot = nightly_sysroot().map_err(|_| {
        anyhow::anyhow!(
            "the nightly toolchain is missing: install it with `rustup toolchain install nightly`"
        )
    })?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        println!("xtask: adding the rust-src component to {NIGHTLY}");
        run_quiet(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]),
            "rustup component add rust-src",
        )?;
    }
    let linker = tools_dir().join("bin/bpf-linker");
    if linker.exists() {
        return Ok(());
    }
    println!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly LLVM (about a minute)"
    );
    let llvm = tools_dir().join("llvm");
    let lib = llvm.join("lib");
    std::fs::create_dir_all(&lib)?;
    let libllvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .context("no libLLVM.so.* in the nightly toolchain")?;
    for name in [
        PathBuf::from("libLLVM.so"),
        PathBuf::from(libllvm.file_name().unwrap()),
    ] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)?;
    }
    let llvm_major = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLLVM.so."))
        .and_then(|v| v.split('.').next())
        .context("cannot read the LLVM version of the nightly toolchain")?
        .to_string();
    let status = Command::new("rustup")
        .args(["run", NIGHTLY, "cargo", "install", "--locked"])
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .arg("--root")
        .arg(tools_dir())
        .env("LLVM_PREFIX", &llvm)
        .env_remove("RUSTC")
        .status()
        .context("cargo install bpf-linker")?;
    if !status.success() {
        bail!("building bpf-linker failed ({status})");
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args([&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()?;
    if !out.status.success() {
        bail!("no nightly");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

pub fn nightly_lib_dir() -> Result<PathBuf> {
    Ok(nightly_sysroot()?.join("lib"))
}

/// Where bpf-linker lives: outside target/, so `cargo clean` keeps it.
pub fn tools_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".cache/redirect-tools")
}

pub fn path_with_tools() -> Result<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    Ok(format!("{}:{path}", tools_dir().join("bin").display()))
}

/// A bpffs at /sys/fs/bpf, where the engine pins its state.
fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    {
        return Ok(());
    }
    let target = Path::new("/sys/fs/bpf");
    std::fs::create_dir_all(target).ok();
    run_quiet(
        Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
        "mount bpffs",
    )
}

/// Programs every machine of this kind has before any setup: the shell, the Rust
/// toolchain (rustup), the package manager, coreutils and util-linux.
#[cfg(test)]
const BASE_PROGRAMS: &[&str] = &[
    "sh", "cargo", "rustup", "rustc", "apt-get", "mount", "cat", "sleep",
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every program name the workspace's code starts, as it names them: `Command::new("x")`,
    /// `ip netns exec NS x`, and the netfilter fixture's `restore_in(ns, "x", …)`.
    fn started_programs() -> Vec<(String, String)> {
        let mut found = Vec::new();
        let root = crate::workspace_root();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if path.is_dir() {
                    if !name.starts_with('.') && name != "target" {
                        dirs.push(path);
                    }
                    continue;
                }
                // This file's own tests hold example calls.
                if !name.ends_with(".rs") || path.ends_with("xtask/src/setup.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                // Whitespace folded so that calls split over lines read as one.
                let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
                for prog in literals_after(&flat, &["Command::new(\"", "Command::new( \""])
                    .into_iter()
                    .chain(third_arg_after(&flat, "\"netns\", \"exec\", "))
                    .chain(third_arg_after(&flat, "restore_in("))
                {
                    found.push((
                        prog,
                        path.strip_prefix(&root).unwrap().display().to_string(),
                    ));
                }
            }
        }
        found
    }

    /// The string literal that starts right after each occurrence of a pattern.
    fn literals_after(text: &str, patterns: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for pat in patterns {
            for (i, _) in text.match_indices(pat) {
                let rest = &text[i + pat.len()..];
                if let Some(end) = rest.find('"') {
                    out.push(rest[..end].to_string());
                }
            }
        }
        out
    }

    /// For `ip netns exec NS prog` and `restore_in(ns, "prog", …)`: the literal that is
    /// the second argument after the pattern, when it is a literal.
    fn third_arg_after(text: &str, pat: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (i, _) in text.match_indices(pat) {
            let rest = &text[i + pat.len()..];
            let Some(comma) = rest.find(", ") else {
                continue;
            };
            let arg = rest[comma + 2..].trim_start();
            if let Some(lit) = arg.strip_prefix('"')
                && let Some(end) = lit.find('"')
            {
                out.push(lit[..end].to_string());
            }
        }
        out
    }

    #[test]
    fn every_program_the_code_starts_is_installed_by_setup() {
        let installed: Vec<&str> = APT_PACKAGES
            .iter()
            .chain(BENCH_PACKAGES)
            .map(|(bin, _)| *bin)
            .chain(BASE_PROGRAMS.iter().copied())
            .collect();
        let found = started_programs();
        // The scan must see what it is meant to see, or it proves nothing.
        for known in ["ip", "iptables-restore", "iperf3", "wrk", "bpftool"] {
            assert!(
                found.iter().any(|(p, _)| p == known),
                "the scan no longer finds {known}: update started_programs"
            );
        }
        let missing: Vec<String> = found
            .iter()
            .filter(|(p, _)| !installed.contains(&p.as_str()))
            .map(|(p, file)| format!("{p} (started in {file})"))
            .collect();
        assert!(
            missing.is_empty(),
            "programs started but not installed by `cargo xtask setup` (add them to \
             APT_PACKAGES): {missing:?}"
        );
    }

    #[test]
    fn the_scan_reads_each_form() {
        let t = r#"Command::new("foo").arg(1); cmd.args(["netns", "exec", &ns, "bar", "-x"]); restore_in(ns, "baz", RULES)"#;
        assert_eq!(literals_after(t, &["Command::new(\""]), ["foo"]);
        assert_eq!(third_arg_after(t, "\"netns\", \"exec\", "), ["bar"]);
        assert_eq!(third_arg_after(t, "restore_in("), ["baz"]);
    }
}
