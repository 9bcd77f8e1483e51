//! The kubelet's health probes (issue 11, item 5): a TCP connection opened by a socket
//! of the node's own network namespace to an enrolled pod reaches the app directly, as
//! the upstream host rule lets it (`-m owner --socket-exists` to a pod address), with no
//! SNAT address; a packet forwarded through the node that merely carries the node's
//! address as its source is redirected like any other. Both families.
//!
//! The node here is the topology's node namespace (the bridge's), added to the engine's
//! node namespaces; the pods' bridge gets node addresses of its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use redirect_tests::{
    process::wait_for,
    raw::{self, RawSender, Segment},
    *,
};

const FAMILIES: [bool; 2] = [false, true];

fn fam(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

/// Pod a (enrolled), host r (an outside peer on the same bridge), the node namespace
/// with addresses of its own on the bridge, counted as the node's by the engine.
struct Node {
    m: Mesh,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

impl Node {
    fn new(tag: &str) -> Self {
        let m = Mesh::new(tag, &[("a", 10), ("r", 100)]).expect("topology");
        // The topology's subnets are 10.<s>.0.0/16 and fd00:<s>::/64.
        let a4 = m.host("a").v4.octets();
        let a6 = m.host("a").v6.segments();
        let v4 = Ipv4Addr::new(a4[0], a4[1], 255, 250);
        let v6 = Ipv6Addr::new(a6[0], a6[1], a6[2], a6[3], 0, 0, 0, 0xfffa);
        let node = m.topo.node().to_string();
        for (addr, plen, f) in [(IpAddr::from(v4), 16, "-4"), (IpAddr::from(v6), 64, "-6")] {
            let out = std::process::Command::new("ip")
                .args(["-n", &node, f, "addr", "add", &format!("{addr}/{plen}")])
                .args(["dev", "br0", "nodad"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        m.engine
            .add_node_netns(&Netns::open(format!("/var/run/netns/{node}")).unwrap())
            .unwrap();
        m.enrol("a", PodOptions::default()).unwrap();
        Self { m, v4, v6 }
    }

    fn node_ns(&self) -> Netns {
        Netns::open(format!("/var/run/netns/{}", self.m.topo.node())).unwrap()
    }

    fn addr(&self, v6: bool) -> IpAddr {
        if v6 { self.v6.into() } else { self.v4.into() }
    }
}

#[test]
fn a_connection_from_a_node_socket_reaches_the_app_directly() {
    let n = Node::new("kp");
    let before = n.m.counters("a");
    for v6 in FAMILIES {
        let answer = ask(&n.node_ns(), n.m.addr("a", v6, APP_PORT)).unwrap();
        // The app answered, and saw the node's own address (no SNAT).
        assert!(answer.starts_with("a from "), "{}: {answer}", fam(v6));
        assert!(
            answer.contains(&n.addr(v6).to_string()),
            "{}: {answer}",
            fam(v6)
        );
        assert_eq!(n.m.events(), vec![], "{}: the proxy took it", fam(v6));
    }
    let after = n.m.counters("a");
    assert_eq!(after.bypassed_probe - before.bypassed_probe, 2);
    assert_eq!(after.redirected_15006, before.redirected_15006);
    // The notes go with the sockets that wrote them.
    wait_for("host_flows to empty once the probes closed", 10, || {
        n.m.dump_map("host_flows").unwrap().is_empty()
    });
}

#[test]
fn a_peer_connection_is_still_redirected_while_node_sockets_probe() {
    let n = Node::new("kq");
    for v6 in FAMILIES {
        let answer = ask(&n.m.ns("r"), n.m.addr("a", v6, APP_PORT)).unwrap();
        assert!(answer.starts_with("a from "), "{}: {answer}", fam(v6));
        let events = n.m.events();
        assert_eq!(events.len(), 1, "{}: {events:?}", fam(v6));
    }
}

#[test]
fn the_node_address_from_elsewhere_is_redirected() {
    let n = Node::new("kf");
    // Host r sends SYNs carrying the node's address as their source: no socket of the
    // node sent them, so no note exists and the pod's proxy takes them.
    for v6 in FAMILIES {
        let before = n.m.counters("a");
        let src = SocketAddr::new(n.addr(v6), 40_000 + v6 as u16);
        let dst = n.m.addr("a", v6, APP_PORT);
        let sender = RawSender::new(&n.m.ns("r"), v6).unwrap();
        sender
            .send(dst.ip(), &raw::packet(&Segment::syn(src, dst, 7)))
            .unwrap();
        wait_for("the forged SYN to be steered to 15006", 5, || {
            n.m.counters("a").redirected_15006 > before.redirected_15006
        });
        let after = n.m.counters("a");
        assert_eq!(
            after.bypassed_probe,
            before.bypassed_probe,
            "{}: the forged node source reached the app",
            fam(v6)
        );
    }
    // A real probe right after still reaches the app: the forged SYN left no note.
    let answer = ask(&n.node_ns(), n.m.addr("a", false, APP_PORT)).unwrap();
    assert!(answer.starts_with("a from "), "{answer}");
    assert_eq!(n.m.events(), vec![]);
}

#[test]
fn a_node_socket_reaching_a_pod_that_is_not_enrolled_is_not_noted() {
    let n = Node::new("kn");
    // Host r is not enrolled: nothing to note for it.
    let answer = ask(&n.node_ns(), n.m.addr("r", false, APP_PORT)).unwrap();
    assert!(answer.starts_with("r from "), "{answer}");
    assert!(n.m.dump_map("host_flows").unwrap().is_empty());
}
