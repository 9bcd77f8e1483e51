//! The two-node topology: pods on different nodes reach each other over the wire (IPv4
//! and IPv6, TCP and UDP), a capture on the wire sees what crosses it and nothing of
//! what stays on a node, and every namespace goes away on drop, on panic too.

use std::{net::SocketAddr, process::Command};

use redirect_tests::{
    capture::{Capture, Proto},
    *,
};

fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(String::from)
        .collect()
}

#[test]
fn pods_on_two_nodes_talk_over_the_wire_and_the_capture_sees_it() {
    let mut topo = Topology::two_nodes("tp2").unwrap();
    let prefix = topo.prefix().to_string();
    topo.add_host_on(1, "a", 10).unwrap();
    topo.add_host("c", 11).unwrap();
    topo.add_host_on(2, "b", 20).unwrap();
    assert!(topo.add_host_on(3, "x", 1).is_err());
    assert!(topo.add_host_on(2, "y", 254).is_err());
    assert_eq!(
        (topo.node_of("a"), topo.node_of("c"), topo.node_of("b")),
        (1, 1, 2)
    );
    assert_eq!(topo.node_count(), 2);
    assert_eq!(topo.node_ns(1), topo.node());
    assert_eq!(topo.node_ns(2), format!("{prefix}-node2"));
    let (a, b, c) = (topo.host("a"), topo.host("b"), topo.host("c"));
    let s = a.v4.octets()[1];
    assert_eq!(a.v4.octets(), [10, s, 1, 10]);
    assert_eq!(b.v4.octets(), [10, s, 2, 20]);
    assert_eq!(b.v6.segments(), [0xfd00, s as u16, 2, 0, 0, 0, 0, 20]);
    assert_eq!(topo.gateway(2).map(|g| g.0.octets()), Some([10, s, 2, 254]));
    for ns in [topo.node_ns(1), topo.node_ns(2)] {
        assert!(ip_out(ns, &["link", "show", "wire"]).contains("wire"));
    }
    let (na, nb, nc) = (a.netns().unwrap(), b.netns().unwrap(), c.netns().unwrap());
    for v6 in [false, true] {
        echo_server(&nb, "b", SocketAddr::new(b.addr(v6), APP_PORT)).unwrap();
        echo_server(&nc, "c", SocketAddr::new(c.addr(v6), APP_PORT)).unwrap();
        udp_echo(&nb, "b", SocketAddr::new(b.addr(v6), PEER_PORT)).unwrap();
    }

    let (wire_ns, wire_if) = topo.wire().expect("two nodes have a wire");
    assert_eq!(wire_if, "wire");
    let node1 = Netns::open(format!("/var/run/netns/{wire_ns}")).unwrap();
    let cap = Capture::watching(&node1, wire_if, &[b"across-v4", b"local-v4"]).unwrap();
    for v6 in [false, true] {
        let fam = if v6 { "v6" } else { "v4" };
        let line = format!("across-{fam}");
        let got = redirect_user::demo::ask(&na, SocketAddr::new(b.addr(v6), APP_PORT), &line)
            .unwrap_or_else(|e| panic!("a to b over {fam}: {e:#}"));
        assert!(
            got.starts_with("b from ") && got.ends_with(&format!("got {line}")),
            "{got}"
        );
        assert!(
            got.contains(&a.addr(v6).to_string()),
            "no NAT on the way: {got}"
        );
        let local = format!("local-{fam}");
        let got =
            redirect_user::demo::ask(&na, SocketAddr::new(c.addr(v6), APP_PORT), &local).unwrap();
        assert!(got.ends_with(&local), "{got}");
        let (got, from) = udp_ask(&na, SocketAddr::new(b.addr(v6), PEER_PORT), "dgram").unwrap();
        assert_eq!(
            (got.as_str(), from),
            ("b:dgram", SocketAddr::new(b.addr(v6), PEER_PORT))
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let frames = cap.stop().unwrap();

    assert!(frames.complete(), "dropped {}", frames.dropped());
    assert!(frames.count() > 10, "{} frames", frames.count());
    for needle in [&b"across-v4"[..], b"across-v6", b"b:dgram"] {
        assert!(
            frames.contains(needle),
            "{} not seen",
            String::from_utf8_lossy(needle)
        );
    }
    // The request, and the answer (written in pieces: in a frame of its own or not).
    assert!(frames.watched(b"across-v4").is_some_and(|n| n >= 1));
    for needle in [&b"local-v4"[..], b"local-v6"] {
        assert!(
            !frames.contains(needle),
            "same-node traffic crossed the wire"
        );
    }
    assert!(frames.tcp_ports().contains(&APP_PORT));
    assert!(frames.udp_ports().contains(&PEER_PORT));
    for v6 in [false, true] {
        let (src, dst) = (a.addr(v6), b.addr(v6));
        assert!(
            frames.packets().iter().any(|p| p.proto == Proto::Tcp
                && (p.src, p.dst, p.dport) == (src, dst, APP_PORT)
                && p.flags & 0x02 != 0
                && p.outgoing),
            "no SYN {src} -> {dst}"
        );
        assert!(
            frames.packets().iter().any(|p| p.proto == Proto::Tcp
                && (p.src, p.dst, p.sport) == (dst, src, APP_PORT)
                && p.payload_len > 0
                && !p.outgoing),
            "no answer {dst} -> {src}"
        );
        let c_addr = c.addr(v6);
        assert!(
            frames
                .packets()
                .iter()
                .all(|p| p.src != c_addr && p.dst != c_addr)
        );
    }
    // "across-vN\n" each way plus the answers.
    let tcp = frames.payload_bytes_by_port(Proto::Tcp);
    assert!(tcp[&APP_PORT] >= 2 * 10, "{tcp:?}");
    assert_eq!(
        frames.payload_bytes_by_port(Proto::Udp)[&PEER_PORT],
        2 * ("dgram".len() + "b:dgram".len()) as u64
    );

    drop(topo);
    assert_eq!(namespaces_with(&prefix), Vec::<String>::new());
}

#[test]
fn every_namespace_goes_on_panic_too() {
    let prefix = std::sync::Mutex::new(String::new());
    let r = std::panic::catch_unwind(|| {
        let mut topo = Topology::two_nodes("tp2p").unwrap();
        *prefix.lock().unwrap() = topo.prefix().to_string();
        topo.add_host_on(1, "a", 1).unwrap();
        topo.add_host_on(2, "b", 2).unwrap();
        assert_eq!(namespaces_with(topo.prefix()).len(), 4);
        panic!("on purpose");
    });
    assert!(r.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert_eq!(namespaces_with(&prefix), Vec::<String>::new());
}

#[test]
fn one_node_is_as_before() {
    let mut topo = Topology::new("tp1").unwrap();
    let prefix = topo.prefix().to_string();
    topo.add_host("a", 10).unwrap();
    topo.add_host("b", 300).unwrap();
    let (a, b) = (topo.host("a"), topo.host("b"));
    let s = a.v4.octets()[1];
    assert_eq!(b.v4.octets(), [10, s, 1, 44]);
    assert_eq!(a.v6.segments(), [0xfd00, s as u16, 0, 0, 0, 0, 0, 10]);
    assert_eq!(topo.node(), format!("{prefix}-node"));
    assert_eq!(
        (topo.node_count(), topo.wire(), topo.gateway(1)),
        (1, None, None)
    );
    assert!(ip_out(&a.name, &["-4", "addr"]).contains(&format!("{}/16", a.v4)));
    let nb = b.netns().unwrap();
    echo_server(&nb, "b", SocketAddr::new(b.v4.into(), APP_PORT)).unwrap();
    let got = ask(&a.netns().unwrap(), SocketAddr::new(b.v4.into(), APP_PORT)).unwrap();
    assert!(got.ends_with("got hello"), "{got}");
    drop(topo);
    assert_eq!(namespaces_with(&prefix), Vec::<String>::new());
}

#[test]
fn the_capture_counts_bulk_payload_in_gso_frames() {
    const BYTES: usize = 16 << 20;
    let mut topo = Topology::two_nodes("tp2b").unwrap();
    topo.add_host_on(1, "a", 10).unwrap();
    topo.add_host_on(2, "b", 20).unwrap();
    let (a, b) = (topo.host("a"), topo.host("b"));
    let to = SocketAddr::new(b.v6.into(), 7000);
    bulk_server(&b.netns().unwrap(), to, BYTES).unwrap();
    let (ns, ifname) = topo.wire().unwrap();
    let node1 = Netns::open(format!("/var/run/netns/{ns}")).unwrap();
    let cap = Capture::watching(&node1, ifname, &[b"never-sent-plaintext"]).unwrap();
    bulk_exchange(&a.netns().unwrap(), to, BYTES).unwrap();
    // The last of a's bytes may still be on their way to b.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let frames = cap.stop().unwrap();
    assert_eq!(frames.dropped(), 0);
    assert!(frames.complete());
    assert_eq!(frames.watched(b"never-sent-plaintext"), Some(0));
    let sent = frames.payload_bytes_by_port(Proto::Tcp)[&7000];
    // Both ways, retransmissions aside.
    assert!(sent >= 2 * BYTES as u64, "{sent}");
    assert!(sent < 2 * BYTES as u64 + (1 << 20), "{sent}");
    assert!(frames.wire_bytes() > sent);
}
