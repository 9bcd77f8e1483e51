//! End to end with a real container runtime (issue 11, item 6): containerd
//! (tests/src/cri.rs) runs pods as the kubelet does, over its bridge network; the agent
//! (`redirect-user run --bare-relay`, a process) follows a fake Kubernetes API
//! (tests/src/fakeapi.rs) for node `node1` and installs its CNI plugin into the runtime's
//! CNI directories (`--cni-install`), chained after the runtime's primary bridge plugin.
//! Every pod is in the API before its RunPodSandbox (as the kubelet only runs pods the
//! API gave it), with its IPs once its sandbox runs.
//!
//! Traffic: the test listens on the bridge's gateway address (the pods' node); the apps
//! connect to it when they start, and serve a line on port 8080. Connections from the
//! test process (the node's namespace, the agent's) to a pod of the mesh are the
//! kubelet's probes: they reach the app directly. Inbound redirection is shown from
//! another pod.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use redirect_tests::{
    AppCgroup,
    cri::{CniSetup, Pod, PodDef, Runtime},
    fakeapi::{FakeApi, pod_object},
    ip_out,
    process::{Proc, RemoveDir, cli, holds_for, pod_uid as uid, pods_by_uid, wait_for},
    redirect_cni_bin,
};
use redirect_user::demo::ask;
use serde_json::{Value, json};

const NODE: &str = "node1";
const AMBIENT: &str = "istio.io/dataplane-mode";
/// The apps' port.
const APP: u16 = 8080;
/// The agent's CNI configuration in the runtime's configuration directory.
const OURS: &str = "0-redirect.conflist";

/// Lines received by the listener on the gateway address, with the peer that sent each.
#[derive(Default)]
struct Received(Mutex<Vec<(String, SocketAddr)>>);

