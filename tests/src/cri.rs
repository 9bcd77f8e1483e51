//! A real container runtime for the tests: containerd with its CRI plugin, runc and the
//! standard CNI plugins, run from a temporary directory of its own, creating pods the
//! way the kubelet does (RunPodSandbox, CreateContainer, StartContainer, StopPodSandbox,
//! RemovePodSandbox) with images built here (no registry, see [`image`]).
//!
//! Each [`Runtime`] has its own containerd, CNI configuration and binary directories, a
//! bridge of its own (`IPv4 10.252.<n>.0/24`, IPv6 `fd00:252:<n in hex>::/64`, gateway `.1` /
//! `::1` on the bridge in the host's namespace) and host-local IPAM state in its
//! directory. Dropping it (on failure too) stops and removes every sandbox through the
//! CRI, stops containerd, kills shims and pod processes left over, unmounts, and removes
//! what containerd 1.6 leaves outside its directory: the bridge, cached CNI results,
//! netns files, runc state, shim sockets and the pods' cgroups.
//!
//! Chaining a plugin: put its program in [`CniSetup::plugin`] (linked into the
//! runtime's CNI bin directory under its file name, which is its `type`) and its
//! configuration in [`CniSetup::chain`] (appended after the bridge plugin in the primary
//! conflist). An agent that installs its own configuration writes into
//! [`Runtime::conf_dir`] ([`Runtime::write_conf`]); containerd reads the first file in
//! name order (`max_conf_num = 1`), the primary being `10-<network>.conflist`.
//! [`Runtime::wait_cni_loaded`] waits until containerd has loaded a change.

pub mod api;
pub mod image;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use api::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, DnsConfig, ImageSpec, KeyValue,
    LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    RuntimeClient, namespace_mode,
};
pub use image::{APP_IMAGE, PAUSE_IMAGE};

/// Where Debian's containernetworking-plugins keeps the plugins.
pub const SYSTEM_CNI_BIN: &str = "/usr/lib/cni";
/// The primary plugins linked into every runtime's bin directory (containerd adds its
/// own loopback network, so `loopback` must be there).
const PRIMARY_PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];
/// What containerd 1.6 keeps outside its root and state.
const SHIM_SOCKETS: &str = "/run/containerd/s";
const RUNC_STATE: &str = "/run/containerd/runc/k8s.io";
const CNI_RESULTS: &str = "/var/lib/cni/results";

/// The deadline of one CRI call (a loaded 2-core machine can be slow).
const CALL_DEADLINE: Duration = Duration::from_secs(60);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// What the runtime's CNI configuration holds beyond the bridge and host-local IPAM.
#[derive(Default, Clone, Debug)]
pub struct CniSetup {
    /// Plugin configurations appended after the bridge plugin in the primary conflist.
    pub chained: Vec<Value>,
    /// Plugin programs linked into the bin directory, each under its file name.
    pub plugins: Vec<PathBuf>,
    /// Leave IPv6 out of the bridge network.
    pub ipv4_only: bool,
}

impl CniSetup {
    /// The standard bridge network alone.
    pub fn bridge() -> Self {
        Self::default()
    }

    /// Appends a plugin configuration to the primary conflist's chain (`type` names the
    /// program; `cniVersion` and `name` are set by the conflist).
    pub fn chain(mut self, plugin: Value) -> Self {
        self.chained.push(plugin);
        self
    }

    /// Makes the program at `path` available to CNI as a plugin named by its file name.
    pub fn plugin(mut self, path: impl Into<PathBuf>) -> Self {
        self.plugins.push(path.into());
        self
    }

    pub fn ipv4_only(mut self) -> Self {
        self.ipv4_only = true;
        self
    }
}

/// The runtime's bridge network, unique to it.
#[derive(Clone, Debug)]
pub struct BridgeNet {
    /// The CNI network name (also the host-local IPAM and result cache key).
    pub network: String,
    /// The bridge in the host's namespace.
    pub bridge: String,
    pub index: u8,
    pub dual_stack: bool,
}

impl BridgeNet {
    pub fn subnet_v4(&self) -> String {
        format!("10.252.{}.0/24", self.index)
    }

    pub fn subnet_v6(&self) -> String {
        format!(
            "{}/64",
            Ipv6Addr::new(0xfd00, 0x252, self.index as u16, 0, 0, 0, 0, 0)
        )
    }

