//! Fixtures for the privileged integration tests: a topology of namespaces, an engine
//! of its own (own bpffs directory), the bare relay as the proxy of each enrolled pod,
//! apps, and helpers to look at what the kernel holds. Everything is removed on drop,
//! on failure too.

/// The agent's image, built by the code of `cargo xtask image` (shared as source).
#[path = "../../xtask/src/image.rs"]
pub mod agent_image;
pub mod capture;
pub mod cluster;
pub mod cri;
pub mod fakeapi;
/// OCI image-layout archives, shared as source with `cargo xtask image`.
#[path = "../../xtask/src/oci.rs"]
pub mod oci;
pub mod raw;
pub mod traffic;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
pub use redirect_user::{
    ebpf::{Engine, EngineConfig, EnrolOutcome, PodOptions, ProxyIdentity},
    netns::Netns,
    proxy::{PodListeners, relay::AcceptEvent},
    topology::{Host, Topology},
};
use redirect_user::{
    interrupt::Registered,
    proxy::{
        registry::{Protocol, Transport, Workload},
        relay::Relay,
    },
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

pub const APP_PORT: u16 = 8080;
pub const PEER_PORT: u16 = 9090;

/// Pods and outside peers on one bridge, with an engine of their own.
pub struct Mesh {
    pub rt: tokio::runtime::Runtime,
    pub topo: Topology,
    pub engine: Engine,
    pub pin_dir: PathBuf,
    relays: Mutex<HashMap<String, Relay>>,
    /// Pods served by a mesh data path ([`Mesh::enrol_mesh`]): the proxy that has them.
    mesh_pods: Mutex<HashMap<String, Arc<redirect_user::proxy::mesh::Mesh>>>,
    tx: UnboundedSender<AcceptEvent>,
    rx: Mutex<UnboundedReceiver<AcceptEvent>>,
    /// The pin directory, removed on SIGINT/SIGTERM (the topology registers its own).
    _interrupt: Registered,
}

impl Mesh {
    /// `hosts`: (name, last address byte). Nothing is enrolled yet; every host runs an
    /// echo app on APP_PORT and PEER_PORT, both families.
    pub fn new(tag: &str, hosts: &[(&str, u16)]) -> Result<Self> {
        Self::with_config(tag, hosts, |_| {})
    }

    /// Like `new`, with changes to the engine's configuration.
    pub fn with_config(
        tag: &str,
        hosts: &[(&str, u16)],
        cfg: impl FnOnce(&mut EngineConfig),
    ) -> Result<Self> {
        let mut topo = Topology::new(tag)?;
        for (name, n) in hosts {
            topo.add_host(name, *n)?;
        }
        for (name, _) in hosts {
            let h = topo.host(name);
            let ns = h.netns()?;
            for v6 in [false, true] {
                for port in [APP_PORT, PEER_PORT] {
                    echo_server(&ns, name, SocketAddr::new(h.addr(v6), port))?;
                }
            }
        }
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/{}",
            topo.node().trim_end_matches("-node")
        ));
        let interrupt = redirect_user::interrupt::path(&pin_dir);
        let mut config = EngineConfig::at(&pin_dir);
        cfg(&mut config);
        let engine = match Engine::open(config) {
            Ok(e) => e,
            Err(e) => {
                // What it pinned before failing goes with it.
                let _ = std::fs::remove_dir_all(&pin_dir);
                return Err(e).context("opening the engine");
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (tx, rx) = unbounded_channel();
        Ok(Self {
            rt,
            topo,
            engine,
            pin_dir,
            relays: Mutex::new(HashMap::new()),
            mesh_pods: Mutex::new(HashMap::new()),
            tx,
            rx: Mutex::new(rx),
            _interrupt: interrupt,
        })
    }

    pub fn host(&self, name: &str) -> &Host {
        self.topo.host(name)
    }

    /// This mesh's unique name (its pin directory's), for more directories of its own.
    pub fn base(&self) -> String {
        self.pin_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    pub fn ns(&self, name: &str) -> Netns {
        self.host(name).netns().expect("namespace")
    }

    pub fn addr(&self, name: &str, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.host(name).addr(v6), port)
    }

    /// Opens the pod's proxy listeners, enrols it and starts the relay behind them.
    pub fn enrol(&self, name: &str, options: PodOptions) -> Result<EnrolOutcome> {
        let ns = self.ns(name);
        let listeners = PodListeners::open(&ns, options.dns_capture)?;
        let out = self
            .engine
            .enrol(name, &ns, &options, &listeners.sockets())?;
        let _guard = self.rt.enter();
        let relay = Relay::start(name, ns, listeners, Some(self.tx.clone()))?;
        self.relays.lock().unwrap().insert(name.into(), relay);
        Ok(out)
    }

    /// The workload of pod `name` as a mesh proxy registers it: namespace `default`,
    /// service account `sa-<name>`, both addresses, HBONE, enrolled on this node.
    pub fn workload(&self, name: &str) -> Workload {
        let h = self.host(name);
        Workload {
            uid: name.into(),
            name: name.into(),
            namespace: "default".into(),
            service_account: format!("sa-{name}"),
            trust_domain: None,
            ips: vec![h.v4.into(), h.v6.into()],
            protocol: Protocol::Hbone,
            transport: Transport::Tcp,
            node: "node1".into(),
            services: Vec::new(),
            local: true,
        }
    }

    /// Like [`Mesh::enrol`], with `mesh`'s full data path behind the listeners (HBONE
    /// on 15001 and 15008) instead of the bare relay; the pod is registered in `mesh`
    /// as [`Mesh::workload`] until its proxy stops.
    pub fn enrol_mesh(
        &self,
        name: &str,
        options: PodOptions,
        mesh: &Arc<redirect_user::proxy::mesh::Mesh>,
    ) -> Result<EnrolOutcome> {
        let ns = self.ns(name);
        let listeners = PodListeners::open(&ns, options.dns_capture)?;
        let out = self
            .engine
            .enrol(name, &ns, &options, &listeners.sockets())?;
        let _guard = self.rt.enter();
        let pod = mesh.pod(self.workload(name), ns.try_clone()?)?;
        let relay = Relay::start_mesh(name, ns, listeners, Some(self.tx.clone()), pod)?;
        self.relays.lock().unwrap().insert(name.into(), relay);
        self.mesh_pods
            .lock()
            .unwrap()
            .insert(name.into(), mesh.clone());
        Ok(out)
    }

    /// Stops the pod's proxy: its listeners close, the pod stays enrolled (and leaves
    /// the registry of the mesh proxy that served it, if any).
    pub fn stop_proxy(&self, name: &str) {
        if let Some(r) = self.relays.lock().unwrap().remove(name) {
            self.rt.block_on(r.stop());
        }
        if let Some(mesh) = self.mesh_pods.lock().unwrap().remove(name) {
            mesh.forget(name);
        }
    }

    pub fn unenrol(&self, name: &str) -> Result<bool> {
        self.stop_proxy(name);
        Ok(self.engine.unenrol(name)?)
    }

    /// The accept events since the last call (waits for stragglers).
    pub fn events(&self) -> Vec<AcceptEvent> {
        std::thread::sleep(Duration::from_millis(50));
        let mut rx = self.rx.lock().unwrap();
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e);
        }
        out
    }

    pub fn counters(&self, pod: &str) -> redirect_ebpf::PodCounters {
        self.engine.counters(pod).expect("counters")
    }

    /// `bpftool -j map dump pinned <pin_dir>/maps/<name>`.
    pub fn dump_map(&self, name: &str) -> Result<Vec<serde_json::Value>> {
        let path = self.pin_dir.join("maps").join(name);
        bpftool_json(&["map", "dump", "pinned", path.to_str().unwrap()])
            .map(|v| v.as_array().cloned().unwrap_or_default())
    }
}

