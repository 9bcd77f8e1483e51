//! The redirection engine: loads the programs once, pins every map, program and link
//! under one bpffs directory, and enrols pods by writing maps and attaching the same
//! programs to each pod's namespace and interfaces.
//!
//! Pinned layout (default root `/sys/fs/bpf/redirect`):
//! ```text
//! maps/{pods,pod_addrs,listeners,flows,proxy_flows,proxy_cgroups,counters,pod_index,steered,
//!      host_flows,node_netns,AYA_LOGS}
//! progs/{redirect_lookup,redirect_egress,redirect_ingress,redirect_loopback,redirect_host_probes,
//!       redirect_guard}
//! links/<pod uid>          the pod's sk_lookup link
//! node/host_probes         sock_ops on the cgroup2 root: the node's probes (host_probes.rs)
//! node/guard               cgroup_skb egress on the cgroup2 root: pods' TCP only through
//!                          covered interfaces (guard.rs)
//! ```
//! A thread per engine watches the enrolled pods' namespaces (watch.rs).
//! The tc filters live in each pod namespace (priority 1, handle 0x539), where
//! `tc filter show dev eth0 egress` shows them.

mod check;
mod guard;
mod host_probes;
mod maps;
pub mod owner;
mod pod;
pub mod trust;
mod watch;

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    programs::{SchedClassifier, SkLookup},
};
pub use check::{KernelCheckError, check_kernel};
use maps::Maps;
pub use maps::{LayoutError, MapLayout};
pub use owner::OwnerError;
use owner::PinOwner;
use pod::PodState;
pub use pod::{EnrolOutcome, EnrolledPod, PodOptions, PodSockets};
use redirect_ebpf::{GuardCounters, MAX_PODS, MAX_PROXY_CGROUPS, PodCounters, names};
use tracing::{info, warn};
use trust::TrustTable;
pub use trust::{ProxyCgroup, TrustError, cgroup2_mount};

use crate::netns::NetnsError;

/// Where the engine pins its state unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/redirect";

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect-ebpf.o"));

/// Which sockets count as the proxy's own (parity rows 6 and 7): those marked 0x539 and
/// created by a process in one of these cgroups (cgroup v2 ids). The root of the cgroup2
/// hierarchy, which pods' apps share on hosts that sort nothing into cgroups, is never
/// trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyIdentity {
    /// The cgroup of this process (the proxy runs in-process). A process in the root
    /// cgroup is first moved into a cgroup of its own (`redirect-proxy-<pid>`); where that
    /// cannot be done, the engine refuses to start.
    OwnCgroup,
    /// These cgroups (for a proxy running elsewhere; proxies connecting to the agent are
    /// added while connected).
    Cgroups(Vec<u64>),
    /// Any socket carrying the mark, as the iptables rules do (row 7 not enforced).
    MarkOnly,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub pin_dir: PathBuf,
    pub proxy_identity: ProxyIdentity,
    /// Size of the pod maps (at most `MAX_PODS - 1`); applies when they are created.
    pub max_pods: u32,
    /// How long to wait for another engine owning the pin directory to exit before
    /// refusing to start.
    pub owner_wait: Duration,
}

/// Default of [`EngineConfig::owner_wait`].
pub const DEFAULT_OWNER_WAIT: Duration = Duration::from_secs(10);

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            pin_dir: DEFAULT_PIN_DIR.into(),
            proxy_identity: ProxyIdentity::OwnCgroup,
            max_pods: MAX_PODS - 1,
            owner_wait: DEFAULT_OWNER_WAIT,
        }
    }
}