    /// The bridge's own IPv4 address, the pods' gateway.
    pub fn gateway_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 252, self.index, 1)
    }

    pub fn gateway_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x252, self.index as u16, 0, 0, 0, 0, 1)
    }

    /// The bridge plugin's configuration with host-local IPAM keeping its state in
    /// `ipam_dir`.
    pub fn bridge_plugin(&self, ipam_dir: &Path) -> Value {
        let mut ranges =
            vec![json!([{ "subnet": self.subnet_v4(), "gateway": self.gateway_v4().to_string() }])];
        let mut routes = vec![json!({ "dst": "0.0.0.0/0" })];
        if self.dual_stack {
            ranges.push(
                json!([{ "subnet": self.subnet_v6(), "gateway": self.gateway_v6().to_string() }]),
            );
            routes.push(json!({ "dst": "::/0" }));
        }
        json!({
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "dataDir": ipam_dir,
                "ranges": ranges,
                "routes": routes,
            },
        })
    }

    /// A conflist: the bridge plugin, then `chained`.
    pub fn conflist(&self, ipam_dir: &Path, chained: &[Value]) -> Value {
        let mut plugins = vec![self.bridge_plugin(ipam_dir)];
        plugins.extend(chained.iter().cloned());
        json!({ "cniVersion": "1.0.0", "name": self.network, "plugins": plugins })
    }
}

/// A pod to run: sandbox metadata as the kubelet sends it, and its app containers.
#[derive(Clone, Debug)]
pub struct PodDef {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub containers: Vec<ContainerDef>,
    /// The node's network namespace (`hostNetwork: true`): no CNI call, no pod IP.
    pub host_network: bool,
}

/// A container: of the app image ([`APP_IMAGE`], busybox) unless `image` says,
/// `command` (and `args`) run as is.
#[derive(Clone, Debug, Default)]
pub struct ContainerDef {
    pub name: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// An image imported with [`Runtime::import_image`].
    pub image: Option<String>,
    /// Host paths mounted in (hostPath volumes).
    pub mounts: Vec<api::Mount>,
    /// Capabilities added and dropped, privileged, read-only root, no_new_privs (the
    /// namespaces are the pod's and are filled in).
    pub security: Option<LinuxContainerSecurityContext>,
}

impl PodDef {
    /// Pod `name` in namespace `default`, uid `uid-<name>`, no container.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            namespace: "default".into(),
            uid: format!("uid-{name}"),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            containers: Vec::new(),
            host_network: false,
        }
    }

    /// In the node's network namespace, as a `hostNetwork: true` pod.
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }

    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.into();
        self
    }

    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = uid.into();
        self
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.into(), v.into());
        self
    }

    /// Adds an app container running `command` (e.g. `["sh", "-c", "..."]`).
    pub fn container(mut self, name: &str, command: &[&str]) -> Self {
        self.containers.push(ContainerDef {
            name: name.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        self
    }

    /// Adds a container that answers every TCP connection on `port` with `reply` and a
    /// newline, then closes it (busybox `nc -ll -e`).
    pub fn tcp_responder(self, name: &str, port: u16, reply: &str) -> Self {
        let port = port.to_string();
        self.container(name, &["nc", "-ll", "-p", &port, "-e", "echo", reply])
    }
}

/// A running pod sandbox.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The sandbox id (CNI's container id, `K8S_POD_INFRA_CONTAINER_ID`).
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// IPv4 first, then IPv6 when the network has it.
    pub ips: Vec<IpAddr>,
    /// The pod's network namespace (`/var/run/netns/cni-<uuid>`).
    pub netns: PathBuf,
    pub containers: Vec<String>,
}

impl Pod {
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
    }

    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
    }

    pub fn open_netns(&self) -> Result<crate::Netns> {
        crate::Netns::open(&self.netns).with_context(|| format!("opening {}", self.netns.display()))
    }
}

/// Host state the runtimes change outside their directories, saved by the first live
/// runtime of the process and put back by the last: forwarding (the bridge plugin's
/// `isGateway` turns it on) and the shared directories containerd and CNI create.
static LIVE: Mutex<Live> = Mutex::new(Live {
    count: 0,
    sysctls: Vec::new(),
    new_dirs: Vec::new(),
});

struct Live {
    count: usize,
    sysctls: Vec<(&'static str, String)>,
    /// Shared directories absent before the first runtime, deepest first.
    new_dirs: Vec<&'static str>,
}

const FORWARDING: &[&str] = &[
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];
const SHARED_DIRS: &[&str] = &[
    SHIM_SOCKETS,
    RUNC_STATE,
    "/run/containerd/runc",
    "/run/containerd",
    CNI_RESULTS,
    "/var/lib/cni",
];

impl Live {
    fn enter(&mut self) {
        if self.count == 0 {
            self.sysctls = FORWARDING
                .iter()
                .filter_map(|p| Some((*p, fs::read_to_string(p).ok()?)))
                .collect();
            self.new_dirs = SHARED_DIRS
                .iter()
                .copied()
                .filter(|d| !Path::new(d).exists())
                .collect();
        }
        self.count += 1;
    }

