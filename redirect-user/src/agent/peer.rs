//! Who is at the other end of a node-agent connection: the proxy's pid and a pidfd
//! taken when it connected, so that a pid reused after the proxy exits never makes the
//! agent trust, move or read another process.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
};

use tracing::{info, warn};

use crate::ebpf::{Engine, trust};

/// The process that connected.
#[derive(Debug, Clone)]
pub struct Peer {
    pub pid: i32,
    pub pidfd: Arc<OwnedFd>,
}

impl Peer {
    /// The peer of a connected Unix socket: `SO_PEERPIDFD` (the process as it was when
    /// it connected), or on kernels before 6.5 a pidfd opened at once from `SO_PEERCRED`.
    pub fn of(sock: &impl AsFd, cred_pid: i32) -> io::Result<Self> {
        let pidfd = match peer_pidfd(sock.as_fd()) {
            Ok(fd) => fd,
            Err(_) => pidfd_open(cred_pid)?,
        };
        let pid = pidfd_pid(pidfd.as_fd()).unwrap_or(cred_pid);
        Ok(Self {
            pid,
            pidfd: Arc::new(pidfd),
        })
    }

    /// True while the process runs.
    pub fn alive(&self) -> bool {
        pidfd_alive(self.pidfd.as_fd())
    }
}

fn peer_pidfd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd and len describe a valid int buffer.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            &mut fd as *mut libc::c_int as *mut _,
            &mut len,
        )
    };
    if r < 0 || fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The pid a pidfd names, from its fdinfo (`Pid: -1` once the process has exited).
pub fn pidfd_pid(pidfd: BorrowedFd<'_>) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .filter(|p: &i32| *p > 0)
}

pub fn pidfd_alive(pidfd: BorrowedFd<'_>) -> bool {
    // SAFETY: signal 0 only checks; no pointer is passed.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        ) == 0
    }
}

/// A connected proxy's cgroup, trusted while this lives.
pub struct ProxyTrust {
    engine: Arc<Engine>,
    pub cgroup_id: u64,
    /// The cgroup the agent made for the proxy (removed once empty).
    made: Option<PathBuf>,
    pid: i32,
}

impl ProxyTrust {
    /// Trusts the peer's cgroup, moving the peer out of the root cgroup first.
    pub fn acquire(engine: &Arc<Engine>, peer: &Peer) -> Result<Self, String> {
        let cg = trust::proxy_cgroup(Some(peer.pid), Some(peer.pidfd.as_fd()))
            .map_err(|e| e.to_string())?;
        engine
            .trust_proxy_cgroup(cg.id)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            engine: engine.clone(),
            cgroup_id: cg.id,
            made: cg.moved.then_some(cg.dir),
            pid: peer.pid,
        })
    }
}

impl Drop for ProxyTrust {
    fn drop(&mut self) {
        match self.engine.untrust_proxy_cgroup(self.cgroup_id) {
            Ok(_) => info!(
                pid = self.pid,
                cgroup_id = self.cgroup_id,
                "agent: proxy gone, its cgroup released"
            ),
            Err(e) => {
                warn!(pid = self.pid, cgroup_id = self.cgroup_id, error = %e, "agent: cannot release the proxy's cgroup")
            }
        }
        if let Some(dir) = &self.made {
            trust::remove_if_empty(dir);
        }
    }
}
