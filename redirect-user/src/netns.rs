//! Network namespace handles: opened from a path or taken from an fd, checked to be a
//! network namespace, compared by device and inode, and entered on the current thread
//! for as long as a closure runs.

use std::{
    cell::{Cell, RefCell},
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
};

use nix::sched::{CloneFlags, setns};

/// `ioctl(fd, NS_GET_NSTYPE)`: the `CLONE_NEW*` type of a namespace fd.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("fd {fd} is not a namespace: {source}")]
    NotANamespace { fd: i32, source: std::io::Error },
    #[error("fd {fd} is a namespace of type {kind:#x}, not a network namespace")]
    NotNetwork { fd: i32, kind: i32 },
    #[error("cannot enter network namespace (dev {dev}, ino {ino}): {source}")]
    Enter {
        dev: u64,
        ino: u64,
        source: nix::Error,
    },
    #[error("cannot stat namespace fd: {0}")]
    Stat(nix::Error),
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    dev: u64,
    ino: u64,
}

impl Netns {
    /// Opens `/var/run/netns/NAME`, `/proc/PID/ns/net` or any other netns path.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_fd(file.into())
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// Takes an fd received from elsewhere (for example over SCM_RIGHTS) after checking
    /// that it really is a network namespace.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, NetnsError> {
        let raw = fd.as_raw_fd();
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
        let kind = unsafe { libc::ioctl(raw, NS_GET_NSTYPE as _) };
        if kind < 0 {
            return Err(NetnsError::NotANamespace {
                fd: raw,
                source: std::io::Error::last_os_error(),
            });
        }
        if kind != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetwork { fd: raw, kind });
        }
        let st = nix::sys::stat::fstat(&fd).map_err(NetnsError::Stat)?;
        Ok(Self {
            fd,
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    pub fn dev(&self) -> u64 {
        self.dev
    }

    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// Same namespace (device and inode), whichever fd or path it was opened by.
    pub fn same_as(&self, other: &Netns) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            dev: self.dev,
            ino: self.ino,
        })
    }

    /// Runs `f` with the calling thread inside this namespace, then returns the thread
    /// to the namespace it was in. Sockets created by `f` stay in this namespace.
    /// Keep `f` short and non-blocking: it holds the thread.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let home = home_of_this_thread()?;
        if self.same_as(&home) {
            return Ok(f());
        }
        setns(&self.fd, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            dev: self.dev,
            ino: self.ino,
            source,
        })?;
        // Goes home when `f` returns or panics; a thread that cannot go home aborts the
        // process, so it never runs another task in the pod's namespace.
        let _home = GoHome::enter(home);
        Ok(f())
    }
}

thread_local! {
    /// The namespace this thread is in outside `run`, found once per thread: the proxy
    /// runs a `run` for every connection it opens, and this saves an open and an fstat.
    static HOME: RefCell<Option<Arc<Netns>>> = const { RefCell::new(None) };
    /// How many `run` calls this thread is inside.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// The home namespaces of the process's threads, one handle each, shared: a runtime
/// starts and ends blocking threads all the time, and one fd per thread would make the
/// process's fd count follow its thread count. Weak, so that no handle outlives the
/// last thread that lives there.
static HOMES: Mutex<Vec<Weak<Netns>>> = Mutex::new(Vec::new());

/// The shared handle of the namespace `ns` is, `ns` itself when it is the first.
fn shared_home(ns: Netns) -> Arc<Netns> {
    let mut homes = HOMES.lock().unwrap_or_else(|e| e.into_inner());
    homes.retain(|w| w.strong_count() > 0);
    if let Some(h) = homes
        .iter()
        .filter_map(Weak::upgrade)
        .find(|h| h.same_as(&ns))
    {
        return h;
    }
    let h = Arc::new(ns);
    homes.push(Arc::downgrade(&h));
    h
}

/// Where `run` must bring the thread back to: its usual namespace, or (inside another
/// `run`) wherever it is now.
fn home_of_this_thread() -> Result<Arc<Netns>, NetnsError> {
    if DEPTH.with(Cell::get) > 0 {
        return Ok(Arc::new(Netns::current()?));
    }
    if let Some(h) = HOME.with(|h| h.borrow().clone()) {
        return Ok(h);
    }
    let h = shared_home(Netns::current()?);
    HOME.with(|c| *c.borrow_mut() = Some(h.clone()));
    Ok(h)
}

/// Brings the thread back to `home` when dropped, or aborts the process.
struct GoHome(Arc<Netns>);

impl GoHome {
    fn enter(home: Arc<Netns>) -> Self {
        DEPTH.with(|d| d.set(d.get() + 1));
        GoHome(home)
    }
}

impl Drop for GoHome {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
        if let Err(e) = setns(&self.0.fd, CloneFlags::CLONE_NEWNET) {
            stuck_in_a_pod(&self.0, e);
        }
    }
}

