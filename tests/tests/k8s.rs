//! Kubernetes mode end to end: `redirect-user` (as a process) watches a fake API server
//! (tests/src/fakeapi.rs) for the pods of node `node1`; the "pods" are network
//! namespaces with a `sleep` process inside, in a cgroup whose path names the pod uid
//! as the kubelet's does, so that running pods are found through /proc. Each rule of
//! membership and each transition is shown on real namespaces and real traffic.

use std::{
    collections::BTreeMap,
    ffi::CString,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use redirect_tests::{
    fakeapi::{FakeApi, Kind, pod_object},
    process::{Proc, RemoveDir, cli, holds_for, pod_uid as uid, pods_by_uid, wait_for},
    *,
};
use serde_json::{Value, json};

const NODE: &str = "node1";
const AMBIENT: &str = "istio.io/dataplane-mode";

/// A node: pods in namespaces, the fake API, the agent (and a proxy) as processes.
struct Cluster {
    api: FakeApi,
    topo: Topology,
    dir: PathBuf,
    pin: String,
    /// Parent of the pods' cgroups (under the cgroup2 mount).
    kubepods: PathBuf,
    /// Pod processes and their cgroup directories.
    procs: Mutex<Vec<(Child, PathBuf)>>,
    agent: Option<Proc>,
    proxy: Option<Proc>,
    agent_cg: AppCgroup,
    proxy_cg: AppCgroup,
    _dirs: (RemoveDir, RemoveDir),
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.agent_log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("--- the agent's log (end) ---\n{}", tail.join("\n"));
        }
        self.agent.take();
        self.proxy.take();
        for (mut c, cg) in self.procs.lock().unwrap().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_dir(&cg);
            if let Some(pod) = cg.parent() {
                let _ = std::fs::remove_dir(pod);
            }
        }
        let _ = std::fs::remove_dir(&self.kubepods);
    }
}

impl Cluster {
    /// Hosts (name, address byte); `c` (100) is always there: the peer outside the mesh.
    fn new(tag: &str, hosts: &[(&str, u16)]) -> Cluster {
        let mut topo = Topology::new(tag).unwrap();
        for (n, i) in hosts.iter().chain(&[("c", 100)]) {
            topo.add_host(n, *i).unwrap();
        }
        let c = topo.host("c");
        for v6 in [false, true] {
            echo_server(
                &c.netns().unwrap(),
                "c",
                std::net::SocketAddr::new(c.addr(v6), PEER_PORT),
            )
            .unwrap();
        }
        let base = topo.node().trim_end_matches("-node").to_string();
        let dir = PathBuf::from(format!("/tmp/{base}"));
        let pin = format!("/sys/fs/bpf/{base}");
        std::fs::create_dir_all(&dir).unwrap();
        let kubepods = redirect_user::ebpf::cgroup2_mount()
            .unwrap()
            .join(format!("redirect-test-kubepods-{base}"));
        std::fs::create_dir_all(&kubepods).unwrap();
        let api = FakeApi::start(&base).unwrap();
        Cluster {
            api,
            agent_cg: AppCgroup::new(&format!("{base}-agent")).unwrap(),
            proxy_cg: AppCgroup::new(&format!("{base}-proxy")).unwrap(),
            _dirs: (RemoveDir::new(dir.clone()), RemoveDir::new(pin.clone())),
            topo,
            dir,
            pin,
            kubepods,
            procs: Mutex::new(Vec::new()),
            agent: None,
            proxy: None,
        }
    }

    fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn sock(&self) -> String {
        format!("{}/zds.sock", self.d())
    }

