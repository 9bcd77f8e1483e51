//! The node agent: knows the enrolled pods, keeps their redirection in place with the
//! engine, and hands their namespaces to whichever proxy connects over the node-agent
//! protocol (zds.md). After a proxy acknowledges a pod, the agent finds the listeners
//! that proxy opened in the pod and gives them to the engine.
//!
//! A pod is redirected (failing closed) from the moment it is added, before any proxy
//! has it: it is reported `ready` only once a proxy acked it and its listeners are in
//! place. The pod list is kept in `<state_dir>/pods.json` so that a restarted agent takes
//! its pods back (the redirection itself never went away: it is pinned).
//!
//! A pod is removed in this order: every proxy is told, the redirection is undone, and
//! only then is the removal saved. An un-enrolment that fails half-way leaves the pod
//! `releasing` (saved as such) and retried until it completes, after a restart too.
//!
//! Engine calls (setns, netlink, bpf syscalls), listener discovery and state file
//! writes run off the async runtime (`spawn_blocking`), so that a slow enrolment never
//! stalls the protocol, the control socket or other pods.

pub mod control;
pub mod discover;
pub mod handover;
pub mod metrics;
pub mod peer;

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
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
/// Un-enrolments that failed half-way are tried again every this many reconcile ticks.
const RELEASE_RETRY_TICKS: u64 = 2;

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
    /// Removal asked for; its un-enrolment has not completed yet (it failed half-way:
    /// the detail says why) and is retried.
    Releasing(String),
}

impl PodState {
    fn releasing(&self) -> bool {
        matches!(self, PodState::Releasing(_))
    }
}

