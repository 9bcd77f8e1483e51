//! Two simulated nodes, each with its own proxy (the mesh data path: HBONE over mutual
//! TLS) in front of its enrolled pods, one engine for all pods, one local CA shared by
//! both nodes (as one mesh shares its roots). Each node knows its own pods as enrolled
//! workloads and the other node's from a workload file (the upstream proxy's format).
//! Everything is removed on drop, on failure too.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use redirect_user::proxy::{
    PodListeners,
    identity::{CertSource, FileCerts, Identity, LocalCa, Tls},
    mesh::{DefaultTransport, Mesh, PodMesh},
    registry::{Protocol, Registry, Transport, Workload},
    relay::Relay,
};

use crate::{
    APP_PORT, Engine, EngineConfig, Netns, PEER_PORT, PodOptions, Topology, echo_server,
    process::RemoveDir,
};

pub const TRUST_DOMAIN: &str = "cluster.local";

/// A pod of the cluster: name, node (1 or 2), host number, service account.
#[derive(Debug, Clone)]
pub struct PodDef {
    pub name: &'static str,
    pub node: usize,
    pub n: u16,
    pub service_account: &'static str,
    /// Enrolled in the mesh; `false` for an outside host (plain, not redirected).
    pub mesh: bool,
}

pub const fn pod(name: &'static str, node: usize, n: u16, service_account: &'static str) -> PodDef {
    PodDef {
        name,
        node,
        n,
        service_account,
        mesh: true,
    }
}

/// A host outside the mesh: not enrolled, its traffic goes where it is sent.
pub const fn outside(name: &'static str, node: usize, n: u16) -> PodDef {
    PodDef {
        name,
        node,
        n,
        service_account: "",
        mesh: false,
    }
}

/// What a node's proxy is made of; the defaults give a working mesh.
pub struct NodeConfig {
    pub trust_domain: String,
    /// Certificates from files in this directory instead of the shared local CA.
    pub certs_dir: Option<PathBuf>,
    /// A local CA of its own in this directory (root-cert.pem, root-key.pem) instead
    /// of the shared one.
    pub ca_dir: Option<PathBuf>,
    pub transport: DefaultTransport,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            trust_domain: TRUST_DOMAIN.into(),
            certs_dir: None,
            ca_dir: None,
            transport: DefaultTransport::Tcp,
        }
    }
}

pub struct Cluster {
    // Field order is drop order: proxies, then the engine, then namespaces and files.
    relays: Mutex<HashMap<String, Relay>>,
    pods: Mutex<HashMap<String, Arc<PodMesh>>>,
    pub nodes: Vec<Arc<Mesh>>,
    pub rt: tokio::runtime::Runtime,
    pub engine: Engine,
    pub ca: Arc<LocalCa>,
    pub topo: Topology,
    pub defs: Vec<PodDef>,
    _dirs: Vec<RemoveDir>,
    pub pin_dir: PathBuf,
    pub dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        crate::stop_relays(&self.rt, &self.relays);
        self.pods.lock().unwrap().clear();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

impl Cluster {
    pub fn new(tag: &str, pods: &[PodDef]) -> Result<Self> {
        Self::with(tag, pods, |_, _| NodeConfig::default())
    }

    /// `node_config(k)` makes node `k`'s proxy (1 or 2).
    pub fn with(
        tag: &str,
        pods: &[PodDef],
        node_config: impl Fn(&LocalCa, usize) -> NodeConfig,
    ) -> Result<Self> {
        let mut topo = Topology::two_nodes(tag)?;
        for p in pods {
            topo.add_host_on(p.node, p.name, p.n)?;
        }
        let base = topo.prefix().to_string();
        let dir = std::env::temp_dir().join(format!("{base}-cluster"));
        std::fs::create_dir_all(&dir)?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{base}"));
        let dirs = vec![RemoveDir::new(dir.clone()), RemoveDir::new(pin_dir.clone())];
        let engine = Engine::open(EngineConfig::at(&pin_dir)).context("opening the engine")?;
        let ca = Arc::new(LocalCa::open_or_create(&dir.join("ca"))?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut nodes = Vec::new();
        for k in 1..=2 {
            let cfg = node_config(&ca, k);
            let source: Arc<dyn CertSource> = match (&cfg.certs_dir, &cfg.ca_dir) {
                (Some(d), _) => Arc::new(FileCerts::open(d)?),
                (None, Some(d)) => Arc::new(LocalCa::open_or_create(d)?),
                (None, None) => ca.clone(),
            };
            let tls = Tls::new(source, &cfg.trust_domain);
            let registry = Arc::new(Registry::new());
            nodes.push(Mesh::new(tls, registry, cfg.transport));
        }
        let c = Self {
            relays: Mutex::new(HashMap::new()),
            pods: Mutex::new(HashMap::new()),
            nodes,
            rt,
            engine,
            ca,
            topo,
            defs: pods.to_vec(),
            _dirs: dirs,
            pin_dir,
            dir,
        };
        for k in 1..=2 {
            c.load_remote(k, "")?;
        }
        for p in pods {
            let ns = c.ns(p.name);
            for v6 in [false, true] {
                for port in [APP_PORT, PEER_PORT] {
                    echo_server(&ns, p.name, c.addr(p.name, v6, port))?;
                }
            }
            if p.mesh {
                c.enrol(p.name)?;
            }
        }
        Ok(c)
    }

    pub fn ns(&self, name: &str) -> Netns {
        self.topo.host(name).netns().expect("namespace")
    }

    pub fn addr(&self, name: &str, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.topo.host(name).addr(v6), port)
    }

