//! What a removed pod leaves behind: nothing. A pod's proxy removed with live
//! connections closes them (after a grace period, then by cancelling them), and no task,
//! socket or fd of its namespace stays in this process; the HBONE pool forgets the
//! pod's tunnels; DNS handling per pod is bounded.
//!
//! The checks count what this process holds (its fds in /proc/self/fd: sockets, those
//! of them in the pod's namespace, the namespace itself; tasks of the runtime), so the
//! tests here run one at a time.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redirect_tests::*;
use redirect_user::proxy::{
    identity::{DEFAULT_TRUST_DOMAIN, LocalCa, Tls},
    mesh::{DefaultTransport, Mesh as MeshProxy},
    registry::Registry,
    relay::{DNS_IN_FLIGHT, Relay},
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// What this process holds of one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    /// Socket fds of the process, wherever they are.
    socket_fds: usize,
    /// Fds of the pod's namespace itself, however opened.
    netns_fds: usize,
    /// Socket fds of this process inside the pod's namespace.
    sockets: usize,
    /// Tasks alive in the runtime.
    tasks: usize,
}

/// `ioctl(socket, SIOCGSKNS)`: an fd of the socket's network namespace.
const SIOCGSKNS: libc::c_ulong = 0x894c;

fn held(m: &Mesh, pod: &str) -> Held {
    use std::os::{
        fd::{FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    };
    let (dev, ino) = {
        let ns = m.ns(pod);
        (ns.dev(), ns.ino())
    };
    let (mut socket_fds, mut netns_fds, mut sockets) = (0, 0, 0);
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")) {
            socket_fds += 1;
            // SAFETY: SIOCGSKNS takes no argument; a closed fd just fails.
            let ns = unsafe { libc::ioctl(fd, SIOCGSKNS as _) };
            if ns >= 0 {
                // SAFETY: a new fd the ioctl returned, owned here.
                let ns = unsafe { OwnedFd::from_raw_fd(ns) };
                if nix::sys::stat::fstat(&ns).is_ok_and(|st| (st.st_dev, st.st_ino) == (dev, ino)) {
                    sockets += 1;
                }
            }
        } else if std::fs::metadata(e.path()).is_ok_and(|md| (md.dev(), md.ino()) == (dev, ino)) {
            netns_fds += 1;
        }
    }
    Held {
        socket_fds,
        netns_fds,
        sockets,
        tasks: m.rt.metrics().num_alive_tasks(),
    }
}

/// Waits up to 5 s for what the process holds of `pod` to be `want` again.
fn wait_held(m: &Mesh, pod: &str, want: Held) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = held(m, pod);
        if now == want {
            return;
        }
        if Instant::now() > deadline {
            let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .collect();
            panic!(
                "pod {pod} removed, the process still holds {now:?}, before it held {want:?}; \
                 fds: {fds:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A connection of pod `from`'s app to `to`, one line exchanged, left open.
fn open_conn(ns: &Netns, to: SocketAddr) -> TcpStream {
    let mut s = ns
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    writeln!(s, "hi").unwrap();
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains(" got hi"), "{line:?}");
    s
}

/// The connection was closed by the proxy: end of file or reset, not a timeout.
fn assert_closed(mut s: TcpStream) {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{n} more bytes on a connection of a removed pod"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the connection of a removed pod is still open: {e}"
        ),
    }
}

/// Pod `a` enrolled with the bare relay, which the test owns.
fn enrol_bare(m: &Mesh, pod: &str, dns: bool) -> Relay {
    let ns = m.ns(pod);
    let options = PodOptions {
        dns_capture: dns,
        ..Default::default()
    };
    let listeners = PodListeners::open(&ns, dns).unwrap();
    m.engine
        .enrol(pod, &ns, &options, &listeners.sockets())
        .unwrap();
    let _rt = m.rt.enter();
    Relay::start(pod, ns, listeners, None).unwrap()
}

#[test]
fn a_stopped_pod_proxy_leaves_no_connection_task_socket_or_namespace_fd() {
    let _one = serial();
    let m = Mesh::new("drs", &[("a", 1), ("b", 2)]).unwrap();
    let ns_a = m.ns("a");
    let before = held(&m, "a");
    let relay = enrol_bare(&m, "a", false);
    let conns: Vec<TcpStream> = (0..4)
        .map(|i| open_conn(&ns_a, m.addr("b", i % 2 == 1, APP_PORT)))
        .collect();
    let during = held(&m, "a");
    assert!(
        during.sockets >= before.sockets + 3 + 2 * conns.len(),
        "listeners and both ends of each relayed connection: {during:?} vs {before:?}"
    );
    m.rt.block_on(relay.stop());
    for c in conns {
        assert_closed(c);
    }
    // The engine holds the namespace of an enrolled pod: un-enrolled, nothing is left.
    m.engine.unenrol("a").unwrap();
    wait_held(&m, "a", before);
}

