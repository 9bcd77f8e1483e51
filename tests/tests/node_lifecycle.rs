//! The agent's life on a node (issue 9, item 5), as processes driven as a node drives
//! them, with traffic running and a capture of the pods' interfaces:
//!
//! - a rolling upgrade of `redirect-user run` (agent and proxy in one process): a second
//!   process starts beside the first on the same state and pin directories, the first
//!   hands over and drains; no connection of an enrolled pod fails, a long-lived one
//!   survives, a pod added during the swap is redirected from its first connection;
//! - a node reboot, simulated: what a reboot takes away goes (the agent, the bpffs pins,
//!   the pods' namespaces with their programs, the state directory), the CNI
//!   configuration stays; a pod (re)created before the agent is back is refused by the
//!   plugin, and once the agent is back the runtime's retry enrols it;
//! - `redirect-user uninstall`: every pod released and working directly, nothing of
//!   ours left.
//!
//! Pods are namespaces on a bridge (tests/src topology); "the runtime" is this test
//! running the real `redirect-cni` binary as a runtime runs the chain. Pods talk to each
//! other over HBONE (our proxy's default data path): on the pods' interfaces an enrolled
//! pod's traffic is TLS to 15008, so any frame to or from the apps' ports, or holding
//! the apps' plaintext, is a connection that escaped the proxy.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redirect_tests::{
    capture::{Capture, Frames, Proto},
    process::{Proc, RemoveDir, cli, wait_for},
    *,
};
use serde_json::{Value, json};

