//! The pods of this node and every namespace, watched from the Kubernetes API into local
//! stores (kube-rs watchers and reflector stores), and the reconciler that makes the
//! agent's pods follow them.
//!
//! - Membership ([`Membership`] for [`KubeWatch`]): answered from the stores; a pod not
//!   there yet is waited for (bounded), then refused.
//! - Reconcile: wanted = the pods of this node selected by [`select`]. Wanted pods the
//!   agent does not have and that already run are enrolled with the namespace found
//!   through /proc ([`procfs`]); pods the agent has that are not wanted are released.
//!   When Kubernetes mode is on, the agent's pods ARE this node's Kubernetes pods:
//!   anything else (a pod added by hand whose uid is no pod of this node) is released
//!   after the first full sync.
//! - The stores change only at whole events; a relist (dropped watch, 410 Gone) fills a
//!   buffer that replaces the store at its end, so nothing is released from a
//!   half-listed state. Nothing is released before both stores first synced.
//! - Status written back: annotation `ambient.istio.io/redirection` (`pending`, then
//!   `enabled`, removed on release) with a merge patch on `pods/status`, only when it
//!   differs from what the store shows.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    procfs,
    select::{NotInMesh, SelectConfig, select},
};
use crate::{
    agent::{Agent, PodSpec, PodState},
    membership::{CniPod, DecideFuture, Decision, Membership, MembershipError},
};

/// The annotation the control plane reads.
pub const REDIRECTION: &str = "ambient.istio.io/redirection";
/// How often the reconciler looks again without an event (proxy acks, /proc retries).
const TICK: Duration = Duration::from_millis(500);
/// A patch that did not show in the store is sent again after this long.
const PATCH_AGAIN: Duration = Duration::from_secs(5);
/// /proc is scanned again for the same missing pods at most this often (a pod whose
/// namespace is not found would otherwise cost a full scan every tick).
const SCAN_AGAIN: Duration = Duration::from_secs(2);

/// What the watcher needs.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// A kubeconfig file; `None`: the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// This node: only its pods are watched (`spec.nodeName`).
    pub node_name: String,
    pub select: SelectConfig,
    /// Where the host's /proc is (`/host/proc` in a DaemonSet).
    pub proc_root: PathBuf,
    /// Enrolled pods have their DNS captured (the proxy opens its DNS listeners).
    pub dns_capture: bool,
}

/// What the watch knows of its own health (for readiness and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KubeStatus {
    pub pods_synced: bool,
    pub namespaces_synced: bool,
    /// Full lists done (the first one included) of pods and namespaces.
    pub lists: u64,
    /// Pods of this node in the store.
    pub pods: usize,
}

struct Shared {
    cfg: KubeConfig,
    client: Client,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    pods_synced: AtomicBool,
    namespaces_synced: AtomicBool,
    lists: AtomicU64,
    /// Bumped after every event applied to a store.
    changed: watch::Sender<u64>,
}

/// The Kubernetes side of the agent: stores, membership, reconciler. Its tasks stop
/// when it is dropped.
pub struct KubeWatch {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for KubeWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A client for `cfg`: its kubeconfig file, or the in-cluster service account.
pub async fn client(cfg: &KubeConfig) -> anyhow::Result<Client> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("k8s: reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("k8s: kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context("k8s: in-cluster configuration")?,
    };
    Client::try_from(config).context("k8s: building the API client")
}

impl KubeWatch {
    /// Starts the watches (inside a tokio runtime); with an agent, the reconciler too.
    pub async fn start(cfg: KubeConfig, agent: Option<Agent>) -> anyhow::Result<Arc<KubeWatch>> {
        anyhow::ensure!(!cfg.node_name.is_empty(), "k8s: the node name is empty");
        let client = client(&cfg).await?;
        let (pods, pods_writer) = reflector::store::<Pod>();
        let (namespaces, ns_writer) = reflector::store::<Namespace>();
        let (changed, _) = watch::channel(0);
        let node = cfg.node_name.clone();
        let shared = Arc::new(Shared {
            cfg,
            client: client.clone(),
            pods,
            namespaces,
            pods_synced: AtomicBool::new(false),
            namespaces_synced: AtomicBool::new(false),
            lists: AtomicU64::new(0),
            changed,
        });
        info!(node, "k8s: watching this node's pods and every namespace");
        let mut tasks = Vec::new();
        let pod_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        tasks.push(
            tokio::spawn(feed(
                "pods",
                Api::<Pod>::all(client.clone()),
                pod_cfg,
                pods_writer,
                shared.clone(),
                |s| &s.pods_synced,
            ))
            .abort_handle(),
        );
        tasks.push(
            tokio::spawn(feed(
                "namespaces",
                Api::<Namespace>::all(client),
                watcher::Config::default(),
                ns_writer,
                shared.clone(),
                |s| &s.namespaces_synced,
            ))
            .abort_handle(),
        );
        if let Some(agent) = agent {
            tasks.push(tokio::spawn(Reconciler::new(shared.clone(), agent).run()).abort_handle());
        }
        Ok(Arc::new(KubeWatch { shared, tasks }))
    }