/// A TCP listener of the test (the node) on the runtime's gateway address: it reads
/// one line per connection, answers `gw got <line>` and closes.
struct Gateway {
    addr: SocketAddr,
    got: Arc<Received>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    fn start(ip: Ipv4Addr) -> Gateway {
        // The bridge plugin puts the gateway address on the bridge at the first pod's
        // ADD: bound before it exists.
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_freebind_v4(true).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&SocketAddr::new(ip.into(), 0).into()).unwrap();
        s.listen(64).unwrap();
        s.set_nonblocking(true).unwrap();
        let l: TcpListener = s.into();
        let addr = l.local_addr().unwrap();
        let got = Arc::new(Received::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (got, stop) = (got.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((c, peer)) => {
                            let got = got.clone();
                            std::thread::spawn(move || serve_line(c, peer, &got));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Gateway {
            addr,
            got,
            stop,
            thread: Some(thread),
        }
    }

    /// The peer that sent `line` (waited for, 30 s at most).
    fn wait_line(&self, line: &str) -> SocketAddr {
        wait_for(&format!("the line {line:?} at the gateway"), 30, || {
            self.peer_of(line).is_some()
        });
        self.peer_of(line).unwrap()
    }

    fn peer_of(&self, line: &str) -> Option<SocketAddr> {
        let got = self.got.0.lock().unwrap();
        got.iter().find(|(l, _)| l == line).map(|(_, p)| *p)
    }

    fn lines(&self) -> Vec<String> {
        let got = self.got.0.lock().unwrap();
        got.iter().map(|(l, _)| l.clone()).collect()
    }
}

fn serve_line(c: TcpStream, peer: SocketAddr, got: &Received) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let mut r = BufReader::new(&c);
    if r.read_line(&mut line).is_ok() && !line.is_empty() {
        let line = line.trim().to_string();
        // Recorded before the answer: whoever got the answer finds the line.
        got.0.lock().unwrap().push((line.clone(), peer));
        let _ = writeln!(&c, "gw got {line}");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A node: the runtime, the fake API, the agent process and the gateway listener.
struct Node {
    /// Dropped first: its pods go while the agent still runs.
    rt: Option<Runtime>,
    api: FakeApi,
    gw: Gateway,
    agent: Option<Proc>,
    agent_cg: AppCgroup,
    dir: PathBuf,
    pin: PathBuf,
    starts: usize,
    _rm: (RemoveDir, RemoveDir),
}

impl Node {
    /// A runtime with the plain primary network; no agent yet.
    fn new(tag: &str) -> Node {
        let t = Instant::now();
        let rt = Runtime::start(tag, CniSetup::bridge()).expect("runtime");
        eprintln!(
            "runtime: containerd ready in {} ms",
            t.elapsed().as_millis()
        );
        let base = rt.name().to_string();
        let dir = PathBuf::from(format!("/tmp/{base}-agent"));
        let pin = PathBuf::from(format!("/sys/fs/bpf/{base}"));
        std::fs::create_dir_all(&dir).unwrap();
        Node {
            gw: Gateway::start(rt.net().gateway_v4()),
            api: FakeApi::start(&base).unwrap(),
            agent: None,
            agent_cg: AppCgroup::new(&format!("{base}-agent")).unwrap(),
            _rm: (RemoveDir::new(dir.clone()), RemoveDir::new(pin.clone())),
            rt: Some(rt),
            dir,
            pin,
            starts: 0,
        }
    }

    fn rt(&self) -> &Runtime {
        self.rt.as_ref().unwrap()
    }

    fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn cni_socket(&self) -> PathBuf {
        self.dir.join("cni.sock")
    }

    fn log(&self, start: usize) -> PathBuf {
        self.dir.join(format!("agent-{start}.log"))
    }

    /// `redirect-user run --bare-relay` in Kubernetes mode with `--cni-install` into the
    /// runtime's directories; returns once its first sync is done, its proxy connected
    /// and containerd has loaded the chained configuration.
    fn start_agent(&mut self) {
        self.starts += 1;
        let t = Instant::now();
        let rt = self.rt.as_ref().unwrap();
        let (kubeconfig, zds, cni) = (
            self.api.kubeconfig(),
            self.dir.join("zds.sock"),
            self.cni_socket(),
        );
        let (conf, bin, plugin) = (rt.conf_dir(), rt.bin_dir(), redirect_cni_bin().unwrap());
        let args = [
            "run",
            "--bare-relay",
            "--drain-secs",
            "0",
            "--socket",
            zds.to_str().unwrap(),
            "--state-dir",
            self.d(),
            "--pin-dir",
            self.pin.to_str().unwrap(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--node-name",
            NODE,
            "--cni-socket",
            cni.to_str().unwrap(),
            "--cni-install",
            "--cni-conf-dir",
            conf.to_str().unwrap(),
            "--cni-bin-dir",
            bin.to_str().unwrap(),
            "--cni-plugin-bin",
            plugin.to_str().unwrap(),
        ];
        let log = self.log(self.starts);
        self.agent = Some(Proc::spawn_in(&self.agent_cg.path, &args, &log));
        wait_for("the agent's first sync", 20, || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("k8s: first sync done"))
        });
        wait_for("the agent's proxy connected", 20, || {
            self.status()
                .is_some_and(|s| s["proxies"].as_array().is_some_and(|p| !p.is_empty()))
        });
        wait_for("the plugin socket", 20, || cni.exists());
        rt.wait_cni_loaded(|c| c.contains("redirect-cni"))
            .expect("containerd loads the chained configuration");
        eprintln!("runtime: agent ready in {} ms", t.elapsed().as_millis());
    }

    /// SIGTERM, as a node's agent is stopped; waits for it to exit.
    fn stop_agent(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.signal(libc::SIGTERM);
        }
    }

    fn namespace(&self, name: &str, in_mesh: bool) {
        let labels = if in_mesh {
            json!({AMBIENT: "ambient"})
        } else {
            json!({})
        };
        self.api.put_namespace(name, labels);
    }

    /// A pod whose app connects to the gateway when it starts (sending `start <name>`),
    /// then answers every connection on [`APP`] with its name.
    fn app(&self, name: &str, ns: &str) -> PodDef {
        let gw = self.gw.addr;
        let script = format!(
            "echo start {name} | nc -w 5 {} {}; exec nc -ll -p {APP} -e echo {name}",
            gw.ip(),
            gw.port()
        );
        PodDef::new(name)
            .namespace(ns)
            .uid(&uid())
            .container("app", &["sh", "-c", &script])
    }

    /// The pod in the API as the kubelet sees it before its sandbox: Pending, no IP.
    fn register(&self, def: &PodDef) {
        let labels: serde_json::Map<String, Value> = def
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let mut pod = pod_object(
            &def.namespace,
            &def.name,
            &def.uid,
            NODE,
            Value::Object(labels),
            &[],
        );
        pod["status"] = json!({"phase": "Pending"});
        self.api.put_pod(pod);
    }

    /// Registers the pod, runs it, and gives the API its IPs.
    fn run(&self, def: &PodDef) -> anyhow::Result<Pod> {
        self.register(def);
        let t = Instant::now();
        let pod = self.rt().run_pod(def)?;
        eprintln!(
            "runtime: pod {} running in {} ms",
            def.name,
            t.elapsed().as_millis()
        );
        let ips: Vec<Value> = pod.ips.iter().map(|ip| json!({"ip": ip})).collect();
        self.api.modify_pod(&def.namespace, &def.name, |p| {
            p["status"] = json!({"phase": "Running", "podIP": ips[0]["ip"], "podIPs": ips});
        });
        Ok(pod)
    }

    fn status(&self) -> Option<Value> {
        let out = cli(&["status", "--json", "--state-dir", self.d()]).ok()?;
        serde_json::from_str(&out).ok()
    }

    /// The agent's pods by uid.
    fn pods(&self) -> BTreeMap<String, Value> {
        pods_by_uid(self.d())
    }

    fn state(&self, uid: &str) -> Option<String> {
        self.pods()
            .get(uid)
            .and_then(|p| p["state"]["state"].as_str().map(String::from))
    }

    fn wait_state(&self, what: &str, uid: &str, state: Option<&str>) {
        wait_for(what, 20, || self.state(uid).as_deref() == state);
    }

    fn counter(&self, uid: &str, name: &str) -> u64 {
        self.pods()
            .get(uid)
            .and_then(|p| p["counters"][name].as_u64())
            .unwrap_or(0)
    }

    /// Every counter of every pod of the agent, summed by name.
    fn all_counters(&self) -> BTreeMap<String, u64> {
        let mut sum = BTreeMap::new();
        for p in self.pods().values() {
            for (k, v) in p["counters"].as_object().into_iter().flatten() {
                *sum.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
        sum
    }

    /// The values of the redirection annotation the agent patched, in order (None:
    /// removed).
    fn annotation_patches(&self, pod: &Pod) -> Vec<Option<String>> {
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}/status",
            pod.namespace, pod.name
        );
        self.api
            .patches()
            .into_iter()
            .filter(|p| p.path == path)
            .map(|p| {
                p.body["metadata"]["annotations"]["ambient.istio.io/redirection"]
                    .as_str()
                    .map(String::from)
            })
            .collect()
    }

    fn annotation(&self, pod: &Pod) -> Option<String> {
        self.api.redirection(&pod.namespace, &pod.name)
    }

    /// A connection from inside `pod` to the gateway listener, sending `line`: the
    /// peer address the listener saw.
    fn pod_to_gateway(&self, pod: &Pod, line: &str) -> SocketAddr {
        let answer = ask(&pod.open_netns().unwrap(), self.gw.addr, line)
            .unwrap_or_else(|e| panic!("{} to the gateway: {e:#}", pod.name));
        assert_eq!(answer, format!("gw got {line}"));
        self.gw.peer_of(line).expect("the line was received")
    }

    /// Ends the test: the runtime, then the agent and its pinned state go; nothing of
    /// either may be left.
    fn finish(mut self) {
        let fp = self.rt().footprint();
        let t = Instant::now();
        self.rt.take();
        eprintln!("runtime: removed in {} ms", t.elapsed().as_millis());
        self.stop_agent();
        let (pin, dir) = (self.pin.clone(), self.dir.clone());
        drop(self);
        let left = fp.leftovers();
        assert!(left.is_empty(), "left behind by the runtime: {left:#?}");
        assert!(!pin.exists(), "{} left behind", pin.display());
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 1..=self.starts {
                let text = std::fs::read_to_string(self.log(i)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(60)..].join("\n");
                eprintln!("---- the agent's log {i} (end) ----\n{tail}");
            }
            if let Some(rt) = &self.rt {
                eprintln!("---- containerd's log (end) ----\n{}", rt.log_tail());
            }
        }
        self.rt.take();
        self.agent.take();
    }
}

