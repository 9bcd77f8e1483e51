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
//! - 15053 (DNS, UDP and TCP): forwards to the original destination and answers from it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
use redirect_ebpf::{PORT_DNS, PORT_INBOUND, PORT_OUTBOUND, PORT_TUNNEL};
use tokio::{
    io::{AsyncWriteExt, copy_bidirectional},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::mpsc::UnboundedSender,
    task::JoinSet,
};
use tracing::{debug, info, warn};

use super::{PodListeners, mesh::PodMesh, outbound_socket, udp_socket, unmap};
use crate::netns::Netns;

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

/// The relay tasks of one pod; dropping it stops them and closes the listeners.
pub struct Relay {
    tasks: JoinSet<()>,
}

impl Relay {
    /// Starts serving `listeners` (inside a tokio runtime).
    pub fn start(
        pod: &str,
        netns: Netns,
        listeners: PodListeners,
        events: Option<UnboundedSender<AcceptEvent>>,
    ) -> std::io::Result<Self> {
        Self::start_with(pod, netns, listeners, events, None)
    }

    /// Starts serving `listeners` with the mesh data path of `mesh`.
    pub fn start_mesh(
        pod: &str,
        netns: Netns,
        listeners: PodListeners,
        events: Option<UnboundedSender<AcceptEvent>>,
        mesh: Arc<PodMesh>,
    ) -> std::io::Result<Self> {
        Self::start_with(pod, netns, listeners, events, Some(mesh))
    }

    fn start_with(
        pod: &str,
        netns: Netns,
        listeners: PodListeners,
        events: Option<UnboundedSender<AcceptEvent>>,
        mesh: Option<Arc<PodMesh>>,
    ) -> std::io::Result<Self> {
        let ctx = Arc::new(Ctx {
            pod: pod.into(),
            netns,
            events,
            mesh,
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
        Ok(Self { tasks })
    }

    /// Stops the tasks and waits for them, so the listeners are closed on return.
    pub async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

struct Ctx {
    pod: String,
    netns: Netns,
    events: Option<UnboundedSender<AcceptEvent>>,
    mesh: Option<Arc<PodMesh>>,
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
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(&ctx, port, stream, local, peer).await {
                debug!(pod = ctx.pod, port, %local, %peer, error = %e, "relay: connection ended with an error");
            }
        });
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
                return mesh.outbound(stream, peer, local).await;
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
    let source = match port {
        PORT_TUNNEL => {
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
        // Inbound: the app sees the client's address. Not its port: the accepted
        // socket already holds that exact 4-tuple in this namespace.
        PORT_INBOUND => Some(SocketAddr::new(peer.ip(), 0)),
        _ => None,
    };
    stream.set_nodelay(true)?;
    let mut upstream = outbound_socket(&ctx.netns, local, source)?
        .connect(local)
        .await?;
    copy_bidirectional(&mut stream, &mut upstream).await?;
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
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let got = sock.try_io(tokio::io::Interest::READABLE, || recv_with_orig_dst(&sock));
        let (query, peer, orig) = match got {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!(pod = ctx.pod, error = %e, "relay: DNS receive failed");
                continue;
            }
        };
        ctx.event(PORT_DNS, true, orig, peer);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = dns_exchange(&ctx, &query, peer, orig).await {
                debug!(pod = ctx.pod, %peer, %orig, error = %e, "relay: DNS exchange failed");
            }
        });
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
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), up.recv_from(&mut buf)).await??;
    let back = udp_socket(&ctx.netns, peer, Some(orig))?;
    back.send_to(&buf[..n], peer).await?;
    Ok(())
}

fn recv_with_orig_dst(sock: &UdpSocket) -> std::io::Result<(Vec<u8>, SocketAddr, SocketAddr)> {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 65535];
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
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
    buf.truncate(n);
    Ok((buf, unmap(peer), unmap(orig)))
}
