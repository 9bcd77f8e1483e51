//! Enrolment and un-enrolment as the rest of the system uses them: many pods, twice the
//! same pod, a new namespace for a known pod, bad input, a full map, and the engine
//! going away while pods stay enrolled.

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd, OwnedFd},
    time::Instant,
};

use redirect_tests::*;
use redirect_user::{
    ebpf::{EnrolError, PodSockets},
    netlink::Netlink,
};

/// The maps that hold a pod's state. Not `flows` / `proxy_flows`: notes are hints that
/// age out of their LRU, inert once their pod's addresses are gone (sk_lookup checks each
/// against them), and un-enrolment does not walk them.
const POD_MAPS: [&str; 4] = ["pods", "pod_addrs", "listeners", "pod_index"];

fn enrolled_entries(m: &Mesh) -> Vec<(&'static str, usize)> {
    POD_MAPS
        .into_iter()
        .map(|name| (name, m.dump_map(name).unwrap().len()))
        .collect()
}

fn nothing_enrolled() -> Vec<(&'static str, usize)> {
    POD_MAPS.into_iter().map(|n| (n, 0)).collect()
}

#[test]
fn fifty_pods_in_and_out_leave_nothing_behind() {
    const PODS: u8 = 50;
    let names: Vec<String> = (0..PODS).map(|i| format!("p{i}")).collect();
    let hosts: Vec<(&str, u16)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), 10 + i as u16))
        .chain([("c", 200)])
        .collect();
    let m = Mesh::new("fifty", &hosts).unwrap();
    let rules_before: Vec<String> = names
        .iter()
        .map(|n| ip_out(&m.host(n).name, &["rule"]))
        .collect();

    let mut times = Vec::new();
    for n in &names {
        let ns = m.ns(n);
        let listeners = PodListeners::open(&ns, false).unwrap();
        let t = Instant::now();
        m.engine
            .enrol(n, &ns, &PodOptions::default(), &listeners.sockets())
            .unwrap();
        times.push(t.elapsed());
        drop(listeners);
    }
    times.sort();
    eprintln!(
        "enrolment of {PODS} pods: median {:?}, max {:?}",
        times[times.len() / 2],
        times[times.len() - 1]
    );

    assert_eq!(m.engine.pods().len(), PODS as usize);
    let dump = m.dump_map("pods").unwrap();
    assert_eq!(dump.len(), PODS as usize);
    // bpftool shows the fields by name (the maps carry BTF).
    assert!(
        dump[0]["formatted"]["value"]["id"].is_number(),
        "{}",
        dump[0]
    );
    // Every pod is redirected: with its listeners closed, it fails closed.
    assert!(ask(&m.ns("p7"), m.addr("c", false, PEER_PORT)).is_err());
    let links = std::fs::read_dir(m.pin_dir.join("links")).unwrap().count();
    assert_eq!(links, PODS as usize);

    for n in &names {
        assert!(m.engine.unenrol(n).unwrap());
    }
    assert_eq!(m.engine.pods(), vec![]);
    assert_eq!(enrolled_entries(&m), nothing_enrolled());
    assert_eq!(
        std::fs::read_dir(m.pin_dir.join("links")).unwrap().count(),
        0
    );
    for (n, before) in names.iter().zip(&rules_before) {
        let ns = &m.host(n).name;
        assert_eq!(&ip_out(ns, &["rule"]), before, "{n}");
        assert!(!ip_out(ns, &["-6", "rule"]).contains("0x111"), "{n}");
        assert_eq!(ip_out(ns, &["route", "show", "table", "100"]), "", "{n}");
        assert!(!tc_out(ns, &["qdisc", "show"]).contains("clsact"), "{n}");
    }
    // No program of ours is attached to any of these namespaces any more.
    let inos: Vec<u64> = names.iter().map(|n| m.ns(n).ino()).collect();
    let links = bpftool_json(&["link", "show"]).unwrap();
    let left = links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["netns_ino"].as_u64().is_some_and(|i| inos.contains(&i)))
        .count();
    assert_eq!(left, 0);
    assert!(
        ask(&m.ns("p7"), m.addr("c", false, PEER_PORT))
            .unwrap()
            .starts_with("c from ")
    );
}

