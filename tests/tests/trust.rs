//! Whose marked sockets are the proxy's (parity row 7 on a machine where every process
//! shares the root cgroup), trust that ends with the proxy's connection, one owner of
//! the pinned state, and pinned state taken back by a new run (programs, options,
//! layout). Agents and proxies run as processes, as users run them.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use redirect_tests::{
    process::{Proc, RemoveDir, cli, pod_add, wait_for},
    *,
};

const FAMILIES: [bool; 2] = [false, true];

/// A node-agent's directories: state (socket, logs) and pins, removed at the end.
struct NodeDirs {
    dir: PathBuf,
    pin: String,
    _rm: (RemoveDir, RemoveDir),
}

impl NodeDirs {
    fn new(m: &Mesh, tag: &str) -> Self {
        let base = format!("{}-{tag}", m.base());
        let dir = PathBuf::from(format!("/tmp/{base}"));
        std::fs::create_dir_all(&dir).unwrap();
        let pin = format!("/sys/fs/bpf/{base}");
        Self {
            _rm: (RemoveDir::new(dir.clone()), RemoveDir::new(pin.clone())),
            dir,
            pin,
        }
    }

    fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn sock(&self) -> String {
        format!("{}/zds.sock", self.d())
    }

    fn agent_args(&self) -> Vec<String> {
        [
            "node-agent",
            "--socket",
            &self.sock(),
            "--state-dir",
            self.d(),
            "--pin-dir",
            &self.pin,
        ]
        .map(String::from)
        .to_vec()
    }

    /// A node-agent in the cgroup at `cgroup`; returns once its socket exists.
    fn agent_in(&self, cgroup: &Path, log: &str) -> Proc {
        let args = self.agent_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Proc::spawn_in(cgroup, &args, &self.dir.join(log));
        let sock = self.sock();
        wait_for("agent socket", 15, || Path::new(&sock).exists());
        p
    }

    /// A bare-relay proxy in the cgroup at `cgroup`.
    fn proxy_in(&self, cgroup: &Path, log: &str) -> Proc {
        let sock = self.sock();
        Proc::spawn_in(
            cgroup,
            &[
                "proxy",
                "--socket",
                &sock,
                "--bare-relay",
                "--drain-secs",
                "0",
            ],
            &self.dir.join(log),
        )
    }

    fn status(&self) -> serde_json::Value {
        let out = cli(&["status", "--json", "--state-dir", self.d()]).unwrap();
        serde_json::from_str(&out).unwrap()
    }

    fn pod(&self, uid: &str) -> Option<serde_json::Value> {
        self.status()["pods"]
            .as_array()?
            .iter()
            .find(|p| p["spec"]["uid"] == uid)
            .cloned()
    }

    fn ready(&self, uid: &str) -> bool {
        self.pod(uid)
            .is_some_and(|p| p["state"]["state"] == "ready")
    }

    /// The cgroup ids in the pinned `proxy_cgroups` map.
    fn trusted(&self) -> Vec<u64> {
        let path = format!("{}/maps/proxy_cgroups", self.pin);
        let Ok(v) = bpftool_json(&["map", "dump", "pinned", &path]) else {
            return Vec::new();
        };
        v.as_array()
            .map(|a| a.iter().filter_map(|e| key_u64(&e["key"])).collect())
            .unwrap_or_default()
    }
}

/// A u64 map key as bpftool prints it: a number (with BTF) or bytes in hex.
fn key_u64(k: &serde_json::Value) -> Option<u64> {
    if let Some(n) = k.as_u64() {
        return Some(n);
    }
    let bytes: Vec<u8> = k
        .as_array()?
        .iter()
        .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect();
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// The cgroup directory this test process sits in (the engine moved it there).
fn own_cgroup_dir() -> PathBuf {
    redirect_user::ebpf::cgroup2_mount()
        .unwrap()
        .join(cgroup_of(std::process::id() as i32).trim_start_matches('/'))
}

fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(String::from))
        .unwrap_or_default()
}

