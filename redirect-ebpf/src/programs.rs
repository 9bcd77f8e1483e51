use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_F_INGRESS, TC_ACT_OK, TC_ACT_SHOT, bpf_sock, bpf_sock_tuple,
        sk_action::{SK_DROP, SK_PASS},
    },
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    helpers::generated as h,
    macros::{btf_map, classifier, sk_lookup},
    programs::{SkLookupContext, TcContext},
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

/// New connections as tc saw them: which pod, and which way. sk_lookup cannot learn its
/// namespace (no netns cookie helper there), tc can; every SYN passes a tc hook first and
/// rewrites its entry, so an entry is never older than the connection using it.
#[btf_map(name = "flows")]
static FLOWS: LruHashMap<FlowKey, FlowVal, { MAX_FLOWS as usize }> = LruHashMap::new();

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

/// Set while `redirect_egress` asks the kernel for a socket: that lookup runs
/// `redirect_lookup` too, which must then stay out of the way.
#[btf_map(name = "in_helper_lookup")]
static IN_HELPER_LOOKUP: PerCpuArray<u32, 1> = PerCpuArray::new();

// ---------------------------------------------------------------------------------
// Small helpers.
// ---------------------------------------------------------------------------------

const TCP_LISTEN: u32 = 10;
const BPF_SK_LOOKUP_F_NO_REUSEPORT: u64 = 2;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[inline(always)]
fn count(id: u32, f: impl FnOnce(&mut PodCounters)) {
    if let Some(c) = COUNTERS.get_ptr_mut(id) {
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
// ---------------------------------------------------------------------------------

#[sk_lookup]
pub fn redirect_lookup(ctx: SkLookupContext) -> u32 {
    if IN_HELPER_LOOKUP.get(0).copied().unwrap_or(0) != 0 {
        return SK_PASS;
    }
    // SAFETY: the context is the kernel's bpf_sk_lookup for this program type. Each
    // field is read on its own, straight off the context pointer, as the verifier wants.
    let (key, dport) = unsafe {
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
        let dport = rd!(local_port) as u16;
        let key = FlowKey {
            family,
            proto: rd!(protocol),
            src,
            dst,
            sport: u16::from_be(rd!(remote_port)),
            dport,
            _pad: 0,
        };
        (key, dport)
    };
    // Not a flow tc noted in an enrolled pod (loopback addresses, probes, other
    // namespaces' traffic): the kernel's own lookup decides.
    let Some(flow) = (unsafe { FLOWS.get(&key).copied() }) else {
        return SK_PASS;
    };
    let port = match flow.kind {
        // Row 5: the pod talking to itself, and the proxy reaching the app (row 6).
        FLOW_LOCAL => {
            count(flow.pod, |c| c.bypassed_loopback += 1);
            return SK_PASS;
        }
        // Rows 1 and 2.
        FLOW_INBOUND if dport == PORT_TUNNEL => PORT_TUNNEL,
        FLOW_INBOUND => PORT_INBOUND,
        // Row 8.
        FLOW_DNS => PORT_DNS,
        // Row 3.
        _ => PORT_OUTBOUND,
    };

    let lkey = ListenerKey {
        netns: flow.netns,
        port,
        proto: key.proto as u16,
        _pad: 0,
    };
    // SAFETY: raw helper calls on a sockhash; the socket reference is released below.
    unsafe {
        let sk = h::bpf_map_lookup_elem(
            &LISTENERS as *const SockHashDef as *mut c_void,
            &lkey as *const ListenerKey as *const c_void,
        );
        if sk.is_null() {
            // Row 11: fail closed.
            count(flow.pod, |c| c.dropped_no_listener += 1);
            warn!(
                &ctx,
                "redirect: pod {}: no listener on port {}, dropped", flow.pod, port
            );
            return SK_DROP;
        }
        // Exactly the socket in the map: without NO_REUSEPORT the kernel would pick
        // within its SO_REUSEPORT group, which during an upgrade holds the old proxy's
        // socket too.
        let err = h::bpf_sk_assign(ctx.lookup as *mut c_void, sk, BPF_SK_LOOKUP_F_NO_REUSEPORT);
        h::bpf_sk_release(sk);
        if err != 0 {
            count(flow.pod, |c| c.dropped_no_listener += 1);
            warn!(
                &ctx,
                "redirect: pod {}: assign to port {} failed ({}), dropped", flow.pod, port, err
            );
            return SK_DROP;
        }
    }
    count(flow.pod, |c| match port {
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
    proto: u32,
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    tcp_flags: u8,
}

/// Walks IPv6 extension headers (hop-by-hop, routing, fragment, destination options,
/// authentication) to the upper-layer header, as ip6tables' `-p tcp` does: an app that
/// adds extension headers to its packets must not escape the redirection. Returns the
/// upper-layer protocol and its offset; a non-first fragment has no ports and is
/// reported as protocol 44.
#[inline(always)]
fn skip_ipv6_extensions(ctx: &TcContext) -> Option<(u8, usize)> {
    let mut next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
    let mut off = ETH_HLEN + 40;
    for _ in 0..6 {
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
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return Some((44, off));
                }
                next = h[0];
                off += 8;
            }
            _ => return Some((next, off)),
        }
    }
    // Too many extension headers to walk: treat it as what it claims last.
    Some((next, off))
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (family, proto, src, dst, l4) = match ethertype {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
            let frag: u16 = u16::from_be(ctx.load(ETH_HLEN + 6).ok()?);
            let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
            let src: u32 = ctx.load(ETH_HLEN + 12).ok()?;
            let dst: u32 = ctx.load(ETH_HLEN + 16).ok()?;
            if frag & 0x1fff != 0 {
                // Not a first fragment: no ports to read.
                return Some(Packet {
                    family: AF_INET,
                    proto: 0,
                    src: v4(src),
                    dst: v4(dst),
                    sport: 0,
                    dport: 0,
                    tcp_flags: 0,
                });
            }
            (
                AF_INET,
                proto as u32,
                v4(src),
                v4(dst),
                ETH_HLEN + ((vihl & 0xf) as usize) * 4,
            )
        }
        ETH_P_IPV6 => {
            let src: [u32; 4] = ctx.load(ETH_HLEN + 8).ok()?;
            let dst: [u32; 4] = ctx.load(ETH_HLEN + 24).ok()?;
            let (next, l4) = skip_ipv6_extensions(ctx)?;
            (AF_INET6, next as u32, src, dst, l4)
        }
        _ => return None,
    };
    let (mut sport, mut dport, mut tcp_flags) = (0, 0, 0);
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        sport = u16::from_be(ctx.load(l4).ok()?);
        dport = u16::from_be(ctx.load(l4 + 2).ok()?);
        if proto == IPPROTO_TCP {
            tcp_flags = ctx.load(l4 + 13).ok()?;
        }
    }
    Some(Packet {
        family,
        proto,
        src,
        dst,
        sport,
        dport,
        tcp_flags,
    })
}

