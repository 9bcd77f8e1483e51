//! The chained CNI plugin as a container runtime runs it: the real `redirect-cni`
//! binary with the CNI environment and a configuration (with `prevResult`) on stdin,
//! against a real agent process (`redirect-user run --bare-relay`) whose plugin socket
//! decides membership from `--mesh-namespaces mesh`. Pods are namespaces with a veth.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use redirect_tests::{
    process::{Proc, RemoveDir, cli, wait_for},
    *,
};
use serde_json::{Value, json};

/// A node: an agent process (killed first on drop), pods, and the agent's directories.
struct Node {
    agent: Option<Proc>,
    topo: Topology,
    dir: PathBuf,
    pin: String,
    starts: usize,
    _rm: (RemoveDir, RemoveDir),
}

impl Node {
    fn new(tag: &str, hosts: &[(&str, u16)]) -> Node {
        let mut topo = Topology::new(tag).unwrap();
        for (n, i) in hosts {
            topo.add_host(n, *i).unwrap();
        }
        for (n, _) in hosts {
            let h = topo.host(n);
            echo_server(
                &h.netns().unwrap(),
                n,
                std::net::SocketAddr::new(h.addr(false), PEER_PORT),
            )
            .unwrap();
        }
        let base = topo.node().trim_end_matches("-node").to_string();
        let dir = PathBuf::from(format!("/tmp/{base}"));
        std::fs::create_dir_all(&dir).unwrap();
        let pin = format!("/sys/fs/bpf/{base}");
        Node {
            agent: None,
            topo,
            _rm: (RemoveDir::new(dir.clone()), RemoveDir::new(pin.clone())),
            dir,
            pin,
            starts: 0,
        }
    }

    fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn cni_socket(&self) -> PathBuf {
        self.dir.join("cni.sock")
    }

    /// `redirect-user run` (agent and bare-relay proxy); returns once its proxy is
    /// connected.
    fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    fn start_agent_with(&mut self, extra: &[&str]) {
        self.starts += 1;
        let _ = std::fs::remove_file(self.cni_socket());
        let zds = self.dir.join("zds.sock");
        let cni = self.cni_socket();
        let log = self.dir.join(format!("agent-{}.log", self.starts));
        let mut args = vec![
            "run",
            "--bare-relay",
            "--drain-secs",
            "0",
            "--socket",
            zds.to_str().unwrap(),
            "--state-dir",
            self.d(),
            "--pin-dir",
            &self.pin,
            "--cni-socket",
            cni.to_str().unwrap(),
            "--mesh-namespaces",
            "mesh",
        ];
        args.extend_from_slice(extra);
        let p = Proc::spawn(&args, &log);
        self.agent = Some(p);
        wait_for("plugin socket", 15, || cni.exists());
        wait_for("proxy connected", 15, || {
            self.status()
                .is_some_and(|s| s["proxies"].as_array().is_some_and(|p| !p.is_empty()))
        });
    }

    /// SIGTERM, as a node's agent is stopped.
    fn stop_agent(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.signal(libc::SIGTERM);
        }
    }

    fn status(&self) -> Option<Value> {
        let out = cli(&["status", "--json", "--state-dir", self.d()]).ok()?;
        serde_json::from_str(&out).ok()
    }

    fn pod(&self, uid: &str) -> Option<Value> {
        self.status()?["pods"]
            .as_array()?
            .iter()
            .find(|p| p["spec"]["uid"] == uid)
            .cloned()
    }

    /// The config the runtime hands the plugin, with `prevResult` for pod `name`.
    fn config(&self, version: &str, name: &str) -> Value {
        let h = self.topo.host(name);
        let sandbox = h.path();
        let mut ips = vec![
            json!({"version": "4", "address": format!("{}/24", h.v4), "interface": 0}),
            json!({"version": "6", "address": format!("{}/64", h.v6), "interface": 0}),
        ];
        if version.starts_with('1') {
            // 1.x results have no "version" in their addresses.
            for ip in &mut ips {
                ip.as_object_mut().unwrap().remove("version");
            }
        }
        json!({
            "cniVersion": version,
            "name": "test-net",
            "type": "redirect-cni",
            "socket": self.cni_socket(),
            "timeout_secs": 10,
            "prevResult": {
                "cniVersion": version,
                "interfaces": [{"name": "eth0", "sandbox": sandbox}],
                "ips": ips,
                "dns": {},
            },
        })
    }

    /// Runs `redirect-cni` for pod `name` in Kubernetes namespace `k8s_ns`.
    fn cni(&self, command: &str, version: &str, name: &str, k8s_ns: &str) -> Run {
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={k8s_ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=sandbox-{name};K8S_POD_UID=uid-{name}"
        );
        run_plugin(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", &format!("sandbox-{name}")),
                ("CNI_NETNS", &self.topo.host(name).path()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", &args),
                ("CNI_PATH", "/opt/cni/bin"),
            ],
            &serde_json::to_vec(&self.config(version, name)).unwrap(),
        )
    }

    /// From pod `from` to pod `to`'s echo app: the answer, or an error.
    fn ask(&self, from: &str, to: &str) -> anyhow::Result<String> {
        let addr = std::net::SocketAddr::new(self.topo.host(to).addr(false), PEER_PORT);
        cli(&[
            "probe",
            "--netns",
            &self.topo.host(from).path(),
            &addr.to_string(),
        ])
    }

    fn redirected_by_engine(&self, name: &str) -> bool {
        ip_out(&self.topo.host(name).name, &["rule"]).contains("0x111")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 1..=self.starts {
                let log = self.dir.join(format!("agent-{i}.log"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                eprintln!("---- {} ----\n{text}", log.display());
            }
        }
        self.agent.take();
    }
}

