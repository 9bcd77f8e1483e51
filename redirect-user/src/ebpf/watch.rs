//! The watcher: one thread per engine that reads every enrolled pod's rtnetlink events
//! (a socket opened in each pod's namespace at enrolment, `PodState::watch`) and brings
//! the pod in line (`pod::refresh`): tc programs on interfaces that appear, `covered`
//! entries, pod addresses, and our rule, route and filters put back when something
//! inside the pod removed them. One poll over all the pods' sockets: hundreds of pods
//! cost hundreds of fds and no thread each. The thread ends with the engine.

use std::{
    collections::BTreeSet,
    os::fd::{AsRawFd, OwnedFd},
    sync::{Mutex, Weak},
};

use tracing::{debug, warn};

use super::{Inner, lock, pod};

/// Starts the thread; it runs until the engine is dropped or closed (`wake`'s other
/// end closing tells it at once).
pub(super) fn spawn(inner: Weak<Mutex<Option<Inner>>>, wake: OwnedFd) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("netns-watch".into())
        .spawn(move || run(inner, wake))
        .map(drop)
}

fn run(inner: Weak<Mutex<Option<Inner>>>, wake: OwnedFd) {
    loop {
        // The sockets to poll, read under the lock and polled without it.
        let watched: Vec<(String, i32)> = {
            let Some(arc) = inner.upgrade() else { return };
            let guard = lock(&arc);
            let Some(i) = guard.as_ref() else { return };
            i.pods
                .iter()
                .filter_map(|(uid, s)| s.watch.as_ref().map(|w| (uid.clone(), w.as_raw_fd())))
                .collect()
        };
        let mut pfds: Vec<libc::pollfd> = std::iter::once(wake.as_raw_fd())
            .chain(watched.iter().map(|(_, fd)| *fd))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: a valid array of pollfds.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 5000) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                warn!(error = %e, "redirect: watcher poll failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            continue;
        }
        if pfds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        }
        if pfds[0].revents & libc::POLLIN != 0 {
            let mut buf = [0u8; 64];
            // SAFETY: reads into a local buffer.
            unsafe { libc::read(wake.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        }
        let ready: Vec<&String> = watched
            .iter()
            .zip(&pfds[1..])
            .filter(|(_, p)| p.revents != 0)
            .map(|((uid, _), _)| uid)
            .collect();
        if ready.is_empty() {
            continue;
        }
        let Some(arc) = inner.upgrade() else { return };
        let mut guard = lock(&arc);
        let Some(Inner {
            ebpf, maps, pods, ..
        }) = guard.as_mut()
        else {
            return;
        };
        let live: BTreeSet<u64> = pods
            .values()
            .filter(|s| !s.releasing())
            .map(|s| s.record.netns_cookie)
            .collect();
        for uid in ready {
            let Some(state) = pods.get_mut(uid) else {
                continue;
            };
            let Some(w) = state.watch.as_mut() else {
                continue;
            };
            let changes = w.drain();
            if !changes.any() || state.releasing() {
                continue;
            }
            debug!(uid, ?changes, "redirect: pod namespace changed");
            if let Err(e) = pod::refresh(ebpf, maps, uid, state, changes, &live) {
                warn!(uid, error = %e, "redirect: cannot follow a change in the pod's namespace; its TCP through what is not covered stays dropped");
            }
        }
    }
}
