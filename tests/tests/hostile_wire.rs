//! Hostile pods, with the pod's wire captured (its veth's peer, in the node's
//! namespace): whatever the app tries, none of its plaintext and none of its own
//! connections leave the pod past its proxy. Pods talk over HBONE (our mesh proxy), so
//! on the wire only port 15008 is the proxies'. Each case is run against the netfilter
//! rule set too (inpod-rules.md, with our proxy behind it), and what that does with the
//! same packets is asserted, so the comparison in docs/faults.md stays true.

use std::{
    net::{Ipv6Addr, SocketAddr, TcpListener},
    time::Duration,
};

use redirect_tests::{
    process::RemoveDir,
    raw::{self, RawSender, Segment},
    traffic::{Escapes, MARKER, Wire, exchange, hbone, mesh_proxy},
    *,
};
use redirect_user::proxy::relay::Relay;

const FAMILIES: [bool; 2] = [false, true];

fn fam(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

/// Pods `a` and `b` enrolled with our engine behind the mesh proxy; pod `n` behind the
/// netfilter rule set with the bare relay; `c` outside.
struct Pods {
    m: Mesh,
    _ca: RemoveDir,
    relay_n: Option<Relay>,
}

impl Pods {
    fn new(tag: &str, before: impl Fn(&Mesh)) -> Pods {
        let m = Mesh::new(tag, &[("a", 10), ("b", 11), ("n", 12), ("c", 100)]).unwrap();
        before(&m);
        let (proxy, ca) = mesh_proxy(&m).unwrap();
        m.enrol_mesh("a", PodOptions::default(), &proxy).unwrap();
        m.enrol_mesh("b", PodOptions::default(), &proxy).unwrap();
        let n = m.ns("n");
        netfilter::enrol(&n, &netfilter::rules_v6()).unwrap();
        let listeners = PodListeners::open(&n, false).unwrap();
        let relay_n = {
            let _g = m.rt.enter();
            Relay::start("n", n, listeners, None).unwrap()
        };
        Pods {
            m,
            _ca: ca,
            relay_n: Some(relay_n),
        }
    }

    fn wire(&self, pod: &str) -> Wire {
        Wire::watch(&self.m.topo, pod).unwrap()
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        if let Some(r) = self.relay_n.take() {
            self.m.rt.block_on(r.stop());
        }
        if let Ok(n) = self.m.host("n").netns() {
            let _ = netfilter::unenrol(&n);
        }
    }
}

fn nothing_escaped(what: &str, e: &Escapes) {
    assert!(e.frames > 0, "{what}: the capture saw nothing");
    assert!(e.complete, "{what}: the capture missed frames: {e:?}");
    assert!(e.none(), "{what}: escaped past the proxy: {e:?}");
}

#[test]
fn a_forged_proxy_mark_leaves_only_through_the_proxy() {
    let p = Pods::new("hwmark", |_| {});
    let m = &p.m;
    // An app of the pod holding CAP_NET_ADMIN, in a cgroup that is not the proxy's.
    let app = AppCgroup::new("hwmark").unwrap();
    let probe = |pod: &str, to: SocketAddr| {
        app.probe(&[
            "--netns",
            &m.host(pod).path(),
            "--mark",
            "0x539",
            "--send",
            MARKER,
            &to.to_string(),
        ])
    };
    let wire = p.wire("a");
    for v6 in FAMILIES {
        let answer = probe("a", m.addr("b", v6, APP_PORT)).unwrap();
        assert!(answer.starts_with("b from "), "{}: {answer}", fam(v6));
    }
    let e = wire.stop(hbone).unwrap();
    nothing_escaped("forged mark", &e);
    let ev: Vec<_> = m
        .events()
        .into_iter()
        .map(|e| (e.pod, e.listener))
        .collect();
    assert_eq!(
        ev.iter().filter(|e| **e == ("a".into(), 15001)).count(),
        2,
        "{ev:?}"
    );

    // The rule set trusts the mark alone: the same app's connection leaves unproxied.
    let wire = p.wire("n");
    for v6 in FAMILIES {
        let answer = probe("n", m.addr("b", v6, APP_PORT)).unwrap();
        assert!(answer.starts_with("b from "), "{}: {answer}", fam(v6));
    }
    let e = wire.stop(|_| false).unwrap();
    // Each family: the app's line out, and the answer quoting it back.
    assert!(e.plaintext_frames >= 2, "netfilter: {e:?}");
    assert_eq!(e.connections.len(), 2, "netfilter: {e:?}");
}

/// A listener of the app on `port` of every address (both families), bound before
/// the proxy's and sharing its port (SO_REUSEPORT, as the proxy's listeners do).
fn squat(ns: &Netns, port: u16) -> TcpListener {
    ns.run(|| -> std::io::Result<TcpListener> {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.bind(&SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port).into())?;
        s.listen(128)?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    })
    .unwrap()
    .unwrap()
}

