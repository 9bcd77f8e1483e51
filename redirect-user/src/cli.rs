//! The commands of `redirect-user`. `main.rs` only parses and dispatches.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tracing::info;

use crate::{
    admin::{self, Admin, Listen, Parts},
    agent::{
        Agent, PodSpec,
        control::{self, ControlRequest},
        handover::{self, HandoverInfo},
    },
    cni::{self, StaticMembership, install::InstallConfig},
    ebpf::{DEFAULT_OWNER_WAIT, DEFAULT_PIN_DIR, Engine, EngineConfig, ProxyIdentity},
    membership::Membership,
    privileges,
    proxy::{
        identity::{CertSource, DEFAULT_TRUST_DOMAIN, FileCerts, LocalCa, Tls},
        mesh::{DefaultTransport, Mesh},
        metrics::ProxyMetrics,
        registry::Registry,
    },
    zds::proxy::{InpodProxy, ProxyConfig, ProxyHandle},
};

pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/run/redirect";
pub const DEFAULT_CA_DIR: &str = "/var/run/redirect/ca";

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The node-agent protocol socket the proxy connects to.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where the agent keeps its pod list and its control socket.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The bpffs directory holding the engine's pinned state.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Seconds to wait for another agent owning the pin directory to exit (a rolling
    /// update) before refusing to start.
    #[arg(long, default_value_t = DEFAULT_OWNER_WAIT.as_secs())]
    pub owner_wait_secs: u64,
    /// Trust every socket marked 0x539 as the proxy's, as the iptables rules do: any
    /// app holding CAP_NET_ADMIN can then bypass its proxy (parity row 7 not enforced).
    /// Only for hosts without cgroup v2.
    #[arg(long)]
    pub trust_mark_only: bool,
    /// The CNI plugin's socket, always served. Default: <state-dir>/pluginevent.sock
    /// (/var/run/redirect/pluginevent.sock with the default state directory).
    #[arg(long)]
    pub cni_socket: Option<PathBuf>,
    /// Namespaces whose pods are in the mesh (comma-separated), for the CNI plugin's
    /// requests on a node without a cluster to ask; their service account is `default`.
    /// Without it no pod the plugin asks about is in the mesh.
    #[arg(long, value_delimiter = ',')]
    pub mesh_namespaces: Vec<String>,
    /// Install the CNI plugin (binary and configuration) and keep its configuration
    /// ahead of the primary CNI's while the agent runs. Stopping the agent leaves both
    /// in place (new pods wait); `redirect-user cni uninstall` removes them.
    #[arg(long)]
    pub cni_install: bool,
    #[command(flatten)]
    pub cni: CniInstallArgs,
    #[command(flatten)]
    pub kube: crate::k8s::KubeArgs,
    #[command(flatten)]
    pub admin: AgentAdminArgs,
}

/// The agent's HTTP endpoints (`run` and `node-agent`).
#[derive(Debug, Clone, Args)]
pub struct AgentAdminArgs {
    /// Readiness (/readyz), liveness (/healthz, /livez) and the pod dump (/debug/pods,
    /// answered to loopback peers only), as upstream's agent readiness port. `off`: none.
    #[arg(long, default_value = "0.0.0.0:8000")]
    pub admin_addr: Listen,
    /// Prometheus metrics (/metrics) of the agent and the engine, and of the proxy under
    /// `run` (one listener for both), plus the probes. `off`: none.
    #[arg(long, default_value = "0.0.0.0:15014")]
    pub metrics_addr: Listen,
}

/// The proxy's HTTP endpoints (`proxy`), on upstream's proxy ports.
#[derive(Debug, Clone, Args)]
pub struct ProxyAdminArgs {
    /// Readiness (/healthz/ready, /readyz) and liveness (/healthz, /livez). `off`: none.
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub admin_addr: Listen,
    /// Prometheus metrics (/metrics) of the proxy. `off`: none.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: Listen,
}

impl ProxyAdminArgs {
    /// No endpoints (the proxy inside `run`, whose agent serves them).
    pub fn off() -> Self {
        Self {
            admin_addr: Listen::Off,
            metrics_addr: Listen::Off,
        }
    }
}