#[test]
fn a_removed_pod_gets_a_grace_period_then_its_connections_are_cancelled() {
    let _one = serial();
    let m = Mesh::new("drg", &[("a", 1), ("b", 2)]).unwrap();
    let ns_a = m.ns("a");
    let before = held(&m, "a");
    let relay = enrol_bare(&m, "a", false);
    let quick = open_conn(&ns_a, m.addr("b", false, APP_PORT));
    let idle = open_conn(&ns_a, m.addr("b", true, APP_PORT));
    assert_eq!(relay.connections(), 2);
    // One connection ends by itself within the grace period, the other stays idle.
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(quick);
    });
    let grace = Duration::from_millis(1500);
    let started = Instant::now();
    let drained = m.rt.block_on(relay.drain(grace));
    let took = started.elapsed();
    closer.join().unwrap();
    assert_eq!((drained.finished, drained.cancelled), (1, 1), "{drained:?}");
    assert!(
        took >= grace && took < grace + Duration::from_secs(2),
        "drain took {took:?} for a grace of {grace:?}"
    );
    assert_closed(idle);
    // The engine holds the namespace of an enrolled pod: un-enrolled, nothing is left.
    m.engine.unenrol("a").unwrap();
    wait_held(&m, "a", before);
}

#[test]
fn a_removed_mesh_pod_closes_its_tunnels_and_leaves_the_pool() {
    let _one = serial();
    let m = Mesh::new("drm", &[("a", 1), ("b", 2)]).unwrap();
    let ca_dir = std::env::temp_dir().join(format!("{}-ca", m.base()));
    let _rm = process::RemoveDir::new(ca_dir.clone());
    let ca = Arc::new(LocalCa::open_or_create(&ca_dir).unwrap());
    let proxy = MeshProxy::new(
        Tls::new(ca, DEFAULT_TRUST_DOMAIN),
        Arc::new(Registry::new()),
        DefaultTransport::Tcp,
    );
    let ns_a = m.ns("a");
    let (before_a, before_b) = (held(&m, "a"), held(&m, "b"));
    let mut relays = Vec::new();
    for pod in ["a", "b"] {
        let ns = m.ns(pod);
        let listeners = PodListeners::open(&ns, false).unwrap();
        m.engine
            .enrol(pod, &ns, &PodOptions::default(), &listeners.sockets())
            .unwrap();
        let _rt = m.rt.enter();
        let pm = proxy.pod(m.workload(pod), ns.try_clone().unwrap()).unwrap();
        relays.push(Relay::start_mesh(pod, ns, listeners, None, pm).unwrap());
    }
    let relay_b = relays.pop().unwrap();
    let relay_a = relays.pop().unwrap();
    let conns: Vec<TcpStream> = (0..3)
        .map(|_| open_conn(&ns_a, m.addr("b", false, APP_PORT)))
        .collect();
    // a -> b over HBONE: one pooled connection from a's namespace carries the three.
    assert_eq!(proxy.pool.keys(), 1);
    assert_eq!(proxy.pool.connections(), 1);
    assert_eq!(relay_a.connections(), 3);

    let drained = m.rt.block_on(relay_a.drain(Duration::from_millis(200)));
    assert_eq!(drained.cancelled, 3, "{drained:?}");
    for c in conns {
        assert_closed(c);
    }
    // The pod's tunnel is closed and its key gone; b's side of it ends too.
    assert_eq!(proxy.pool.keys(), 0);
    assert_eq!(proxy.pool.connections(), 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay_b.connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(relay_b.connections(), 0, "b still serves a's closed tunnel");
    proxy.forget("a");
    // Nothing of a is left in a's namespace (b, still served, holds fds and tasks).
    m.engine.unenrol("a").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let of_a = |h: Held| (h.sockets, h.netns_fds);
    while of_a(held(&m, "a")) != of_a(before_a) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        of_a(held(&m, "a")),
        of_a(before_a),
        "sockets, namespace fds of a"
    );
    m.rt.block_on(relay_b.stop());
    proxy.forget("b");
    m.engine.unenrol("b").unwrap();
    wait_held(&m, "b", before_b);
    assert_eq!(held(&m, "a"), before_a);
}

