use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_SK_STORAGE_GET_F_CREATE, TC_ACT_OK, TC_ACT_SHOT, bpf_sock,
        sk_action::{SK_DROP, SK_PASS},
    },
    btf_maps::{HashMap, LruHashMap, PerCpuArray, SkStorage},
    helpers::generated as h,
    macros::{btf_map, cgroup_skb, classifier, sk_lookup, sock_ops},
    programs::{SkBuffContext, SkLookupContext, SockOpsContext, TcContext},
};
use aya_log_ebpf::warn;
use redirect_ebpf::*;

// ---------------------------------------------------------------------------------
// Maps. Policy lives here, never in code paths: enrolling a pod is map writes.
// ---------------------------------------------------------------------------------

/// Pod settings by netns cookie.
#[btf_map(name = "pods")]
static PODS: HashMap<u64, PodConfig, { MAX_PODS as usize }> = HashMap::new();

/// The pods' own addresses, and whose they are.
#[btf_map(name = "pod_addrs")]
static POD_ADDRS: HashMap<AddrKey, PodAddr, { MAX_POD_ADDRS as usize }> = HashMap::new();

/// The proxy's sockets per pod and port. Declared by hand: aya-ebpf's SockHash has a
/// 4-byte value, and the kernel answers user-space lookups (`bpftool map dump`) only
/// for an 8-byte one, with the socket cookie.
#[repr(C)]
pub struct SockHashDef {
    r#type: *const [i32; 18], // BPF_MAP_TYPE_SOCKHASH
    key: *const ListenerKey,
    value: *const u64,
    max_entries: *const [i32; MAX_LISTENERS as usize],
}
unsafe impl Sync for SockHashDef {}

#[btf_map(name = "listeners")]
static LISTENERS: SockHashDef = SockHashDef {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
};

/// Hints from tc for what sk_lookup cannot decide from the addresses alone: connections
/// a pod's app sent out (steered back in: which pod) and connections over a pod's lo.
/// Only a pod's own sockets write here, never packets from outside. sk_lookup checks each
/// note against the pod addresses before acting on it, and decides inbound connections
/// without one, so a lost or planted note can drop a connection but never bypass the
/// proxy.
#[btf_map(name = "flows")]
static FLOWS: LruHashMap<FlowKey, FlowVal, { MAX_FLOWS as usize }> = LruHashMap::new();

/// Connections the proxy opened over a pod's lo (to the app, from the client's address):
/// sk_lookup leaves them to the kernel (row 6), and tc egress sends the app's replies to
/// them back into the pod. Only the proxy's own sockets write here, so no app can turn
/// these notes over.
#[btf_map(name = "proxy_flows")]
static PROXY_FLOWS: LruHashMap<FlowKey, FlowVal, { MAX_FLOWS as usize }> = LruHashMap::new();

/// Connections that a socket of the node's own namespace is opening to a pod address:
/// the kubelet's health probes (row 4, without the upstream SNAT address). Written only
/// by `redirect_host_probes`, which sees the socket itself, never a packet: a packet
/// forwarded from elsewhere that merely carries the node's address writes nothing.
/// Removed when that socket closes.
#[btf_map(name = "host_flows")]
static HOST_FLOWS: LruHashMap<FlowKey, FlowVal, { MAX_HOST_FLOWS as usize }> = LruHashMap::new();

/// Netns cookies of the node's own namespace(s): whose sockets' connections to pods
/// are probes.
#[btf_map(name = "node_netns")]
static NODE_NETNS: HashMap<u64, u8, { MAX_NODE_NETNS as usize }> = HashMap::new();

/// Cgroup ids whose 0x539-marked sockets are the proxy's (0: any cgroup).
#[btf_map(name = "proxy_cgroups")]
static PROXY_CGROUPS: HashMap<u64, u8, { MAX_PROXY_CGROUPS as usize }> = HashMap::new();

/// Per-pod, per-CPU counters, indexed by `PodConfig::id` (0: not charged to a pod).
#[btf_map(name = "counters")]
static COUNTERS: PerCpuArray<PodCounters, { MAX_PODS as usize }> = PerCpuArray::new();

/// Pod uid to the record user space needs to find and undo an enrolment. Never read
/// here; declared so that it is created from this object's BTF and dumps with names.
#[btf_map(name = "pod_index")]
static POD_INDEX: HashMap<PodUid, PodRecord, { MAX_PODS as usize }> = HashMap::new();

/// tc egress's decision for an app's TCP socket, taken once (`STEER` or `PASS`): at its
/// SYN for a connection it opens, at its first packet for one it accepted (a reply to
/// the proxy, or not). Every later packet follows it without a lookup. Freed with the
/// socket.
#[btf_map(name = "steered")]
static STEERED: SkStorage<u32> = SkStorage::new();
const STEER: u32 = 1;
const PASS: u32 = 2;
/// Written by the guard at a connecting socket's SYN, before tc sees it: tc egress
/// replaces it with its decision. A connection still `PENDING` once past its SYN left
/// without tc (our filter removed from inside the pod) and is dropped.
const PENDING: u32 = 3;

/// Interfaces of enrolled pods that carry our tc programs: the guard lets the pod's TCP
/// leave only through these (and lo).
#[btf_map(name = "covered")]
static COVERED: HashMap<IfaceKey, u32, { MAX_COVERED as usize }> = HashMap::new();

/// Per-pod, per-CPU counters of the guard, indexed like `counters`.
#[btf_map(name = "guard_counters")]
static GUARD_COUNTERS: PerCpuArray<GuardCounters, { MAX_PODS as usize }> = PerCpuArray::new();