/// Stops every relay in `relays` (their listeners are closed on return).
pub(crate) fn stop_relays(rt: &tokio::runtime::Runtime, relays: &Mutex<HashMap<String, Relay>>) {
    let all: Vec<Relay> = relays.lock().unwrap().drain().map(|(_, r)| r).collect();
    for r in all {
        rt.block_on(r.stop());
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        stop_relays(&self.rt, &self.relays);
        self.mesh_pods.lock().unwrap().clear();
        for p in self.engine.pods() {
            let _ = self.engine.unenrol(&p.uid);
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

pub fn bpftool_json(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `ip -n NS ARGS…` output.
pub fn ip_out(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tc -n NS ARGS…` output.
pub fn tc_out(ns: &str, args: &[&str]) -> String {
    let out = Command::new("tc")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .expect("tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An echo app: answers each line with `<who> from <peer> got <line>`.
pub fn echo_server(ns: &Netns, who: &str, addr: SocketAddr) -> Result<()> {
    redirect_user::demo::echo_server(ns, who, addr)
}

/// One line exchanged over a new connection from inside `ns`.
pub fn ask(ns: &Netns, to: SocketAddr) -> Result<String> {
    redirect_user::demo::ask(ns, to, "hello")
}

/// Like `ask`, from a socket bound to `source` (port chosen by the kernel).
pub fn ask_from(ns: &Netns, source: IpAddr, to: SocketAddr) -> Result<String> {
    let args = redirect_user::probe::ProbeArgs {
        netns: format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(ns))
        ),
        mark: None,
        source: Some(source),
        timeout: 3,
        send: "hello".into(),
        addr: to,
    };
    redirect_user::probe::exchange(&args)
}

/// A UDP echo server (answers each datagram with `<who>:<datagram>`).
pub fn udp_echo(ns: &Netns, who: &str, addr: SocketAddr) -> Result<()> {
    let s = ns.run(|| UdpSocket::bind(addr))??;
    let who = who.to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let mut out = format!("{who}:").into_bytes();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from);
        }
    });
    Ok(())
}

/// One datagram to `to` from inside `ns`; the answer and the address it came from.
pub fn udp_ask(ns: &Netns, to: SocketAddr, msg: &str) -> Result<(String, SocketAddr)> {
    let bind: SocketAddr = if to.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let s = ns.run(|| UdpSocket::bind(bind))??;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.send_to(msg.as_bytes(), to)?;
    let mut buf = [0u8; 1500];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// A server that, on each connection, sends `bytes` of a known pattern while reading
/// and checking the same pattern from the client, then reports the digest it read.
pub fn bulk_server(ns: &Netns, addr: SocketAddr, bytes: usize) -> Result<()> {
    let l = ns.run(|| TcpListener::bind(addr))??;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    let _ = write_pattern(&mut w, bytes, 7);
                    let _ = w.shutdown(std::net::Shutdown::Write);
                });
                let mut r = s;
                let _ = check_pattern(&mut r, bytes, 3);
                let _ = writer.join();
            });
        }
    });
    Ok(())
}

/// A deterministic byte stream: `seed` picks it.
pub fn pattern_byte(i: usize, seed: u8) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8 ^ seed
}

pub fn write_pattern(w: &mut impl Write, bytes: usize, seed: u8) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut i = 0;
    while i < bytes {
        let n = buf.len().min(bytes - i);
        for (k, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern_byte(i + k, seed);
        }
        w.write_all(&buf[..n])?;
        i += n;
    }
    Ok(())
}

/// Reads to EOF; Ok(n) if every byte matched the pattern, an error at the first mismatch.
pub fn check_pattern(r: &mut impl Read, bytes: usize, seed: u8) -> std::io::Result<usize> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut i = 0;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            // A signal for another thread of the test process (a child exiting).
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for (k, b) in buf[..n].iter().enumerate() {
            if *b != pattern_byte(i + k, seed) {
                return Err(std::io::Error::other(format!("byte {} differs", i + k)));
            }
        }
        i += n;
    }
    if i != bytes {
        return Err(std::io::Error::other(format!(
            "got {i} bytes, expected {bytes}"
        )));
    }
    Ok(i)
}

/// Connects from `ns` to `to`, sends `bytes` and checks the `bytes` that come back.
pub fn bulk_exchange(ns: &Netns, to: SocketAddr, bytes: usize) -> Result<()> {
    let s = ns.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))??;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || {
        let r = write_pattern(&mut w, bytes, 3);
        let _ = w.shutdown(std::net::Shutdown::Write);
        r
    });
    let mut r = s;
    check_pattern(&mut r, bytes, 7).context("checking what came back")?;
    writer.join().unwrap().context("sending")?;
    Ok(())
}

/// The lines of a file-like reader (for tests reading `ip` output).
pub fn lines(s: &str) -> Vec<String> {
    BufReader::new(s.as_bytes())
        .lines()
        .map_while(Result::ok)
        .collect()
}

/// A cgroup v2 group for processes that play an app: not the proxy's cgroup.
pub struct AppCgroup {
    pub path: PathBuf,
    /// Made by this fixture (and removed when dropped, or on SIGINT/SIGTERM); false
    /// for the root cgroup.
    made: bool,
    _interrupt: Option<Registered>,
}

impl AppCgroup {
    pub fn new(tag: &str) -> Result<Self> {
        let root = redirect_user::ebpf::cgroup2_mount().context("no cgroup2 mounted")?;
        let path = root.join(format!("redirect-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        let p = path.clone();
        let interrupt = redirect_user::interrupt::custom("app cgroup", move || {
            let _ = std::fs::remove_dir(&p);
        });
        Ok(Self {
            path,
            made: true,
            _interrupt: Some(interrupt),
        })
    }

    /// The root of the cgroup2 hierarchy, where every process of this kind of machine
    /// sits unless moved: apps that nobody sorted into a cgroup.
    pub fn root() -> Result<Self> {
        let path = redirect_user::ebpf::cgroup2_mount().context("no cgroup2 mounted")?;
        Ok(Self {
            path,
            made: false,
            _interrupt: None,
        })
    }

    /// The cgroup id (`bpf_skb_cgroup_id` of its sockets).
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).map(|m| m.ino()).unwrap_or(0)
    }

    /// Runs `redirect-user probe ARGS…` inside this cgroup; its stdout, or an error.
    pub fn probe(&self, args: &[&str]) -> Result<String> {
        let bin = redirect_user_bin()?;
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {} probe {}",
            self.path.display(),
            bin.display(),
            args.join(" ")
        );
        let out = Command::new("sh").arg("-c").arg(&script).output()?;
        if !out.status.success() {
            bail!(
                "probe failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for AppCgroup {
    fn drop(&mut self) {
        if self.made {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// The `redirect-user` binary (built by `cargo xtask test` before the tests run).
/// The workspace's root directory (for [`agent_image`]).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

pub fn redirect_user_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REDIRECT_USER_BIN") {
        return Ok(p.into());
    }
    // target/<profile>/deps/<test> -> target/<profile>/redirect-user
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("redirect-user"))
        .context("no target dir")?;
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p redirect-user`",
            bin.display()
        );
    }
    Ok(bin)
}

/// The `redirect-cni` plugin binary, built with `redirect-user` (same package) next to it.
pub fn redirect_cni_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REDIRECT_CNI_BIN") {
        return Ok(p.into());
    }
    let bin = redirect_user_bin()?.with_file_name("redirect-cni");
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p redirect-user`",
            bin.display()
        );
    }
    Ok(bin)
}

/// The netfilter design this project replaces: the in-pod rule set of inpod-rules.md,
/// applied as the node agent it comes from does (iptables-restore inside the pod's
/// namespace, the return-routing rule and routes over netlink). For side-by-side runs.
pub mod netfilter {
    use std::{
        io::Write,
        os::{
            fd::{AsFd, AsRawFd},
            unix::process::CommandExt,
        },
        process::{Command, Stdio},
    };

    use anyhow::{Context, Result, bail};
    use redirect_ebpf::{MARK_MASK, RETURN_MARK, ROUTE_TABLE, RULE_PREF};
    use redirect_user::netlink::Netlink;

    use super::Netns;

    /// The rule set the engine replaces (inpod-rules.md), IPv4 form.
    pub const RULES_V4: &str = concat!(
        "*mangle\n",
        ":ISTIO_PRERT - [0:0]\n",
        ":ISTIO_OUTPUT - [0:0]\n",
        "-A PREROUTING -j ISTIO_PRERT\n",
        "-A OUTPUT -j ISTIO_OUTPUT\n",
        "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff\n",
        "-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff\n",
        "COMMIT\n",
        "*nat\n",
        ":ISTIO_PRERT - [0:0]\n",
        ":ISTIO_OUTPUT - [0:0]\n",
        "-A PREROUTING -j ISTIO_PRERT\n",
        "-A OUTPUT -j ISTIO_OUTPUT\n",
        "-A ISTIO_PRERT -s 169.254.7.127 -p tcp -m tcp -j ACCEPT\n",
        "-A ISTIO_OUTPUT -d 169.254.7.127 -p tcp -m tcp -j ACCEPT\n",
        "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006\n",
        "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT\n",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT\n",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001\n",
        "COMMIT\n",
    );

    pub fn rules_v6() -> String {
        RULES_V4
            .replace("169.254.7.127", "fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
            .replace("127.0.0.1/32", "::1/128")
    }

    /// Runs `prog` inside the namespace (entered between fork and exec), feeding `input`.
    pub fn restore_in(ns: &Netns, prog: &str, input: &str) -> Result<()> {
        let fd = ns.as_fd().as_raw_fd();
        let mut cmd = Command::new(prog);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setns is async-signal-safe; the fd stays open in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("running {prog}"))?;
        child.stdin.take().unwrap().write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{prog}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// What the netfilter design does to enrol one pod.
    pub fn enrol(ns: &Netns, v6_rules: &str) -> Result<()> {
        restore_in(ns, "iptables-restore", RULES_V4)?;
        restore_in(ns, "ip6tables-restore", v6_rules)?;
        return_routing(ns, true)
    }

    pub fn unenrol(ns: &Netns) -> Result<()> {
        for prog in ["iptables-restore", "ip6tables-restore"] {
            restore_in(ns, prog, "*mangle\nCOMMIT\n*nat\nCOMMIT\n")?;
        }
        return_routing(ns, false)
    }

    /// The return-routing rule and routes of inpod-rules.md, added or removed.
    fn return_routing(ns: &Netns, add: bool) -> Result<()> {
        ns.run(|| -> Result<()> {
            let mut nl = Netlink::open()?;
            let lo = nl
                .links()?
                .into_iter()
                .find(|l| l.loopback)
                .context("no lo")?
                .index;
            for v6 in [false, true] {
                if add {
                    nl.add_rule(v6, RETURN_MARK, MARK_MASK, RULE_PREF, ROUTE_TABLE)?;
                    nl.add_local_default(v6, lo, ROUTE_TABLE)?;
                } else {
                    nl.del_rule(v6, RETURN_MARK, MARK_MASK, RULE_PREF, ROUTE_TABLE)?;
                    nl.del_local_default(v6, lo, ROUTE_TABLE)?;
                }
            }
            Ok(())
        })?
    }
}

/// Running `redirect-user` (and other programs) as separate processes, as users do.
pub mod process {
    use std::{
        path::{Path, PathBuf},
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use redirect_user::interrupt::Registered;

    use super::redirect_user_bin;

    /// A child process killed when dropped (on failure too), or on SIGINT/SIGTERM.
    pub struct Proc(
        pub Child,
        #[allow(dead_code, reason = "held: dropping it takes the entry out")] Registered,
    );

    impl Proc {
        /// Takes `child` in: killed when this is dropped, or on SIGINT/SIGTERM.
        pub fn adopt(child: Child) -> Proc {
            let registered = redirect_user::interrupt::process(child.id());
            Proc(child, registered)
        }

        /// `redirect-user ARGS…`, its logs to `log`.
        pub fn spawn(args: &[&str], log: &Path) -> Proc {
            let out = std::fs::File::create(log).unwrap();
            let child = Command::new(redirect_user_bin().unwrap())
                .args(args)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(out)
                .spawn()
                .unwrap();
            Proc::adopt(child)
        }

        /// `redirect-user ARGS…` started inside the cgroup at `cgroup` (its directory
        /// under the cgroup2 mount), its logs to `log`.
        pub fn spawn_in(cgroup: &Path, args: &[&str], log: &Path) -> Proc {
            use std::os::unix::process::CommandExt;
            let out = std::fs::File::create(log).unwrap();
            let procs =
                std::ffi::CString::new(cgroup.join("cgroup.procs").to_str().unwrap().as_bytes())
                    .unwrap();
            let mut cmd = Command::new(redirect_user_bin().unwrap());
            cmd.args(args)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(out);
            // SAFETY: between fork and exec only async-signal-safe calls: open, write,
            // close, getpid, on buffers made before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let mut buf = [0u8; 12];
                    let mut i = buf.len();
                    let mut pid = libc::getpid() as u32;
                    loop {
                        i -= 1;
                        buf[i] = b'0' + (pid % 10) as u8;
                        pid /= 10;
                        if pid == 0 {
                            break;
                        }
                    }
                    let n = libc::write(fd, buf[i..].as_ptr().cast(), buf.len() - i);
                    libc::close(fd);
                    if n < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Proc::adopt(cmd.spawn().unwrap())
        }

        /// `redirect-user node-agent` with its socket and state in `dir` (created) and
        /// its pinned state in `pin`; returns once its protocol socket exists. The
        /// socket is `<dir>/zds.sock`.
        pub fn node_agent(dir: &Path, pin: &str, log: &Path) -> Proc {
            std::fs::create_dir_all(dir).unwrap();
            let d = dir.to_str().unwrap();
            let sock = dir.join("zds.sock");
            let p = Proc::spawn(
                &[
                    "node-agent",
                    "--socket",
                    sock.to_str().unwrap(),
                    "--state-dir",
                    d,
                    "--pin-dir",
                    pin,
                ],
                log,
            );
            wait_for("agent socket", 15, || sock.exists());
            p
        }

        pub fn pid(&self) -> i32 {
            self.0.id() as i32
        }

        /// Sends `sig` and waits for the process to end.
        pub fn signal(&mut self, sig: i32) {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(self.pid(), sig) };
            let _ = self.0.wait();
        }
    }

    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// `redirect-user ARGS…`: its stdout, or an error with its stderr.
    pub fn cli(args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(redirect_user_bin()?).args(args).output()?;
        if !out.status.success() {
            anyhow::bail!(
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `redirect-user pod add` for a pod named `name` (uid `uid-<name>`, namespace
    /// default, service account sa) in the namespace at `netns`.
    pub fn pod_add(state_dir: &str, netns: &str, name: &str) -> anyhow::Result<String> {
        let uid = format!("uid-{name}");
        cli(&[
            "pod",
            "add",
            "--state-dir",
            state_dir,
            "--netns",
            netns,
            "--uid",
            &uid,
            "--name",
            name,
            "--namespace",
            "default",
            "--service-account",
            "sa",
        ])
    }

    /// Polls `ok` for up to `secs` seconds; panics naming `what` if it never holds.
    pub fn wait_for(what: &str, secs: u64, ok: impl Fn() -> bool) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            if ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{what}: not reached in {secs} s");
    }

    /// A running agent's pods by uid, as `status --json` shows them (none when it
    /// does not answer).
    pub fn pods_by_uid(state_dir: &str) -> std::collections::BTreeMap<String, serde_json::Value> {
        let Ok(out) = cli(&["status", "--json", "--state-dir", state_dir]) else {
            return Default::default();
        };
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v["pods"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| Some((p["spec"]["uid"].as_str()?.to_string(), p)))
            .collect()
    }

    /// A pod uid unique on this machine, a UUID as the kubelet's cgroup paths carry it
    /// (agents under test scan the whole /proc for them).
    pub fn pod_uid() -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(1);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id())
    }

    /// Polls `ok` for `ms` milliseconds and asserts it holds throughout (for "never").
    pub fn holds_for(what: &str, ms: u64, ok: impl Fn() -> bool) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(ms) {
            assert!(ok(), "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A directory (or a file) removed when dropped, on failure too, and on SIGINT/SIGTERM.
    pub struct RemoveDir(
        pub PathBuf,
        #[allow(dead_code, reason = "held: dropping it takes the entry out")] Registered,
    );

    impl RemoveDir {
        pub fn new(path: impl Into<PathBuf>) -> RemoveDir {
            let path = path.into();
            let registered = redirect_user::interrupt::path(&path);
            RemoveDir(path, registered)
        }
    }

    impl Drop for RemoveDir {
        fn drop(&mut self) {
            // A file given instead of a directory goes too.
            if std::fs::remove_dir_all(&self.0).is_err() {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }
}