    /// Both stores listed at least once.
    pub fn synced(&self) -> bool {
        self.shared.synced()
    }

    pub fn status(&self) -> KubeStatus {
        let s = &self.shared;
        KubeStatus {
            pods_synced: s.pods_synced.load(Ordering::Relaxed),
            namespaces_synced: s.namespaces_synced.load(Ordering::Relaxed),
            lists: s.lists.load(Ordering::Relaxed),
            pods: s.pods.len(),
        }
    }
}

impl Shared {
    fn synced(&self) -> bool {
        self.pods_synced.load(Ordering::Acquire) && self.namespaces_synced.load(Ordering::Acquire)
    }

    fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(&ObjectRef::new(name))
    }

    /// The rule for a pod of the store.
    fn select(&self, pod: &Pod) -> Result<(), NotInMesh> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        select(pod, self.namespace(ns).as_deref(), &self.cfg.select)
    }
}

/// Applies one watcher's events to its store until the task is aborted; the kube
/// watcher relists (after a backoff) when the watch fails or its version expired.
async fn feed<K>(
    kind: &'static str,
    api: Api<K>,
    cfg: watcher::Config,
    mut writer: reflector::store::Writer<K>,
    shared: Arc<Shared>,
    synced: fn(&Shared) -> &AtomicBool,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(ev) => {
                writer.apply_watcher_event(&ev);
                match ev {
                    watcher::Event::Init => debug!(kind, "k8s: listing"),
                    watcher::Event::InitDone => {
                        shared.lists.fetch_add(1, Ordering::Relaxed);
                        if !synced(&shared).swap(true, Ordering::AcqRel) {
                            info!(kind, "k8s: synced");
                        } else {
                            info!(kind, "k8s: listed again");
                        }
                    }
                    _ => {}
                }
                shared.changed.send_modify(|g| *g += 1);
            }
            Err(e) => warn!(kind, error = %e, "k8s: watch failed; listing again after a backoff"),
        }
    }
    warn!(kind, "k8s: watch stream ended");
}

impl Membership for KubeWatch {
    fn decide<'a>(&'a self, pod: &'a CniPod, wait: Duration) -> DecideFuture<'a> {
        Box::pin(async move {
            let s = &self.shared;
            let deadline = tokio::time::Instant::now() + wait;
            let mut changed = s.changed.subscribe();
            let key = ObjectRef::<Pod>::new(&pod.name).within(&pod.namespace);
            loop {
                changed.borrow_and_update();
                let synced = s.synced();
                if synced {
                    // Another pod of the same name (a StatefulSet's earlier one) is not it.
                    let found = s.pods.get(&key).filter(|p| {
                        pod.uid.is_empty() || p.metadata.uid.as_deref() == Some(pod.uid.as_str())
                    });
                    if let Some(p) = found
                        && let Some(ns) = s.namespace(&pod.namespace)
                    {
                        return Ok(decision(&p, Some(&ns), &s.cfg));
                    }
                }
                let woke = tokio::time::timeout_at(deadline, changed.changed()).await;
                if !matches!(woke, Ok(Ok(()))) {
                    return Err(if synced {
                        MembershipError::NotSeen {
                            namespace: pod.namespace.clone(),
                            name: pod.name.clone(),
                            waited: wait,
                        }
                    } else {
                        MembershipError::Unavailable("API not synced".into())
                    });
                }
            }
        })
    }
}