/// Where the CNI plugin goes on the node.
#[derive(Debug, Clone, Args)]
pub struct CniInstallArgs {
    /// The runtime's CNI configuration directory.
    #[arg(long, default_value = cni::install::DEFAULT_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// The runtime's CNI binary directory (Debian's packages: /usr/lib/cni).
    #[arg(long, default_value = cni::install::DEFAULT_BIN_DIR)]
    pub cni_bin_dir: PathBuf,
    /// The redirect-cni binary to copy there. Default: next to this executable.
    #[arg(long)]
    pub cni_plugin_bin: Option<PathBuf>,
}

impl CniInstallArgs {
    fn config(&self, socket: PathBuf) -> Result<InstallConfig> {
        let plugin_bin = match &self.cni_plugin_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .context("finding this executable")?
                .with_file_name(cni::PLUGIN_TYPE),
        };
        Ok(InstallConfig {
            conf_dir: self.cni_conf_dir.clone(),
            bin_dir: self.cni_bin_dir.clone(),
            plugin_bin,
            socket,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum CniCommand {
    /// Copy the plugin binary and write our configuration ahead of the primary's, once.
    Install {
        #[command(flatten)]
        dirs: CniInstallArgs,
        /// The agent's plugin socket, written into the configuration.
        #[arg(long, default_value = cni::DEFAULT_SOCKET)]
        cni_socket: PathBuf,
    },
    /// Remove our configuration and the plugin binary (the primary's file is left alone).
    Uninstall {
        #[command(flatten)]
        dirs: CniInstallArgs,
    },
}

impl AgentArgs {
    /// The CNI plugin's socket.
    pub fn cni_socket(&self) -> PathBuf {
        self.cni_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join(cni::SOCKET_NAME))
    }

    /// Which pods the plugin's requests enrol: the cluster's answer in Kubernetes mode,
    /// else `--mesh-namespaces`.
    fn membership(&self, kube: &Option<Arc<crate::k8s::KubeWatch>>) -> Arc<dyn Membership> {
        match kube {
            Some(k) => k.clone(),
            None => Arc::new(StaticMembership::new(self.mesh_namespaces.clone())),
        }
    }

    /// The plugin socket (answering from `membership`) and, with `--cni-install`, the
    /// installation and its watch. Runs until dropped.
    async fn serve_cni(
        &self,
        agent: Agent,
        membership: Arc<dyn Membership>,
        installed: Option<Arc<AtomicBool>>,
    ) -> Result<()> {
        let socket = self.cni_socket();
        let install = if self.cni_install {
            Some(self.cni.config(socket.clone())?)
        } else {
            None
        };
        let watch = async move {
            match (install, installed) {
                (Some(cfg), Some(flag)) => cni::install::watch_reporting(cfg, &flag).await,
                (Some(cfg), None) => cni::install::watch(cfg).await,
                (None, _) => std::future::pending().await,
            }
        };
        tokio::select! {
            r = cni::server::serve(agent, membership, &socket) => r.map_err(Into::into),
            () = watch => bail!("the CNI configuration watch stopped"),
        }
    }

    /// `identity` unless the mark alone is to be trusted.
    fn identity(&self, identity: ProxyIdentity) -> ProxyIdentity {
        if self.trust_mark_only {
            ProxyIdentity::MarkOnly
        } else {
            identity
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// The node-agent protocol socket to connect to.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Open the DNS listeners (15053, UDP and TCP) in every pod.
    #[arg(long)]
    pub dns: bool,
    /// On SIGTERM, go on serving this long (a newer proxy takes the pods meanwhile and
    /// connections in flight finish), then exit.
    #[arg(long, default_value_t = 5)]
    pub drain_secs: u64,
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(flatten)]
    pub admin: ProxyAdminArgs,
}

/// The proxy's data path: HBONE (mutual TLS, HTTP/2 CONNECT) by default.
#[derive(Debug, Clone, Args)]
pub struct MeshArgs {
    /// Serve pods with the bare relay (no tunnel, no TLS): the redirection alone.
    #[arg(long)]
    pub bare_relay: bool,
    /// The mesh's trust domain (identities are spiffe://<td>/ns/<ns>/sa/<sa>).
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Certificates from files: <dir>/root-cert.pem and, per identity,
    /// <dir>/<namespace>/<service-account>/{cert-chain.pem,key.pem}; re-read when they change.
    #[arg(long, conflicts_with = "ca_dir")]
    pub certs_dir: Option<PathBuf>,
    /// The built-in CA's directory (root created there on first start, key mode 0600):
    /// proxies sharing it trust each other. Used unless --certs-dir is given. Default:
    /// <state-dir>/ca for `run`, /var/run/redirect/ca for `proxy`.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Remote workloads and policies, YAML (the upstream proxy's local workload file
    /// format); re-read when it changes. Enrolled pods are known without it.
    #[arg(long)]
    pub workloads: Option<PathBuf>,
    /// How HBONE destinations are reached unless the workload file says.
    #[arg(long, value_enum, default_value_t)]
    pub transport: DefaultTransport,
}

impl MeshArgs {
    /// The mesh data path, or `None` with `--bare-relay`. Call inside the runtime.
    pub fn build(&self) -> Result<Option<Arc<Mesh>>> {
        if self.bare_relay {
            info!("proxy: bare relay, no mesh data path");
            return Ok(None);
        }
        let source: Arc<dyn CertSource> = match &self.certs_dir {
            Some(dir) => Arc::new(
                FileCerts::open(dir)
                    .with_context(|| format!("certificates in {}", dir.display()))?,
            ),
            None => {
                let dir = self
                    .ca_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_CA_DIR));
                Arc::new(
                    LocalCa::open_or_create(&dir)
                        .with_context(|| format!("local CA in {}", dir.display()))?,
                )
            }
        };
        let registry = Arc::new(Registry::new());
        if let Some(path) = &self.workloads {
            let n = registry
                .load_file(path)
                .with_context(|| format!("workload file {}", path.display()))?;
            info!(path = %path.display(), workloads = n, "registry: workload file loaded");
            let _watch = registry.watch_file(path.clone(), std::time::Duration::from_secs(1));
        }
        let tls = Tls::new(source, &self.trust_domain);
        info!(trust_domain = self.trust_domain, transport = ?self.transport, "proxy: HBONE data path");
        Ok(Some(Mesh::new(tls, registry, self.transport)))
    }
}

#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// The running agent's state directory (its control socket is there).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum PodCommand {
    /// Enrol a pod: redirect it and hand it to the proxy.
    Add {
        /// The pod's network namespace (e.g. /var/run/netns/NAME or /proc/PID/ns/net).
        #[arg(long)]
        netns: PathBuf,
        #[arg(long)]
        uid: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// Capture DNS (port 53) to the proxy's 15053 sockets.
        #[arg(long)]
        dns_capture: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Un-enrol a pod.
    Del {
        #[arg(long)]
        uid: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// List the agent's pods.
    List {
        #[command(flatten)]
        control: ControlArgs,
    },
}

/// `run`: the node agent and the proxy in one process (the DaemonSet default).
///
/// A running agent on the same pin directory (a rolling upgrade with surge) is asked to
/// hand over first ([`handover`]). This one, in turn, hands over when a successor asks:
/// its agent side stops and its proxy serves on, detached, until SIGTERM, then until
/// its connections end or `--drain-secs` pass. Without a successor, SIGTERM keeps
/// everything serving for `--drain-secs`, then the process exits.
pub async fn run(agent: AgentArgs, mut proxy: ProxyArgs) -> Result<()> {
    privileges::check(privileges::Mode::Run)?;
    if proxy.mesh.ca_dir.is_none() {
        proxy.mesh.ca_dir = Some(agent.state_dir.join("ca"));
    }
    let term = signalled()?;
    let predecessor = take_over(&agent).await;
    // The proxy runs in this process: the engine trusts this process's cgroup, moving
    // it out of the root cgroup (shared with pods' apps) into one of its own first.
    let engine = Arc::new(open_engine(
        &agent,
        agent.identity(ProxyIdentity::OwnCgroup),
    )?);
    let a = Agent::new(engine.clone(), &agent.state_dir)?;
    if let Some(p) = predecessor {
        a.set_predecessor_serving(true);
        let a = a.clone();
        tokio::spawn(async move {
            p.trust_while_alive(engine).await;
            a.set_predecessor_serving(false);
        });
    }
    let mut handovers = a.accept_handovers();
    let kube = start_kube(&agent, &a, proxy.dns).await?;
    let proxy_cfg = ProxyConfig {
        socket: agent.socket.clone(),
        dns: proxy.dns,
        events: None,
        mesh: proxy.mesh.build()?,
    };
    let control_sock = agent.state_dir.join("control.sock");
    let proxy_metrics = ProxyMetrics::new();
    let open = proxy_metrics.clone();
    let proxy_handle = ProxyHandle::new();
    let proxy_task = tokio::spawn(
        InpodProxy::new(proxy_cfg)
            .with_metrics(proxy_metrics.clone())
            .with_handle(proxy_handle.clone())
            .run(),
    );
    let cni_installed = agent.cni_install.then(|| Arc::new(AtomicBool::new(false)));
    let admin = Admin::new(Parts {
        agent: Some(a.clone()),
        kube: kube.clone(),
        cni_installed: cni_installed.clone(),
        proxy: Some(proxy_metrics),
    });
    let mut drain_term = term.clone();
    let call = tokio::select! {
        r = a.serve(&agent.socket) => return r.map_err(Into::into),
        r = control::serve(a.clone(), &control_sock) => return r.context("control socket"),
        r = agent.serve_cni(a.clone(), agent.membership(&kube), cni_installed) => return r.context("CNI plugin socket"),
        r = admin::serve_both(admin.clone(), agent.admin.admin_addr, agent.admin.metrics_addr) => return r.context("admin endpoints"),
        Some(call) = handovers.recv() => call,
        () = drain_on_signal(&mut drain_term, proxy.drain_secs) => {
            proxy_task.abort();
            crate::ebpf::trust::leave_own_cgroup();
            return Ok(());
        }
    };
    // Handed over: the protocol, control and CNI sockets and the HTTP endpoints are
    // closed (the successor binds them), the watch and its reconciler stop with the last
    // handle; the proxy never reconnects (the socket's path is the successor's).
    proxy_handle.detach();
    drop(admin);
    drop(kube);
    let agent_side = a.clone();
    let cgroups = tokio::task::spawn_blocking(move || agent_side.hand_over())
        .await
        .context("handing over")?;
    let info = HandoverInfo {
        pid: std::process::id(),
        pin_dir: agent.pin_dir.clone(),
        cgroups,
    };
    info!(by = call.by, pin_dir = %info.pin_dir.display(), "agent: handed the node over; the proxy serves its connections on until SIGTERM and the drain");
    let _ = call.reply.send(Ok(info));
    drain_handed_over(term, &open, proxy.drain_secs).await;
    proxy_task.abort();
    crate::ebpf::trust::leave_own_cgroup();
    Ok(())
}

/// A running agent on our pin directory hands over; on failure (an agent of an earlier
/// version, or none answering) the engine waits for the owner to exit, as before.
async fn take_over(agent: &AgentArgs) -> Option<handover::Predecessor> {
    let wait = std::time::Duration::from_secs(agent.owner_wait_secs);
    match handover::take_over(&agent.state_dir, &agent.pin_dir, "agent", wait).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "agent: no handover; waiting for the owner of the pin directory to exit");
            None
        }
    }
}