/// What one plugin run printed and how it ended.
#[derive(Debug)]
struct Run {
    ok: bool,
    stdout: String,
    took: Duration,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }
}

/// `redirect-cni` with only the given environment and `stdin`, as runtimes call it.
fn run_plugin(env: &[(&str, &str)], stdin: &[u8]) -> Run {
    let start = Instant::now();
    let mut child = Command::new(redirect_cni_bin().unwrap())
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        took: start.elapsed(),
    }
}

#[test]
fn an_add_succeeds_only_once_the_pod_is_redirected_to_its_proxy() {
    let mut n = Node::new("cniadd", &[("a", 10), ("d", 11), ("e", 12), ("c", 100)]);
    n.start_agent();

    // VERSION, as runtimes ask it.
    let v = run_plugin(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.0.0"}"#);
    assert!(v.ok, "{v:?}");
    assert_eq!(
        v.json()["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );

    // Pods of the mesh, one configuration version each (both result formats).
    for (pod, version) in [("a", "1.0.0"), ("d", "0.3.1"), ("e", "0.4.0")] {
        assert!(!n.redirected_by_engine(pod));
        let r = n.cni("ADD", version, pod, "mesh");
        assert!(r.ok, "{pod} {version}: {r:?}");
        // prevResult passed through unchanged.
        assert_eq!(r.json(), n.config(version, pod)["prevResult"], "{version}");
        // When the ADD returns, the pod is ready: its very first connection goes to
        // the proxy (the bare relay forwards it to c).
        let uid = format!("uid-{pod}");
        let p = n.pod(&uid).expect("the pod is enrolled");
        assert_eq!(p["state"]["state"], "ready", "{p}");
        assert_eq!(p["spec"]["namespace"], "mesh");
        assert_eq!(p["spec"]["service_account"], "default");
        let answer = n.ask(pod, "c").unwrap();
        assert!(answer.starts_with("c from "), "{answer}");
        let c = &n.pod(&uid).unwrap()["counters"];
        assert_eq!(c["redirected_15001"], 1, "{pod}: {c}");
    }

    // CHECK and DEL succeed (DEL prints nothing); the release is the cluster watch's.
    let r = n.cni("CHECK", "1.0.0", "a", "mesh");
    assert!(r.ok && r.stdout.trim().is_empty(), "{r:?}");
    let r = n.cni("DEL", "1.0.0", "a", "mesh");
    assert!(r.ok && r.stdout.is_empty(), "{r:?}");
}

#[test]
fn a_pod_outside_the_mesh_passes_through_untouched() {
    let mut n = Node::new("cnipass", &[("b", 10), ("c", 100)]);
    n.start_agent();
    let r = n.cni("ADD", "1.0.0", "b", "default");
    assert!(r.ok, "{r:?}");
    assert_eq!(r.json(), n.config("1.0.0", "b")["prevResult"]);
    assert!(n.pod("uid-b").is_none());
    assert!(!n.redirected_by_engine("b"));
    assert!(n.ask("b", "c").unwrap().starts_with("c from "));
    // A sandbox that is no Kubernetes pod is not even asked about.
    let cfg = serde_json::to_vec(&n.config("0.4.0", "b")).unwrap();
    let netns = n.topo.host("b").path();
    let r = run_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "plain"),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "eth0"),
        ],
        &cfg,
    );
    assert!(r.ok, "{r:?}");
    assert_eq!(r.json(), n.config("0.4.0", "b")["prevResult"]);
    assert!(!n.redirected_by_engine("b"));
}