#[test]
fn enrolling_twice_changes_nothing() {
    let m = Mesh::new("twice", &[("a", 10), ("c", 100)]).unwrap();
    assert_eq!(
        m.enrol("a", PodOptions::default()).unwrap(),
        EnrolOutcome::Enrolled
    );
    let before = (
        m.engine.pods(),
        enrolled_entries(&m),
        ip_out(&m.host("a").name, &["rule"]),
    );
    let ns = m.ns("a");
    let again = m
        .engine
        .enrol("a", &ns, &PodOptions::default(), &PodSockets::default())
        .unwrap();
    assert_eq!(again, EnrolOutcome::AlreadyEnrolled);
    // Opened again by another path, the same namespace is still the same pod.
    let by_path = Netns::open(m.host("a").path()).unwrap();
    let again = m
        .engine
        .enrol(
            "a",
            &by_path,
            &PodOptions::default(),
            &PodSockets::default(),
        )
        .unwrap();
    assert_eq!(again, EnrolOutcome::AlreadyEnrolled);
    assert_eq!(
        (
            m.engine.pods(),
            enrolled_entries(&m),
            ip_out(&m.host("a").name, &["rule"])
        ),
        before
    );
    assert!(
        ask(&m.ns("a"), m.addr("c", false, PEER_PORT))
            .unwrap()
            .starts_with("c from ")
    );
}

#[test]
fn a_new_namespace_for_a_known_pod_replaces_the_old_one() {
    let m = Mesh::new("replace", &[("a", 10), ("a2", 11), ("c", 100)]).unwrap();
    m.enrol("a", PodOptions::default()).unwrap();
    let old_ns = m.host("a").name.clone();
    let ns2 = m.ns("a2");
    let listeners = PodListeners::open(&ns2, false).unwrap();
    let out = m
        .engine
        .enrol("a", &ns2, &PodOptions::default(), &listeners.sockets())
        .unwrap();
    assert_eq!(out, EnrolOutcome::Replaced);
    let pods = m.engine.pods();
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].netns_ino, ns2.ino());
    // Nothing of the old enrolment is left in the old namespace.
    assert!(!ip_out(&old_ns, &["rule"]).contains("0x111"));
    assert!(!tc_out(&old_ns, &["qdisc", "show"]).contains("clsact"));
    assert_eq!(m.dump_map("pods").unwrap().len(), 1);
    assert_eq!(
        m.dump_map("pod_addrs").unwrap().len(),
        3,
        "a2's v4, v6 and link-local addresses"
    );
}

#[test]
fn bad_namespaces_are_refused_with_typed_errors() {
    // A namespace that is gone (or never was).
    let err = Netns::open("/var/run/netns/redirect-no-such-namespace").unwrap_err();
    assert!(
        matches!(err, redirect_user::netns::NetnsError::Open { .. }),
        "{err}"
    );
    // An fd that is a namespace, but not a network one.
    let uts: OwnedFd = std::fs::File::open("/proc/self/ns/uts").unwrap().into();
    let err = Netns::from_fd(uts).unwrap_err();
    assert!(
        matches!(err, redirect_user::netns::NetnsError::NotNetwork { .. }),
        "{err}"
    );
    // An fd that is no namespace at all.
    let file: OwnedFd = std::fs::File::open("/proc/self/status").unwrap().into();
    let err = Netns::from_fd(file).unwrap_err();
    assert!(
        matches!(err, redirect_user::netns::NetnsError::NotANamespace { .. }),
        "{err}"
    );
}

