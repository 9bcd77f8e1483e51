//! Faults under load: a loop of new connections between two enrolled pods runs through
//! each fault, every connection's outcome recorded, and a capture of the client pod's
//! wire proves that nothing of its app left past the proxy. Each fault must end by
//! itself; the time it took is printed as `fault <name>: … recovered in N ms` (the
//! figures in docs/faults.md come from these lines). Agents and proxies run as
//! processes, as on a node, unless the fault is the engine's own.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redirect_tests::{
    process::{Proc, RemoveDir, cli, pod_add, pods_by_uid, wait_for},
    traffic::{Escapes, Record, Traffic, Wire, hbone},
    *,
};

/// A node: pods in namespaces, each running an echo app on APP_PORT, and (when
/// started) `redirect-user node-agent` and `redirect-user proxy` (HBONE between the
/// pods it serves) on their own directories.
struct Node {
    topo: Topology,
    dir: PathBuf,
    pin: String,
    agent: Option<Proc>,
    proxy: Option<Proc>,
    runs: u32,
    _dirs: (RemoveDir, RemoveDir),
}

impl Node {
    fn new(tag: &str, hosts: &[(&str, u16)]) -> Node {
        let mut topo = Topology::new(tag).unwrap();
        for (name, n) in hosts {
            topo.add_host(name, *n).unwrap();
        }
        for (name, _) in hosts {
            let h = topo.host(name);
            for v6 in [false, true] {
                echo_server(
                    &h.netns().unwrap(),
                    name,
                    SocketAddr::new(h.addr(v6), APP_PORT),
                )
                .unwrap();
            }
        }
        let base = topo.node().trim_end_matches("-node").to_string();
        let dir = PathBuf::from(format!("/tmp/{base}"));
        std::fs::create_dir_all(&dir).unwrap();
        let pin = format!("/sys/fs/bpf/{base}");
        Node {
            topo,
            _dirs: (RemoveDir::new(dir.clone()), RemoveDir::new(pin.clone())),
            dir,
            pin,
            agent: None,
            proxy: None,
            runs: 0,
        }
    }

    fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("zds.sock")
    }

    /// Starts the agent (its sockets from a killed run removed first) and returns
    /// once it answers on its control socket.
    fn start_agent(&mut self) {
        let _ = std::fs::remove_file(self.sock());
        let _ = std::fs::remove_file(self.dir.join("control.sock"));
        self.runs += 1;
        let log = self.dir.join(format!("agent{}.log", self.runs));
        self.agent = Some(Proc::node_agent(&self.dir, &self.pin, &log));
        let d = self.d().to_string();
        wait_for("agent answering", 15, || {
            cli(&["pod", "list", "--state-dir", &d]).is_ok()
        });
    }

    fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.signal(libc::SIGKILL);
        }
    }

    fn start_proxy(&mut self) -> u32 {
        self.runs += 1;
        let sock = self.sock();
        let ca = self.dir.join("ca");
        let p = Proc::spawn(
            &[
                "proxy",
                "--socket",
                sock.to_str().unwrap(),
                "--ca-dir",
                ca.to_str().unwrap(),
                "--drain-secs",
                "0",
            ],
            &self.dir.join(format!("proxy{}.log", self.runs)),
        );
        let pid = p.0.id();
        self.proxy = Some(p);
        pid
    }

    fn kill_proxy(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            p.signal(libc::SIGKILL);
        }
    }

    fn add(&self, pod: &str) -> anyhow::Result<String> {
        pod_add(self.d(), &self.topo.host(pod).path(), pod)
    }

    fn del(&self, pod: &str) -> anyhow::Result<String> {
        let uid = format!("uid-{pod}");
        cli(&["pod", "del", "--state-dir", self.d(), "--uid", &uid])
    }

    /// The pod's state as the agent tells it (None: not known).
    fn state(&self, pod: &str) -> Option<String> {
        pods_by_uid(self.d())
            .get(&format!("uid-{pod}"))
            .map(|p| p["state"]["state"].as_str().unwrap_or("").to_string())
    }

    fn wait_ready(&self, pods: &[&str], secs: u64) {
        for pod in pods {
            wait_for(&format!("{pod} ready"), secs, || {
                self.state(pod).as_deref() == Some("ready")
            });
        }
    }

    fn to(&self, pod: &str) -> SocketAddr {
        SocketAddr::new(self.topo.host(pod).addr(false), APP_PORT)
    }

    fn ns(&self, pod: &str) -> Netns {
        self.topo.host(pod).netns().unwrap()
    }

    fn ns_name(&self, pod: &str) -> String {
        self.topo.host(pod).name.clone()
    }

    /// A loop from pod `from` to pod `to`'s app, and a capture of `from`'s wire.
    fn traffic(&self, from: &str, to: &str) -> (Traffic, Wire) {
        let wire = Wire::watch(&self.topo, from).unwrap();
        let t = Traffic::start(self.ns(from), self.to(to), &format!("{to} from "));
        (t, wire)
    }
}