#[test]
fn an_add_fails_while_the_agent_is_down_and_a_retry_succeeds() {
    let mut n = Node::new("cnidown", &[("a", 10), ("c", 100)]);
    let sock = n.cni_socket();
    let sock_s = sock.display().to_string();

    // No agent ever started: no socket. The ADD fails at once, naming the socket.
    let r = n.cni("ADD", "1.0.0", "a", "mesh");
    assert!(!r.ok, "{r:?}");
    assert!(r.took < Duration::from_secs(2), "{:?}", r.took);
    let e = r.json();
    assert_eq!(e["cniVersion"], "1.0.0");
    assert_eq!(e["code"], 100);
    let msg = e["msg"].as_str().unwrap();
    assert!(
        msg.starts_with(&format!("agent not reachable at {sock_s}: ")),
        "{msg}"
    );
    assert!(!n.redirected_by_engine("a"));

    // An agent that stopped (its socket file left behind): the same.
    n.start_agent();
    n.stop_agent();
    assert!(sock.exists());
    let r = n.cni("ADD", "1.0.0", "a", "mesh");
    assert!(!r.ok, "{r:?}");
    let msg = r.json()["msg"].as_str().unwrap().to_string();
    assert!(msg.contains(&sock_s), "{msg}");

    // The agent back: the runtime's retry succeeds.
    n.start_agent();
    let r = n.cni("ADD", "1.0.0", "a", "mesh");
    assert!(r.ok, "{r:?}");
    assert_eq!(r.json(), n.config("1.0.0", "a")["prevResult"]);
    assert_eq!(n.pod("uid-a").unwrap()["state"]["state"], "ready");
    assert!(n.ask("a", "c").unwrap().starts_with("c from "));
}

/// One line to the plugin socket and the answer line (empty: closed without one).
fn exchange(sock: &Path, line: &[u8]) -> (String, UnixStream) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(line).unwrap();
    let mut answer = String::new();
    BufReader::new(s.try_clone().unwrap())
        .read_line(&mut answer)
        .unwrap();
    (answer, s)
}

#[test]
fn the_plugin_socket_refuses_bad_requests_and_keeps_serving() {
    let mut n = Node::new("cnibad", &[("a", 10), ("c", 100)]);
    n.start_agent();
    let sock = n.cni_socket();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    for bad in [
        &b"not json\n"[..],
        b"{\"op\":\"frob\"}\n",
        b"{\"op\":\"add\",\"pod\":{\"uid\":\"u\"}}\n",
    ] {
        let (answer, mut s) = exchange(&sock, bad);
        let v: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["result"], "refused", "{answer}");
        assert!(
            v["reason"].as_str().unwrap().starts_with("bad request"),
            "{answer}"
        );
        // And the connection is closed.
        let mut rest = String::new();
        let n = BufReader::new(&mut s).read_line(&mut rest).unwrap();
        assert_eq!(n, 0, "{rest}");
    }
    // A line longer than the limit: refused, closed.
    let mut long = vec![b'x'; 70 * 1024];
    long.push(b'\n');
    let (answer, _) = exchange(&sock, &long);
    assert!(answer.contains("bad request"), "{answer}");
    // A pod in the mesh whose namespace does not exist: enrolment fails, said so.
    let req = json!({"op": "add", "pod": {
        "uid": "uid-x", "name": "x", "namespace": "mesh", "netns": "/var/run/netns/no-such-ns",
        "container_id": "c", "ips": []}});
    let (answer, _) = exchange(&sock, format!("{req}\n").as_bytes());
    let v: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["result"], "refused", "{answer}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .starts_with("enrolment failed: "),
        "{answer}"
    );
    assert!(n.pod("uid-x").is_none());

    // Still serving.
    let r = n.cni("ADD", "1.0.0", "a", "mesh");
    assert!(r.ok, "{r:?}");
}