// ---------------------------------------------------------------------------------
// Small helpers.
// ---------------------------------------------------------------------------------

const BPF_SK_LOOKUP_F_NO_REUSEPORT: u64 = 2;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_SYN_SENT: u32 = 2;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
/// `Packet::proto` when the IPv6 header chain is longer than the walk: it may be TCP.
const PROTO_UNKNOWN: u32 = 255;
/// IPv6 extension headers walked before giving up (the packet is then not parsed).
const MAX_IPV6_EXT: usize = 8;
/// How long sk_lookup believes a note: long enough for a SYN's retransmissions and a
/// SYN-cookie handshake, short enough that a stale one seldom meets a reused 5-tuple.
const NOTE_TTL_NS: u64 = 30_000_000_000;
/// `note_flow` kind for a local connection of the proxy's own (kept in `PROXY_FLOWS`).
const FLOW_PROXY: u32 = 0;

#[inline(always)]
fn count(id: u32, f: impl FnOnce(&mut PodCounters)) {
    if let Some(c) = COUNTERS.get_ptr_mut(id) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
fn count_guard(id: u32, f: impl FnOnce(&mut GuardCounters)) {
    if let Some(c) = GUARD_COUNTERS.get_ptr_mut(id) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
fn pod_config(netns: u64) -> Option<PodConfig> {
    // SAFETY: copied out at once; user space replaces entries, never frees them in place.
    unsafe { PODS.get(&netns).copied() }
}

#[inline(always)]
fn addr_owner(family: u32, addr: &[u32; 4]) -> Option<PodAddr> {
    // SAFETY: copied out at once.
    unsafe {
        POD_ADDRS
            .get(&AddrKey {
                family,
                addr: *addr,
            })
            .copied()
    }
}

#[inline(always)]
fn v4(a: u32) -> [u32; 4] {
    [a, 0, 0, 0]
}

#[inline(always)]
fn is_loopback(family: u32, a: &[u32; 4]) -> bool {
    if family == AF_INET {
        a[0].to_ne_bytes()[0] == 127
    } else {
        a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == u32::from_ne_bytes([0, 0, 0, 1])
    }
}

#[inline(always)]
fn is_probe(family: u32, a: &[u32; 4]) -> bool {
    if family == AF_INET {
        a[0] == u32::from_ne_bytes(PROBE_V4)
    } else {
        let p = PROBE_V6;
        a[0] == u32::from_ne_bytes([p[0], p[1], p[2], p[3]])
            && a[1] == u32::from_ne_bytes([p[4], p[5], p[6], p[7]])
            && a[2] == u32::from_ne_bytes([p[8], p[9], p[10], p[11]])
            && a[3] == u32::from_ne_bytes([p[12], p[13], p[14], p[15]])
    }
}

// ---------------------------------------------------------------------------------
// sk_lookup: which proxy socket takes a new connection (or DNS datagram).
//
// It decides from durable state: the pod addresses say whose a destination is, so a
// TCP connection to a pod address goes to that pod's 15008 / 15006 whatever tc saw or
// missed (fragments reassembled after tc, header chains tc could not walk, SYN cookies
// completed long after the SYN). tc's notes add what the addresses cannot tell: that a
// connection was sent out by a pod's app (steered back into it) or made over its lo.
// ---------------------------------------------------------------------------------

#[sk_lookup]
pub fn redirect_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context is the kernel's bpf_sk_lookup for this program type. Each
    // field is read on its own, straight off the context pointer, as the verifier wants.
    let key = unsafe {
        let l = ctx.lookup;
        macro_rules! rd {
            ($($f:tt)+) => { core::ptr::read_volatile(core::ptr::addr_of!((*l).$($f)+)) };
        }
        let family: u32 = rd!(family);
        let (src, dst) = if family == AF_INET {
            (v4(rd!(remote_ip4)), v4(rd!(local_ip4)))
        } else {
            (
                [
                    rd!(remote_ip6[0]),
                    rd!(remote_ip6[1]),
                    rd!(remote_ip6[2]),
                    rd!(remote_ip6[3]),
                ],
                [
                    rd!(local_ip6[0]),
                    rd!(local_ip6[1]),
                    rd!(local_ip6[2]),
                    rd!(local_ip6[3]),
                ],
            )
        };
        FlowKey {
            family,
            proto: rd!(protocol),
            src,
            dst,
            sport: u16::from_be(rd!(remote_port)),
            dport: rd!(local_port) as u16,
            _pad: 0,
        }
    };
    // Row 5: loopback destinations are never touched.
    if is_loopback(key.family, &key.dst) {
        return SK_PASS;
    }
    let owner = addr_owner(key.family, &key.dst);

    // The notes, each checked against the addresses: a note written in one pod never
    // decides for another. The 5-tuple does not name the namespace, and a pod's app and
    // another pod's proxy (row 6, spoofing the app's pod as source) can draw the same
    // ports: the newer note is the one tc wrote for this very packet.
    // tc ingress removes both for a SYN from outside, and a note is believed for
    // `NOTE_TTL_NS` only (its SYN, retransmissions, a SYN-cookie handshake's end).
    let note = match unsafe { (PROXY_FLOWS.get(&key).copied(), FLOWS.get(&key).copied()) } {
        (Some(p), Some(n)) => Some(if p.at >= n.at { p } else { n }),
        (p, n) => p.or(n),
    }
    .filter(|n| unsafe { h::bpf_ktime_get_ns() }.wrapping_sub(n.at) < NOTE_TTL_NS);
    if let Some(flow) = note {
        match flow.kind {
            // Row 5: the pod talking to itself over lo; row 6: the proxy reaching the app.
            FLOW_LOCAL if owner.is_none_or(|o| o.netns == flow.netns) => {
                count(flow.pod, |c| c.bypassed_loopback += 1);
                return SK_PASS;
            }
            // Row 3 (and 8): sent by the app of the pod whose address is the source.
            FLOW_OUTBOUND | FLOW_DNS
                if addr_owner(key.family, &key.src).is_some_and(|s| s.netns == flow.netns) =>
            {
                let port = if flow.kind == FLOW_DNS {
                    PORT_DNS
                } else {
                    PORT_OUTBOUND
                };
                return assign(&ctx, flow.netns, flow.pod, port, key.proto);
            }
            _ => {}
        }
    }
    // Row 9: other UDP (and anything not TCP) is the kernel's.
    if key.proto != IPPROTO_TCP {
        return SK_PASS;
    }
    let Some(pod) = owner else {
        // TCP steered into an enrolled pod for an address that is no pod's and with no
        // note to say why: no proxy to give it to, and never the app (fail closed).
        count(0, |c| c.dropped_unknown_dst += 1);
        return SK_DROP;
    };
    // Row 4: health probes reach the app: from the probe address, or opened by a
    // socket of the node's own namespace (the kubelet) to this pod.
    if is_probe(key.family, &key.src) || is_host_probe(&key, pod.pod) {
        count(pod.pod, |c| c.bypassed_probe += 1);
        return SK_PASS;
    }
    // Rows 1 and 2.
    let port = if key.dport == PORT_TUNNEL {
        PORT_TUNNEL
    } else {
        PORT_INBOUND
    };
    assign(&ctx, pod.netns, pod.pod, port, key.proto)
}

/// A connection a socket of the node's namespace is opening to pod `pod`.
#[inline(always)]
fn is_host_probe(key: &FlowKey, pod: u32) -> bool {
    unsafe { HOST_FLOWS.get(key) }.is_some_and(|n| {
        n.pod == pod && unsafe { h::bpf_ktime_get_ns() }.wrapping_sub(n.at) < NOTE_TTL_NS
    })
}

/// Hands the connection to the pod's proxy socket on `port`; drops it when there is none
/// (row 11: fail closed).
#[inline(always)]
fn assign(ctx: &SkLookupContext, netns: u64, pod: u32, port: u16, proto: u32) -> u32 {
    let lkey = ListenerKey {
        netns,
        port,
        proto: proto as u16,
        _pad: 0,
    };
    // SAFETY: raw helper calls on a sockhash; the socket reference is released below.
    unsafe {
        let sk = h::bpf_map_lookup_elem(
            &LISTENERS as *const SockHashDef as *mut c_void,
            &lkey as *const ListenerKey as *const c_void,
        );
        if sk.is_null() {
            count(pod, |c| c.dropped_no_listener += 1);
            warn!(
                ctx,
                "redirect: pod {}: no listener on port {}, dropped", pod, port
            );
            return SK_DROP;
        }
        // Exactly the socket in the map: without NO_REUSEPORT the kernel would pick
        // within its SO_REUSEPORT group, which during an upgrade holds the old proxy's
        // socket too.
        let err = h::bpf_sk_assign(ctx.lookup as *mut c_void, sk, BPF_SK_LOOKUP_F_NO_REUSEPORT);
        h::bpf_sk_release(sk);
        if err != 0 {
            count(pod, |c| c.dropped_no_listener += 1);
            warn!(
                ctx,
                "redirect: pod {}: assign to port {} failed ({}), dropped", pod, port, err
            );
            return SK_DROP;
        }
    }
    count(pod, |c| match port {
        PORT_OUTBOUND => c.redirected_15001 += 1,
        PORT_INBOUND => c.redirected_15006 += 1,
        PORT_TUNNEL => c.redirected_15008 += 1,
        _ => c.redirected_15053 += 1,
    });
    SK_PASS
}

// ---------------------------------------------------------------------------------
// tc: packet parsing shared by the three classifiers.
// ---------------------------------------------------------------------------------

struct Packet {
    family: u32,
    /// The upper-layer protocol (`PROTO_UNKNOWN` past a header chain too long to walk).
    proto: u32,
    src: [u32; 4],
    dst: [u32; 4],
    /// Ports and TCP flags, valid only with `l4`.
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    /// The transport header was read whole: not a later fragment, not a first fragment
    /// cut short, not behind a header chain too long to walk.
    l4: bool,
    /// TCP only: the segment carries data.
    payload: bool,
}

impl Packet {
    #[inline(always)]
    fn maybe_tcp(&self) -> bool {
        self.proto == IPPROTO_TCP || self.proto == PROTO_UNKNOWN
    }

    #[inline(always)]
    fn is_syn(&self) -> bool {
        self.l4 && self.proto == IPPROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Walks IPv6 extension headers (hop-by-hop, routing, fragment, destination options,
/// authentication) to the upper-layer header, as ip6tables' `-p tcp` does. Returns the
/// upper-layer protocol, its offset, and whether its header is in this packet (not in a
/// later fragment). A chain longer than the walk gives `PROTO_UNKNOWN`.
#[inline(always)]
fn skip_ipv6_extensions(ctx: &TcContext) -> Option<(u32, usize, bool)> {
    let mut next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
    let mut off = ETH_HLEN + 40;
    for _ in 0..MAX_IPV6_EXT {
        match next {
            0 | 43 | 60 => {
                let h: [u8; 2] = ctx.load(off).ok()?;
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            51 => {
                let h: [u8; 2] = ctx.load(off).ok()?;
                next = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            44 => {
                let h: [u8; 4] = ctx.load(off).ok()?;
                next = h[0];
                off += 8;
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    // A later fragment: the upper-layer header is in the first one.
                    return Some((next as u32, off, false));
                }
            }
            _ => return Some((next as u32, off, true)),
        }
    }
    Some((PROTO_UNKNOWN, off, false))
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    // `end`: where the IP packet ends (a received frame may carry padding after it).
    let (family, proto, src, dst, l4_off, has_l4, end) = match ethertype {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
            let total = u16::from_be(ctx.load(ETH_HLEN + 2).ok()?) as usize;
            let frag: u16 = u16::from_be(ctx.load(ETH_HLEN + 6).ok()?);
            let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
            let src: u32 = ctx.load(ETH_HLEN + 12).ok()?;
            let dst: u32 = ctx.load(ETH_HLEN + 16).ok()?;
            (
                AF_INET,
                proto as u32,
                v4(src),
                v4(dst),
                ETH_HLEN + ((vihl & 0xf) as usize) * 4,
                // A later fragment has no transport header.
                frag & 0x1fff == 0,
                ETH_HLEN + total,
            )
        }
        ETH_P_IPV6 => {
            let plen = u16::from_be(ctx.load(ETH_HLEN + 4).ok()?) as usize;
            let src: [u32; 4] = ctx.load(ETH_HLEN + 8).ok()?;
            let dst: [u32; 4] = ctx.load(ETH_HLEN + 24).ok()?;
            let (next, off, has_l4) = skip_ipv6_extensions(ctx)?;
            (AF_INET6, next, src, dst, off, has_l4, ETH_HLEN + 40 + plen)
        }
        _ => return None,
    };
    let mut p = Packet {
        family,
        proto,
        src,
        dst,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        l4: false,
        payload: false,
    };
    if !has_l4 {
        return Some(p);
    }
    // The whole transport header must be inside the IP packet: a first fragment cut
    // short (8 bytes of TCP, say) is not parsed.
    let hdr = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => return Some(p),
    };
    if l4_off + hdr > end {
        return Some(p);
    }
    let (Ok(sport), Ok(dport)) = (ctx.load::<u16>(l4_off), ctx.load::<u16>(l4_off + 2)) else {
        return Some(p);
    };
    p.sport = u16::from_be(sport);
    p.dport = u16::from_be(dport);
    if proto == IPPROTO_TCP {
        let (Ok(doff), Ok(flags)) = (ctx.load::<u8>(l4_off + 12), ctx.load::<u8>(l4_off + 13))
        else {
            return Some(p);
        };
        p.tcp_flags = flags;
        p.payload = l4_off + ((doff >> 4) as usize) * 4 < end;
    }
    p.l4 = true;
    Some(p)
}

#[inline(always)]
fn flow_key(p: &Packet) -> FlowKey {
    FlowKey {
        family: p.family,
        proto: p.proto,
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
        _pad: 0,
    }
}

/// Tells sk_lookup where this new connection belongs. False if it could not.
#[inline(always)]
fn note_flow(ctx: &TcContext, p: &Packet, netns: u64, pod: u32, kind: u32) -> bool {
    let map = if kind == FLOW_PROXY {
        &PROXY_FLOWS
    } else {
        &FLOWS
    };
    let kind = if kind == FLOW_PROXY { FLOW_LOCAL } else { kind };
    if map
        .insert(
            &flow_key(p),
            &FlowVal {
                netns,
                pod,
                kind,
                at: unsafe { h::bpf_ktime_get_ns() },
            },
            0,
        )
        .is_err()
    {
        count(pod, |c| c.dropped_error += 1);
        warn!(
            ctx,
            "redirect: pod {}: cannot note a new flow, dropped", pod
        );
        return false;
    }
    true
}

/// The namespace of the packet's socket. Only for locally sent packets: tc's helper
/// answers from `skb->sk` and falls back to the initial namespace without one.
#[inline(always)]
fn netns_of(ctx: &TcContext) -> u64 {
    unsafe { h::bpf_get_netns_cookie(ctx.skb.skb as *mut c_void) }
}

/// Row 6 and row 7: a socket is the proxy's when it carries the proxy mark *and*
/// belongs to a cgroup registered as the proxy's. A mark alone, which any app holding
/// CAP_NET_ADMIN can set, is not enough.
#[inline(always)]
fn is_proxy_socket(ctx: &TcContext) -> bool {
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & MARK_MASK != PROXY_MARK {
        return false;
    }
    let cgroup = unsafe { h::bpf_skb_cgroup_id(ctx.skb.skb) };
    PROXY_CGROUPS.get_ptr(&cgroup).is_some() || PROXY_CGROUPS.get_ptr(&0u64).is_some()
}

/// A reply of the pod's app to a connection the proxy opened to it over lo.
#[inline(always)]
fn is_reply_to_proxy(p: &Packet, netns: u64) -> bool {
    let back = FlowKey {
        family: p.family,
        proto: p.proto,
        src: p.dst,
        dst: p.src,
        sport: p.dport,
        dport: p.sport,
        _pad: 0,
    };
    unsafe { PROXY_FLOWS.get(&back) }.is_some_and(|f| f.netns == netns)
}

/// What sent a packet, as far as tc egress cares: `SENDER_TCP` (a kernel TCP socket, whose
/// decision it keeps), `SENDER_UDP`, or `SENDER_OTHER`: a raw or packet socket, a reply
/// the stack sends for a socket that is not whole (a listener's SYN-ACK, TIME_WAIT's
/// acknowledgements, resets), or nothing known. The socket is null but for TCP (a plain
/// pair, not an enum: the verifier wants the register written on every path).
#[inline(always)]
fn sender(ctx: &TcContext) -> (u32, *mut bpf_sock) {
    // SAFETY: skb->sk as the verifier types it (a socket or null); fullsock narrows it.
    unsafe {
        let sk = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return (SENDER_OTHER, core::ptr::null_mut());
        }
        let full = h::bpf_sk_fullsock(sk);
        if full.is_null() {
            return (SENDER_OTHER, core::ptr::null_mut());
        }
        match ((*full).type_, (*full).protocol) {
            (SOCK_STREAM, IPPROTO_TCP) => (SENDER_TCP, full),
            (SOCK_DGRAM, IPPROTO_UDP) => (SENDER_UDP, core::ptr::null_mut()),
            _ => (SENDER_OTHER, core::ptr::null_mut()),
        }
    }
}

const SENDER_TCP: u32 = 1;
const SENDER_UDP: u32 = 2;
const SENDER_OTHER: u32 = 3;

/// tc egress's decision for an app's TCP socket (`STEER`, `PASS`, or the guard's
/// `PENDING`), if one was taken during this enrolment of the pod. A decision kept from
/// an earlier enrolment (the pod released and enrolled again since) is not this one's:
/// the socket counts as open before it (row 10).
#[inline(always)]
fn decision(sk: *mut bpf_sock, pod: &PodConfig) -> Option<u32> {
    // SAFETY: a full socket from bpf_sk_fullsock.
    let v = unsafe {
        h::bpf_sk_storage_get(
            &STEERED as *const SkStorage<u32> as *mut c_void,
            sk as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    } as *const u32;
    if v.is_null() {
        return None;
    }
    let v = unsafe { *v };
    (v >> POD_EPOCH_SHIFT == pod.flags >> POD_EPOCH_SHIFT).then_some(v & DECISION_MASK)
}

/// The stored form of a decision: its kind in the low bits, the enrolment's epoch above.
const DECISION_MASK: u32 = (1 << POD_EPOCH_SHIFT) - 1;

/// Keeps a decision for the socket, tagged with this enrolment's epoch (the first one
/// taken in an enrolment stays, but for the guard's `PENDING`, which tc's decision
/// replaces). False if it could not.
#[inline(always)]
fn decide(sk: *mut bpf_sock, what: u32, pod: &PodConfig) -> bool {
    let mut tagged = what | (pod.flags & !DECISION_MASK);
    // SAFETY: a full socket from bpf_sk_fullsock; the value is copied in on creation.
    let v = unsafe {
        h::bpf_sk_storage_get(
            &STEERED as *const SkStorage<u32> as *mut c_void,
            sk as *mut c_void,
            &mut tagged as *mut u32 as *mut c_void,
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    } as *mut u32;
    if v.is_null() {
        return false;
    }
    // SAFETY: the socket's own storage, 4 bytes.
    unsafe {
        let old = *v;
        if old & DECISION_MASK == PENDING || old & !DECISION_MASK != tagged & !DECISION_MASK {
            *v = tagged;
        }
    }
    true
}

/// Send the packet back into the pod: same interface, ingress side, marked so that the
/// `fwmark 0x111 lookup 100` rule delivers it locally whatever its destination.
#[inline(always)]
fn steer_into_pod(ctx: &mut TcContext, pod: &PodConfig) -> i32 {
    // The frame goes back in as if received: its destination MAC must be ours,
    // or the stack drops it as addressed to another host.
    let Ok(mac) = ctx.load::<[u8; 6]>(6) else {
        count(pod.id, |c| c.dropped_error += 1);
        return TC_ACT_SHOT;
    };
    if ctx.store(0, &mac, 0).is_err() {
        count(pod.id, |c| c.dropped_error += 1);
        return TC_ACT_SHOT;
    }
    let skb = ctx.skb.skb;
    unsafe {
        (*skb).mark = ((*skb).mark & !MARK_MASK) | RETURN_MARK;
        h::bpf_redirect((*skb).ifindex, BPF_F_INGRESS as u64) as i32
    }
}

/// A new connection (or DNS query) of the pod's app: noted for sk_lookup, then steered
/// into the pod. Sent from a source that is not the pod's own, or not noted: dropped.
#[inline(always)]
fn steer_new(ctx: &mut TcContext, p: &Packet, netns: u64, pod: &PodConfig, kind: u32) -> i32 {
    if !addr_owner(p.family, &p.src).is_some_and(|o| o.netns == netns) {
        count(pod.id, |c| c.dropped_spoofed += 1);
        return TC_ACT_SHOT;
    }
    if would_forward(ctx, p) {
        count_guard(pod.id, |c| c.dropped_unrouted += 1);
        warn!(
            ctx,
            "redirect: pod {}: the return rule or route is missing, new connection dropped", pod.id
        );
        return TC_ACT_SHOT;
    }
    if !note_flow(ctx, p, netns, pod.id, kind) {
        return TC_ACT_SHOT;
    }
    steer_into_pod(ctx, pod)
}

/// `struct bpf_fib_lookup` (64 bytes): the input fields used here, and the union of
/// `mark` (input) with the MAC addresses (output).
#[repr(C)]
struct FibLookup {
    family: u8,
    l4_protocol: u8,
    sport: u16,
    dport: u16,
    tot_len: u16,
    ifindex: u32,
    flowinfo: u32,
    src: [u32; 4],
    dst: [u32; 4],
    vlan_or_tbid: u32,
    mark_or_macs: [u32; 3],
}
const BPF_FIB_LOOKUP_SKIP_NEIGH: u64 = 1 << 2;
const BPF_FIB_LOOKUP_MARK: u64 = 1 << 5;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// Would the kernel forward this packet, steered back in with the return mark, rather
/// than deliver it locally? It does when our rule or route is gone (or overridden) and
/// forwarding is on: the connection would then leave unproxied. The routing tables are
/// the pod's, so this is asked of them, once per new connection.
#[inline(always)]
fn would_forward(ctx: &TcContext, p: &Packet) -> bool {
    let mut f = FibLookup {
        family: p.family as u8,
        l4_protocol: p.proto as u8,
        sport: p.sport.to_be(),
        dport: p.dport.to_be(),
        tot_len: 0,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        flowinfo: 0,
        src: p.src,
        dst: p.dst,
        vlan_or_tbid: 0,
        mark_or_macs: [RETURN_MARK, 0, 0],
    };
    // SAFETY: f is a bpf_fib_lookup of the size given.
    let r = unsafe {
        h::bpf_fib_lookup(
            ctx.skb.skb as *mut c_void,
            &mut f as *mut FibLookup as *mut _,
            size_of::<FibLookup>() as i32,
            (BPF_FIB_LOOKUP_MARK | BPF_FIB_LOOKUP_SKIP_NEIGH) as u32,
        )
    };
    matches!(
        r,
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED
    )
}

// ---------------------------------------------------------------------------------
// tc egress on the pod's interfaces: what the pod's sockets send out.
// ---------------------------------------------------------------------------------

#[classifier]
pub fn redirect_egress(mut ctx: TcContext) -> i32 {
    let Some(p) = parse(&ctx) else {
        return TC_ACT_OK;
    };
    let netns = netns_of(&ctx);
    let Some(pod) = pod_config(netns) else {
        return TC_ACT_OK;
    };
    // Row 6 (and 7: a forged mark is not enough).
    if is_proxy_socket(&ctx) {
        if p.is_syn() {
            count(pod.id, |c| c.bypassed_proxy += 1);
        }
        return TC_ACT_OK;
    }
    let dns = pod.flags & POD_DNS_CAPTURE != 0;
    let (sender, sk) = sender(&ctx);

    if p.proto == IPPROTO_UDP {
        // Row 8: DNS queries with capture on.
        if dns && p.l4 && p.dport == DNS_PORT {
            return steer_new(&mut ctx, &p, netns, &pod, FLOW_DNS);
        }
        // Row 9.
        return TC_ACT_OK;
    }
    if !p.maybe_tcp() {
        // Row 9.
        return TC_ACT_OK;
    }

    if p.is_syn() {
        // A new connection. Row 4: probes.
        if is_probe(p.family, &p.dst) {
            count(pod.id, |c| c.bypassed_probe += 1);
            if sender == SENDER_TCP {
                decide(sk, PASS, &pod);
            }
            return TC_ACT_OK;
        }
        // Row 3 (and 8, TCP side). A kernel TCP socket keeps the decision, so that
        // every later packet of its connection follows it.
        if sender == SENDER_TCP && !decide(sk, STEER, &pod) {
            count(pod.id, |c| c.dropped_error += 1);
            return TC_ACT_SHOT;
        }
        let kind = if dns && p.dport == DNS_PORT {
            FLOW_DNS
        } else {
            FLOW_OUTBOUND
        };
        return steer_new(&mut ctx, &p, netns, &pod, kind);
    }

    if sender == SENDER_TCP {
        // The socket's decision, taken once: a connection steered at its SYN goes on
        // being steered, whatever the packet (fragments included); the app's side of a
        // connection the proxy opened to it sends its replies back to the proxy; one open
        // before enrolment (row 10) is untouched.
        return match decision(sk, &pod) {
            Some(STEER) => steer_into_pod(&mut ctx, &pod),
            // Its SYN left before our filter was back in place: never let it go on.
            Some(PENDING) => {
                count_guard(pod.id, |c| c.dropped_unsteered += 1);
                TC_ACT_SHOT
            }
            Some(_) => TC_ACT_OK,
            None if !p.l4 => {
                if unsafe { (*sk).state } == TCP_SYN_SENT {
                    // A SYN whose header could not be read: never out unsteered.
                    count(pod.id, |c| c.dropped_unparsable += 1);
                    return TC_ACT_SHOT;
                }
                TC_ACT_OK
            }
            None => {
                if is_reply_to_proxy(&p, netns) {
                    decide(sk, STEER, &pod);
                    steer_into_pod(&mut ctx, &pod)
                } else {
                    decide(sk, PASS, &pod);
                    TC_ACT_OK
                }
            }
        };
    }
    // Built by hand (raw sockets) or by the stack for a socket that is not whole: a
    // SYN-ACK of a connection the proxy opens to the app goes back to the proxy. What
    // else could carry a connection's data past the proxy is dropped: TCP whose
    // header cannot be read (fragments, chains too long to walk) and segments with
    // data. Bare resets and acknowledgements (TIME_WAIT's, the stack's) go out.
    if p.l4 && p.proto == IPPROTO_TCP && is_reply_to_proxy(&p, netns) {
        steer_into_pod(&mut ctx, &pod)
    } else if !p.l4 || p.payload {
        count(pod.id, |c| c.dropped_unparsable += 1);
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

// ---------------------------------------------------------------------------------
// tc ingress on the pod's interfaces.
// ---------------------------------------------------------------------------------

#[classifier]
pub fn redirect_ingress(ctx: TcContext) -> i32 {
    let Some(p) = parse(&ctx) else {
        return TC_ACT_OK;
    };
    // Our own steered packets carry the return mark; nothing from outside can carry it:
    // the mark is cleared when a packet crosses namespaces.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & MARK_MASK == RETURN_MARK {
        return TC_ACT_OK;
    }
    let Some(pod) = addr_owner(p.family, &p.dst) else {
        return TC_ACT_OK;
    };
    // From outside, yet from the pod's own address: forged (`accept_local` is on).
    if addr_owner(p.family, &p.src).is_some_and(|s| s.netns == pod.netns) {
        count(pod.pod, |c| c.dropped_spoofed += 1);
        return TC_ACT_SHOT;
    }
    // Where each connection goes is sk_lookup's decision, from the destination address.
    // A note for the same 5-tuple is stale (another pod's app or proxy drew these ports
    // in its own namespace earlier) and must not decide for a connection from outside.
    if p.is_syn() {
        let key = flow_key(&p);
        let _ = FLOWS.remove(&key);
        let _ = PROXY_FLOWS.remove(&key);
    }
    TC_ACT_OK
}

// ---------------------------------------------------------------------------------
// tc egress on the pod's lo.
// ---------------------------------------------------------------------------------

#[classifier]
pub fn redirect_loopback(ctx: TcContext) -> i32 {
    let Some(p) = parse(&ctx) else {
        return TC_ACT_OK;
    };
    if !p.is_syn() || is_loopback(p.family, &p.dst) {
        return TC_ACT_OK;
    }
    let netns = netns_of(&ctx);
    let pod = pod_config(netns).map(|p| p.id).unwrap_or(0);
    // Row 6 (the proxy's own, in a map no app writes) and row 5. A connection not noted
    // is taken for inbound by sk_lookup: it goes through the proxy once more, never
    // past it.
    let kind = if is_proxy_socket(&ctx) {
        FLOW_PROXY
    } else {
        FLOW_LOCAL
    };
    note_flow(&ctx, &p, netns, pod, kind);
    TC_ACT_OK
}

// ---------------------------------------------------------------------------------
// cgroup_skb egress on the cgroup2 root: the guard.
//
// tc egress steers only on the interfaces it is attached to. An interface that appears
// in an enrolled pod later (a second veth, a macvlan, a tun or wireguard device) has no
// filter until the engine attaches one, and an app holding CAP_NET_ADMIN can delete a
// filter. This program runs for every packet a socket sends, whatever its interface,
// before tc, and cannot be removed from inside a pod: the pod's TCP (and captured DNS)
// leaves only through an interface listed in `covered` (or lo); a connection whose SYN
// passed here but was not taken by tc egress is stopped at its next packet.
// ---------------------------------------------------------------------------------

const GUARD_PASS: i32 = 1;
const GUARD_DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn redirect_guard(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the helper reads the packet's socket.
    let netns = unsafe { h::bpf_get_netns_cookie(skb as *mut c_void) };
    let Some(pod) = pod_config(netns) else {
        return GUARD_PASS;
    };
    let ifindex = unsafe { (*skb).ifindex };
    if ifindex == LOOPBACK_IFINDEX {
        return GUARD_PASS;
    }
    // Rows 6 and 7: the proxy's own sockets go where their routes say.
    let mark = unsafe { (*skb).mark };
    if mark & MARK_MASK == PROXY_MARK {
        let cgroup = unsafe { h::bpf_skb_cgroup_id(skb) };
        if PROXY_CGROUPS.get_ptr(&cgroup).is_some() || PROXY_CGROUPS.get_ptr(&0u64).is_some() {
            return GUARD_PASS;
        }
    }
    let covered = COVERED
        .get_ptr(&IfaceKey {
            netns,
            ifindex,
            _pad: 0,
        })
        .is_some()
        || COVERED
            .get_ptr(&IfaceKey {
                netns,
                ifindex: 0,
                _pad: 0,
            })
            .is_some();
    if !covered {
        // The packet starts at its IP header here.
        let Ok(first) = ctx.load::<u8>(0) else {
            count_guard(pod.id, |c| c.dropped_uncovered += 1);
            return GUARD_DROP;
        };
        let (proto, l4) = match first >> 4 {
            4 => {
                let Ok(proto) = ctx.load::<u8>(9) else {
                    return GUARD_DROP;
                };
                let frag = u16::from_be(ctx.load::<u16>(6).unwrap_or(0));
                let l4 = ((first & 0xf) as usize) * 4;
                (proto as u32, if frag & 0x1fff == 0 { l4 } else { 0 })
            }
            6 => {
                let Ok(next) = ctx.load::<u8>(6) else {
                    return GUARD_DROP;
                };
                match next as u32 {
                    IPPROTO_TCP | IPPROTO_UDP => (next as u32, 40),
                    // Behind extension headers: could be TCP.
                    _ if matches!(next, 0 | 43 | 44 | 51 | 60) => (PROTO_UNKNOWN, 0),
                    p => (p, 0),
                }
            }
            _ => (PROTO_UNKNOWN, 0),
        };
        // Captured DNS: a datagram to port 53, or a later fragment (which could be one).
        let dns = pod.flags & POD_DNS_CAPTURE != 0
            && proto == IPPROTO_UDP
            && (l4 == 0 || ctx.load::<u16>(l4 + 2).map(u16::from_be) == Ok(DNS_PORT));
        if proto == IPPROTO_TCP || proto == PROTO_UNKNOWN || dns {
            count_guard(pod.id, |c| c.dropped_uncovered += 1);
            return GUARD_DROP;
        }
        return GUARD_PASS;
    }
    // A covered interface: tc egress steers what must be. A connecting socket is noted
    // as pending at its SYN, which tc replaces with its decision; past the SYN, a
    // socket still pending was never taken by tc (its filter was removed).
    let (sender, sk) = guard_sender(skb);
    if sender != SENDER_TCP {
        return GUARD_PASS;
    }
    let state = unsafe { (*sk).state };
    match decision(sk, &pod) {
        None if state == TCP_SYN_SENT => {
            if !decide(sk, PENDING, &pod) {
                count_guard(pod.id, |c| c.dropped_unsteered += 1);
                return GUARD_DROP;
            }
            GUARD_PASS
        }
        Some(PENDING) if state != TCP_SYN_SENT => {
            count_guard(pod.id, |c| c.dropped_unsteered += 1);
            GUARD_DROP
        }
        _ => GUARD_PASS,
    }
}

/// The packet's socket if it is a kernel TCP socket (see `sender`).
#[inline(always)]
fn guard_sender(skb: *mut aya_ebpf::bindings::__sk_buff) -> (u32, *mut bpf_sock) {
    // SAFETY: skb->sk as the verifier types it (a socket or null); fullsock narrows it.
    unsafe {
        let sk = (*skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return (SENDER_OTHER, core::ptr::null_mut());
        }
        let full = h::bpf_sk_fullsock(sk);
        if full.is_null() {
            return (SENDER_OTHER, core::ptr::null_mut());
        }
        match ((*full).type_, (*full).protocol) {
            (SOCK_STREAM, IPPROTO_TCP) => (SENDER_TCP, full),
            _ => (SENDER_OTHER, core::ptr::null_mut()),
        }
    }
}

// ---------------------------------------------------------------------------------
// sock_ops on the cgroup2 root: the node's own connections to pods (kubelet probes).
//
// tc in a pod cannot tell a packet sent by a socket of the node from one forwarded
// through the node with the node's address as source: crossing the veth into the pod
// drops the socket and the mark. Here the kernel hands us the connecting socket
// itself, with its namespace, before its SYN is built.
// ---------------------------------------------------------------------------------

const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: u32 = 4;
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn redirect_host_probes(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: the helper reads the context's socket.
            let netns = unsafe { h::bpf_get_netns_cookie(ctx.ops as *mut c_void) };
            if NODE_NETNS.get_ptr(&netns).is_none() {
                return 1;
            }
            let key = host_flow_key(&ctx);
            let Some(owner) = addr_owner(key.family, &key.dst) else {
                return 1;
            };
            let note = FlowVal {
                netns,
                pod: owner.pod,
                kind: FLOW_HOST,
                at: unsafe { h::bpf_ktime_get_ns() },
            };
            if HOST_FLOWS.insert(&key, &note, 0).is_ok() {
                // Told when the socket changes state, to forget the note at its close.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            let _ = HOST_FLOWS.remove(&host_flow_key(&ctx));
        }
        _ => {}
    }
    1
}

/// The connection as the pod's sk_lookup will see it: the node's socket is the source.
/// An IPv6 socket connecting to an IPv4-mapped address sends IPv4.
#[inline(always)]
fn host_flow_key(ctx: &SockOpsContext) -> FlowKey {
    // SAFETY: each context field read on its own, 4 bytes at a time, as the verifier wants.
    unsafe {
        let o = ctx.ops;
        macro_rules! rd {
            ($($f:tt)+) => { core::ptr::read_volatile(core::ptr::addr_of!((*o).$($f)+)) };
        }
        let family: u32 = rd!(family);
        let (family, src, dst) = if family == AF_INET {
            (AF_INET, v4(rd!(local_ip4)), v4(rd!(remote_ip4)))
        } else {
            let src = [
                rd!(local_ip6[0]),
                rd!(local_ip6[1]),
                rd!(local_ip6[2]),
                rd!(local_ip6[3]),
            ];
            let dst = [
                rd!(remote_ip6[0]),
                rd!(remote_ip6[1]),
                rd!(remote_ip6[2]),
                rd!(remote_ip6[3]),
            ];
            let mapped = |a: &[u32; 4]| a[0] == 0 && a[1] == 0 && a[2] == 0xffffu32.to_be();
            if mapped(&dst) {
                (AF_INET, v4(src[3]), v4(dst[3]))
            } else {
                (AF_INET6, src, dst)
            }
        };
        // remote_port holds the port in network order in its upper 16 bits (the
        // kernel shifts it there on little-endian), local_port in host order.
        let rport: u32 = rd!(remote_port);
        let lport: u32 = rd!(local_port);
        FlowKey {
            family,
            proto: IPPROTO_TCP,
            src,
            dst,
            sport: lport as u16,
            dport: u16::from_be((rport >> 16) as u16),
            _pad: 0,
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
