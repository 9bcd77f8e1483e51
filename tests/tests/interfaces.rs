//! What an app holding CAP_NET_ADMIN can change inside its enrolled pod, and that none of
//! it lets a connection out past the proxy: an interface added after enrolment (a
//! second veth, as Multus or a VPN would add), an L3 device (tun) whose packets carry
//! no Ethernet header, an address added later, and our rule, route and tc filters
//! removed from inside the pod.
//!
//! Which side sent a SYN is read off the wire: the app's sockets here advertise an MSS
//! of 1000 (TCP_MAXSEG), the proxy's the path's.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use redirect_tests::{
    capture::{Capture, Frames},
    raw::{self, TcpSeen},
    *,
};

const FAMILIES: [bool; 2] = [false, true];
const APP_MSS: u16 = 1000;
/// The remote listener's port on the addresses of the new interfaces.
const REMOTE_PORT: u16 = 7777;

fn fam(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip -n NS -batch -` with these lines, one process: as fast as an app can change it.
fn ip_batch(ns: &str, lines: &str) {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("ip");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "ip -batch: {lines}");
}

/// A connection of the pod's app: its SYN advertises `APP_MSS`.
fn app_connect(ns: &Netns, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    ns.run(|| {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
        s.set_tcp_mss(APP_MSS as u32)?;
        s.connect_timeout(&to.into(), timeout)?;
        Ok(s.into())
    })
    .unwrap()
}

/// A listener on every address of `ns` (one family).
fn any_listener(ns: &Netns, v6: bool, port: u16) -> TcpListener {
    ns.run(|| -> std::io::Result<TcpListener> {
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
        s.bind(&SocketAddr::new(any, port).into())?;
        s.listen(1024)?;
        Ok(s.into())
    })
    .unwrap()
    .unwrap()
}

fn tcp_seen(f: &Frames) -> Vec<TcpSeen> {
    f.frames()
        .iter()
        .filter_map(|fr| raw::tcp_of_frame(&fr.data))
        .collect()
}

/// SYNs the app sent (its MSS), as they reached the wire.
fn app_syns(f: &Frames) -> Vec<TcpSeen> {
    tcp_seen(f)
        .into_iter()
        .filter(|t| t.flags & (raw::SYN | raw::ACK) == raw::SYN && t.mss == Some(APP_MSS))
        .collect()
}

/// Tries to connect from the pod's app until one connection is made (or the deadline),
/// as fast as it can: from before the route exists to after the engine attached.
fn hammer(ns: Netns, to: SocketAddr, stop: Arc<AtomicBool>, deadline: Duration) -> usize {
    let end = Instant::now() + deadline;
    let mut tries = 0;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        tries += 1;
        match app_connect(&ns, to, Duration::from_millis(150)) {
            Ok(_) => return tries,
            Err(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    0
}

/// Waits (2 s at most, the proxy's event may lag under load) for the proxy's 15001 to
/// have taken a connection to `to`.
fn proxy_took(m: &Mesh, to: SocketAddr) -> bool {
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        if m.events()
            .iter()
            .any(|e| e.listener == 15001 && e.local == to)
        {
            return true;
        }
    }
    false
}

fn new_addr(v6: bool, net: u16, host: u8) -> IpAddr {
    if v6 {
        Ipv6Addr::new(0xfd00, 0x250, net, 0, 0, 0, 0, host as u16).into()
    } else {
        Ipv4Addr::new(10, 250, net as u8, host).into()
    }
}

fn plen(v6: bool) -> &'static str {
    if v6 { "64" } else { "24" }
}

/// An app adds a veth to its pod (peer in the remote namespace, which listens), brings
/// it up with an address and connects at once, in a loop, many times: no SYN of the app
/// reaches the remote end unproxied, and once the engine has attached (and learnt the
/// address) the app's connection lands on the proxy's 15001.
#[test]
fn a_veth_added_after_enrolment_never_carries_the_apps_tcp_past_the_proxy() {
    let m = Mesh::new("ifveth", &[("a", 10), ("c", 100)]).expect("topology");
    m.enrol("a", PodOptions::default()).unwrap();
    let pod = m.host("a").name.clone();
    let remote = m.host("c").name.clone();
    let _listeners: Vec<TcpListener> = FAMILIES
        .iter()
        .map(|v6| any_listener(&m.ns("c"), *v6, REMOTE_PORT))
        .collect();
    const ROUNDS: u16 = 12;
    for v6 in FAMILIES {
        let mut leaked = Vec::new();
        let mut proxied = 0;
        for k in 0..ROUNDS {
            let net = k + if v6 { 100 } else { 0 };
            let (pv, rv) = (format!("nv{net}"), format!("rv{net}"));
            run(
                "ip",
                &[
                    "-n", &pod, "link", "add", &pv, "type", "veth", "peer", "name", &rv, "netns",
                    &remote,
                ],
            );
            let them = new_addr(v6, net, 2);
            let us = new_addr(v6, net, 1);
            ip_batch(
                &remote,
                &format!(
                    "link set {rv} up\naddr add {them}/{} dev {rv}{}\n",
                    plen(v6),
                    if v6 { " nodad" } else { "" }
                ),
            );
            let cap = Capture::start(&m.ns("c"), &rv).unwrap();
            let to = SocketAddr::new(them, REMOTE_PORT);
            let stop = Arc::new(AtomicBool::new(false));
            let h = std::thread::spawn({
                let (ns, stop) = (m.ns("a"), stop.clone());
                move || hammer(ns, to, stop, Duration::from_secs(4))
            });
            ip_batch(
                &pod,
                &format!(
                    "link set {pv} up\naddr add {us}/{} dev {pv}{}\n",
                    plen(v6),
                    if v6 { " nodad" } else { "" }
                ),
            );
            let tries = h.join().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            let frames = cap.stop().unwrap();
            leaked.extend(app_syns(&frames));
            if tries > 0 {
                proxied += 1;
            } else {
                eprintln!(
                    "{} round {k}: no connection; counters {:?} guard {:?} filters {} addrs {} covered {:?}",
                    fam(v6),
                    m.counters("a"),
                    m.engine.guard_counters("a").unwrap(),
                    tc_out(&pod, &["filter", "show", "dev", &pv, "egress"]),
                    ip_out(&pod, &["addr", "show", "dev", &pv]),
                    m.dump_map("covered").unwrap().len(),
                );
            }
            assert!(
                tries == 0 || proxy_took(&m, to),
                "{} round {k}: connected, but not through the proxy",
                fam(v6)
            );
            // Gone again: its slot is for the next one (the engine attaches to at most
            // four interfaces per pod; the pod's TCP through a fifth is dropped).
            run("ip", &["-n", &pod, "link", "del", &pv]);
        }
        assert!(
            leaked.is_empty(),
            "{}: SYNs of the app reached the remote end past the proxy: {leaked:?}",
            fam(v6)
        );
        assert_eq!(
            proxied,
            ROUNDS,
            "{}: the app's connection over the new interface never reached the proxy in some rounds",
            fam(v6)
        );
    }
    // Only eth0 is left covered once the others are gone.
    std::thread::sleep(Duration::from_millis(200));
    let covered = m.dump_map("covered").unwrap();
    assert_eq!(covered.len(), 1, "{covered:?}");
    // Un-enrolment forgets every interface it covered.
    m.unenrol("a").unwrap();
    assert!(m.dump_map("covered").unwrap().is_empty());
}

/// `ioctl(TUNSETIFF)`: attaches an fd to a new tun device of the calling thread's
/// namespace, so that what the device transmits is read here.
fn open_tun(ns: &Netns, name: &str) -> OwnedFd {
    ns.run(|| {
        // SAFETY: plain syscalls on a fresh fd with a zeroed ifreq.
        unsafe {
            let fd = libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            );
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (i, b) in name.bytes().enumerate() {
                ifr.ifr_name[i] = b as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
            const TUNSETIFF: libc::c_ulong = 0x400454ca;
            let r = libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut ifr);
            assert!(r == 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            fd
        }
    })
    .unwrap()
}

/// The IP packets the tun device sent so far: (protocol, source).
fn tun_read(fd: &OwnedFd) -> Vec<(u8, IpAddr)> {
    let mut out = Vec::new();
    let mut f = std::fs::File::from(fd.try_clone().unwrap());
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = f.read(&mut buf) {
        let p = &buf[..n];
        match p.first().map(|b| b >> 4) {
            Some(4) if n >= 20 => {
                let s: [u8; 4] = p[12..16].try_into().unwrap();
                out.push((p[9], IpAddr::from(s)));
            }
            Some(6) if n >= 40 => {
                let s: [u8; 16] = p[8..24].try_into().unwrap();
                out.push((p[6], IpAddr::from(s)));
            }
            _ => {}
        }
    }
    out
}

/// A tun device added to an enrolled pod carries bare IP: tc cannot bounce its packets
/// back into the pod, so the engine does not attach to it and the pod's TCP through it
/// is dropped, from its first packet and for good. Other traffic (UDP here) passes.
#[test]
fn an_l3_device_added_after_enrolment_carries_no_tcp_of_the_app() {
    let m = Mesh::new("iftun", &[("a", 10)]).expect("topology");
    m.enrol("a", PodOptions::default()).unwrap();
    let pod = m.host("a").name.clone();
    let tun = open_tun(&m.ns("a"), "tn0");
    ip_batch(
        &pod,
        "link set tn0 up\naddr add 10.251.0.1/24 dev tn0\naddr add fd00:251::1/64 dev tn0 nodad\n",
    );
    for v6 in FAMILIES {
        let far: IpAddr = if v6 {
            "fd00:251::2".parse().unwrap()
        } else {
            "10.251.0.2".parse().unwrap()
        };
        // At once (before the engine saw the device) and later (after it did).
        for round in 0..2 {
            let r = app_connect(
                &m.ns("a"),
                SocketAddr::new(far, REMOTE_PORT),
                Duration::from_millis(300),
            );
            assert!(r.is_err(), "{} round {round}: connected: {r:?}", fam(v6));
            let any: IpAddr = if v6 {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            let sock = m
                .ns("a")
                .run(|| std::net::UdpSocket::bind(SocketAddr::new(any, 0)))
                .unwrap()
                .unwrap();
            sock.send_to(b"udp passes", SocketAddr::new(far, 9999))
                .unwrap();
            std::thread::sleep(Duration::from_millis(100));
            let sent = tun_read(&tun);
            let tcp: Vec<_> = sent.iter().filter(|(p, _)| *p == 6).collect();
            assert!(
                tcp.is_empty(),
                "{} round {round}: TCP left through the tun device: {tcp:?}",
                fam(v6)
            );
            assert!(
                sent.iter().any(|(p, _)| *p == 17),
                "{} round {round}: UDP did not pass: {sent:?}",
                fam(v6)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let g = m.engine.guard_counters("a").unwrap();
    assert!(g.dropped_uncovered >= 4, "{g:?}");
    // Not attached: no filter of ours on it.
    assert!(!tc_out(&pod, &["filter", "show", "dev", "tn0", "egress"]).contains("0x539"));
}

/// Our return rule or route removed from inside a pod whose forwarding is on: a steered
/// SYN would be forwarded out to its destination. tc egress asks the pod's routing
/// first and drops it; the watcher puts the rule and route back, and connections go
/// through the proxy again.
#[test]
fn removing_our_rule_or_route_inside_the_pod_fails_closed() {
    let m = Mesh::new("ifrule", &[("a", 10), ("c", 100)]).expect("topology");
    m.enrol("a", PodOptions::default()).unwrap();
    let pod = m.host("a").name.clone();
    m.ns("a")
        .run(|| {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").unwrap();
        })
        .unwrap();
    let cases: [(&str, [&str; 2]); 2] = [
        (
            "rule",
            [
                "rule del fwmark 0x111/0xfff lookup 100",
                "-6 rule del fwmark 0x111/0xfff lookup 100",
            ],
        ),
        (
            "route",
            [
                "route del local 0.0.0.0/0 dev lo table 100",
                "-6 route del local ::/0 dev lo table 100",
            ],
        ),
    ];
    for (what, dels) in cases {
        for v6 in FAMILIES {
            let cap = Capture::start(&m.ns("c"), "eth0").unwrap();
            let to = m.addr("c", v6, APP_PORT);
            let stop = Arc::new(AtomicBool::new(false));
            // Connecting before, during and after the removal.
            let h = std::thread::spawn({
                let (ns, stop) = (m.ns("a"), stop.clone());
                move || {
                    let mut made = 0;
                    let end = Instant::now() + Duration::from_millis(1500);
                    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
                        if app_connect(&ns, to, Duration::from_millis(100)).is_ok() {
                            made += 1;
                        }
                    }
                    made
                }
            });
            std::thread::sleep(Duration::from_millis(50));
            let mut args = vec!["-n", pod.as_str()];
            args.extend(dels[v6 as usize].split(' '));
            run("ip", &args);
            let made = h.join().unwrap();
            let frames = cap.stop().unwrap();
            let leaked = app_syns(&frames);
            assert!(
                leaked.is_empty(),
                "{} {what} removed: SYNs of the app reached the peer unproxied: {leaked:?}",
                fam(v6)
            );
            assert!(made > 0, "{} {what}: no connection at all", fam(v6));
            // Put back by the watcher: the next connection goes through the proxy.
            let f = if v6 { "-6" } else { "-4" };
            let back = if what == "rule" {
                ip_out(&pod, &[f, "rule", "show"])
            } else {
                ip_out(&pod, &[f, "route", "show", "table", "100"])
            };
            let want = if what == "rule" { "0x111" } else { "local" };
            assert!(
                back.contains(want),
                "{} {what} not put back: {back}",
                fam(v6)
            );
            m.events();
            app_connect(&m.ns("a"), to, Duration::from_secs(2)).unwrap();
            assert!(proxy_took(&m, to), "{} after {what} put back", fam(v6));
        }
    }
}

/// Our tc filters removed from inside the pod (`tc filter del`, `tc qdisc del clsact`):
/// the watcher puts them back; until it has, a connection whose SYN left unsteered is
/// stopped at its next packet, so no connection of the app is ever made past the proxy
/// and none of its data leaves.
#[test]
fn removing_our_tc_filters_inside_the_pod_fails_closed() {
    let m = Mesh::new("iftc", &[("a", 10), ("c", 100)]).expect("topology");
    m.enrol("a", PodOptions::default()).unwrap();
    let pod = m.host("a").name.clone();
    let cases = [
        ("filter", "filter del dev eth0 egress"),
        ("clsact", "qdisc del dev eth0 clsact"),
    ];
    const NEEDLE: &[u8] = b"app-data-direct";
    for (what, del) in cases {
        for v6 in FAMILIES {
            let cap = Capture::start(&m.ns("c"), "eth0").unwrap();
            let to = m.addr("c", v6, APP_PORT);
            let stop = Arc::new(AtomicBool::new(false));
            let h = std::thread::spawn({
                let (ns, stop) = (m.ns("a"), stop.clone());
                move || {
                    let mut made = BTreeSet::new();
                    let end = Instant::now() + Duration::from_millis(1500);
                    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
                        if let Ok(mut s) = app_connect(&ns, to, Duration::from_millis(100)) {
                            made.insert(s.local_addr().unwrap());
                            let _ = s.write_all(NEEDLE);
                        }
                    }
                    made
                }
            });
            std::thread::sleep(Duration::from_millis(50));
            let args: Vec<&str> = ["-n", pod.as_str()]
                .into_iter()
                .chain(del.split(' '))
                .collect();
            run("tc", &args);
            let _made = h.join().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let frames = cap.stop().unwrap();
            // A SYN may leave before the filter is back; nothing after it does.
            let syns: BTreeSet<SocketAddr> = app_syns(&frames).iter().map(|t| t.src).collect();
            let after: Vec<TcpSeen> = tcp_seen(&frames)
                .into_iter()
                .filter(|t| syns.contains(&t.src) && t.flags & raw::SYN == 0)
                .collect();
            assert!(
                after.is_empty(),
                "{} {what} removed: a connection of the app went on past the proxy: {after:?}",
                fam(v6)
            );
            m.events();
            // Put back by the watcher.
            let shown = tc_out(&pod, &["filter", "show", "dev", "eth0", "egress"]);
            assert!(
                shown.contains("0x539"),
                "{} {what}: filter not put back: {shown}",
                fam(v6)
            );
            m.events();
            app_connect(&m.ns("a"), to, Duration::from_secs(2)).unwrap();
            assert!(proxy_took(&m, to), "{} after {what} put back", fam(v6));
        }
    }
}

/// After a restart of the engine the guard (pinned) still closes an interface added
/// meanwhile; once the pod is taken back with its namespace, the new engine's watcher
/// attaches to it.
#[test]
fn after_a_restart_the_guard_holds_and_the_watcher_comes_back() {
    let m = Mesh::new("ifrestart", &[("a", 10), ("c", 100)]).expect("topology");
    m.enrol("a", PodOptions::default()).unwrap();
    let pod = m.host("a").name.clone();
    let remote = m.host("c").name.clone();
    m.engine.close();
    let engine = Engine::open(EngineConfig::at(&m.pin_dir)).unwrap();
    assert!(!engine.pods()[0].netns_held);
    let tun = open_tun(&m.ns("a"), "tr0");
    run(
        "ip",
        &[
            "-n", &pod, "link", "add", "nr0", "type", "veth", "peer", "name", "pr0", "netns",
            &remote,
        ],
    );
    ip_batch(
        &pod,
        "link set tr0 up\naddr add 10.252.0.1/24 dev tr0\nlink set nr0 up\naddr add 10.253.0.1/24 dev nr0\n",
    );
    std::thread::sleep(Duration::from_millis(200));
    // No watcher for the pod yet: the new interfaces stay closed to its TCP.
    let r = app_connect(
        &m.ns("a"),
        "10.252.0.2:7777".parse().unwrap(),
        Duration::from_millis(300),
    );
    assert!(r.is_err(), "{r:?}");
    assert!(tun_read(&tun).iter().all(|(p, _)| *p != 6));
    assert_eq!(m.dump_map("covered").unwrap().len(), 1);
    // Taken back: the watcher is there again and attaches to the veth, never to the
    // tun.
    engine
        .enrol("a", &m.ns("a"), &PodOptions::default(), &Default::default())
        .unwrap();
    assert!(engine.pods()[0].netns_held);
    let shown = tc_out(&pod, &["filter", "show", "dev", "nr0", "egress"]);
    assert!(shown.contains("0x539"), "{shown}");
    assert_eq!(m.dump_map("covered").unwrap().len(), 2);
    let t = Instant::now();
    run(
        "ip",
        &[
            "-n", &pod, "link", "add", "nr1", "type", "veth", "peer", "name", "pr1", "netns",
            &remote,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while m.dump_map("covered").unwrap().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(m.dump_map("covered").unwrap().len(), 3);
    eprintln!(
        "interface added to covered (ip and bpftool included): {:?}",
        t.elapsed()
    );
    assert!(!tc_out(&pod, &["filter", "show", "dev", "tr0", "egress"]).contains("0x539"));
    engine.unenrol("a").unwrap();
    assert!(m.dump_map("covered").unwrap().is_empty());
}
