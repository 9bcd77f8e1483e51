//! A small synchronous rtnetlink client for the calling thread's network namespace:
//! list links and addresses, add and remove the return-routing rule and route.
//! No process is spawned; one socket serves a whole enrolment.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{AfSpecInet, AfSpecUnspec, LinkAttribute, LinkFlags, LinkLayerType, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
    tc::{TcAttribute, TcHandle, TcMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("netlink {op}: {source}")]
    Kernel {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("netlink {op}: cannot decode the answer: {detail}")]
    Decode { op: &'static str, detail: String },
}

/// A network interface of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub loopback: bool,
    /// Frames carry an Ethernet header (veth, macvlan, ipvlan, bridge, dummy...), as
    /// the tc programs need to bounce a packet back in; tun, wireguard, ipip, gre and
    /// the like carry bare IP.
    pub ether: bool,
}

pub struct Netlink {
    sock: Socket,
    seq: u32,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        sock.bind_auto().map_err(NetlinkError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        Ok(Self { sock, seq: 0 })
    }

    /// Sends one request and collects the answers until the ack or the end of a dump.
    fn request(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags | NLM_F_REQUEST;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock
            .send(&buf, 0)
            .map_err(|source| NetlinkError::Kernel { op, source })?;

        let mut out = Vec::new();
        let mut rbuf = vec![0u8; 64 * 1024];
        loop {
            let n = self
                .sock
                .recv(&mut &mut rbuf[..], 0)
                .map_err(|source| NetlinkError::Kernel { op, source })?;
            let mut off = 0;
            while off < n {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[off..n]).map_err(
                    |e| NetlinkError::Decode {
                        op,
                        detail: e.to_string(),
                    },
                )?;
                let len = m.header.length as usize;
                if m.header.sequence_number != self.seq {
                    off += len.max(1);
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(NetlinkError::Kernel {
                                op,
                                source: std::io::Error::from_raw_os_error(-code.get()),
                            }),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }

    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let msgs = self.request(
            "list links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .map(|l| Link {
                index: l.header.index,
                loopback: l.header.flags.contains(LinkFlags::Loopback),
                ether: l.header.link_layer_type == LinkLayerType::Ether,
                name: l
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })
                    .unwrap_or_default(),
            })
            .collect())
    }

    /// `net.ipv4.conf.<name>.accept_local`, read through rtnetlink: a container's
    /// `/proc/sys` is read-only. `None` when there is no such interface.
    pub fn accept_local(&mut self, name: &str) -> Result<Option<bool>, NetlinkError> {
        const OP: &str = "read accept_local";
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        let msgs = match self.request(OP, RouteNetlinkMessage::GetLink(msg), NLM_F_ACK) {
            Err(NetlinkError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::ENODEV) =>
            {
                return Ok(None);
            }
            r => r?,
        };
        let conf = msgs.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::AfSpecUnspec(specs) => specs.into_iter().find_map(|s| match s {
                    AfSpecUnspec::Inet(inet) => inet.into_iter().find_map(|i| match i {
                        AfSpecInet::DevConf(c) => Some(c),
                        _ => None,
                    }),
                    _ => None,
                }),
                _ => None,
            }),
            _ => None,
        });
        match conf {
            Some(c) => Ok(Some(c.accept_local != 0)),
            None => Err(NetlinkError::Decode {
                op: OP,
                detail: format!("{name} has no IPv4 configuration"),
            }),
        }
    }

    /// Sets `net.ipv4.conf.<name>.accept_local` through rtnetlink (`IFLA_AF_SPEC`,
    /// `AF_INET`, `IFLA_INET_CONF`), which needs CAP_NET_ADMIN but no writable
    /// `/proc/sys`. False when there is no such interface.
    pub fn set_accept_local(&mut self, name: &str, on: bool) -> Result<bool, NetlinkError> {
        const IFLA_INET_CONF: u16 = 1;
        const IPV4_DEVCONF_ACCEPT_LOCAL: u16 = 23;
        let nla = |kind: u16, value: &[u8]| {
            let mut v = Vec::with_capacity(4 + value.len());
            v.extend_from_slice(&(4 + value.len() as u16).to_ne_bytes());
            v.extend_from_slice(&kind.to_ne_bytes());
            v.extend_from_slice(value);
            v
        };
        let conf = nla(IPV4_DEVCONF_ACCEPT_LOCAL, &u32::from(on).to_ne_bytes());
        let inet = nla(IFLA_INET_CONF | netlink_packet_core::NLA_F_NESTED, &conf);
        let spec = nla(u16::from(u8::from(AddressFamily::Inet)), &inet);
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        msg.attributes.push(LinkAttribute::AfSpecUnknown(spec));
        match self.request(
            "set accept_local",
            RouteNetlinkMessage::SetLink(msg),
            NLM_F_ACK,
        ) {
            Ok(_) => Ok(true),
            Err(NetlinkError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::ENODEV) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Every address of the namespace with the index of its interface.
    pub fn addresses(&mut self) -> Result<Vec<(u32, IpAddr)>, NetlinkError> {
        let msgs = self.request(
            "list addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for m in msgs {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS otherwise.
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                out.push((a.header.index, ip));
            }
        }
        Ok(out)
    }

    fn rule(v6: bool, mark: u32, mask: u32, pref: u32, table: u32) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = family(v6);
        m.header.action = RuleAction::ToTable;
        m.header.table = table as u8;
        m.attributes.push(RuleAttribute::FwMark(mark));
        m.attributes.push(RuleAttribute::FwMask(mask));
        m.attributes.push(RuleAttribute::Priority(pref));
        m.attributes.push(RuleAttribute::Table(table));
        m
    }

    /// `ip rule add fwmark MARK/MASK pref PREF lookup TABLE`. Returns false if it was there.
    pub fn add_rule(
        &mut self,
        v6: bool,
        mark: u32,
        mask: u32,
        pref: u32,
        table: u32,
    ) -> Result<bool, NetlinkError> {
        let msg = RouteNetlinkMessage::NewRule(Self::rule(v6, mark, mask, pref, table));
        ignore_exists(self.request("add rule", msg, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL))
    }

    /// Removes the rule added by `add_rule`. Returns false if it was not there.
    pub fn del_rule(
        &mut self,
        v6: bool,
        mark: u32,
        mask: u32,
        pref: u32,
        table: u32,
    ) -> Result<bool, NetlinkError> {
        let msg = RouteNetlinkMessage::DelRule(Self::rule(v6, mark, mask, pref, table));
        ignore_missing(self.request("delete rule", msg, NLM_F_ACK))
    }

    fn local_default(v6: bool, lo_index: u32, table: u32) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = family(v6);
        m.header.destination_prefix_length = 0;
        m.header.table = table as u8;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Host;
        m.header.kind = RouteType::Local;
        m.attributes.push(RouteAttribute::Table(table));
        m.attributes.push(RouteAttribute::Destination(if v6 {
            RouteAddress::Inet6(Ipv6Addr::UNSPECIFIED)
        } else {
            RouteAddress::Inet(Ipv4Addr::UNSPECIFIED)
        }));
        m.attributes.push(RouteAttribute::Oif(lo_index));
        m
    }

    /// `ip route add local 0.0.0.0/0 dev lo table TABLE` (or `::/0`).
    pub fn add_local_default(
        &mut self,
        v6: bool,
        lo: u32,
        table: u32,
    ) -> Result<bool, NetlinkError> {
        let msg = RouteNetlinkMessage::NewRoute(Self::local_default(v6, lo, table));
        ignore_exists(self.request("add route", msg, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL))
    }

    pub fn del_local_default(
        &mut self,
        v6: bool,
        lo: u32,
        table: u32,
    ) -> Result<bool, NetlinkError> {
        let msg = RouteNetlinkMessage::DelRoute(Self::local_default(v6, lo, table));
        ignore_missing(self.request("delete route", msg, NLM_F_ACK))
    }
}

