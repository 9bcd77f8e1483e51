//! Traffic held through a fault, and the proof that nothing escaped: a loop of new
//! connections that records every connection's outcome, and a capture of a pod's wire
//! (its veth's peer, in the node's namespace) that finds what the pod's app sent out past
//! its proxy.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{
    Netns, Topology,
    capture::{Capture, Packet, Proto},
};

/// The line every connection of a loop sends: found on a pod's wire, it is the app's
/// plaintext there.
pub const MARKER: &str = "plaintext-marker-5c1e7d";

/// One connection of a loop.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub at: Instant,
    pub ok: bool,
    pub error: Option<String>,
}

/// A loop of new connections running in the background.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    last_ok: Arc<std::sync::Mutex<Option<Instant>>>,
    handle: JoinHandle<Vec<Outcome>>,
}

/// One exchange: connect within `timeout`, send [`MARKER`], read a line (within
/// `timeout` too, and never less than 2 s: an answer is slow on a busy machine, a dropped
/// SYN is not answered at all).
pub fn exchange(ns: &Netns, to: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = ns.run(|| TcpStream::connect_timeout(&to, timeout))??;
    s.set_read_timeout(Some(timeout.max(Duration::from_secs(2))))?;
    writeln!(s, "{MARKER}")?;
    let mut out = String::new();
    BufReader::new(&mut s).read_line(&mut out)?;
    Ok(out.trim().to_string())
}

impl Traffic {
    /// New connections from `ns` to `to`, back to back (a short pause after each); one
    /// succeeds when the answer starts with `expect`. A connection that fails closed
    /// (dropped SYN) gives up after 300 ms.
    pub fn start(ns: Netns, to: SocketAddr, expect: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let expect = expect.to_string();
        let last_ok = Arc::new(std::sync::Mutex::new(None));
        let seen = last_ok.clone();
        let handle = std::thread::spawn(move || {
            let mut out = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let r = exchange(&ns, to, Duration::from_millis(300));
                let at = Instant::now();
                let (ok, error) = match r {
                    Ok(a) if a.starts_with(&expect) => (true, None),
                    Ok(a) => (false, Some(format!("answer {a:?}"))),
                    Err(e) => (false, Some(format!("{e:#}"))),
                };
                if ok {
                    *seen.lock().unwrap() = Some(at);
                }
                out.push(Outcome { at, ok, error });
                std::thread::sleep(Duration::from_millis(if ok { 2 } else { 10 }));
            }
            out
        });
        Traffic {
            stop,
            last_ok,
            handle,
        }
    }

    /// Waits up to `timeout` for a connection that succeeds at or after `t`: when it did.
    pub fn wait_ok_after(&self, t: Instant, timeout: Duration) -> Option<Instant> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(at) = *self.last_ok.lock().unwrap()
                && at >= t
            {
                return Some(at);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn finish(self) -> Record {
        self.stop.store(true, Ordering::Relaxed);
        Record {
            outcomes: self.handle.join().expect("traffic thread"),
        }
    }
}

/// What a loop saw.
#[derive(Debug, Default)]
pub struct Record {
    pub outcomes: Vec<Outcome>,
}

impl Record {
    pub fn ok(&self) -> usize {
        self.outcomes.iter().filter(|o| o.ok).count()
    }

    pub fn failed(&self) -> usize {
        self.outcomes.len() - self.ok()
    }

    /// The first success at or after `t`.
    pub fn first_ok_after(&self, t: Instant) -> Option<Instant> {
        self.outcomes
            .iter()
            .find(|o| o.ok && o.at >= t)
            .map(|o| o.at)
    }

    /// The longest time between two successes.
    pub fn longest_gap(&self) -> Duration {
        let oks: Vec<Instant> = self
            .outcomes
            .iter()
            .filter(|o| o.ok)
            .map(|o| o.at)
            .collect();
        oks.windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    /// The distinct errors, for a failure message.
    pub fn errors(&self) -> BTreeSet<String> {
        self.outcomes
            .iter()
            .filter_map(|o| o.error.clone())
            .collect()
    }
}

/// The name of a host's veth peer (its end of the wire, in the node's namespace).
pub fn wire_of(topo: &Topology, host: &str) -> Result<(Netns, String)> {
    // `2: eth0@if7: <…`: the peer's index in the node's namespace.
    let link = crate::ip_out(
        &topo.host(host).name,
        &["-o", "link", "show", "dev", "eth0"],
    );
    let peer = link
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.trim_end_matches(':').split_once("@if"))
        .map(|(_, i)| format!("{i}:"))
        .with_context(|| format!("no veth peer in {link:?}"))?;
    let node = topo.node();
    let name = crate::ip_out(node, &["-o", "link"])
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(peer.as_str()))
                .then(|| w.next())
                .flatten()
                .map(|n| {
                    n.trim_end_matches(':')
                        .split('@')
                        .next()
                        .unwrap_or(n)
                        .to_string()
                })
        })
        .with_context(|| format!("no link {peer} in {node}"))?;
    Ok((Netns::open(format!("/var/run/netns/{node}"))?, name))
}

