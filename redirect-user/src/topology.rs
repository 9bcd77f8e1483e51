//! Throwaway network topologies for the demo, the tests and the benchmarks: a node
//! namespace holding a bridge, and hosts (pods, outside peers) in namespaces of their
//! own, each wired to the bridge by a veth pair, with IPv4 and IPv6 addresses.
//! Everything is removed when the [`Topology`] is dropped, on panic too.
//!
//! Building a topology runs `ip` (iproute2); enrolling a pod does not.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// A namespace of the topology.
#[derive(Debug)]
pub struct Host {
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
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
    node: String,
    subnet: u8,
    hosts: Vec<Host>,
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

impl Topology {
    /// A new topology whose namespaces are named `<tag>-<unique>-…`. Each topology gets
    /// its own subnets 10.<n>.0.0/16 and fd00:<n>::/64, `n` from 100 up.
    pub fn new(tag: &str) -> Result<Self> {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let unique = format!("{:x}{:x}", std::process::id() & 0xffff, seq);
        let subnet = 100 + (seq % 150) as u8;
        let prefix = format!("{tag}-{unique}");
        let node = format!("{prefix}-node");
        ip(&["netns", "add", &node])?;
        let t = Self {
            prefix,
            node,
            subnet,
            hosts: Vec::new(),
        };
        ip(&["-n", &t.node, "link", "set", "lo", "up"])?;
        ip(&["-n", &t.node, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &t.node, "link", "set", "br0", "up"])?;
        Ok(t)
    }

    /// Adds a host namespace with `eth0` on the bridge, host number `n` (1 to 65534) of
    /// the subnets.
    pub fn add_host(&mut self, name: &str, n: u16) -> Result<&Host> {
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns])?;
        let v4 = Ipv4Addr::new(10, self.subnet, (n >> 8) as u8, n as u8);
        let v6 = Ipv6Addr::new(0xfd00, self.subnet as u16, 0, 0, 0, 0, 0, n);
        self.hosts.push(Host {
            name: ns.clone(),
            v4,
            v6,
        });
        let port = format!("v{}", self.hosts.len());
        ip(&[
            "link", "add", &port, "netns", &self.node, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        ip(&[
            "-n", &self.node, "link", "set", &port, "master", "br0", "up",
        ])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{v4}/16"), "dev", "eth0"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(self.hosts.last().unwrap())
    }

    pub fn host(&self, name: &str) -> &Host {
        let full = format!("{}-{name}", self.prefix);
        self.hosts
            .iter()
            .find(|h| h.name == full)
            .expect("host of this topology")
    }

    /// The node namespace (holds the bridge).
    pub fn node(&self) -> &str {
        &self.node
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.name]);
        }
        let _ = ip(&["netns", "del", &self.node]);
    }
}