/// The apps' port: each pod answers `<name> from <peer> got <line>` there.
const APP: u16 = PEER_PORT;
/// A byte echo in each pod, for the long-lived connection.
const STREAM: u16 = 7070;
/// What the apps exchange: never on the wire while the pods are enrolled.
const PLAIN: &[u8] = b"got hello";
/// Kubernetes namespace of the pods (the agent's `--mesh-namespaces`).
const MESH: &str = "mesh";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` on 127.0.0.1:`port`: the status, if anything answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split(' ').nth(1)?.parse().ok()
}

/// A byte echo on `addr` inside `ns`.
fn byte_echo(ns: &Netns, addr: SocketAddr) {
    let l = ns.run(|| TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
}

/// A node: pods, the agents started on it (killed on drop), their directories.
struct Node {
    topo: Topology,
    /// Holds the state directory, the runtime's CNI directories and the agents' logs.
    root: PathBuf,
    /// The agents' state directory (`/var/run/redirect` on a node).
    dir: PathBuf,
    pin: String,
    /// The agents' readiness port (every agent binds the same one, as on the host
    /// network).
    admin: u16,
    /// The runtime's CNI directories, with `--cni-install`.
    cni_dirs: Option<(PathBuf, PathBuf)>,
    agents: Vec<Proc>,
    logs: Vec<PathBuf>,
    /// Each pod's end of the wire: its veth's peer on the node's bridge.
    ports: Mutex<HashMap<String, String>>,
    _rm: (RemoveDir, RemoveDir),
}

impl Node {
    fn new(tag: &str, pods: &[(&str, u16)]) -> Node {
        let mut topo = Topology::new(tag).unwrap();
        for (n, i) in pods {
            topo.add_host(n, *i).unwrap();
        }
        let base = topo.node().trim_end_matches("-node").to_string();
        let root = PathBuf::from(format!("/tmp/{base}"));
        let dir = root.join("state");
        std::fs::create_dir_all(&dir).unwrap();
        let pin = format!("/sys/fs/bpf/{base}");
        let n = Node {
            topo,
            _rm: (RemoveDir::new(root.clone()), RemoveDir::new(pin.clone())),
            root,
            dir,
            pin,
            admin: free_port(),
            cni_dirs: None,
            agents: Vec::new(),
            logs: Vec::new(),
            // The topology names the bridge ports v1, v2, … in the order of the pods.
            ports: Mutex::new(
                pods.iter()
                    .enumerate()
                    .map(|(i, (p, _))| (p.to_string(), format!("v{}", i + 1)))
                    .collect(),
            ),
        };
        for (name, _) in pods {
            n.apps(name);
        }
        n
    }

    /// The apps of pod `name`: the line echo on APP and the byte echo on STREAM.
    fn apps(&self, name: &str) {
        let h = self.topo.host(name);
        let ns = h.netns().unwrap();
        echo_server(&ns, name, SocketAddr::new(h.addr(false), APP)).unwrap();
        byte_echo(&ns, SocketAddr::new(h.addr(false), STREAM));
    }

    fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn cni_socket(&self) -> PathBuf {
        self.dir.join("cni.sock")
    }

    /// The runtime's CNI directories, with a primary configuration in place, for
    /// `--cni-install`.
    fn with_cni_dirs(&mut self) {
        let conf = self.root.join("net.d");
        let bin = self.root.join("bin");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        let primary = json!({
            "cniVersion": "1.0.0",
            "name": "pods",
            "plugins": [{"type": "bridge", "bridge": "br0"}],
        });
        std::fs::write(
            conf.join("10-bridge.conflist"),
            serde_json::to_vec(&primary).unwrap(),
        )
        .unwrap();
        self.cni_dirs = Some((conf, bin));
    }

    /// Starts `redirect-user run` (HBONE, the built-in CA in the state directory) on
    /// the node's directories; returns its index. Does not wait.
    fn spawn_agent(&mut self) -> usize {
        let zds = self.dir.join("zds.sock");
        let cni = self.cni_socket();
        let admin = format!("127.0.0.1:{}", self.admin);
        let log = self
            .root
            .join(format!("agent-{}.log", self.agents.len() + 1));
        let mut args: Vec<String> = [
            "run",
            "--drain-secs",
            "10",
            "--socket",
            zds.to_str().unwrap(),
            "--state-dir",
            self.d(),
            "--pin-dir",
            &self.pin,
            "--cni-socket",
            cni.to_str().unwrap(),
            "--mesh-namespaces",
            MESH,
            "--admin-addr",
            &admin,
            "--metrics-addr",
            "off",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some((conf, bin)) = &self.cni_dirs {
            for a in [
                "--cni-install".to_string(),
                format!("--cni-conf-dir={}", conf.display()),
                format!("--cni-bin-dir={}", bin.display()),
                format!("--cni-plugin-bin={}", redirect_cni_bin().unwrap().display()),
            ] {
                args.push(a);
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.agents.push(Proc::spawn(&args, &log));
        self.logs.push(log);
        self.agents.len() - 1
    }

    /// Starts an agent and waits until it is ready (its /readyz answers 200).
    fn start_agent(&mut self) -> usize {
        let i = self.spawn_agent();
        self.wait_ready("the agent ready", 20);
        i
    }

    fn wait_ready(&self, what: &str, secs: u64) {
        wait_for(what, secs, || {
            http_status(self.admin, "/readyz") == Some(200)
        });
    }

    fn pid(&self, i: usize) -> i64 {
        self.agents[i].pid() as i64
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.logs[i]).unwrap_or_default()
    }

    fn status(&self) -> Option<Value> {
        let out = cli(&["status", "--json", "--state-dir", self.d()]).ok()?;
        serde_json::from_str(&out).ok()
    }

    /// The pods the agent reports ready, with the pid of the proxy serving each.
    fn ready_pods(&self) -> Vec<(String, i64)> {
        let Some(s) = self.status() else {
            return Vec::new();
        };
        s["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["state"]["state"] == "ready")
            .filter_map(|p| {
                Some((
                    p["spec"]["uid"].as_str()?.to_string(),
                    p["proxy_pid"].as_i64()?,
                ))
            })
            .collect()
    }

    fn counter(&self, uid: &str, name: &str) -> u64 {
        let Some(s) = self.status() else { return 0 };
        s["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["spec"]["uid"] == uid)
            .and_then(|p| p["counters"][name].as_u64())
            .unwrap_or(0)
    }

    /// The runtime's CNI ADD for pod `name` (uid `uid-<name>`): the plugin's exit and
    /// output. With CNI directories, the plugin is the last of the installed chain.
    fn cni_add(&self, name: &str) -> (bool, String) {
        let plugin = match &self.cni_dirs {
            Some((conf, bin)) => {
                let list: Value = serde_json::from_slice(
                    &std::fs::read(conf.join("0-redirect.conflist"))
                        .expect("our configuration is installed"),
                )
                .unwrap();
                let last = list["plugins"].as_array().unwrap().last().unwrap().clone();
                assert_eq!(last["type"], "redirect-cni", "{list}");
                bin.join("redirect-cni")
            }
            None => redirect_cni_bin().unwrap(),
        };
        let h = self.topo.host(name);
        let config = json!({
            "cniVersion": "1.0.0",
            "name": "pods",
            "type": "redirect-cni",
            "socket": self.cni_socket(),
            "timeout_secs": 10,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": h.path()}],
                "ips": [
                    {"address": format!("{}/16", h.v4), "interface": 0},
                    {"address": format!("{}/64", h.v6), "interface": 0},
                ],
                "dns": {},
            },
        });
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={MESH};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=sandbox-{name};K8S_POD_UID=uid-{name}"
        );
        let mut child = Command::new(plugin)
            .env_clear()
            .envs([
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", &format!("sandbox-{name}")),
                ("CNI_NETNS", &h.path()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", &args),
                ("CNI_PATH", "/opt/cni/bin"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&serde_json::to_vec(&config).unwrap())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// The runtime's ADD, retried every 200 ms as the kubelet retries a sandbox, until
    /// it succeeds: how many attempts failed.
    fn cni_add_retried(&self, name: &str, secs: u64) -> usize {
        let t = Instant::now();
        let mut failed = 0;
        loop {
            let (ok, out) = self.cni_add(name);
            if ok {
                return failed;
            }
            failed += 1;
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "ADD of {name} kept failing: {out}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn addr(&self, name: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.topo.host(name).addr(false), port)
    }

    /// One line from pod `from` to pod `to`'s app over a new connection.
    fn ask(&self, from: &str, to: &str) -> anyhow::Result<String> {
        ask(&self.topo.host(from).netns()?, self.addr(to, APP))
    }

    /// Captures of the pods' wires: what really left each pod and reached it (the
    /// bridge's end of its veth; steered packets bounced inside the pod never show).
    fn capture(&self, pods: &[&str]) -> Vec<(String, Capture)> {
        let node = Netns::open(format!("/var/run/netns/{}", self.topo.node())).unwrap();
        let ports = self.ports.lock().unwrap();
        pods.iter()
            .map(|p| {
                let cap = Capture::watching(&node, &ports[*p], &[PLAIN]).unwrap();
                (p.to_string(), cap)
            })
            .collect()
    }

    /// The namespace of pod `name` deleted and made again with the same interface and
    /// addresses, as a pod's sandbox is recreated (its apps started again).
    fn recreate_pod(&self, name: &str, round: usize) {
        let h = self.topo.host(name);
        let node = self.topo.node();
        let ipc = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ipc(&["netns", "del", &h.name]);
        ipc(&["netns", "add", &h.name]);
        let port = format!("r{round}{}", &name[..1]);
        ipc(&[
            "link", "add", &port, "netns", node, "type", "veth", "peer", "name", "eth0", "netns",
            &h.name,
        ]);
        ipc(&["-n", node, "link", "set", &port, "master", "br0", "up"]);
        self.ports.lock().unwrap().insert(name.into(), port.clone());
        ipc(&["-n", &h.name, "link", "set", "lo", "up"]);
        ipc(&[
            "-n",
            &h.name,
            "addr",
            "add",
            &format!("{}/16", h.v4),
            "dev",
            "eth0",
        ]);
        ipc(&[
            "-n",
            &h.name,
            "addr",
            "add",
            &format!("{}/64", h.v6),
            "dev",
            "eth0",
            "nodad",
        ]);
        ipc(&["-n", &h.name, "link", "set", "eth0", "up"]);
        self.apps(name);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(80)..].join("\n");
                eprintln!("---- {} (end) ----\n{tail}", log.display());
            }
        }
        self.agents.clear();
    }
}

/// New connections from one pod to another's app, back to back, until stopped.
struct Loop {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u32, u32, Duration)>,
}

impl Loop {
    fn start(ns: Netns, to: SocketAddr, who: &str) -> Loop {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let want = format!("{who} from ");
        let handle = std::thread::spawn(move || {
            let (mut ok, mut failed, mut gap) = (0u32, 0u32, Duration::ZERO);
            let mut last = Instant::now();
            let started = Instant::now();
            while !s.load(Ordering::Relaxed) {
                match ask(&ns, to) {
                    Ok(a) if a.starts_with(&want) => {
                        ok += 1;
                        gap = gap.max(last.elapsed());
                        last = Instant::now();
                    }
                    other => {
                        failed += 1;
                        eprintln!(
                            "connection to {to} failed {:?} into the loop: {other:?}",
                            started.elapsed()
                        );
                    }
                }
            }
            (ok, failed, gap)
        });
        Loop { stop, handle }
    }

    /// (successes, failures, longest time between two successes).
    fn finish(self) -> (u32, u32, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// One connection carrying a known byte stream both ways, 1 KiB every 10 ms, checked
/// as it comes back.
struct Stream {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<anyhow::Result<u64>>,
}

impl Stream {
    fn start(ns: &Netns, to: SocketAddr) -> Stream {
        let mut s = ns
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))
            .unwrap()
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, echoed) = (stop.clone(), echoed.clone());
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut at = 0usize;
                let mut chunk = vec![0u8; 1024];
                let mut back = vec![0u8; 1024];
                while !stop.load(Ordering::Relaxed) {
                    for (k, b) in chunk.iter_mut().enumerate() {
                        *b = pattern_byte(at + k, 5);
                    }
                    s.write_all(&chunk)?;
                    s.read_exact(&mut back)?;
                    anyhow::ensure!(back == chunk, "bytes {at}.. came back changed");
                    at += chunk.len();
                    echoed.store(at as u64, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
                s.shutdown(std::net::Shutdown::Both)?;
                Ok(at as u64)
            })
        };
        Stream {
            stop,
            echoed,
            handle,
        }
    }

    fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// Closes the connection: the bytes echoed, or how it broke.
    fn finish(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// Asserts that no frame on the captured interfaces carried the apps' ports or their
/// plaintext: every connection between the pods went through the proxies (TLS to
/// 15008). Returns the frames seen.
fn nothing_escaped(caps: Vec<(String, Capture)>) -> usize {
    let mut total = 0;
    for (pod, cap) in caps {
        let frames: Frames = cap.stop().unwrap();
        assert_eq!(frames.dropped(), 0, "{pod}: the capture lost frames");
        let ports = frames.tcp_ports();
        for p in [APP, STREAM] {
            assert!(
                !ports.contains(&p),
                "{pod}: a connection to port {p} left unproxied"
            );
        }
        assert_eq!(
            frames.watched(PLAIN),
            Some(0),
            "{pod}: plaintext on the wire"
        );
        assert!(
            ports.contains(&redirect_ebpf::PORT_TUNNEL),
            "{pod}: no HBONE seen: {ports:?}"
        );
        eprintln!(
            "capture {pod}: {} frames, TCP ports {:?}",
            frames.count(),
            frames
                .payload_bytes_by_port(Proto::Tcp)
                .keys()
                .filter(|p| **p < 32768)
                .collect::<Vec<_>>()
        );
        total += frames.count();
    }
    total
}

/// Rolling upgrade with surge: agent B starts beside agent A on the same state and pin
/// directories while pods a and b open new connections to each other back to back and
/// a long-lived connection streams from a to b; a new pod n is added through the CNI
/// plugin during the swap. B takes over (A hands over: its agent side stops, its proxy
/// drains), becomes ready, then A is stopped and exits once its connections ended.
///
/// A proxy must know every pod before it serves any: the capture fails the test if a
/// connection between the pods ever went to an app's port in plaintext (a race once
/// did that: the new proxy served pod a before pod b's Add had reached it).
#[test]
fn a_rolling_upgrade_fails_no_connection() {
    let mut n = Node::new("nl-upg", &[("a", 10), ("b", 11), ("n", 12)]);
    let a_agent = n.start_agent();
    for pod in ["a", "b"] {
        assert_eq!(n.cni_add_retried(pod, 10), 0);
    }
    assert!(n.ask("a", "b").unwrap().starts_with("b from "));
    assert_eq!(n.ready_pods().len(), 2);

    let caps = n.capture(&["a", "b", "n"]);
    let ab = Loop::start(n.topo.host("a").netns().unwrap(), n.addr("b", APP), "b");
    let ba = Loop::start(n.topo.host("b").netns().unwrap(), n.addr("a", APP), "a");
    let stream = Stream::start(&n.topo.host("a").netns().unwrap(), n.addr("b", STREAM));
    std::thread::sleep(Duration::from_millis(500));

    // B starts; a new pod arrives through the plugin meanwhile (the runtime retries
    // a failed ADD, as the kubelet does).
    let t = Instant::now();
    let b_agent = n.spawn_agent();
    let add_failures = n.cni_add_retried("n", 20);
    let added_after = t.elapsed();
    // Its very first connection goes through its proxy.
    assert_eq!(n.counter("uid-n", "redirected_15001"), 0);
    assert!(n.ask("n", "b").unwrap().starts_with("b from "));
    assert_eq!(n.counter("uid-n", "redirected_15001"), 1);
    // The pods that were there before reach it through the mesh at once: its ADD waited
    // until every one of them was on a proxy that knows it (the old proxy never hears
    // of it, and would relay to it in plaintext).
    assert!(n.ask("a", "n").unwrap().starts_with("n from "));

    let b_pid = n.pid(b_agent);
    wait_for("every pod on B's proxy", 20, || {
        let r = n.ready_pods();
        r.len() == 3 && r.iter().all(|(_, pid)| *pid == b_pid)
    });
    n.wait_ready("B ready", 20);
    let swapped_after = t.elapsed();
    let a_log = n.log(a_agent);
    assert!(a_log.contains("handed the node over"), "{a_log}");
    assert!(n.log(b_agent).contains("the running agent handed over"));

    // Kubernetes stops A once B is ready: A drains and exits when its last connection
    // (the long-lived one) ends, well before its drain period.
    std::thread::sleep(Duration::from_millis(500));
    let before = stream.echoed();
    unsafe { libc::kill(n.pid(a_agent) as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        stream.echoed() > before + 10 * 1024,
        "the long-lived connection stalled while A drains"
    );
    let streamed = stream.finish().expect("the long-lived connection survived");
    let t_closed = Instant::now();
    let a = &mut n.agents[a_agent].0;
    let mut exited = None;
    while t_closed.elapsed() < Duration::from_secs(8) {
        if let Some(s) = a.try_wait().unwrap() {
            exited = Some((s, t_closed.elapsed()));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, a_exit) = exited.expect("A exited once its connections ended");
    assert!(status.success(), "{status:?}");
    assert!(n.log(a_agent).contains("no connection left"));
    std::thread::sleep(Duration::from_millis(300));

    let (ok_ab, failed_ab, gap_ab) = ab.finish();
    let (ok_ba, failed_ba, gap_ba) = ba.finish();
    let frames = nothing_escaped(caps);
    eprintln!(
        "upgrade: a->b {ok_ab} connections, {failed_ab} failed, longest gap {gap_ab:?}; \
         b->a {ok_ba} connections, {failed_ba} failed, longest gap {gap_ba:?}; \
         long-lived connection {streamed} bytes echoed; new pod added after {added_after:?} \
         ({add_failures} ADDs refused first); every pod on B after {swapped_after:?}; \
         A exited {a_exit:?} after its last connection closed; {frames} frames captured, none unproxied"
    );
    assert!(ok_ab > 50 && ok_ba > 50, "{ok_ab} {ok_ba}");
    assert_eq!(
        failed_ab + failed_ba,
        0,
        "connections failed during the upgrade"
    );

    // B goes on alone.
    assert!(n.ask("a", "b").unwrap().starts_with("b from "));
    let b_status = n.status().unwrap();
    assert_eq!(b_status["proxies"], json!([b_pid]), "{b_status}");
}

/// A reboot takes away the agent, the bpffs pins, the pods' namespaces (and the
/// programs attached there) and the state directory (/var/run is a tmpfs); the CNI
/// configuration stays. Pods (re)created before the agent is back cannot start (their
/// ADD fails); once it is back the runtime's retry enrols them, redirected from their
/// first connection.
#[test]
fn after_a_reboot_no_pod_runs_unredirected() {
    let mut n = Node::new("nl-boot", &[("a", 10), ("b", 11)]);
    n.with_cni_dirs();
    let first = n.start_agent();
    for pod in ["a", "b"] {
        assert_eq!(n.cni_add_retried(pod, 10), 0);
    }
    assert!(n.ask("a", "b").unwrap().starts_with("b from "));

    // The reboot.
    n.agents[first].signal(libc::SIGKILL);
    std::fs::remove_dir_all(&n.pin).unwrap();
    for pod in ["a", "b"] {
        n.recreate_pod(pod, 1);
    }
    std::fs::remove_dir_all(&n.dir).unwrap();
    let (conf, _) = n.cni_dirs.clone().unwrap();
    assert!(conf.join("0-redirect.conflist").exists());

    // The runtime starts the pods again before the agent is back: refused, each.
    let caps = n.capture(&["a", "b"]);
    for pod in ["a", "b"] {
        let (ok, out) = n.cni_add(pod);
        assert!(!ok, "{pod} started without the agent: {out}");
        assert!(out.contains("agent not reachable"), "{out}");
    }

    // The agent is back; the runtime's retries go through, each pod redirected from its
    // first connection.
    let t = Instant::now();
    n.start_agent();
    for pod in ["a", "b"] {
        assert_eq!(n.cni_add_retried(pod, 10), 0);
        assert_eq!(n.counter(&format!("uid-{pod}"), "redirected_15001"), 0);
    }
    let back = t.elapsed();
    assert!(n.ask("a", "b").unwrap().starts_with("b from "));
    assert!(n.ask("b", "a").unwrap().starts_with("a from "));
    for pod in ["a", "b"] {
        assert_eq!(n.counter(&format!("uid-{pod}"), "redirected_15001"), 1);
    }
    assert_eq!(n.ready_pods().len(), 2);
    let frames = nothing_escaped(caps);
    eprintln!(
        "reboot: agent back and both pods enrolled in {back:?}; {frames} frames captured, none unproxied"
    );
}

/// Object ids of what the engine pinned: programs and links.
fn pinned_ids(pin: &str) -> (Vec<u64>, Vec<u64>) {
    let mut progs = Vec::new();
    for e in std::fs::read_dir(Path::new(pin).join("progs"))
        .unwrap()
        .flatten()
    {
        let v = bpftool_json(&["prog", "show", "pinned", e.path().to_str().unwrap()]).unwrap();
        progs.push(v["id"].as_u64().unwrap());
    }
    let mut links = Vec::new();
    for dir in ["links", "node"] {
        for e in std::fs::read_dir(Path::new(pin).join(dir))
            .unwrap()
            .flatten()
        {
            let v = bpftool_json(&["link", "show", "pinned", e.path().to_str().unwrap()]).unwrap();
            links.push(v["id"].as_u64().unwrap());
        }
    }
    (progs, links)
}

/// `redirect-user uninstall` beside a running agent: it hands over, every pod is
/// released (connections direct again, the agent's proxy out of the way), and nothing of
/// ours is left once the agent is stopped.
#[test]
fn uninstall_leaves_nothing() {
    let mut n = Node::new("nl-rm", &[("a", 10), ("b", 11)]);
    n.with_cni_dirs();
    let agent = n.start_agent();
    for pod in ["a", "b"] {
        assert_eq!(n.cni_add_retried(pod, 10), 0);
    }
    assert!(n.ask("a", "b").unwrap().starts_with("b from "));
    let (progs, links) = pinned_ids(&n.pin);
    assert_eq!(progs.len(), 6, "{progs:?}");
    assert_eq!(
        links.len(),
        4,
        "two pods' sk_lookup links and the node's two (probes, guard): {links:?}"
    );
    let (conf, bin) = n.cni_dirs.clone().unwrap();
    let zds = n.dir.join("zds.sock");

    let t = Instant::now();
    let out = Command::new(redirect_user_bin().unwrap())
        .args([
            "uninstall",
            "--socket",
            zds.to_str().unwrap(),
            "--state-dir",
            n.d(),
            "--pin-dir",
            &n.pin,
            "--cni-conf-dir",
            conf.to_str().unwrap(),
            "--cni-bin-dir",
            bin.to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let took = t.elapsed();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("uninstall: done"), "{log}");

    // Direct at once: the apps' plaintext on the wire, no tunnel.
    let caps = n.capture(&["a", "b"]);
    assert!(n.ask("a", "b").unwrap().starts_with("b from "));
    assert!(n.ask("b", "a").unwrap().starts_with("a from "));
    for (pod, cap) in caps {
        let f = cap.stop().unwrap();
        assert!(f.tcp_ports().contains(&APP), "{pod}: {:?}", f.tcp_ports());
        assert!(
            !f.tcp_ports().contains(&redirect_ebpf::PORT_TUNNEL),
            "{pod}"
        );
    }

    // The agent (handed over) is stopped as its DaemonSet is deleted.
    let a_pid = n.pid(agent);
    n.agents[agent].signal(libc::SIGTERM);
    for pod in ["a", "b"] {
        let ns = &n.topo.host(pod).name;
        assert!(!ip_out(ns, &["rule"]).contains("0x111"), "{pod}: our rule");
        assert!(!ip_out(ns, &["route", "show", "table", "100"]).contains("local"));
        for dir in ["ingress", "egress"] {
            let f = tc_out(ns, &["filter", "show", "dev", "eth0", dir]);
            assert!(f.trim().is_empty(), "{pod} {dir}: {f}");
        }
        let q = tc_out(ns, &["qdisc", "show", "dev", "eth0"]);
        assert!(!q.contains("clsact"), "{pod}: {q}");
        // The proxy's listeners are gone: the ports can be bound again.
        let netns = n.topo.host(pod).netns().unwrap();
        for port in [15001u16, 15006, 15008] {
            let free = netns.run(|| TcpListener::bind(("::", port))).unwrap();
            assert!(free.is_ok(), "{pod}: port {port} still held: {free:?}");
        }
    }
    for id in progs {
        assert!(
            bpftool_json(&["prog", "show", "id", &id.to_string()]).is_err(),
            "program {id} left"
        );
    }
    for id in links {
        assert!(
            bpftool_json(&["link", "show", "id", &id.to_string()]).is_err(),
            "link {id} left"
        );
    }
    assert!(!Path::new(&n.pin).exists(), "pin directory left");
    assert!(!conf.join("0-redirect.conflist").exists());
    assert!(!bin.join("redirect-cni").exists());
    assert!(
        conf.join("10-bridge.conflist").exists(),
        "the primary's file stays"
    );
    assert!(!zds.exists());
    assert!(!n.dir.join("pods.json").exists());
    assert!(!n.dir.join("control.sock").exists());
    let cg = redirect_user::ebpf::cgroup2_mount()
        .unwrap()
        .join(format!("redirect-proxy-{a_pid}"));
    assert!(!cg.exists(), "{} left", cg.display());
    eprintln!("uninstall: done in {took:?}, nothing of ours left");
}