    fn leave(&mut self) {
        self.count -= 1;
        if self.count == 0 {
            for (path, value) in self.sysctls.drain(..) {
                let _ = fs::write(path, value);
            }
            // Only if empty: another process's runtime may be using them.
            for d in self.new_dirs.drain(..) {
                let _ = fs::remove_dir(d);
            }
        }
    }
}

/// containerd with the CRI plugin, run from a temporary directory.
pub struct Runtime {
    /// Taken only by Drop.
    rt: Option<tokio::runtime::Runtime>,
    client: Option<RuntimeClient>,
    name: String,
    dir: PathBuf,
    net: BridgeNet,
    primary: Value,
    containerd: Option<Child>,
    /// Sandbox and container ids ever created here, and the netns paths seen.
    created: Arc<Mutex<Created>>,
    counted: bool,
    /// containerd's process and this runtime's traces, removed on SIGINT/SIGTERM.
    interrupt: Vec<redirect_user::interrupt::Registered>,
}

#[derive(Default)]
struct Created {
    sandboxes: BTreeSet<String>,
    containers: BTreeSet<String>,
    netns: BTreeSet<PathBuf>,
}

impl Runtime {
    /// Starts containerd with a configuration of its own, imports the pause and app
    /// images and waits until the CRI answers, knows both images and has loaded the
    /// CNI configuration.
    pub fn start(tag: &str, cni: CniSetup) -> Result<Self> {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let unique = format!("{:x}-{:x}", std::process::id() & 0xffff, seq);
        let name = format!("{tag}-{unique}");
        let net = BridgeNet {
            network: name.clone(),
            bridge: format!("crb{unique}"),
            index: free_subnet_index(seq)?,
            dual_stack: !cni.ipv4_only,
        };
        if net.bridge.len() > 15 {
            bail!("cri: bridge name {} is too long", net.bridge);
        }
        let dir = std::env::temp_dir().join(format!("cri-{unique}"));
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).enter();
        let mut r = Self {
            rt: Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?,
            ),
            client: None,
            name,
            dir,
            net,
            primary: Value::Null,
            containerd: None,
            created: Arc::new(Mutex::new(Created::default())),
            counted: true,
            interrupt: Vec::new(),
        };
        r.interrupt.push(r.on_interrupt());
        // From here on, Drop cleans up whatever was made.
        let t = Instant::now();
        r.prepare(&cni)?;
        r.spawn_containerd()?;
        r.wait_ready()?;
        image::import(&r.socket(), &r.dir)?;
        r.wait_images()?;
        r.wait_cni_loaded(|cfg| cfg.contains(&r.net.network))
            .context("cri: containerd did not load the primary CNI configuration")?;
        tracing::info!(
            "cri: runtime {} ready in {} ms ({})",
            r.name,
            t.elapsed().as_millis(),
            r.dir.display()
        );
        Ok(r)
    }

    fn prepare(&mut self, cni: &CniSetup) -> Result<()> {
        for d in ["root", "state", "bin", "conf", "ipam", "pods"] {
            fs::create_dir_all(self.dir.join(d))?;
        }
        self.create_bridge()?;
        for p in PRIMARY_PLUGINS {
            let src = Path::new(SYSTEM_CNI_BIN).join(p);
            if !src.exists() {
                bail!(
                    "cri: {} is missing (install containernetworking-plugins: cargo xtask setup)",
                    src.display()
                );
            }
            symlink(&src, self.bin_dir().join(p))?;
        }
        for p in &cni.plugins {
            let file = p
                .file_name()
                .with_context(|| format!("cri: plugin path {} has no file name", p.display()))?;
            let abs =
                fs::canonicalize(p).with_context(|| format!("cri: plugin {}", p.display()))?;
            symlink(abs, self.bin_dir().join(file))?;
        }
        self.primary = self.net.conflist(&self.dir.join("ipam"), &cni.chained);
        self.write_conf(&self.primary_file(), &self.primary)?;
        fs::write(self.dir.join("config.toml"), self.config_toml())?;
        Ok(())
    }

    /// Creates the bridge before the plugin would, without duplicate address detection,
    /// so its IPv6 gateway address is usable at once (the plugin keeps an existing
    /// bridge).
    fn create_bridge(&self) -> Result<()> {
        let br = &self.net.bridge;
        let ip = |args: &[&str]| -> Result<()> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .context("cri: running ip (install iproute2)")?;
            if !out.status.success() {
                bail!(
                    "cri: ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        ip(&["link", "add", "name", br, "type", "bridge"])?;
        fs::write(format!("/proc/sys/net/ipv6/conf/{br}/accept_dad"), "0")
            .with_context(|| format!("cri: turning off DAD on {br}"))?;
        ip(&["link", "set", br, "up"])
    }

    fn config_toml(&self) -> String {
        let d = self.dir.display();
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{d}/c.sock"

[ttrpc]
  address = "{d}/c.sock.ttrpc"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{d}/bin"
  conf_dir = "{d}/conf"
  max_conf_num = 1
"#
        )
    }

    fn spawn_containerd(&mut self) -> Result<()> {
        let log = fs::File::create(self.dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cri: starting containerd (install containerd: cargo xtask setup)")?;
        self.interrupt
            .push(redirect_user::interrupt::process(child.id()));
        self.containerd = Some(child);
        Ok(())
    }

    /// The last lines of containerd's log, for errors.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.join("containerd.log")) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.containerd.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("cri: containerd exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let socket = self.socket();
        loop {
            self.check_alive()?;
            if socket.exists() {
                let attempt = self.block_on(async {
                    let c = RuntimeClient::connect(socket.clone())
                        .await
                        .map_err(|e| anyhow!("{e}"))?;
                    c.status(false)
                        .await
                        .map_err(|s| anyhow!("{}", s.message()))?;
                    Ok::<_, anyhow::Error>(c)
                });
                match attempt {
                    Ok(c) => {
                        self.client = Some(c);
                        return Ok(());
                    }
                    Err(e) if Instant::now() > deadline => {
                        bail!(
                            "cri: containerd's CRI does not answer: {e:#}\n{}",
                            self.log_tail()
                        )
                    }
                    Err(_) => {}
                }
            } else if Instant::now() > deadline {
                bail!("cri: no containerd socket after 30 s:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_images(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = self.client()?;
            let known = self.block_on(async {
                Ok::<_, tonic::Status>(
                    c.has_image(PAUSE_IMAGE).await? && c.has_image(APP_IMAGE).await?,
                )
            });
            match known {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => {}
                Ok(false) => bail!("cri: the CRI does not list the imported images after 30 s"),
                Err(s) => bail!("cri: ImageStatus: {}", s.message()),
            }
            self.check_alive()?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (30 s at most) until the CNI configuration containerd has loaded, as its
    /// verbose status shows it (JSON), satisfies `ok`.
    pub fn wait_cni_loaded(&self, ok: impl Fn(&str) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let c = self.client()?;
        loop {
            let resp = self
                .block_on(c.status(true))
                .map_err(|s| anyhow!("cri: Status: {}", s.message()))?;
            let cfg = resp.info.get("cniconfig").cloned().unwrap_or_default();
            if ok(&cfg) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("cri: CNI configuration not loaded in 30 s; containerd has: {cfg}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `f` to completion on the fixture's runtime, from a thread of its own when
    /// the caller is inside an async runtime already (an async test, a drop there).
    fn block_on<F: Future + Send>(&self, f: F) -> F::Output
    where
        F::Output: Send,
    {
        let rt = self.rt.as_ref().expect("the runtime lives until drop");
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| s.spawn(|| rt.block_on(f)).join())
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        } else {
            rt.block_on(f)
        }
    }

    fn client(&self) -> Result<RuntimeClient> {
        self.client.clone().context("cri: not connected")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's gRPC socket (the CRI's too).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("c.sock")
    }

    pub fn net(&self) -> &BridgeNet {
        &self.net
    }

    /// The CNI configuration directory containerd reads.
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.join("conf")
    }

    /// The CNI plugin directory containerd runs plugins from.
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// The primary conflist's file name in [`Runtime::conf_dir`].
    pub fn primary_file(&self) -> String {
        format!("10-{}.conflist", self.net.network)
    }

    /// The primary conflist as written (bridge, then the chained plugins).
    pub fn primary_conflist(&self) -> &Value {
        &self.primary
    }

    /// Writes `conf` as `file` in the CNI configuration directory, atomically (a
    /// temporary name CNI ignores, then a rename).
    pub fn write_conf(&self, file: &str, conf: &Value) -> Result<()> {
        let tmp = self.conf_dir().join(format!(".{file}.tmp"));
        fs::write(&tmp, serde_json::to_vec_pretty(conf)?)?;
        fs::rename(&tmp, self.conf_dir().join(file))?;
        Ok(())
    }

    pub fn remove_conf(&self, file: &str) -> Result<()> {
        fs::remove_file(self.conf_dir().join(file)).with_context(|| format!("cri: removing {file}"))
    }

    fn sandbox_config(&self, def: &PodDef) -> Result<PodSandboxConfig> {
        let logs = self
            .dir
            .join("pods")
            .join(format!("{}_{}_{}", def.namespace, def.name, def.uid));
        fs::create_dir_all(&logs)?;
        let ns = &def.namespace;
        Ok(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: def.name.clone(),
                uid: def.uid.clone(),
                namespace: def.namespace.clone(),
                attempt: 0,
            }),
            // The node's UTS namespace with its network: no hostname of the pod's.
            hostname: if def.host_network {
                String::new()
            } else {
                def.name.clone()
            },
            log_directory: logs.display().to_string(),
            dns_config: Some(DnsConfig {
                servers: vec![self.net.gateway_v4().to_string()],
                searches: vec![
                    format!("{ns}.svc.cluster.local"),
                    "svc.cluster.local".into(),
                    "cluster.local".into(),
                ],
                options: vec!["ndots:5".into()],
            }),
            labels: def.labels.clone().into_iter().collect(),
            annotations: def.annotations.clone().into_iter().collect(),
            linux: Some(LinuxPodSandboxConfig {
                // As the kubelet's cgroupfs driver names it: the pod's uid in the path.
                cgroup_parent: format!("/{}/pod{}", self.name, def.uid),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(pod_namespaces(def.host_network)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
    }

    /// Runs the pod: RunPodSandbox (CNI ADD over the chain), then each container
    /// (CreateContainer + StartContainer). A failing ADD is an error holding the plugin's
    /// message.
    pub fn run_pod(&self, def: &PodDef) -> Result<Pod> {
        self.block_on(self.run_pod_async(def))
    }

    /// [`Runtime::run_pod`] for async callers.
    pub async fn run_pod_async(&self, def: &PodDef) -> Result<Pod> {
        let c = self.client()?;
        let config = self.sandbox_config(def)?;
        let id = deadline("RunPodSandbox", c.run_pod_sandbox(config.clone()))
            .await
            .with_context(|| format!("cri: RunPodSandbox {}/{}", def.namespace, def.name))?
            .pod_sandbox_id;
        self.created.lock().unwrap().sandboxes.insert(id.clone());
        let status = deadline("PodSandboxStatus", c.pod_sandbox_status(&id, true)).await?;
        let netns = if def.host_network {
            PathBuf::from("/proc/1/ns/net")
        } else {
            let netns = netns_from_info(&status.info)
                .with_context(|| format!("cri: no network namespace in the status of {id}"))?;
            self.created.lock().unwrap().netns.insert(netns.clone());
            netns
        };
        let mut ips = Vec::new();
        if let Some(n) = status.status.and_then(|s| s.network) {
            for ip in std::iter::once(n.ip).chain(n.additional_ips.into_iter().map(|p| p.ip)) {
                if !ip.is_empty() {
                    ips.push(ip.parse().with_context(|| format!("cri: pod IP {ip}"))?);
                }
            }
        }
        let mut containers = Vec::new();
        for cdef in &def.containers {
            containers.push(self.start_container(&c, &id, def, &config, cdef).await?);
        }
        Ok(Pod {
            id,
            name: def.name.clone(),
            namespace: def.namespace.clone(),
            uid: def.uid.clone(),
            ips,
            netns,
            containers,
        })
    }

    /// CreateContainer + StartContainer of `cdef` in the sandbox `id` made from `def`.
    async fn start_container(
        &self,
        c: &RuntimeClient,
        id: &str,
        def: &PodDef,
        config: &PodSandboxConfig,
        cdef: &ContainerDef,
    ) -> Result<String> {
        let mut security = cdef.security.clone().unwrap_or_default();
        security.namespace_options = Some(pod_namespaces(def.host_network));
        let req = CreateContainerRequest {
            pod_sandbox_id: id.into(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: cdef.name.clone(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: cdef.image.clone().unwrap_or_else(|| APP_IMAGE.into()),
                }),
                command: cdef.command.clone(),
                args: cdef.args.clone(),
                envs: cdef
                    .env
                    .iter()
                    .map(|(k, v)| KeyValue {
                        key: k.clone(),
                        value: v.clone(),
                    })
                    .collect(),
                mounts: cdef.mounts.clone(),
                log_path: format!("{}/0.log", cdef.name),
                linux: Some(LinuxContainerConfig {
                    security_context: Some(security),
                }),
                ..Default::default()
            }),
            sandbox_config: Some(config.clone()),
        };
        let cid = deadline("CreateContainer", c.create_container(req))
            .await
            .with_context(|| format!("cri: CreateContainer {} in {id}", cdef.name))?;
        self.created.lock().unwrap().containers.insert(cid.clone());
        deadline("StartContainer", c.start_container(&cid))
            .await
            .with_context(|| format!("cri: StartContainer {} in {id}", cdef.name))?;
        Ok(cid)
    }

    /// Adds a container to the running sandbox of `pod` (made from `def`); returns its id.
    pub fn add_container(&self, pod: &Pod, def: &PodDef, cdef: &ContainerDef) -> Result<String> {
        let c = self.client()?;
        let config = self.sandbox_config(def)?;
        self.block_on(self.start_container(&c, &pod.id, def, &config, cdef))
    }

    /// ContainerStatus: state (`api::container_state`), exit code, reason.
    pub fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
        let c = self.client()?;
        self.block_on(deadline("ContainerStatus", c.container_status(id)))
            .with_context(|| format!("cri: ContainerStatus {id}"))
    }

    /// What container `name` of `def`'s pod wrote (the CRI log file, one line per
    /// output line with a timestamp and stream prefix).
    pub fn container_log(&self, def: &PodDef, name: &str) -> String {
        let path = self
            .dir
            .join("pods")
            .join(format!("{}_{}_{}", def.namespace, def.name, def.uid))
            .join(name)
            .join("0.log");
        fs::read_to_string(path).unwrap_or_default()
    }

    /// Imports an OCI image-layout tar (made with `crate::oci`) into the CRI's namespace.
    pub fn import_image(&self, tar: &[u8]) -> Result<()> {
        image::import_tar(&self.socket(), &self.dir, tar)
    }

    /// StopPodSandbox (CNI DEL with the netns and the cached result), as the kubelet does
    /// when a pod ends.
    pub fn stop_pod(&self, id: &str) -> Result<()> {
        let c = self.client()?;
        self.block_on(deadline("StopPodSandbox", c.stop_pod_sandbox(id)))
            .with_context(|| format!("cri: StopPodSandbox {id}"))
    }

    /// StopPodSandbox then RemovePodSandbox (a second CNI DEL, without netns).
    pub fn remove_pod(&self, id: &str) -> Result<()> {
        self.stop_pod(id)?;
        let c = self.client()?;
        self.block_on(deadline("RemovePodSandbox", c.remove_pod_sandbox(id)))
            .with_context(|| format!("cri: RemovePodSandbox {id}"))
    }

    /// ListPodSandbox: every sandbox the runtime knows, ready or not.
    pub fn list_pods(&self) -> Result<Vec<api::PodSandbox>> {
        let c = self.client()?;
        self.block_on(deadline("ListPodSandbox", c.list_pod_sandbox()))
            .context("cri: ListPodSandbox")
    }

    /// The interfaces attached to the runtime's bridge (one veth per running pod).
    pub fn bridge_ports(&self) -> Vec<String> {
        bridge_ports(&self.net.bridge)
    }

    /// IPs host-local holds for pods of this runtime.
    pub fn reserved_ips(&self) -> Vec<String> {
        let dir = self.dir.join("ipam").join(&self.net.network);
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<IpAddr>().is_ok())
            .collect()
    }

    /// What identifies this runtime's traces on the host, to check after drop that
    /// none is left ([`Footprint::leftovers`]).
    pub fn footprint(&self) -> Footprint {
        footprint(&self.name, &self.dir, &self.net, &self.created)
    }

    /// What removes this runtime's traces if the process is interrupted (SIGINT,
    /// SIGTERM): no CRI calls then, containerd is killed first, its shims and the pods'
    /// processes here.
    fn on_interrupt(&self) -> redirect_user::interrupt::Registered {
        let (name, dir, net, created) = (
            self.name.clone(),
            self.dir.clone(),
            self.net.clone(),
            self.created.clone(),
        );
        redirect_user::interrupt::custom(&format!("cri runtime {name}"), move || {
            remove_traces(&footprint(&name, &dir, &net, &created));
        })
    }

    /// Everything, best effort: sandboxes through the CRI, then containerd, then what is
    /// left of them on the host.
    fn cleanup(&mut self) {
        if let Some(c) = self.client.take() {
            let known: BTreeSet<String> = self.created.lock().unwrap().sandboxes.clone();
            self.block_on(async {
                let listed = deadline("ListPodSandbox", c.list_pod_sandbox())
                    .await
                    .map(|l| l.into_iter().map(|p| p.id).collect())
                    .unwrap_or_else(|_| BTreeSet::new());
                // All at once: each stop waits for its containers to end.
                let mut all = tokio::task::JoinSet::new();
                for id in known.into_iter().chain(listed).collect::<BTreeSet<_>>() {
                    let c = c.clone();
                    all.spawn(async move {
                        if let Err(e) = deadline("StopPodSandbox", c.stop_pod_sandbox(&id)).await {
                            tracing::warn!("cri: stopping sandbox {id} at cleanup: {e:#}");
                        }
                        if let Err(e) =
                            deadline("RemovePodSandbox", c.remove_pod_sandbox(&id)).await
                        {
                            tracing::warn!("cri: removing sandbox {id} at cleanup: {e:#}");
                        }
                    });
                }
                all.join_all().await;
            });
        }
        if let Some(mut child) = self.containerd.take() {
            stop_process(&mut child);
        }
        remove_traces(&self.footprint());
        self.interrupt.clear();
        if self.counted {
            self.counted = false;
            LIVE.lock().unwrap_or_else(|e| e.into_inner()).leave();
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.cleanup();
        // Dropping a tokio runtime inside another one's context panics; this does not.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn footprint(name: &str, dir: &Path, net: &BridgeNet, created: &Mutex<Created>) -> Footprint {
    let created = created.lock().unwrap_or_else(|e| e.into_inner());
    Footprint {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        bridge: net.bridge.clone(),
        network: net.network.clone(),
        ids: created
            .sandboxes
            .iter()
            .chain(&created.containers)
            .cloned()
            .collect(),
        netns: created.netns.iter().cloned().collect(),
    }
}

/// What is left of a runtime on the host once containerd is stopped: shims and pod
/// processes, mounts, netns files, runc state, shim sockets, cached CNI results, the
/// bridge, cgroups, the directory.
fn remove_traces(fp: &Footprint) {
    // Shims outlive containerd: each names containerd's socket in its arguments.
    let socket = fp.dir.join("c.sock").display().to_string();
    for pid in processes_with_arg(|a| a == socket || under(a, &fp.dir)) {
        kill(pid);
    }
    for pid in cgroup_processes(&fp.name) {
        kill(pid);
    }
    unmount_under(&fp.dir);
    for ns in &fp.netns {
        let _ = nix::mount::umount2(ns, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_file(ns);
    }
    for id in &fp.ids {
        let _ = fs::remove_dir_all(Path::new(RUNC_STATE).join(id));
        let _ = fs::remove_file(shim_socket(&socket, id));
        for f in [
            format!("{}-{id}-eth0", fp.network),
            format!("cni-loopback-{id}-lo"),
        ] {
            let _ = fs::remove_file(Path::new(CNI_RESULTS).join(f));
        }
    }
    if Path::new("/sys/class/net").join(&fp.bridge).exists() {
        let _ = Command::new("ip")
            .args(["link", "del", &fp.bridge])
            .output();
    }
    remove_cgroups(&fp.name);
    let _ = fs::remove_dir_all(&fp.dir);
}

/// Network and IPC shared by the pod, PID per container: a kubelet's default pod.
fn pod_namespaces(host_network: bool) -> NamespaceOption {
    NamespaceOption {
        network: if host_network {
            namespace_mode::NODE
        } else {
            namespace_mode::POD
        },
        pid: namespace_mode::CONTAINER,
        ipc: namespace_mode::POD,
        target_id: String::new(),
    }
}

/// Runs a CRI call under [`CALL_DEADLINE`], its gRPC status turned into an error that
/// keeps the runtime's message (a failing CNI plugin's message is in it).
async fn deadline<T>(
    what: &str,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_DEADLINE, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(s)) => Err(anyhow!("{what}: {:?}: {}", s.code(), s.message())),
        Err(_) => Err(anyhow!(
            "{what}: no answer in {} s",
            CALL_DEADLINE.as_secs()
        )),
    }
}

/// The network namespace path in a verbose sandbox status: `info` holds JSON with the
/// sandbox's OCI spec, whose Linux namespaces name it.
fn netns_from_info(info: &std::collections::HashMap<String, String>) -> Option<PathBuf> {
    let v: Value = serde_json::from_str(info.get("info")?).ok()?;
    v["runtimeSpec"]["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// A subnet index (10.252.<n>.0/24) no route of the host uses yet.
fn free_subnet_index(seq: u32) -> Result<u8> {
    let routes = fs::read_to_string("/proc/net/route").unwrap_or_default();
    let start = (std::process::id() * 7 + seq) % 250;
    for k in 0..250 {
        let n = ((start + k) % 250 + 1) as u8;
        // /proc/net/route holds destinations as little-endian hex.
        let dest = format!("{:08X}", u32::from_le_bytes([10, 252, n, 0]));
        if !routes
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(dest.as_str()))
        {
            return Ok(n);
        }
    }
    bail!("cri: no free subnet in 10.252.0.0/16")
}

fn bridge_ports(bridge: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(Path::new("/sys/class/net").join(bridge).join("brif")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// SIGTERM, up to 10 s to exit, then SIGKILL.
fn stop_process(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Processes with an argument for which `matches` holds.
fn processes_with_arg(matches: impl Fn(&str) -> bool) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .any(|a| matches(&String::from_utf8_lossy(a)))
            })
        })
        .collect()
}

/// The cgroup v1 hierarchies and the v2 one, as mounted.
fn cgroup_mounts() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

/// Directories of `root` and below, deepest first.
fn dirs_deepest_first(root: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(e.path());
                }
            }
            all.push(d);
        }
    }
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    all
}