fn decision(pod: &Pod, ns: Option<&Namespace>, cfg: &KubeConfig) -> Decision {
    match select(pod, ns, &cfg.select) {
        Ok(()) => Decision::InMesh {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            service_account: service_account(pod),
            dns_capture: cfg.dns_capture,
        },
        Err(why) => Decision::NotInMesh(why.to_string()),
    }
}

fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(st) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = st
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = st.pod_ip.as_deref().and_then(|s| s.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips
}

fn annotation(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REDIRECTION))
        .map(String::as_str)
}

/// Makes the agent's pods follow the stores.
struct Reconciler {
    shared: Arc<Shared>,
    agent: Agent,
    /// Last patch sent per pod uid: the value (None: removal) and when.
    patched: BTreeMap<String, (Option<&'static str>, Instant)>,
    /// Last reason a wanted pod could not be enrolled (logged when it changes).
    not_found: BTreeMap<String, String>,
    /// The pods the last /proc scan looked for, and when.
    last_scan: Option<(BTreeSet<String>, Instant)>,
}

impl Reconciler {
    fn new(shared: Arc<Shared>, agent: Agent) -> Self {
        Self {
            shared,
            agent,
            patched: BTreeMap::new(),
            not_found: BTreeMap::new(),
            last_scan: None,
        }
    }

    async fn run(mut self) {
        let mut changed = self.shared.changed.subscribe();
        let mut first = true;
        loop {
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                () = tokio::time::sleep(TICK) => {}
            }
            if !self.shared.synced() {
                continue;
            }
            if first {
                info!("k8s: first sync done; the agent's pods now follow the API");
                first = false;
            }
            self.once().await;
        }
    }

    async fn once(&mut self) {
        // The agent's pods first, the stores after: a pod the CNI enrolled was decided
        // from the store before, so it is in the store read below unless it is gone.
        let have: BTreeMap<String, PodState> = self
            .agent
            .list()
            .into_iter()
            .map(|p| (p.spec.uid, p.state))
            .collect();
        let pods = self.shared.pods.state();
        let mut wanted: BTreeMap<String, Arc<Pod>> = BTreeMap::new();
        let mut why_not: BTreeMap<String, String> = BTreeMap::new();
        // Pods whose namespace the namespace watch has not shown yet (it may lag the
        // pod watch): neither enrolled nor released until it has.
        let mut undecided: BTreeSet<String> = BTreeSet::new();
        for p in &pods {
            let Some(uid) = p.metadata.uid.clone() else {
                continue;
            };
            let ns = p.metadata.namespace.as_deref().unwrap_or_default();
            if self.shared.namespace(ns).is_none() {
                undecided.insert(uid);
                continue;
            }
            match self.shared.select(p) {
                Ok(()) => {
                    wanted.insert(uid, p.clone());
                }
                Err(why) => {
                    why_not.insert(uid, why.to_string());
                }
            }
        }

        for (uid, state) in &have {
            if wanted.contains_key(uid)
                || undecided.contains(uid)
                || matches!(state, PodState::Releasing(_))
            {
                continue;
            }
            let why = why_not
                .get(uid)
                .map(String::as_str)
                .unwrap_or("no pod of this node has this uid");
            info!(uid, reason = why, "k8s: releasing pod");
            if let Err(e) = self.agent.del_pod(uid).await {
                warn!(uid, error = %e, "k8s: release incomplete; the agent retries it");
            }
        }

        let missing: Vec<Arc<Pod>> = wanted
            .iter()
            .filter(|(uid, _)| !have.contains_key(*uid))
            .map(|(_, p)| p.clone())
            .collect();
        if !missing.is_empty() {
            self.enrol_running(missing).await;
        }
        self.not_found.retain(|uid, _| wanted.contains_key(uid));

        let states: BTreeMap<String, PodState> = self
            .agent
            .list()
            .into_iter()
            .map(|p| (p.spec.uid, p.state))
            .collect();
        for p in &pods {
            let Some(uid) = p
                .metadata
                .uid
                .as_deref()
                .filter(|u| !undecided.contains(*u))
            else {
                continue;
            };
            let want = match (wanted.contains_key(uid), states.get(uid)) {
                (true, Some(PodState::Ready)) => Some("enabled"),
                (true, Some(PodState::Releasing(_))) | (_, None) | (false, _) => None,
                (true, Some(_)) => Some("pending"),
            };
            self.annotate(p, uid, want).await;
        }
        let live: BTreeSet<&str> = pods
            .iter()
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        self.patched.retain(|uid, _| live.contains(uid.as_str()));
    }

