//! The parity table of inpod-rules.md, row by row, with real connections, IPv4 and IPv6.
//! Each test builds its own namespaces (pods `a`, `b`; outside peer `c`) and engine.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use redirect_ebpf::{PROBE_V4, PROBE_V6};
use redirect_tests::*;

const FAMILIES: [bool; 2] = [false, true];

fn fam(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

fn mesh(tag: &str) -> Mesh {
    Mesh::new(tag, &[("a", 10), ("b", 11), ("c", 100)]).expect("topology")
}

#[test]
fn row1_tunnel_port_goes_to_the_15008_listener() {
    let m = mesh("r1");
    m.enrol("b", PodOptions::default()).unwrap();
    for v6 in FAMILIES {
        let to = m.addr("b", v6, 15008);
        let answer = ask(&m.ns("c"), to).unwrap();
        assert_eq!(answer, format!("TUNNEL {to}"), "{}", fam(v6));
        let ev = m.events();
        assert_eq!(ev.len(), 1, "{}: {ev:?}", fam(v6));
        assert_eq!((ev[0].listener, ev[0].local), (15008, to), "{}", fam(v6));
    }
    assert_eq!(m.counters("b").redirected_15008, 2);
}

#[test]
fn row2_inbound_goes_to_15006_with_the_original_destination() {
    let m = mesh("r2");
    m.enrol("b", PodOptions::default()).unwrap();
    for v6 in FAMILIES {
        let to = m.addr("b", v6, APP_PORT);
        let answer = ask(&m.ns("c"), to).unwrap();
        // The app answered, and saw the real client address.
        let client = m.host("c").addr(v6);
        let client = SocketAddr::new(client, 0).to_string();
        let client_ip = client.rsplit_once(':').unwrap().0;
        assert!(
            answer.starts_with(&format!("b from {client_ip}:")),
            "{}: {answer}",
            fam(v6)
        );
        let ev = m.events();
        assert_eq!(ev.len(), 1, "{}: {ev:?}", fam(v6));
        assert_eq!((ev[0].listener, ev[0].local), (15006, to), "{}", fam(v6));
        assert_eq!(ev[0].peer.ip(), m.host("c").addr(v6));
    }
    assert_eq!(m.counters("b").redirected_15006, 2);
}

#[test]
fn row3_outbound_goes_to_15001_with_the_original_destination() {
    let m = mesh("r3");
    m.enrol("a", PodOptions::default()).unwrap();
    for v6 in FAMILIES {
        let to = m.addr("c", v6, PEER_PORT);
        let answer = ask(&m.ns("a"), to).unwrap();
        assert!(answer.starts_with("c from "), "{}: {answer}", fam(v6));
        let ev = m.events();
        assert_eq!(ev.len(), 1, "{}: {ev:?}", fam(v6));
        assert_eq!((ev[0].listener, ev[0].local), (15001, to), "{}", fam(v6));
        assert_eq!(ev[0].peer.ip(), m.host("a").addr(v6));
    }
    let c = m.counters("a");
    assert_eq!(c.redirected_15001, 2);
    // Row 6: the proxy's own upstream connections went out untouched.
    assert_eq!(c.bypassed_proxy, 2);
}

#[test]
fn pod_to_pod_goes_through_both_proxies() {
    let m = mesh("p2p");
    m.enrol("a", PodOptions::default()).unwrap();
    m.enrol("b", PodOptions::default()).unwrap();
    for v6 in FAMILIES {
        let to = m.addr("b", v6, APP_PORT);
        let answer = ask(&m.ns("a"), to).unwrap();
        assert!(answer.starts_with("b from "), "{}: {answer}", fam(v6));
        let mut ev: Vec<_> = m
            .events()
            .into_iter()
            .map(|e| (e.pod, e.listener, e.local))
            .collect();
        ev.sort();
        assert_eq!(
            ev,
            vec![("a".into(), 15001, to), ("b".into(), 15006, to)],
            "{}",
            fam(v6)
        );
    }
}

#[test]
fn row4_probes_are_not_redirected() {
    let m = mesh("r4");
    let (b, c) = (m.host("b").name.clone(), m.host("c").name.clone());
    let probe4 = IpAddr::from(PROBE_V4);
    let probe6 = IpAddr::from(PROBE_V6);
    // The "node" (peer c) owns the probe addresses; pod b routes them back to it.
    for (addr, plen, fam) in [(probe4, "32", "-4"), (probe6, "128", "-6")] {
        let a = format!("{addr}/{plen}");
        run(&[
            "ip", "-n", &c, fam, "addr", "add", &a, "dev", "eth0", "nodad",
        ]);
        let via = if addr.is_ipv6() {
            m.host("c").addr(true)
        } else {
            m.host("c").addr(false)
        };
        run(&[
            "ip",
            "-n",
            &b,
            fam,
            "route",
            "add",
            &a,
            "via",
            &via.to_string(),
        ]);
        echo_server(&m.ns("c"), "probe-target", SocketAddr::new(addr, PEER_PORT)).unwrap();
    }
    m.enrol("b", PodOptions::default()).unwrap();
    for (v6, probe) in [(false, probe4), (true, probe6)] {
        // Inbound from the probe source: the app answers, no listener of ours sees it.
        let answer = ask_from(&m.ns("c"), probe, m.addr("b", v6, APP_PORT)).unwrap();
        assert!(answer.starts_with("b from "), "{}: {answer}", fam(v6));
        assert!(answer.contains(&probe.to_string()), "{}: {answer}", fam(v6));
        // Outbound to the probe address: goes straight there.
        let answer = ask(&m.ns("b"), SocketAddr::new(probe, PEER_PORT)).unwrap();
        assert!(
            answer.starts_with("probe-target from "),
            "{}: {answer}",
            fam(v6)
        );
        assert_eq!(m.events(), vec![], "{}", fam(v6));
    }
    assert_eq!(m.counters("b").bypassed_probe, 4);
}

#[test]
fn row5_loopback_is_not_redirected() {
    let m = mesh("r5");
    let b = m.ns("b");
    for v6 in FAMILIES {
        let lo: IpAddr = if v6 {
            "::1".parse().unwrap()
        } else {
            "127.0.0.1".parse().unwrap()
        };
        echo_server(&b, "b-lo", SocketAddr::new(lo, APP_PORT)).unwrap();
    }
    m.enrol("b", PodOptions::default()).unwrap();
    for v6 in FAMILIES {
        let lo: IpAddr = if v6 {
            "::1".parse().unwrap()
        } else {
            "127.0.0.1".parse().unwrap()
        };
        let answer = ask(&b, SocketAddr::new(lo, APP_PORT)).unwrap();
        assert!(answer.starts_with("b-lo from "), "{}: {answer}", fam(v6));
        // The pod talking to its own address goes over lo too.
        let answer = ask(&b, m.addr("b", v6, APP_PORT)).unwrap();
        assert!(answer.starts_with("b from "), "{}: {answer}", fam(v6));
        assert_eq!(m.events(), vec![], "{}", fam(v6));
    }
    assert_eq!(m.counters("b").bypassed_loopback, 2);
}

#[test]
fn row6_proxy_sockets_are_not_redirected() {
    // The proxy runs in this process, so a socket marked 0x539 from here is the proxy's.
    let m = mesh("r6");
    m.enrol("a", PodOptions::default()).unwrap();
    let ns_path = m.host("a").path();
    for v6 in FAMILIES {
        let args = redirect_user::probe::ProbeArgs {
            netns: ns_path.clone(),
            mark: Some(0x539),
            source: None,
            timeout: 3,
            send: "hello".into(),
            addr: m.addr("c", v6, PEER_PORT),
        };
        let answer = redirect_user::probe::exchange(&args).unwrap();
        assert!(answer.starts_with("c from "), "{}: {answer}", fam(v6));
        assert_eq!(m.events(), vec![], "{}", fam(v6));
    }
    assert_eq!(m.counters("a").bypassed_proxy, 2);
}

#[test]
fn row7_a_forged_mark_is_still_redirected() {
    let m = mesh("r7");
    m.enrol("a", PodOptions::default()).unwrap();
    let app = AppCgroup::new("r7").unwrap();
    let ns_path = m.host("a").path();
    for v6 in FAMILIES {
        let to = m.addr("c", v6, PEER_PORT).to_string();
        // An app of the pod (another cgroup) holding CAP_NET_ADMIN marks its socket 0x539.
        let answer = app
            .probe(&["--netns", &ns_path, "--mark", "0x539", &to])
            .unwrap();
        assert!(answer.starts_with("c from "), "{}: {answer}", fam(v6));
        let ev = m.events();
        assert_eq!(ev.len(), 1, "{}: {ev:?}", fam(v6));
        assert_eq!(
            (ev[0].listener, ev[0].local.to_string()),
            (15001, to),
            "{}",
            fam(v6)
        );
    }
    let c = m.counters("a");
    assert_eq!(c.redirected_15001, 2);
}

#[test]
fn row8_dns_capture_steers_port_53_and_the_proxy_queries_pass() {
    let m = mesh("r8");
    let (a, c) = (m.ns("a"), m.ns("c"));
    for v6 in FAMILIES {
        udp_echo(&c, "dns-c", m.addr("c", v6, 53)).unwrap();
        echo_server(&c, "dns-tcp-c", m.addr("c", v6, 53)).unwrap();
    }
    m.enrol(
        "a",
        PodOptions {
            dns_capture: true,
            ..Default::default()
        },
    )
    .unwrap();
    for v6 in FAMILIES {
        let to = m.addr("c", v6, 53);
        let (answer, from) = udp_ask(&a, to, "query").unwrap();
        // The proxy forwarded the query (its own query passed) and answered from the
        // address the app asked.
        assert_eq!(answer, "dns-c:query", "{}", fam(v6));
        assert_eq!(from, to, "{}", fam(v6));
        let answer = ask(&a, to).unwrap();
        assert!(
            answer.starts_with("dns-tcp-c from "),
            "{}: {answer}",
            fam(v6)
        );
        let mut ev: Vec<_> = m
            .events()
            .into_iter()
            .map(|e| (e.listener, e.udp, e.local))
            .collect();
        ev.sort();
        assert_eq!(
            ev,
            vec![(15053, false, to), (15053, true, to)],
            "{}",
            fam(v6)
        );
    }
    let c = m.counters("a");
    assert_eq!(c.redirected_15053, 4);
}

#[test]
fn row8_without_dns_capture_dns_is_plain_traffic() {
    let m = mesh("r8n");
    let (a, c) = (m.ns("a"), m.ns("c"));
    for v6 in FAMILIES {
        udp_echo(&c, "dns-c", m.addr("c", v6, 53)).unwrap();
    }
    m.enrol("a", PodOptions::default()).unwrap();
    for v6 in FAMILIES {
        let (answer, _) = udp_ask(&a, m.addr("c", v6, 53), "query").unwrap();
        assert_eq!(answer, "dns-c:query");
        assert_eq!(m.events(), vec![], "{}", fam(v6));
    }
}

#[test]
fn row9_other_udp_and_icmp_are_untouched() {
    let m = mesh("r9");
    let (a, c) = (m.ns("a"), m.ns("c"));
    for v6 in FAMILIES {
        udp_echo(&c, "udp-c", m.addr("c", v6, 5000)).unwrap();
    }
    m.enrol(
        "a",
        PodOptions {
            dns_capture: true,
            ..Default::default()
        },
    )
    .unwrap();
    for v6 in FAMILIES {
        let (answer, from) = udp_ask(&a, m.addr("c", v6, 5000), "x").unwrap();
        assert_eq!((answer.as_str(), from), ("udp-c:x", m.addr("c", v6, 5000)));
        let target = m.host("c").addr(v6).to_string();
        let ping = Command::new("ip")
            .args([
                "netns",
                "exec",
                &m.host("a").name,
                "ping",
                "-c1",
                "-W2",
                &target,
            ])
            .output()
            .expect("ping (iputils-ping, installed by cargo xtask setup)");
        assert!(
            ping.status.success(),
            "{}: ping from the enrolled pod failed: {ping:?}",
            fam(v6)
        );
        assert_eq!(m.events(), vec![], "{}", fam(v6));
    }
}

#[test]
fn row10_connections_open_before_enrolment_keep_working() {
    let m = mesh("r10");
    let (a, b, c) = (m.ns("a"), m.ns("b"), m.ns("c"));
    let mut conns = Vec::new();
    for v6 in FAMILIES {
        // Outbound from pod a, inbound to pod b.
        let out = a
            .run(|| TcpStream::connect(m.addr("c", v6, PEER_PORT)))
            .unwrap()
            .unwrap();
        let inb = c
            .run(|| TcpStream::connect(m.addr("b", v6, APP_PORT)))
            .unwrap()
            .unwrap();
        conns.push((format!("{} outbound", fam(v6)), BufReader::new(out)));
        conns.push((format!("{} inbound", fam(v6)), BufReader::new(inb)));
    }
    let exchange = |s: &mut BufReader<TcpStream>, line: &str| -> String {
        s.get_mut()
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        writeln!(s.get_mut(), "{line}").unwrap();
        let mut got = String::new();
        let _ = s.read_line(&mut got);
        got
    };
    for (what, s) in &mut conns {
        assert!(exchange(s, "before").contains("got before"), "{what}");
    }
    let _ = &b;
    m.enrol("a", PodOptions::default()).unwrap();
    m.enrol("b", PodOptions::default()).unwrap();
    for (what, s) in &mut conns {
        let got = exchange(s, "after");
        assert!(got.contains("got after"), "{what}: {got:?}");
    }
    assert_eq!(m.events(), vec![]);
}

/// Row 10 across enrolments: an app socket whose SYN was steered in an earlier
/// enrolment and lost there (the proxy's accept queue full) connects direct once the
/// pod is released, its SYN retransmitted then. Enrolled again, its connection counts
/// as open before this enrolment and keeps working. A decision kept from the earlier
/// enrolment bounced its packets into the pod, where they were reset, and the peer was
/// left holding a half-open connection (what the soak found at the steady pod's 15006).
#[test]
fn row10_a_decision_of_an_earlier_enrolment_does_not_carry_over() {
    let m = mesh("r10e");
    let a = m.ns("a");
    // Enrolled with listeners nobody accepts on, 15001's queue one connection long.
    let listeners = PodListeners::open(&a, false).unwrap();
    m.engine
        .enrol("a", &a, &PodOptions::default(), &listeners.sockets())
        .unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listeners.outbound);
    assert_eq!(unsafe { libc::listen(fd, 0) }, 0);
    // Fills the queue (taken by 15001, both families' listener, never accepted).
    let held = a
        .run(|| TcpStream::connect(m.addr("c", false, PEER_PORT)))
        .unwrap()
        .unwrap();
    // Steered too; their SYNs find the queue full and are dropped without an answer.
    let pending: Vec<_> = FAMILIES
        .into_iter()
        .map(|v6| {
            let to = m.addr("c", v6, PEER_PORT);
            let a = a.try_clone().unwrap();
            std::thread::spawn(move || a.run(|| TcpStream::connect(to)).unwrap())
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Released: the retransmitted SYNs go direct.
    assert!(m.engine.unenrol("a").unwrap());
    drop(listeners);
    drop(held);
    let mut conns: Vec<BufReader<TcpStream>> = pending
        .into_iter()
        .map(|h| BufReader::new(h.join().unwrap().expect("connected once released")))
        .collect();
    let exchange = |s: &mut BufReader<TcpStream>, line: &str| -> String {
        s.get_mut()
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let _ = writeln!(s.get_mut(), "{line}");
        let mut got = String::new();
        let _ = s.read_line(&mut got);
        got
    };
    for (v6, s) in FAMILIES.into_iter().zip(&mut conns) {
        assert!(exchange(s, "before").contains("got before"), "{}", fam(v6));
    }
    m.enrol("a", PodOptions::default()).unwrap();
    for (v6, s) in FAMILIES.into_iter().zip(&mut conns) {
        let got = exchange(s, "after");
        assert!(got.contains("got after"), "{}: {got:?}", fam(v6));
    }
    assert_eq!(m.events(), vec![]);
}

#[test]
fn row11_missing_listener_fails_closed() {
    let m = mesh("r11");
    m.enrol("a", PodOptions::default()).unwrap();
    m.enrol("b", PodOptions::default()).unwrap();
    m.stop_proxy("a");
    m.stop_proxy("b");
    for v6 in FAMILIES {
        // Inbound: never reaches the app in plaintext.
        let r = ask(&m.ns("c"), m.addr("b", v6, APP_PORT));
        assert!(r.is_err(), "{}: inbound passed: {r:?}", fam(v6));
        // Outbound: never leaves unproxied.
        let r = ask(&m.ns("a"), m.addr("c", v6, PEER_PORT));
        assert!(r.is_err(), "{}: outbound passed: {r:?}", fam(v6));
    }
    assert!(m.counters("a").dropped_no_listener >= 2);
    assert!(m.counters("b").dropped_no_listener >= 2);
    // A proxy that comes back takes over again.
    m.enrol("b", PodOptions::default()).unwrap();
    assert!(
        ask(&m.ns("c"), m.addr("b", false, APP_PORT))
            .unwrap()
            .starts_with("b from ")
    );
}

#[test]
fn row12_unenrolment_leaves_nothing() {
    let m = mesh("r12");
    let ns = m.host("a").name.clone();
    let before_rules = ip_out(&ns, &["rule"]);
    let before_rules6 = ip_out(&ns, &["-6", "rule"]);
    let before_accept =
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/accept_local").unwrap();
    m.enrol("a", PodOptions::default()).unwrap();
    assert!(ip_out(&ns, &["rule"]).contains("fwmark 0x111/0xfff lookup 100"));
    assert!(ip_out(&ns, &["-6", "rule"]).contains("fwmark 0x111/0xfff lookup 100"));
    assert!(tc_out(&ns, &["filter", "show", "dev", "eth0", "egress"]).contains("redirect_egress"));
    assert!(m.pin_dir.join("links/a").exists());
    assert!(ask(&m.ns("a"), m.addr("c", false, PEER_PORT)).is_ok());
    assert_eq!(m.events().len(), 1);

    assert!(m.unenrol("a").unwrap());
    assert_eq!(ip_out(&ns, &["rule"]), before_rules);
    assert_eq!(ip_out(&ns, &["-6", "rule"]), before_rules6);
    assert_eq!(ip_out(&ns, &["route", "show", "table", "100"]), "");
    assert_eq!(ip_out(&ns, &["-6", "route", "show", "table", "100"]), "");
    for dev in ["eth0", "lo"] {
        assert!(
            !tc_out(&ns, &["qdisc", "show", "dev", dev]).contains("clsact"),
            "{dev}"
        );
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/accept_local").unwrap(),
        before_accept
    );
    let accept = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "cat",
            "/proc/sys/net/ipv4/conf/eth0/accept_local",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&accept.stdout).trim(), "0");
    assert!(!m.pin_dir.join("links/a").exists());
    // Not `flows`: its notes are hints that age out, inert without the pod's addresses.
    for map in ["pods", "pod_addrs", "listeners", "pod_index"] {
        assert_eq!(
            m.dump_map(map).unwrap(),
            Vec::<serde_json::Value>::new(),
            "{map}"
        );
    }
    // No sk_lookup link is left on the namespace.
    let links = bpftool_json(&["link", "show"]).unwrap();
    let ino = m.ns("a").ino();
    let left: Vec<_> = links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["netns_ino"].as_u64() == Some(ino))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Traffic flows as if never enrolled.
    for v6 in FAMILIES {
        assert!(
            ask(&m.ns("a"), m.addr("c", v6, PEER_PORT))
                .unwrap()
                .starts_with("c from ")
        );
        assert!(
            ask(&m.ns("c"), m.addr("a", v6, APP_PORT))
                .unwrap()
                .starts_with("a from ")
        );
    }
    assert_eq!(m.events(), vec![]);
}

