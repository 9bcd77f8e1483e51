//! Handing a node over from a running agent to its successor (a rolling upgrade with
//! surge, or `redirect-user uninstall`), over the control socket in the shared state
//! directory: a Unix socket works across the pods' pid namespaces, where signals would
//! not.
//!
//! The successor finds the pin directory's lock held and sends `handover`. The agent
//! stops everything that changes shared state (enrolment, removal, the Kubernetes
//! reconciler, the CNI plugin socket, its HTTP endpoints), saves its pod list one last
//! time, closes its engine (which gives the lock up) and answers. Its proxy goes on
//! serving: its listeners stay in the engine's maps until the successor's replace them,
//! and its connections in flight go on until it is stopped. The successor, holding the
//! old process by a pidfd taken from the control connection, keeps trusting the old
//! proxy's cgroup for as long as that process lives, so its upstream connections are
//! never steered back into a proxy.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, unix::AsyncFd},
    net::UnixStream,
    sync::oneshot,
};
use tracing::{info, warn};

use super::{
    control::{ControlRequest, ControlResponse},
    peer,
};
use crate::ebpf::{Engine, owner};

/// What the agent that handed over tells its successor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverInfo {
    /// Its pid (in its own pid namespace: for logs).
    pub pid: u32,
    /// The pin directory it gave up.
    pub pin_dir: PathBuf,
    /// The cgroups its proxy's sockets are trusted by.
    pub cgroups: Vec<u64>,
}

/// A handover request on its way to the command running the agent.
pub struct Call {
    /// Who asks (for the log): "agent <pid>", "uninstall <pid>".
    pub by: String,
    pub reply: oneshot::Sender<Result<HandoverInfo, String>>,
}

/// The agent that handed over: alive while its proxy drains.
pub struct Predecessor {
    pub info: HandoverInfo,
    /// The process, held since the request: a reused pid is never mistaken for it.
    pidfd: OwnedFd,
}

impl Predecessor {
    /// True while the process runs.
    pub fn alive(&self) -> bool {
        peer::pidfd_alive(self.pidfd.as_fd())
    }

    /// Waits until the process has exited.
    pub async fn exited(&self) {
        // A pidfd polls readable once its process has exited.
        // SAFETY: the pidfd is owned by `self`, which outlives this registration (it is
        // dropped before this function returns); the fd is not closed or replaced.
        let registered = unsafe {
            AsyncFd::register_with_interest(self.pidfd.as_fd(), tokio::io::Interest::READABLE)
        };
        match registered {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            Err(_) => {
                while self.alive() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Trusts the predecessor's proxy cgroups in `engine` until the process exits, then
    /// lets them go. Run it beside the agent.
    pub async fn trust_while_alive(self, engine: Arc<Engine>) {
        let ids: Vec<u64> = self
            .info
            .cgroups
            .iter()
            .copied()
            .filter(|id| *id != 0)
            .collect();
        let mut held = Vec::new();
        for id in ids {
            match engine.trust_proxy_cgroup(id) {
                Ok(()) => held.push(id),
                Err(e) => {
                    warn!(cgroup_id = id, error = %e, "agent: cannot trust the previous agent's proxy cgroup; its upstream connections opened from now on fail")
                }
            }
        }
        if !held.is_empty() {
            info!(pid = self.info.pid, cgroups = ?held, "agent: the previous agent's proxy stays trusted while it drains");
        }
        self.exited().await;
        for id in held {
            if let Err(e) = engine.untrust_proxy_cgroup(id) {
                warn!(cgroup_id = id, error = %e, "agent: cannot release the previous agent's proxy cgroup");
            }
        }
        info!(
            pid = self.info.pid,
            "agent: the previous agent has exited, the handover is complete"
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the pin directory {pin_dir} is held, but no agent answers on {socket}: {source}")]
    Unreachable {
        pin_dir: PathBuf,
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent on {socket} refused to hand over: {reason}")]
    Refused { socket: PathBuf, reason: String },
    #[error("the agent on {socket} did not answer the handover within {waited:?}")]
    Timeout { socket: PathBuf, waited: Duration },
    #[error(
        "the agent on {socket} handed over {theirs}, not {ours}: it is not the owner of this pin directory"
    )]
    OtherPinDir {
        socket: PathBuf,
        theirs: PathBuf,
        ours: PathBuf,
    },
}

/// If another process owns `pin_dir`, asks the agent of `state_dir` to hand over and
/// returns it once it has let go (the lock is then free). `None` when nobody owned the
/// directory. `by` names the asker in the old agent's log.
pub async fn take_over(
    state_dir: &Path,
    pin_dir: &Path,
    by: &str,
    wait: Duration,
) -> Result<Option<Predecessor>, HandoverError> {
    if !owner::held(pin_dir) {
        return Ok(None);
    }
    let socket = state_dir.join("control.sock");
    info!(pin_dir = %pin_dir.display(), socket = %socket.display(), holder = owner::holder(pin_dir), "agent: pin directory held, asking its agent to hand over");
    let unreachable = |source| HandoverError::Unreachable {
        pin_dir: pin_dir.into(),
        socket: socket.clone(),
        source,
    };
    let stream = UnixStream::connect(&socket).await.map_err(unreachable)?;
    let cred_pid = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .unwrap_or_default();
    let peer = peer::Peer::of(&stream, cred_pid).map_err(unreachable)?;
    let req = ControlRequest::Handover {
        by: format!("{by} {}", std::process::id()),
    };
    let ask = async {
        let (r, mut w) = stream.into_split();
        let mut line = serde_json::to_vec(&req).map_err(std::io::Error::other)?;
        line.push(b'\n');
        w.write_all(&line).await?;
        let mut answer = String::new();
        BufReader::new(r).read_line(&mut answer).await?;
        serde_json::from_str::<ControlResponse>(&answer).map_err(std::io::Error::other)
    };
    let started = std::time::Instant::now();
    let answer = match tokio::time::timeout(wait, ask).await {
        Err(_) => {
            return Err(HandoverError::Timeout {
                socket,
                waited: wait,
            });
        }
        Ok(r) => r.map_err(unreachable)?,
    };
    let info = match answer.handover {
        Some(info) if answer.ok => info,
        _ => {
            return Err(HandoverError::Refused {
                socket,
                reason: answer.error.unwrap_or_else(|| "no reason given".into()),
            });
        }
    };
    if info.pin_dir != pin_dir {
        return Err(HandoverError::OtherPinDir {
            socket,
            theirs: info.pin_dir,
            ours: pin_dir.into(),
        });
    }
    info!(
        pid = info.pid,
        took_ms = started.elapsed().as_millis() as u64,
        "agent: the running agent handed over; its proxy drains"
    );
    // Held by the Arc in Peer; a fresh fd of our own for the predecessor.
    let pidfd = peer
        .pidfd
        .as_fd()
        .try_clone_to_owned()
        .map_err(unreachable)?;
    Ok(Some(Predecessor { info, pidfd }))
}