    pub fn def(&self, name: &str) -> &PodDef {
        self.defs
            .iter()
            .find(|d| d.name == name)
            .expect("pod of the cluster")
    }

    pub fn node(&self, k: usize) -> &Arc<Mesh> {
        &self.nodes[k - 1]
    }

    /// The identity a pod presents (in the mesh's trust domain).
    pub fn identity(&self, name: &str) -> Identity {
        Identity::new(TRUST_DOMAIN, "default", self.def(name).service_account)
    }

    /// The workload of a pod as its own node registers it.
    pub fn workload(&self, name: &str) -> Workload {
        let h = self.topo.host(name);
        Workload {
            uid: name.into(),
            name: name.into(),
            namespace: "default".into(),
            service_account: self.def(name).service_account.into(),
            trust_domain: None,
            ips: vec![h.v4.into(), h.v6.into()],
            protocol: Protocol::Hbone,
            transport: Transport::Tcp,
            node: format!("node{}", self.def(name).node),
            services: Vec::new(),
            local: true,
        }
    }

    /// Opens the pod's listeners, enrols it, and serves it with its node's proxy.
    pub fn enrol(&self, name: &str) -> Result<()> {
        let ns = self.ns(name);
        let listeners = PodListeners::open(&ns, false)?;
        self.engine
            .enrol(name, &ns, &PodOptions::default(), &listeners.sockets())?;
        let _guard = self.rt.enter();
        let mesh = self.node(self.def(name).node);
        let pod = mesh.pod(self.workload(name), ns.try_clone()?)?;
        let relay = Relay::start_mesh(name, ns, listeners, None, pod.clone())?;
        self.pods.lock().unwrap().insert(name.into(), pod);
        self.relays.lock().unwrap().insert(name.into(), relay);
        Ok(())
    }

    /// Node `k`'s workload file: the other node's pods (the upstream proxy's format),
    /// then `extra` (more YAML top-level keys, e.g. `policies:`). Written to a file and
    /// loaded, as `--workloads` does.
    pub fn load_remote(&self, k: usize, extra: &str) -> Result<PathBuf> {
        self.load_remote_with(k, extra, |_, _| {})
    }

    /// Like [`Self::load_remote`], with each remote pod's YAML lines changed by `edit`.
    pub fn load_remote_with(
        &self,
        k: usize,
        extra: &str,
        edit: impl Fn(&str, &mut Vec<String>),
    ) -> Result<PathBuf> {
        let mut y = String::from("workloads:\n");
        for d in self.defs.iter().filter(|d| d.node != k && d.mesh) {
            let h = self.topo.host(d.name);
            let mut lines = vec![
                format!("uid: cluster1//v1/Pod/default/{}", d.name),
                format!("name: {}", d.name),
                "namespace: default".into(),
                format!("serviceAccount: {}", d.service_account),
                format!("workloadIps: [\"{}\", \"{}\"]", h.v4, h.v6),
                "protocol: HBONE".into(),
                format!("node: node{}", d.node),
            ];
            edit(d.name, &mut lines);
            for (i, l) in lines.iter().enumerate() {
                y.push_str(if i == 0 { "- " } else { "  " });
                y.push_str(l);
                y.push('\n');
            }
        }
        y.push_str(extra);
        let path = self.dir.join(format!("node{k}-workloads.yaml"));
        std::fs::write(&path, &y)?;
        self.node(k)
            .registry
            .load_file(&path)
            .with_context(|| format!("loading {}:\n{y}", path.display()))?;
        Ok(path)
    }

    /// A directory for a test's files (removed with the cluster).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}