#[test]
fn failed_enrolments_leave_nothing_half_applied() {
    let m = Mesh::new("atomic", &[("a", 10), ("b", 11), ("c", 100)]).unwrap();
    let (na, nb) = (m.ns("a"), m.ns("b"));
    let rules = ip_out(&m.host("a").name, &["rule"]);
    let check_clean = |what: &str| {
        assert_eq!(m.engine.pods(), vec![], "{what}");
        assert_eq!(enrolled_entries(&m), nothing_enrolled(), "{what}");
        assert_eq!(ip_out(&m.host("a").name, &["rule"]), rules, "{what}");
        assert!(
            !tc_out(&m.host("a").name, &["qdisc", "show"]).contains("clsact"),
            "{what}"
        );
        assert_eq!(
            std::fs::read_dir(m.pin_dir.join("links")).unwrap().count(),
            0,
            "{what}"
        );
    };

    // A socket of another namespace.
    let other = PodListeners::open(&nb, false).unwrap();
    let err = m
        .engine
        .enrol("a", &na, &PodOptions::default(), &other.sockets())
        .unwrap_err();
    assert!(
        matches!(err, EnrolError::BadSocket { port: 15001, .. }),
        "{err}"
    );
    check_clean("socket of another namespace");

    // A socket that is not listening.
    let l = na.run(|| TcpListener::bind("0.0.0.0:0")).unwrap().unwrap();
    let closed = na
        .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    let sockets = PodSockets {
        outbound: Some(closed.as_fd()),
        inbound: Some(l.as_fd()),
        ..Default::default()
    };
    let err = m
        .engine
        .enrol("a", &na, &PodOptions::default(), &sockets)
        .unwrap_err();
    assert!(
        matches!(err, EnrolError::BadSocket { port: 15001, .. }),
        "{err}"
    );
    check_clean("udp socket for a tcp port");

    // An fd that is not a socket.
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let sockets = PodSockets {
        outbound: Some(file.as_fd()),
        ..Default::default()
    };
    let err = m
        .engine
        .enrol("a", &na, &PodOptions::default(), &sockets)
        .unwrap_err();
    assert!(matches!(err, EnrolError::BadSocket { .. }), "{err}");
    check_clean("not a socket");

    // An interface the pod does not have: fails inside the namespace, after the maps.
    let options = PodOptions {
        interfaces: Some(vec!["nope0".into()]),
        ..Default::default()
    };
    let err = m
        .engine
        .enrol("a", &na, &options, &PodSockets::default())
        .unwrap_err();
    assert!(matches!(err, EnrolError::Step { .. }), "{err}");
    check_clean("unknown interface");

    // A uid that cannot name a pin.
    let err = m
        .engine
        .enrol("../x", &na, &PodOptions::default(), &PodSockets::default())
        .unwrap_err();
    assert!(matches!(err, EnrolError::InvalidUid { .. }), "{err}");
    check_clean("bad uid");

    // And then the pod enrols fine.
    m.enrol("a", PodOptions::default()).unwrap();
    assert!(
        ask(&na, m.addr("c", false, PEER_PORT))
            .unwrap()
            .starts_with("c from ")
    );
}

#[test]
fn a_full_map_is_a_typed_error_and_other_pods_keep_working() {
    let m = Mesh::with_config(
        "full",
        &[("a", 10), ("b", 11), ("d", 12), ("c", 100)],
        |c| c.max_pods = 2,
    )
    .unwrap();
    m.enrol("a", PodOptions::default()).unwrap();
    m.enrol("b", PodOptions::default()).unwrap();
    let before = enrolled_entries(&m);
    let err = m.enrol("d", PodOptions::default()).unwrap_err();
    let err = err.downcast::<EnrolError>().unwrap();
    assert!(matches!(err, EnrolError::Full { max: 2, .. }), "{err}");
    assert_eq!(enrolled_entries(&m), before);
    assert!(!ip_out(&m.host("d").name, &["rule"]).contains("0x111"));
    // Pod d is not enrolled (traffic direct), pods a and b still are.
    assert!(
        ask(&m.ns("d"), m.addr("c", false, PEER_PORT))
            .unwrap()
            .starts_with("c from ")
    );
    assert!(
        ask(&m.ns("a"), m.addr("c", false, PEER_PORT))
            .unwrap()
            .starts_with("c from ")
    );
    assert_eq!(m.events().len(), 1);
    // Room again after an un-enrolment.
    m.unenrol("b").unwrap();
    m.enrol("d", PodOptions::default()).unwrap();
}