    fn log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// `redirect-user <cmd> …` in Kubernetes mode (`run --bare-relay` or `node-agent`);
    /// returns once its first sync is done.
    fn start_agent(&mut self, cmd: &str) {
        self.spawn_agent(cmd);
        let log = self.log();
        wait_for("the agent's first sync", 15, || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("k8s: first sync done"))
        });
    }

    /// Like `start_agent`, returning once its control socket answers.
    fn spawn_agent(&mut self, cmd: &str) {
        let kubeconfig = self.api.kubeconfig();
        let mut args = vec![
            cmd,
            "--socket",
            &self.sock(),
            "--state-dir",
            self.d(),
            "--pin-dir",
            &self.pin,
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--node-name",
            NODE,
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        if cmd == "run" {
            args.extend(["--bare-relay", "--drain-secs", "0"].map(String::from));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.agent = Some(Proc::spawn_in(&self.agent_cg.path, &args, &self.log()));
        wait_for("the agent's control socket", 15, || {
            cli(&["status", "--json", "--state-dir", self.d()]).is_ok()
        });
    }

    fn start_proxy(&mut self) {
        let sock = self.sock();
        let ca = format!("{}/ca", self.d());
        self.proxy = Some(Proc::spawn_in(
            &self.proxy_cg.path,
            &["proxy", "--socket", &sock, "--bare-relay", "--ca-dir", &ca],
            &self.dir.join("proxy.log"),
        ));
    }

    /// A process of pod `uid` inside the namespace of host `host`, in the cgroup
    /// `<kubepods>/pod<uid>/<ctr>` (the cgroupfs driver's layout).
    fn pod_process(&self, host: &str, uid: &str, ctr: &str) -> u32 {
        let cg = self.kubepods.join(format!("pod{uid}")).join(ctr);
        std::fs::create_dir_all(&cg).unwrap();
        let ns = std::fs::File::open(self.topo.host(host).path()).unwrap();
        let nsfd = ns.as_raw_fd();
        let procs = CString::new(cg.join("cgroup.procs").to_str().unwrap().as_bytes()).unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only async-signal-safe calls (open, write,
        // close, getpid, setns) on buffers made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" is this process.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(nsfd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        self.procs.lock().unwrap().push((child, cg));
        pid
    }

    /// A running pod of node1 in the API, with host `host`'s addresses, and its process.
    fn running_pod(&self, host: &str, ns: &str, uid: &str, labels: Value) -> Value {
        self.pod_process(host, uid, "ctr");
        let h = self.topo.host(host);
        let pod = pod_object(
            ns,
            host,
            uid,
            NODE,
            labels,
            &[&h.v4.to_string(), &h.v6.to_string()],
        );
        self.api.put_pod(pod.clone());
        pod
    }

    /// The agent's pods by uid, as `status --json` shows them.
    fn pods(&self) -> BTreeMap<String, Value> {
        pods_by_uid(self.d())
    }

    fn state(&self, uid: &str) -> Option<String> {
        self.pods()
            .get(uid)
            .map(|p| p["state"]["state"].as_str().unwrap().to_string())
    }

    fn wait_state(&self, what: &str, uid: &str, state: Option<&str>) {
        wait_for(what, 15, || self.state(uid).as_deref() == state);
    }

    fn counter(&self, uid: &str) -> u64 {
        self.pods()
            .get(uid)
            .and_then(|p| p["counters"]["redirected_15001"].as_u64())
            .unwrap_or(0)
    }

    /// A connection from pod `host` to the peer: Ok(true) if it went through the proxy
    /// (the pod's outbound counter moved), Ok(false) if straight to the peer.
    fn through_proxy(&self, host: &str, uid: &str) -> anyhow::Result<bool> {
        let before = self.counter(uid);
        let c = self.topo.host("c");
        let a = ask(
            &self.topo.host(host).netns().unwrap(),
            std::net::SocketAddr::new(c.addr(false), PEER_PORT),
        )?;
        anyhow::ensure!(a.starts_with("c from "), "{a}");
        Ok(self.counter(uid) > before)
    }

    /// The values this test's agent patched into `ns/name`'s annotation, in order
    /// (None: removed), checking each request is a merge patch of pods/status.
    fn annotation_patches(&self, ns: &str, name: &str) -> Vec<Option<String>> {
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}/status");
        self.api
            .patches()
            .into_iter()
            .filter(|p| p.path == path)
            .map(|p| {
                assert_eq!(p.method, "PATCH");
                assert_eq!(p.content_type, "application/merge-patch+json");
                let a = &p.body["metadata"]["annotations"];
                assert_eq!(a.as_object().map(|o| o.len()), Some(1), "{}", p.body);
                a["ambient.istio.io/redirection"].as_str().map(String::from)
            })
            .collect()
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

#[test]
fn labels_of_pods_and_namespaces_enrol_and_release_running_pods() {
    let mut k = Cluster::new("k8sflip", &[("a", 10), ("b", 11)]);
    k.api.put_namespace("app", json!({}));
    k.api.put_namespace("amb", json!({AMBIENT: "ambient"}));
    let (ua, ub) = (uid(), uid());
    k.running_pod("a", "app", &ua, json!({AMBIENT: "ambient"}));
    k.running_pod("b", "amb", &ub, json!({AMBIENT: "none"}));

    // The agent alone: a is enrolled (found through /proc) and waits for a proxy,
    // refusing its connections meanwhile; the annotation says pending.
    k.start_agent("node-agent");
    k.wait_state("a enrolled", &ua, Some("waiting_for_proxy"));
    let netns = k.pods()[&ua]["spec"]["netns"].as_str().unwrap().to_string();
    assert!(
        netns.starts_with("/proc/") && netns.ends_with("/ns/net"),
        "{netns}"
    );
    wait_for("a annotated pending", 10, || {
        k.api.redirection("app", "a") == s("pending")
    });
    assert!(k.through_proxy("a", &ua).is_err(), "a's traffic escaped");
    // b opted out in an ambient namespace.
    assert_eq!(k.state(&ub), None);

    // A proxy connects: a is ready, its traffic goes through it, the annotation says so.
    k.start_proxy();
    k.wait_state("a ready", &ua, Some("ready"));
    wait_for("a annotated enabled", 10, || {
        k.api.redirection("app", "a") == s("enabled")
    });
    assert!(k.through_proxy("a", &ua).unwrap());

    // b's own label goes: its namespace's label enrols it.
    k.api.modify_pod("amb", "b", |p| {
        p["metadata"]["labels"] = json!({});
    });
    k.wait_state("b enrolled by its namespace", &ub, Some("ready"));
    assert!(k.through_proxy("b", &ub).unwrap());
    wait_for("b annotated enabled", 10, || {
        k.api.redirection("amb", "b") == s("enabled")
    });

    // The namespace's label goes: b is released; a (labelled itself) stays.
    k.api.put_namespace("amb", json!({}));
    k.wait_state("b released with its namespace's label", &ub, None);
    wait_for("b's annotation removed", 10, || {
        k.api.redirection("amb", "b").is_none()
    });
    assert!(!k.through_proxy("b", &ub).unwrap(), "b still redirected");
    assert_eq!(k.state(&ua).as_deref(), Some("ready"));

    // And comes back: b is enrolled again.
    k.api.put_namespace("amb", json!({AMBIENT: "ambient"}));
    k.wait_state("b enrolled again", &ub, Some("ready"));
    assert!(k.through_proxy("b", &ub).unwrap());

    // a's own label flips to none: released.
    k.api.modify_pod("app", "a", |p| {
        p["metadata"]["labels"] = json!({AMBIENT: "none"});
    });
    k.wait_state("a released", &ua, None);
    wait_for("a's annotation removed", 10, || {
        k.api.redirection("app", "a").is_none()
    });
    assert!(!k.through_proxy("a", &ua).unwrap());

    // Every write was a merge patch of pods/status, each value once, in order.
    assert_eq!(
        k.annotation_patches("app", "a"),
        vec![s("pending"), s("enabled"), None]
    );
    // b: enabled, removed, enabled again; a `pending` may come before each enabled
    // (listeners not found yet at the first look).
    let b = k.annotation_patches("amb", "b");
    let settled: Vec<_> = b
        .iter()
        .filter(|v| v.as_deref() != Some("pending"))
        .cloned()
        .collect();
    assert_eq!(settled, vec![s("enabled"), None, s("enabled")], "{b:?}");
    assert!(
        b.windows(2).all(|w| w[0] != w[1]),
        "a value patched twice: {b:?}"
    );
    let log = k.agent_log();
    assert!(log.contains("k8s: releasing pod"), "{log}");
}

#[test]
fn deleted_finished_and_unknown_pods_are_released() {
    let mut k = Cluster::new("k8sgone", &[("a", 10), ("b", 11), ("h", 12)]);
    k.api.put_namespace("app", json!({AMBIENT: "ambient"}));
    let (ua, ub) = (uid(), uid());
    k.running_pod("a", "app", &ua, json!({}));
    k.running_pod("b", "app", &ub, json!({}));
    k.start_agent("run");
    k.wait_state("a ready", &ua, Some("ready"));
    k.wait_state("b ready", &ub, Some("ready"));
    assert!(k.through_proxy("a", &ua).unwrap());

    // A pod added by hand whose uid is no pod of this node: Kubernetes mode owns the
    // agent's pods, so it is released.
    let h = k.topo.host("h").path();
    let _ = cli(&[
        "pod",
        "add",
        "--state-dir",
        k.d(),
        "--netns",
        &h,
        "--uid",
        "by-hand",
        "--name",
        "h",
        "--namespace",
        "app",
        "--service-account",
        "sa",
    ])
    .unwrap();
    k.wait_state("the hand-added pod released", "by-hand", None);

    // a is deleted from the API: released.
    k.api.delete_pod("app", "a");
    k.wait_state("deleted a released", &ua, None);
    assert!(!k.through_proxy("a", &ua).unwrap());

    // b's containers finish (phase Succeeded): released, annotation removed.
    wait_for("b annotated enabled", 10, || {
        k.api.redirection("app", "b") == s("enabled")
    });
    k.api
        .modify_pod("app", "b", |p| p["status"]["phase"] = json!("Succeeded"));
    k.wait_state("finished b released", &ub, None);
    wait_for("b's annotation removed", 10, || {
        k.api.redirection("app", "b").is_none()
    });
    assert_eq!(k.annotation_patches("app", "b").last(), Some(&None));
    // A deleted pod is not patched.
    assert!(k.annotation_patches("app", "a").iter().all(Option::is_some));
}

#[test]
fn pods_outside_the_mesh_are_never_enrolled() {
    let mut k = Cluster::new(
        "k8snever",
        &[
            ("ok", 10),
            ("hostnet", 11),
            ("sidecar", 12),
            ("sys", 13),
            ("optout", 14),
            ("own", 15),
            ("other", 16),
        ],
    );
    k.api.put_namespace("app", json!({AMBIENT: "ambient"}));
    k.api
        .put_namespace("kube-system", json!({AMBIENT: "ambient"}));
    k.api.put_namespace("agents", json!({AMBIENT: "ambient"}));
    let ok = uid();
    k.running_pod("ok", "app", &ok, json!({}));
    let mut never = Vec::new();
    for (host, ns, labels) in [
        ("hostnet", "app", json!({})),
        ("sidecar", "app", json!({})),
        ("sys", "kube-system", json!({AMBIENT: "ambient"})),
        ("optout", "app", json!({AMBIENT: "none"})),
        ("own", "agents", json!({"app": "redirect-agent"})),
        ("other", "app", json!({})),
    ] {
        let u = uid();
        let mut pod = k.running_pod(host, ns, &u, labels);
        match host {
            "hostnet" => pod["spec"]["hostNetwork"] = json!(true),
            "sidecar" => pod["metadata"]["annotations"] = json!({"sidecar.istio.io/status": "{}"}),
            // A pod of another node (same namespaces, process here): not watched.
            "other" => pod["spec"]["nodeName"] = json!("node2"),
            _ => {}
        }
        k.api.put_pod(pod);
        never.push((host, ns, u));
    }
    k.start_agent("run");
    k.wait_state("the pod of the mesh ready", &ok, Some("ready"));
    // The reconciler runs every half second: a few more rounds change nothing.
    holds_for("only the pod of the mesh is enrolled", 1500, || {
        let pods = k.pods();
        pods.len() == 1 && pods.contains_key(&ok)
    });
    for (host, ns, u) in &never {
        assert!(!k.through_proxy(host, u).unwrap(), "{host} redirected");
        assert!(
            k.annotation_patches(ns, host).is_empty(),
            "{host} annotated"
        );
    }
}

#[test]
fn a_process_of_the_pod_in_a_namespace_without_its_ip_is_not_taken() {
    let mut k = Cluster::new("k8swrong", &[("a", 10), ("x", 11)]);
    k.api.put_namespace("app", json!({AMBIENT: "ambient"}));
    let ua = uid();
    // The pod's only process sits in x's namespace, which does not hold a's IPs.
    k.pod_process("x", &ua, "early");
    let h = k.topo.host("a");
    k.api.put_pod(pod_object(
        "app",
        "a",
        &ua,
        NODE,
        json!({}),
        &[&h.v4.to_string(), &h.v6.to_string()],
    ));
    k.start_agent("run");
    let log = k.log();
    wait_for("the refusal logged", 10, || {
        std::fs::read_to_string(&log).is_ok_and(|l| {
            l.contains("k8s: running pod's namespace not found")
                && l.contains("holds one of its IPs")
        })
    });
    holds_for("x's namespace not enrolled as a's", 1000, || {
        k.pods().is_empty()
    });
    assert!(!k.through_proxy("x", &ua).unwrap());

    // A younger process of the pod in the right namespace: that one is taken, though
    // the older process is elsewhere.
    let pid = k.pod_process("a", &ua, "late");
    k.wait_state("a enrolled", &ua, Some("ready"));
    assert_eq!(
        k.pods()[&ua]["spec"]["netns"].as_str(),
        Some(format!("/proc/{pid}/ns/net").as_str())
    );
    assert!(k.through_proxy("a", &ua).unwrap());
    assert!(!k.through_proxy("x", &ua).unwrap());
}

#[test]
fn dropped_watches_expired_versions_and_outages_release_nothing_wrongly() {
    let mut k = Cluster::new("k8srelist", &[("a", 10), ("b", 11), ("n", 12)]);
    k.api.put_namespace("app", json!({AMBIENT: "ambient"}));
    let (ua, ub, un) = (uid(), uid(), uid());
    k.running_pod("a", "app", &ua, json!({}));
    k.running_pod("b", "app", &ub, json!({}));
    k.start_agent("run");
    k.wait_state("a ready", &ua, Some("ready"));
    k.wait_state("b ready", &ub, Some("ready"));
    wait_for("annotations enabled", 10, || {
        k.api.redirection("app", "a") == s("enabled")
            && k.api.redirection("app", "b") == s("enabled")
    });

    // a must stay ready through all of it: watched from a thread.
    let stop = Arc::new(AtomicBool::new(false));
    let left = Arc::new(Mutex::new(Vec::<String>::new()));
    let watcher = {
        let (stop, left, d, ua) = (stop.clone(), left.clone(), k.d().to_string(), ua.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(out) = cli(&["status", "--json", "--state-dir", &d]) {
                    let v: Value = serde_json::from_str(&out).unwrap();
                    let st = v["pods"]
                        .as_array()
                        .and_then(|p| p.iter().find(|p| p["spec"]["uid"] == ua.as_str()))
                        .map(|p| p["state"]["state"].clone());
                    if st != Some(json!("ready")) {
                        left.lock().unwrap().push(format!("{st:?}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // Watches dropped: resumed from their version, no relist needed, nothing changes.
    let lists = k.api.lists(Kind::Pods);
    k.api.drop_watches();
    wait_for("watches back", 10, || {
        k.api.watches(Kind::Pods) == 1 && k.api.watches(Kind::Namespaces) == 1
    });
    k.api.put_pod(pod_object(
        "app",
        "n",
        &un,
        NODE,
        json!({}),
        &[&k.topo.host("n").v4.to_string()],
    ));
    k.pod_process("n", &un, "ctr");
    k.wait_state("a pod added after the drop is enrolled", &un, Some("ready"));
    assert_eq!(
        k.api.lists(Kind::Pods),
        lists,
        "a dropped watch resumes without a list"
    );

    // An outage: the API answers 503. Nothing is released meanwhile.
    k.api.set_down(true);
    holds_for("pods kept during the outage", 1500, || {
        let p = k.pods();
        [&ua, &ub, &un]
            .iter()
            .all(|u| p.get(*u).is_some_and(|p| p["state"]["state"] == "ready"))
    });
    // Changes the agent cannot see yet; then the history expires (410 Gone on resume).
    {
        // Made through the fake's own state while it answers nobody.
        k.api.delete_pod("app", "b");
        k.api.modify_pod("app", "n", |p| {
            p["metadata"]["labels"] = json!({AMBIENT: "none"})
        });
    }
    k.api.expire();
    k.api.set_down(false);
    wait_for("relisted", 15, || k.api.lists(Kind::Pods) > lists);
    k.wait_state("b, deleted during the outage, released", &ub, None);
    k.wait_state("n, opted out during the outage, released", &un, None);
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    assert_eq!(*left.lock().unwrap(), Vec::<String>::new(), "a left ready");
    assert_eq!(k.state(&ua).as_deref(), Some("ready"));
    assert!(k.through_proxy("a", &ua).unwrap());
    // a's annotation was never taken away (a `pending` may have come first, when its
    // listeners were not found at the first look).
    let a = k.annotation_patches("app", "a");
    assert!(
        !a.contains(&None) && a.last() == Some(&s("enabled")),
        "{a:?}"
    );
    let log = k.agent_log();
    assert!(log.contains("k8s: watch failed"), "{log}");
    assert!(log.contains("k8s: listed again"), "{log}");
}

#[test]
fn a_restarted_agent_keeps_its_pods_until_the_api_has_synced() {
    let mut k = Cluster::new("k8srestart", &[("a", 10), ("b", 11)]);
    k.api.put_namespace("app", json!({AMBIENT: "ambient"}));
    let (ua, ub) = (uid(), uid());
    k.running_pod("a", "app", &ua, json!({}));
    k.running_pod("b", "app", &ub, json!({}));
    k.start_agent("run");
    k.wait_state("a ready", &ua, Some("ready"));
    k.wait_state("b ready", &ub, Some("ready"));
    let netns_a = k.pods()[&ua]["spec"]["netns"].clone();

    // The agent dies; meanwhile b is deleted and the API becomes unreachable.
    k.agent.as_mut().unwrap().signal(libc::SIGKILL);
    k.api.delete_pod("app", "b");
    k.api.set_down(true);
    // The new agent takes its pods back from its state file and, without a synced
    // view of the API, releases none of them.
    k.spawn_agent("run");
    k.wait_state("a ready again", &ua, Some("ready"));
    holds_for("both pods kept while the API is unreachable", 1500, || {
        let p = k.pods();
        p.contains_key(&ua) && p.contains_key(&ub)
    });
    assert!(!k.agent_log().contains("k8s: first sync done"));
    assert!(k.through_proxy("a", &ua).unwrap());

    // The API is back: b, deleted meanwhile, is released; a is kept as it was.
    k.api.set_down(false);
    k.wait_state("b released after the sync", &ub, None);
    assert_eq!(k.state(&ua).as_deref(), Some("ready"));
    assert_eq!(k.pods()[&ua]["spec"]["netns"], netns_a);
    assert!(k.through_proxy("a", &ua).unwrap());
}

/// Membership as the CNI server asks it, against the fake API, in this process.
#[test]
fn membership_is_answered_from_the_watch_and_waits_a_bounded_time() {
    use redirect_user::{
        k8s::{KubeConfig, KubeWatch, select::SelectConfig},
        membership::{CniPod, Decision, Membership, MembershipError},
    };
    let api = FakeApi::start("k8smember").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cfg = KubeConfig {
        kubeconfig: Some(api.kubeconfig()),
        node_name: NODE.into(),
        select: SelectConfig::default(),
        proc_root: "/proc".into(),
        dns_capture: true,
    };
    let cni = |name: &str, uid: &str| CniPod {
        uid: uid.into(),
        name: name.into(),
        namespace: "app".into(),
        netns: "/var/run/netns/x".into(),
        container_id: "c".into(),
        ips: vec![],
    };
    let short = Duration::from_millis(300);

    // The API is down at first: not synced, the answer says so after the wait.
    api.set_down(true);
    let w = rt.block_on(KubeWatch::start(cfg, None)).unwrap();
    let t = Instant::now();
    let r = rt.block_on(w.decide(&cni("p", ""), short));
    assert!(
        matches!(r, Err(MembershipError::Unavailable(ref m)) if m.contains("not synced")),
        "{r:?}"
    );
    assert!(t.elapsed() >= short);
    assert!(!w.synced());

    api.put_namespace("app", json!({AMBIENT: "ambient"}));
    api.set_down(false);
    wait_for("synced", 15, || w.synced());

    // A pod the API shows later: the answer waits for it.
    let later = std::thread::scope(|sc| {
        sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            api.put_pod(pod_object(
                "app",
                "p",
                "uid-p",
                NODE,
                json!({}),
                &["10.9.0.1"],
            ));
        });
        rt.block_on(w.decide(&cni("p", "uid-p"), Duration::from_secs(10)))
    });
    assert_eq!(
        later.unwrap(),
        Decision::InMesh {
            uid: "uid-p".into(),
            service_account: "sa-p".into(),
            dns_capture: true
        }
    );
    // The CNI's uid may be empty: the cluster's is given.
    assert!(matches!(
        rt.block_on(w.decide(&cni("p", ""), short)),
        Ok(Decision::InMesh { ref uid, .. }) if uid == "uid-p"
    ));
    // Another pod of the same name (an earlier incarnation) is not taken for it.
    let r = rt.block_on(w.decide(&cni("p", "uid-new"), short));
    assert!(matches!(r, Err(MembershipError::NotSeen { .. })), "{r:?}");
    // Never seen: refused after the wait.
    let r = rt.block_on(w.decide(&cni("ghost", ""), short));
    assert!(matches!(r, Err(MembershipError::NotSeen { .. })), "{r:?}");
    // Not in the mesh, with the reason.
    let mut hn = pod_object("app", "hn", "uid-hn", NODE, json!({}), &["10.9.0.2"]);
    hn["spec"]["hostNetwork"] = json!(true);
    api.put_pod(hn);
    let r = rt.block_on(w.decide(&cni("hn", "uid-hn"), Duration::from_secs(5)));
    assert_eq!(r.unwrap(), Decision::NotInMesh("hostNetwork".into()));
    // A pod of another node is not this node's business: never seen here.
    api.put_pod(pod_object(
        "app",
        "far",
        "uid-far",
        "node2",
        json!({}),
        &["10.9.0.3"],
    ));
    let r = rt.block_on(w.decide(&cni("far", ""), short));
    assert!(matches!(r, Err(MembershipError::NotSeen { .. })), "{r:?}");
    let st = w.status();
    assert!(
        st.pods_synced && st.namespaces_synced && st.pods == 2,
        "{st:?}"
    );
    drop(w);
}
