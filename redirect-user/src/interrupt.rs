//! Cleanup on SIGINT and SIGTERM for what the demo, the tests and the benchmarks make:
//! namespaces, host links, directories (pins, state, temporary files) and child
//! processes. Their owners remove them on drop; a signal skips every drop, so each of
//! them is also registered here while it exists, and the first SIGINT or SIGTERM removes
//! whatever is still registered and ends the process as that signal does by default
//! (the parent sees "killed by SIGTERM", a shell prints nothing more than for Ctrl-C).
//!
//! The handler (a thread waiting on the signals, through `signal-hook`) is installed by
//! the first registration: a process that registers nothing (the node agent, the proxy)
//! keeps the default behaviour or its own handlers.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, MutexGuard, Once},
};

use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{info, warn};

/// What to remove on an interrupt.
enum Item {
    /// A child process: killed (SIGKILL).
    Process(i32),
    /// Anything else, run as given (e.g. a container runtime's traces).
    Custom(String, Box<dyn FnOnce() + Send>),
    /// A named network namespace (`ip netns del`): its links go with it.
    Netns(String),
    /// A link in the host's namespace (`ip link del`).
    Link(String),
    /// A directory or file, removed recursively (bpffs pin directories too).
    Path(PathBuf),
}

impl Item {
    /// Processes go first (they may hold the rest), directories last.
    fn rank(&self) -> u8 {
        match self {
            Item::Process(_) => 0,
            Item::Custom(..) => 1,
            Item::Netns(_) => 2,
            Item::Link(_) => 3,
            Item::Path(_) => 4,
        }
    }

    fn remove(self) {
        match self {
            Item::Process(pid) => {
                // SAFETY: kill(2) on a pid registered by its owner while it lives.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            Item::Custom(what, f) => {
                info!(what, "interrupt: removing");
                f();
            }
            Item::Netns(name) => run_ip(&["netns", "del", &name]),
            Item::Link(name) => run_ip(&["link", "del", &name]),
            Item::Path(p) => {
                let r = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                if let Err(e) = r
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    warn!(path = %p.display(), error = %e, "interrupt: cannot remove");
                }
            }
        }
    }
}

fn run_ip(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

#[derive(Default)]
struct Registry {
    next: u64,
    items: BTreeMap<u64, Item>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    items: BTreeMap::new(),
});
static INSTALL: Once = Once::new();

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// An entry of the registry; dropping it takes the entry out (its owner cleaned up).
#[must_use = "the entry is removed from the registry when this is dropped"]
#[derive(Debug)]
pub struct Registered(u64);

impl Drop for Registered {
    fn drop(&mut self) {
        registry().items.remove(&self.0);
    }
}

fn register(item: Item) -> Registered {
    install();
    let mut r = registry();
    let id = r.next;
    r.next += 1;
    r.items.insert(id, item);
    Registered(id)
}

/// A child process to kill on an interrupt.
pub fn process(pid: u32) -> Registered {
    register(Item::Process(pid as i32))
}

/// A named network namespace to delete on an interrupt.
pub fn netns(name: &str) -> Registered {
    register(Item::Netns(name.to_string()))
}

/// A link of the host's namespace to delete on an interrupt.
pub fn link(name: &str) -> Registered {
    register(Item::Link(name.to_string()))
}

/// A directory (or file) to remove on an interrupt.
pub fn path(p: impl AsRef<Path>) -> Registered {
    register(Item::Path(p.as_ref().to_path_buf()))
}

/// Anything else to undo on an interrupt, after the processes are killed and before
/// namespaces and directories go. `what` names it in the log.
pub fn custom(what: &str, f: impl FnOnce() + Send + 'static) -> Registered {
    register(Item::Custom(what.to_string(), Box::new(f)))
}

/// Installs the handler (once per process; registering does it).
pub fn install() {
    INSTALL.call_once(|| {
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "interrupt: no signal handler; an interrupt leaves things behind");
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("interrupt".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    on_signal(sig);
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "interrupt: no handler thread");
        }
    });
}

/// Removes everything registered, then ends the process as `sig` would have.
fn on_signal(sig: i32) -> ! {
    // Held until the end: an owner that cleans up or registers meanwhile waits.
    let mut r = registry();
    let mut items: Vec<(u64, Item)> = std::mem::take(&mut r.items).into_iter().collect();
    eprintln!(
        "interrupt: {}: removing {} thing(s) this process made",
        signal_hook::low_level::signal_name(sig).unwrap_or("signal"),
        items.len()
    );
    // By kind, then newest first.
    items.sort_by_key(|(id, item)| (item.rank(), std::cmp::Reverse(*id)));
    let mut killed = Vec::new();
    for (_, item) in items {
        if let Item::Process(pid) = item {
            killed.push(pid);
        } else if !killed.is_empty() {
            // Processes come first: they are gone before what they held is removed.
            reap(&std::mem::take(&mut killed));
        }
        item.remove();
    }
    reap(&killed);
    let _ = signal_hook::low_level::emulate_default_handler(sig);
    signal_hook::low_level::exit(128 + sig)
}

/// Waits (briefly) for killed children, so none outlives this process as a zombie
/// holding its resources.
fn reap(pids: &[i32]) {
    for &pid in pids {
        for _ in 0..100 {
            let mut status = 0;
            // SAFETY: waitpid(2) on a child of this process; WNOHANG never blocks.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r != 0 {
                break; // reaped, or not our child / already reaped
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