#[test]
fn a_forged_mark_from_the_root_cgroup_is_redirected() {
    // The proxy runs in this process, and nothing on this machine sorts processes into
    // cgroups: an app of the pod sits in the root cgroup, where this process started.
    let m = Mesh::new("tr-root", &[("a", 10), ("c", 100)]).unwrap();
    m.enrol("a", PodOptions::default()).unwrap();
    let app = AppCgroup::root().unwrap();
    let ns_path = m.host("a").path();
    for v6 in FAMILIES {
        let to = m.addr("c", v6, PEER_PORT).to_string();
        let answer = app
            .probe(&["--netns", &ns_path, "--mark", "0x539", &to])
            .unwrap();
        assert!(answer.starts_with("c from "), "{answer}");
        // The app's connection reached the proxy's 15001, not c directly.
        let ev = m.events();
        assert_eq!(ev.len(), 1, "v6={v6}: {ev:?}");
        assert_eq!((ev[0].listener, ev[0].local.to_string()), (15001, to));
    }
    assert_eq!(m.counters("a").redirected_15001, 2);
}

#[test]
fn a_proxy_in_the_root_cgroup_is_moved_and_a_forged_mark_there_is_redirected() {
    let m = Mesh::new("tr-agent", &[("a", 10), ("c", 100)]).unwrap();
    let n = NodeDirs::new(&m, "node");
    let root = AppCgroup::root().unwrap();
    // Agent, proxy and the app all start in the root cgroup.
    let _agent = n.agent_in(&root.path, "agent.log");
    let proxy = n.proxy_in(&root.path, "proxy.log");
    pod_add(n.d(), &m.host("a").path(), "a").unwrap();
    wait_for("pod ready", 15, || n.ready("uid-a"));
    let ns_path = m.host("a").path();
    for v6 in FAMILIES {
        let to = m.addr("c", v6, PEER_PORT).to_string();
        // The proxy relays it: the answer comes, through 15001.
        let answer = root
            .probe(&["--netns", &ns_path, "--mark", "0x539", &to])
            .unwrap();
        assert!(answer.starts_with("c from "), "{answer}");
    }
    let c = &n.pod("uid-a").unwrap()["counters"];
    assert_eq!(c["redirected_15001"], 2, "{c}");
    // The proxy's own upstream connections passed.
    assert_eq!(c["bypassed_proxy"], 2, "{c}");
    let moved = cgroup_of(proxy.pid());
    assert!(
        moved.starts_with("/redirect-proxy-"),
        "the agent gave the proxy a cgroup of its own: {moved:?}"
    );
    assert!(!n.trusted().contains(&root.id()), "{:?}", n.trusted());
    cli(&["pod", "del", "--state-dir", n.d(), "--uid", "uid-a"]).unwrap();
}

#[test]
fn a_proxy_that_disconnects_is_untrusted() {
    let m = Mesh::new("tr-disc", &[("a", 10), ("c", 100)]).unwrap();
    let n = NodeDirs::new(&m, "node");
    let here = own_cgroup_dir();
    let _agent = n.agent_in(&here, "agent.log");
    let cg = AppCgroup::new("tr-disc-proxy").unwrap();
    let proxy = n.proxy_in(&cg.path, "proxy.log");
    pod_add(n.d(), &m.host("a").path(), "a").unwrap();
    wait_for("pod ready", 15, || n.ready("uid-a"));
    assert!(n.trusted().contains(&cg.id()), "{:?}", n.trusted());
    drop(proxy);
    wait_for("the proxy's cgroup untrusted", 5, || {
        !n.trusted().contains(&cg.id())
    });
    // Another process of that cgroup marking its socket is an app like any other: the
    // pod's connection is steered to its (gone) proxy and fails closed.
    let to = m.addr("c", false, PEER_PORT).to_string();
    let r = cg.probe(&[
        "--netns",
        &m.host("a").path(),
        "--mark",
        "0x539",
        "--timeout",
        "1",
        &to,
    ]);
    assert!(r.is_err(), "reached c directly: {r:?}");
    cli(&["pod", "del", "--state-dir", n.d(), "--uid", "uid-a"]).unwrap();
}

