//! Packets an attacker builds by hand, sent at enrolled pods from outside the mesh and
//! from an enrolled pod's own app (which holds CAP_NET_RAW, a default container
//! capability): each must end at the pod's proxy or be dropped, never at the app past
//! the proxy and never on the wire unproxied. The netfilter rule set defragments before
//! it matches and matches on the namespace, so it redirects all of these; so must we.
//!
//! Which socket answered a SYN is read off the wire: the pod's app listens with an MSS
//! of 1000 (TCP_MAXSEG), which its SYN-ACKs advertise; the proxy's listeners advertise
//! the path's.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    time::Duration,
};

use redirect_tests::{
    capture::{Capture, Frames},
    raw::{self, RawSender, Segment, TcpSeen},
    *,
};

const FAMILIES: [bool; 2] = [false, true];
/// The app's own port in pod b, on every address, advertising this MSS.
const APP: u16 = 7100;
const APP_MSS: u16 = 1000;

fn fam(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

fn mesh(tag: &str) -> Mesh {
    Mesh::new(tag, &[("a", 10), ("b", 11), ("c", 100)]).expect("topology")
}

/// The app of pod b: a listener on every address (both families) that advertises
/// `APP_MSS` and never accepts on its own; the test looks at its queue.
fn app_listener(m: &Mesh, v6: bool) -> TcpListener {
    m.ns("b")
        .run(|| -> std::io::Result<TcpListener> {
            use socket2::{Domain, Socket, Type};
            let (domain, any): (Domain, IpAddr) = if v6 {
                (Domain::IPV6, Ipv6Addr::UNSPECIFIED.into())
            } else {
                (Domain::IPV4, Ipv4Addr::UNSPECIFIED.into())
            };
            let s = Socket::new(domain, Type::STREAM, None)?;
            if v6 {
                s.set_only_v6(true)?;
            }
            s.set_reuse_address(true)?;
            s.set_tcp_mss(APP_MSS as u32)?;
            s.bind(&SocketAddr::new(any, APP).into())?;
            s.listen(128)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .unwrap()
        .unwrap()
}

/// Connections the app accepted (its queue, drained).
fn app_accepted(l: &TcpListener) -> usize {
    let mut n = 0;
    while l.accept().is_ok() {
        n += 1;
    }
    n
}

fn tcp_frames(f: &Frames) -> Vec<TcpSeen> {
    f.frames()
        .iter()
        .filter_map(|fr| raw::tcp_of_frame(&fr.data))
        .collect()
}

/// The SYN-ACKs that answered `from`.
fn synacks_to(f: &Frames, from: SocketAddr) -> Vec<TcpSeen> {
    tcp_frames(f)
        .into_iter()
        .filter(|t| t.dst == from && t.flags & (raw::SYN | raw::ACK) == raw::SYN | raw::ACK)
        .collect()
}

fn wait_a_little() {
    std::thread::sleep(Duration::from_millis(300));
}

/// The attacker's SYNs, each variant the way tc cannot read it whole. IPv6 fragments
/// whose first one cuts the TCP header short are dropped by the receiving kernel itself
/// (RFC 7112), so inbound they prove nothing; outbound they must not even reach the wire.
fn crafted_syns(seg: &Segment, inbound: bool) -> Vec<(&'static str, Vec<Vec<u8>>)> {
    if seg.src.is_ipv6() {
        let mut v = vec![(
            "10 destination-options headers",
            vec![raw::ipv6_with_dstopts(seg, 10)],
        )];
        if !inbound {
            v.push((
                "fragments, 8 bytes of TCP first",
                raw::ipv6_fragments(seg, 8, 0x1234),
            ));
        }
        v
    } else {
        vec![(
            "fragments, 8 bytes of TCP first",
            raw::ipv4_fragments(seg, 8, 0x1234),
        )]
    }
}

#[test]
fn crafted_inbound_syns_reach_the_proxy_never_the_app() {
    let m = mesh("hin");
    m.enrol("b", PodOptions::default()).unwrap();
    let mut port = 41000;
    for v6 in FAMILIES {
        let app = app_listener(&m, v6);
        let sender = RawSender::new(&m.ns("c"), v6).unwrap();
        let to = m.addr("b", v6, APP);
        let seg0 = Segment::syn(m.addr("c", v6, 0), to, 1000);
        for (what, _) in crafted_syns(&seg0, true) {
            port += 1;
            let mut seg = seg0.clone();
            seg.src.set_port(port);
            let packets: Vec<Vec<u8>> = crafted_syns(&seg, true)
                .into_iter()
                .find(|(w, _)| *w == what)
                .unwrap()
                .1;
            let before = m.counters("b").redirected_15006;
            let cap = Capture::start(&m.ns("c"), "eth0").unwrap();
            sender.send_all(to.ip(), &packets).unwrap();
            wait_a_little();
            let frames = cap.stop().unwrap();
            let answers = synacks_to(&frames, seg.src);
            assert!(
                !answers.is_empty(),
                "{} {what}: no answer at all (the kernel dropped the crafted SYN?)",
                fam(v6)
            );
            assert!(
                answers.iter().all(|a| a.mss != Some(APP_MSS)),
                "{} {what}: the app answered past the proxy: {answers:?}",
                fam(v6)
            );
            assert!(
                m.counters("b").redirected_15006 > before,
                "{} {what}: not steered to 15006",
                fam(v6)
            );
        }
        assert_eq!(app_accepted(&app), 0, "{}", fam(v6));
    }
}

#[test]
fn crafted_outbound_syns_never_leave_the_pod() {
    let m = mesh("hout");
    m.enrol("a", PodOptions::default()).unwrap();
    let mut port = 42000;
    for v6 in FAMILIES {
        let sender = RawSender::new(&m.ns("a"), v6).unwrap();
        let to = m.addr("c", v6, PEER_PORT);
        let seg0 = Segment::syn(m.addr("a", v6, 0), to, 1000);
        for (what, _) in crafted_syns(&seg0, false) {
            port += 1;
            let mut seg = seg0.clone();
            seg.src.set_port(port);
            let packets = crafted_syns(&seg, false)
                .into_iter()
                .find(|(w, _)| *w == what)
                .unwrap()
                .1;
            let before = m.counters("a").dropped_unparsable;
            let cap = Capture::start(&m.ns("c"), "eth0").unwrap();
            sender.send_all(to.ip(), &packets).unwrap();
            wait_a_little();
            let frames = cap.stop().unwrap();
            // Nothing of it on the outside host's wire: no fragment, no SYN, no answer.
            let from_a: Vec<usize> = frames
                .frames()
                .iter()
                .enumerate()
                .filter(|(_, f)| carries_non_icmp_from(&f.data, seg.src.ip()))
                .map(|(i, _)| i)
                .collect();
            assert!(
                from_a.is_empty(),
                "{} {what}: {} frames from the pod reached the outside host",
                fam(v6),
                from_a.len()
            );
            assert!(
                m.counters("a").dropped_unparsable > before,
                "{} {what}: not counted as dropped",
                fam(v6)
            );
        }
    }
}

/// An IPv4 or IPv6 frame from `src` that is not ICMP / ICMPv6 (neighbour discovery).
fn carries_non_icmp_from(f: &[u8], src: IpAddr) -> bool {
    if f.len() < 34 {
        return false;
    }
    match (u16::from_be_bytes([f[12], f[13]]), src) {
        (0x0800, IpAddr::V4(s)) => f[26..30] == s.octets() && f[23] != 1,
        (0x86dd, IpAddr::V6(s)) => f.len() >= 54 && f[22..38] == s.octets() && f[20] != 58,
        _ => false,
    }
}

#[test]
fn a_syn_cookie_handshake_under_a_flood_reaches_the_proxy() {
    let m = mesh("hcookie");
    // Every SYN answered with a cookie: the connection then exists nowhere until the
    // final ACK, which is when the listener is chosen again.
    m.ns("b")
        .run(|| std::fs::write("/proc/sys/net/ipv4/tcp_syncookies", "2"))
        .unwrap()
        .unwrap();
    m.enrol("b", PodOptions::default()).unwrap();
    for v6 in FAMILIES {
        let app = app_listener(&m, v6);
        let sender = RawSender::new(&m.ns("c"), v6).unwrap();
        let to = m.addr("b", v6, APP);
        let from = m.addr("c", v6, 43000 + v6 as u16);
        let cap = Capture::start(&m.ns("c"), "eth0").unwrap();
        sender
            .send(to.ip(), &raw::packet(&Segment::syn(from, to, 5000)))
            .unwrap();
        wait_a_little();
        let frames = cap.stop().unwrap();
        let synack = synacks_to(&frames, from)
            .pop()
            .unwrap_or_else(|| panic!("{}: no SYN-ACK", fam(v6)));
        // The flood: 192,000 SYNs of distinct 5-tuples (three ports of the pod's, 64,000
        // source ports each), three times the notes a tc program could keep.
        for i in 0..192_000u32 {
            let src = SocketAddr::new(from.ip(), 1024 + (i % 64000) as u16);
            let flood_to = m.addr("b", v6, APP + 1 + (i / 64000) as u16);
            let mut s = Segment::syn(src, flood_to, i);
            s.mss = 0;
            let _ = sender.send(to.ip(), &raw::packet(&s));
        }
        wait_a_little();
        // The handshake completed with the cookie, carrying a line for whoever has it.
        let events_before = m.events().len();
        let ack = Segment {
            src: from,
            dst: to,
            seq: 5001,
            ack: synack.seq.wrapping_add(1),
            flags: raw::ACK | raw::PSH,
            mss: 0,
            payload: b"hello\n".to_vec(),
        };
        sender.send(to.ip(), &raw::packet(&ack)).unwrap();
        wait_a_little();
        assert_eq!(
            app_accepted(&app),
            0,
            "{}: the app accepted a cookie past the proxy",
            fam(v6)
        );
        let ev: Vec<_> = m.events();
        assert!(
            ev.iter().any(|e| e.listener == 15006 && e.local == to),
            "{}: the proxy did not get the connection ({events_before} before): {ev:?}",
            fam(v6)
        );
    }
}

#[test]
fn an_address_the_pod_gains_after_enrolment_leads_to_the_proxy() {
    let m = mesh("hnewaddr");
    m.enrol("b", PodOptions::default()).unwrap();
    for v6 in FAMILIES {
        let app = app_listener(&m, v6);
        let new: IpAddr = match m.host("b").addr(v6) {
            IpAddr::V4(a) => {
                let o = a.octets();
                Ipv4Addr::new(o[0], o[1], o[2], 211).into()
            }
            IpAddr::V6(a) => {
                let mut s = a.segments();
                s[7] = 0xd3;
                Ipv6Addr::from(s).into()
            }
        };
        let plen = if v6 { "64" } else { "24" };
        let out = std::process::Command::new("ip")
            .args(["-n", &m.host("b").name, "addr", "add"])
            .arg(format!("{new}/{plen}"))
            .args(["dev", "eth0", "nodad"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // The engine follows the pod's addresses: a connection to the new one is the
        // proxy's (before the engine saw it, it was dropped), never the app's.
        m.events();
        let to = SocketAddr::new(new, APP);
        let cap = Capture::start(&m.ns("c"), "eth0").unwrap();
        let r = m
            .ns("c")
            .run(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)))
            .unwrap();
        wait_a_little();
        let frames = cap.stop().unwrap();
        let from = r.as_ref().map(|s| s.local_addr().unwrap());
        assert!(from.is_ok(), "{}: {r:?}", fam(v6));
        let ev = m.events();
        assert!(
            ev.iter().any(|e| e.listener == 15006 && e.local == to),
            "{}: the proxy did not get the connection to {new}: {ev:?}",
            fam(v6)
        );
        // Answered by the proxy's listener, not the app's (which advertises APP_MSS);
        // the app accepts only the proxy's own connection to it.
        let answers = synacks_to(&frames, from.unwrap());
        assert!(
            !answers.is_empty() && answers.iter().all(|t| t.mss != Some(APP_MSS)),
            "{}: {answers:?}",
            fam(v6)
        );
        assert!(app_accepted(&app) <= 1, "{}", fam(v6));
    }
}