#[test]
fn pods_stay_redirected_when_the_engine_goes_away() {
    let m = Mesh::new("restart", &[("a", 10), ("b", 11), ("c", 100)]).unwrap();
    m.enrol("b", PodOptions::default()).unwrap();
    let to = m.addr("b", false, APP_PORT);
    assert!(ask(&m.ns("c"), to).unwrap().starts_with("b from "));
    assert_eq!(m.events().len(), 1);

    // A second engine on the same pinned state (as after a restart of the agent) finds
    // the pod; with the proxy gone, the pod's traffic is refused, never passed.
    // The first engine gives the pin directory up (one owner at a time), as an exiting
    // agent does.
    m.engine.close();
    let engine2 = Engine::open(EngineConfig::at(&m.pin_dir)).unwrap();
    let pods = engine2.pods();
    assert_eq!(pods.len(), 1);
    assert_eq!((pods[0].uid.as_str(), pods[0].netns_held), ("b", false));
    m.stop_proxy("b");
    assert!(ask(&m.ns("c"), to).is_err());
    // Given the namespace and new sockets again, the new engine takes the pod back.
    let ns = m.ns("b");
    let listeners = PodListeners::open(&ns, false).unwrap();
    let out = engine2
        .enrol("b", &ns, &PodOptions::default(), &listeners.sockets())
        .unwrap();
    assert_eq!(out, EnrolOutcome::AlreadyEnrolled);
    assert!(engine2.pods()[0].netns_held);
    listeners.inbound.set_nonblocking(false).unwrap();
    // The connection lands on the new listener (nobody relays it: it just connects).
    let s = m
        .ns("c")
        .run(|| std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2)))
        .unwrap();
    assert!(s.is_ok(), "{s:?}");
    let (conn, _) = listeners.inbound.accept().unwrap();
    let local = redirect_user::proxy::unmap(conn.local_addr().unwrap());
    assert_eq!(local, SocketAddr::new(m.host("b").addr(false), APP_PORT));
    assert!(engine2.unenrol("b").unwrap());
    assert!(!ip_out(&m.host("b").name, &["rule"]).contains("0x111"));
}

/// `ip -n NS ARGS…`, which must succeed.
fn ip_ok(ns: &str, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn accept_local(m: &Mesh, pod: &str) -> String {
    m.ns(pod)
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/conf/eth0/accept_local"))
        .unwrap()
        .unwrap()
        .trim()
        .to_string()
}

/// Runs `f` on a thread of its own without CAP_NET_ADMIN in its effective set
/// (threads it starts inherit that): every rtnetlink change made there is refused, as
/// for an agent granted too little. The rest of the process sees no change.
fn without_net_admin<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            caps::drop(
                None,
                caps::CapSet::Effective,
                caps::Capability::CAP_NET_ADMIN,
            )
            .expect("dropping CAP_NET_ADMIN from this thread");
            f()
        })
        .join()
        .unwrap()
    })
}

/// Nothing of the engine left in pod `pod`'s namespace: rule, routes, qdiscs, filters,
/// `accept_local`, sk_lookup link.
fn nothing_left_in(m: &Mesh, pod: &str, rules: &str, accept_local_before: &str) {
    let ns = &m.host(pod).name;
    assert_eq!(&ip_out(ns, &["rule"]), rules);
    assert!(!ip_out(ns, &["-6", "rule"]).contains("0x111"));
    assert_eq!(ip_out(ns, &["route", "show", "table", "100"]), "");
    assert_eq!(ip_out(ns, &["-6", "route", "show", "table", "100"]), "");
    assert!(!tc_out(ns, &["qdisc", "show"]).contains("clsact"));
    assert_eq!(accept_local(m, pod), accept_local_before);
    let ino = m.ns(pod).ino();
    let links = bpftool_json(&["link", "show"]).unwrap();
    let ours = links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["netns_ino"].as_u64() == Some(ino))
        .count();
    assert_eq!(ours, 0);
}

