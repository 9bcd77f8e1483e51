//! The redirection engine: loads the programs once, pins every map, program and link
//! under one bpffs directory, and enrols pods by writing maps and attaching the same
//! programs to each pod's namespace and interfaces.
//!
//! Pinned layout (default root `/sys/fs/bpf/redirect`):
//! ```text
//! maps/{pods,pod_addrs,listeners,flows,proxy_cgroups,counters,pod_index,steered,AYA_LOGS}
//! progs/{redirect_lookup,redirect_egress,redirect_ingress,redirect_loopback}
//! links/<pod uid>          the pod's sk_lookup link
//! ```
//! The tc filters live in each pod namespace (priority 1, handle 0x539), where
//! `tc filter show dev eth0 egress` shows them.

mod check;
mod maps;
mod pod;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    programs::{SchedClassifier, SkLookup},
};
pub use check::{KernelCheckError, check_kernel};
use maps::Maps;
use pod::PodState;
pub use pod::{EnrolOutcome, EnrolledPod, PodOptions, PodSockets};
use redirect_ebpf::{MAX_PODS, PodCounters, names};
use tracing::{info, warn};

use crate::netns::NetnsError;

/// Where the engine pins its state unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/redirect";

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect-ebpf.o"));

/// Which sockets count as the proxy's own (parity rows 6 and 7): those marked 0x539 and
/// created by a process in one of these cgroups (cgroup v2 ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyIdentity {
    /// The cgroup of this process (the proxy runs in-process).
    OwnCgroup,
    /// These cgroups (for a proxy running elsewhere).
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            pin_dir: DEFAULT_PIN_DIR.into(),
            proxy_identity: ProxyIdentity::OwnCgroup,
            max_pods: MAX_PODS - 1,
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
}

struct Inner {
    ebpf: Ebpf,
    maps: Maps,
    pods: BTreeMap<String, PodState>,
}

/// The one owner of the engine's BPF state in this process.
pub struct Engine {
    pin_dir: PathBuf,
    inner: Mutex<Inner>,
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
        let map_paths: Vec<(&str, PathBuf)> = names::ALL_MAPS
            .into_iter()
            .map(|n| (n, pin_dir.join("maps").join(n)))
            .collect();
        let mut loader = EbpfLoader::new();
        loader.verifier_log_level(VerifierLogLevel::DEBUG | VerifierLogLevel::STATS);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let max_pods = config.max_pods.clamp(1, MAX_PODS - 1);
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
        set_proxy_identity(&mut maps, &config.proxy_identity)?;
        let pods = pod::adopt_pinned(&maps);
        info!(pin_dir = %pin_dir.display(), pods = pods.len(), "redirect: engine ready");
        Ok(Self {
            pin_dir,
            inner: Mutex::new(Inner { ebpf, maps, pods }),
        })
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
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Inner { ebpf, maps, pods } = &mut *inner;
        pod::enrol(
            ebpf,
            maps,
            pods,
            &self.pin_dir,
            uid,
            netns,
            options,
            sockets,
        )
    }

    /// Replaces the proxy sockets of an enrolled pod (for example after a proxy restart).
    pub fn set_sockets(&self, uid: &str, sockets: &PodSockets<'_>) -> Result<(), EnrolError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Inner { maps, pods, .. } = &mut *inner;
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
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Inner { maps, pods, .. } = &mut *inner;
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
    pub fn finish_releases(&self) -> Vec<(String, EnrolError)> {
        let releasing: Vec<String> = {
            let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
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
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.pods.iter().map(|(uid, s)| s.describe(uid)).collect()
    }

    /// The proxy sockets the engine holds for a pod: (port, is UDP, socket cookie).
    pub fn sockets(&self, uid: &str) -> Result<Vec<(u16, bool, u64)>, EnrolError> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
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
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
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

    /// Counters of events no pod could be charged with (slot 0), such as TCP to an
    /// address that is no pod's (`dropped_unknown_dst`).
    pub fn node_counters(&self) -> Result<PodCounters, EngineError> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(inner.maps.read_counters(0)?)
    }

    /// Trusts 0x539-marked sockets of this cgroup as the proxy's (split deployments).
    pub fn trust_proxy_cgroup(&self, cgroup_id: u64) -> Result<(), EngineError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.maps.proxy_cgroups.insert(cgroup_id, 1, 0)?;
        Ok(())
    }
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

fn set_proxy_identity(maps: &mut Maps, identity: &ProxyIdentity) -> Result<(), EngineError> {
    let ids = match identity {
        ProxyIdentity::OwnCgroup => match own_cgroup_id() {
            Ok(id) => vec![id],
            Err(e) => {
                warn!(error = %e, "redirect: no cgroup v2 for this process; trusting the 0x539 mark alone (parity row 7 not enforced)");
                vec![0]
            }
        },
        ProxyIdentity::Cgroups(ids) => ids.clone(),
        ProxyIdentity::MarkOnly => vec![0],
    };
    for id in ids {
        maps.proxy_cgroups.insert(id, 1, 0)?;
    }
    Ok(())
}

/// The cgroup v2 id (the inode of its directory) of this process.
pub fn own_cgroup_id() -> Result<u64, EngineError> {
    cgroup_id_of_pid("self")
}

/// The cgroup v2 id of a process (`"self"` or a pid).
pub fn cgroup_id_of_pid(pid: &str) -> Result<u64, EngineError> {
    use std::os::unix::fs::MetadataExt;
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| EngineError::Cgroup(format!("/proc/{pid}/cgroup: {e}")))?;
    let rel = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| EngineError::Cgroup("no cgroup v2 entry in /proc/{pid}/cgroup".into()))?;
    let mount = cgroup2_mount()
        .ok_or_else(|| EngineError::Cgroup("no cgroup2 filesystem mounted".into()))?;
    let dir = mount.join(rel.trim_start_matches('/'));
    let md = std::fs::metadata(&dir)
        .map_err(|e| EngineError::Cgroup(format!("{}: {e}", dir.display())))?;
    Ok(md.ino())
}

/// Where the cgroup2 filesystem is mounted (`/sys/fs/cgroup` or, on hybrid hosts,
/// `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fs) = (f.next()?, f.next()?, f.next()?);
        (fs == "cgroup2").then(|| PathBuf::from(dir))
    })
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
