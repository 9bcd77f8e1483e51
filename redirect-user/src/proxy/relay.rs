//! The tasks behind a pod's listeners. Bare ([`Relay::start`]): no tunnel, no TLS; it
//! shows where the engine delivered each connection and carries the bytes to the
//! original destination, which is what the parity tests and the redirection benchmark
//! need. With the mesh ([`Relay::start_mesh`]), 15001 and 15008 speak HBONE
//! ([`super::mesh`]).
//!
//! - 15001 (outbound): bare, connects to the original destination from inside the pod;
//!   mesh, tunnels to mesh workloads and passes the rest through.
//! - 15006 (inbound plaintext): connects to the original destination (the app) from
//!   inside the pod, keeping the client's address as source (refused when the pod's
//!   policy requires mTLS).
//! - 15008 (tunnel): bare, answers `TUNNEL <local address>\n` and closes; mesh, the
//!   HBONE server.
//! - 15053 (DNS, UDP and TCP): forwards to the original destination and answers from it;
//!   at most [`DNS_IN_FLIGHT`] UDP queries per pod at once, the excess dropped and
//!   counted ([`Relay::dns_dropped`]).
//!
//! Every connection and query runs as a task of the pod ([`PodTasks`]): removing the pod
//! ([`Relay::drain`]) closes its listeners at once, gives its connections a grace period,
//! then cancels them, so nothing of the pod (sockets, its namespace fd) outlives it.
//! Relayed TCP sockets carry TCP keepalive as upstream's (180 s, then every 180 s, 9
//! probes): a connection whose peer vanished ends; an idle healthy one lives on.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
use redirect_ebpf::{PORT_DNS, PORT_INBOUND, PORT_OUTBOUND, PORT_TUNNEL};
use tokio::{
    io::{AsyncWriteExt, copy_bidirectional},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Semaphore, mpsc::UnboundedSender},
    task::JoinSet,
};
use tracing::{debug, info, warn};

use super::{
    PodListeners, connect_as,
    drain::{Drained, PodTasks},
    mesh::PodMesh,
    metrics::{Peer, PodMetrics, Security},
    outbound_socket, set_keepalive, udp_socket, unmap,
};
use crate::netns::Netns;

/// UDP DNS queries of one pod in flight at once; more are dropped (the app retries).
pub const DNS_IN_FLIGHT: usize = 64;
/// How long a forwarded DNS query waits for its answer.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest DNS datagram.
const DNS_MAX: usize = 65535;

/// One connection (or datagram) as a listener received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptEvent {
    pub pod: String,
    /// The listener's port: 15001, 15006, 15008 or 15053.
    pub listener: u16,
    pub udp: bool,
    /// The accepted socket's local address: the original destination.
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// The relay tasks of one pod. [`Relay::drain`] (or [`Relay::stop`]) ends them all;
/// dropping it cancels them without waiting.
pub struct Relay {
    listeners: JoinSet<()>,
    ctx: Arc<Ctx>,
    /// Handed over to a [`Draining`].
    closed: bool,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if !self.closed {
            self.ctx.tasks.abort();
        }
    }
}

/// A pod whose listeners are closed and whose connections are still running:
/// [`Draining::finish`] ends them.
pub struct Draining {
    ctx: Arc<Ctx>,
}

impl Relay {
    /// Starts serving `listeners` (inside a tokio runtime).
    pub fn start(
        pod: &str,
        netns: Netns,
        listeners: PodListeners,
        events: Option<UnboundedSender<AcceptEvent>>,
    ) -> std::io::Result<Self> {
        Self::start_with(pod, netns, listeners, events, None, None)
    }

    /// Starts serving `listeners` with the mesh data path of `mesh`.
    pub fn start_mesh(
        pod: &str,
        netns: Netns,
        listeners: PodListeners,
        events: Option<UnboundedSender<AcceptEvent>>,
        mesh: Arc<PodMesh>,
    ) -> std::io::Result<Self> {
        Self::start_with(pod, netns, listeners, events, Some(mesh), None)
    }

