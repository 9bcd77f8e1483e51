//! The proxy side of the node-agent protocol: connects to the agent's socket, receives
//! pod namespaces, opens each pod's listeners there and serves them (the bare relay for
//! now), following [`ProxyState`]'s decisions. Reconnects with exponential backoff; pod
//! proxies keep running while the agent is away; failed pods are retried.
//!
//! A removed pod (Del, left out of a snapshot, replaced by a new namespace) has its
//! listeners closed before the answer; its connections drain in the background for the
//! grace period (default 5 s, upstream's), then are cancelled, so nothing of the pod
//! (sockets, its namespace fd) outlives it by more than that.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redirect_ebpf::PROXY_MARK;
use tokio::{
    sync::{Notify, mpsc::UnboundedSender},
    task::JoinSet,
};
use tokio_seqpacket::UnixSeqpacket;
use tracing::{info, warn};

use super::{
    codec::{self, Request},
    proto::WorkloadInfo,
    proxy_state::{AddPlan, NetnsId, ProxyState},
    wire,
};
use crate::{
    netns::Netns,
    proxy::{
        PodListeners,
        drain::DEFAULT_GRACE,
        identity::Identity,
        mesh::Mesh,
        metrics::{Peer, ProxyMetrics, UNKNOWN},
        registry::{Protocol, Transport, Workload},
        relay::{AcceptEvent, Relay},
    },
};

const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
const RETRY_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The agent's socket (default /var/run/ztunnel/ztunnel.sock).
    pub socket: PathBuf,
    /// Open the DNS listeners (15053) in every pod.
    pub dns: bool,
    /// Where accepted connections are reported (tests, demo).
    pub events: Option<UnboundedSender<AcceptEvent>>,
    /// The mesh data path (HBONE); `None` serves pods with the bare relay.
    pub mesh: Option<Arc<Mesh>>,
}

/// What the command running a proxy can do to it from outside its task: detach it
/// from its agent for good (a handover: the agent socket's path is the successor's
/// now). Its open connections are counted in its metrics
/// ([`ProxyMetrics::open_connections`]).
#[derive(Debug, Default)]
pub struct ProxyHandle {
    detached: AtomicBool,
    wake: Notify,
}

impl ProxyHandle {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Never connects to the agent socket again; the pods served go on being served
    /// (their listeners open, their connections running) until the task ends.
    pub fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// A pod whose listeners could not start yet.
struct Pending {
    netns: Netns,
    info: WorkloadInfo,
}

pub struct InpodProxy {
    cfg: ProxyConfig,
    state: ProxyState,
    /// The relay of each pod served: it holds the pod's namespace and listeners.
    running: HashMap<String, Relay>,
    pending: HashMap<String, Pending>,
    /// Removed pods whose connections are draining.
    draining: JoinSet<()>,
    grace: Duration,
    metrics: Option<Arc<ProxyMetrics>>,
    handle: Arc<ProxyHandle>,
}

impl InpodProxy {
    pub fn new(cfg: ProxyConfig) -> Self {
        info!("inpod_enabled: true");
        info!("inpod_uds: {}", cfg.socket.display());
        info!("inpod_port_reuse: true");
        info!("inpod_mark: {PROXY_MARK}");
        Self {
            cfg,
            state: ProxyState::new(),
            running: HashMap::new(),
            pending: HashMap::new(),
            draining: JoinSet::new(),
            grace: DEFAULT_GRACE,
            metrics: None,
            handle: ProxyHandle::new(),
        }
    }

    /// Controlled through `h` (see [`ProxyHandle`]).
    pub fn with_handle(mut self, h: Arc<ProxyHandle>) -> Self {
        self.handle = h;
        self
    }

    /// Counts connections and bytes of every pod, and the proxy's own state, in `m`.
    pub fn with_metrics(mut self, m: Arc<ProxyMetrics>) -> Self {
        self.metrics = Some(m);
        self
    }

    /// Pods served and pending, readiness: into the metrics.
    fn observe(&self, ready: Option<bool>) {
        if let Some(m) = &self.metrics {
            m.active_pods.set(self.running.len() as i64);
            m.pending_pods.set(self.pending.len() as i64);
            if let Some(r) = ready {
                m.set_ready(r);
            }
        }
    }

