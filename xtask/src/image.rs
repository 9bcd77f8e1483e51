//! `cargo xtask image`: the agent's container image, assembled offline from the local
//! release build. No base image: the two binaries, and the shared libraries they load
//! (as `ldd` names them) at the paths they are loaded from. The DaemonSets in `deploy/`
//! run it as `localhost/redirect:<version>`.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{oci, workspace_root};

/// The image's name, as `deploy/daemonset*.yaml` refer to it.
pub const NAME: &str = concat!("localhost/redirect:", env!("CARGO_PKG_VERSION"));
/// Where the binaries go in the image.
const BIN_DIR: &str = "usr/local/bin";
const BINARIES: [&str; 2] = ["redirect-user", "redirect-cni"];

/// Writes the archive; returns its path and size.
pub fn build() -> Result<(PathBuf, u64)> {
    let release = workspace_root().join("target/release");
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut libs: Vec<String> = Vec::new();
    for b in BINARIES {
        let path = release.join(b);
        files.push((format!("{BIN_DIR}/{b}"), stripped(&path)?));
        for l in shared_libraries(&path)? {
            if !libs.contains(&l) {
                libs.push(l);
            }
        }
    }
    for l in &libs {
        let data = std::fs::read(l).with_context(|| format!("reading {l}"))?;
        files.push((l.trim_start_matches('/').to_string(), data));
    }
    // Directories: every parent of a file, then the mount points the DaemonSets use
    // (with a read-only root filesystem they must exist in the image).
    let mut dirs: Vec<String> = Vec::new();
    let mounts = [
        "proc",
        "sys",
        "dev",
        "tmp",
        "host",
        "sys/fs/bpf",
        "sys/fs/cgroup",
        "var/run/netns",
        "var/run/ztunnel",
        "var/run/redirect",
        "host/proc",
        "host/etc/cni/net.d",
        "host/opt/cni/bin",
    ];
    for p in files
        .iter()
        .map(|(p, _)| p.as_str())
        .chain(mounts.iter().copied())
    {
        let path = std::path::Path::new(p);
        let mut anc: Vec<String> = path
            .ancestors()
            .skip(usize::from(!mounts.contains(&p)))
            .filter(|a| !a.as_os_str().is_empty())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        anc.reverse();
        for d in anc {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    dirs.sort_by_key(|d| d.matches('/').count());
    let mut entries: Vec<oci::Entry> = dirs.iter().map(|d| oci::Entry::Dir(d)).collect();
    entries.extend(
        files
            .iter()
            .map(|(p, data)| oci::Entry::File(p, data, 0o755)),
    );
    let layer = oci::layer(&entries)?;
    let tar = oci::layout_tar(&[oci::Image {
        name: NAME.into(),
        layer,
        entrypoint: vec![format!("/{BIN_DIR}/redirect-user")],
        env: vec![format!("PATH=/{BIN_DIR}")],
    }])?;
    let dir = workspace_root().join("target/image");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(format!("redirect-{}.tar", env!("CARGO_PKG_VERSION")));
    std::fs::write(&out, &tar).with_context(|| format!("writing {}", out.display()))?;
    Ok((out, tar.len() as u64))
}

/// The binary without its symbol tables (a quarter of its size; logs and errors are
/// unchanged, a panic's backtrace loses function names).
fn stripped(bin: &std::path::Path) -> Result<Vec<u8>> {
    let out = std::env::temp_dir().join(format!(
        "redirect-image-{}-{}",
        std::process::id(),
        bin.file_name().unwrap_or_default().to_string_lossy()
    ));
    let status = Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .context("running strip (Debian's binutils)")?;
    let data = std::fs::read(&out);
    let _ = std::fs::remove_file(&out);
    if !status.success() {
        bail!("strip {} failed ({status})", bin.display());
    }
    Ok(data?)
}

/// The absolute paths of the shared libraries `bin` loads, the dynamic loader included.
fn shared_libraries(bin: &std::path::Path) -> Result<Vec<String>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd (Debian's libc-bin)")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// `ldd` lines: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`,
/// `/lib64/ld-linux-x86-64.so.2 (0x…)`, `linux-vdso.so.1 (0x…)` (no file: skipped).
fn parse_ldd(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_files_to_copy() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }
}