/// When SIGTERM or SIGINT came, listened for from the start (None until then).
type Signalled = tokio::sync::watch::Receiver<Option<std::time::Instant>>;

fn signalled() -> Result<Signalled> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("shutting down; enrolled pods stay redirected");
        let _ = tx.send(Some(std::time::Instant::now()));
        // Keeps the sender: receivers wait on it.
        std::future::pending::<()>().await
    });
    Ok(rx)
}

async fn signal_time(rx: &mut Signalled) -> std::time::Instant {
    loop {
        if let Some(t) = *rx.borrow_and_update() {
            return t;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The signal, then the drain period, while everything else in the process serves.
async fn drain_on_signal(rx: &mut Signalled, secs: u64) {
    let at = signal_time(rx).await;
    info!(
        drain_secs = secs,
        "draining: serving on until the drain period ends"
    );
    tokio::time::sleep_until((at + std::time::Duration::from_secs(secs)).into()).await;
}

/// After a handover: the signal (its time, if it came before), then until the detached
/// proxy's connections have ended or the drain period is over.
async fn drain_handed_over(mut rx: Signalled, proxy: &ProxyMetrics, secs: u64) {
    let at = signal_time(&mut rx).await;
    let deadline = at + std::time::Duration::from_secs(secs);
    info!(
        drain_secs = secs,
        "draining: a successor has the node; serving this proxy's connections until they end or the drain period ends"
    );
    // Clients pooling HBONE connections to this proxy's inbound servers (the new
    // proxy's, connected during the swap) are told to go elsewhere.
    crate::proxy::hbone::drain_servers();
    loop {
        let left = proxy.open_connections() + crate::proxy::hbone::server_connections() as u64;
        if left == 0 {
            info!("draining: no connection left, exiting");
            return;
        }
        if std::time::Instant::now() >= deadline {
            info!(connections = left, "draining: drain period over, exiting");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `node-agent`: the agent alone; any proxy speaking the protocol may connect.
pub async fn node_agent(agent: AgentArgs) -> Result<()> {
    privileges::check(privileges::Mode::NodeAgent)?;
    // Connected proxies' cgroups are trusted while they are connected; those of the
    // previous agent's proxies while they reconnect (carried from the pinned state).
    let _ = take_over(&agent).await;
    let engine = Arc::new(open_engine(
        &agent,
        agent.identity(ProxyIdentity::Cgroups(Vec::new())),
    )?);
    let a = Agent::new(engine, &agent.state_dir)?;
    let mut handovers = a.accept_handovers();
    // The proxy is another process: whether it opens DNS listeners is not known here.
    let kube = start_kube(&agent, &a, false).await?;
    let control_sock = agent.state_dir.join("control.sock");
    let cni_installed = agent.cni_install.then(|| Arc::new(AtomicBool::new(false)));
    let admin = Admin::new(Parts {
        agent: Some(a.clone()),
        kube: kube.clone(),
        cni_installed: cni_installed.clone(),
        proxy: None,
    });
    let call = tokio::select! {
        r = a.serve(&agent.socket) => return r.map_err(Into::into),
        r = control::serve(a.clone(), &control_sock) => return r.context("control socket"),
        r = agent.serve_cni(a.clone(), agent.membership(&kube), cni_installed) => return r.context("CNI plugin socket"),
        r = admin::serve_both(admin.clone(), agent.admin.admin_addr, agent.admin.metrics_addr) => return r.context("admin endpoints"),
        Some(call) = handovers.recv() => call,
        () = shutdown() => return Ok(()),
    };
    // Handed over: the proxies lose this agent and reconnect to the successor (which
    // takes the socket's path), serving their pods meanwhile. The process stays until
    // it is stopped: exiting by itself would have a supervisor (the kubelet) start it
    // again, and that one would ask the successor to hand back.
    drop(admin);
    drop(kube);
    let agent_side = a.clone();
    let cgroups = tokio::task::spawn_blocking(move || agent_side.hand_over())
        .await
        .context("handing over")?;
    info!(
        by = call.by,
        "agent: handed the node over; idle until stopped"
    );
    let _ = call.reply.send(Ok(HandoverInfo {
        pid: std::process::id(),
        pin_dir: agent.pin_dir.clone(),
        cgroups,
    }));
    shutdown().await;
    Ok(())
}

/// Kubernetes mode: the watch and its reconciler beside the agent (until the handle is
/// dropped), or `None` when it is off.
async fn start_kube(
    args: &AgentArgs,
    agent: &Agent,
    dns_capture: bool,
) -> Result<Option<Arc<crate::k8s::KubeWatch>>> {
    match args.kube.config(dns_capture)? {
        Some(cfg) => Ok(Some(crate::k8s::start(cfg, agent.clone()).await?)),
        None => Ok(None),
    }
}

/// `proxy`: the proxy alone, driven by any node agent speaking the protocol.
pub async fn proxy(args: ProxyArgs) -> Result<()> {
    privileges::check(privileges::Mode::Proxy)?;
    let cfg = ProxyConfig {
        mesh: args.mesh.build()?,
        socket: args.socket,
        dns: args.dns,
        events: None,
    };
    let metrics = ProxyMetrics::new();
    let task = tokio::spawn(InpodProxy::new(cfg).with_metrics(metrics.clone()).run());
    let admin = Admin::new(Parts {
        proxy: Some(metrics),
        ..Parts::default()
    });
    let r = tokio::select! {
        r = admin::serve_both(admin, args.admin.admin_addr, args.admin.metrics_addr) => r.context("admin endpoints"),
        () = drain_on_shutdown(args.drain_secs) => Ok(()),
    };
    task.abort();
    r
}

/// Waits for SIGTERM or SIGINT, then for the drain period, while everything else in
/// the process goes on serving.
async fn drain_on_shutdown(secs: u64) {
    shutdown().await;
    info!(
        drain_secs = secs,
        "draining: serving on until the drain period ends"
    );
    tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
}

fn open_engine(agent: &AgentArgs, proxy_identity: ProxyIdentity) -> Result<Engine> {
    let cfg = EngineConfig {
        pin_dir: agent.pin_dir.clone(),
        proxy_identity,
        owner_wait: std::time::Duration::from_secs(agent.owner_wait_secs),
        ..EngineConfig::default()
    };
    Engine::open(cfg).context("starting the redirection engine")
}

/// SIGTERM or SIGINT. The pods stay redirected (and refuse connections) after exit.
async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("shutting down; enrolled pods stay redirected");
}

/// One request to the running agent; its refusal becomes an error.
async fn call(control: &ControlArgs, req: &ControlRequest) -> Result<control::ControlResponse> {
    let r = control::request(&control.state_dir.join("control.sock"), req).await?;
    if !r.ok {
        bail!("{}", r.error.unwrap_or_default());
    }
    Ok(r)
}

pub async fn pod(cmd: PodCommand) -> Result<()> {
    match cmd {
        PodCommand::Add {
            netns,
            uid,
            name,
            namespace,
            service_account,
            dns_capture,
            control,
        } => {
            let pod = PodSpec {
                uid,
                name,
                namespace,
                service_account,
                netns,
                dns_capture,
            };
            let r = call(&control, &ControlRequest::Add { pod }).await?;
            println!("{}", serde_json::to_string(&r.state)?);
            Ok(())
        }
        PodCommand::Del { uid, control } => {
            call(&control, &ControlRequest::Del { uid }).await?;
            Ok(())
        }
        PodCommand::List { control } => {
            let r = call(&control, &ControlRequest::List).await?;
            for p in r.pods.unwrap_or_default() {
                let s = &p.status;
                println!(
                    "{}\t{}/{}\t{}\t{}",
                    s.spec.uid,
                    s.spec.namespace,
                    s.spec.name,
                    serde_json::to_string(&s.state)?,
                    s.spec.netns.display()
                );
            }
            Ok(())
        }
    }
}

pub async fn status(control: ControlArgs, json: bool) -> Result<()> {
    let r = call(&control, &ControlRequest::Status).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "pinned state: {}",
        r.pin_dir
            .as_deref()
            .unwrap_or(std::path::Path::new("?"))
            .display()
    );
    println!(
        "proxies connected (pids): {:?}",
        r.proxies.unwrap_or_default()
    );
    for p in r.pods.unwrap_or_default() {
        let s = &p.status;
        println!(
            "pod {} ({}/{}) state={} id={} interfaces={} sockets={}",
            s.spec.uid,
            s.spec.namespace,
            s.spec.name,
            serde_json::to_string(&s.state)?,
            p.id.map(|i| i.to_string()).unwrap_or("-".into()),
            p.interfaces.join(","),
            p.sockets.join(","),
        );
        if let Some(c) = p.counters {
            println!(
                "    redirected 15001={} 15006={} 15008={} 15053={}  bypassed probe={} loopback={} proxy={}  dropped no_listener={} spoofed={} unparsable={} error={}",
                c.redirected_15001,
                c.redirected_15006,
                c.redirected_15008,
                c.redirected_15053,
                c.bypassed_probe,
                c.bypassed_loopback,
                c.bypassed_proxy,
                c.dropped_no_listener,
                c.dropped_spoofed,
                c.dropped_unparsable,
                c.dropped_error
            );
        }
    }
    Ok(())
}

/// `redirect-user cni install|uninstall`.
pub fn cni(cmd: CniCommand) -> Result<()> {
    match cmd {
        CniCommand::Install { dirs, cni_socket } => {
            let cfg = dirs.config(cni_socket)?;
            let pass = cni::install::install(cfg).context("installing the CNI plugin")?;
            let (cni::install::Pass::Written { primary }
            | cni::install::Pass::Unchanged { primary }) = pass;
            println!(
                "{} written (primary: {primary}), {} installed",
                dirs.cni_conf_dir.join(cni::install::CONF_NAME).display(),
                dirs.cni_bin_dir.join(cni::PLUGIN_TYPE).display()
            );
            Ok(())
        }
        CniCommand::Uninstall { dirs } => {
            cni::install::uninstall(&dirs.cni_conf_dir, &dirs.cni_bin_dir)
                .context("uninstalling the CNI plugin")
        }
    }
}