/// A pod as `pods.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedPod {
    #[serde(flatten)]
    spec: PodSpec,
    /// Its removal was asked for and has not completed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    releasing: bool,
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
    #[error(
        "this agent handed the node over to a newer one (or to an uninstall) and changes nothing any more"
    )]
    HandedOver,
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
    /// Held while the state file is written (from a snapshot taken under it, so that
    /// the last write is always of the newest state).
    writing: Mutex<()>,
    /// Held across an enrolment or un-enrolment with the engine and the check that
    /// goes with it, so that a retried removal never undoes a pod added again meanwhile.
    lifecycle: Mutex<()>,
    pods: Mutex<BTreeMap<String, Pod>>,
    /// Connected proxies, newest last.
    conns: Mutex<Vec<Conn>>,
    next_conn: AtomicU64,
    metrics: metrics::AgentMetrics,
    /// Set once the agent handed the node over ([`Agent::hand_over`]): it changes
    /// nothing any more (pods, the state file, the engine).
    closed: AtomicBool,
    /// Where handover requests go (the command running the agent listens), if anywhere.
    handovers: Mutex<Option<mpsc::Sender<handover::Call>>>,
    /// Pods taken back from an earlier run that no proxy of this run has answered for
    /// yet: the agent is not ready while any is left (an upgrade's old proxy still
    /// serves them).
    adopted: Mutex<BTreeSet<String>>,
    /// The agent this one took the node over from still runs (its proxy serves the
    /// pods not yet on ours).
    predecessor_serving: AtomicBool,
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
                writing: Mutex::new(()),
                lifecycle: Mutex::new(()),
                pods: Mutex::new(BTreeMap::new()),
                conns: Mutex::new(Vec::new()),
                next_conn: AtomicU64::new(1),
                metrics: metrics::AgentMetrics::default(),
                closed: AtomicBool::new(false),
                handovers: Mutex::new(None),
                adopted: Mutex::new(BTreeSet::new()),
                predecessor_serving: AtomicBool::new(false),
            }),
        };
        let saved: Vec<SavedPod> = match std::fs::read(&state_file) {
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
        for SavedPod { spec, releasing } in saved {
            let uid = spec.uid.clone();
            if releasing {
                agent.release_after_restart(spec);
                continue;
            }
            let netns = Netns::open(&spec.netns).map_err(|source| AgentError::Netns {
                uid: uid.clone(),
                source,
            });
            match netns.and_then(|netns| agent.enrol_locally(spec, netns)) {
                Ok(()) => {
                    info!(uid, "agent: pod taken back after a restart");
                    agent.inner.adopted.lock().unwrap().insert(uid);
                }
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
        agent.persist_now();
        Ok(agent)
    }

    /// A pod whose removal had not completed when the agent stopped: finish it, in its
    /// namespace if it still exists; kept as releasing if it fails again.
    fn release_after_restart(&self, spec: PodSpec) {
        let uid = spec.uid.clone();
        let engine = &self.inner.engine;
        let Ok(netns) = Netns::open(&spec.netns) else {
            // The namespace is gone, and what was in it with it.
            match engine.unenrol(&uid) {
                Ok(_) => info!(uid, "agent: removal of a pod completed after a restart"),
                Err(e) => {
                    warn!(uid, error = %e, "agent: removal still incomplete; the engine retries it")
                }
            }
            return;
        };
        match engine.unenrol_in(&uid, &netns) {
            Ok(_) => info!(uid, "agent: removal of a pod completed after a restart"),
            Err(e) => {
                warn!(uid, error = %e, "agent: removal still incomplete; retried");
                self.inner.pods.lock().unwrap().insert(
                    uid,
                    Pod {
                        spec,
                        netns,
                        state: PodState::Releasing(e.to_string()),
                        proxy_pid: None,
                    },
                );
            }
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    /// What the agent counts (enrolment durations, CNI requests).
    pub fn metrics(&self) -> &metrics::AgentMetrics {
        &self.inner.metrics
    }

    /// Enrols a pod with the engine and records it. Blocking: call it off the runtime.
    fn enrol_locally(&self, spec: PodSpec, netns: Netns) -> Result<(), AgentError> {
        let options = PodOptions {
            dns_capture: spec.dns_capture,
            interfaces: None,
        };
        let _lifecycle = self.inner.lifecycle.lock().unwrap();
        if self.handed_over() {
            return Err(AgentError::HandedOver);
        }
        let start = std::time::Instant::now();
        self.inner
            .engine
            .enrol(&spec.uid, &netns, &options, &PodSockets::default())?;
        self.inner
            .metrics
            .enrol_seconds
            .observe(start.elapsed().as_secs_f64());
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

    /// Saves the pod list, off the runtime.
    async fn persist(&self) {
        let agent = self.clone();
        blocking(move || agent.persist_now()).await
    }

    /// Saves the pod list: written to a temporary file, synced, renamed over the old one,
    /// so that a crash leaves either list whole.
    fn persist_now(&self) {
        self.persist_with(None)
    }

    /// Saves the pod list, with `adding` in it (in place of the pod of that uid).
    fn persist_with(&self, adding: Option<&PodSpec>) {
        let _writing = self.inner.writing.lock().unwrap();
        // The state file is the successor's now.
        if !self.handed_over() {
            self.write_state(adding);
        }
    }

    /// Writes the state file, with `adding` in it; the caller holds `writing`.
    fn write_state(&self, adding: Option<&PodSpec>) {
        let mut saved: Vec<SavedPod> = self
            .inner
            .pods
            .lock()
            .unwrap()
            .values()
            .filter(|p| adding.is_none_or(|a| a.uid != p.spec.uid))
            .map(|p| SavedPod {
                spec: p.spec.clone(),
                releasing: p.state.releasing(),
            })
            .collect();
        if let Some(spec) = adding {
            saved.push(SavedPod {
                spec: spec.clone(),
                releasing: false,
            });
        }
        let path = &self.inner.state_file;
        let tmp = path.with_extension("json.tmp");
        let r = serde_json::to_vec_pretty(&saved)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                use std::io::Write as _;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&b)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            warn!(path = %path.display(), error = %e, "agent: cannot save the pod list");
        }
    }

    /// Adds (or re-adds) a pod: redirected at once, then handed to the newest proxy.
    /// Returns where it stands once the proxy answered (or that none is connected).
    pub async fn add_pod(&self, spec: PodSpec) -> Result<PodState, AgentError> {
        if self.handed_over() {
            return Err(AgentError::HandedOver);
        }
        let uid = spec.uid.clone();
        let same = {
            let pods = self.inner.pods.lock().unwrap();
            pods.get(&uid)
                .is_some_and(|p| p.spec == spec && !p.state.releasing())
        };
        if !same {
            let agent = self.clone();
            blocking(move || {
                // Opening the path can block too (a namespace on a stuck filesystem).
                let netns = Netns::open(&spec.netns).map_err(|source| AgentError::Netns {
                    uid: spec.uid.clone(),
                    source,
                })?;
                // Saved before the engine changes anything: an agent killed during the
                // enrolment takes the pod back after its restart (in its namespace),
                // where one that never saved it could not undo the part in place.
                agent.persist_with(Some(&spec));
                let r = agent.enrol_locally(spec, netns);
                if r.is_err() {
                    agent.persist_now();
                }
                r
            })
            .await?;
            self.persist().await;
        }
        let newest = self.inner.conns.lock().unwrap().last().cloned();
        match newest {
            Some(conn) => Ok(self.hand_to(&conn, &uid).await),
            None => Ok(self.state_of(&uid).unwrap_or(PodState::WaitingForProxy)),
        }
    }

    /// Removes a pod: tells every proxy, undoes its redirection, and only then saves
    /// the removal. If the un-enrolment fails half-way the pod stays, `Releasing`, and
    /// is retried (the error is returned).
    pub async fn del_pod(&self, uid: &str) -> Result<(), AgentError> {
        if self.handed_over() {
            return Err(AgentError::HandedOver);
        }
        let first = {
            let mut pods = self.inner.pods.lock().unwrap();
            let Some(p) = pods.get_mut(uid) else {
                return Err(AgentError::Unknown(uid.into()));
            };
            let first = !p.state.releasing();
            p.state = PodState::Releasing("removal under way".into());
            p.proxy_pid = None;
            first
        };
        if first {
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
        }
        self.release(uid).await
    }

    /// Removes every pod, each as [`Agent::del_pod`] does (an uninstall). Returns the
    /// pods whose removal did not complete.
    pub async fn release_all(&self) -> Vec<(String, AgentError)> {
        let uids: Vec<String> = self.inner.pods.lock().unwrap().keys().cloned().collect();
        let mut failed = Vec::new();
        for uid in uids {
            if let Err(e) = self.del_pod(&uid).await {
                failed.push((uid, e));
            }
        }
        failed
    }

    /// Un-enrols a releasing pod (off the runtime); forgets it and saves that only once
    /// the un-enrolment completed.
    async fn release(&self, uid: &str) -> Result<(), AgentError> {
        let agent = self.clone();
        let owned_uid = uid.to_string();
        let result = blocking(move || {
            let uid = owned_uid;
            let _lifecycle = agent.inner.lifecycle.lock().unwrap();
            if agent.handed_over() {
                return Err(EnrolError::Closed { uid });
            }
            let netns = {
                let pods = agent.inner.pods.lock().unwrap();
                match pods.get(&uid) {
                    // Added again meanwhile (or already removed): not ours to undo.
                    Some(p) if p.state.releasing() => p.netns.try_clone().ok(),
                    _ => return Ok(false),
                }
            };
            let engine = &agent.inner.engine;
            let r = match &netns {
                Some(ns) => engine.unenrol_in(&uid, ns),
                None => engine.unenrol(&uid),
            };
            let mut pods = agent.inner.pods.lock().unwrap();
            match r {
                Ok(_) => {
                    pods.remove(&uid);
                    Ok(true)
                }
                Err(e) => {
                    if let Some(p) = pods.get_mut(&uid) {
                        p.state = PodState::Releasing(e.to_string());
                    }
                    Err(e)
                }
            }
        })
        .await;
        self.persist().await;
        match result {
            Ok(true) => {
                info!(uid, "agent: pod removed");
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => {
                warn!(uid, error = %e, "agent: pod removal incomplete; it stays releasing and is retried");
                Err(e.into())
            }
        }
    }

    /// Retries the removals that failed half-way, the agent's and the engine's own.
    async fn retry_releases(&self) {
        for uid in self.uids_in(PodState::releasing) {
            let _ = self.release(&uid).await;
        }
        let engine = self.inner.engine.clone();
        for (uid, e) in blocking(move || engine.finish_releases()).await {
            warn!(uid, error = %e, "agent: un-enrolment still incomplete; retried");
        }
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
        // A pod being removed stays so, whatever a proxy answered meanwhile.
        if let Some(p) = self.inner.pods.lock().unwrap().get_mut(uid)
            && !p.state.releasing()
        {
            if matches!(state, PodState::Ready | PodState::ProxyRefused(_)) {
                self.inner.adopted.lock().unwrap().remove(uid);
            }
            p.state = state;
            p.proxy_pid = pid;
        }
    }

    /// Pods taken back from an earlier run that no proxy of this run has answered for
    /// yet (while any is left, an upgrade's old proxy may still be serving them).
    pub fn takeover_pending(&self) -> usize {
        let pods = self.inner.pods.lock().unwrap();
        let mut adopted = self.inner.adopted.lock().unwrap();
        adopted.retain(|uid| pods.get(uid).is_some_and(|p| !p.state.releasing()));
        adopted.len()
    }

    /// Whether the agent this one took over from still runs ([`handover`]).
    pub fn set_predecessor_serving(&self, serving: bool) {
        self.inner
            .predecessor_serving
            .store(serving, Ordering::SeqCst);
    }

    /// A takeover under way: the predecessor's proxy still serves some pods. That proxy
    /// never hears of a pod added now (it is connected to no agent any more) and would
    /// relay its pods' connections to the new pod as to a destination outside the mesh,
    /// so new pods wait until every pod is on this agent's proxy.
    pub fn taking_over(&self) -> bool {
        self.inner.predecessor_serving.load(Ordering::SeqCst) && self.takeover_pending() > 0
    }

    /// True once the agent handed the node over: it changes nothing any more.
    pub fn handed_over(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// From now on, handover requests (`redirect-user` of a newer agent, or an
    /// uninstall, on the control socket) arrive here. Without a receiver they are
    /// refused.
    pub fn accept_handovers(&self) -> mpsc::Receiver<handover::Call> {
        let (tx, rx) = mpsc::channel(4);
        *self.inner.handovers.lock().unwrap() = Some(tx);
        rx
    }

    /// Asks the command running this agent to hand the node over; its answer.
    pub async fn request_handover(&self, by: String) -> Result<handover::HandoverInfo, String> {
        let tx = self.inner.handovers.lock().unwrap().clone();
        let Some(tx) = tx else {
            return Err(
                "this agent does not hand over (it is not run by `run` or `node-agent`)".into(),
            );
        };
        let (reply, rx) = oneshot::channel();
        tx.send(handover::Call { by, reply })
            .await
            .map_err(|_| "this agent is no longer taking handover requests".to_string())?;
        rx.await
            .map_err(|_| "the handover was abandoned".to_string())?
    }

    /// Lets go of everything shared with a successor: waits for an enrolment or a
    /// removal under way, saves the pod list one last time, then stops changing
    /// anything (pods, the state file) and closes the engine, which gives the pin
    /// directory up. The pods stay redirected; their sockets in the engine stay until
    /// the successor replaces them. Blocking: call it off the runtime. Returns the
    /// cgroups this process's proxy is trusted by (the successor keeps trusting them
    /// while this process lives, for its connections in flight).
    pub fn hand_over(&self) -> Vec<u64> {
        let _lifecycle = self.inner.lifecycle.lock().unwrap();
        {
            let _writing = self.inner.writing.lock().unwrap();
            if !self.inner.closed.swap(true, Ordering::SeqCst) {
                self.write_state(None);
            }
        }
        let trusted = self.inner.engine.base_trust();
        self.inner.engine.close();
        trusted
    }

    /// Sends one pod to a proxy; on its ack, installs its listeners.
    async fn hand_to(&self, conn: &Conn, uid: &str) -> PodState {
        match self.deliver(conn, uid).await {
            Ok(()) => self.install_from(conn, uid).await,
            Err(state) => {
                self.set_state(uid, state.clone(), Some(conn.pid));
                state
            }
        }
    }

    /// Installs the listeners `conn`'s proxy opened for a pod it acked, and records where
    /// the pod stands.
    async fn install_from(&self, conn: &Conn, uid: &str) -> PodState {
        let state = self.install_listeners(uid, &conn.peer).await;
        self.set_state(uid, state.clone(), Some(conn.pid));
        state
    }

    /// Sends one pod to a proxy and waits for its ack; installs nothing. `Err` is the
    /// state the pod is left in when the proxy refused it or the Add did not get through.
    async fn deliver(&self, conn: &Conn, uid: &str) -> Result<(), PodState> {
        let (req, fd) = {
            let pods = self.inner.pods.lock().unwrap();
            let Some(p) = pods.get(uid).filter(|p| !p.state.releasing()) else {
                return Err(PodState::WaitingForProxy);
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
        match conn.call(req, fd).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => {
                warn!(
                    uid,
                    pid = conn.pid,
                    reason,
                    "agent: proxy refused the pod; it stays redirected and refused"
                );
                Err(PodState::ProxyRefused(reason))
            }
            Err(e) => {
                warn!(
                    uid,
                    pid = conn.pid,
                    error = e,
                    "agent: pod not delivered to the proxy"
                );
                Err(PodState::WaitingForProxy)
            }
        }
    }

    /// Finds the listeners the proxy opened in the pod and gives them to the engine.
    async fn install_listeners(&self, uid: &str, proxy: &peer::Peer) -> PodState {
        let agent = self.clone();
        let uid = uid.to_string();
        let proxy = proxy.clone();
        blocking(move || agent.install_listeners_now(&uid, &proxy)).await
    }

    /// `install_listeners`, blocking: the scan of the proxy's sockets runs without the
    /// pods lock.
    fn install_listeners_now(&self, uid: &str, proxy: &peer::Peer) -> PodState {
        let pid = proxy.pid;
        let netns = {
            let pods = self.inner.pods.lock().unwrap();
            let Some(p) = pods.get(uid) else {
                return PodState::WaitingForProxy;
            };
            p.netns.try_clone()
        };
        let found = netns.and_then(|ns| discover::find_listeners_of(pid, proxy.pidfd.as_fd(), &ns));
        match found {
            Ok(f) if f.complete() => {
                let _lifecycle = self.inner.lifecycle.lock().unwrap();
                let releasing = self
                    .inner
                    .pods
                    .lock()
                    .unwrap()
                    .get(uid)
                    .is_none_or(|p| p.state.releasing());
                if releasing {
                    return PodState::WaitingForProxy;
                }
                match self.inner.engine.set_sockets(uid, &f.sockets()) {
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
                }
            }
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
        // No listener of this proxy is installed before the whole snapshot is acked: a
        // proxy serving one pod must know every other pod of the node already, or it
        // takes a connection to one it has not heard of yet for a destination outside
        // the mesh (plaintext). Until then the pods stay on the sockets they have (a
        // predecessor's proxy, in an upgrade).
        let mut acked = Vec::new();
        for uid in self.uids_in(|s| !s.releasing()) {
            match self.deliver(&conn, &uid).await {
                Ok(()) => acked.push(uid),
                Err(state) => self.set_state(&uid, state, Some(pid)),
            }
        }
        match conn.call(Request::SnapshotSent, None).await {
            Ok(Ok(())) => info!(
                pid,
                pods = acked.len(),
                "agent: snapshot sent and acknowledged"
            ),
            other => warn!(pid, result = ?other, "agent: snapshot not acknowledged"),
        }
        for uid in acked {
            self.install_from(&conn, &uid).await;
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
            if p.proxy_pid == Some(pid) && !p.state.releasing() {
                p.state = PodState::WaitingForProxy;
                p.proxy_pid = None;
            }
        }
    }

    /// Pods the newest proxy acked but whose listeners were not found yet, and pods
    /// whose proxy refused them (it retries by itself): look again.
    async fn reconcile_loop(self) {
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        for n in 1u64.. {
            tick.tick().await;
            if n % RELEASE_RETRY_TICKS == 0 {
                self.retry_releases().await;
            }
            for (what, e) in self.inner.engine.restore_pins() {
                warn!(what, error = e, "agent: cannot pin again");
            }
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
                let state = self.install_listeners(&uid, &newest.peer).await;
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

/// Runs blocking work (setns, netlink, bpf syscalls, /proc scans, file writes) on
/// tokio's blocking pool, so that it never holds a runtime thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("agent: blocking task cancelled: {e}"),
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
