//! Types and constants shared by the eBPF programs and the user-space loader.
//!
//! Every struct that crosses the kernel boundary is defined here once, `#[repr(C)]`,
//! with explicit padding so that its layout (and the BTF that `bpftool` prints) is the
//! same on both sides. Addresses are stored as four 32-bit words holding the bytes in
//! network order, exactly as they appear in a packet; an IPv4 address uses word 0.
#![no_std]

/// Proxy listener for traffic the app sends out.
pub const PORT_OUTBOUND: u16 = 15001;
/// Proxy listener for plaintext traffic arriving at the pod.
pub const PORT_INBOUND: u16 = 15006;
/// Proxy listener for HBONE (mTLS tunnel) traffic arriving at the pod.
pub const PORT_TUNNEL: u16 = 15008;
/// Proxy DNS listener (UDP and TCP), used only with DNS capture.
pub const PORT_DNS: u16 = 15053;
/// The DNS port captured with DNS capture on.
pub const DNS_PORT: u16 = 53;

/// SO_MARK set on every socket the proxy opens in the pod.
pub const PROXY_MARK: u32 = 0x539;
/// Mark carried by packets the engine steers back into the pod (and the return routing).
pub const RETURN_MARK: u32 = 0x111;
/// Mask applied to skb marks before comparing with the two marks above.
pub const MARK_MASK: u32 = 0xfff;
/// Routing table holding `local default dev lo` in every enrolled pod.
pub const ROUTE_TABLE: u32 = 100;
/// Preference of the `fwmark 0x111/0xfff lookup 100` rule in every enrolled pod.
pub const RULE_PREF: u32 = 32764;

/// Source of kubelet health probes as rewritten by the node (IPv4), network order.
pub const PROBE_V4: [u8; 4] = [169, 254, 7, 127];
/// Same, IPv6: fd16:9254:7127:1337:ffff:ffff:ffff:ffff.
pub const PROBE_V6: [u8; 16] = [
    0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
];

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;

/// Pods the engine can hold at once; also the size of the per-pod counter array.
/// Slot 0 of the counters is reserved for events that no pod could be charged with.
pub const MAX_PODS: u32 = 4096;
/// Addresses over all pods.
pub const MAX_POD_ADDRS: u32 = 4 * MAX_PODS;
/// Listener sockets over all pods (outbound, inbound, tunnel, DNS udp and tcp).
pub const MAX_LISTENERS: u32 = 8 * MAX_PODS;
/// New connections noted by tc for sk_lookup (least recently used ones make room).
pub const MAX_FLOWS: u32 = 65536;
/// Cgroups whose sockets are trusted as the proxy's own.
pub const MAX_PROXY_CGROUPS: u32 = 64;
/// Connections being opened by the node's own sockets to pods (kubelet probes).
pub const MAX_HOST_FLOWS: u32 = 16384;
/// Network namespaces whose sockets are the node's own (the agent's, normally one).
pub const MAX_NODE_NETNS: u32 = 16;
/// Interfaces carrying the tc programs, over all pods (and one wildcard per pod).
pub const MAX_COVERED: u32 = (MAX_POD_IFACES as u32 + 1) * MAX_PODS;
/// Index of the loopback interface in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Names of the maps and programs, as pinned under the engine's bpffs directory.
pub mod names {
    pub const PODS: &str = "pods";
    pub const POD_ADDRS: &str = "pod_addrs";
    pub const LISTENERS: &str = "listeners";
    pub const FLOWS: &str = "flows";
    pub const PROXY_FLOWS: &str = "proxy_flows";
    pub const PROXY_CGROUPS: &str = "proxy_cgroups";
    pub const COUNTERS: &str = "counters";
    pub const POD_INDEX: &str = "pod_index";
    pub const STEERED: &str = "steered";
    pub const HOST_FLOWS: &str = "host_flows";
    pub const NODE_NETNS: &str = "node_netns";
    pub const COVERED: &str = "covered";
    pub const GUARD_COUNTERS: &str = "guard_counters";
    /// aya-log's ring buffer; pinned so that a restarted loader reads the logs of the
    /// programs an earlier run attached.
    pub const LOGS: &str = "AYA_LOGS";
    /// Every map of the object, all pinned.
    pub const ALL_MAPS: [&str; 14] = [
        PODS,
        POD_ADDRS,
        LISTENERS,
        FLOWS,
        PROXY_FLOWS,
        PROXY_CGROUPS,
        COUNTERS,
        POD_INDEX,
        STEERED,
        HOST_FLOWS,
        NODE_NETNS,
        COVERED,
        GUARD_COUNTERS,
        LOGS,
    ];
    pub const PROG_SK_LOOKUP: &str = "redirect_lookup";
    pub const PROG_EGRESS: &str = "redirect_egress";
    pub const PROG_INGRESS: &str = "redirect_ingress";
    pub const PROG_LOOPBACK: &str = "redirect_loopback";
    pub const PROG_HOST_PROBES: &str = "redirect_host_probes";
    /// The node-wide link of `redirect_host_probes` (on the cgroup2 root), pinned as
    /// `node/host_probes` (`links/` holds the pods' links, by uid).
    pub const LINK_HOST_PROBES: &str = "host_probes";
    pub const PROG_GUARD: &str = "redirect_guard";
    /// The node-wide link of `redirect_guard` (cgroup_skb egress on the cgroup2 root),
    /// pinned as `node/guard`.
    pub const LINK_GUARD: &str = "guard";
}