    /// Starts serving `listeners`, with the mesh data path if `mesh` is given, counting
    /// connections and bytes in `metrics` if given.
    pub fn start_with(
        pod: &str,
        netns: Netns,
        listeners: PodListeners,
        events: Option<UnboundedSender<AcceptEvent>>,
        mesh: Option<Arc<PodMesh>>,
        metrics: Option<Arc<PodMetrics>>,
    ) -> std::io::Result<Self> {
        // A mesh pod's tunnel streams (15008, QUIC) run as its tasks too.
        let tasks = match &mesh {
            Some(m) => m.tasks().clone(),
            None => PodTasks::new(),
        };
        let ctx = Arc::new(Ctx {
            pod: pod.into(),
            netns,
            events,
            mesh,
            metrics,
            tasks,
            dns_slots: Arc::new(Semaphore::new(DNS_IN_FLIGHT)),
            dns_dropped: AtomicU64::new(0),
        });
        let mut tasks = JoinSet::new();
        let PodListeners {
            outbound,
            inbound,
            tunnel,
            dns_udp,
            dns_tcp,
        } = listeners;
        for (port, l) in [
            (PORT_OUTBOUND, Some(outbound)),
            (PORT_INBOUND, Some(inbound)),
            (PORT_TUNNEL, Some(tunnel)),
            (PORT_DNS, dns_tcp),
        ] {
            if let Some(l) = l {
                tasks.spawn(accept_loop(ctx.clone(), port, TcpListener::from_std(l)?));
            }
        }
        if let Some(u) = dns_udp {
            tasks.spawn(dns_udp_loop(ctx.clone(), u));
        }
        Ok(Self {
            listeners: tasks,
            ctx,
            closed: false,
        })
    }

    /// The pod's connections, tunnel streams and DNS queries being served now.
    pub fn connections(&self) -> usize {
        self.ctx.tasks.live()
    }

    /// UDP DNS queries dropped because [`DNS_IN_FLIGHT`] were already in flight.
    pub fn dns_dropped(&self) -> u64 {
        self.ctx.dns_dropped.load(Ordering::Relaxed)
    }

    /// Closes the listeners (closed on return) and hands back the running connections.
    pub async fn close(mut self) -> Draining {
        self.listeners.abort_all();
        while self.listeners.join_next().await.is_some() {}
        self.closed = true;
        Draining {
            ctx: self.ctx.clone(),
        }
    }

    /// Removes the pod: closes its listeners, lets its connections finish for up to
    /// `grace`, then cancels them. On return no task of the pod is left and its sockets
    /// are closed.
    pub async fn drain(self, grace: Duration) -> Drained {
        self.close().await.finish(grace).await
    }

    /// [`Relay::drain`] without a grace period.
    pub async fn stop(self) {
        self.drain(Duration::ZERO).await;
    }
}

impl Draining {
    /// Lets the connections finish for up to `grace` (upstream's default is
    /// [`super::drain::DEFAULT_GRACE`]), then cancels the rest and waits until they are dropped.
    pub async fn finish(self, grace: Duration) -> Drained {
        let d = self.ctx.tasks.drain(grace).await;
        if d.cancelled > 0 {
            info!(
                pod = self.ctx.pod,
                finished = d.finished,
                cancelled = d.cancelled,
                grace_ms = grace.as_millis() as u64,
                "relay: pod drained, connections cancelled at the deadline"
            );
        } else {
            debug!(
                pod = self.ctx.pod,
                finished = d.finished,
                "relay: pod drained"
            );
        }
        d
    }

    pub fn pod(&self) -> &str {
        &self.ctx.pod
    }
}

struct Ctx {
    pod: String,
    netns: Netns,
    events: Option<UnboundedSender<AcceptEvent>>,
    mesh: Option<Arc<PodMesh>>,
    metrics: Option<Arc<PodMetrics>>,
    tasks: PodTasks,
    dns_slots: Arc<Semaphore>,
    dns_dropped: AtomicU64,
}