    /// Enrols running pods found through /proc.
    async fn enrol_running(&mut self, pods: Vec<Arc<Pod>>) {
        let with_ips: Vec<(Arc<Pod>, Vec<IpAddr>)> = pods
            .into_iter()
            .map(|p| {
                let ips = pod_ips(&p);
                (p, ips)
            })
            .filter(|(_, ips)| !ips.is_empty())
            .collect();
        if with_ips.is_empty() {
            return;
        }
        let root = self.shared.cfg.proc_root.clone();
        let uids: BTreeSet<String> = with_ips
            .iter()
            .filter_map(|(p, _)| p.metadata.uid.clone())
            .collect();
        let todo: Vec<(String, Vec<IpAddr>)> = with_ips
            .iter()
            .filter_map(|(p, ips)| Some((p.metadata.uid.clone()?, ips.clone())))
            .collect();
        if let Some((last, at)) = &self.last_scan
            && *last == uids
            && at.elapsed() < SCAN_AGAIN
        {
            return;
        }
        self.last_scan = Some((uids.clone(), Instant::now()));
        let found = tokio::task::spawn_blocking(move || {
            let scan = procfs::scan(&root, &uids)?;
            Ok::<_, std::io::Error>(
                todo.into_iter()
                    .map(|(uid, ips)| {
                        let c = scan.get(&uid).map(Vec::as_slice).unwrap_or_default();
                        let r = procfs::choose(&root, c, &ips, procfs::netns_holds);
                        (uid, r)
                    })
                    .collect::<BTreeMap<_, _>>(),
            )
        })
        .await;
        let found = match found {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                warn!(proc_root = %self.shared.cfg.proc_root.display(), error = %e, "k8s: cannot scan /proc");
                return;
            }
            Err(e) => {
                warn!(error = %e, "k8s: the /proc scan failed");
                return;
            }
        };
        for (pod, _) in with_ips {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            let netns = match found.get(&uid) {
                Some(Ok(path)) => path.clone(),
                Some(Err(e)) => {
                    let msg = e.to_string();
                    if self.not_found.get(&uid) != Some(&msg) {
                        warn!(
                            uid,
                            pod = pod_name(&pod),
                            reason = msg,
                            "k8s: running pod's namespace not found; looking again"
                        );
                        self.not_found.insert(uid, msg);
                    }
                    continue;
                }
                None => continue,
            };
            let spec = PodSpec {
                uid: uid.clone(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                service_account: service_account(&pod),
                netns: netns.clone(),
                dns_capture: self.shared.cfg.dns_capture,
            };
            info!(uid, pod = pod_name(&pod), netns = %netns.display(), "k8s: enrolling running pod");
            self.not_found.remove(&uid);
            if let Err(e) = self.agent.add_pod(spec).await {
                warn!(uid, error = %e, "k8s: enrolment failed; tried again");
            }
        }
    }

    /// Sets the redirection annotation to `want` (None: removed) if the store shows
    /// otherwise and it was not just sent.
    async fn annotate(&mut self, pod: &Pod, uid: &str, want: Option<&'static str>) {
        if annotation(pod) == want {
            return;
        }
        if let Some((sent, at)) = self.patched.get(uid)
            && *sent == want
            && at.elapsed() < PATCH_AGAIN
        {
            return;
        }
        let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            return;
        };
        let patch = serde_json::json!({"metadata": {"annotations": {REDIRECTION: want}}});
        let api = Api::<Pod>::namespaced(self.shared.client.clone(), ns);
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(
                    uid,
                    pod = pod_name(pod),
                    value = want.unwrap_or("(removed)"),
                    "k8s: redirection annotation set"
                );
            }
            // Tried again once PATCH_AGAIN passed.
            Err(e) => {
                warn!(uid, pod = pod_name(pod), error = %e, "k8s: cannot patch the pod's status")
            }
        }
        self.patched.insert(uid.to_string(), (want, Instant::now()));
    }
}

fn pod_name(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}