impl Netlink {
    /// `tc qdisc del dev IF clsact`: removes the qdisc and every filter on it.
    pub fn del_clsact(&mut self, ifindex: u32) -> Result<bool, NetlinkError> {
        let mut m = TcMessage::default();
        m.header.index = ifindex as i32;
        m.header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        m.header.parent = TcHandle {
            major: 0xffff,
            minor: 0xfff1,
        }; // TC_H_CLSACT
        m.attributes.push(TcAttribute::Kind("clsact".into()));
        let msg = RouteNetlinkMessage::DelQueueDiscipline(m);
        match ignore_missing(self.request("delete clsact qdisc", msg, NLM_F_ACK)) {
            // Once an interface has had a clsact, its ingress queue stays and holds a
            // handle-less placeholder: deleting a clsact that is already gone then
            // answers EINVAL ("Invalid handle"), not ENOENT. ENODEV: the interface
            // went, and its qdiscs with it.
            Err(NetlinkError::Kernel { op, source })
                if matches!(source.raw_os_error(), Some(libc::EINVAL | libc::ENODEV)) =>
            {
                if self.has_clsact(ifindex)? {
                    Err(NetlinkError::Kernel { op, source })
                } else {
                    Ok(false)
                }
            }
            r => r,
        }
    }

    /// Whether the interface holds a clsact qdisc (`tc qdisc show dev IF`).
    pub fn has_clsact(&mut self, ifindex: u32) -> Result<bool, NetlinkError> {
        let mut m = TcMessage::default();
        m.header.index = ifindex as i32;
        let msgs = self.request(
            "list qdiscs",
            RouteNetlinkMessage::GetQueueDiscipline(m),
            NLM_F_DUMP,
        )?;
        Ok(msgs.iter().any(|m| match m {
            RouteNetlinkMessage::NewQueueDiscipline(q) => {
                q.header.index == ifindex as i32
                    && q.attributes
                        .iter()
                        .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
            }
            _ => false,
        }))
    }
}