impl Ctx {
    fn event(&self, listener: u16, udp: bool, local: SocketAddr, peer: SocketAddr) {
        if let Some(tx) = &self.events {
            let _ = tx.send(AcceptEvent {
                pod: self.pod.clone(),
                listener,
                udp,
                local,
                peer,
            });
        }
    }
}

async fn accept_loop(ctx: Arc<Ctx>, port: u16, l: TcpListener) {
    loop {
        let (stream, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(pod = ctx.pod, port, error = %e, "relay: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let _ = set_keepalive(&socket2::SockRef::from(&stream));
        let (local, peer) = (
            original_destination(&stream, unmap(local), port),
            unmap(peer),
        );
        if local.port() == port && matches!(port, PORT_OUTBOUND | PORT_INBOUND | PORT_DNS) {
            // A redirected connection whose destination is unknown: relaying it would
            // connect the proxy to itself. Refuse it (fail closed).
            warn!(pod = ctx.pod, port, %local, %peer, "relay: original destination unknown, connection refused");
            continue;
        }
        ctx.event(port, false, local, peer);
        let task_ctx = ctx.clone();
        let spawned = ctx.tasks.spawn(async move {
            let ctx = task_ctx;
            if let Err(e) = serve(&ctx, port, stream, local, peer).await {
                debug!(pod = ctx.pod, port, %local, %peer, error = %e, "relay: connection ended with an error");
            }
        });
        if !spawned {
            // The pod is draining: the connection is closed unserved.
            return;
        }
    }
}

/// Where the connection was going. Steered by the engine, that is the accepted socket's
/// local address; redirected by netfilter rules (REDIRECT to the listener's own port),
/// conntrack knows it (SO_ORIGINAL_DST).
fn original_destination(stream: &TcpStream, local: SocketAddr, port: u16) -> SocketAddr {
    use nix::sys::socket::{getsockopt, sockopt};
    if local.port() != port {
        return local;
    }
    if let Ok(a) = getsockopt(stream, sockopt::OriginalDst) {
        let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
        return SocketAddr::new(ip.into(), u16::from_be(a.sin_port));
    }
    if let Ok(a) = getsockopt(stream, sockopt::Ip6tOriginalDst) {
        let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
        return unmap(SocketAddr::new(ip.into(), u16::from_be(a.sin6_port)));
    }
    local
}

async fn serve(
    ctx: &Ctx,
    port: u16,
    mut stream: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
) -> std::io::Result<()> {
    if let Some(mesh) = &ctx.mesh {
        match port {
            PORT_OUTBOUND => {
                stream.set_nodelay(true)?;
                return mesh
                    .outbound_counted(stream, peer, local, ctx.metrics.as_deref())
                    .await;
            }
            PORT_TUNNEL => {
                return super::hbone::serve(mesh.clone(), mesh.server_config(), stream, peer).await;
            }
            PORT_INBOUND if mesh.refuses_plaintext() => {
                info!(pod = ctx.pod, %peer, %local, "relay: plaintext inbound refused, the pod requires mTLS");
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                return Ok(());
            }
            _ => {}
        }
    }
    if port == PORT_TUNNEL {
        stream
            .write_all(format!("TUNNEL {local}\n").as_bytes())
            .await?;
        stream.shutdown().await?;
        // Read what the client sends until it closes, so it never writes into a reset.
        let mut sink = tokio::io::sink();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::copy(&mut stream, &mut sink),
        )
        .await;
        return Ok(());
    }
    stream.set_nodelay(true)?;
    // Plain TCP both ways: neither side's identity is known beyond this pod's.
    let tracked = match (&ctx.metrics, port) {
        (Some(m), PORT_OUTBOUND) => Some(m.outbound(&Peer::unknown(), None, Security::Unknown)),
        (Some(m), PORT_INBOUND) => Some(m.inbound(&Peer::unknown(), Security::Unknown)),
        _ => None,
    };
    let connected = if port == PORT_INBOUND {
        // Inbound: the app sees the client's address (not its port: the accepted socket
        // already holds that exact 4-tuple in this namespace).
        connect_as(&ctx.netns, local, peer.ip()).await
    } else {
        match outbound_socket(&ctx.netns, local) {
            Ok(s) => s.connect(local).await,
            Err(e) => Err(e),
        }
    };
    let mut upstream = match connected {
        Ok(u) => u,
        Err(e) => {
            if let Some(t) = &tracked {
                t.failed();
            }
            return Err(e);
        }
    };
    match &tracked {
        Some(t) => {
            copy_bidirectional(&mut t.client_side(stream), &mut upstream).await?;
        }
        None => {
            copy_bidirectional(&mut stream, &mut upstream).await?;
        }
    }
    Ok(())
}

async fn dns_udp_loop(ctx: Arc<Ctx>, sock: std::net::UdpSocket) {
    let sock = match UdpSocket::from_std(sock) {
        Ok(s) => s,
        Err(e) => {
            warn!(pod = ctx.pod, error = %e, "relay: DNS socket unusable");
            return;
        }
    };
    // One receive buffer for the pod, filled by the kernel: nothing zeroed per datagram.
    let mut buf = vec![0u8; DNS_MAX];
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let got = sock.try_io(tokio::io::Interest::READABLE, || {
            recv_with_orig_dst(&sock, &mut buf)
        });
        let (n, peer, orig) = match got {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!(pod = ctx.pod, error = %e, "relay: DNS receive failed");
                continue;
            }
        };
        ctx.event(PORT_DNS, true, orig, peer);
        let Ok(permit) = ctx.dns_slots.clone().try_acquire_owned() else {
            let dropped = ctx.dns_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // The first, then every power of two: counted always, logged sparingly.
            if dropped.is_power_of_two() {
                warn!(pod = ctx.pod, %peer, %orig, dropped, in_flight = DNS_IN_FLIGHT, "relay: DNS query dropped, too many in flight");
            }
            continue;
        };
        let query = buf[..n].to_vec();
        let task_ctx = ctx.clone();
        let spawned = ctx.tasks.spawn(async move {
            let _permit = permit;
            let ctx = task_ctx;
            if let Err(e) = dns_exchange(&ctx, &query, peer, orig).await {
                debug!(pod = ctx.pod, %peer, %orig, error = %e, "relay: DNS exchange failed");
            }
        });
        if !spawned {
            return;
        }
    }
}

