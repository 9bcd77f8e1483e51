//! `redirect-user demo`: the engine on this machine's kernel, end to end. Builds two
//! pods and an outside peer in namespaces, enrols the pods behind the bare relay, sends
//! real traffic in both address families, prints where each connection landed and the
//! pods' counters, un-enrols and removes everything. Then the mesh data path across
//! two simulated nodes ([`crate::demo_mesh`]).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use tokio::sync::mpsc;

use crate::{
    ebpf::{Engine, EngineConfig, PodOptions},
    netns::Netns,
    proxy::{
        PodListeners,
        relay::{AcceptEvent, Relay},
    },
    topology::Topology,
};

/// Removes a directory (a pin directory, a temporary one) when dropped, on failure
/// too, and on SIGINT or SIGTERM.
pub(crate) struct RemoveOnDrop(
    pub PathBuf,
    #[allow(dead_code, reason = "held: dropping it takes the entry out")]
    crate::interrupt::Registered,
);

impl RemoveOnDrop {
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let registered = crate::interrupt::path(&path);
        Self(path, registered)
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An echo server (one line back, prefixed with who answered) in a namespace.
pub fn echo_server(netns: &Netns, who: &str, addr: SocketAddr) -> Result<()> {
    let l = netns.run(|| TcpListener::bind(addr))??;
    let who = who.to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let who = who.clone();
            std::thread::spawn(move || {
                let peer = s.peer_addr().ok();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let _ = writeln!(
                        &s,
                        "{who} from {} got {}",
                        peer.map(|p| p.to_string()).unwrap_or_default(),
                        line.trim()
                    );
                    line.clear();
                }
            });
        }
    });
    Ok(())
}

/// Connects from inside `netns`, sends a line, returns the line that comes back.
pub fn ask(netns: &Netns, to: SocketAddr, line: &str) -> Result<String> {
    let mut s = netns.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))??;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    writeln!(s, "{line}")?;
    let mut out = String::new();
    BufReader::new(&mut s).read_line(&mut out)?;
    if out.is_empty() {
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest);
        out = rest;
    }
    Ok(out.trim().to_string())
}

pub async fn run() -> Result<()> {
    let pin_guard = RemoveOnDrop::new("/sys/fs/bpf/redirect-demo");
    let pin_dir = pin_guard.0.clone();
    println!(
        "== building the topology: pods a and b, outside peer c, on a bridge in a node namespace"
    );
    let mut topo = Topology::new("rdemo")?;
    topo.add_host("a", 10)?;
    topo.add_host("b", 11)?;
    topo.add_host("c", 100)?;
    let (a, b, c) = (topo.host("a"), topo.host("b"), topo.host("c"));
    let (na, nb, nc) = (a.netns()?, b.netns()?, c.netns()?);

    // Apps: b serves 8080, the outside peer serves 9090.
    for v6 in [false, true] {
        echo_server(&nb, "app-b", SocketAddr::new(b.addr(v6), 8080))?;
        echo_server(&nc, "peer-c", SocketAddr::new(c.addr(v6), 9090))?;
    }

    println!("== loading the engine (pinned under {})", pin_dir.display());
    let engine = Engine::open(EngineConfig::at(&pin_dir)).context("opening the engine")?;
    let (tx, mut rx) = mpsc::unbounded_channel::<AcceptEvent>();
    let mut relays = Vec::new();
    for (name, ns) in [("pod-a", &na), ("pod-b", &nb)] {
        let listeners = PodListeners::open(ns, false)?;
        let t = std::time::Instant::now();
        engine.enrol(name, ns, &PodOptions::default(), &listeners.sockets())?;
        println!("   enrolled {name} in {:?}", t.elapsed());
        relays.push(Relay::start(
            name,
            ns.try_clone()?,
            listeners,
            Some(tx.clone()),
        )?);
    }

    println!("== traffic");
    let mut failures = 0;
    for v6 in [false, true] {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let cases = [
            (
                "pod a -> pod b:8080 (outbound 15001, then inbound 15006)",
                &na,
                SocketAddr::new(b.addr(v6), 8080),
            ),
            (
                "pod a -> outside c:9090 (outbound 15001)",
                &na,
                SocketAddr::new(c.addr(v6), 9090),
            ),
            (
                "outside c -> pod b:8080 (inbound 15006)",
                &nc,
                SocketAddr::new(b.addr(v6), 8080),
            ),
            (
                "outside c -> pod b:15008 (inbound tunnel 15008)",
                &nc,
                SocketAddr::new(b.addr(v6), 15008),
            ),
        ];
        for (what, from, to) in cases {
            let t = std::time::Instant::now();
            match ask(from, to, "hello") {
                Ok(answer) => {
                    // Each proxy reports a connection before it connects onwards, so
                    // every event of this exchange is in before the answer.
                    let mut path = Vec::new();
                    while let Ok(ev) = rx.try_recv() {
                        path.push(format!("{}:{} (local {})", ev.pod, ev.listener, ev.local));
                    }
                    println!(
                        "   [{fam}] {what}\n        answer: {answer:?} in {:?}\n        via: {}",
                        t.elapsed(),
                        path.join(" -> ")
                    );
                    if path.is_empty() {
                        failures += 1;
                        println!("        ERROR: not redirected");
                    }
                }
                Err(e) => {
                    failures += 1;
                    println!("   [{fam}] {what}: FAILED: {e:#}");
                }
            }
        }
    }

    println!(
        "== counters (per pod, summed over CPUs; also: bpftool map dump pinned {}/maps/counters)",
        pin_dir.display()
    );
    for pod in engine.pods() {
        let c = engine.counters(&pod.uid)?;
        println!(
            "   {}: redirected 15001={} 15006={} 15008={}  bypassed loopback={} proxy={}  dropped no_listener={} spoofed={}",
            pod.uid,
            c.redirected_15001,
            c.redirected_15006,
            c.redirected_15008,
            c.bypassed_loopback,
            c.bypassed_proxy,
            c.dropped_no_listener,
            c.dropped_spoofed
        );
    }

    println!(
        "== fail closed: pod b's proxy stops; its connections are refused, never passed in plaintext"
    );
    let relay_b = relays.pop().unwrap();
    relay_b.stop().await;
    match ask(&nc, SocketAddr::new(b.addr(false), 8080), "hello") {
        Ok(a) if a.contains("app-b") => {
            failures += 1;
            println!("   ERROR: reached the app without the proxy: {a}");
        }
        Ok(a) => println!("   no answer from the app ({a:?})"),
        Err(e) => println!("   refused as expected: {e}"),
    }

    println!("== un-enrolling");
    for pod in engine.pods() {
        engine.unenrol(&pod.uid)?;
    }
    let direct = ask(&nc, SocketAddr::new(b.addr(false), 8080), "hello")?;
    println!("   outside c -> pod b:8080 goes direct again: {direct:?}");
    ensure!(
        direct.contains("app-b"),
        "traffic does not flow directly after un-enrolment"
    );
    for r in relays {
        r.stop().await;
    }
    drop(engine);
    drop(pin_guard);
    drop(topo);

    failures += crate::demo_mesh::run().await?;
    if failures > 0 {
        bail!("{failures} demo step(s) failed");
    }
    println!("== done: namespaces, pins and temporary files removed");
    Ok(())
}
