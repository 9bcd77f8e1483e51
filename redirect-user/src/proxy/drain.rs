//! The tasks of one pod's proxy: every connection, tunnel stream and DNS query it serves
//! runs as a task tracked here, so that removing the pod ends them all within a bounded
//! time (and with them their sockets and the pod's namespace fd).
//!
//! [`PodTasks::drain`] refuses new tasks at once, lets the running ones finish for a
//! grace period, then cancels the rest and returns only once every one of them has been
//! dropped. Upstream's default for this deadline is 5 s
//! ([`DEFAULT_GRACE`], its `CONNECTION_TERMINATION_DEADLINE`).

use std::{
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::task::JoinSet;
use tracing::warn;

/// How long a removed pod's connections may go on before they are cancelled.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// The tasks of one pod; clones share them.
#[derive(Clone, Default)]
pub struct PodTasks {
    /// `None` once draining: new tasks are refused.
    set: Arc<Mutex<Option<JoinSet<()>>>>,
}

impl std::fmt::Debug for PodTasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodTasks")
            .field("live", &self.live())
            .finish()
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drained {
    /// Tasks that ended by themselves within the grace period.
    pub finished: usize,
    /// Tasks still running at the deadline, cancelled.
    pub cancelled: usize,
}

impl PodTasks {
    pub fn new() -> Self {
        Self {
            set: Arc::new(Mutex::new(Some(JoinSet::new()))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<JoinSet<()>>> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` as a task of the pod (inside a tokio runtime). Once the pod is draining
    /// `f` is dropped unrun and `false` returned.
    pub fn spawn<F>(&self, f: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut guard = self.lock();
        let Some(set) = guard.as_mut() else {
            return false;
        };
        reap(set);
        set.spawn(f);
        true
    }

    /// Tasks running now.
    pub fn live(&self) -> usize {
        match self.lock().as_mut() {
            Some(set) => {
                reap(set);
                set.len()
            }
            None => 0,
        }
    }

    /// Whether [`PodTasks::drain`] was called.
    pub fn draining(&self) -> bool {
        self.lock().is_none()
    }

    /// Refuses new tasks and cancels the running ones without waiting (for `Drop`).
    pub fn abort(&self) {
        if let Some(mut set) = self.lock().take() {
            set.abort_all();
            set.detach_all();
        }
    }

    /// Refuses new tasks, waits up to `grace` for the running ones, cancels the rest and
    /// returns once all are dropped. A second call finds nothing to do.
    pub async fn drain(&self, grace: Duration) -> Drained {
        let Some(mut set) = self.lock().take() else {
            return Drained::default();
        };
        let mut out = Drained::default();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            match tokio::time::timeout_at(deadline, set.join_next()).await {
                Ok(Some(r)) => {
                    log_panic(r);
                    out.finished += 1;
                }
                Ok(None) => return out,
                Err(_) => break,
            }
        }
        out.cancelled = set.len();
        set.abort_all();
        // Aborted tasks are dropped at their next poll; wait for each, so their sockets
        // are closed when this returns.
        while let Some(r) = set.join_next().await {
            log_panic(r);
        }
        out
    }
}

/// Forgets the tasks that have ended, so the set holds the live ones only.
fn reap(set: &mut JoinSet<()>) {
    while let Some(r) = set.try_join_next() {
        log_panic(r);
    }
}

fn log_panic(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r
        && e.is_panic()
    {
        warn!(error = %e, "proxy: a connection task panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_the_quick_and_cancels_the_slow() {
        let tasks = PodTasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // Dropped when its task is cancelled: the sender side sees it.
        let slow = async move {
            let _tx = tx;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        };
        assert!(tasks.spawn(slow));
        assert!(tasks.spawn(tokio::time::sleep(Duration::from_millis(20))));
        assert_eq!(tasks.live(), 2);
        let started = std::time::Instant::now();
        let d = tasks.drain(Duration::from_millis(300)).await;
        assert_eq!(
            d,
            Drained {
                finished: 1,
                cancelled: 1
            }
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(rx.await.is_err(), "the slow task was dropped");
        assert_eq!(tasks.live(), 0);
        // Nothing new runs once draining.
        assert!(tasks.draining());
        assert!(!tasks.clone().spawn(async {}));
        assert_eq!(tasks.drain(Duration::ZERO).await, Drained::default());
    }

    #[tokio::test]
    async fn ended_tasks_are_not_kept() {
        let tasks = PodTasks::new();
        for _ in 0..1000 {
            tasks.spawn(async {});
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(tasks.live(), 0);
    }
}