#[test]
fn a_teardown_that_fails_half_way_is_completed_on_retry() {
    let m = Mesh::new("halfway", &[("a", 10), ("c", 100)]).unwrap();
    let rules = ip_out(&m.host("a").name, &["rule"]);
    let before = accept_local(&m, "a");
    m.enrol("a", PodOptions::default()).unwrap();
    assert_eq!(accept_local(&m, "a"), "1");

    // Nothing in the pod's namespace can be undone: the un-enrolment fails half-way.
    let err = without_net_admin(|| m.engine.unenrol("a")).unwrap_err();
    assert!(
        matches!(
            err,
            EnrolError::Step {
                step: "delete tc filter",
                ..
            }
        ),
        "{err}"
    );
    // Not forgotten: the pod is releasing and its record stays pinned.
    let pods = m.engine.pods();
    assert_eq!(pods.len(), 1);
    assert!(pods[0].releasing, "{pods:?}");
    assert_eq!(m.dump_map("pod_index").unwrap().len(), 1);
    assert_eq!(accept_local(&m, "a"), "1");

    // Tried again, it completes: nothing left anywhere.
    assert!(m.engine.unenrol("a").unwrap());
    assert_eq!(m.engine.pods(), vec![]);
    assert_eq!(enrolled_entries(&m), nothing_enrolled());
    assert_eq!(
        std::fs::read_dir(m.pin_dir.join("links")).unwrap().count(),
        0
    );
    nothing_left_in(&m, "a", &rules, &before);
    assert!(
        ask(&m.ns("a"), m.addr("c", false, PEER_PORT))
            .unwrap()
            .starts_with("c from ")
    );
    // And the pod enrols again as new.
    assert_eq!(
        m.enrol("a", PodOptions::default()).unwrap(),
        EnrolOutcome::Enrolled
    );
}

/// What an agent killed between deleting a pod's qdiscs and writing down that it did
/// meets when it tries again: the clsact it owned is gone. The kernel answers EINVAL
/// ("Invalid handle"), not ENOENT, for a clsact deleted from an interface that had one;
/// un-enrolment takes both for "already done", and only them.
#[test]
fn deleting_a_clsact_already_gone_is_done_not_an_error() {
    let m = Mesh::new("qdgone", &[("a", 10), ("c", 100)]).unwrap();
    let ns = m.host("a").name.clone();
    let tc = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "tc"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    let (eth0, lo) = m
        .ns("a")
        .run(|| {
            let links = Netlink::open().unwrap().links().unwrap();
            let idx = |n: &str| links.iter().find(|l| l.name == n).unwrap().index;
            (idx("eth0"), idx("lo"))
        })
        .unwrap();
    tc(&["qdisc", "add", "dev", "eth0", "clsact"]);
    tc(&["qdisc", "add", "dev", "lo", "clsact"]);
    tc(&["qdisc", "del", "dev", "lo", "clsact"]);
    let results = m
        .ns("a")
        .run(|| {
            let mut nl = Netlink::open().unwrap();
            [
                nl.del_clsact(eth0).map_err(|e| e.to_string()),
                // Gone from an interface that had one: the EINVAL case.
                nl.del_clsact(eth0).map_err(|e| e.to_string()),
                nl.del_clsact(lo).map_err(|e| e.to_string()),
                // No such interface.
                nl.del_clsact(9999).map_err(|e| e.to_string()),
            ]
        })
        .unwrap();
    assert_eq!(results, [Ok(true), Ok(false), Ok(false), Ok(false)]);
    assert!(!tc_out(&ns, &["qdisc", "show"]).contains("clsact"));

    // An ingress qdisc (someone else's, in the same slot) is not taken for ours: it
    // stays, and our clsact counts as gone.
    tc(&["qdisc", "add", "dev", "eth0", "ingress"]);
    let r = m
        .ns("a")
        .run(|| {
            Netlink::open()
                .unwrap()
                .del_clsact(eth0)
                .map_err(|e| e.to_string())
        })
        .unwrap();
    assert_eq!(r, Ok(false));
    assert!(tc_out(&ns, &["qdisc", "show"]).contains("qdisc ingress"));
}