/// What the redirection of a pod leaves in its namespace: (rule, routes, tc, accept_local).
fn in_ns(ns: &str, netns: &Netns) -> (bool, bool, bool, String) {
    let accept = netns
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/conf/eth0/accept_local"))
        .unwrap()
        .unwrap()
        .trim()
        .to_string();
    (
        ip_out(ns, &["rule"]).contains("0x111"),
        !ip_out(ns, &["route", "show", "table", "100"]).is_empty(),
        tc_out(ns, &["filter", "show", "dev", "eth0", "egress"]).contains("redirect_egress"),
        accept,
    )
}

const CLEAN: (bool, bool, bool, &str) = (false, false, false, "0");
const ENROLLED: (bool, bool, bool, &str) = (true, true, true, "1");

fn same(a: &(bool, bool, bool, String), b: (bool, bool, bool, &str)) -> bool {
    (a.0, a.1, a.2, a.3.as_str()) == b
}

/// One line per fault, the figures docs/faults.md reports.
fn report(name: &str, load: &str, r: &Record, e: &Escapes, recovered: Duration) {
    if r.failed() > 0 {
        eprintln!("fault {name}: failures: {:?}", r.errors());
    }
    eprintln!(
        "fault {name}: load {load}; {} connections, {} failed, {} bytes escaped ({} plaintext frames, {} unproxied connections); recovered in {} ms",
        r.outcomes.len(),
        r.failed(),
        e.bytes,
        e.plaintext_frames,
        e.connections.len(),
        recovered.as_millis()
    );
}

fn assert_nothing_escaped(name: &str, e: &Escapes) {
    assert!(e.frames > 0, "{name}: the capture saw nothing");
    assert!(e.complete, "{name}: the capture missed frames: {e:?}");
    assert!(e.none(), "{name}: escaped past the proxy: {e:?}");
}