fn accepted(l: &TcpListener) -> usize {
    let mut n = 0;
    while l.accept().is_ok() {
        n += 1;
    }
    n
}

#[test]
fn proxy_ports_bound_by_the_app_first_get_nothing() {
    const PORTS: [u16; 3] = [15001, 15006, 15008];
    let squats: std::sync::Mutex<Vec<(String, u16, TcpListener)>> = Default::default();
    let p = Pods::new("hwsquat", |m| {
        for pod in ["b", "n"] {
            for port in PORTS {
                squats
                    .lock()
                    .unwrap()
                    .push((pod.into(), port, squat(&m.ns(pod), port)));
            }
        }
    });
    let squats = squats.into_inner().unwrap();
    let m = &p.m;
    let took = |pod: &str| -> usize {
        squats
            .iter()
            .filter(|(p, _, _)| p == pod)
            .map(|(_, _, l)| accepted(l))
            .sum()
    };
    // Pod to pod (HBONE both ways), and plaintext from outside, 10 of each per family.
    let (wa, wb) = (p.wire("a"), p.wire("b"));
    for v6 in FAMILIES {
        for _ in 0..10 {
            let a = ask(&m.ns("a"), m.addr("b", v6, APP_PORT)).unwrap();
            assert!(a.starts_with("b from "), "{a}");
            let a = ask(&m.ns("b"), m.addr("a", v6, APP_PORT)).unwrap();
            assert!(a.starts_with("a from "), "{a}");
        }
    }
    nothing_escaped("squatted ports, a", &wa.stop(hbone).unwrap());
    nothing_escaped("squatted ports, b", &wb.stop(hbone).unwrap());
    for v6 in FAMILIES {
        for _ in 0..10 {
            let a = ask(&m.ns("c"), m.addr("b", v6, APP_PORT)).unwrap();
            assert!(a.starts_with("b from "), "{a}");
        }
    }
    assert_eq!(took("b"), 0, "b's app took connections meant for its proxy");
    let c = m.counters("b");
    // Every one reached b's proxy: b's own connections, the outsider's, and a's
    // tunnels (pooled: fewer connections than requests).
    assert_eq!((c.redirected_15001, c.redirected_15006), (20, 20), "{c:?}");
    assert!(c.redirected_15008 >= 1, "{c:?}");

    // Behind the rule set, REDIRECT hands connections to whichever socket of the
    // port's group the kernel picks: the app's too.
    for v6 in FAMILIES {
        for _ in 0..10 {
            // An app's socket takes it and never answers: short timeouts.
            let t = Duration::from_millis(300);
            let _ = exchange(&m.ns("c"), m.addr("n", v6, APP_PORT), t);
            let _ = exchange(&m.ns("n"), m.addr("c", v6, APP_PORT), t);
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let n_took = took("n");
    eprintln!("netfilter: the app took {n_took} of 40 redirected connections");
    assert!(n_took > 0, "netfilter: the app's sockets took none");
}

/// Sends an Ethernet frame on `ifname` from an AF_PACKET socket in `ns`, through the
/// qdisc layer or (`bypass`) straight to the driver (PACKET_QDISC_BYPASS).
fn send_frame(ns: &Netns, ifname: &str, frame: &[u8], bypass: bool) -> anyhow::Result<()> {
    let name = std::ffi::CString::new(ifname)?;
    ns.run(|| -> anyhow::Result<()> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: plain socket calls with valid buffers; the fd is owned at once.
        unsafe {
            let index = libc::if_nametoindex(name.as_ptr());
            anyhow::ensure!(index != 0, "no {ifname}");
            let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            anyhow::ensure!(raw >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(raw);
            if bypass {
                let one: libc::c_int = 1;
                let r = libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    20, // PACKET_QDISC_BYPASS
                    (&one as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as _,
                );
                anyhow::ensure!(r == 0, "bypass: {}", std::io::Error::last_os_error());
            }
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as _;
            sll.sll_ifindex = index as _;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            let r = libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as _,
            );
            anyhow::ensure!(r >= 0, "sendto: {}", std::io::Error::last_os_error());
        }
        Ok(())
    })?
}

fn mac_of(ns: &str) -> [u8; 6] {
    let link = ip_out(ns, &["-o", "link", "show", "dev", "eth0"]);
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {link:?}"));
    let v: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// The app's plaintext in segments built by hand, from a raw socket of the pod's app
/// (CAP_NET_RAW is a default container capability): each way tc could be kept from
/// reading the header, and an Ethernet frame from a packet socket. Returns what each
/// variant is called and the packets (IP, or a whole frame for the packet socket).
fn handmade(m: &Mesh, pod: &str, v6: bool, port: u16) -> Vec<(&'static str, Send, Vec<Vec<u8>>)> {
    let seg = Segment {
        src: m.addr(pod, v6, port),
        dst: m.addr("c", v6, PEER_PORT),
        seq: 7,
        ack: 1,
        flags: raw::ACK | raw::PSH,
        mss: 0,
        payload: format!("{MARKER}\n").into_bytes(),
    };
    let mut v = vec![("a data segment", Send::Ip, vec![raw::packet(&seg)])];
    if v6 {
        v.push((
            "behind 10 destination-options headers",
            Send::Ip,
            vec![raw::ipv6_with_dstopts(&seg, 10)],
        ));
        v.push((
            "in fragments",
            Send::Ip,
            raw::ipv6_fragments(&seg, 8, 0x4242),
        ));
    } else {
        v.push((
            "in fragments",
            Send::Ip,
            raw::ipv4_fragments(&seg, 8, 0x4242),
        ));
    }
    // The same segment as a whole frame to c's MAC.
    let mut frame = mac_of(&m.host("c").name).to_vec();
    frame.extend_from_slice(&mac_of(&m.host(pod).name));
    frame.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    frame.extend_from_slice(&raw::packet(&seg));
    v.push((
        "a frame from a packet socket",
        Send::Frame,
        vec![frame.clone()],
    ));
    v.push((
        "a frame from a packet socket, qdisc bypassed",
        Send::FrameBypass,
        vec![frame],
    ));
    v
}

#[derive(Clone, Copy)]
enum Send {
    /// A raw IP socket (IPPROTO_RAW: headers included).
    Ip,
    /// A packet socket, through the qdisc layer.
    Frame,
    /// A packet socket with PACKET_QDISC_BYPASS: straight to the driver.
    FrameBypass,
}

/// Sends every handmade variant (`bypass`: only the packet socket's frames that skip
/// the qdisc layer; otherwise all the others) from `pod`'s app, both families, and
/// returns what left the pod.
fn send_handmade(p: &Pods, pod: &str, bypass: bool, port: &mut u16) -> Escapes {
    let m = &p.m;
    let wire = p.wire(pod);
    for v6 in FAMILIES {
        let sender = RawSender::new(&m.ns(pod), v6).unwrap();
        let dst = m.host("c").addr(v6);
        *port += 1;
        for (what, how, packets) in handmade(m, pod, v6, *port) {
            if matches!(how, Send::FrameBypass) != bypass {
                continue;
            }
            let r = match how {
                Send::Ip => sender.send_all(dst, &packets),
                Send::Frame => send_frame(&m.ns(pod), "eth0", &packets[0], false),
                Send::FrameBypass => send_frame(&m.ns(pod), "eth0", &packets[0], true),
            };
            // Dropped at once by tc (TC_ACT_SHOT) is ENOBUFS to a packet socket.
            if let Err(e) = r {
                let dropped = e.to_string().contains("os error 105");
                assert!(dropped, "{pod} {} {what}: {e:#}", fam(v6));
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    wire.stop(|_| false).unwrap()
}

#[test]
fn segments_built_by_hand_never_carry_the_apps_bytes_out() {
    let p = Pods::new("hwraw", |_| {});
    let mut port = 47000;
    let ours = send_handmade(&p, "a", false, &mut port);
    let theirs = send_handmade(&p, "n", false, &mut port);
    eprintln!("engine: {ours:?}\nnetfilter: {theirs:?}");
    nothing_escaped("segments built by hand", &ours);
    let c = p.m.counters("a");
    assert!(c.dropped_unparsable >= 7, "{c:?}");
    // The rule set: conntrack takes a stray segment for a new connection and REDIRECT
    // keeps it in the pod; a packet socket's frames never meet netfilter.
    assert_eq!(theirs.plaintext_frames, 2, "netfilter: {theirs:?}");
}

/// A known limit, shared with the rule set: a packet socket with PACKET_QDISC_BYPASS
/// hands its frames to the driver, past tc and netfilter alike.
#[test]
fn a_packet_socket_bypassing_the_qdisc_layer_escapes_both_designs() {
    let p = Pods::new("hwbyp", |_| {});
    let mut port = 48000;
    let ours = send_handmade(&p, "a", true, &mut port);
    let theirs = send_handmade(&p, "n", true, &mut port);
    eprintln!("engine: {ours:?}\nnetfilter: {theirs:?}");
    assert_eq!(ours.plaintext_frames, 2, "engine: {ours:?}");
    assert_eq!(theirs.plaintext_frames, 2, "netfilter: {theirs:?}");
}

#[test]
fn an_outsider_forging_a_pods_address_reaches_nothing() {
    let p = Pods::new("hwspoof", |_| {});
    let m = &p.m;
    for pod in ["b", "n"] {
        let wire = p.wire(pod);
        let before = m.counters("b").dropped_spoofed;
        for v6 in FAMILIES {
            let sender = RawSender::new(&m.ns("c"), v6).unwrap();
            let to = m.addr(pod, v6, APP_PORT);
            // The pod's own address as source: a SYN, then data for a connection.
            let own = SocketAddr::new(m.host(pod).addr(v6), 40100);
            sender
                .send(to.ip(), &raw::packet(&Segment::syn(own, to, 100)))
                .unwrap();
            let data = Segment {
                src: own,
                dst: to,
                seq: 101,
                ack: 1,
                flags: raw::ACK | raw::PSH,
                mss: 0,
                payload: format!("{MARKER}\n").into_bytes(),
            };
            sender.send(to.ip(), &raw::packet(&data)).unwrap();
            // And a transparent socket's real connection from that address.
            let r = m.ns("c").run(|| {
                use socket2::{Domain, Socket, Type};
                let d = if v6 { Domain::IPV6 } else { Domain::IPV4 };
                let s = Socket::new(d, Type::STREAM, None).unwrap();
                if v6 {
                    s.set_ip_transparent_v6(true).unwrap();
                } else {
                    s.set_ip_transparent_v4(true).unwrap();
                }
                s.bind(&SocketAddr::new(own.ip(), 0).into()).unwrap();
                s.connect_timeout(&to.into(), Duration::from_millis(700))
            });
            assert!(matches!(r, Ok(Err(_))), "{pod} {}: {r:?}", fam(v6));
        }
        std::thread::sleep(Duration::from_millis(200));
        let e = wire.stop(|_| false).unwrap();
        // The pod answered nothing: no SYN-ACK, no data, no reset with its address.
        nothing_escaped(&format!("forged source, {pod}"), &e);
        assert_eq!(e.tcp_frames, 0, "{pod}: {e:?}");
        if pod == "b" {
            let now = m.counters("b").dropped_spoofed;
            assert!(now > before, "dropped_spoofed {before} -> {now}");
        }
    }
    assert_eq!(m.events(), vec![]);
}
