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

/// Opens a marked TCP socket in `netns`, ready to connect to `dest` from an address and
/// port of the kernel's choice.
pub fn outbound_socket(netns: &Netns, dest: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let s = netns
        .run(|| -> io::Result<Socket> {
            let s = marked_tcp(dest)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .map_err(io::Error::other)??;
    Ok(tokio::net::TcpSocket::from_std_stream(s.into()))
}

/// A marked TCP socket of `dest`'s family, with the relayed connections' options.
fn marked_tcp(dest: SocketAddr) -> io::Result<Socket> {
    let domain = if dest.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_mark(PROXY_MARK)?;
    s.set_tcp_nodelay(true)?;
    set_keepalive(&SockRef::from(&s))?;
    Ok(s)
}

/// Source ports tried by [`connect_as`] before it leaves the choice to the kernel.
const SPOOFED_PORT_TRIES: usize = 8;

/// Connects to `dest` (the pod's app) from inside `netns` as `client`: a transparent
/// bind to the client's address, which need not be local.
///
/// The source port is drawn here, at random among the ports of the namespace's
/// ephemeral range whose parity `connect()` does not start with (the parity `bind()`
/// to port 0 prefers), never left to `connect()`. The kernel draws `connect()` ports
/// for one (source address, destination, port) from a perturbation table shared by
/// every namespace and read without a lock, so the client pod's own `connect()` to the
/// same app, in its own namespace at the same moment, can be handed the very port the
/// proxy is given here. The two connections then have one 5-tuple: the SYN reaching
/// the pod from outside meets the proxy's connection to the app (or the reverse), and
/// the engine's notes for the two, keyed by 5-tuple, decide one SYN wrongly. Either way
/// a SYN is lost and that connection waits out a retransmission (1 s). Ports of the
/// other parity are never drawn from that table, and `connect()` turns to them only
/// once every port of its own parity is taken for that destination.
///
/// A port whose 4-tuple is in use (or whose bind conflicts) is replaced by another;
/// after [`SPOOFED_PORT_TRIES`] the kernel chooses (IP_BIND_ADDRESS_NO_PORT: at
/// `connect()`, by 4-tuple, without the scan of the pod's bound ports a bind-time
/// choice makes, slow once thousands sit in TIME_WAIT).
pub async fn connect_as(
    netns: &Netns,
    dest: SocketAddr,
    client: std::net::IpAddr,
) -> io::Result<tokio::net::TcpStream> {
    let s = netns
        .run(|| -> io::Result<Socket> {
            let range = EphemeralPorts::of_this_namespace();
            for _ in 0..SPOOFED_PORT_TRIES {
                let s = spoofing_socket(dest)?;
                let port = range.other_parity(fastrand::u32(..));
                if let Err(e) = s.bind(&SocketAddr::new(client, port).into()) {
                    if e.raw_os_error() == Some(libc::EADDRINUSE) {
                        continue;
                    }
                    return Err(e);
                }
                match s.connect(&dest.into()) {
                    Ok(()) => return Ok(s),
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => return Ok(s),
                    Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => continue,
                    Err(e) => return Err(e),
                }
            }
            let s = spoofing_socket(dest)?;
            set_int(&s, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
            s.bind(&SocketAddr::new(client, 0).into())?;
            match s.connect(&dest.into()) {
                Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => Err(e),
                _ => Ok(s),
            }
        })
        .map_err(io::Error::other)??;
    let stream = tokio::net::TcpStream::from_std(s.into())?;
    // Connected (or refused) once writable, as tokio's own connect waits.
    stream.writable().await?;
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    stream.peer_addr()?;
    Ok(stream)
}

/// A marked, transparent, non-blocking TCP socket for [`connect_as`].
fn spoofing_socket(dest: SocketAddr) -> io::Result<Socket> {
    let s = marked_tcp(dest)?;
    set_transparent(&s, dest.is_ipv6())?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// The namespace's ephemeral port range (`net.ipv4.ip_local_port_range`, which IPv6
/// shares).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EphemeralPorts {
    low: u16,
    high: u16,
}

impl EphemeralPorts {
    /// The kernel's default range.
    const DEFAULT: Self = Self {
        low: 32768,
        high: 60999,
    };

    /// The range of the calling thread's namespace (the default if it cannot be read).
    fn of_this_namespace() -> Self {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| Self::parse(&s))
            .unwrap_or(Self::DEFAULT)
    }

    fn parse(s: &str) -> Option<Self> {
        let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
        let (low, high) = (it.next()??, it.next()??);
        (low < high).then_some(Self { low, high })
    }

    /// The `r`-th port (modulo their count) of those whose parity differs from `low`'s:
    /// `low + 1`, `low + 3`, ... up to `high`.
    fn other_parity(self, r: u32) -> u16 {
        let count = (u32::from(self.high) - u32::from(self.low))
            .div_ceil(2)
            .max(1);
        self.low + 1 + 2 * (r % count) as u16
    }
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

#[cfg(test)]
mod tests {
    use super::EphemeralPorts;

    #[test]
    fn ephemeral_range_is_read_as_the_kernel_writes_it() {
        assert_eq!(
            EphemeralPorts::parse("32768\t60999\n"),
            Some(EphemeralPorts::DEFAULT)
        );
        assert_eq!(
            EphemeralPorts::parse("16000 65000"),
            Some(EphemeralPorts {
                low: 16000,
                high: 65000
            })
        );
        assert_eq!(EphemeralPorts::parse("60999 32768"), None);
        assert_eq!(EphemeralPorts::parse("x 1"), None);
        assert_eq!(EphemeralPorts::parse(""), None);
    }

    #[test]
    fn spoofed_ports_have_the_parity_connect_does_not_start_with() {
        for (low, high) in [
            (32768, 60999),
            (16000, 65000),
            (1025, 65535),
            (40000, 40001),
        ] {
            let r = EphemeralPorts { low, high };
            let mut seen = std::collections::BTreeSet::new();
            // Consecutive draws cover every such port, then wrap; large draws stay inside.
            for i in (0..40_000u32).chain([u32::MAX - 1, u32::MAX]) {
                let p = r.other_parity(i);
                assert!((low..=high).contains(&p), "{p} outside {low}-{high}");
                assert_ne!(p % 2, low % 2, "{p} has the parity of {low}");
                seen.insert(p);
            }
            // Every such port can be drawn.
            assert_eq!(
                seen.len(),
                (high - low).div_ceil(2) as usize,
                "{low}-{high}"
            );
        }
        assert_eq!(EphemeralPorts::DEFAULT.other_parity(0), 32769);
        assert_eq!(
            EphemeralPorts::DEFAULT.other_parity(u32::MAX),
            32769 + 2 * (u32::MAX % 14116) as u16
        );
    }
}