/// A tiny deterministic generator for the kill points (seed printed, so a failing
/// run can be replayed).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// `redirect-user ARGS…` started, not waited for.
fn spawn_cli(args: &[&str]) -> Child {
    Command::new(redirect_user_bin().unwrap())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn the_agent_killed_at_random_points_of_enrolment_and_release() {
    const ROUNDS: u32 = 50;
    let mut n = Node::new("fkill", &[("a", 10), ("b", 11), ("x", 12)]);
    n.start_agent();
    n.start_proxy();
    n.add("a").unwrap();
    n.add("b").unwrap();
    n.wait_ready(&["a", "b"], 15);
    let x_ns = n.ns("x");
    let x_name = n.ns_name("x");
    let (traffic, wire) = n.traffic("a", "b");
    let seed = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64);
    eprintln!("kill points from seed {seed} (FAULT_SEED replays them)");
    let mut rng = Lcg(seed);
    let mut recoveries = Vec::new();
    let path = n.topo.host("x").path();
    for round in 0..ROUNDS {
        // x is out on even rounds (add it), in on odd ones (remove it).
        let adding = round % 2 == 0;
        let args: Vec<String> = if adding {
            [
                "pod",
                "add",
                "--state-dir",
                n.d(),
                "--netns",
                &path,
                "--uid",
                "uid-x",
                "--name",
                "x",
                "--namespace",
                "default",
                "--service-account",
                "sa",
            ]
            .map(String::from)
            .to_vec()
        } else {
            ["pod", "del", "--state-dir", n.d(), "--uid", "uid-x"]
                .map(String::from)
                .to_vec()
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut op = spawn_cli(&args);
        // The request takes a few ms from process start to the agent's answer.
        std::thread::sleep(Duration::from_micros(rng.below(12_000)));
        let t0 = Instant::now();
        n.kill_agent();
        let _ = op.kill();
        let _ = op.wait();
        n.start_agent();
        // Right after the restart, the agent's word and the namespace agree: a pod it
        // knows is redirected, one it does not know has nothing of ours left.
        let listed = n.state("x").is_some();
        let now = in_ns(&x_name, &x_ns);
        if listed {
            assert!(same(&now, ENROLLED), "round {round}: x listed, {now:?}");
        } else {
            assert!(
                same(&now, CLEAN),
                "round {round}: x unknown to the agent, yet in its namespace: {now:?}"
            );
        }
        // The operation is retried (as the CNI plugin or the watch does) to its end.
        if adding {
            n.add("x").unwrap();
            // Served again (the proxy back on the new agent), every few rounds.
            if round % 10 == 0 {
                n.wait_ready(&["x"], 15);
            }
        } else {
            let _ = n.del("x");
            assert_eq!(n.state("x"), None, "round {round}");
            let now = in_ns(&x_name, &x_ns);
            assert!(same(&now, CLEAN), "round {round}: removed, left {now:?}");
        }
        recoveries.push(t0.elapsed());
    }
    // The steady pods were served throughout.
    n.wait_ready(&["a", "b"], 15);
    std::thread::sleep(Duration::from_millis(200));
    let r = traffic.finish();
    let e = wire.stop(hbone).unwrap();
    recoveries.sort();
    let worst = *recoveries.last().unwrap();
    eprintln!(
        "agent kills: recovery median {} ms, worst {} ms",
        recoveries[recoveries.len() / 2].as_millis(),
        worst.as_millis()
    );
    report(
        "agent-sigkill-50",
        "a->b loop, x added and removed",
        &r,
        &e,
        worst,
    );
    assert!(r.ok() > 100, "{}", r.ok());
    assert_eq!(r.failed(), 0, "{:?}", r.errors());
    assert_nothing_escaped("agent kills", &e);
    assert!(worst < Duration::from_secs(10), "{worst:?}");
}

#[test]
fn the_proxy_killed_fails_closed_until_a_new_one_serves() {
    let mut n = Node::new("fproxy", &[("a", 10), ("b", 11)]);
    n.start_agent();
    n.start_proxy();
    n.add("a").unwrap();
    n.add("b").unwrap();
    n.wait_ready(&["a", "b"], 15);
    let (traffic, wire) = n.traffic("a", "b");
    std::thread::sleep(Duration::from_millis(300));
    // Its listeners close with it.
    let t0 = Instant::now();
    n.kill_proxy();
    std::thread::sleep(Duration::from_millis(1000));
    let t1 = Instant::now();
    n.start_proxy();
    let back = traffic
        .wait_ok_after(t1, Duration::from_secs(15))
        .expect("served again");
    let r = traffic.finish();
    let e = wire.stop(hbone).unwrap();
    report(
        "proxy-sigkill",
        "a->b loop; 1 s without a proxy",
        &r,
        &e,
        back - t1,
    );
    eprintln!("proxy down for {} ms", (t1 - t0).as_millis());
    assert_nothing_escaped("proxy killed", &e);
    // Refused while no proxy served: fail closed, not passed.
    assert!(r.failed() > 0, "nothing failed without a proxy");
    assert!(r.first_ok_after(t0 + Duration::from_millis(600)).unwrap() >= t1);
    assert!(back - t1 < Duration::from_secs(10));
}

#[test]
fn pinned_state_removed_under_the_agent() {
    let mut n = Node::new("fpins", &[("a", 10), ("b", 11), ("c", 100)]);
    n.start_agent();
    n.start_proxy();
    n.add("a").unwrap();
    n.add("b").unwrap();
    n.wait_ready(&["a", "b"], 15);
    let (traffic, wire) = n.traffic("a", "b");
    // An outside client of b's app: each of its connections must go through b's proxy
    // (b's counter of connections given to 15006 grows with it).
    let d = n.d().to_string();
    let counted = || -> u64 {
        pods_by_uid(&d)
            .get("uid-b")
            .and_then(|p| p["counters"]["redirected_15006"].as_u64())
            .unwrap_or(0)
    };
    let past_proxy =
        |r: &Record, before: u64, after: u64| -> i64 { r.ok() as i64 - (after - before) as i64 };
    let before = counted();
    let inbound = Traffic::start(n.ns("c"), n.to("b"), "b from ");
    std::thread::sleep(Duration::from_millis(300));
    // Pins removed: maps (the programs hold them), and b's sk_lookup link.
    let pin = PathBuf::from(&n.pin);
    for p in ["maps/pods", "maps/flows", "links/uid-b"] {
        std::fs::remove_file(pin.join(p)).unwrap();
    }
    let t0 = Instant::now();
    // The agent pins the link and the maps again (it checks every second): an agent
    // started next takes over the same maps rather than new, empty ones.
    wait_for("b's link and the maps pinned again", 5, || {
        ["links/uid-b", "maps/pods", "maps/flows"]
            .iter()
            .all(|p| pin.join(p).exists())
    });
    let repinned = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let r1 = inbound.finish();
    let after = counted();
    // The agent restarts on what is left, clients connecting throughout.
    let before2 = after;
    let inbound = Traffic::start(n.ns("c"), n.to("b"), "b from ");
    n.kill_agent();
    n.start_agent();
    n.wait_ready(&["a", "b"], 15);
    std::thread::sleep(Duration::from_millis(300));
    let r2 = inbound.finish();
    let after2 = counted();
    let r = traffic.finish();
    let e = wire.stop(hbone).unwrap();
    report(
        "pins-removed",
        "a->b and c->b loops; maps/pods, maps/flows, links/<b> unpinned, then the agent restarted",
        &r,
        &e,
        repinned,
    );
    eprintln!(
        "pins removed: c->b {} ok, {} failed, {} past b's proxy; across the restart {} ok, {} failed, {} past it",
        r1.ok(),
        r1.failed(),
        past_proxy(&r1, before, after),
        r2.ok(),
        r2.failed(),
        past_proxy(&r2, before2, after2)
    );
    assert_nothing_escaped("pins removed", &e);
    assert_eq!(r.failed(), 0, "{:?}", r.errors());
    assert!(r1.ok() > 0 && r2.ok() > 0);
    assert!(
        past_proxy(&r1, before, after) <= 0,
        "inbound connections reached b's app past its proxy"
    );
    assert!(
        past_proxy(&r2, before2, after2) <= 0,
        "inbound connections reached b's app past its proxy across the restart"
    );
}

#[test]
fn a_pods_namespace_deleted_while_enrolled() {
    let mut n = Node::new("fnsdel", &[("a", 10), ("b", 11), ("x", 12)]);
    n.start_agent();
    n.start_proxy();
    for p in ["a", "b", "x"] {
        n.add(p).unwrap();
    }
    n.wait_ready(&["a", "b", "x"], 15);
    let (traffic, wire) = n.traffic("a", "b");
    std::thread::sleep(Duration::from_millis(200));
    // The runtime removes x's namespace (its processes are gone; the agent and the
    // proxy still hold it open).
    let t0 = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "del", &n.ns_name("x")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(300));
    // Removed as usual; the agent, restarted, does not bring it back.
    n.del("x").unwrap();
    assert_eq!(n.state("x"), None);
    let recovered = t0.elapsed();
    n.kill_agent();
    n.start_agent();
    assert_eq!(n.state("x"), None);
    n.wait_ready(&["a", "b"], 15);
    std::thread::sleep(Duration::from_millis(200));
    let r = traffic.finish();
    let e = wire.stop(hbone).unwrap();
    report(
        "netns-deleted",
        "a->b loop; x's namespace deleted, then x removed",
        &r,
        &e,
        recovered,
    );
    assert_nothing_escaped("netns deleted", &e);
    assert_eq!(r.failed(), 0, "{:?}", r.errors());
    let index = format!("{}/maps/pod_index", n.pin);
    let dump = bpftool_json(&["map", "dump", "pinned", &index]).unwrap();
    assert_eq!(dump.as_array().unwrap().len(), 2, "a and b only: {dump}");
}