/// Tells sk_lookup where this new connection belongs.
#[inline(always)]
fn note_flow(ctx: &TcContext, p: &Packet, netns: u64, pod: u32, kind: u32) {
    let key = FlowKey {
        family: p.family,
        proto: p.proto,
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
        _pad: 0,
    };
    if FLOWS
        .insert(&key, &FlowVal { netns, pod, kind }, 0)
        .is_err()
    {
        count(pod, |c| c.dropped_error += 1);
        warn!(ctx, "redirect: pod {}: cannot note a new flow", pod);
    }
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

/// Would a connected (not listening) local socket receive this packet? True for flows
/// steered at their SYN (the proxy holds the other end) and for the app's replies to
/// the proxy's own connections to it; false for anything bound elsewhere.
#[inline(always)]
fn peer_is_local_socket(ctx: &TcContext, p: &Packet) -> bool {
    // The tuple of a packet as received: the socket found is the one it is sent to.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if p.family == AF_INET {
        tuple.__bindgen_anon_1.ipv4.saddr = p.src[0];
        tuple.__bindgen_anon_1.ipv4.daddr = p.dst[0];
        tuple.__bindgen_anon_1.ipv4.sport = p.sport.to_be();
        tuple.__bindgen_anon_1.ipv4.dport = p.dport.to_be();
        12
    } else {
        tuple.__bindgen_anon_1.ipv6.saddr = p.src;
        tuple.__bindgen_anon_1.ipv6.daddr = p.dst;
        tuple.__bindgen_anon_1.ipv6.sport = p.sport.to_be();
        tuple.__bindgen_anon_1.ipv6.dport = p.dport.to_be();
        36
    };
    let flag = IN_HELPER_LOOKUP.get_ptr_mut(0);
    if let Some(f) = flag {
        unsafe { *f = 1 };
    }
    // SAFETY: raw helper; the returned reference is released before returning.
    let found = unsafe {
        let sk = h::bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut c_void,
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        ) as *mut bpf_sock;
        if sk.is_null() {
            false
        } else {
            let state = (*sk).state;
            h::bpf_sk_release(sk as *mut c_void);
            state != TCP_LISTEN
        }
    };
    if let Some(f) = flag {
        unsafe { *f = 0 };
    }
    found
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