    /// How long a removed pod's connections may go on before they are cancelled.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Closes a removed pod's listeners now and drains its connections in the
    /// background.
    async fn remove(&mut self, uid: &str, relay: Relay) {
        let draining = relay.close().await;
        while let Some(r) = self.draining.try_join_next() {
            if let Err(e) = r {
                warn!(error = %e, "inpod: a drain task failed");
            }
        }
        let grace = self.grace;
        info!(
            uid,
            grace_ms = grace.as_millis() as u64,
            "inpod: pod removed, draining its connections"
        );
        self.draining.spawn(async move {
            draining.finish(grace).await;
        });
    }

    /// Runs until the task is dropped: connect, serve, reconnect; once detached, only
    /// serve.
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_START;
        loop {
            if self.handle.detached.load(Ordering::SeqCst) {
                return self.serve_detached().await;
            }
            match UnixSeqpacket::connect(&self.cfg.socket).await {
                Ok(sock) => {
                    backoff = BACKOFF_START;
                    info!(socket = %self.cfg.socket.display(), "handling new stream");
                    if let Err(e) = self.serve(&sock).await {
                        warn!(error = %e, "inpod: connection to the node agent ended");
                    }
                    self.state.disconnected();
                    self.observe(Some(false));
                }
                Err(e) => {
                    tracing::debug!(error = %e, ?backoff, "inpod: node agent not reachable");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.handle.wake.notified() => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Detached from the agent: the pods' listeners and connections go on until the
    /// task is dropped.
    async fn serve_detached(self) {
        info!(
            pods = self.running.len(),
            "inpod: detached from the node agent (handed over); serving the pods' connections until stopped"
        );
        self.observe(Some(false));
        std::future::pending::<()>().await
    }

    async fn serve(&mut self, sock: &UnixSeqpacket) -> std::io::Result<()> {
        self.state.connected();
        wire::send(sock, &codec::encode_hello(), None).await?;
        let mut retry = tokio::time::interval(RETRY_EVERY);
        loop {
            tokio::select! {
                got = wire::recv(sock) => {
                    let Some(dg) = got? else { return Ok(()) };
                    let (answer, snapshot) = self.handle(dg).await;
                    self.observe(snapshot.then_some(true));
                    if let Err(reason) = &answer {
                        warn!(reason, "inpod: negative ack");
                    }
                    wire::send(sock, &codec::encode_response(&answer), None).await?;
                }
                _ = retry.tick() => {
                    self.retry_pending().await;
                    self.observe(None);
                }
            }
        }
    }

    /// One message in, one answer out; and whether it completed a snapshot.
    async fn handle(&mut self, dg: wire::Datagram) -> (codec::Response, bool) {
        let snapshot = !dg.truncated
            && matches!(
                Request::decode(&dg.bytes, dg.fds.len()),
                Ok(Request::SnapshotSent)
            );
        let answer = self.handle_request(dg).await;
        let done = snapshot && answer.is_ok();
        (answer, done)
    }

    async fn handle_request(&mut self, dg: wire::Datagram) -> codec::Response {
        if dg.truncated {
            return Err(format!("message over {} bytes", codec::MAX_MESSAGE));
        }
        let nfds = dg.fds.len();
        let req = Request::decode(&dg.bytes, nfds).map_err(|e| e.to_string())?;
        match req {
            Request::Add { uid, info } => {
                let fd = dg.fds.into_iter().next().expect("checked: one fd");
                let netns = Netns::from_fd(fd).map_err(|e| format!("add {uid}: {e}"))?;
                self.add(uid, info, netns).await
            }
            Request::Keep { uid } => self.state.on_keep(&uid).map_err(|e| e.to_string()),
            Request::Del { uid } => {
                info!("pod WorkloadUid({uid:?}) delete request, draining proxy");
                self.state.on_del(&uid);
                self.pending.remove(&uid);
                self.forget(&uid);
                match self.running.remove(&uid) {
                    Some(relay) => self.remove(&uid, relay).await,
                    None => warn!(uid, "inpod: delete of a pod this proxy does not serve"),
                }
                Ok(())
            }
            Request::SnapshotSent => {
                info!("pod received snapshot sent");
                let drain = self.state.on_snapshot_sent().map_err(|e| e.to_string())?;
                for uid in drain {
                    info!(uid, "inpod: draining a pod the snapshot did not name");
                    self.pending.remove(&uid);
                    self.forget(&uid);
                    if let Some(relay) = self.running.remove(&uid) {
                        self.remove(&uid, relay).await;
                    }
                }
                Ok(())
            }
        }
    }

    async fn add(&mut self, uid: String, info: WorkloadInfo, netns: Netns) -> codec::Response {
        let id: NetnsId = (netns.dev(), netns.ino());
        match self.state.on_add(&uid, id).map_err(|e| e.to_string())? {
            AddPlan::AlreadyRunning => return Ok(()),
            AddPlan::Replace => {
                if let Some(old) = self.running.remove(&uid) {
                    info!(
                        uid,
                        "inpod: new namespace for a served pod, replacing its proxy"
                    );
                    self.remove(&uid, old).await;
                }
            }
            AddPlan::Start => {}
        }
        info!("pod WorkloadUid({uid:?}) received netns, starting proxy");
        self.start(uid, info, netns)
    }

    fn start(&mut self, uid: String, info: WorkloadInfo, netns: Netns) -> codec::Response {
        let id = (netns.dev(), netns.ino());
        let started = PodListeners::open(&netns, self.cfg.dns)
            .map_err(|e| e.to_string())
            .and_then(|l| {
                let ns = netns.try_clone().map_err(|e| e.to_string())?;
                let events = self.cfg.events.clone();
                let metrics = self.metrics.as_ref().map(|m| {
                    let principal = match &self.cfg.mesh {
                        Some(mesh) => {
                            let sa = if info.service_account.is_empty() {
                                "default"
                            } else {
                                &info.service_account
                            };
                            Identity::new(mesh.tls.trust_domain(), &info.namespace, sa).to_string()
                        }
                        None => UNKNOWN.to_string(),
                    };
                    m.pod(Peer {
                        workload: info.name.clone(),
                        namespace: info.namespace.clone(),
                        principal,
                    })
                });
                match &self.cfg.mesh {
                    None => Relay::start_with(&uid, ns, l, events, None, metrics)
                        .map_err(|e| e.to_string()),
                    Some(mesh) => {
                        let workload = local_workload(&uid, &info, &netns)?;
                        let pod = mesh
                            .pod_with_metrics(
                                workload,
                                netns.try_clone().map_err(|e| e.to_string())?,
                                metrics.clone(),
                            )
                            .map_err(|e| format!("mesh: {e}"))?;
                        Relay::start_with(&uid, ns, l, events, Some(pod), metrics)
                            .map_err(|e| e.to_string())
                    }
                }
            });
        match started {
            Ok(relay) => {
                self.pending.remove(&uid);
                self.state.started(&uid, id, info);
                self.running.insert(uid, relay);
                Ok(())
            }
            Err(reason) => {
                let reason = format!("pod {uid}: cannot start its listeners: {reason}");
                self.state.failed(&uid, id, info.clone(), reason.clone());
                self.pending.insert(uid, Pending { netns, info });
                Err(reason)
            }
        }
    }

    fn forget(&self, uid: &str) {
        if let Some(mesh) = &self.cfg.mesh {
            mesh.forget(uid);
        }
    }

    async fn retry_pending(&mut self) {
        let uids: Vec<String> = self.pending.keys().cloned().collect();
        for uid in uids {
            let Some(p) = self.pending.remove(&uid) else {
                continue;
            };
            match self.start(uid.clone(), p.info, p.netns) {
                Ok(()) => info!(uid, "inpod: pod proxy started on retry"),
                Err(e) => tracing::debug!(uid, error = e, "inpod: retry failed"),
            }
        }
    }
}

/// An enrolled pod as the registry knows it: its identity from the agent, its addresses
/// read from its namespace.
fn local_workload(uid: &str, info: &WorkloadInfo, netns: &Netns) -> Result<Workload, String> {
    let addrs = netns
        .run(|| crate::netlink::Netlink::open().and_then(|mut nl| nl.addresses()))
        .map_err(|e| format!("reading the pod's addresses: {e}"))?
        .map_err(|e| format!("reading the pod's addresses: {e}"))?;
    let ips = addrs
        .into_iter()
        .map(|(_, ip)| ip)
        .filter(|ip| {
            !ip.is_loopback()
                && !matches!(ip, std::net::IpAddr::V6(v6) if v6.is_unicast_link_local())
        })
        .collect();
    Ok(Workload {
        uid: uid.into(),
        name: info.name.clone(),
        namespace: info.namespace.clone(),
        service_account: info.service_account.clone(),
        trust_domain: None,
        ips,
        protocol: Protocol::Hbone,
        transport: Transport::Tcp,
        node: String::new(),
        services: Vec::new(),
        local: true,
    })
}