#[test]
fn two_hundred_pods_enrolled_at_once() {
    const PODS: usize = 200;
    let names: Vec<String> = (0..PODS).map(|i| format!("p{i}")).collect();
    let hosts: Vec<(&str, u16)> = [("a", 1u16), ("b", 2)]
        .into_iter()
        .chain(
            names
                .iter()
                .enumerate()
                .map(|(i, s)| (s.as_str(), 10 + i as u16)),
        )
        .collect();
    let mut n = Node::new("f200", &hosts);
    n.start_agent();
    n.start_proxy();
    n.add("a").unwrap();
    n.add("b").unwrap();
    n.wait_ready(&["a", "b"], 15);
    let (traffic, wire) = n.traffic("a", "b");
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    // As many at once as a busy node's runtime starts sandboxes: 200 adds in flight.
    let d = n.d().to_string();
    let adds: Vec<_> = names
        .iter()
        .map(|p| {
            let (d, path, p) = (d.clone(), n.topo.host(p).path(), p.clone());
            std::thread::spawn(move || pod_add(&d, &path, &p))
        })
        .collect();
    let failed: Vec<String> = adds
        .into_iter()
        .filter_map(|h| h.join().unwrap().err().map(|e| e.to_string()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} adds failed: {:?}",
        failed.len(),
        failed.first()
    );
    wait_for("200 pods ready", 60, || {
        let pods = pods_by_uid(&d);
        names.iter().all(|p| {
            pods.get(&format!("uid-{p}"))
                .is_some_and(|v| v["state"]["state"] == "ready")
        })
    });
    let recovered = t0.elapsed();
    // Every one of them redirected: its app's connection to b goes through its proxy.
    for p in ["p0", "p99", "p199"] {
        let a =
            redirect_tests::traffic::exchange(&n.ns(p), n.to("b"), Duration::from_secs(3)).unwrap();
        assert!(a.starts_with("b from "), "{p}: {a}");
    }
    let r = traffic.finish();
    let e = wire.stop(hbone).unwrap();
    report(
        "200-pods-at-once",
        "a->b loop; 200 pod adds in flight",
        &r,
        &e,
        recovered,
    );
    assert_nothing_escaped("200 pods", &e);
    assert_eq!(r.failed(), 0, "{:?}", r.errors());
    assert!(recovered < Duration::from_secs(60));
}

