//! The node agent: knows the enrolled pods, keeps their redirection in place with the
//! engine, and hands their namespaces to whichever proxy connects over the node-agent
//! protocol (zds.md). After a proxy acknowledges a pod, the agent finds the listeners
//! that proxy opened in the pod and gives them to the engine.
//!
//! A pod is redirected (failing closed) from the moment it is added, before any proxy
//! has it: it is reported `ready` only once a proxy acked it and its listeners are in
//! place. The pod list is kept in `<state_dir>/pods.json` so that a restarted agent takes
//! its pods back (the redirection itself never went away: it is pinned).

pub mod control;
pub mod discover;
pub mod peer;

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tracing::{info, warn};

use crate::{
    ebpf::{Engine, EnrolError, PodOptions, PodSockets},
    netns::Netns,
    zds::{
        codec::{self, Request},
        proto::WorkloadInfo,
        wire,
    },
};

/// Per-message deadline towards a proxy (zds.md).
const DEADLINE: Duration = Duration::from_secs(5);
/// How often pods without listeners are looked at again.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// A pod as the CNI plugin (or `redirect-user pod add`) describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub netns: PathBuf,
    #[serde(default)]
    pub dns_capture: bool,
}

impl PodSpec {
    fn info(&self) -> WorkloadInfo {
        WorkloadInfo {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }
}

/// Where a pod stands, as `pod list` and `status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum PodState {
    /// Redirected, no proxy has it yet: its connections are refused.
    WaitingForProxy,
    /// The proxy refused it (negative ack); it retries by itself.
    ProxyRefused(String),
    /// The proxy acked, its listeners are not found yet.
    FindingListeners,
    /// Redirected to the proxy's listeners.
    Ready,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodStatus {
    pub spec: PodSpec,
    pub state: PodState,
    pub proxy_pid: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("pod {uid}: {source}")]
    Netns {
        uid: String,
        source: crate::netns::NetnsError,
    },
    #[error(transparent)]
    Enrol(#[from] EnrolError),
    #[error("pod {0} is not known")]
    Unknown(String),
    #[error("state file {path}: {detail}")]
    State { path: PathBuf, detail: String },
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

struct Pod {
    spec: PodSpec,
    netns: Netns,
    state: PodState,
    proxy_pid: Option<i32>,
}

/// A request to one proxy connection, answered in order.
struct ConnRequest {
    req: Request,
    fd: Option<OwnedFd>,
    reply: oneshot::Sender<Result<codec::Response, String>>,
}

#[derive(Clone)]
struct Conn {
    id: u64,
    pid: i32,
    /// The proxy process, held from the moment it connected (its pid may be reused).
    peer: peer::Peer,
    tx: mpsc::Sender<ConnRequest>,
}

impl Conn {
    async fn call(&self, req: Request, fd: Option<OwnedFd>) -> Result<codec::Response, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ConnRequest { req, fd, reply })
            .await
            .map_err(|_| "the proxy connection is gone".to_string())?;
        rx.await
            .map_err(|_| "the proxy connection is gone".to_string())?
    }
}

struct Inner {
    engine: Arc<Engine>,
    state_file: PathBuf,
    pods: Mutex<BTreeMap<String, Pod>>,
    /// Connected proxies, newest last.
    conns: Mutex<Vec<Conn>>,
    next_conn: AtomicU64,
}