fn cgroup_processes(name: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for m in cgroup_mounts() {
        for d in dirs_deepest_first(&m.join(name)) {
            if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes the runtime's cgroup trees (pods' and containers' cgroups), retrying briefly
/// while killed processes finish exiting.
fn remove_cgroups(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut left = false;
        for m in cgroup_mounts() {
            for d in dirs_deepest_first(&m.join(name)) {
                if fs::remove_dir(&d).is_err() && d.exists() {
                    left = true;
                }
            }
        }
        if !left || Instant::now() > deadline {
            return;
        }
        for pid in cgroup_processes(name) {
            kill(pid);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Unmounts every mount point at or below `dir`, deepest first (detached, so busy mounts
/// go too).
fn unmount_under(dir: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The shim's socket for task `id`: containerd 1.6 names it by the SHA-256 of
/// `<containerd address>/<namespace>/<id>` under /run/containerd/s.
fn shim_socket(address: &str, id: &str) -> PathBuf {
    let d = crate::oci::digest(format!("{address}/k8s.io/{id}").as_bytes());
    Path::new(SHIM_SOCKETS).join(d.trim_start_matches("sha256:"))
}

/// Whether the path `arg` is `dir` or below it.
fn under(arg: &str, dir: &Path) -> bool {
    Path::new(arg).starts_with(dir)
}

/// A dropped runtime's identifying traces.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Footprint {
    pub name: String,
    pub dir: PathBuf,
    pub bridge: String,
    pub network: String,
    pub ids: Vec<String>,
    pub netns: Vec<PathBuf>,
}

impl Footprint {
    /// What of the runtime is still on the host; empty once it is gone.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let dir = self.dir.display().to_string();
        for pid in processes_with_arg(|a| under(a, &self.dir)) {
            let cmd = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            left.push(format!("process {pid}: {cmd}"));
        }
        for pid in cgroup_processes(&self.name) {
            left.push(format!("process {pid} in the runtime's cgroups"));
        }
        if self.dir.exists() {
            left.push(format!("directory {dir}"));
        }
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            left.push(format!("bridge {}", self.bridge));
        }
        for m in cgroup_mounts() {
            if m.join(&self.name).exists() {
                left.push(format!("cgroup {}", m.join(&self.name).display()));
            }
        }
        for ns in &self.netns {
            if ns.exists() {
                left.push(format!("netns {}", ns.display()));
            }
        }
        let address = self.dir.join("c.sock").display().to_string();
        for id in &self.ids {
            for p in [Path::new(RUNC_STATE).join(id), shim_socket(&address, id)] {
                if p.exists() {
                    left.push(p.display().to_string());
                }
            }
        }
        if let Ok(entries) = fs::read_dir(CNI_RESULTS) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&format!("{}-", self.network))
                    || self.ids.iter().any(|id| n.contains(id.as_str()))
                {
                    left.push(format!("{CNI_RESULTS}/{n}"));
                }
            }
        }
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for l in info.lines() {
            if let Some(p) = l.split_whitespace().nth(4)
                && under(p, &self.dir)
            {
                left.push(format!("mount {p}"));
            }
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_netns_path_is_read_from_the_verbose_status() {
        let info = std::collections::HashMap::from([(
            "info".to_string(),
            r#"{"pid":1,"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1"}]}}}"#.to_string(),
        )]);
        assert_eq!(
            netns_from_info(&info),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        let host = std::collections::HashMap::from([(
            "info".to_string(),
            r#"{"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"}]}}}"#.to_string(),
        )]);
        assert_eq!(netns_from_info(&host), None);
    }

    #[test]
    fn the_bridge_conflist_chains_after_the_bridge() {
        let net = BridgeNet {
            network: "t-1".into(),
            bridge: "crb1".into(),
            index: 7,
            dual_stack: true,
        };
        let c = net.conflist(Path::new("/x"), &[json!({"type": "redirect-cni"})]);
        assert_eq!(c["name"], "t-1");
        assert_eq!(c["plugins"][0]["type"], "bridge");
        assert_eq!(
            c["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.252.7.0/24"
        );
        assert_eq!(
            c["plugins"][0]["ipam"]["ranges"][1][0]["subnet"],
            "fd00:252:7::/64"
        );
        assert_eq!(c["plugins"][1]["type"], "redirect-cni");
    }
}