impl EngineConfig {
    /// Defaults, pinned under `pin_dir`.
    pub fn at(pin_dir: impl Into<PathBuf>) -> Self {
        Self {
            pin_dir: pin_dir.into(),
            ..Self::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Kernel(#[from] KernelCheckError),
    #[error("cannot prepare the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0:?}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("pinning {what}: {source}")]
    Pin {
        what: String,
        source: aya::pin::PinError,
    },
    #[error("cannot find the proxy's cgroup: {0}")]
    Cgroup(String),
    #[error("the proxy's cgroup: {0}")]
    Trust(#[from] TrustError),
    #[error("proxy_cgroups is full ({max} cgroups trusted at once): cannot trust cgroup {id}")]
    TrustFull { id: u64, max: u32 },
    #[error(transparent)]
    Owner(#[from] OwnerError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("attaching {what}: {detail}")]
    Attach { what: String, detail: String },
    #[error("the node's namespace: {0}")]
    NodeNetns(String),
    #[error("cannot start the namespace watcher: {0}")]
    Watcher(String),
    #[error("this engine was closed: its pin directory may belong to another engine now")]
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("invalid pod uid {uid:?}: 1 to 63 bytes of [A-Za-z0-9._-]")]
    InvalidUid { uid: String },
    #[error("pod {uid} is not enrolled")]
    NotEnrolled { uid: String },
    #[error("the engine is full: {what} holds at most {max} entries")]
    Full { what: &'static str, max: u32 },
    #[error("pod {uid}: namespace: {source}")]
    Netns { uid: String, source: NetnsError },
    #[error("pod {uid}: {step}: {detail}")]
    Step {
        uid: String,
        step: &'static str,
        detail: String,
    },
    #[error("pod {uid}: socket for port {port}: {detail}")]
    BadSocket {
        uid: String,
        port: u16,
        detail: String,
    },
    #[error("pod {uid}: the engine was closed (its pin directory was given up)")]
    Closed { uid: String },
}

struct Inner {
    ebpf: Ebpf,
    maps: Maps,
    pods: BTreeMap<String, PodState>,
    trust: TrustTable,
    /// The root of the cgroup2 hierarchy, never trusted (None without cgroup v2).
    root_cgroup: Option<u64>,
    /// Held for the life of the engine: no other engine touches the pin directory.
    _owner: PinOwner,
}

/// The one owner of the engine's BPF state, in this process (a mutex) and across
/// processes (an exclusive lock on the pin directory).
pub struct Engine {
    pin_dir: PathBuf,
    inner: Arc<Mutex<Option<Inner>>>,
    /// Wakes the watcher thread (a byte: the pods changed); closing it ends the thread.
    wake: OwnedFd,
}

fn lock(inner: &Mutex<Option<Inner>>) -> MutexGuard<'_, Option<Inner>> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Checks the kernel, loads the programs (once), opens or creates the pinned maps
    /// and rebuilds the list of enrolled pods from them.
    pub fn open(config: EngineConfig) -> Result<Self, EngineError> {
        let pin_dir = config.pin_dir;
        check_kernel(&pin_dir)?;
        for sub in ["maps", "progs", "links"] {
            let p = pin_dir.join(sub);
            std::fs::create_dir_all(&p)
                .map_err(|source| EngineError::PinDir { path: p, source })?;
        }
        // Nothing pinned is read or written before this: one engine per pin directory.
        let owner = PinOwner::acquire(&pin_dir, config.owner_wait)?;
        let max_pods = config.max_pods.clamp(1, MAX_PODS - 1);
        maps::check_pinned(OBJECT, &pin_dir.join("maps"), max_pods)?;
        trust::remove_stale();
        let root_cgroup = trust::root_cgroup_id().ok();
        let base = base_identity(&config.proxy_identity, root_cgroup)?;

        let map_paths: Vec<(&str, PathBuf)> = names::ALL_MAPS
            .into_iter()
            .map(|n| (n, pin_dir.join("maps").join(n)))
            .collect();
        let mut loader = EbpfLoader::new();
        loader.verifier_log_level(VerifierLogLevel::DEBUG | VerifierLogLevel::STATS);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader.map_max_entries(names::PODS, max_pods);
        loader.map_max_entries(names::POD_INDEX, max_pods);
        let mut ebpf = loader.load(OBJECT)?;
        start_ebpf_logger(&mut ebpf);

        load_and_pin::<SkLookup>(&mut ebpf, names::PROG_SK_LOOKUP, &pin_dir)?;
        for name in [
            names::PROG_EGRESS,
            names::PROG_INGRESS,
            names::PROG_LOOPBACK,
        ] {
            load_and_pin::<SchedClassifier>(&mut ebpf, name, &pin_dir)?;
        }
        let mut maps = Maps::take(&mut ebpf, max_pods)?;
        // The node's namespace is this process's: its sockets' connections to pods are
        // probes. Entries of an earlier run (or of other namespaces) go.
        let own = pod::netns_cookie_here().map_err(|e| EngineError::NodeNetns(e.to_string()))?;
        let stale: Vec<u64> = maps.node_netns.keys().filter_map(Result::ok).collect();
        for c in stale.into_iter().filter(|c| *c != own) {
            maps.node_netns.remove(&c)?;
        }
        maps.node_netns.insert(own, 1, 0)?;
        host_probes::attach(&mut ebpf, &pin_dir)?;
        let mut trust = TrustTable::new(base);
        let pinned: Vec<u64> = maps.proxy_cgroups.keys().filter_map(Result::ok).collect();
        let (carried, dropped) =
            trust::carried_from_pinned(&pinned, root_cgroup, &trust::live_cgroup_ids());
        trust.carry(carried.clone(), Instant::now() + trust::CARRIED_TRUST_GRACE);
        sync_trust(&mut maps, &trust)?;
        info!(
            trusted = ?trust.wanted(),
            dropped = ?dropped,
            carried = ?carried,
            "redirect: proxy_cgroups reconciled"
        );
        let pods = pod::adopt_pinned(&maps);
        // Before the guard starts: pods of a version without it keep all their
        // interfaces open until they are taken back.
        pod::cover_legacy(&mut maps, &pods);
        guard::attach(&mut ebpf, &pin_dir)?;
        info!(pin_dir = %pin_dir.display(), pods = pods.len(), "redirect: engine ready");
        let inner = Arc::new(Mutex::new(Some(Inner {
            ebpf,
            maps,
            pods,
            trust,
            root_cgroup,
            _owner: owner,
        })));
        let (wake_rx, wake) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| EngineError::Watcher(e.to_string()))?;
        watch::spawn(Arc::downgrade(&inner), wake_rx)
            .map_err(|e| EngineError::Watcher(e.to_string()))?;
        Ok(Self {
            pin_dir,
            inner,
            wake,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Inner>> {
        lock(&self.inner)
    }

    /// Tells the watcher that the set of watched pods changed.
    fn wake_watcher(&self) {
        // SAFETY: writes one byte from a local; a full pipe already holds a wake-up.
        unsafe { libc::write(self.wake.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }

    /// Gives the pin directory up: the pinned state (pods, programs, links) stays in
    /// place, this engine refuses every later change, and another engine (a newer
    /// agent) can take the directory over at once.
    pub fn close(&self) {
        let closed = self.lock().take().is_some();
        self.wake_watcher();
        if closed {
            info!(pin_dir = %self.pin_dir.display(), "redirect: engine closed, pin directory given up");
        }
    }

    /// Removes everything the engine keeps in the kernel and on bpffs: every pod is
    /// un-enrolled (as [`Engine::unenrol`] does, so pods found pinned after a restart
    /// are undone only in the maps: un-enrol those with [`Engine::unenrol_in`] first),
    /// then the node's links (sock_ops, guard), the programs, the maps and the pin directory
    /// itself. The engine is closed afterwards. Returns the pods whose un-enrolment
    /// failed; with any, nothing else is removed.
    pub fn purge(&self) -> Result<Vec<(String, EnrolError)>, EngineError> {
        let failed: Vec<(String, EnrolError)> = self
            .pods()
            .into_iter()
            .filter_map(|p| self.unenrol(&p.uid).err().map(|e| (p.uid, e)))
            .collect();
        if !failed.is_empty() {
            return Ok(failed);
        }
        let inner = self.lock().take().ok_or(EngineError::Closed)?;
        // Unpinned, a link goes with its last reference: the sock_ops program and the
        // guard are detached from the cgroup2 root (no pod is left for the guard).
        for link in [
            host_probes::link_pin(&self.pin_dir),
            guard::link_pin(&self.pin_dir),
        ] {
            match std::fs::remove_file(&link) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(EngineError::PinDir { path: link, source }),
            }
        }
        // The programs and maps close with the loader's handles, the pins go with the
        // directory; the lock is given up last.
        let Inner {
            ebpf,
            maps,
            _owner: owner,
            ..
        } = inner;
        drop(maps);
        drop(ebpf);
        std::fs::remove_dir_all(&self.pin_dir).map_err(|source| EngineError::PinDir {
            path: self.pin_dir.clone(),
            source,
        })?;
        drop(owner);
        info!(pin_dir = %self.pin_dir.display(), "redirect: engine purged: pods released, programs detached, pinned state removed");
        Ok(Vec::new())
    }

    /// The cgroups this engine trusts for its whole life (its own proxy identity; 0
    /// for the mark alone). Empty once closed.
    pub fn base_trust(&self) -> Vec<u64> {
        self.lock()
            .as_ref()
            .map(|i| i.trust.base())
            .unwrap_or_default()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Enrols a pod: after this returns, every new connection of the pod goes to its
    /// proxy sockets (or is refused when they are missing). Enrolling the same pod
    /// (uid and namespace) again changes nothing but the sockets, if given; a new
    /// namespace for a known uid replaces the old enrolment. On error nothing of the
    /// pod is left in place.
    pub fn enrol(
        &self,
        uid: &str,
        netns: &crate::netns::Netns,
        options: &PodOptions,
        sockets: &PodSockets<'_>,
    ) -> Result<EnrolOutcome, EnrolError> {
        let mut guard = self.lock();
        let Some(Inner {
            ebpf, maps, pods, ..
        }) = guard.as_mut()
        else {
            return Err(EnrolError::Closed { uid: uid.into() });
        };
        let r = pod::enrol(
            ebpf,
            maps,
            pods,
            &self.pin_dir,
            uid,
            netns,
            options,
            sockets,
        );
        drop(guard);
        self.wake_watcher();
        r
    }

    /// Replaces the proxy sockets of an enrolled pod (for example after a proxy restart).
    pub fn set_sockets(&self, uid: &str, sockets: &PodSockets<'_>) -> Result<(), EnrolError> {
        let mut guard = self.lock();
        let Some(Inner { maps, pods, .. }) = guard.as_mut() else {
            return Err(EnrolError::Closed { uid: uid.into() });
        };
        let pod = pods
            .get(uid)
            .ok_or_else(|| EnrolError::NotEnrolled { uid: uid.into() })?;
        pod::set_sockets(maps, uid, pod.record.netns_cookie, sockets)
    }

    /// Undoes everything `enrol` did. Returns false if the pod was not enrolled. If a
    /// step fails, the pod is kept as releasing (`EnrolledPod::releasing`) with its
    /// pinned record naming what is left, and calling this again (or
    /// `finish_releases`) finishes the job.
    pub fn unenrol(&self, uid: &str) -> Result<bool, EnrolError> {
        self.unenrol_with(uid, None)
    }

    /// Like `unenrol`, given the pod's namespace: a pod found in pinned state (after a
    /// restart) is then undone inside its namespace too.
    pub fn unenrol_in(&self, uid: &str, netns: &crate::netns::Netns) -> Result<bool, EnrolError> {
        self.unenrol_with(uid, Some(netns))
    }

    fn unenrol_with(
        &self,
        uid: &str,
        netns: Option<&crate::netns::Netns>,
    ) -> Result<bool, EnrolError> {
        let mut guard = self.lock();
        let Some(Inner { maps, pods, .. }) = guard.as_mut() else {
            return Err(EnrolError::Closed { uid: uid.into() });
        };
        let Some(state) = pods.get_mut(uid) else {
            return Ok(false);
        };
        // Forgotten only once everything is undone.
        pod::unenrol(maps, &self.pin_dir, uid, state, netns)?;
        pods.remove(uid);
        Ok(true)
    }

    /// Tries again every un-enrolment that failed half-way; returns those that failed
    /// again (they stay releasing).
    /// Pins again the sk_lookup links whose pins are gone (a pin removed by hand, the
    /// bpffs unmounted and mounted again): the links stay attached while this process
    /// holds them, and the pins keep them after it. Returns the uids whose link could
    /// not be pinned, with why.
    pub fn restore_pins(&self) -> Vec<(String, String)> {
        let guard = self.lock();
        let Some(inner) = guard.as_ref() else {
            return Vec::new();
        };
        // A map whose pin was removed lives on in this process and its programs, but an
        // agent started next would make a new, empty one: its programs would then run
        // with no record of the pods until each is enrolled again, and pass their
        // traffic meanwhile. Pinned again here, the next run takes over the same map.
        let held = inner.maps.by_name();
        let maps = names::ALL_MAPS.into_iter().filter_map(|name| {
            let path = self.pin_dir.join("maps").join(name);
            if path.exists() {
                return None;
            }
            let pinned = match held.iter().find(|(n, _)| *n == name) {
                Some((_, data)) => data.pin(&path),
                None => inner.ebpf.map(name)?.pin(&path),
            };
            match pinned {
                Ok(()) => {
                    info!(map = name, "redirect: map pinned again");
                    None
                }
                Err(e) => Some((format!("map {name}"), e.to_string())),
            }
        });
        let links = inner.pods.iter().filter_map(|(uid, s)| {
            pod::restore_pin(&self.pin_dir, uid, s)
                .err()
                .map(|e| (format!("link of {uid}"), e))
        });
        maps.chain(links).collect()
    }

    pub fn finish_releases(&self) -> Vec<(String, EnrolError)> {
        let releasing: Vec<String> = {
            let guard = self.lock();
            let Some(inner) = guard.as_ref() else {
                return Vec::new();
            };
            inner
                .pods
                .iter()
                .filter(|(_, s)| s.releasing())
                .map(|(uid, _)| uid.clone())
                .collect()
        };
        releasing
            .into_iter()
            .filter_map(|uid| self.unenrol(&uid).err().map(|e| (uid, e)))
            .collect()
    }

    pub fn pods(&self) -> Vec<EnrolledPod> {
        let guard = self.lock();
        let Some(inner) = guard.as_ref() else {
            return Vec::new();
        };
        inner.pods.iter().map(|(uid, s)| s.describe(uid)).collect()
    }

    /// The proxy sockets the engine holds for a pod: (port, is UDP, socket cookie).
    pub fn sockets(&self, uid: &str) -> Result<Vec<(u16, bool, u64)>, EnrolError> {
        let guard = self.lock();
        let Some(inner) = guard.as_ref() else {
            return Err(EnrolError::Closed { uid: uid.into() });
        };
        let pod = inner
            .pods
            .get(uid)
            .ok_or_else(|| EnrolError::NotEnrolled { uid: uid.into() })?;
        let netns = pod.record.netns_cookie;
        let mut out = Vec::new();
        for (port, proto) in pod::SOCKET_SLOTS {
            let key = redirect_ebpf::ListenerKey {
                netns,
                port,
                proto: proto as u16,
                _pad: 0,
            };
            if let Ok(Some(cookie)) = inner.maps.listener_cookie(&key) {
                out.push((port, proto == redirect_ebpf::IPPROTO_UDP, cookie));
            }
        }
        Ok(out)
    }

    /// The pod's counters, summed over CPUs.
    pub fn counters(&self, uid: &str) -> Result<PodCounters, EnrolError> {
        let guard = self.lock();
        let Some(inner) = guard.as_ref() else {
            return Err(EnrolError::Closed { uid: uid.into() });
        };
        let pod = inner
            .pods
            .get(uid)
            .ok_or_else(|| EnrolError::NotEnrolled { uid: uid.into() })?;
        inner
            .maps
            .read_counters(pod.record.id)
            .map_err(|e| EnrolError::Step {
                uid: uid.into(),
                step: "read counters",
                detail: e.to_string(),
            })
    }

    /// The guard's counters for a pod: what it dropped leaving through interfaces
    /// without our tc programs, connections whose SYN tc never took, and steered SYNs
    /// that our missing rule or route would have let the kernel forward.
    pub fn guard_counters(&self, uid: &str) -> Result<GuardCounters, EnrolError> {
        let guard = self.lock();
        let Some(inner) = guard.as_ref() else {
            return Err(EnrolError::Closed { uid: uid.into() });
        };
        let pod = inner
            .pods
            .get(uid)
            .ok_or_else(|| EnrolError::NotEnrolled { uid: uid.into() })?;
        inner
            .maps
            .read_guard_counters(pod.record.id)
            .map_err(|e| EnrolError::Step {
                uid: uid.into(),
                step: "read counters",
                detail: e.to_string(),
            })
    }

    /// Counters of events no pod could be charged with (slot 0), such as TCP to an
    /// address that is no pod's (`dropped_unknown_dst`).
    pub fn node_counters(&self) -> Result<PodCounters, EngineError> {
        let guard = self.lock();
        let inner = guard.as_ref().ok_or(EngineError::Closed)?;
        Ok(inner.maps.read_counters(0)?)
    }

    /// Trusts 0x539-marked sockets of this cgroup as the proxy's while one more proxy
    /// holds it; undone by [`Engine::untrust_proxy_cgroup`]. The root of the cgroup2
    /// hierarchy (shared by every process no one put elsewhere) is refused.
    pub fn trust_proxy_cgroup(&self, cgroup_id: u64) -> Result<(), EngineError> {
        let mut guard = self.lock();
        let inner = guard.as_mut().ok_or(EngineError::Closed)?;
        if cgroup_id == 0 || Some(cgroup_id) == inner.root_cgroup {
            return Err(TrustError::Shared { id: cgroup_id }.into());
        }
        inner.trust.add(cgroup_id);
        expire_carried(inner);
        if let Err(e) = sync_trust(&mut inner.maps, &inner.trust) {
            inner.trust.remove(cgroup_id);
            return Err(e);
        }
        info!(
            cgroup_id,
            proxies = inner.trust.count(cgroup_id),
            "redirect: proxy cgroup trusted"
        );
        Ok(())
    }

    /// Treats the sockets of another namespace as the node's own too: their connections
    /// to enrolled pods reach the apps, as the kubelet's probes do. For nodes simulated
    /// in a namespace (tests, demos); the engine's own namespace always counts.
    pub fn add_node_netns(&self, netns: &crate::netns::Netns) -> Result<(), EngineError> {
        let cookie = netns
            .run(pod::netns_cookie_here)
            .map_err(|e| EngineError::NodeNetns(e.to_string()))?
            .map_err(|e| EngineError::NodeNetns(e.to_string()))?;
        let mut guard = self.lock();
        let inner = guard.as_mut().ok_or(EngineError::Closed)?;
        inner.maps.node_netns.insert(cookie, 1, 0)?;
        Ok(())
    }

    /// One proxy of this cgroup less (it disconnected); the cgroup stops being trusted
    /// when no proxy holds it and it is not the engine's own. False if none was counted.
    pub fn untrust_proxy_cgroup(&self, cgroup_id: u64) -> Result<bool, EngineError> {
        let mut guard = self.lock();
        let inner = guard.as_mut().ok_or(EngineError::Closed)?;
        if !inner.trust.remove(cgroup_id) {
            return Ok(false);
        }
        expire_carried(inner);
        sync_trust(&mut inner.maps, &inner.trust)?;
        let still = inner.trust.wanted().contains(&cgroup_id);
        info!(
            cgroup_id,
            proxies = inner.trust.count(cgroup_id),
            still_trusted = still,
            "redirect: proxy cgroup released"
        );
        Ok(true)
    }

    /// Stops trusting the cgroups found pinned from an earlier run that no proxy
    /// claimed within [`trust::CARRIED_TRUST_GRACE`]. Cheap; call it now and then (the
    /// agent does every second).
    pub fn expire_carried_trust(&self) -> Result<(), EngineError> {
        let mut guard = self.lock();
        let inner = guard.as_mut().ok_or(EngineError::Closed)?;
        if expire_carried(inner) {
            sync_trust(&mut inner.maps, &inner.trust)?;
        }
        Ok(())
    }

    /// True if any socket carrying the mark passes (ProxyIdentity::MarkOnly).
    pub fn trusts_mark_alone(&self) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|i| i.trust.wanted().contains(&0))
    }

    /// The cgroup ids trusted now, as the pinned map holds them.
    pub fn trusted_cgroups(&self) -> Result<Vec<u64>, EngineError> {
        let guard = self.lock();
        let inner = guard.as_ref().ok_or(EngineError::Closed)?;
        Ok(inner
            .maps
            .proxy_cgroups
            .keys()
            .filter_map(Result::ok)
            .collect())
    }
}

/// Drops carried entries whose grace is over. True if any was dropped.
fn expire_carried(inner: &mut Inner) -> bool {
    let gone = inner.trust.expire(Instant::now());
    if !gone.is_empty() {
        info!(cgroups = ?gone, "redirect: cgroups of an earlier run no longer trusted (no proxy claimed them)");
    }
    !gone.is_empty()
}

/// Makes `proxy_cgroups` hold exactly what `trust` wants.
fn sync_trust(maps: &mut Maps, trust: &TrustTable) -> Result<(), EngineError> {
    let wanted = trust.wanted();
    let present: Vec<u64> = maps.proxy_cgroups.keys().filter_map(Result::ok).collect();
    for id in present.iter().filter(|id| !wanted.contains(id)) {
        maps.proxy_cgroups.remove(id)?;
    }
    for id in wanted.iter().filter(|id| !present.contains(id)) {
        maps.proxy_cgroups.insert(*id, 1, 0).map_err(|e| match &e {
            aya::maps::MapError::SyscallError(s)
                if s.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                EngineError::TrustFull {
                    id: *id,
                    max: MAX_PROXY_CGROUPS,
                }
            }
            _ => EngineError::Map(e),
        })?;
    }
    Ok(())
}

fn load_and_pin<P>(ebpf: &mut Ebpf, name: &'static str, pin_dir: &Path) -> Result<(), EngineError>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    P: LoadPin,
{
    let prog = ebpf.program_mut(name).ok_or(EngineError::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    let p: &mut P = prog
        .try_into()
        .map_err(|source| EngineError::Program { name, source })?;
    p.load_it()
        .map_err(|source| EngineError::Program { name, source })?;
    let path = pin_dir.join("progs").join(name);
    // A pin from an earlier run names the program that run loaded; ours replaces it.
    let _ = std::fs::remove_file(&path);
    p.pin_it(&path).map_err(|source| EngineError::Pin {
        what: path.display().to_string(),
        source,
    })
}

/// `load` and `pin` of the two program types used, behind one name.
trait LoadPin {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError>;
    fn pin_it(&mut self, path: &Path) -> Result<(), aya::pin::PinError>;
}

impl LoadPin for SkLookup {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
    fn pin_it(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
        self.pin(path)
    }
}

impl LoadPin for SchedClassifier {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
    fn pin_it(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
        self.pin(path)
    }
}

/// The cgroups this engine trusts for its whole life (0: the mark alone).
fn base_identity(
    identity: &ProxyIdentity,
    root_cgroup: Option<u64>,
) -> Result<Vec<u64>, EngineError> {
    match identity {
        ProxyIdentity::OwnCgroup => match trust::proxy_cgroup(None, None) {
            Ok(cg) => Ok(vec![cg.id]),
            Err(TrustError::NoCgroup2) => Err(EngineError::Cgroup(
                "no cgroup2 filesystem is mounted, so the proxy's sockets cannot be told from an app's that sets SO_MARK 0x539 (parity row 7); mount one (mount -t cgroup2 none /sys/fs/cgroup), or choose ProxyIdentity::MarkOnly (--trust-mark-only) to trust the mark alone".into(),
            )),
            Err(e) => Err(EngineError::Cgroup(format!(
                "this process (the proxy) needs a cgroup of its own, not shared with pods, and none could be made: {e}; run it in a cgroup of its own, or choose ProxyIdentity::MarkOnly (--trust-mark-only) to trust the mark alone"
            ))),
        },
        ProxyIdentity::Cgroups(ids) => {
            if let Some(id) = ids.iter().find(|id| **id == 0 || Some(**id) == root_cgroup) {
                return Err(TrustError::Shared { id: *id }.into());
            }
            Ok(ids.clone())
        }
        ProxyIdentity::MarkOnly => {
            trust::warn_mark_only("ProxyIdentity::MarkOnly");
            Ok(vec![0])
        }
    }
}

/// The cgroup v2 id (the inode of its directory) of this process.
pub fn own_cgroup_id() -> Result<u64, EngineError> {
    cgroup_id_of_pid("self")
}

/// The cgroup v2 id of a process (`"self"` or a pid).
pub fn cgroup_id_of_pid(pid: &str) -> Result<u64, EngineError> {
    Ok(trust::cgroup_id(&trust::cgroup_dir_of(pid)?)?)
}

/// Drains the programs' aya-log ring buffer into `tracing` on a background thread.
fn start_ebpf_logger(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(mut logger) => {
            std::thread::Builder::new()
                .name("ebpf-log".into())
                .spawn(move || {
                    use std::os::fd::AsRawFd;
                    loop {
                        let mut pfd = libc::pollfd {
                            fd: logger.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd.
                        unsafe { libc::poll(&mut pfd, 1, 1000) };
                        logger.flush();
                    }
                })
                .ok();
        }
        Err(e) => warn!(error = %e, "redirect: eBPF logs unavailable"),
    }
}