/// Forwards one query to where it was going and answers the app from that address.
async fn dns_exchange(
    ctx: &Ctx,
    query: &[u8],
    peer: SocketAddr,
    orig: SocketAddr,
) -> std::io::Result<()> {
    let up = udp_socket(&ctx.netns, orig, None)?;
    up.send_to(query, orig).await?;
    // Written by the kernel into spare capacity: not zeroed first.
    let mut buf = Vec::with_capacity(DNS_MAX);
    let (_, _) = tokio::time::timeout(DNS_TIMEOUT, up.recv_buf_from(&mut buf)).await??;
    let back = udp_socket(&ctx.netns, peer, Some(orig))?;
    back.send_to(&buf, peer).await?;
    Ok(())
}

/// Receives one datagram into `buf`: its length, source and original destination.
fn recv_with_orig_dst(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, SocketAddr)> {
    use std::os::fd::AsRawFd;
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .map_err(std::io::Error::from)?;
    let n = msg.bytes;
    let peer = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| SocketAddr::from(*s))
                .or_else(|| a.as_sockaddr_in6().map(|s| SocketAddr::from(*s)))
        })
        .ok_or_else(|| std::io::Error::other("datagram without a source"))?;
    let mut orig = None;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                orig = Some(SocketAddr::new(
                    std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                    u16::from_be(a.sin_port),
                ));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                orig = Some(SocketAddr::new(
                    std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                    u16::from_be(a.sin6_port),
                ));
            }
            _ => {}
        }
    }
    let orig =
        orig.ok_or_else(|| std::io::Error::other("datagram without its original destination"))?;
    Ok((n, unmap(peer), unmap(orig)))
}