#[test]
fn a_full_pods_map_refuses_one_pod_and_takes_it_when_room_is_made() {
    let m = Mesh::with_config("ffull", &[("a", 10), ("b", 11), ("d", 12)], |c| {
        c.max_pods = 2
    })
    .unwrap();
    let (proxy, _ca) = redirect_tests::traffic::mesh_proxy(&m).unwrap();
    m.enrol_mesh("a", PodOptions::default(), &proxy).unwrap();
    m.enrol_mesh("b", PodOptions::default(), &proxy).unwrap();
    let wire = Wire::watch(&m.topo, "a").unwrap();
    let traffic = Traffic::start(m.ns("a"), m.addr("b", false, APP_PORT), "b from ");
    std::thread::sleep(Duration::from_millis(200));
    // The third pod does not fit: refused whole, the others untouched.
    let err = m
        .enrol_mesh("d", PodOptions::default(), &proxy)
        .unwrap_err();
    let err = err.downcast::<redirect_user::ebpf::EnrolError>().unwrap();
    assert!(
        matches!(err, redirect_user::ebpf::EnrolError::Full { .. }),
        "{err}"
    );
    assert!(!ip_out(&m.host("d").name, &["rule"]).contains("0x111"));
    std::thread::sleep(Duration::from_millis(200));
    let r = traffic.finish();
    let e = wire.stop(hbone).unwrap();
    // Room is made (b leaves); d enrols and is served.
    let t0 = Instant::now();
    m.stop_proxy("b");
    m.engine.unenrol("b").unwrap();
    m.enrol_mesh("d", PodOptions::default(), &proxy).unwrap();
    let a = redirect_tests::traffic::exchange(
        &m.ns("d"),
        m.addr("a", false, APP_PORT),
        Duration::from_secs(3),
    )
    .unwrap();
    let recovered = t0.elapsed();
    assert!(a.starts_with("a from "), "{a}");
    let ev = m.events();
    assert!(
        ev.iter().any(|e| e.pod == "d" && e.listener == 15001),
        "{ev:?}"
    );
    report(
        "pods-map-full",
        "a->b loop; a third pod in a map of two",
        &r,
        &e,
        recovered,
    );
    assert_nothing_escaped("pods map full", &e);
    assert_eq!(r.failed(), 0, "{:?}", r.errors());
}