/// A capture of a pod's wire.
pub struct Wire {
    cap: Capture,
    pod: [IpAddr; 2],
}

/// What left a pod past its proxy.
#[derive(Debug, Default)]
pub struct Escapes {
    /// Frames the pod sent holding [`MARKER`].
    pub plaintext_frames: usize,
    /// Payload bytes of the TCP frames the pod sent that its proxy did not.
    pub bytes: u64,
    /// Connections the pod opened (SYN) or answered with data that its proxy did not.
    pub connections: BTreeSet<(SocketAddr, SocketAddr)>,
    /// Every TCP frame the pod sent that its proxy did not (bare acknowledgements,
    /// resets and SYN-ACKs too).
    pub tcp_frames: usize,
    /// Frames the capture saw, those the kernel dropped before it read them, and
    /// whether every frame was kept whole (so that the search missed none).
    pub frames: usize,
    pub dropped: u64,
    pub complete: bool,
}

impl Escapes {
    pub fn none(&self) -> bool {
        self.plaintext_frames == 0 && self.bytes == 0 && self.connections.is_empty()
    }
}

impl Wire {
    pub fn watch(topo: &Topology, host: &str) -> Result<Wire> {
        let (node, ifname) = wire_of(topo, host)?;
        let h = topo.host(host);
        let cap = Capture::start(&node, &ifname)
            .with_context(|| format!("capturing {host}'s wire ({ifname})"))?;
        Ok(Wire {
            cap,
            pod: [h.addr(false), h.addr(true)],
        })
    }

    /// Stops the capture. `proxied` tells the pod's proxy's TCP frames from others (in
    /// a mesh, port 15008 either way); every other TCP frame the pod sent that opens a
    /// connection or carries data escaped.
    pub fn stop(self, proxied: impl Fn(&Packet) -> bool) -> Result<Escapes> {
        let frames = self.cap.stop()?;
        let marker = MARKER.as_bytes();
        let mut out = Escapes {
            // Sent by the pod: received by its veth's peer.
            plaintext_frames: frames
                .frames()
                .iter()
                .filter(|f| !f.outgoing && f.data.windows(marker.len()).any(|w| w == marker))
                .count(),
            frames: frames.count(),
            dropped: frames.dropped(),
            complete: frames.complete(),
            ..Default::default()
        };
        for p in frames.packets() {
            // Sent by the pod: received by its veth's peer.
            let from_pod = !p.outgoing && self.pod.contains(&p.src);
            if !from_pod || p.proto != Proto::Tcp || proxied(p) {
                continue;
            }
            out.tcp_frames += 1;
            let syn = p.flags & 0x12 == 0x02;
            if syn || p.payload_len > 0 {
                out.bytes += p.payload_len as u64;
                out.connections.insert((
                    SocketAddr::new(p.src, p.sport),
                    SocketAddr::new(p.dst, p.dport),
                ));
            }
        }
        Ok(out)
    }
}

/// In a mesh, the proxies' frames: TCP to or from port 15008.
pub fn hbone(p: &Packet) -> bool {
    p.sport == 15008 || p.dport == 15008
}

/// A mesh proxy (HBONE, a local CA of its own) for pods of `m` enrolled with
/// [`crate::Mesh::enrol_mesh`]; the CA directory goes with the returned guard.
pub fn mesh_proxy(
    m: &crate::Mesh,
) -> Result<(
    Arc<redirect_user::proxy::mesh::Mesh>,
    crate::process::RemoveDir,
)> {
    use redirect_user::proxy::{
        identity::{DEFAULT_TRUST_DOMAIN, LocalCa, Tls},
        mesh::{DefaultTransport, Mesh},
        registry::Registry,
    };
    let dir = std::env::temp_dir().join(format!("{}-ca", m.base()));
    let guard = crate::process::RemoveDir::new(dir.clone());
    let ca = Arc::new(LocalCa::open_or_create(&dir)?);
    let proxy = Mesh::new(
        Tls::new(ca, DEFAULT_TRUST_DOMAIN),
        Arc::new(Registry::new()),
        DefaultTransport::Tcp,
    );
    Ok((proxy, guard))
}
