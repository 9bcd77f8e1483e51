//! The proxy's sockets inside a pod namespace, and a bare relay behind them.
//!
//! Every socket the proxy opens in a pod carries SO_MARK 0x539 (the engine lets such
//! sockets of the proxy's cgroup through, parity row 6) and is transparent, because
//! steered connections arrive for, and are answered from, addresses that are not the
//! pod's.

pub mod drain;
pub mod hbone;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod quic;
pub mod registry;
pub mod relay;

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd,
    time::Duration,
};

use redirect_ebpf::{PORT_DNS, PORT_INBOUND, PORT_OUTBOUND, PORT_TUNNEL, PROXY_MARK};
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, TcpKeepalive, Type};

use crate::{ebpf::PodSockets, netns::Netns};

/// The listening sockets of one pod, opened inside its namespace.
#[derive(Debug)]
pub struct PodListeners {
    pub outbound: std::net::TcpListener,
    pub inbound: std::net::TcpListener,
    pub tunnel: std::net::TcpListener,
    pub dns_udp: Option<std::net::UdpSocket>,
    pub dns_tcp: Option<std::net::TcpListener>,
}

impl PodListeners {
    /// Opens 15001, 15006, 15008 (and 15053 UDP and TCP with `dns`) in `netns`.
    pub fn open(netns: &Netns, dns: bool) -> Result<Self, crate::netns::NetnsError> {
        netns
            .run(|| -> io::Result<Self> {
                Ok(Self {
                    outbound: listen_tcp(PORT_OUTBOUND)?,
                    inbound: listen_tcp(PORT_INBOUND)?,
                    tunnel: listen_tcp(PORT_TUNNEL)?,
                    dns_udp: if dns { Some(bind_udp(PORT_DNS)?) } else { None },
                    dns_tcp: if dns {
                        Some(listen_tcp(PORT_DNS)?)
                    } else {
                        None
                    },
                })
            })?
            .map_err(|e| crate::netns::NetnsError::Open {
                path: "listener sockets".into(),
                source: e,
            })
    }

    /// The sockets as the engine takes them.
    pub fn sockets(&self) -> PodSockets<'_> {
        PodSockets {
            outbound: Some(self.outbound.as_fd()),
            inbound: Some(self.inbound.as_fd()),
            tunnel: Some(self.tunnel.as_fd()),
            dns_udp: self.dns_udp.as_ref().map(|s| s.as_fd()),
            dns_tcp: self.dns_tcp.as_ref().map(|s| s.as_fd()),
        }
    }
}

/// A socket of the proxy's: marked, transparent, reusable. Dual-stack when the
/// namespace has IPv6, IPv4 only otherwise.
fn proxy_socket(ty: Type, proto: Protocol) -> io::Result<(Socket, bool)> {
    let (s, v6) = match Socket::new(Domain::IPV6, ty, Some(proto)) {
        Ok(s) => {
            s.set_only_v6(false)?;
            (s, true)
        }
        Err(_) => (Socket::new(Domain::IPV4, ty, Some(proto))?, false),
    };
    s.set_mark(PROXY_MARK)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if v6 {
        s.set_ip_transparent_v6(true)?;
    }
    s.set_ip_transparent_v4(true)?;
    Ok((s, v6))
}

fn any(port: u16, v6: bool) -> SockAddr {
    if v6 {
        SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)).into()
    } else {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into()
    }
}

fn listen_tcp(port: u16) -> io::Result<std::net::TcpListener> {
    let (s, v6) = proxy_socket(Type::STREAM, Protocol::TCP)?;
    s.bind(&any(port, v6))?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

fn bind_udp(port: u16) -> io::Result<std::net::UdpSocket> {
    let (s, v6) = proxy_socket(Type::DGRAM, Protocol::UDP)?;
    s.bind(&any(port, v6))?;
    // Steered datagrams keep their original destination: ask for it with each one.
    if v6 {
        set_int(&s, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, 1)?;
    }
    set_int(&s, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// TCP keepalive of relayed connections, as upstream's proxy sets it: first probe after
/// 180 s of silence, then every 180 s, 9 unanswered probes end the connection. A peer
/// that vanished is noticed; an idle connection whose peer is there lives on.
pub const KEEPALIVE_TIME: Duration = Duration::from_secs(180);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(180);
pub const KEEPALIVE_RETRIES: u32 = 9;

pub(crate) fn set_keepalive(s: &SockRef<'_>) -> io::Result<()> {
    s.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_TIME)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_RETRIES),
    )
}

/// Lets the socket use an address that is not local (the original destination of a
/// steered connection, or a client's address).
fn set_transparent(s: &Socket, v6: bool) -> io::Result<()> {
    if v6 {
        s.set_ip_transparent_v6(true)
    } else {
        s.set_ip_transparent_v4(true)
    }
}

fn set_int(s: &Socket, level: i32, opt: i32, v: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid int option buffer.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            &v as *const i32 as *const _,
            size_of::<i32>() as _,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A v4-mapped IPv6 address (what a dual-stack socket reports) as plain IPv4.
pub fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Opens a marked TCP socket in `netns`, bound to `source` if given (a transparent
/// bind: the address need not be local), ready to connect to `dest`.
pub fn outbound_socket(
    netns: &Netns,
    dest: SocketAddr,
    source: Option<SocketAddr>,
) -> io::Result<tokio::net::TcpSocket> {
    let s = netns
        .run(|| -> io::Result<Socket> {
            let domain = if dest.is_ipv6() {
                Domain::IPV6
            } else {
                Domain::IPV4
            };
            let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
            s.set_mark(PROXY_MARK)?;
            s.set_tcp_nodelay(true)?;
            set_keepalive(&SockRef::from(&s))?;
            if let Some(src) = source {
                set_transparent(&s, dest.is_ipv6())?;
                s.set_reuse_address(true)?;
                // The port is chosen at connect() by 4-tuple; a bind-time choice scans the
                // pod's bound ports, slow (ms) once thousands sit in TIME_WAIT.
                if src.port() == 0 {
                    set_int(&s, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
                }
                s.bind(&src.into())?;
            }
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .map_err(io::Error::other)??;
    Ok(tokio::net::TcpSocket::from_std_stream(s.into()))
}

/// Opens a marked UDP socket in `netns`; with `source`, bound there transparently
/// (to answer a steered DNS query from the address it was sent to).
pub fn udp_socket(
    netns: &Netns,
    family_of: SocketAddr,
    source: Option<SocketAddr>,
) -> io::Result<tokio::net::UdpSocket> {
    let s = netns
        .run(|| -> io::Result<Socket> {
            let domain = if family_of.is_ipv6() {
                Domain::IPV6
            } else {
                Domain::IPV4
            };
            let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
            s.set_mark(PROXY_MARK)?;
            match source {
                Some(src) => {
                    set_transparent(&s, family_of.is_ipv6())?;
                    s.set_reuse_address(true)?;
                    s.set_reuse_port(true)?;
                    s.bind(&src.into())?;
                }
                None => s.bind(&any(0, family_of.is_ipv6()))?,
            }
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .map_err(io::Error::other)??;
    tokio::net::UdpSocket::from_std(s.into())
}