#[test]
fn dns_queries_in_flight_per_pod_are_bounded_and_the_excess_counted() {
    let _one = serial();
    let m = Mesh::new("drd", &[("a", 1), ("b", 2)]).unwrap();
    let ns_a = m.ns("a");
    let ns_b = m.ns("b");
    // A DNS server that never answers on b's IPv4 address; an answering one on IPv6.
    let hole = ns_b
        .run(|| UdpSocket::bind(m.addr("b", false, 53)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while hole.recv_from(&mut buf).is_ok() {}
    });
    udp_echo(&ns_b, "b", m.addr("b", true, 53)).unwrap();
    let relay = enrol_bare(&m, "a", true);
    let app = ns_a.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    const SENT: usize = 200;
    for i in 0..SENT {
        app.send_to(format!("query {i}").as_bytes(), m.addr("b", false, 53))
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let want = (SENT - DNS_IN_FLIGHT) as u64;
    while relay.dns_dropped() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(relay.dns_dropped(), want, "dropped beyond the bound");
    assert_eq!(relay.connections(), DNS_IN_FLIGHT, "queries in flight");
    // Unanswered queries time out (5 s) and free their places: DNS works again.
    let deadline = Instant::now() + Duration::from_secs(8);
    while relay.connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(relay.connections(), 0);
    let (answer, from) = udp_ask(&ns_a, m.addr("b", true, 53), "again").unwrap();
    assert_eq!((answer.as_str(), from), ("b:again", m.addr("b", true, 53)));
    m.rt.block_on(relay.stop());
}

#[test]
fn a_pod_deleted_over_the_node_agent_protocol_drains_within_its_grace_period() {
    use redirect_user::zds::{
        codec::{self, Request},
        proto::WorkloadInfo,
        proxy::{InpodProxy, ProxyConfig},
        wire,
    };
    use std::os::fd::AsFd;
    use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

    async fn call(s: &UnixSeqpacket, msg: &[u8], fd: Option<std::os::fd::BorrowedFd<'_>>) {
        wire::send(s, msg, fd).await.unwrap();
        let dg = tokio::time::timeout(Duration::from_secs(5), wire::recv(s))
            .await
            .expect("an answer")
            .unwrap()
            .expect("an answer");
        assert_eq!(codec::decode_response(&dg.bytes).unwrap(), Ok(()));
    }

    let _one = serial();
    let m = Mesh::new("drz", &[("a", 1), ("b", 2)]).unwrap();
    let ns_a = m.ns("a");
    let sock = std::env::temp_dir().join(format!("{}-zds.sock", m.base()));
    let _ = std::fs::remove_file(&sock);
    let before = held(&m, "a");
    let grace = Duration::from_millis(1500);
    let (agent, proxy) = m.rt.block_on(async {
        let mut listener = UnixSeqpacketListener::bind(&sock).unwrap();
        let cfg = ProxyConfig {
            socket: sock.clone(),
            dns: false,
            events: None,
            mesh: None,
        };
        let proxy = tokio::spawn(InpodProxy::new(cfg).with_grace(grace).run());
        let s = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let hello = wire::recv(&s).await.unwrap().unwrap();
        codec::decode_hello(&hello.bytes).unwrap();
        let add = Request::Add {
            uid: "a".into(),
            info: WorkloadInfo {
                name: "a".into(),
                namespace: "default".into(),
                service_account: "sa".into(),
            },
        };
        call(&s, &add.encode(), Some(ns_a.as_fd())).await;
        call(&s, &Request::SnapshotSent.encode(), None).await;
        (s, proxy)
    });
    // Enrolled as the agent does it: with the listeners found in the proxy.
    let found =
        redirect_user::agent::discover::find_listeners(std::process::id() as i32, &ns_a).unwrap();
    m.engine
        .enrol("a", &ns_a, &PodOptions::default(), &found.sockets())
        .unwrap();
    drop(found);
    let mut conn = open_conn(&ns_a, m.addr("b", false, APP_PORT));

    let asked = Instant::now();
    m.rt.block_on(call(
        &agent,
        &Request::Del { uid: "a".into() }.encode(),
        None,
    ));
    assert!(
        asked.elapsed() < grace / 2,
        "the delete is answered at once, the drain goes on behind it"
    );
    // Within the grace period the connection still carries bytes...
    writeln!(conn, "still").unwrap();
    let mut line = String::new();
    BufReader::new(conn.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains(" got still"), "{line:?}");
    // ...then it is cancelled, and nothing of the pod is left in the process.
    assert_closed(conn);
    assert!(
        asked.elapsed() >= grace,
        "closed before the grace period ended"
    );
    m.engine.unenrol("a").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let of_a = |h: Held| (h.sockets, h.netns_fds);
    while of_a(held(&m, "a")) != of_a(before) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        of_a(held(&m, "a")),
        of_a(before),
        "sockets, namespace fds of a"
    );
    proxy.abort();
    drop(agent);
    let _ = std::fs::remove_file(&sock);
}