#[test]
fn outside_packets_with_the_pods_own_source_are_dropped() {
    let m = mesh("spoof");
    m.enrol("b", PodOptions::default()).unwrap();
    for v6 in FAMILIES {
        // Peer c forges pod b's own address as source (a transparent bind lets it).
        let r = ask_from_transparent(&m.ns("c"), m.host("b").addr(v6), m.addr("b", v6, APP_PORT));
        assert!(
            r.is_err(),
            "{}: forged packet reached pod b: {r:?}",
            fam(v6)
        );
    }
    assert!(
        m.counters("b").dropped_spoofed >= 2,
        "{:?}",
        m.counters("b")
    );
    assert_eq!(m.events(), vec![]);
}

fn ask_from_transparent(ns: &Netns, source: IpAddr, to: SocketAddr) -> anyhow::Result<String> {
    use socket2::{Domain, Socket, Type};
    let s = ns.run(|| -> std::io::Result<Socket> {
        let s = Socket::new(
            if to.is_ipv6() {
                Domain::IPV6
            } else {
                Domain::IPV4
            },
            Type::STREAM,
            None,
        )?;
        if to.is_ipv6() {
            s.set_ip_transparent_v6(true)?;
        } else {
            s.set_ip_transparent_v4(true)?;
        }
        s.bind(&SocketAddr::new(source, 0).into())?;
        s.connect_timeout(&to.into(), Duration::from_millis(1500))?;
        Ok(s)
    })??;
    let mut s: TcpStream = s.into();
    writeln!(s, "hello")?;
    let mut out = String::new();
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn twenty_megabytes_each_way_arrive_intact_through_both_proxies() {
    let m = mesh("bulk");
    const BYTES: usize = 20 * 1024 * 1024;
    for v6 in FAMILIES {
        bulk_server(&m.ns("b"), m.addr("b", v6, 7000), BYTES).unwrap();
    }
    m.enrol("a", PodOptions::default()).unwrap();
    m.enrol("b", PodOptions::default()).unwrap();
    for v6 in FAMILIES {
        bulk_exchange(&m.ns("a"), m.addr("b", v6, 7000), BYTES).unwrap();
        let mut ev: Vec<_> = m
            .events()
            .into_iter()
            .map(|e| (e.pod, e.listener))
            .collect();
        ev.sort();
        assert_eq!(
            ev,
            vec![("a".into(), 15001), ("b".into(), 15006)],
            "{}",
            fam(v6)
        );
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn row3_ipv6_extension_headers_do_not_escape() {
    let m = mesh("r3x");
    m.enrol("a", PodOptions::default()).unwrap();
    let to = m.addr("c", true, PEER_PORT);
    // An app socket whose every packet carries a destination-options header
    // (PadN, 8 bytes) before TCP.
    let s = m
        .ns("a")
        .run(|| -> std::io::Result<TcpStream> {
            use std::os::fd::AsRawFd;
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            let opts: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
            // SAFETY: a valid option buffer.
            let r = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_DSTOPTS,
                    opts.as_ptr().cast(),
                    8,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            s.connect_timeout(&to.into(), Duration::from_secs(3))?;
            Ok(s.into())
        })
        .unwrap()
        .unwrap();
    let mut s = BufReader::new(s);
    writeln!(s.get_mut(), "hello").unwrap();
    let mut answer = String::new();
    s.get_mut()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    s.read_line(&mut answer).unwrap();
    assert!(answer.starts_with("c from "), "{answer}");
    let ev = m.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!((ev[0].listener, ev[0].local), (15001, to));
}
