//! Short connections through every redirected path, as `wrk` with `Connection: close`
//! makes them: pod a's app -> pod b's app, one request per connection, many in parallel.
//! None may fail and none may wait out a SYN retransmission (1 s): a stall is a
//! behaviour, not a timing. Both close orders are made (the server first, as an HTTP
//! server answering `Connection: close`; the client first), since each leaves its
//! TIME_WAIT sockets in a different namespace.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use redirect_tests::*;
use redirect_user::proxy::{
    identity::{LocalCa, Tls},
    mesh::{DefaultTransport, Mesh as ProxyMesh},
    registry::Registry,
    relay::Relay,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The app of pod b that the load reaches (the fixture's echo apps use 8080 and 9090).
const SERVER_PORT: u16 = 7080;
const CONNECTIONS: usize = 8000;
const CONCURRENCY: usize = 32;
/// A connection that took this long waited out a SYN retransmission.
const STALL: Duration = Duration::from_secs(1);

/// One mode at a time: the load wants the 2 cores to itself, or every connection slows.
static SERIAL: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A multi-thread runtime of two workers (the proxies, the apps and the load each get
/// one, as separate processes would).
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Many short connections want the client side's ports back: as the bench sets it.
fn tune_for_load(ns: &Netns) -> Result<()> {
    ns.run(|| -> std::io::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "16000 65000")
    })??;
    Ok(())
}

/// Pod b's app: reads one line; answers `close` by answering and closing first (an HTTP
/// server told `Connection: close`), anything else by answering and waiting for the
/// client to close.
fn start_server(rt: &tokio::runtime::Runtime, ns: &Netns, addr: SocketAddr) -> Result<()> {
    let l = ns.run(|| std::net::TcpListener::bind(addr))??;
    l.set_nonblocking(true)?;
    let _g = rt.enter();
    let l = tokio::net::TcpListener::from_std(l)?;
    rt.spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let mut got = Vec::new();
                while !got.contains(&b'\n') {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if s.write_all(b"ok\n").await.is_err() {
                    return;
                }
                if got.starts_with(b"close") {
                    let _ = s.shutdown().await;
                }
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    Ok(())
}

/// What the load saw.
#[derive(Debug, Default)]
struct Outcome {
    done: usize,
    /// Connections that failed, with why.
    failed: Vec<String>,
    /// Connections slower than 100 ms: (duration, client port as the app saw it).
    slow: Vec<(Duration, u16)>,
    max: Duration,
}

/// One request on a new connection from pod a's app: its duration and local port.
async fn one(ns: &Netns, to: SocketAddr, server_closes: bool) -> Result<(Duration, u16)> {
    let t = Instant::now();
    let sock = ns
        .run(|| -> std::io::Result<socket2::Socket> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_nonblocking(true)?;
            s.set_tcp_nodelay(true)?;
            Ok(s)
        })
        .map_err(std::io::Error::other)??;
    let exchange = async {
        let mut s = tokio::net::TcpSocket::from_std_stream(sock.into())
            .connect(to)
            .await
            .context("connect")?;
        let port = s.local_addr()?.port();
        s.write_all(if server_closes { b"close\n" } else { b"keep\n" })
            .await
            .context("request")?;
        let mut answer = Vec::new();
        if server_closes {
            s.read_to_end(&mut answer).await.context("answer")?;
        } else {
            let mut buf = [0u8; 16];
            while !answer.ends_with(b"\n") {
                let n = s.read(&mut buf).await.context("answer")?;
                anyhow::ensure!(n > 0, "closed before the answer");
                answer.extend_from_slice(&buf[..n]);
            }
        }
        anyhow::ensure!(
            answer == b"ok\n",
            "answer {:?}",
            String::from_utf8_lossy(&answer)
        );
        Ok::<_, anyhow::Error>(port)
    };
    let port = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("no answer in 5 s")??;
    Ok((t.elapsed(), port))
}

/// `CONNECTIONS` requests from pod a to `to`, `CONCURRENCY` at a time; every other
/// connection is closed by the server first.
fn load(rt: &tokio::runtime::Runtime, ns: Arc<Netns>, to: SocketAddr) -> Outcome {
    let out = Arc::new(Mutex::new(Outcome::default()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..CONCURRENCY {
            let (ns, out, next) = (ns.clone(), out.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= CONNECTIONS {
                        return;
                    }
                    let r = one(&ns, to, i % 2 == 0).await;
                    let mut o = out.lock().unwrap();
                    match r {
                        Ok((d, port)) => {
                            o.done += 1;
                            o.max = o.max.max(d);
                            if d > Duration::from_millis(100) {
                                o.slow.push((d, port));
                            }
                        }
                        Err(e) => o.failed.push(format!("{e:#}")),
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    Arc::try_unwrap(out).unwrap().into_inner().unwrap()
}

fn check(mode: &str, o: &Outcome) {
    eprintln!(
        "{mode}: {} done, {} failed, {} slower than 100 ms, max {:?}; slow (duration, client port): {:?}",
        o.done,
        o.failed.len(),
        o.slow.len(),
        o.max,
        o.slow
    );
    assert!(
        o.failed.is_empty(),
        "{mode}: {} of {CONNECTIONS} connections failed: {:?}",
        o.failed.len(),
        &o.failed[..o.failed.len().min(5)]
    );
    let stalled: Vec<_> = o.slow.iter().filter(|(d, _)| *d >= STALL).collect();
    assert!(
        stalled.is_empty(),
        "{mode}: {} of {CONNECTIONS} connections waited out a SYN retransmission: {stalled:?}",
        stalled.len()
    );
}

/// A mesh proxy's shared side with certificates from `ca` and a registry of its own.
fn proxy_mesh(ca: &Arc<LocalCa>, transport: DefaultTransport) -> Arc<ProxyMesh> {
    ProxyMesh::new(
        Tls::new(ca.clone(), "cluster.local"),
        Arc::new(Registry::new()),
        transport,
    )
}

/// Pods a and b tuned for load, pod b's app started: ready for a mode to be set up.
struct Bed {
    m: Mesh,
    _apps: tokio::runtime::Runtime,
    load: tokio::runtime::Runtime,
    to: SocketAddr,
    _ca_dir: redirect_tests::process::RemoveDir,
    ca: Arc<LocalCa>,
}

impl Bed {
    fn new(tag: &str) -> Result<Self> {
        let m = Mesh::new(tag, &[("a", 10), ("b", 11)])?;
        for p in ["a", "b"] {
            tune_for_load(&m.ns(p))?;
        }
        let to = m.addr("b", false, SERVER_PORT);
        let apps = runtime()?;
        start_server(&apps, &m.ns("b"), to)?;
        let dir = std::env::temp_dir().join(format!("{}-ca", m.base()));
        std::fs::create_dir_all(&dir)?;
        let ca = Arc::new(LocalCa::open_or_create(&dir.join("ca"))?);
        Ok(Self {
            m,
            _apps: apps,
            load: runtime()?,
            to,
            _ca_dir: redirect_tests::process::RemoveDir::new(dir),
            ca,
        })
    }

    fn run(&self, mode: &str) -> Outcome {
        let o = load(&self.load, Arc::new(self.m.ns("a")), self.to);
        check(mode, &o);
        o
    }
}

#[test]
fn ebpf_bare_relay_short_connections_never_stall() -> Result<()> {
    let _l = lock();
    let bed = Bed::new("stl1")?;
    for p in ["a", "b"] {
        bed.m.enrol(p, PodOptions::default())?;
    }
    bed.run("ebpf");
    Ok(())
}

#[test]
fn ebpf_hbone_short_connections_never_stall() -> Result<()> {
    let _l = lock();
    let bed = Bed::new("stl2")?;
    let mesh = proxy_mesh(&bed.ca, DefaultTransport::Tcp);
    for p in ["a", "b"] {
        bed.m.enrol_mesh(p, PodOptions::default(), &mesh)?;
    }
    bed.run("ebpf+hbone");
    Ok(())
}

#[test]
fn ebpf_quic_short_connections_never_stall() -> Result<()> {
    let _l = lock();
    let bed = Bed::new("stl3")?;
    let mesh = proxy_mesh(&bed.ca, DefaultTransport::Quic);
    for p in ["a", "b"] {
        bed.m.enrol_mesh(p, PodOptions::default(), &mesh)?;
    }
    bed.run("ebpf+quic");
    Ok(())
}

/// Our proxy behind the in-pod netfilter rules: bare relay, then HBONE.
fn iptables(tag: &str, hbone: bool) -> Result<()> {
    let _l = lock();
    let bed = Bed::new(tag)?;
    let mesh = hbone.then(|| proxy_mesh(&bed.ca, DefaultTransport::Tcp));
    let v6 = netfilter::rules_v6();
    let mut relays = Vec::new();
    let result = (|| -> Result<()> {
        for p in ["a", "b"] {
            let ns = bed.m.ns(p);
            netfilter::enrol(&ns, &v6).with_context(|| format!("rules in pod {p}"))?;
            let l = PodListeners::open(&ns, false)?;
            let _g = bed.m.rt.enter();
            relays.push(match &mesh {
                None => Relay::start(p, ns, l, None)?,
                Some(mesh) => {
                    let pod = mesh.pod(bed.m.workload(p), bed.m.ns(p))?;
                    Relay::start_mesh(p, ns, l, None, pod)?
                }
            });
        }
        bed.run(if hbone { "iptables+hbone" } else { "iptables" });
        Ok(())
    })();
    for r in relays {
        bed.m.rt.block_on(r.stop());
    }
    result
}

#[test]
fn iptables_bare_relay_short_connections_never_stall() -> Result<()> {
    iptables("stl4", false)
}

#[test]
fn iptables_hbone_short_connections_never_stall() -> Result<()> {
    iptables("stl5", true)
}