/// An interface of an enrolled pod whose tc programs are attached (`covered` map).
/// `ifindex` 0 stands for every interface of the pod: pods enrolled by a version that
/// kept no such entries, until they are taken back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IfaceKey {
    pub netns: u64,
    pub ifindex: u32,
    pub _pad: u32,
}

/// Per-pod, per-CPU counters of the guard: what the cgroup egress program and the
/// route check of tc egress dropped. A map of its own, so that pinned `counters` keep
/// their layout across upgrades.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct GuardCounters {
    /// TCP (and captured DNS) of the pod's app leaving through an interface that does
    /// not carry our tc programs (not yet, or never: L3 devices): dropped.
    pub dropped_uncovered: u64,
    /// Packets of a connection whose SYN left without tc steering it (our tc filter
    /// was removed from inside the pod): dropped, so the connection never completes.
    pub dropped_unsteered: u64,
    /// New connections whose steered SYN would have been forwarded instead of
    /// delivered locally (our rule or route removed, forwarding on): dropped.
    pub dropped_unrouted: u64,
}

impl GuardCounters {
    pub fn add(&mut self, o: &GuardCounters) {
        self.dropped_uncovered += o.dropped_uncovered;
        self.dropped_unsteered += o.dropped_unsteered;
        self.dropped_unrouted += o.dropped_unrouted;
    }
}

/// `PodConfig::flags`: capture DNS (port 53, UDP and TCP) to the pod's 15053 sockets.
pub const POD_DNS_CAPTURE: u32 = 1;
/// `PodConfig::flags` bits 16 to 31: the enrolment's epoch, drawn (non-zero) at each
/// new enrolment of a pod. tc egress tags the decision it keeps for an app's socket with
/// it, so a decision taken before the pod was released and enrolled again is not
/// mistaken for one of this enrolment. 0 in configs written by earlier versions.
pub const POD_EPOCH_SHIFT: u32 = 16;

/// Per-pod settings read on the hot path, keyed by the pod's netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodConfig {
    /// Counter slot of the pod (1..MAX_PODS).
    pub id: u32,
    /// `POD_*` flags.
    pub flags: u32,
}

/// An address of an enrolled pod. tc ingress finds the pod of an arriving packet by its
/// destination address: the netns cookie helper of tc programs answers for the packet's
/// socket, and arriving packets have none. Pod addresses are unique on a node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub family: u32,
    pub addr: [u32; 4],
}

/// The pod owning an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodAddr {
    pub netns: u64,
    pub pod: u32,
    pub _pad: u32,
}

/// A proxy socket of a pod. `proto` is IPPROTO_TCP or IPPROTO_UDP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns: u64,
    pub port: u16,
    pub proto: u16,
    pub _pad: u32,
}

/// A new connection (or DNS datagram) as its first packet carries it: `src` is the side
/// that connects. No netns: sk_lookup, which reads this, cannot learn its namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub family: u32,
    pub proto: u32,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub _pad: u32,
}

/// `FlowVal::kind`: the pod opened it over lo (parity row 5): leave it alone.
pub const FLOW_LOCAL: u32 = 1;
/// The pod's app sent it out and tc steered it back in (row 3).
pub const FLOW_OUTBOUND: u32 = 3;
/// Like `FLOW_OUTBOUND`, DNS with capture on (row 8).
pub const FLOW_DNS: u32 = 4;
/// A socket of the node's own namespace connecting to a pod (the kubelet's probes):
/// the app takes it (row 4). Kept in `host_flows`, written only by the sock_ops program.
pub const FLOW_HOST: u32 = 5;