#[test]
fn a_syn_flood_turns_the_notes_over_while_clients_connect() {
    use redirect_tests::raw::{self, RawSender, Segment};
    const OUT: u32 = 70_000;
    const IN: u32 = 20_000;
    let m = Mesh::new("fflood", &[("a", 10), ("b", 11), ("z", 12), ("c", 100)]).unwrap();
    // SYN cookies on where the floods land (the default: used once a listener's SYN
    // queue overflows, as the floods make 15001's and 15006's do).
    for pod in ["b", "z"] {
        m.ns(pod)
            .run(|| std::fs::write("/proc/sys/net/ipv4/tcp_syncookies", "1"))
            .unwrap()
            .unwrap();
    }
    let (proxy, _ca) = redirect_tests::traffic::mesh_proxy(&m).unwrap();
    m.enrol_mesh("a", PodOptions::default(), &proxy).unwrap();
    m.enrol_mesh("b", PodOptions::default(), &proxy).unwrap();
    // The hostile app's pod.
    m.enrol("z", PodOptions::default()).unwrap();
    let (wa, wz) = (
        Wire::watch(&m.topo, "a").unwrap(),
        Wire::watch(&m.topo, "z").unwrap(),
    );
    let b = m.addr("b", false, APP_PORT);
    let traffic = Traffic::start(m.ns("a"), b, "b from ");
    let inbound = Traffic::start(m.ns("c"), b, "b from ");
    std::thread::sleep(Duration::from_millis(300));
    let z_before = m.counters("z").redirected_15001;
    let t0 = Instant::now();
    // z's app floods SYNs of distinct 5-tuples out (each one a note: more than the
    // notes the map holds); an outsider floods b's app port.
    let (zs, zd) = (m.host("z").addr(false), m.host("c").addr(false));
    let z_ns = m.ns("z");
    let out = std::thread::spawn(move || {
        let s = RawSender::new(&z_ns, false).unwrap();
        for i in 0..OUT {
            pace(i);
            let src = SocketAddr::new(zs, 1024 + (i % 60_000) as u16);
            let dst = SocketAddr::new(zd, 20_000 + (i / 60_000) as u16);
            let mut seg = Segment::syn(src, dst, i);
            seg.mss = 0;
            let _ = s.send(zd, &raw::packet(&seg));
        }
    });
    let (cs, bd) = (m.host("c").addr(false), b.ip());
    let c_ns = m.ns("c");
    let inb = std::thread::spawn(move || {
        let s = RawSender::new(&c_ns, false).unwrap();
        for i in 0..IN {
            pace(i);
            let src = SocketAddr::new(cs, 1024 + (i % 60_000) as u16);
            let mut seg = Segment::syn(src, SocketAddr::new(bd, APP_PORT), i);
            seg.mss = 0;
            let _ = s.send(bd, &raw::packet(&seg));
        }
    });
    out.join().unwrap();
    inb.join().unwrap();
    let t1 = Instant::now();
    // Both clients served again once it is over.
    let back = [&traffic, &inbound].map(|t| t.wait_ok_after(t1, Duration::from_secs(15)));
    let r = traffic.finish();
    let ri = inbound.finish();
    eprintln!(
        "syn-flood: served again {back:?} after the flood; a->b {} ok {} failed {:?}; c->b {} ok {} failed {:?}",
        r.ok(),
        r.failed(),
        r.errors(),
        ri.ok(),
        ri.failed(),
        ri.errors()
    );
    let back = back.map(|b| b.expect("served again"));
    let (ea, ez) = (wa.stop(hbone).unwrap(), wz.stop(|_| false).unwrap());
    let noted = m.counters("z").redirected_15001 - z_before;
    let recovered = back.into_iter().max().unwrap() - t1;
    report(
        "syn-flood",
        &format!(
            "a->b and c->b loops; {OUT} SYNs out of z, {IN} into b in {} ms",
            (t1 - t0).as_millis()
        ),
        &r,
        &ea,
        recovered,
    );
    eprintln!(
        "syn-flood: inbound c->b {} ok, {} failed; z's SYNs steered to its proxy: {noted}",
        ri.ok(),
        ri.failed()
    );
    assert_nothing_escaped("flood, a", &ea);
    assert!(ez.none(), "flood, z: {ez:?}");
    // Every one of z's SYNs went to its proxy, and the notes turned over.
    assert!(noted >= u64::from(OUT) * 9 / 10, "{noted}");
    // Clients were served during the flood too (on two shared cores, some time out).
    let during = |r: &Record| r.outcomes.iter().any(|o| o.ok && o.at > t0 && o.at < t1);
    assert!(
        during(&r) && during(&ri),
        "{:?} {:?}",
        r.errors(),
        ri.errors()
    );
}

