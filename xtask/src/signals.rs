//! SIGINT and SIGTERM while a task runs: `cargo xtask test` runs cargo, which runs the
//! test binaries, which run agents and containerd. Ctrl-C reaches the terminal's whole
//! foreground process group, but `kill <xtask's pid>` reaches xtask alone, and cargo
//! does not pass signals on to what it runs. So each child runs in a process group of
//! its own, a signal to xtask is sent on to that whole group (every process there
//! cleans up what it made, see `redirect_user::interrupt`), and xtask waits until the
//! group is gone before it ends as the signal would have ended it.

use std::{
    process::{Command, ExitStatus},
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

/// The process group of the running child (0: none).
static GROUP: AtomicI32 = AtomicI32::new(0);
/// The signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// How long the interrupted children get to clean up.
const CLEANUP_LIMIT: Duration = Duration::from_secs(60);

/// Takes SIGINT and SIGTERM over for the rest of the process: with a child running they
/// go to its group; with none, xtask ends at once as the signal would have ended it.
pub fn install() -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handlers")?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            RECEIVED.store(sig, Ordering::SeqCst);
            let group = GROUP.load(Ordering::SeqCst);
            if group == 0 {
                die(sig);
            }
            // SAFETY: kill(2) on the child's own process group.
            unsafe { libc::kill(-group, sig) };
        }
    });
    Ok(())
}

/// Runs `cmd` in a process group of its own and waits for it; if xtask got SIGINT or
/// SIGTERM meanwhile, waits until the group is gone and ends as that signal.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let mut child = cmd.spawn()?;
    let group = child.id() as i32;
    GROUP.store(group, Ordering::SeqCst);
    // A signal that came just before the child existed.
    let early = RECEIVED.load(Ordering::SeqCst);
    if early != 0 {
        // SAFETY: as above.
        unsafe { libc::kill(-group, early) };
    }
    let status = child.wait();
    let sig = RECEIVED.load(Ordering::SeqCst);
    if sig != 0 {
        wait_for_group(group);
        die(sig);
    }
    GROUP.store(0, Ordering::SeqCst);
    Ok(status?)
}

/// Waits until no process of `group` is left (grandchildren clean up after the child
/// itself has ended), at most [`CLEANUP_LIMIT`].
fn wait_for_group(group: i32) {
    let t = Instant::now();
    // SAFETY: kill(2) with signal 0 only checks that the group has a process.
    while unsafe { libc::kill(-group, 0) } == 0 && t.elapsed() < CLEANUP_LIMIT {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn die(sig: i32) -> ! {
    eprintln!(
        "xtask: {}: stopped",
        signal_hook::low_level::signal_name(sig).unwrap_or("signal")
    );
    let _ = signal_hook::low_level::emulate_default_handler(sig);
    signal_hook::low_level::exit(128 + sig)
}