#[test]
fn a_rule_that_existed_before_enrolment_survives_unenrolment() {
    let m = Mesh::new("prior", &[("a", 10), ("c", 100)]).unwrap();
    let ns = m.host("a").name.clone();
    // The return routing as the upstream agent leaves it in a pod during a migration.
    for fam in ["-4", "-6"] {
        ip_ok(
            &ns,
            &[
                fam,
                "rule",
                "add",
                "fwmark",
                "0x111/0xfff",
                "pref",
                "32764",
                "lookup",
                "100",
            ],
        );
    }
    ip_ok(
        &ns,
        &[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ],
    );
    ip_ok(
        &ns,
        &[
            "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100",
        ],
    );
    let shown = || {
        [
            ip_out(&ns, &["rule"]),
            ip_out(&ns, &["-6", "rule"]),
            ip_out(&ns, &["route", "show", "table", "100"]),
            ip_out(&ns, &["-6", "route", "show", "table", "100"]),
        ]
    };
    let before = shown();
    assert!(before[0].contains("0x111"), "{}", before[0]);

    m.enrol("a", PodOptions::default()).unwrap();
    // Adopted and used: a's outbound connection goes through its proxy.
    assert!(
        ask(&m.ns("a"), m.addr("c", false, PEER_PORT))
            .unwrap()
            .starts_with("c from ")
    );
    assert_eq!(m.events().len(), 1);
    assert_eq!(shown(), before);

    assert!(m.unenrol("a").unwrap());
    // The engine removed what it made, not the rule and routes it found.
    assert_eq!(shown(), before);
    assert!(!tc_out(&ns, &["qdisc", "show"]).contains("clsact"));
    assert_eq!(accept_local(&m, "a"), "0");
    assert_eq!(enrolled_entries(&m), nothing_enrolled());
    assert!(
        ask(&m.ns("a"), m.addr("c", false, PEER_PORT))
            .unwrap()
            .starts_with("c from ")
    );
    assert_eq!(m.events().len(), 0, "direct after un-enrolment");
}

#[test]
fn a_failed_enrolment_gives_a_taken_over_address_back() {
    let m = Mesh::new("giveback", &[("a", 10), ("b", 11), ("c", 100)]).unwrap();
    m.enrol("a", PodOptions::default()).unwrap();
    let owners = || {
        let mut v: Vec<String> = m
            .dump_map("pod_addrs")
            .unwrap()
            .iter()
            .map(|e| e["formatted"].to_string())
            .collect();
        v.sort();
        v
    };
    let before = owners();
    // Pod b carries a's address too (on lo, not answered for on its eth0: an address
    // on its way between pods) ...
    let b = m.host("b").name.clone();
    let a4 = m.host("a").addr(false);
    m.ns("b")
        .run(|| {
            for conf in ["all", "eth0"] {
                let path = format!("/proc/sys/net/ipv4/conf/{conf}/arp_ignore");
                std::fs::write(path, "1").unwrap();
            }
        })
        .unwrap();
    ip_ok(&b, &["addr", "add", &format!("{a4}/32"), "dev", "lo"]);
    // ... and its enrolment fails after its addresses were written (a socket of
    // another namespace).
    let wrong = PodListeners::open(&m.ns("a"), false).unwrap();
    let err = m
        .engine
        .enrol("b", &m.ns("b"), &PodOptions::default(), &wrong.sockets())
        .unwrap_err();
    assert!(matches!(err, EnrolError::BadSocket { .. }), "{err}");
    // a's address is a's again, and its inbound traffic still reaches its proxy.
    assert_eq!(owners(), before);
    let to = m.addr("a", false, APP_PORT);
    assert!(ask(&m.ns("c"), to).unwrap().starts_with("a from "));
    let events = m.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((events[0].pod.as_str(), events[0].listener), ("a", 15006));
}