/// What tc, which sees a new connection first and knows its namespace, tells sk_lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowVal {
    pub netns: u64,
    pub pod: u32,
    pub kind: u32,
    /// When it was noted (`bpf_ktime_get_ns`): of two notes for one 5-tuple (a pod's
    /// app and another pod's proxy can draw the same ports in their own namespaces),
    /// sk_lookup believes the newer, the one written for the packet it is looking at.
    pub at: u64,
}

/// Per-pod, per-CPU counters; one slot per pod in the `counters` array.
/// Field names are what `bpftool map dump` and `redirect-user status` show.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct PodCounters {
    /// New connections steered to the outbound listener (15001).
    pub redirected_15001: u64,
    /// New connections steered to the inbound plaintext listener (15006).
    pub redirected_15006: u64,
    /// New connections steered to the inbound tunnel listener (15008).
    pub redirected_15008: u64,
    /// DNS queries (UDP datagrams and TCP connections) steered to 15053.
    pub redirected_15053: u64,
    /// Health probes left to the app: from the probe source (169.254.7.127), or opened
    /// by a socket of the node's own namespace.
    pub bypassed_probe: u64,
    /// Connections over the loopback interface, left alone.
    pub bypassed_loopback: u64,
    /// Connections opened by the proxy itself, left alone.
    pub bypassed_proxy: u64,
    /// Connections to steer whose listener is missing: dropped (fail closed).
    pub dropped_no_listener: u64,
    /// Packets from outside carrying one of the pod's own addresses as source: dropped.
    pub dropped_spoofed: u64,
    /// Packets the egress program could not steer (helper failure): dropped.
    pub dropped_error: u64,
    /// TCP from a pod that is not a kernel TCP socket's and could carry data past the
    /// proxy (fragments, header chains too long to read, hand-built segments with data):
    /// dropped.
    pub dropped_unparsable: u64,
    /// TCP in an enrolled pod to an address that is no pod's, with no note saying why
    /// (charged to slot 0): dropped.
    pub dropped_unknown_dst: u64,
}

impl PodCounters {
    /// Adds another CPU's (or pod's) counters to these.
    pub fn add(&mut self, o: &PodCounters) {
        self.redirected_15001 += o.redirected_15001;
        self.redirected_15006 += o.redirected_15006;
        self.redirected_15008 += o.redirected_15008;
        self.redirected_15053 += o.redirected_15053;
        self.bypassed_probe += o.bypassed_probe;
        self.bypassed_loopback += o.bypassed_loopback;
        self.bypassed_proxy += o.bypassed_proxy;
        self.dropped_no_listener += o.dropped_no_listener;
        self.dropped_spoofed += o.dropped_spoofed;
        self.dropped_error += o.dropped_error;
        self.dropped_unparsable += o.dropped_unparsable;
        self.dropped_unknown_dst += o.dropped_unknown_dst;
    }
}

/// Length of a pod uid as stored in the pinned pod index (Kubernetes uids are 36 bytes).
pub const UID_LEN: usize = 64;
/// Longest interface name, as the kernel's IFNAMSIZ.
pub const IFNAME_LEN: usize = 16;
/// Interfaces per pod the engine attaches tc programs to.
pub const MAX_POD_IFACES: usize = 4;

/// Key of the pinned pod index: the pod uid, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodUid {
    pub uid: [u8; UID_LEN],
}

/// Everything needed to find and undo a pod's enrolment after a restart of the engine.
/// Read only by user space; pinned so that it survives the process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodRecord {
    pub netns_cookie: u64,
    /// Device and inode of the pod's network namespace, to recognise it again.
    pub netns_dev: u64,
    pub netns_ino: u64,
    pub id: u32,
    pub flags: u32,
    /// Interfaces carrying the tc programs, NUL-padded names.
    pub ifaces: [[u8; IFNAME_LEN]; MAX_POD_IFACES],
    /// Value of each interface's `accept_local` before enrolment, restored after.
    pub accept_local_before: [u8; MAX_POD_IFACES],
    /// What the engine created in the pod's namespace (the rule and the route of each
    /// family, the tc filters) and so removes at un-enrolment, and whether that
    /// un-enrolment is under way; bits defined by the loader. Takes the place of
    /// padding, so records pinned by earlier versions (where it reads 0) keep their size.
    pub owned: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data #[repr(C)] structs with explicit padding.
    unsafe impl aya::Pod for PodConfig {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for PodAddr {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowVal {}
    unsafe impl aya::Pod for PodCounters {}
    unsafe impl aya::Pod for PodUid {}
    unsafe impl aya::Pod for PodRecord {}
    unsafe impl aya::Pod for IfaceKey {}
    unsafe impl aya::Pod for GuardCounters {}
}