// ---------------------------------------------------------------------------------
// tc egress on the pod's interfaces.
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

    if p.proto == IPPROTO_UDP {
        // Row 8: DNS queries with capture on, unless the proxy sends them.
        if pod.flags & POD_DNS_CAPTURE != 0 && p.dport == DNS_PORT {
            if is_proxy_socket(&ctx) {
                count(pod.id, |c| c.bypassed_proxy += 1);
                return TC_ACT_OK;
            }
            note_flow(&ctx, &p, netns, pod.id, FLOW_DNS);
            return steer_into_pod(&mut ctx, &pod);
        }
        // Row 9.
        return TC_ACT_OK;
    }
    if p.proto != IPPROTO_TCP {
        return TC_ACT_OK;
    }

    if p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // A new connection. Row 4: probes.
        if is_probe(p.family, &p.dst) {
            count(pod.id, |c| c.bypassed_probe += 1);
            return TC_ACT_OK;
        }
        // Row 6 (and 7: a forged mark is not enough).
        if is_proxy_socket(&ctx) {
            count(pod.id, |c| c.bypassed_proxy += 1);
            return TC_ACT_OK;
        }
        // Row 3 (and 8, TCP side).
        let dns = pod.flags & POD_DNS_CAPTURE != 0 && p.dport == DNS_PORT;
        note_flow(
            &ctx,
            &p,
            netns,
            pod.id,
            if dns { FLOW_DNS } else { FLOW_OUTBOUND },
        );
        return steer_into_pod(&mut ctx, &pod);
    }

    // Any later packet follows its connection: the proxy's own go out as they are;
    // a connection steered at its SYN has its other end in a local socket and goes on
    // being steered; one open before enrolment (row 10) has none and is untouched.
    if is_proxy_socket(&ctx) {
        return TC_ACT_OK;
    }
    if peer_is_local_socket(&ctx, &p) {
        return steer_into_pod(&mut ctx, &pod);
    }
    TC_ACT_OK
}

// ---------------------------------------------------------------------------------
// tc ingress on the pod's interfaces.
// ---------------------------------------------------------------------------------

#[classifier]
pub fn redirect_ingress(ctx: TcContext) -> i32 {
    let Some(p) = parse(&ctx) else {
        return TC_ACT_OK;
    };
    // Our own steered packets carry the return mark (redirect_egress noted their flow);
    // nothing from outside can carry it: the mark is cleared when a packet crosses
    // namespaces.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & MARK_MASK == RETURN_MARK {
        return TC_ACT_OK;
    }
    let Some(pod) = addr_owner(p.family, &p.dst) else {
        return TC_ACT_OK;
    };
    // From outside, yet from the pod's own address: forged.
    if addr_owner(p.family, &p.src).is_some_and(|s| s.netns == pod.netns) {
        count(pod.pod, |c| c.dropped_spoofed += 1);
        return TC_ACT_SHOT;
    }
    if p.proto != IPPROTO_TCP || p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return TC_ACT_OK;
    }
    // Row 4: health probes reach the app.
    if is_probe(p.family, &p.src) {
        count(pod.pod, |c| c.bypassed_probe += 1);
        return TC_ACT_OK;
    }
    note_flow(&ctx, &p, pod.netns, pod.pod, FLOW_INBOUND);
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
    if p.proto != IPPROTO_TCP
        || p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN
        || is_loopback(p.family, &p.dst)
    {
        return TC_ACT_OK;
    }
    let netns = netns_of(&ctx);
    let pod = pod_config(netns).map(|p| p.id).unwrap_or(0);
    note_flow(&ctx, &p, netns, pod, FLOW_LOCAL);
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
