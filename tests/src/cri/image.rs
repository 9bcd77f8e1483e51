//! The two images the fixture's runtime knows, built here with no registry: an OCI
//! image-layout tar that `ctr images import` reads, holding
//! - `localhost/pause:1`: a static pause program compiled from the C below, and
//! - `localhost/app:1`: busybox-static with links for its applets (`sh`, `nc`, `httpd`…).
//!
//! The archive is written by `crate::oci` (shared with `cargo xtask image`).

use std::{
    io::Write,
    path::Path,
    process::Command,
    sync::{Mutex, OnceLock},
};

use crate::oci::{self, Entry, Image, layer};
use anyhow::{Context, Result, bail};

pub const PAUSE_IMAGE: &str = "localhost/pause:1";
pub const APP_IMAGE: &str = "localhost/app:1";

/// busybox-static's binary (Debian's package path).
const BUSYBOX: &str = "/bin/busybox";

/// Applets linked in the app image's /bin.
const APPLETS: &[&str] = &[
    "sh", "nc", "httpd", "echo", "cat", "sleep", "ls", "ip", "ps", "env", "hostname", "wget",
    "true", "false", "kill", "printf", "test", "[",
];

/// The sandbox's init: waits for signals, reaps whatever ends up its child, exits on
/// SIGINT/SIGTERM.
const PAUSE_C: &str = r#"
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = stop;
    sigaction(SIGINT, &sa, 0);
    sigaction(SIGTERM, &sa, 0);
    sa.sa_handler = reap;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    sigaction(SIGCHLD, &sa, 0);
    for (;;) pause();
}
"#;

/// The image-layout tar holding both images, built once per process.
pub fn layout_tar() -> Result<&'static [u8]> {
    static TAR: OnceLock<Vec<u8>> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    if let Some(t) = TAR.get() {
        return Ok(t);
    }
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = TAR.get() {
        return Ok(t);
    }
    let tar = build_layout()?;
    Ok(TAR.get_or_init(|| tar))
}

fn build_layout() -> Result<Vec<u8>> {
    let pause = compile_pause()?;
    let busybox = std::fs::read(BUSYBOX).with_context(|| {
        format!("cri: reading {BUSYBOX} (install busybox-static: cargo xtask setup)")
    })?;
    if !is_static_elf(&busybox) {
        bail!(
            "cri: {BUSYBOX} is linked dynamically: the app image needs busybox-static \
             (apt-get install busybox-static)"
        );
    }
    let pause_layer = layer(&[
        Entry::File("pause", &pause, 0o755),
        Entry::Dir("dev"),
        Entry::Dir("proc"),
        Entry::Dir("sys"),
        Entry::Dir("etc"),
    ])?;
    let mut app = vec![
        Entry::Dir("bin"),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::Dir("dev"),
        Entry::Dir("proc"),
        Entry::Dir("sys"),
        Entry::Dir("etc"),
        Entry::Dir("tmp"),
        Entry::Dir("var"),
        Entry::Dir("www"),
    ];
    let links: Vec<String> = APPLETS.iter().map(|a| format!("bin/{a}")).collect();
    app.extend(links.iter().map(|l| Entry::Link(l, "busybox")));
    let app_layer = layer(&app)?;
    let image = |name: &str, layer, entrypoint: &str| Image {
        name: name.into(),
        layer,
        entrypoint: vec![entrypoint.into()],
        env: vec!["PATH=/bin".into()],
    };
    Ok(oci::layout_tar(&[
        image(PAUSE_IMAGE, pause_layer, "/pause"),
        image(APP_IMAGE, app_layer, "/bin/sh"),
    ])?)
}

/// Compiles the pause program with `gcc -static` in a directory of its own.
fn compile_pause() -> Result<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!("cri-pause-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let src = dir.join("pause.c");
        let bin = dir.join("pause");
        std::fs::File::create(&src)?.write_all(PAUSE_C.as_bytes())?;
        let out = Command::new("gcc")
            .args(["-static", "-O2", "-s", "-o"])
            .arg(&bin)
            .arg(&src)
            .output()
            .context("cri: running gcc (install gcc and libc6-dev: cargo xtask setup)")?;
        if !out.status.success() {
            bail!(
                "cri: compiling the pause program: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(std::fs::read(&bin)?)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// An ELF file with no program interpreter (PT_INTERP), i.e. linked statically.
fn is_static_elf(bin: &[u8]) -> bool {
    if bin.len() < 64 || &bin[..4] != b"\x7fELF" || bin[4] != 2 {
        return false;
    }
    let u64_at = |o: usize| u64::from_le_bytes(bin[o..o + 8].try_into().unwrap()) as usize;
    let u16_at = |o: usize| u16::from_le_bytes(bin[o..o + 2].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        bin.get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) != 3)
    })
}

/// Writes the layout tar into `dir` and imports it into the containerd at `socket`,
/// in the CRI's namespace.
pub fn import(socket: &Path, dir: &Path) -> Result<()> {
    import_tar(socket, dir, layout_tar()?)
}

/// Imports the image-layout tar `data` into the containerd at `socket`, in the CRI's
/// namespace (written to `dir` first).
pub fn import_tar(socket: &Path, dir: &Path, data: &[u8]) -> Result<()> {
    let tar = dir.join("images.tar");
    std::fs::write(&tar, data)?;
    let out = Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["-n", "k8s.io", "images", "import"])
        .arg(&tar)
        .output()
        .context("cri: running ctr (install containerd: cargo xtask setup)")?;
    let _ = std::fs::remove_file(&tar);
    if !out.status.success() {
        bail!(
            "cri: ctr images import: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_static_reads_as_static_and_a_dynamic_program_does_not() {
        let busybox = std::fs::read(BUSYBOX).expect("busybox-static (cargo xtask setup)");
        assert!(is_static_elf(&busybox));
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(!is_static_elf(&sh), "/bin/sh is dynamic on Debian");
        assert!(!is_static_elf(b"#!/bin/sh\n"));
    }
}