/// Floods in bursts (500 packets, then 2 ms): a flood of some 150,000 packets a
/// second that leaves the two cores some room for the clients it is meant to hurt.
fn pace(i: u32) {
    if i % 500 == 499 {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Blocks until the namespace `ns` gets a routing rule (a netlink notification), then
/// SIGKILLs `pid` at once: the agent is cut short in the middle of an enrolment, right
/// after its first change inside the pod.
fn kill_at_first_rule(ns: &Netns, pid: i32) -> std::thread::JoinHandle<Instant> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const RTNLGRP_IPV4_RULE: u32 = 8;
    let fd = ns
        .run(|| {
            // SAFETY: plain socket calls with valid buffers; the fd is owned at once.
            unsafe {
                let raw = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
                assert!(raw >= 0, "{}", std::io::Error::last_os_error());
                let fd = OwnedFd::from_raw_fd(raw);
                let mut sa: libc::sockaddr_nl = std::mem::zeroed();
                sa.nl_family = libc::AF_NETLINK as _;
                sa.nl_groups = 1 << (RTNLGRP_IPV4_RULE - 1);
                let r = libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_nl).cast(),
                    size_of::<libc::sockaddr_nl>() as _,
                );
                assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
                fd
            }
        })
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        // SAFETY: plain kill(2) of the agent this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(n > 0, "{}", std::io::Error::last_os_error());
        Instant::now()
    })
}

#[test]
fn an_enrolment_cut_short_by_a_kill_leaves_nothing_behind() {
    let mut n = Node::new("fcut", &[("a", 10), ("b", 11), ("x", 12)]);
    n.start_agent();
    n.start_proxy();
    n.add("a").unwrap();
    n.add("b").unwrap();
    n.wait_ready(&["a", "b"], 15);
    let (traffic, wire) = n.traffic("a", "b");
    let (x_ns, x_name) = (n.ns("x"), n.ns_name("x"));
    let pid = n.agent.as_ref().unwrap().pid();
    let killer = kill_at_first_rule(&x_ns, pid);
    let path = n.topo.host("x").path();
    let add = spawn_cli(&[
        "pod",
        "add",
        "--state-dir",
        n.d(),
        "--netns",
        &path,
        "--uid",
        "uid-x",
        "--name",
        "x",
        "--namespace",
        "default",
        "--service-account",
        "sa",
    ]);
    let t0 = killer.join().unwrap();
    let mut add = add;
    let _ = add.wait();
    n.kill_agent();
    eprintln!("x when the agent died: {:?}", in_ns(&x_name, &x_ns));
    n.start_agent();
    let listed = n.state("x").is_some();
    let now = in_ns(&x_name, &x_ns);
    eprintln!("x after the restart: listed {listed}, {now:?}");
    if listed {
        assert!(same(&now, ENROLLED), "x listed, {now:?}");
    } else {
        assert!(
            same(&now, CLEAN),
            "x unknown to the agent, yet its redirection is half in place: {now:?}"
        );
    }
    // The add retried: x is enrolled and served; removed: nothing of it is left.
    n.add("x").unwrap();
    n.wait_ready(&["x"], 15);
    let recovered = t0.elapsed();
    n.del("x").unwrap();
    let now = in_ns(&x_name, &x_ns);
    assert!(same(&now, CLEAN), "x removed, left {now:?}");
    assert!(!tc_out(&x_name, &["qdisc", "show"]).contains("clsact"));
    let r = traffic.finish();
    let e = wire.stop(hbone).unwrap();
    report(
        "agent-killed-mid-enrolment",
        "a->b loop; the agent killed at x's first rule",
        &r,
        &e,
        recovered,
    );
    assert_nothing_escaped("cut short", &e);
    assert_eq!(r.failed(), 0, "{:?}", r.errors());
}