#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl Agent {
    /// Takes the pods of an earlier run back from `<state_dir>/pods.json`: still
    /// existing namespaces are enrolled again (idempotently), vanished ones let go.
    pub fn new(engine: Arc<Engine>, state_dir: &Path) -> Result<Self, AgentError> {
        std::fs::create_dir_all(state_dir).map_err(|e| AgentError::State {
            path: state_dir.into(),
            detail: e.to_string(),
        })?;
        let state_file = state_dir.join("pods.json");
        let agent = Self {
            inner: Arc::new(Inner {
                engine,
                state_file: state_file.clone(),
                pods: Mutex::new(BTreeMap::new()),
                conns: Mutex::new(Vec::new()),
                next_conn: AtomicU64::new(1),
            }),
        };
        let specs: Vec<PodSpec> = match std::fs::read(&state_file) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| AgentError::State {
                path: state_file.clone(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(AgentError::State {
                    path: state_file,
                    detail: e.to_string(),
                });
            }
        };
        for spec in specs {
            let uid = spec.uid.clone();
            match agent.enrol_locally(spec) {
                Ok(()) => info!(uid, "agent: pod taken back after a restart"),
                Err(e) => {
                    warn!(uid, error = %e, "agent: pod of an earlier run let go");
                    let _ = agent.inner.engine.unenrol(&uid);
                }
            }
        }
        // Pinned pods that no state names (the file was lost): nothing can serve them.
        let known: Vec<String> = agent.inner.pods.lock().unwrap().keys().cloned().collect();
        for p in agent.inner.engine.pods() {
            if !known.contains(&p.uid) {
                warn!(
                    uid = p.uid,
                    "agent: pinned pod without a spec, un-enrolling"
                );
                let _ = agent.inner.engine.unenrol(&p.uid);
            }
        }
        agent.persist();
        Ok(agent)
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    fn enrol_locally(&self, spec: PodSpec) -> Result<(), AgentError> {
        let netns = Netns::open(&spec.netns).map_err(|source| AgentError::Netns {
            uid: spec.uid.clone(),
            source,
        })?;
        let options = PodOptions {
            dns_capture: spec.dns_capture,
            interfaces: None,
        };
        self.inner
            .engine
            .enrol(&spec.uid, &netns, &options, &PodSockets::default())?;
        let uid = spec.uid.clone();
        self.inner.pods.lock().unwrap().insert(
            uid,
            Pod {
                spec,
                netns,
                state: PodState::WaitingForProxy,
                proxy_pid: None,
            },
        );
        Ok(())
    }

    fn persist(&self) {
        let specs: Vec<PodSpec> = self
            .inner
            .pods
            .lock()
            .unwrap()
            .values()
            .map(|p| p.spec.clone())
            .collect();
        let tmp = self.inner.state_file.with_extension("json.tmp");
        let r = serde_json::to_vec_pretty(&specs)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.inner.state_file));
        if let Err(e) = r {
            warn!(path = %self.inner.state_file.display(), error = %e, "agent: cannot save the pod list");
        }
    }

    /// Adds (or re-adds) a pod: redirected at once, then handed to the newest proxy.
    /// Returns where it stands once the proxy answered (or that none is connected).
    pub async fn add_pod(&self, spec: PodSpec) -> Result<PodState, AgentError> {
        let uid = spec.uid.clone();
        let same = {
            let pods = self.inner.pods.lock().unwrap();
            pods.get(&uid).is_some_and(|p| p.spec == spec)
        };
        if !same {
            self.enrol_locally(spec)?;
            self.persist();
        }
        let newest = self.inner.conns.lock().unwrap().last().cloned();
        match newest {
            Some(conn) => Ok(self.hand_to(&conn, &uid).await),
            None => Ok(self.state_of(&uid).unwrap_or(PodState::WaitingForProxy)),
        }
    }

    /// Un-enrols a pod and tells every proxy.
    pub async fn del_pod(&self, uid: &str) -> Result<(), AgentError> {
        let pod = self.inner.pods.lock().unwrap().remove(uid);
        let Some(_pod) = pod else {
            return Err(AgentError::Unknown(uid.into()));
        };
        self.persist();
        self.inner.engine.unenrol(uid)?;
        let conns: Vec<Conn> = self.inner.conns.lock().unwrap().clone();
        for c in conns {
            match c.call(Request::Del { uid: uid.into() }, None).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(
                    uid,
                    pid = c.pid,
                    reason = e,
                    "agent: proxy refused the delete"
                ),
                Err(e) => warn!(uid, pid = c.pid, error = e, "agent: delete not delivered"),
            }
        }
        info!(uid, "agent: pod removed");
        Ok(())
    }

    pub fn list(&self) -> Vec<PodStatus> {
        self.inner
            .pods
            .lock()
            .unwrap()
            .values()
            .map(|p| PodStatus {
                spec: p.spec.clone(),
                state: p.state.clone(),
                proxy_pid: p.proxy_pid,
            })
            .collect()
    }

    /// Pids of the connected proxies, oldest first.
    pub fn proxies(&self) -> Vec<i32> {
        self.inner
            .conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.pid)
            .collect()
    }

    fn state_of(&self, uid: &str) -> Option<PodState> {
        self.inner
            .pods
            .lock()
            .unwrap()
            .get(uid)
            .map(|p| p.state.clone())
    }

    fn set_state(&self, uid: &str, state: PodState, pid: Option<i32>) {
        if let Some(p) = self.inner.pods.lock().unwrap().get_mut(uid) {
            p.state = state;
            p.proxy_pid = pid;
        }
    }

    /// Sends one pod to a proxy; on its ack, installs its listeners.
    async fn hand_to(&self, conn: &Conn, uid: &str) -> PodState {
        let (req, fd) = {
            let pods = self.inner.pods.lock().unwrap();
            let Some(p) = pods.get(uid) else {
                return PodState::WaitingForProxy;
            };
            let fd = p.netns.as_fd().try_clone_to_owned().ok();
            (
                Request::Add {
                    uid: uid.into(),
                    info: p.spec.info(),
                },
                fd,
            )
        };
        let state = match conn.call(req, fd).await {
            Ok(Ok(())) => self.install_listeners(uid, &conn.peer),
            Ok(Err(reason)) => {
                warn!(
                    uid,
                    pid = conn.pid,
                    reason,
                    "agent: proxy refused the pod; it stays redirected and refused"
                );
                PodState::ProxyRefused(reason)
            }
            Err(e) => {
                warn!(
                    uid,
                    pid = conn.pid,
                    error = e,
                    "agent: pod not delivered to the proxy"
                );
                PodState::WaitingForProxy
            }
        };
        self.set_state(uid, state.clone(), Some(conn.pid));
        state
    }

    /// Finds the listeners the proxy opened in the pod and gives them to the engine.
    fn install_listeners(&self, uid: &str, proxy: &peer::Peer) -> PodState {
        let pid = proxy.pid;
        let found = {
            let pods = self.inner.pods.lock().unwrap();
            let Some(p) = pods.get(uid) else {
                return PodState::WaitingForProxy;
            };
            discover::find_listeners_of(pid, proxy.pidfd.as_fd(), &p.netns)
        };
        match found {
            Ok(f) if f.complete() => match self.inner.engine.set_sockets(uid, &f.sockets()) {
                Ok(()) => {
                    info!(
                        uid,
                        pid, "agent: pod ready, redirected to its proxy's listeners"
                    );
                    PodState::Ready
                }
                Err(e) => {
                    warn!(uid, pid, error = %e, "agent: listeners refused by the engine");
                    PodState::FindingListeners
                }
            },
            Ok(_) => PodState::FindingListeners,
            Err(e) => {
                warn!(uid, pid, error = %e, "agent: cannot look at the proxy's sockets");
                PodState::FindingListeners
            }
        }
    }

    /// Serves the node-agent socket until the task is dropped.
    pub async fn serve(&self, path: &Path) -> Result<(), AgentError> {
        let _ = std::fs::remove_file(path);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let mut listener =
            UnixSeqpacketListener::bind(path).map_err(|source| AgentError::Socket {
                path: path.into(),
                source,
            })?;
        info!(socket = %path.display(), "agent: serving the node-agent protocol");
        // Everything this serves stops with it: the reconciler and every connection.
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.clone().reconcile_loop());
        loop {
            let sock = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "agent: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                Some(_) = tasks.join_next() => continue,
            };
            tasks.spawn(self.clone().connection(sock));
        }
    }

    /// One proxy connection: hello, snapshot, then Adds and Dels as they come.
    async fn connection(self, sock: UnixSeqpacket) {
        let cred_pid = wire::peer_pid(&sock).unwrap_or(0);
        // The process itself, held from now on: a pid can be reused once it exits.
        let peer = match peer::Peer::of(&sock, cred_pid) {
            Ok(p) => p,
            Err(e) => {
                warn!(pid = cred_pid, error = %e, "agent: cannot identify the connecting process, closing");
                return;
            }
        };
        let pid = peer.pid;
        match tokio::time::timeout(DEADLINE, wire::recv(&sock)).await {
            Ok(Ok(Some(dg))) if codec::decode_hello(&dg.bytes).is_ok() && dg.fds.is_empty() => {}
            other => {
                warn!(pid, result = ?other.map(|r| r.map(|d| d.map(|d| d.bytes.len()))), "agent: bad hello, closing");
                return;
            }
        }
        info!(pid, "agent: proxy connected");
        // The proxy's own sockets (marked 0x539) must pass: trust its cgroup (one of its
        // own: never the root cgroup, which pods share) while it stays connected.
        let trust = if self.inner.engine.trusts_mark_alone() {
            // The mark alone passes (--trust-mark-only): no cgroup to make or trust.
            Ok(None)
        } else {
            peer::ProxyTrust::acquire(&self.inner.engine, &peer).map(Some)
        };
        let _trust = match trust {
            Ok(Some(t)) => {
                info!(
                    pid,
                    cgroup_id = t.cgroup_id,
                    "agent: proxy's cgroup trusted while it is connected"
                );
                Some(t)
            }
            Ok(None) => None,
            Err(e) => {
                warn!(
                    pid,
                    error = %e,
                    "agent: PROXY NOT TRUSTED, closing: its own upstream sockets would be steered back to it; give it a cgroup of its own (not the root cgroup)"
                );
                return;
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let conn = Conn {
            id: self.inner.next_conn.fetch_add(1, Ordering::Relaxed),
            pid,
            peer,
            tx,
        };
        let io = tokio::spawn(conn_io(sock, rx, pid));
        // Snapshot first, then the connection becomes the newest: Adds go to it.
        let uids: Vec<String> = self.inner.pods.lock().unwrap().keys().cloned().collect();
        for uid in uids {
            self.hand_to(&conn, &uid).await;
        }
        match conn.call(Request::SnapshotSent, None).await {
            Ok(Ok(())) => info!(pid, "agent: snapshot sent and acknowledged"),
            other => warn!(pid, result = ?other, "agent: snapshot not acknowledged"),
        }
        self.inner.conns.lock().unwrap().push(conn.clone());
        // Pods added while this snapshot was under way went to no proxy: hand them over.
        for uid in self.uids_in(|s| *s == PodState::WaitingForProxy) {
            self.hand_to(&conn, &uid).await;
        }
        let _ = io.await;
        self.inner.conns.lock().unwrap().retain(|c| c.id != conn.id);
        info!(
            pid,
            "agent: proxy disconnected; its pods stay redirected and refuse connections until a proxy takes them"
        );
        for p in self.inner.pods.lock().unwrap().values_mut() {
            if p.proxy_pid == Some(pid) {
                p.state = PodState::WaitingForProxy;
                p.proxy_pid = None;
            }
        }
    }

    /// Pods the newest proxy acked but whose listeners were not found yet, and pods
    /// whose proxy refused them (it retries by itself): look again.
    async fn reconcile_loop(self) {
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        loop {
            tick.tick().await;
            if let Err(e) = self.inner.engine.expire_carried_trust() {
                warn!(error = %e, "agent: cannot drop the trust of an earlier run");
            }
            let Some(newest) = self.inner.conns.lock().unwrap().last().cloned() else {
                continue;
            };
            // Never delivered (a race with a connection's snapshot, a lost answer): again.
            for uid in self.uids_in(|s| *s == PodState::WaitingForProxy) {
                self.hand_to(&newest, &uid).await;
            }
            let todo = self
                .uids_in(|s| matches!(s, PodState::FindingListeners | PodState::ProxyRefused(_)));
            for uid in todo {
                let state = self.install_listeners(&uid, &newest.peer);
                if state == PodState::Ready {
                    self.set_state(&uid, state, Some(newest.pid));
                }
            }
        }
    }

    fn uids_in(&self, state: impl Fn(&PodState) -> bool) -> Vec<String> {
        let pods = self.inner.pods.lock().unwrap();
        pods.iter()
            .filter(|(_, p)| state(&p.state))
            .map(|(u, _)| u.clone())
            .collect()
    }
}

/// The socket side of one connection: requests in order, one answer each within the
/// deadline; anything the proxy sends unasked, or a late answer, ends the connection.
async fn conn_io(sock: UnixSeqpacket, mut rx: mpsc::Receiver<ConnRequest>, pid: i32) {
    loop {
        tokio::select! {
            req = rx.recv() => {
                let Some(r) = req else { return };
                let sent = wire::send(&sock, &r.req.encode(), r.fd.as_ref().map(|f| f.as_fd())).await;
                let answer = match sent {
                    Err(e) => Err(format!("send: {e}")),
                    Ok(()) => match tokio::time::timeout(DEADLINE, wire::recv(&sock)).await {
                        Err(_) => Err("no answer within the deadline".to_string()),
                        Ok(Err(e)) => Err(format!("receive: {e}")),
                        Ok(Ok(None)) => Err("the proxy closed the connection".to_string()),
                        Ok(Ok(Some(dg))) if dg.truncated => Err("oversized answer".to_string()),
                        Ok(Ok(Some(dg))) => codec::decode_response(&dg.bytes).map_err(|e| e.to_string()),
                    },
                };
                let fatal = answer.is_err();
                let _ = r.reply.send(answer);
                if fatal {
                    warn!(pid, "agent: closing the connection to a proxy that did not answer properly");
                    return;
                }
            }
            got = wire::recv(&sock) => {
                match got {
                    Ok(Some(dg)) => warn!(pid, bytes = dg.bytes.len(), "agent: unexpected message from the proxy, closing"),
                    Ok(None) => {}
                    Err(e) => warn!(pid, error = %e, "agent: proxy connection failed"),
                }
                return;
            }
        }
    }
}
