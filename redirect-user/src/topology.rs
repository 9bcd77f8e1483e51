//! Throwaway network topologies for the demo, the tests and the benchmarks: a node
//! namespace holding a bridge, and hosts (pods, outside peers) in namespaces of their
//! own, each wired to the bridge by a veth pair, with IPv4 and IPv6 addresses.
//! Everything is removed when the [`Topology`] is dropped, on panic too, and on SIGINT
//! or SIGTERM ([`crate::interrupt`]).
//!
//! [`Topology::two_nodes`] builds two such nodes, routed to each other over one veth
//! pair named `wire` (see its documentation for the addressing).
//!
//! Building a topology runs `ip` (iproute2); enrolling a pod does not.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// The name of the veth pair joining the two nodes of [`Topology::two_nodes`], in each
/// node namespace.
pub const WIRE: &str = "wire";

/// A namespace of the topology.
#[derive(Debug)]
pub struct Host {
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// The node (1 or 2) whose bridge the host is on.
    pub node: usize,
}

impl Host {
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    pub fn netns(&self) -> Result<Netns> {
        Netns::open(self.path()).with_context(|| format!("opening namespace {}", self.name))
    }

    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { self.v6.into() } else { self.v4.into() }
    }
}

pub struct Topology {
    prefix: String,
    /// Node namespaces: `<prefix>-node`, then `<prefix>-node2` for two nodes.
    nodes: Vec<String>,
    subnet: u8,
    /// Routed addressing (two nodes) rather than one flat /16 (one node).
    routed: bool,
    hosts: Vec<Host>,
    /// Every namespace made, registered for removal on SIGINT/SIGTERM while it exists.
    registered: Vec<crate::interrupt::Registered>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An IPv4 and an IPv6 address (without duplicate address detection) on `dev` in `ns`.
fn add_addrs(ns: &str, dev: &str, v4: &str, v6: &str) -> Result<()> {
    ip(&["-n", ns, "addr", "add", v4, "dev", dev])?;
    ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"])
}

/// No duplicate address detection and no router solicitations on the interfaces to
/// come in `ns`, link-local addresses included: a router whose link-local address is
/// still tentative cannot resolve its IPv6 neighbours (about 2 s lost on the first
/// connection), and each such multicast frame is flooded to every port of a bridge.
fn quiet(ns: &str) -> Result<()> {
    let netns = Netns::open(format!("/var/run/netns/{ns}"))?;
    netns.run(|| -> Result<()> {
        for key in [
            "net/ipv6/conf/default/accept_dad",
            "net/ipv6/conf/all/accept_dad",
            "net/ipv6/conf/default/router_solicitations",
            "net/ipv6/conf/all/router_solicitations",
        ] {
            let path = format!("/proc/sys/{key}");
            std::fs::write(&path, "0").with_context(|| format!("writing {path} in {ns}"))?;
        }
        Ok(())
    })?
}

/// Writes `value` to `/proc/sys/<key>` inside the namespace `ns`.
fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let netns = Netns::open(format!("/var/run/netns/{ns}"))?;
    let path = format!("/proc/sys/{key}");
    netns
        .run(|| std::fs::write(&path, value))?
        .with_context(|| format!("writing {path} in {ns}"))
}

impl Topology {
    /// A new topology whose namespaces are named `<tag>-<unique>-…`. Each topology gets
    /// its own subnets 10.<n>.0.0/16 and fd00:<n>::/64, `n` from 100 up.
    pub fn new(tag: &str) -> Result<Self> {
        let mut t = Self::empty(tag, false);
        t.add_node()?;
        Ok(t)
    }