#[test]
fn without_a_proxy_the_add_fails_and_the_pod_is_let_go() {
    let mut n = Node::new("cninoproxy", &[("a", 10), ("c", 100)]);
    // The agent alone: no proxy connects.
    let zds = n.dir.join("zds.sock");
    let cni = n.cni_socket();
    let agent = Proc::spawn(
        &[
            "node-agent",
            "--socket",
            zds.to_str().unwrap(),
            "--state-dir",
            n.d(),
            "--pin-dir",
            &n.pin,
            "--cni-socket",
            cni.to_str().unwrap(),
            "--mesh-namespaces",
            "mesh",
        ],
        &n.dir.join("agent-1.log"),
    );
    n.starts = 1;
    n.agent = Some(agent);
    wait_for("plugin socket", 15, || cni.exists());
    let r = n.cni("ADD", "1.0.0", "a", "mesh");
    assert!(!r.ok, "{r:?}");
    let e = r.json();
    assert_eq!(e["code"], 102, "{e}");
    let msg = e["msg"].as_str().unwrap();
    assert!(msg.starts_with("no proxy connected"), "{msg}");
    // The runtime tears the sandbox down: nothing of the pod is kept.
    assert!(n.pod("uid-a").is_none());
    assert!(!n.redirected_by_engine("a"));

    // A proxy connects: the retry succeeds.
    let _proxy = Proc::spawn(
        &[
            "proxy",
            "--socket",
            zds.to_str().unwrap(),
            "--bare-relay",
            "--drain-secs",
            "0",
        ],
        &n.dir.join("proxy.log"),
    );
    wait_for("proxy connected", 15, || {
        n.status()
            .is_some_and(|s| s["proxies"].as_array().is_some_and(|p| !p.is_empty()))
    });
    let r = n.cni("ADD", "1.0.0", "a", "mesh");
    assert!(r.ok, "{r:?}");
    assert_eq!(n.pod("uid-a").unwrap()["state"]["state"], "ready");
    assert!(n.ask("a", "c").unwrap().starts_with("c from "));
}

#[test]
fn the_agent_installs_the_plugin_and_keeps_its_configuration_in_place() {
    let mut n = Node::new("cniinst", &[("a", 10)]);
    let conf = n.dir.join("net.d");
    let bin = n.dir.join("bin");
    std::fs::create_dir_all(&conf).unwrap();
    let primary = conf.join("10-containerd-net.conflist");
    let primary_bytes = br#"{"cniVersion": "1.0.0", "name": "containerd-net",
  "plugins": [{"type": "bridge", "bridge": "cni0"}, {"type": "portmap"}]}"#;
    std::fs::write(&primary, primary_bytes).unwrap();
    let plugin = redirect_cni_bin().unwrap();
    let (c, b, p) = (
        conf.to_str().unwrap().to_string(),
        bin.to_str().unwrap().to_string(),
        plugin.to_str().unwrap().to_string(),
    );
    let ours = conf.join("0-redirect.conflist");
    let dirs = ["--cni-conf-dir", &c, "--cni-bin-dir", &b];

    // One-shot install and uninstall.
    let out = cli(&[&["cni", "install", "--cni-plugin-bin", &p][..], &dirs[..]].concat()).unwrap();
    assert!(out.contains("0-redirect.conflist"), "{out}");
    assert!(ours.exists() && bin.join("redirect-cni").exists());
    cli(&[&["cni", "uninstall"][..], &dirs[..]].concat()).unwrap();
    assert!(!ours.exists() && !bin.join("redirect-cni").exists());

    // In the agent: installed, and kept.
    n.start_agent_with(&[&["--cni-install", "--cni-plugin-bin", &p][..], &dirs[..]].concat());
    wait_for("our configuration", 10, || ours.exists());
    let list: Value = serde_json::from_slice(&std::fs::read(&ours).unwrap()).unwrap();
    let plugins = list["plugins"].as_array().unwrap();
    assert_eq!(list["name"], "containerd-net");
    assert_eq!(plugins.len(), 3);
    assert_eq!(plugins[2]["type"], "redirect-cni");
    assert_eq!(plugins[2]["socket"], json!(n.cni_socket()));
    // The installed binary is the plugin.
    let v = Command::new(bin.join("redirect-cni"))
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).contains("supportedVersions"));
    // Ours deleted: restored; the primary changed: followed.
    std::fs::remove_file(&ours).unwrap();
    wait_for("restored", 5, || ours.exists());
    std::fs::write(
        &primary,
        br#"{"cniVersion": "1.1.0", "name": "containerd-net", "plugins": [{"type": "ptp"}]}"#,
    )
    .unwrap();
    wait_for("followed", 5, || {
        std::fs::read(&ours)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|l| {
                l["cniVersion"] == "1.1.0" && l["plugins"].as_array().unwrap().len() == 2
            })
    });
    let primary_now = std::fs::read(&primary).unwrap();
    // A stopped agent leaves both: new pods wait instead of escaping.
    n.stop_agent();
    assert!(ours.exists() && bin.join("redirect-cni").exists());
    cli(&[&["cni", "uninstall"][..], &dirs[..]].concat()).unwrap();
    assert!(!ours.exists());
    assert_eq!(std::fs::read(&primary).unwrap(), primary_now);
}
