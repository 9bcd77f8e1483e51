//! Network namespace handles: opened from a path or taken from an fd, checked to be a
//! network namespace, compared by device and inode, and entered on the current thread
//! for as long as a closure runs.

use std::{
    cell::{Cell, RefCell},
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    rc::Rc,
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
    #[error("cannot return to the original network namespace: {0}")]
    Return(nix::Error),
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
        // Goes home even if `f` panics, so the thread never stays in the pod.
        let guard = GoHome::enter(home);
        let out = f();
        guard.go()?;
        Ok(out)
    }
}

thread_local! {
    /// The namespace this thread is in outside `run`, opened once per thread: the proxy
    /// runs a `run` for every connection it opens, and this saves an open and an fstat.
    static HOME: RefCell<Option<Rc<Netns>>> = const { RefCell::new(None) };
    /// How many `run` calls this thread is inside.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Where `run` must bring the thread back to: its usual namespace, or (inside another
/// `run`) wherever it is now.
fn home_of_this_thread() -> Result<Rc<Netns>, NetnsError> {
    if DEPTH.with(Cell::get) > 0 {
        return Ok(Rc::new(Netns::current()?));
    }
    if let Some(h) = HOME.with(|h| h.borrow().clone()) {
        return Ok(h);
    }
    let h = Rc::new(Netns::current()?);
    HOME.with(|c| *c.borrow_mut() = Some(h.clone()));
    Ok(h)
}

struct GoHome(Option<Rc<Netns>>);

impl GoHome {
    fn enter(home: Rc<Netns>) -> Self {
        DEPTH.with(|d| d.set(d.get() + 1));
        GoHome(Some(home))
    }

    fn go(mut self) -> Result<(), NetnsError> {
        let home = self.0.take().expect("home namespace");
        DEPTH.with(|d| d.set(d.get() - 1));
        setns(&home.fd, CloneFlags::CLONE_NEWNET).map_err(NetnsError::Return)
    }
}

impl Drop for GoHome {
    fn drop(&mut self) {
        if let Some(home) = self.0.take() {
            DEPTH.with(|d| d.set(d.get() - 1));
            if let Err(e) = setns(&home.fd, CloneFlags::CLONE_NEWNET) {
                // A thread stuck in a pod namespace would act there for others: stop.
                eprintln!("fatal: cannot return a thread to its network namespace: {e}");
                std::process::abort();
            }
        }
    }
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