#[test]
fn sixty_six_proxies_over_time_are_each_trusted() {
    let m = Mesh::new("tr-66", &[("c", 100)]).unwrap();
    let n = NodeDirs::new(&m, "node");
    let here = own_cgroup_dir();
    let _agent = n.agent_in(&here, "agent.log");
    let started = Instant::now();
    for i in 0..66 {
        // Each proxy in a cgroup of its own (a new proxy pod each time).
        let cg = AppCgroup::new(&format!("tr66-{i}")).unwrap();
        let proxy = n.proxy_in(&cg.path, &format!("proxy{i}.log"));
        wait_for(&format!("proxy {} trusted", i + 1), 10, || {
            n.trusted().contains(&cg.id())
        });
        let pid = proxy.pid() as i64;
        drop(proxy);
        wait_for(&format!("proxy {} gone", i + 1), 10, || {
            !n.status()["proxies"]
                .as_array()
                .is_some_and(|a| a.iter().any(|p| p.as_i64() == Some(pid)))
        });
    }
    eprintln!("66 proxies in {:?}", started.elapsed());
}

#[test]
fn a_second_agent_on_one_pin_directory_waits_then_refuses_naming_the_first() {
    let m = Mesh::new("tr-own", &[("a", 10), ("c", 100)]).unwrap();
    let n = NodeDirs::new(&m, "node");
    let here = own_cgroup_dir();
    let mut first = n.agent_in(&here, "agent1.log");
    pod_add(n.d(), &m.host("a").path(), "a").unwrap();
    // A second agent on the same pins (its own socket and state).
    let dir2 = n.dir.join("second");
    std::fs::create_dir_all(&dir2).unwrap();
    let sock2 = dir2.join("zds.sock");
    let args = [
        "node-agent",
        "--socket",
        sock2.to_str().unwrap(),
        "--state-dir",
        dir2.to_str().unwrap(),
        "--pin-dir",
        &n.pin,
    ];
    let mut second = Proc::spawn_in(&here, &args, &n.dir.join("agent2.log"));
    let t = Instant::now();
    let status = loop {
        if let Some(s) = second.0.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > Duration::from_secs(20) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(n.dir.join("agent2.log")).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second agent runs beside the first: {log}"
    );
    assert!(t.elapsed() >= Duration::from_secs(5), "it waited first");
    assert!(log.contains("owned by another engine"), "{log}");
    assert!(
        log.contains(&format!("process {}", first.pid())),
        "names the holder: {log}"
    );
    // The first agent and its pod are untouched.
    assert!(n.pod("uid-a").is_some());
    assert!(!sock2.exists());

    // A rolling update: the new agent waits while the old one exits, then takes over.
    let mut third = Proc::spawn_in(&here, &args, &n.dir.join("agent3.log"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(third.0.try_wait().unwrap().is_none());
    first.signal(libc::SIGTERM);
    wait_for("the new agent serving", 10, || sock2.exists());
    third.signal(libc::SIGTERM);
}

#[test]
fn re_enrolling_a_pod_with_dns_capture_flipped_takes_effect() {
    let m = Mesh::new("tr-dns", &[("a", 10), ("c", 100)]).unwrap();
    let (a, c) = (m.ns("a"), m.ns("c"));
    for v6 in FAMILIES {
        udp_echo(&c, "dns-c", m.addr("c", v6, 53)).unwrap();
    }
    m.enrol("a", PodOptions::default()).unwrap();
    let (answer, _) = udp_ask(&a, m.addr("c", false, 53), "query").unwrap();
    assert_eq!(answer, "dns-c:query");
    assert_eq!(m.events(), vec![], "no DNS capture yet");
    // The same pod again (its proxy restarted), now with DNS capture.
    m.stop_proxy("a");
    let dns = PodOptions {
        dns_capture: true,
        ..Default::default()
    };
    assert_eq!(m.enrol("a", dns).unwrap(), EnrolOutcome::AlreadyEnrolled);
    for v6 in FAMILIES {
        let to = m.addr("c", v6, 53);
        let (answer, _) = udp_ask(&a, to, "query").unwrap();
        assert_eq!(answer, "dns-c:query");
        let ev: Vec<_> = m
            .events()
            .into_iter()
            .map(|e| (e.listener, e.udp, e.local))
            .collect();
        assert_eq!(ev, vec![(15053, true, to)], "v6={v6}");
    }
    assert!(m.engine.pods()[0].dns_capture);
}

/// `id` of a pinned program, and the program id a pinned link runs.
fn prog_id(path: &str) -> u64 {
    bpftool_json(&["prog", "show", "pinned", path]).unwrap()["id"]
        .as_u64()
        .unwrap()
}

fn link_prog_id(path: &str) -> u64 {
    bpftool_json(&["link", "show", "pinned", path]).unwrap()["prog_id"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_restarted_agent_runs_its_own_programs_and_the_saved_options() {
    let m = Mesh::new("tr-adopt", &[("a", 10), ("c", 100)]).unwrap();
    let n = NodeDirs::new(&m, "node");
    let here = own_cgroup_dir();
    let mut first = n.agent_in(&here, "agent1.log");
    pod_add(n.d(), &m.host("a").path(), "a").unwrap();
    let link = format!("{}/links/uid-a", n.pin);
    let old = link_prog_id(&link);
    assert_eq!(old, prog_id(&format!("{}/progs/redirect_lookup", n.pin)));
    first.signal(libc::SIGKILL);
    // The pod's spec changed while the agent was away (as a re-add saves it).
    let state = n.dir.join("pods.json");
    let mut specs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    specs[0]["dns_capture"] = true.into();
    std::fs::write(&state, serde_json::to_vec(&specs).unwrap()).unwrap();
    std::fs::remove_file(n.sock()).unwrap();

    let _second = n.agent_in(&here, "agent2.log");
    let new = prog_id(&format!("{}/progs/redirect_lookup", n.pin));
    assert_ne!(new, old, "a new run loads its programs");
    assert_eq!(
        link_prog_id(&link),
        new,
        "the pod's sk_lookup link runs them"
    );
    let egress = prog_id(&format!("{}/progs/redirect_egress", n.pin));
    let tc = tc_out(
        &m.host("a").name,
        &["filter", "show", "dev", "eth0", "egress"],
    );
    assert!(tc.contains(&format!(" id {egress} ")), "{tc}");
    let pods = bpftool_json(&["map", "dump", "pinned", &format!("{}/maps/pods", n.pin)]).unwrap();
    // The low byte holds the options (bit 0: DNS capture), bits 16-31 the epoch.
    let flags = pods[0]["formatted"]["value"]["flags"].as_u64().unwrap();
    assert_eq!(flags & 0xff, 1, "dns capture on: {pods}");
    assert_ne!(flags >> 16, 0, "an epoch: {pods}");
    let c = cli(&["pod", "list", "--state-dir", n.d()]).unwrap();
    assert!(c.contains("uid-a"), "{c}");
    cli(&["pod", "del", "--state-dir", n.d(), "--uid", "uid-a"]).unwrap();
}

#[test]
fn an_incompatible_pinned_map_is_refused() {
    let m = Mesh::new("tr-layout", &[("c", 100)]).unwrap();
    let n = NodeDirs::new(&m, "node");
    // A `flows` map of the right sizes but the wrong kind (a plain hash fills up; the
    // engine's is an LRU), as an older or foreign build could have left it.
    std::fs::create_dir_all(format!("{}/maps", n.pin)).unwrap();
    let flows = format!("{}/maps/flows", n.pin);
    let key = size_of::<redirect_ebpf::FlowKey>().to_string();
    let value = size_of::<redirect_ebpf::FlowVal>().to_string();
    let out = std::process::Command::new("bpftool")
        .args([
            "map", "create", &flows, "type", "hash", "key", &key, "value", &value, "entries",
            "65536", "name", "flows",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let args = n.agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Proc::spawn(&args, &n.dir.join("agent.log"));
    let t = Instant::now();
    let status = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(n.dir.join("agent.log")).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "started: {log}");
    assert!(log.contains("maps/flows does not fit this build"), "{log}");
    // Nothing was re-pinned over the state it refused.
    assert!(!Path::new(&format!("{}/progs/redirect_lookup", n.pin)).exists());
}