/// A thread that cannot return home would open the next task's sockets (another
/// tenant's, on a shared runtime) in the wrong namespace: no error return can make that
/// safe, so the process stops.
fn stuck_in_a_pod(home: &Netns, e: nix::Error) -> ! {
    let msg = format!(
        "fatal: cannot return a thread to its network namespace (dev {}, ino {}): {e}; aborting",
        home.dev, home.ino
    );
    tracing::error!("{msg}");
    eprintln!("{msg}");
    std::process::abort();
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_namespace_is_a_network_namespace() {
        let a = Netns::current().unwrap();
        let b = Netns::open("/proc/self/ns/net").unwrap();
        assert!(a.same_as(&b));
    }

    #[test]
    fn run_returns_the_thread_home_nested_too() {
        let home = Netns::current().unwrap();
        // Entering our own namespace is the short path; nesting must come back out too.
        let here = Netns::open("/proc/self/ns/net").unwrap();
        let inner = here
            .run(|| here.run(|| Netns::current().unwrap()).unwrap())
            .unwrap();
        assert!(inner.same_as(&home));
        assert!(Netns::current().unwrap().same_as(&home));
    }

    /// A network namespace of its own: a helper thread unshares and hands back its
    /// namespace (it lives as long as the handle). Needs root, as every test here.
    fn new_namespace() -> Netns {
        std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            Netns::current().unwrap()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn run_enters_another_namespace_and_comes_back() {
        let home = Netns::current().unwrap();
        let pod = new_namespace();
        assert!(!pod.same_as(&home));
        let inside = pod.run(|| Netns::current().unwrap()).unwrap();
        assert!(inside.same_as(&pod), "f runs inside the namespace");
        assert!(
            Netns::current().unwrap().same_as(&home),
            "and the thread is back"
        );
        // Nested the other way round: home inside the pod, back to the pod, then home.
        let (outer, inner, after) = pod
            .run(|| {
                let inner = home.run(|| Netns::current().unwrap()).unwrap();
                (Netns::current().unwrap(), inner, ())
            })
            .unwrap();
        let () = after;
        assert!(inner.same_as(&home) && outer.same_as(&pod));
        assert!(Netns::current().unwrap().same_as(&home));
        // A panic inside still brings the thread home.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pod.run(|| panic!("inside the pod")).unwrap()
        }));
        assert!(r.is_err());
        assert!(Netns::current().unwrap().same_as(&home));
    }

    /// Threads come and go (a runtime's blocking pool): their homes share one handle,
    /// so the process's open fds do not follow its thread count; a thread that lives
    /// elsewhere gets a handle of its own namespace.
    #[test]
    fn threads_share_one_handle_of_their_home() {
        let here = Netns::current().unwrap();
        let homes: Vec<Arc<Netns>> = (0..8)
            .map(|_| std::thread::spawn(|| home_of_this_thread().unwrap()))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(homes[0].same_as(&here));
        assert!(homes.iter().all(|h| Arc::ptr_eq(h, &homes[0])));
        let pod = Arc::new(new_namespace());
        let elsewhere = {
            let pod = pod.clone();
            std::thread::spawn(move || {
                pod.run(|| {
                    std::thread::spawn(|| home_of_this_thread().unwrap())
                        .join()
                        .unwrap()
                })
                .unwrap()
            })
            .join()
            .unwrap()
        };
        assert!(elsewhere.same_as(&pod) && !Arc::ptr_eq(&elsewhere, &homes[0]));
    }

    const ABORT_CHILD: &str = "REDIRECT_NETNS_ABORT_CHILD";

    /// Clears the calling thread's effective capabilities: setns then fails (EPERM).
    fn drop_effective_capabilities() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Default, Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        // _LINUX_CAPABILITY_VERSION_3; pid 0: this thread.
        let mut h = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut d = [Data::default(); 2];
        // SAFETY: the header and two data structs capget/capset expect for version 3.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()), 0);
            d[0].effective = 0;
            d[1].effective = 0;
            assert_eq!(libc::syscall(libc::SYS_capset, &h, d.as_ptr()), 0);
        }
    }

    #[test]
    fn a_thread_that_cannot_return_home_aborts_the_process() {
        if std::env::var_os(ABORT_CHILD).is_some() {
            // The child: in a pod's namespace, the thread loses the right to setns.
            let pod = new_namespace();
            let r = pod.run(drop_effective_capabilities);
            // Still running: the thread is left in the pod and would serve other tasks.
            let stuck = Netns::current().unwrap().same_as(&pod);
            eprintln!("child: run returned {r:?}, thread left in the pod: {stuck}");
            std::process::exit(3);
        }
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .args([
                "--exact",
                "netns::tests::a_thread_that_cannot_return_home_aborts_the_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ABORT_CHILD, "1");
        // SAFETY: only setrlimit between fork and exec. No core file for the abort.
        unsafe {
            child.pre_exec(|| {
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                Ok(())
            });
        }
        let out = child.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "the child must abort, got {:?}; its stderr:\n{stderr}",
            out.status
        );
        assert!(
            stderr.contains("fatal: cannot return a thread to its network namespace"),
            "{stderr}"
        );
    }

    #[test]
    fn other_namespace_types_are_refused() {
        let err = Netns::open("/proc/self/ns/uts").unwrap_err();
        assert!(matches!(err, NetnsError::NotNetwork { .. }), "{err}");
    }

    #[test]
    fn plain_files_are_refused() {
        let f = File::open("/proc/self/status").unwrap();
        let err = Netns::from_fd(f.into()).unwrap_err();
        assert!(matches!(err, NetnsError::NotANamespace { .. }), "{err}");
    }

    #[test]
    fn missing_paths_are_refused() {
        let err = Netns::open("/var/run/netns/does-not-exist-redirect").unwrap_err();
        assert!(matches!(err, NetnsError::Open { .. }), "{err}");
    }
}