/// A pod's IPv4 address.
fn v4(pod: &Pod) -> IpAddr {
    pod.ipv4().expect("an IPv4 address").into()
}

/// From the test process (the node's namespace): the app's answer.
fn from_node(pod: &Pod) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::new(v4(pod), APP), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.trim().to_string())
}

/// Waits until the pod's app answers the node (it listens once its start-up
/// connection is done).
fn wait_app(pod: &Pod) {
    wait_for(&format!("{}'s app listening", pod.name), 20, || {
        from_node(pod).is_ok_and(|a| a == pod.name)
    });
}

/// From inside `from` to `to`'s app: its answer.
fn pod_to_pod(from: &Pod, to: &Pod) -> String {
    let ns = from.open_netns().unwrap();
    ask(&ns, SocketAddr::new(v4(to), APP), "hello")
        .unwrap_or_else(|e| panic!("{} to {}: {e:#}", from.name, to.name))
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

/// A pod of the mesh started through the chain: ready when its sandbox is, its first
/// connection (at start) already through its proxy; inbound from another pod to 15006,
/// from the node to the app directly; annotated enabled.
#[test]
fn a_pod_of_the_mesh_is_redirected_from_its_first_connection() {
    let mut n = Node::new("rt-first");
    n.namespace("mesh", true);
    n.namespace("plain", false);
    n.start_agent();

    let m = n
        .run(&n.app("m", "mesh"))
        .expect("the pod of the mesh runs");
    // Ready when the runtime got its sandbox: the plugin's ADD waited for it.
    assert_eq!(n.state(&m.uid).as_deref(), Some("ready"));
    let p = &n.pods()[&m.uid];
    assert_eq!(p["spec"]["netns"], json!(m.netns), "{p}");
    // Its app's very first connection, made as it started, went through its proxy
    // (the bare relay connects on from the pod's own address).
    let peer = n.gw.wait_line("start m");
    assert_eq!(peer.ip(), v4(&m), "seen from the gateway");
    assert!(
        n.counter(&m.uid, "redirected_15001") >= 1,
        "{}",
        n.pods()[&m.uid]
    );

    // Inbound from a pod outside the mesh: to the pod's inbound listener, then the app.
    let o = n
        .run(&PodDef::new("o").namespace("plain").uid(&uid()))
        .unwrap();
    let before = n.pods()[&m.uid]["counters"].clone();
    assert_eq!(pod_to_pod(&o, &m), "m");
    let after = n.pods()[&m.uid]["counters"].clone();
    let moved = |c: &str| after[c].as_u64().unwrap() - before[c].as_u64().unwrap();
    assert_eq!(moved("redirected_15006"), 1, "{after}");
    assert_eq!(moved("bypassed_probe"), 0, "{after}");

    // From the node (as the kubelet probes): the app directly.
    let before = n.pods()[&m.uid]["counters"].clone();
    assert_eq!(from_node(&m).unwrap(), "m");
    let after = n.pods()[&m.uid]["counters"].clone();
    let moved = |c: &str| after[c].as_u64().unwrap() - before[c].as_u64().unwrap();
    assert_eq!(moved("bypassed_probe"), 1, "{after}");
    assert_eq!(moved("redirected_15006"), 0, "{after}");

    // The pod outside the mesh is not the agent's.
    assert_eq!(n.state(&o.uid), None);
    wait_for("m annotated enabled", 10, || {
        n.annotation(&m) == s("enabled")
    });
    let values = n.annotation_patches(&m);
    let settled: Vec<_> = values
        .iter()
        .filter(|v| v.as_deref() != Some("pending"))
        .collect();
    assert_eq!(settled, vec![&s("enabled")], "{values:?}");
    assert!(n.annotation_patches(&o).is_empty());
    n.finish();
}

/// With the agent stopped, its configuration stays: a pod of the mesh cannot start
/// (the plugin says where the agent should be) and nothing of it is left; once the
/// agent is back, the runtime's retry starts it, redirected.
#[test]
fn a_pod_of_the_mesh_waits_for_a_stopped_agent() {
    let mut n = Node::new("rt-down");
    n.namespace("mesh", true);
    n.start_agent();
    n.stop_agent();
    let conf = n.rt().conf_dir().join(OURS);
    assert!(conf.exists(), "the stopped agent left its configuration");
    n.rt()
        .wait_cni_loaded(|c| c.contains("redirect-cni"))
        .unwrap();

    let def = n.app("m", "mesh");
    let t = Instant::now();
    let err = n.run(&def).expect_err("no agent, no pod of the mesh");
    let msg = format!("{err:#}");
    eprintln!("runtime: refused in {} ms: {msg}", t.elapsed().as_millis());
    let sock = n.cni_socket().display().to_string();
    assert!(
        msg.contains(&format!("agent not reachable at {sock}")),
        "{msg}"
    );
    assert!(n.rt().list_pods().unwrap().is_empty(), "no sandbox listed");
    assert!(n.rt().bridge_ports().is_empty(), "no veth");
    assert!(n.rt().reserved_ips().is_empty(), "no IP reserved");
    assert!(n.gw.lines().is_empty(), "the app ran: {:?}", n.gw.lines());

    n.start_agent();
    let m = n.run(&def).expect("the retry succeeds");
    assert_eq!(n.state(&m.uid).as_deref(), Some("ready"));
    n.gw.wait_line("start m");
    assert!(
        n.counter(&m.uid, "redirected_15001") >= 1,
        "{}",
        n.pods()[&m.uid]
    );
    assert_eq!(n.rt().list_pods().unwrap().len(), 1);
    n.finish();
}

/// A pod outside the mesh starts through the chain untouched: not the agent's, not
/// annotated, its connections counted nowhere.
#[test]
fn a_pod_outside_the_mesh_starts_untouched() {
    let mut n = Node::new("rt-out");
    n.namespace("mesh", true);
    n.namespace("plain", false);
    n.start_agent();
    // A pod of the mesh beside it, its counters settled.
    let m = n.run(&n.app("m", "mesh")).unwrap();
    n.gw.wait_line("start m");
    let before = n.all_counters();
    assert!(before["redirected_15001"] >= 1, "{before:?}");

    let o = n
        .run(&n.app("o", "plain"))
        .expect("the pod outside the mesh runs");
    let peer = n.gw.wait_line("start o");
    assert_eq!(peer.ip(), v4(&o));
    wait_app(&o);
    holds_for("only the pod of the mesh is the agent's", 1500, || {
        let pods = n.pods();
        pods.len() == 1 && pods.contains_key(&m.uid)
    });
    assert_eq!(n.all_counters(), before, "the pod outside was counted");
    assert!(n.annotation_patches(&o).is_empty());
    assert_eq!(n.annotation(&o), None);
    n.finish();
}

/// A running pod follows its namespace's label: enrolled through /proc when it comes
/// (annotated, redirected), released when it goes (annotation removed, direct again).
#[test]
fn a_running_pod_follows_its_namespace_label() {
    let mut n = Node::new("rt-flip");
    n.namespace("flip", false);
    n.start_agent();
    let p = n.run(&n.app("p", "flip")).unwrap();
    n.gw.wait_line("start p");
    assert_eq!(n.state(&p.uid), None);

    n.namespace("flip", true);
    n.wait_state("p enrolled while it runs", &p.uid, Some("ready"));
    let netns = n.pods()[&p.uid]["spec"]["netns"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        netns.starts_with("/proc/") && netns.ends_with("/ns/net"),
        "found through /proc: {netns}"
    );
    wait_for("p annotated enabled", 10, || {
        n.annotation(&p) == s("enabled")
    });
    let before = n.counter(&p.uid, "redirected_15001");
    assert_eq!(n.pod_to_gateway(&p, "enrolled p").ip(), v4(&p));
    assert_eq!(n.counter(&p.uid, "redirected_15001"), before + 1);

    n.namespace("flip", false);
    n.wait_state("p released while it runs", &p.uid, None);
    wait_for("p's annotation removed", 10, || n.annotation(&p).is_none());
    // Direct again: without its proxy, a redirection left behind would fail closed.
    assert_eq!(n.pod_to_gateway(&p, "released p").ip(), v4(&p));
    let values = n.annotation_patches(&p);
    let settled: Vec<_> = values
        .iter()
        .filter(|v| v.as_deref() != Some("pending"))
        .cloned()
        .collect();
    assert_eq!(settled, vec![s("enabled"), None], "{values:?}");
    n.finish();
}

/// Pods the runtime started before the agent (its configuration not installed yet: the
/// plain primary) are found and enrolled when the agent starts.
#[test]
fn pods_started_before_the_agent_are_enrolled_when_it_starts() {
    let mut n = Node::new("rt-early");
    n.namespace("mesh", true);
    n.namespace("plain", false);
    assert!(!n.rt().conf_dir().join(OURS).exists());
    let m = n.run(&n.app("m", "mesh")).unwrap();
    let o = n.run(&n.app("o", "plain")).unwrap();
    n.gw.wait_line("start m");
    n.gw.wait_line("start o");
    wait_app(&m);

    n.start_agent();
    n.wait_state("m enrolled", &m.uid, Some("ready"));
    assert!(
        n.pods()[&m.uid]["spec"]["netns"]
            .as_str()
            .unwrap()
            .starts_with("/proc/")
    );
    wait_for("m annotated enabled", 10, || {
        n.annotation(&m) == s("enabled")
    });
    let before = n.counter(&m.uid, "redirected_15001");
    assert_eq!(n.pod_to_gateway(&m, "enrolled m").ip(), v4(&m));
    assert_eq!(n.counter(&m.uid, "redirected_15001"), before + 1);
    assert_eq!(pod_to_pod(&o, &m), "m");
    assert_eq!(n.counter(&m.uid, "redirected_15006"), 1);
    holds_for("o is never the agent's", 1000, || n.state(&o.uid).is_none());
    assert!(n.annotation_patches(&o).is_empty());
    n.finish();
}

/// The primary CNI's configuration rewritten while the agent runs: the chained one
/// follows it, containerd loads that, and a pod of the mesh started afterwards gets
/// the new primary's network and is redirected from its first connection.
#[test]
fn a_rewritten_primary_configuration_is_followed() {
    let mut n = Node::new("rt-conf");
    n.namespace("mesh", true);
    n.start_agent();
    let ours = n.rt().conf_dir().join(OURS);
    let read = |p: &PathBuf| -> Value {
        std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    };
    assert_eq!(read(&ours)["plugins"][1]["type"], "redirect-cni");

    // The primary's installer writes a new version: a smaller MTU on the bridge.
    let mut primary = n.rt().primary_conflist().clone();
    primary["plugins"][0]["mtu"] = json!(1400);
    n.rt().write_conf(&n.rt().primary_file(), &primary).unwrap();
    wait_for("our configuration follows the primary", 10, || {
        let c = read(&ours);
        c["plugins"][0]["mtu"] == 1400 && c["plugins"][1]["type"] == "redirect-cni"
    });
    n.rt()
        .wait_cni_loaded(|c| c.contains("redirect-cni") && c.contains("1400"))
        .unwrap();

    let m = n.run(&n.app("m", "mesh")).unwrap();
    assert_eq!(n.state(&m.uid).as_deref(), Some("ready"));
    n.gw.wait_line("start m");
    assert!(
        n.counter(&m.uid, "redirected_15001") >= 1,
        "{}",
        n.pods()[&m.uid]
    );
    let ns = m.netns.file_name().unwrap().to_str().unwrap();
    let link = ip_out(ns, &["link", "show", "eth0"]);
    assert!(
        link.contains("mtu 1400"),
        "the new primary's network: {link}"
    );
    n.finish();
}