impl Netlink {
    /// `tc filter del dev IF {ingress|egress} prio PRIO handle HANDLE` (any protocol):
    /// removes one filter of a clsact qdisc. Returns false if it was not there, its
    /// qdisc was not there, or the interface is gone.
    pub fn del_filter(
        &mut self,
        ifindex: u32,
        egress: bool,
        priority: u16,
        handle: u32,
    ) -> Result<bool, NetlinkError> {
        let mut m = TcMessage::default();
        m.header.index = ifindex as i32;
        m.header.handle = TcHandle::from(handle);
        // TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS or TC_H_MIN_EGRESS).
        m.header.parent = TcHandle {
            major: 0xffff,
            minor: if egress { 0xfff3 } else { 0xfff2 },
        };
        // TC_H_MAKE(prio << 16, htons(ETH_P_ALL)), as the filter was added.
        m.header.info = (u32::from(priority) << 16) | u32::from(0x0003u16.to_be());
        let msg = RouteNetlinkMessage::DelTrafficFilter(m);
        match self.request("delete tc filter", msg, NLM_F_ACK) {
            Ok(_) => Ok(true),
            // ENOENT: no such filter; EINVAL: no clsact qdisc to hold it; ENODEV: the
            // interface went away, and its filters with it.
            Err(NetlinkError::Kernel { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOENT | libc::ESRCH | libc::EINVAL | libc::ENODEV)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

fn family(v6: bool) -> AddressFamily {
    if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

fn ignore_exists(r: Result<Vec<RouteNetlinkMessage>, NetlinkError>) -> Result<bool, NetlinkError> {
    match r {
        Ok(_) => Ok(true),
        Err(NetlinkError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn ignore_missing(r: Result<Vec<RouteNetlinkMessage>, NetlinkError>) -> Result<bool, NetlinkError> {
    match r {
        Ok(_) => Ok(true),
        Err(NetlinkError::Kernel { source, .. })
            if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// What changed in a namespace, as told by its rtnetlink events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// An interface appeared, went or changed.
    pub links: bool,
    /// An address was added or removed.
    pub addrs: bool,
    /// A routing rule, or a route of `table`, was removed.
    pub routing: bool,
    /// A tc filter or qdisc was removed.
    pub tc: bool,
}

impl Changes {
    pub const ALL: Changes = Changes {
        links: true,
        addrs: true,
        routing: true,
        tc: true,
    };

    pub fn any(&self) -> bool {
        self.links || self.addrs || self.routing || self.tc
    }

    fn merge(&mut self, o: Changes) {
        self.links |= o.links;
        self.addrs |= o.addrs;
        self.routing |= o.routing;
        self.tc |= o.tc;
    }
}

// rtnetlink multicast groups (RTMGRP_* bits; RTNLGRP_IPV6_RULE = 19).
const GROUPS: u32 = 0x1 // link
    | 0x8 // tc
    | 0x10 // ipv4 addresses
    | 0x40 // ipv4 routes
    | 0x80 // ipv4 rules
    | 0x100 // ipv6 addresses
    | 0x400 // ipv6 routes
    | (1 << 18); // ipv6 rules

/// A socket subscribed to a namespace's link, address, rule, route and tc events. Opened
/// in the namespace (it stays bound to it wherever it is read from); non-blocking.
pub struct Watch {
    sock: Socket,
    /// Routes of this table matter (ours); others are ignored.
    table: u32,
}

impl Watch {
    /// Subscribes in the calling thread's namespace.
    pub fn open(table: u32) -> Result<Self, NetlinkError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        sock.bind(&SocketAddr::new(0, GROUPS))
            .map_err(NetlinkError::Socket)?;
        sock.set_non_blocking(true).map_err(NetlinkError::Socket)?;
        // Bursts (an interface going with its addresses and routes) fit; an overflow
        // still tells us to look at everything again.
        let _ = sock.set_rx_buf_sz(1 << 20);
        Ok(Self { sock, table })
    }

    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.sock.as_raw_fd()
    }

    /// Reads every event queued and says what they changed. Events lost to an overflow
    /// (ENOBUFS) or that cannot be decoded count as everything changed.
    pub fn drain(&mut self) -> Changes {
        let mut out = Changes::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.sock.recv(&mut &mut buf[..], 0) {
                Ok(0) => return out,
                Ok(n) => out.merge(self.classify(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // ENOBUFS (events were lost) or anything else: look again at everything.
                Err(_) => return Changes::ALL,
            }
        }
    }

    fn classify(&self, mut data: &[u8]) -> Changes {
        let mut out = Changes::default();
        while !data.is_empty() {
            let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(data) else {
                return Changes::ALL;
            };
            let len = (m.header.length as usize).max(1).min(data.len());
            data = &data[len..];
            let NetlinkPayload::InnerMessage(inner) = m.payload else {
                continue;
            };
            match inner {
                RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_) => {
                    out.links = true
                }
                RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_) => {
                    out.addrs = true
                }
                RouteNetlinkMessage::DelRule(_) => out.routing = true,
                RouteNetlinkMessage::DelRoute(r) => {
                    let table = r
                        .attributes
                        .iter()
                        .find_map(|a| match a {
                            RouteAttribute::Table(t) => Some(*t),
                            _ => None,
                        })
                        .unwrap_or(u32::from(r.header.table));
                    if table == self.table {
                        out.routing = true;
                    }
                }
                RouteNetlinkMessage::DelTrafficFilter(_)
                | RouteNetlinkMessage::DelQueueDiscipline(_) => out.tc = true,
                _ => {}
            }
        }
        out
    }
}