    /// Two nodes, `<prefix>-node` (node 1) and `<prefix>-node2` (node 2), each with its
    /// bridge `br0`, joined by the veth pair [`WIRE`] and routing between them
    /// (forwarding on). With `s` the topology's number (from 100 up):
    ///
    /// - pods of node `k` get 10.<s>.<k>.<n>/24 and fd00:<s>:<k>::<n>/64 (`n` 1 to 253)
    ///   and default routes via their bridge, 10.<s>.<k>.254 and fd00:<s>:<k>::fe;
    /// - the wire ends are 10.<s>.0.<k>/24 and fd00:<s>::<k>/64 on node `k`, each node
    ///   routes the other's pod subnets via the other end.
    ///
    /// IPv6 addresses are added without duplicate address detection, so the first
    /// packets are not lost.
    pub fn two_nodes(tag: &str) -> Result<Self> {
        let mut t = Self::empty(tag, true);
        t.add_node()?;
        t.add_node()?;
        let (n1, n2) = (t.nodes[0].clone(), t.nodes[1].clone());
        ip(&[
            "link", "add", WIRE, "netns", &n1, "type", "veth", "peer", "name", WIRE, "netns", &n2,
        ])?;
        for (k, ns) in [(1usize, &n1), (2, &n2)] {
            let other = 3 - k;
            let (v4, v6) = t.wire_addrs(k);
            let (peer4, peer6) = t.wire_addrs(other);
            let (net4, net6) = t.pod_nets(other);
            add_addrs(ns, WIRE, &format!("{v4}/24"), &format!("{v6}/64"))?;
            ip(&["-n", ns, "link", "set", WIRE, "up"])?;
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                &net4,
                "via",
                &peer4.to_string(),
                "dev",
                WIRE,
            ])?;
            ip(&[
                "-n",
                ns,
                "-6",
                "route",
                "add",
                &net6,
                "via",
                &peer6.to_string(),
                "dev",
                WIRE,
            ])?;
        }
        Ok(t)
    }

    fn empty(tag: &str, routed: bool) -> Self {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let unique = format!("{:x}{:x}", std::process::id() & 0xffff, seq);
        Self {
            prefix: format!("{tag}-{unique}"),
            nodes: Vec::new(),
            subnet: 100 + (seq % 150) as u8,
            routed,
            hosts: Vec::new(),
            registered: Vec::new(),
        }
    }

    /// Adds the next node namespace with its bridge (and, routed, its gateway addresses
    /// and forwarding). Recorded before anything else, so Drop removes it on failure.
    fn add_node(&mut self) -> Result<()> {
        let k = self.nodes.len() + 1;
        let ns = if k == 1 {
            format!("{}-node", self.prefix)
        } else {
            format!("{}-node{k}", self.prefix)
        };
        ip(&["netns", "add", &ns])?;
        self.registered.push(crate::interrupt::netns(&ns));
        self.nodes.push(ns.clone());
        if self.routed {
            quiet(&ns)?;
        }
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ns, "link", "set", "br0", "up"])?;
        if self.routed {
            let (v4, v6) = self.gateway(k).expect("routed node");
            add_addrs(&ns, "br0", &format!("{v4}/24"), &format!("{v6}/64"))?;
            sysctl(&ns, "net/ipv4/ip_forward", "1")?;
            sysctl(&ns, "net/ipv6/conf/all/forwarding", "1")?;
        }
        Ok(())
    }

    fn wire_addrs(&self, node: usize) -> (Ipv4Addr, Ipv6Addr) {
        (
            Ipv4Addr::new(10, self.subnet, 0, node as u8),
            Ipv6Addr::new(0xfd00, self.subnet as u16, 0, 0, 0, 0, 0, node as u16),
        )
    }

    fn pod_nets(&self, node: usize) -> (String, String) {
        let s = self.subnet;
        (
            format!("10.{s}.{node}.0/24"),
            format!("fd00:{s:x}:{node}::/64"),
        )
    }

    /// Adds a host namespace with `eth0` on the bridge, host number `n` (1 to 65534) of
    /// the subnets. On two nodes, the host goes on node 1 (see [`Self::add_host_on`]).
    pub fn add_host(&mut self, name: &str, n: u16) -> Result<&Host> {
        self.add_host_on(1, name, n)
    }

    /// Adds a host namespace with `eth0` on the bridge of node `node` (1, or 2 for
    /// [`Self::two_nodes`]), host number `n` of that node's subnets (1 to 65534 on one
    /// node, 1 to 253 on two).
    pub fn add_host_on(&mut self, node: usize, name: &str, n: u16) -> Result<&Host> {
        if node == 0 || node > self.nodes.len() {
            bail!("no node {node}: this topology has {}", self.nodes.len());
        }
        if self.routed && !(1..=253).contains(&n) {
            bail!("host number {n} is out of range (1 to 253 on two nodes)");
        }
        let node_ns = self.nodes[node - 1].clone();
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns])?;
        self.registered.push(crate::interrupt::netns(&ns));
        let (v4, v6, plen4) = if self.routed {
            (
                Ipv4Addr::new(10, self.subnet, node as u8, n as u8),
                Ipv6Addr::new(0xfd00, self.subnet as u16, node as u16, 0, 0, 0, 0, n),
                24,
            )
        } else {
            (
                Ipv4Addr::new(10, self.subnet, (n >> 8) as u8, n as u8),
                Ipv6Addr::new(0xfd00, self.subnet as u16, 0, 0, 0, 0, 0, n),
                16,
            )
        };
        self.hosts.push(Host {
            name: ns.clone(),
            v4,
            v6,
            node,
        });
        // Quiet from the start: no duplicate address detection and no router
        // solicitations. Each of those multicast frames is flooded by the bridge to every
        // port, one backlog entry per port; with hundreds of hosts that overflowed the
        // CPUs' backlog (netdev_max_backlog) for some 15 s after creation, dropping
        // whatever else was in flight (a connection's SYN, then waiting 1 s).
        quiet(&ns)?;
        let port = format!("v{}", self.hosts.len());
        ip(&[
            "link", "add", &port, "netns", &node_ns, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        ip(&["-n", &node_ns, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        add_addrs(&ns, "eth0", &format!("{v4}/{plen4}"), &format!("{v6}/64"))?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        if let Some((gw4, gw6)) = self.gateway(node) {
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &gw4.to_string(),
            ])?;
            ip(&[
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gw6.to_string(),
            ])?;
        }
        Ok(self.hosts.last().unwrap())
    }

    pub fn host(&self, name: &str) -> &Host {
        let full = format!("{}-{name}", self.prefix);
        self.hosts
            .iter()
            .find(|h| h.name == full)
            .expect("host of this topology")
    }

    /// The node (1 or 2) the host `name` is on.
    pub fn node_of(&self, name: &str) -> usize {
        self.host(name).node
    }

    /// The node namespace (holds the bridge); node 1 on two nodes.
    pub fn node(&self) -> &str {
        &self.nodes[0]
    }

    /// The namespace of node `node` (1, or 2 for [`Self::two_nodes`]).
    pub fn node_ns(&self, node: usize) -> &str {
        &self.nodes[node - 1]
    }

    /// How many nodes: 1 or 2.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The namespace names of this topology all start with `<prefix>-`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The gateway addresses (on `br0`) of node `node`'s pods; none on one node.
    pub fn gateway(&self, node: usize) -> Option<(Ipv4Addr, Ipv6Addr)> {
        if !self.routed || node == 0 || node > 2 {
            return None;
        }
        Some((
            Ipv4Addr::new(10, self.subnet, node as u8, 254),
            Ipv6Addr::new(0xfd00, self.subnet as u16, node as u16, 0, 0, 0, 0, 0xfe),
        ))
    }

    /// Where to watch the traffic between the nodes: node 1's namespace and its end of
    /// the wire (node 2's end has the same name in [`Self::node_ns`]`(2)`); none on one
    /// node.
    pub fn wire(&self) -> Option<(String, &'static str)> {
        (self.nodes.len() == 2).then(|| (self.nodes[0].clone(), WIRE))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.name]);
        }
        for n in &self.nodes {
            let _ = ip(&["netns", "del", n]);
        }
    }
}
