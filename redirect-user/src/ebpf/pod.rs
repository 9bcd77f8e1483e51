//! Enrolling and un-enrolling one pod: map writes, the sk_lookup link, and inside the
//! pod's namespace the return routing, `accept_local` and the tc filters. Every step
//! that succeeded is undone if a later one fails.
//!
//! The pinned record (`pod_index`) says what the engine created in the namespace, so
//! that un-enrolment removes exactly that (an identical rule found in place, as an
//! upstream agent leaves it during a migration, is not ours to delete). It stays until
//! un-enrolment completed: one that fails half-way leaves the pod "releasing", with
//! the record naming what is left, and the next attempt finishes the job.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
};

use aya::{
    Ebpf,
    programs::{
        SchedClassifier, SkLookup,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle},
    },
};
use redirect_ebpf::*;
use tracing::{debug, info, warn};

use super::{EnrolError, maps::Maps};
use crate::{
    netlink::{Changes, Netlink, Watch},
    netns::Netns,
};

/// Where our tc filters sit, so that they can be found again by any later process.
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: TcHandle = TcHandle::new(0, 0x539);
/// `PodRecord::flags` bits above the `POD_*` ones: clsact qdiscs the engine created
/// (bit i for interface i, `CLSACT_LO` for lo), removed again at un-enrolment.
const CLSACT_BASE: u32 = 1 << 8;
const CLSACT_LO: u32 = 1 << 15;
/// `PodRecord::owned` bits: the return rule and route of each family, created by the
/// engine (not found already there).
const OWN_RULE_V4: u32 = 1;
const OWN_RULE_V6: u32 = 1 << 1;
const OWN_ROUTE_V4: u32 = 1 << 2;
const OWN_ROUTE_V6: u32 = 1 << 3;
/// Our tc filters (priority 1, handle 0x539) may be attached.
const OWN_FILTERS: u32 = 1 << 4;
const OWN_ALL: u32 = OWN_RULE_V4 | OWN_RULE_V6 | OWN_ROUTE_V4 | OWN_ROUTE_V6 | OWN_FILTERS;
/// The record tracks ownership. Records pinned by earlier versions do not: everything
/// they name was made by the engine, as those versions took it.
const OWN_TRACKED: u32 = 1 << 30;
/// An enrolment is changing the pod's namespace: the pinned record was written before
/// those changes and names none of them. Found in a record after a restart, it means the
/// process died in the middle (see `settle_cut_short`).
const APPLYING: u32 = 1 << 29;
/// Un-enrolment is under way (it failed half-way and is retried).
const RELEASING: u32 = 1 << 31;
const SO_NETNS_COOKIE: libc::c_int = 71;
/// The proxy sockets a pod can have: (port, protocol).
pub(crate) const SOCKET_SLOTS: [(u16, u32); 5] = [
    (PORT_OUTBOUND, IPPROTO_TCP),
    (PORT_INBOUND, IPPROTO_TCP),
    (PORT_TUNNEL, IPPROTO_TCP),
    (PORT_DNS, IPPROTO_UDP),
    (PORT_DNS, IPPROTO_TCP),
];

#[derive(Debug, Clone, Default)]
pub struct PodOptions {
    /// Capture DNS (UDP and TCP port 53) to the pod's 15053 sockets.
    pub dns_capture: bool,
    /// Interfaces to attach tc programs to at enrolment; default: every Ethernet
    /// interface but lo (at most four). The pod's TCP through any other interface is
    /// dropped by the guard, until the watcher attaches to it (it does so for every
    /// Ethernet interface it finds uncovered when the pod's interfaces change).
    pub interfaces: Option<Vec<String>>,
}

/// The proxy's sockets in the pod; a missing one means that port fails closed.
#[derive(Debug, Clone, Copy, Default)]
pub struct PodSockets<'a> {
    pub outbound: Option<BorrowedFd<'a>>,
    pub inbound: Option<BorrowedFd<'a>>,
    pub tunnel: Option<BorrowedFd<'a>>,
    pub dns_udp: Option<BorrowedFd<'a>>,
    pub dns_tcp: Option<BorrowedFd<'a>>,
}

impl PodSockets<'_> {
    fn is_empty(&self) -> bool {
        self.outbound.is_none()
            && self.inbound.is_none()
            && self.tunnel.is_none()
            && self.dns_udp.is_none()
            && self.dns_tcp.is_none()
    }

    fn slots(&self) -> [(u16, u32, Option<BorrowedFd<'_>>); 5] {
        [
            (PORT_OUTBOUND, IPPROTO_TCP, self.outbound),
            (PORT_INBOUND, IPPROTO_TCP, self.inbound),
            (PORT_TUNNEL, IPPROTO_TCP, self.tunnel),
            (PORT_DNS, IPPROTO_UDP, self.dns_udp),
            (PORT_DNS, IPPROTO_TCP, self.dns_tcp),
        ]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrolOutcome {
    Enrolled,
    /// Same uid and namespace as before: nothing changed (but the sockets, if given).
    AlreadyEnrolled,
    /// Same uid, new namespace: the old enrolment was undone first.
    Replaced,
}

/// What `Engine::pods` tells about an enrolled pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledPod {
    pub uid: String,
    pub id: u32,
    pub netns_cookie: u64,
    pub netns_dev: u64,
    pub netns_ino: u64,
    pub interfaces: Vec<String>,
    pub dns_capture: bool,
    /// False for a pod found in pinned state whose namespace this process has not been
    /// given again: its redirection is in place but it cannot be changed until it is.
    pub netns_held: bool,
    /// Its un-enrolment failed half-way: what is left is undone by the next
    /// `unenrol` (or `finish_releases`, or `enrol` of the same uid).
    pub releasing: bool,
}

pub(crate) struct PodState {
    pub netns: Option<Netns>,
    pub record: PodRecord,
    /// The pod's entries in `pod_addrs`, so that un-enrolment removes exactly those
    /// without walking the map.
    pub addrs: Vec<AddrKey>,
    /// The pod's sk_lookup link, held besides its pin: a pin removed (or its bpffs
    /// unmounted) under a running engine does not detach it, and is pinned again.
    pub link: Option<std::os::fd::OwnedFd>,
    /// The pod's namespace's rtnetlink events (interfaces, addresses, our rule, route
    /// and filters), read by the engine's watcher; held while the namespace is.
    pub watch: Option<Watch>,
}

impl PodState {
    pub fn describe(&self, uid: &str) -> EnrolledPod {
        let r = &self.record;
        EnrolledPod {
            uid: uid.into(),
            id: r.id,
            netns_cookie: r.netns_cookie,
            netns_dev: r.netns_dev,
            netns_ino: r.netns_ino,
            interfaces: ifaces_of(r).map(|(_, n)| n).collect(),
            dns_capture: r.flags & POD_DNS_CAPTURE != 0,
            netns_held: self.netns.is_some(),
            releasing: self.releasing(),
        }
    }

    pub fn releasing(&self) -> bool {
        self.record.owned & RELEASING != 0
    }
}

/// A record pinned by an earlier version tracks no ownership: take everything it names
/// as the engine's, as that version did.
fn upgrade_legacy(record: &mut PodRecord) {
    if record.owned & OWN_TRACKED == 0 {
        record.owned |= OWN_TRACKED | OWN_ALL;
    }
}

/// A record pinned by an enrolment that never finished (the process was killed while
/// it changed the pod's namespace) does not say what was already created there. Take
/// all of it as the engine's, so that un-enrolment leaves nothing half in place: the
/// rule, routes, tc filters and clsact qdiscs go and accept_local is set back to 0,
/// even where they were there before the enrolment.
fn settle_cut_short(record: &mut PodRecord) {
    if record.owned & APPLYING == 0 {
        return;
    }
    record.owned = (record.owned & !APPLYING) | OWN_ALL;
    let ifaces: Vec<usize> = ifaces_of(record).map(|(i, _)| i).collect();
    for i in ifaces {
        record.flags |= CLSACT_BASE << i;
        if record.accept_local_before[i] == 0 {
            record.accept_local_before[i] = 1;
        }
    }
    record.flags |= CLSACT_LO;
}

fn ifaces_of(r: &PodRecord) -> impl Iterator<Item = (usize, String)> + '_ {
    r.ifaces
        .iter()
        .enumerate()
        .filter(|(_, n)| n[0] != 0)
        .map(|(i, n)| {
            let end = n.iter().position(|&b| b == 0).unwrap_or(n.len());
            (i, String::from_utf8_lossy(&n[..end]).into_owned())
        })
}

fn uid_key(uid: &str) -> PodUid {
    let mut k = PodUid { uid: [0; UID_LEN] };
    k.uid[..uid.len()].copy_from_slice(uid.as_bytes());
    k
}

fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() < UID_LEN
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The pods of an earlier run, from the pinned index. Their namespaces are not known
/// to this process until they are enrolled again.
pub(crate) fn adopt_pinned(maps: &Maps) -> BTreeMap<String, PodState> {
    // One walk of the addresses at start, grouped by namespace.
    let mut addrs: BTreeMap<u64, Vec<AddrKey>> = BTreeMap::new();
    for (k, v) in maps.pod_addrs.iter().filter_map(Result::ok) {
        addrs.entry(v.netns).or_default().push(k);
    }
    let mut out = BTreeMap::new();
    for entry in maps.pod_index.iter() {
        let Ok((k, record)) = entry else { continue };
        let end = k.uid.iter().position(|&b| b == 0).unwrap_or(UID_LEN);
        let uid = String::from_utf8_lossy(&k.uid[..end]).into_owned();
        let mut record = record;
        if record.owned & APPLYING != 0 {
            warn!(
                uid,
                "redirect: the enrolment of this pod was cut short; all of it will be undone"
            );
            settle_cut_short(&mut record);
        }
        out.insert(
            uid,
            PodState {
                netns: None,
                addrs: addrs.remove(&record.netns_cookie).unwrap_or_default(),
                record,
                link: None,
                watch: None,
            },
        );
    }
    out
}

/// Pods of an earlier run that left no `covered` entries (enrolled by a version without
/// the guard): every interface of theirs counts as covered, as it did then, until they
/// are taken back and their interfaces are listed.
pub(crate) fn cover_legacy(maps: &mut Maps, pods: &BTreeMap<String, PodState>) {
    for (uid, state) in pods {
        let netns = state.record.netns_cookie;
        if maps.covered_of(netns).is_empty() {
            match maps.cover(netns, 0) {
                Ok(()) => info!(
                    uid,
                    "redirect: pod enrolled by an earlier version: all its interfaces count as covered until it is taken back"
                ),
                Err(e) => {
                    warn!(uid, error = %e, "redirect: cannot cover a pod of an earlier version")
                }
            }
        }
    }
}

/// What the namespace looks like, read before anything is changed.
struct NsInfo {
    cookie: u64,
    lo: u32,
    /// Interfaces to attach to (Ethernet ones), with their index.
    ifaces: Vec<(String, u32)>,
    addrs: Vec<IpAddr>,
    ipv6: bool,
}

pub(super) fn netns_cookie_here() -> std::io::Result<u64> {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
    getsockopt::<u64>(s.as_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE)
}

/// `getsockopt` of a plain value (an int, a u64).
fn getsockopt<T: Default>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
) -> std::io::Result<T> {
    let mut v = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: v and len describe a valid buffer of T.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            &mut v as *mut T as *mut _,
            &mut len,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

fn read_ns(options: &PodOptions) -> Result<NsInfo, (&'static str, String)> {
    let cookie = netns_cookie_here().map_err(|e| ("read netns cookie", e.to_string()))?;
    let mut nl = Netlink::open().map_err(|e| ("netlink", e.to_string()))?;
    let links = nl.links().map_err(|e| ("list interfaces", e.to_string()))?;
    let lo = links
        .iter()
        .find(|l| l.loopback)
        .map(|l| l.index)
        .ok_or(("find lo", "no loopback interface".into()))?;
    if !links.iter().any(|l| !l.loopback) {
        return Err(("find interface", "the pod has no interface but lo".into()));
    }
    let ifaces: Vec<(String, u32)> = match &options.interfaces {
        Some(names) => {
            let named = names
                .iter()
                .map(|n| {
                    links
                        .iter()
                        .find(|l| &l.name == n)
                        .ok_or(("find interface", format!("no interface {n} in the pod")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if named.len() > MAX_POD_IFACES {
                return Err((
                    "find interface",
                    format!("at most {MAX_POD_IFACES} interfaces are supported"),
                ));
            }
            attachable(named.into_iter())
        }
        None => {
            let mut all = attachable(links.iter().filter(|l| !l.loopback));
            if all.len() > MAX_POD_IFACES {
                warn!(
                    interfaces = ?all.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                    "redirect: more interfaces than the engine attaches to ({MAX_POD_IFACES}); the pod's TCP through the others is dropped"
                );
                all.truncate(MAX_POD_IFACES);
            }
            all
        }
    };
    if ifaces.iter().any(|(n, _)| n.len() >= IFNAME_LEN) {
        return Err(("find interface", "interface name too long".into()));
    }
    let addrs = nl
        .addresses()
        .map_err(|e| ("list addresses", e.to_string()))?
        .into_iter()
        .map(|(_, a)| a)
        .filter(|a| !a.is_loopback())
        .collect();
    let ipv6 = Path::new("/proc/sys/net/ipv6").exists();
    Ok(NsInfo {
        cookie,
        lo,
        ifaces,
        addrs,
        ipv6,
    })
}

/// The interfaces the tc programs can serve: those with an Ethernet header. An L3
/// device (tun, wireguard, ipip, gre) is left uncovered: the guard drops the pod's TCP
/// through it.
fn attachable<'a>(links: impl Iterator<Item = &'a crate::netlink::Link>) -> Vec<(String, u32)> {
    links
        .filter(|l| {
            if !l.ether {
                info!(
                    interface = %l.name,
                    "redirect: interface without an Ethernet header: not attached, the pod's TCP through it is dropped"
                );
            }
            l.ether
        })
        .map(|l| (l.name.clone(), l.index))
        .collect()
}

fn addr_key(a: &IpAddr) -> AddrKey {
    let mut k = AddrKey::default();
    match a {
        IpAddr::V4(v4) => {
            k.family = AF_INET;
            k.addr[0] = u32::from_ne_bytes(v4.octets());
        }
        IpAddr::V6(v6) => {
            k.family = AF_INET6;
            for (i, c) in v6.octets().chunks(4).enumerate() {
                k.addr[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    k
}

fn key_addr(k: &AddrKey) -> IpAddr {
    let b = |w: u32| w.to_ne_bytes();
    if k.family == AF_INET {
        IpAddr::from(b(k.addr[0]))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in k.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&b(*w));
        }
        IpAddr::from(o)
    }
}

fn step<'a>(uid: &'a str, step: &'static str) -> impl Fn(String) -> EnrolError + 'a {
    move |detail| EnrolError::Step {
        uid: uid.into(),
        step,
        detail,
    }
}

/// A map insert that reports a full map as `EnrolError::Full`.
fn full_or(uid: &str, what: &'static str, max: u32, e: aya::maps::MapError) -> EnrolError {
    if format!("{e:?}").contains("E2BIG")
        || e.to_string().contains("too big")
        || io_code(&e) == Some(libc::E2BIG)
    {
        EnrolError::Full { what, max }
    } else {
        EnrolError::Step {
            uid: uid.into(),
            step: what,
            detail: e.to_string(),
        }
    }
}

fn io_code(e: &aya::maps::MapError) -> Option<i32> {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn enrol(
    ebpf: &mut Ebpf,
    maps: &mut Maps,
    pods: &mut BTreeMap<String, PodState>,
    pin_dir: &Path,
    uid: &str,
    netns: &Netns,
    options: &PodOptions,
    sockets: &PodSockets<'_>,
) -> Result<EnrolOutcome, EnrolError> {
    if !valid_uid(uid) {
        return Err(EnrolError::InvalidUid { uid: uid.into() });
    }
    let mut outcome = EnrolOutcome::Enrolled;
    if let Some(state) = pods.get_mut(uid)
        && state.releasing()
    {
        // An earlier un-enrolment of this uid failed half-way: finish it first.
        unenrol(maps, pin_dir, uid, state, Some(netns))?;
        pods.remove(uid);
    }
    if let Some(state) = pods.get_mut(uid) {
        let same = state.record.netns_dev == netns.dev() && state.record.netns_ino == netns.ino();
        if same {
            let flags = (state.record.flags & !POD_FLAGS) | pod_flags(options);
            if state.netns.is_none() {
                // Found in pinned state after a restart: take the namespace back and make
                // sure everything is in place with this run's programs and the options
                // given now (each step tolerates what is already there).
                let ns = netns
                    .try_clone()
                    .map_err(|e| step(uid, "hold namespace")(e.to_string()))?;
                let mut record = state.record;
                record.flags = flags;
                // Watched first, so that no change made while we look is missed.
                let (watch, info) = netns
                    .run(|| (Watch::open(ROUTE_TABLE), read_ns(options)))
                    .map_err(|source| EnrolError::Netns {
                        uid: uid.into(),
                        source,
                    })?;
                let watch = watch.map_err(|e| step(uid, "watch namespace")(e.to_string()))?;
                let mut info = info.map_err(|(s, d)| step(uid, s)(d))?;
                let slots = assign_slots(&mut record, &info.ifaces);
                info.ifaces = std::mem::take(&mut info.ifaces)
                    .into_iter()
                    .zip(slots)
                    .filter_map(|(iface, slot)| slot.map(|_| iface))
                    .collect();
                // The tc filters are replaced in place by this run's programs.
                netns
                    .run(|| apply_in_ns(ebpf, &mut record, &info, uid))
                    .map_err(|source| EnrolError::Netns {
                        uid: uid.into(),
                        source,
                    })??;
                cover(maps, uid, info.cookie, &info.ifaces)?;
                maps.uncover(info.cookie, 0);
                state.watch = Some(watch);
                // The pinned sk_lookup link still runs the program of the run that made it.
                let link_path = pin_dir.join("links").join(uid);
                let link = update_sk_lookup(ebpf, netns, &link_path)
                    .map_err(step(uid, "update sk_lookup link"))?;
                write_config(maps, uid, &record)?;
                state.record = record;
                state.netns = Some(ns);
                state.link = Some(link);
                info!(
                    uid,
                    dns_capture = options.dns_capture,
                    "redirect: pod re-adopted from pinned state, programs of this run in place"
                );
            } else if flags != state.record.flags {
                let mut record = state.record;
                record.flags = flags;
                write_config(maps, uid, &record)?;
                state.record = record;
                info!(
                    uid,
                    dns_capture = options.dns_capture,
                    "redirect: pod options changed"
                );
            }
            if !sockets.is_empty() {
                set_sockets(maps, uid, state.record.netns_cookie, sockets)?;
            }
            return Ok(EnrolOutcome::AlreadyEnrolled);
        }
        // Forgotten only once undone: on failure it stays, releasing, to be retried.
        unenrol(maps, pin_dir, uid, state, None)?;
        pods.remove(uid);
        outcome = EnrolOutcome::Replaced;
    }

    let used: std::collections::BTreeSet<u32> = pods.values().map(|p| p.record.id).collect();
    let id = (1..MAX_PODS)
        .find(|i| !used.contains(i))
        .ok_or(EnrolError::Full {
            what: "pods",
            max: MAX_PODS - 1,
        })?;
    let ns = netns
        .try_clone()
        .map_err(|e| step(uid, "hold namespace")(e.to_string()))?;

    let started = std::time::Instant::now();
    // 1. Read the namespace.
    // Watched first, so that no interface or address added while we look is missed.
    let (watch, info) = netns
        .run(|| (Watch::open(ROUTE_TABLE), read_ns(options)))
        .map_err(|source| EnrolError::Netns {
            uid: uid.into(),
            source,
        })?;
    let watch = watch.map_err(|e| step(uid, "watch namespace")(e.to_string()))?;
    let info = info.map_err(|(s, d)| step(uid, s)(d))?;
    let mut record = PodRecord {
        netns_cookie: info.cookie,
        netns_dev: netns.dev(),
        netns_ino: netns.ino(),
        id,
        flags: pod_flags(options) | new_epoch(),
        ifaces: [[0; IFNAME_LEN]; MAX_POD_IFACES],
        accept_local_before: [0; MAX_POD_IFACES],
        owned: OWN_TRACKED | APPLYING,
    };
    for (i, (name, _)) in info.ifaces.iter().enumerate() {
        record.ifaces[i][..name.len()].copy_from_slice(name.as_bytes());
    }

    let t_read = started.elapsed();
    // Addresses another enrolled pod holds: given back if this enrolment fails.
    let taken: Vec<(AddrKey, PodAddr)> = info
        .addrs
        .iter()
        .map(addr_key)
        .filter_map(|k| {
            let owner = maps.pod_addrs.get(&k, 0).ok()?;
            (owner.netns != info.cookie).then_some((k, owner))
        })
        .collect();
    // 2. Maps, then 3. the sk_lookup link, then 4. the namespace: each undone on failure.
    let mut written = Vec::new();
    if let Err(e) = write_maps(maps, uid, &record, &info, sockets, &mut written) {
        remove_maps(maps, uid, &record, &written);
        give_back_addrs(maps, pods, uid, &taken);
        return Err(e);
    }
    let t_maps = started.elapsed();
    let link_path = pin_dir.join("links").join(uid);
    let link = match attach_sk_lookup(ebpf, netns, &link_path) {
        Ok(link) => link,
        Err(e) => {
            remove_maps(maps, uid, &record, &written);
            give_back_addrs(maps, pods, uid, &taken);
            return Err(step(uid, "attach sk_lookup")(e));
        }
    };
    let t_link = started.elapsed();
    let applied = netns
        .run(|| apply_in_ns(ebpf, &mut record, &info, uid))
        .map_err(|source| EnrolError::Netns {
            uid: uid.into(),
            source,
        })
        .and_then(|r| r);
    // What apply_in_ns did is in the record now, failed or not.
    record.owned &= !APPLYING;
    // Attached: the guard lets the pod's TCP out through these interfaces now. Listed
    // only now, or a SYN sent in between left unsteered (the guard let it pass, no tc
    // was there yet), and the peer held the half-open connection it began.
    let applied = applied.and_then(|()| {
        let attached: Vec<(String, u32)> = info
            .ifaces
            .iter()
            .filter(|(n, _)| slot_of(&record, n).is_some())
            .cloned()
            .collect();
        cover(maps, uid, info.cookie, &attached)
    });
    if let Err(e) = applied {
        let mut state = PodState {
            netns: Some(ns),
            record,
            addrs: written,
            link: Some(link),
            watch: None,
        };
        if let Err(undo) = unenrol(maps, pin_dir, uid, &mut state, None) {
            warn!(uid, error = %undo, "redirect: a failed enrolment is not undone completely; the pod is kept as releasing");
            pods.insert(uid.into(), state);
        }
        give_back_addrs(maps, pods, uid, &taken);
        return Err(e);
    }
    // The record now knows which clsact qdiscs were ours.
    if let Err(e) = maps.pod_index.insert(uid_key(uid), record, 0) {
        warn!(uid, error = %e, "redirect: cannot update the pod index");
    }
    let us = |d: std::time::Duration| d.as_micros() as u64;
    info!(
        uid,
        id,
        netns_cookie = info.cookie,
        addrs = ?info.addrs,
        dns_capture = options.dns_capture,
        elapsed_us = us(started.elapsed()),
        "redirect: pod enrolled"
    );
    debug!(
        uid,
        read_us = us(t_read),
        maps_us = us(t_maps - t_read),
        link_us = us(t_link - t_maps),
        netns_us = us(started.elapsed() - t_link),
        "redirect: enrolment steps"
    );
    pods.insert(
        uid.into(),
        PodState {
            netns: Some(ns),
            record,
            addrs: written,
            link: Some(link),
            watch: Some(watch),
        },
    );
    Ok(outcome)
}

/// Gives the addresses a failed enrolment took over back to the pods still holding
/// them: a failed enrolment must not cost another pod its inbound redirection.
fn give_back_addrs(
    maps: &mut Maps,
    pods: &BTreeMap<String, PodState>,
    uid: &str,
    taken: &[(AddrKey, PodAddr)],
) {
    for (key, owner) in taken {
        let still_there = pods
            .values()
            .any(|p| p.record.netns_cookie == owner.netns && p.record.id == owner.pod);
        if !still_there {
            continue;
        }
        match maps.pod_addrs.insert(key, owner, 0) {
            Ok(()) => info!(
                uid,
                other_pod = owner.pod,
                "redirect: address given back to its pod after a failed enrolment"
            ),
            Err(e) => {
                warn!(uid, other_pod = owner.pod, error = %e, "redirect: cannot give an address back to its pod")
            }
        }
    }
}

/// The `POD_*` bits of `PodRecord::flags` (the hot-path flags, as in `PodConfig`).
const POD_FLAGS: u32 = 0xff;
/// The enrolment's epoch (`POD_EPOCH_SHIFT`), kept in the record's flags and copied to
/// the pod's config with the `POD_FLAGS`.
const EPOCH_MASK: u32 = !((1 << POD_EPOCH_SHIFT) - 1);

/// A new enrolment's epoch, in place in the flags: random and non-zero, so that it
/// differs from the one before with near certainty, across restarts too.
fn new_epoch() -> u32 {
    u32::from(fastrand::u16(1..)) << POD_EPOCH_SHIFT
}

/// The flags of the pod's hot-path config: its options and its enrolment's epoch.
fn config_flags(record: &PodRecord) -> u32 {
    record.flags & (POD_FLAGS | EPOCH_MASK)
}

fn pod_flags(options: &PodOptions) -> u32 {
    if options.dns_capture {
        POD_DNS_CAPTURE
    } else {
        0
    }
}

/// Writes a changed record of an enrolled pod: the hot-path config, then the index.
fn write_config(maps: &mut Maps, uid: &str, record: &PodRecord) -> Result<(), EnrolError> {
    let cfg = PodConfig {
        id: record.id,
        flags: config_flags(record),
    };
    maps.pods
        .insert(record.netns_cookie, cfg, 0)
        .map_err(|e| step(uid, "pod config")(e.to_string()))?;
    maps.pod_index
        .insert(uid_key(uid), *record, 0)
        .map_err(|e| step(uid, "pod index")(e.to_string()))
}

/// Points the pod's pinned sk_lookup link at this run's program (BPF_LINK_UPDATE), or
/// attaches a new link if the pin is missing.
fn update_sk_lookup(
    ebpf: &mut Ebpf,
    netns: &Netns,
    pin: &Path,
) -> Result<std::os::fd::OwnedFd, String> {
    let link = match bpf_obj_get(pin) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            return attach_sk_lookup(ebpf, netns, pin);
        }
        Err(e) => return Err(format!("{}: {e}", pin.display())),
    };
    let prog: &mut SkLookup = ebpf
        .program_mut(names::PROG_SK_LOOKUP)
        .ok_or("program missing")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    let prog_fd = prog.fd().map_err(|e| e.to_string())?;
    bpf_link_update(link.as_fd(), prog_fd.as_fd()).map_err(|e| format!("BPF_LINK_UPDATE: {e}"))?;
    Ok(link)
}

/// `BPF_OBJ_PIN`: pins the object `fd` at `path`.
fn bpf_obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    const BPF_OBJ_PIN: libc::c_long = 6;
    // SAFETY: attr points at a live NUL-terminated path and a valid fd.
    unsafe { super::maps::sys_bpf(BPF_OBJ_PIN, &attr) }.map(|_| ())
}

/// Pins the pod's sk_lookup link again if its pin is gone (removed by hand, or its
/// bpffs unmounted and mounted again). True if it did.
pub(crate) fn restore_pin(pin_dir: &Path, uid: &str, state: &PodState) -> Result<bool, String> {
    let Some(link) = &state.link else {
        return Ok(false);
    };
    let pin = pin_dir.join("links").join(uid);
    if pin.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(pin_dir.join("links")).map_err(|e| e.to_string())?;
    bpf_obj_pin(link.as_fd(), &pin).map_err(|e| format!("{}: {e}", pin.display()))?;
    warn!(uid, path = %pin.display(), "redirect: sk_lookup link pin was gone; pinned again");
    Ok(true)
}

/// `BPF_OBJ_GET`: an fd for a pinned object.
pub(super) fn bpf_obj_get(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    // SAFETY: attr points at a live NUL-terminated path.
    let r = unsafe { super::maps::sys_bpf(BPF_OBJ_GET, &attr) }?;
    // SAFETY: a fresh fd we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as i32) })
}

/// `BPF_LINK_UPDATE`: the link runs `prog` from now on.
pub(super) fn bpf_link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    const BPF_LINK_UPDATE: libc::c_long = 29;
    // SAFETY: attr is a plain struct of fds.
    unsafe { super::maps::sys_bpf(BPF_LINK_UPDATE, &attr) }.map(|_| ())
}

/// Writes the pod's map entries; `written` gets each address entry written.
fn write_maps(
    maps: &mut Maps,
    uid: &str,
    record: &PodRecord,
    info: &NsInfo,
    sockets: &PodSockets<'_>,
    written: &mut Vec<AddrKey>,
) -> Result<(), EnrolError> {
    let cfg = PodConfig {
        id: record.id,
        flags: config_flags(record),
    };
    maps.zero_counters(record.id)
        .map_err(|e| step(uid, "zero counters")(e.to_string()))?;
    maps.pod_index
        .insert(uid_key(uid), *record, 0)
        .map_err(|e| full_or(uid, "pod index", maps.pod_index_capacity(), e))?;
    for a in &info.addrs {
        let key = addr_key(a);
        if let Ok(other) = maps.pod_addrs.get(&key, 0)
            && other.netns != info.cookie
        {
            // The address moved to a new pod (the old one went without un-enrolment).
            warn!(uid, addr = %a, other_pod = other.pod, "redirect: address taken over from another pod");
        }
        let owner = PodAddr {
            netns: info.cookie,
            pod: record.id,
            _pad: 0,
        };
        maps.pod_addrs
            .insert(key, owner, 0)
            .map_err(|e| full_or(uid, "pod addresses", MAX_POD_ADDRS, e))?;
        written.push(key);
    }
    set_sockets(maps, uid, info.cookie, sockets)?;
    // Last: from here on the programs treat the namespace as enrolled. No interface is
    // listed as covered yet: until tc egress is attached to it (and it is listed, right
    // after), the guard drops the pod's TCP rather than let a SYN leave unsteered.
    maps.pods
        .insert(info.cookie, cfg, 0)
        .map_err(|e| full_or(uid, "pods", MAX_PODS, e))?;
    Ok(())
}

/// Lists the pod's interfaces that carry the tc programs in `covered`.
fn cover(
    maps: &mut Maps,
    uid: &str,
    netns: u64,
    ifaces: &[(String, u32)],
) -> Result<(), EnrolError> {
    for (_, index) in ifaces {
        maps.cover(netns, *index)
            .map_err(|e| full_or(uid, "covered interfaces", MAX_COVERED, e))?;
    }
    Ok(())
}

/// Gives each interface a slot of the record (the one with its name, else a free one,
/// else one whose interface is gone). An interface with no slot left is not attached
/// to: the guard drops the pod's TCP through it. Returns the slot of each, in order.
fn assign_slots(record: &mut PodRecord, ifaces: &[(String, u32)]) -> Vec<Option<usize>> {
    let current: Vec<&str> = ifaces.iter().map(|(n, _)| n.as_str()).collect();
    ifaces
        .iter()
        .map(|(name, _)| slot_for(record, name, &current))
        .collect()
}

fn slot_for(record: &mut PodRecord, name: &str, current: &[&str]) -> Option<usize> {
    let names: Vec<(usize, String)> = ifaces_of(record).collect();
    if let Some((i, _)) = names.iter().find(|(_, n)| n == name) {
        return Some(*i);
    }
    let free = (0..MAX_POD_IFACES)
        .find(|i| record.ifaces[*i][0] == 0)
        .or_else(|| {
            names
                .iter()
                .find(|(_, n)| !current.contains(&n.as_str()))
                .map(|(i, _)| *i)
        })?;
    // A slot of an interface that is gone: nothing of it is left to undo.
    record.ifaces[free] = [0; IFNAME_LEN];
    record.ifaces[free][..name.len()].copy_from_slice(name.as_bytes());
    record.accept_local_before[free] = 0;
    record.flags &= !(CLSACT_BASE << free);
    Some(free)
}

/// Puts the given sockets in the listener map (and removes the ports not given),
/// after checking each is a socket of the right kind in the pod's namespace.
pub(crate) fn set_sockets(
    maps: &mut Maps,
    uid: &str,
    netns: u64,
    sockets: &PodSockets<'_>,
) -> Result<(), EnrolError> {
    for (port, proto, fd) in sockets.slots() {
        let bad = |detail: String| EnrolError::BadSocket {
            uid: uid.into(),
            port,
            detail,
        };
        let Some(fd) = fd else { continue };
        let ty = getsockopt::<i32>(fd, libc::SOL_SOCKET, libc::SO_TYPE)
            .map_err(|e| bad(format!("not a socket: {e}")))?;
        let want = if proto == IPPROTO_TCP {
            libc::SOCK_STREAM
        } else {
            libc::SOCK_DGRAM
        };
        if ty != want {
            return Err(bad(format!("socket type {ty}, expected {want}")));
        }
        if proto == IPPROTO_TCP
            && getsockopt::<i32>(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).unwrap_or(0) != 1
        {
            return Err(bad("not listening".into()));
        }
        let ns = getsockopt::<u64>(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE)
            .map_err(|e| bad(e.to_string()))?;
        if ns != netns {
            return Err(bad("the socket belongs to another network namespace".into()));
        }
    }
    for (port, proto, fd) in sockets.slots() {
        let key = ListenerKey {
            netns,
            port,
            proto: proto as u16,
            _pad: 0,
        };
        match fd {
            Some(fd) => maps.insert_listener(&key, fd).map_err(|e| {
                if e.raw_os_error() == Some(libc::E2BIG) {
                    EnrolError::Full {
                        what: "listeners",
                        max: MAX_LISTENERS,
                    }
                } else {
                    EnrolError::BadSocket {
                        uid: uid.into(),
                        port,
                        detail: e.to_string(),
                    }
                }
            })?,
            None => {
                let _ = maps.remove_listener(&key);
            }
        }
    }
    Ok(())
}

/// Removes the pod's map entries: its settings, sockets, counters, index record and the
/// addresses it still owns. Notes in `flows` are left to age out: sk_lookup checks each
/// against the owner of its addresses, so a stale one decides nothing.
fn remove_maps(maps: &mut Maps, uid: &str, record: &PodRecord, addrs: &[AddrKey]) {
    let netns = record.netns_cookie;
    let _ = maps.pods.remove(&netns);
    maps.uncover_all(netns);
    for (port, proto) in SOCKET_SLOTS {
        let _ = maps.remove_listener(&ListenerKey {
            netns,
            port,
            proto: proto as u16,
            _pad: 0,
        });
    }
    for k in addrs {
        if maps.pod_addrs.get(k, 0).is_ok_and(|v| v.netns == netns) {
            let _ = maps.pod_addrs.remove(k);
        }
    }
    let _ = maps.zero_counters(record.id);
    let _ = maps.pod_index.remove(&uid_key(uid));
}

fn attach_sk_lookup(
    ebpf: &mut Ebpf,
    netns: &Netns,
    pin: &Path,
) -> Result<std::os::fd::OwnedFd, String> {
    let prog: &mut SkLookup = ebpf
        .program_mut(names::PROG_SK_LOOKUP)
        .ok_or("program missing")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    let id = prog.attach(netns.as_fd()).map_err(|e| e.to_string())?;
    let link: FdLink = prog.take_link(id).map_err(|e| e.to_string())?.into();
    let _ = std::fs::remove_file(pin);
    // Pinned, the link outlives this process: the pod stays redirected (fail closed).
    link.pin(pin).map_err(|e| e.to_string())?;
    // And held while this process runs, whatever happens to the pin.
    bpf_obj_get(pin).map_err(|e| format!("{}: {e}", pin.display()))
}

/// Unpins the pod's sk_lookup link (dropping the last reference detaches it). A link
/// that is not there counts as removed.
fn detach_sk_lookup(pin: &Path) -> Result<(), String> {
    if !pin.exists() {
        debug!(path = %pin.display(), "redirect: no sk_lookup link to remove");
        return Ok(());
    }
    let link = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
    link.unpin().map(drop).map_err(|e| e.to_string())
}

/// Attaches (or, if one of ours is there from an earlier run, replaces) a tc filter.
fn attach_tc(ebpf: &mut Ebpf, prog: &str, iface: &str, ty: TcAttachType) -> Result<(), String> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(prog)
        .ok_or("program missing")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    let opts = TcAttachOptions::Netlink(NlOptions {
        priority: TC_PRIORITY,
        handle: TC_HANDLE,
        classid: None,
    });
    let id = match p.attach_with_options(iface, ty, opts) {
        Ok(id) => id,
        Err(first) => {
            let existing = SchedClassifierLink::attached(iface, ty, TC_PRIORITY, TC_HANDLE, None)
                .map_err(|e| e.to_string())?;
            p.attach_to_link(existing).map_err(|_| first.to_string())?
        }
    };
    // The filter must outlive this process (fail closed after a crash); it is removed by
    // priority and handle at un-enrolment, not when this handle is dropped.
    std::mem::forget(p.take_link(id).map_err(|e| e.to_string())?);
    Ok(())
}

/// Attaches our tc filter if it is not there; one in place is left as it is (so that
/// putting back what was removed does not itself stir tc events).
fn ensure_tc(ebpf: &mut Ebpf, prog: &str, iface: &str, ty: TcAttachType) -> Result<(), String> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(prog)
        .ok_or("program missing")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    let opts = TcAttachOptions::Netlink(NlOptions {
        priority: TC_PRIORITY,
        handle: TC_HANDLE,
        classid: None,
    });
    match p.attach_with_options(iface, ty, opts) {
        Ok(id) => {
            // Outlives this process, like every filter of ours.
            std::mem::forget(p.take_link(id).map_err(|e| e.to_string())?);
            Ok(())
        }
        Err(e) if io_errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// The OS error somewhere in an error's chain of sources.
fn io_errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && let Some(code) = io.raw_os_error()
        {
            return Some(code);
        }
        cur = c.source();
    }
    None
}

/// Inside the pod namespace: return routing, accept_local, tc filters (egress last,
/// since it starts steering). Runs on a thread inside the namespace. Each interface
/// uses the record's slot of its name.
fn apply_in_ns(
    ebpf: &mut Ebpf,
    record: &mut PodRecord,
    info: &NsInfo,
    uid: &str,
) -> Result<(), EnrolError> {
    let err = |s: &'static str| step(uid, s);
    upgrade_legacy(record);
    let mut nl = Netlink::open().map_err(|e| err("netlink")(e.to_string()))?;
    ensure_routing(&mut nl, record, info.ipv6, info.lo, uid)?;
    let slots: Vec<(usize, &str)> = info
        .ifaces
        .iter()
        .filter_map(|(n, _)| slot_of(record, n).map(|i| (i, n.as_str())))
        .collect();
    for (i, name) in &slots {
        set_accept_local(&mut nl, record, *i, name, uid)?;
    }
    let targets = slots
        .iter()
        .map(|(i, n)| (*n, CLSACT_BASE << i))
        .chain(std::iter::once(("lo", CLSACT_LO)));
    for (name, bit) in targets {
        if tc::qdisc_add_clsact(name).is_ok() {
            record.flags |= bit;
        }
    }
    record.owned |= OWN_FILTERS;
    for (_, name) in &slots {
        attach_tc(ebpf, names::PROG_INGRESS, name, TcAttachType::Ingress)
            .map_err(err("attach tc ingress"))?;
    }
    attach_tc(ebpf, names::PROG_LOOPBACK, "lo", TcAttachType::Egress)
        .map_err(err("attach tc on lo"))?;
    for (_, name) in &slots {
        attach_tc(ebpf, names::PROG_EGRESS, name, TcAttachType::Egress)
            .map_err(err("attach tc egress"))?;
    }
    Ok(())
}

/// The record's slot for an interface name, if it has one.
fn slot_of(record: &PodRecord, name: &str) -> Option<usize> {
    ifaces_of(record).find(|(_, n)| n == name).map(|(i, _)| i)
}

/// `accept_local=1` on the interface in slot `i`, its earlier value kept in the record.
/// Through netlink, not /proc/sys: a container's /proc/sys is read-only.
fn set_accept_local(
    nl: &mut Netlink,
    record: &mut PodRecord,
    i: usize,
    name: &str,
    uid: &str,
) -> Result<(), EnrolError> {
    let err = |s: &'static str| step(uid, s);
    let before = nl
        .accept_local(name)
        .map_err(|e| err("read accept_local")(e.to_string()))?
        .ok_or_else(|| err("read accept_local")(format!("no interface {name}")))?;
    // On a re-apply the value read is our own 1: keep the first recorded value.
    if record.accept_local_before[i] == 0 {
        record.accept_local_before[i] = if before { 2 } else { 1 };
    }
    nl.set_accept_local(name, true)
        .map_err(|e| err("set accept_local")(e.to_string()))?;
    Ok(())
}

/// The return rule and route of each family, added if missing (an identical one found
/// in place and not ours is used, and left in place at un-enrolment).
fn ensure_routing(
    nl: &mut Netlink,
    record: &mut PodRecord,
    ipv6: bool,
    lo: u32,
    uid: &str,
) -> Result<(), EnrolError> {
    let err = |s: &'static str| step(uid, s);
    for v6 in [false, true] {
        if v6 && !ipv6 {
            continue;
        }
        let (rule, route) = if v6 {
            (OWN_RULE_V6, OWN_ROUTE_V6)
        } else {
            (OWN_RULE_V4, OWN_ROUTE_V4)
        };
        if nl
            .add_rule(v6, RETURN_MARK, MARK_MASK, RULE_PREF, ROUTE_TABLE)
            .map_err(|e| err("add rule")(e.to_string()))?
        {
            record.owned |= rule;
        } else if record.owned & rule == 0 {
            info!(
                uid,
                v6, "redirect: return rule already in the pod; adopted, kept at un-enrolment"
            );
        }
        if nl
            .add_local_default(v6, lo, ROUTE_TABLE)
            .map_err(|e| err("add route")(e.to_string()))?
        {
            record.owned |= route;
        } else if record.owned & route == 0 {
            info!(
                uid,
                v6, "redirect: return route already in the pod; adopted, kept at un-enrolment"
            );
        }
    }
    Ok(())
}

/// Brings an enrolled pod in line with what its namespace's events say changed:
/// attaches to interfaces that appeared (then lists them as covered) and forgets those
/// that went, follows its addresses, and puts back our rule, route and tc filters when
/// something inside the pod removed them. `live` holds the netns cookies of the
/// enrolled pods: an address one of them holds is not taken from it.
pub(crate) fn refresh(
    ebpf: &mut Ebpf,
    maps: &mut Maps,
    uid: &str,
    state: &mut PodState,
    changes: Changes,
    live: &std::collections::BTreeSet<u64>,
) -> Result<(), EnrolError> {
    let Some(netns) = state.netns.as_ref() else {
        return Ok(());
    };
    let cookie = state.record.netns_cookie;
    let mut record = state.record;
    let mut addrs = std::mem::take(&mut state.addrs);
    let result = netns
        .run(|| {
            refresh_in_ns(
                ebpf,
                maps,
                uid,
                &mut record,
                &mut addrs,
                cookie,
                changes,
                live,
            )
        })
        .map_err(|source| EnrolError::Netns {
            uid: uid.into(),
            source,
        })
        .and_then(|r| r);
    state.addrs = addrs;
    if record != state.record {
        state.record = record;
        save_record(maps, uid, &state.record);
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn refresh_in_ns(
    ebpf: &mut Ebpf,
    maps: &mut Maps,
    uid: &str,
    record: &mut PodRecord,
    addrs: &mut Vec<AddrKey>,
    cookie: u64,
    changes: Changes,
    live: &std::collections::BTreeSet<u64>,
) -> Result<(), EnrolError> {
    let err = |s: &'static str| step(uid, s);
    let mut nl = Netlink::open().map_err(|e| err("netlink")(e.to_string()))?;
    let links = nl
        .links()
        .map_err(|e| err("list interfaces")(e.to_string()))?;
    let lo = links
        .iter()
        .find(|l| l.loopback)
        .map(|l| l.index)
        .ok_or_else(|| err("find lo")("no loopback interface".into()))?;
    if changes.routing {
        let before = record.owned;
        ensure_routing(
            &mut nl,
            record,
            Path::new("/proc/sys/net/ipv6").exists(),
            lo,
            uid,
        )?;
        if record.owned != before {
            warn!(
                uid,
                "redirect: return rule or route removed inside the pod; put back"
            );
        }
    }
    if changes.links || changes.tc {
        let covered = maps.covered_of(cookie);
        // Gone: its filters went with it; an index used again later is a new device.
        for index in covered.iter().filter(|i| **i != 0) {
            if !links.iter().any(|l| l.index == *index) {
                maps.uncover(cookie, *index);
                info!(
                    uid,
                    ifindex = index,
                    "redirect: interface gone from the pod"
                );
            }
        }
        let current: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
        for l in links.iter().filter(|l| !l.loopback) {
            let known = covered.contains(&l.index);
            if known && !changes.tc {
                continue;
            }
            if !l.ether {
                if !known {
                    info!(
                        uid,
                        interface = %l.name,
                        "redirect: interface without an Ethernet header added to the pod: not attached, the pod's TCP through it is dropped"
                    );
                }
                continue;
            }
            if l.name.len() >= IFNAME_LEN {
                continue;
            }
            let Some(slot) = slot_for(record, &l.name, &current) else {
                warn!(
                    uid,
                    interface = %l.name,
                    "redirect: interface added to the pod beyond the {MAX_POD_IFACES} the engine attaches to: the pod's TCP through it is dropped"
                );
                continue;
            };
            // Attached first, then listed as covered: until then the guard drops the
            // pod's TCP through it.
            set_accept_local(&mut nl, record, slot, &l.name, uid)?;
            if tc::qdisc_add_clsact(&l.name).is_ok() {
                record.flags |= CLSACT_BASE << slot;
            }
            record.owned |= OWN_FILTERS;
            ensure_tc(ebpf, names::PROG_INGRESS, &l.name, TcAttachType::Ingress)
                .map_err(err("attach tc ingress"))?;
            ensure_tc(ebpf, names::PROG_EGRESS, &l.name, TcAttachType::Egress)
                .map_err(err("attach tc egress"))?;
            maps.cover(cookie, l.index)
                .map_err(|e| full_or(uid, "covered interfaces", MAX_COVERED, e))?;
            if known {
                debug!(uid, interface = %l.name, "redirect: tc filters ensured after a tc change in the pod");
            } else {
                info!(uid, interface = %l.name, ifindex = l.index, "redirect: interface added to the pod, attached");
            }
        }
        if changes.tc {
            if tc::qdisc_add_clsact("lo").is_ok() {
                record.flags |= CLSACT_LO;
            }
            ensure_tc(ebpf, names::PROG_LOOPBACK, "lo", TcAttachType::Egress)
                .map_err(err("attach tc on lo"))?;
        }
    }
    if changes.addrs || changes.links {
        let now: Vec<AddrKey> = nl
            .addresses()
            .map_err(|e| err("list addresses")(e.to_string()))?
            .into_iter()
            .filter(|(_, a)| !a.is_loopback())
            .map(|(_, a)| addr_key(&a))
            .collect();
        addrs.retain(|k| {
            if now.contains(k) {
                return true;
            }
            if maps.pod_addrs.get(k, 0).is_ok_and(|v| v.netns == cookie) {
                let _ = maps.pod_addrs.remove(k);
            }
            info!(uid, addr = %key_addr(k), "redirect: address gone from the pod");
            false
        });
        for k in now {
            if addrs.contains(&k) {
                continue;
            }
            if let Ok(other) = maps.pod_addrs.get(&k, 0)
                && other.netns != cookie
                && live.contains(&other.netns)
            {
                warn!(
                    uid,
                    other_pod = other.pod,
                    "redirect: address added to the pod belongs to another enrolled pod: not taken"
                );
                continue;
            }
            let owner = PodAddr {
                netns: cookie,
                pod: record.id,
                _pad: 0,
            };
            maps.pod_addrs
                .insert(k, owner, 0)
                .map_err(|e| full_or(uid, "pod addresses", MAX_POD_ADDRS, e))?;
            info!(uid, addr = %key_addr(&k), "redirect: address added to the pod");
            addrs.push(k);
        }
    }
    Ok(())
}

/// Inside the pod namespace: undoes what `apply_in_ns` did and the record says the
/// engine owns. Every step is tried; each one done is cleared from the record, so a
/// later call does only what is left (and a step found already undone counts as done).
/// The first failure is returned.
fn undo_in_ns(record: &mut PodRecord, uid: &str) -> Result<(), EnrolError> {
    let mut first: Option<EnrolError> = None;
    let mut keep = |what: &'static str, e: String| {
        let e = step(uid, what)(e);
        warn!(uid, error = %e, "redirect: un-enrolment step failed");
        first.get_or_insert(e);
    };
    let ifaces: Vec<(usize, String)> = ifaces_of(record).collect();
    let links = Netlink::open().and_then(|mut nl| nl.links().map(|l| (nl, l)));
    match links {
        Ok((mut nl, links)) => {
            // An interface that is gone took its filters and qdiscs with it.
            let index = |name: &str| links.iter().find(|l| l.name == name).map(|l| l.index);
            let lo = links.iter().find(|l| l.loopback).map(|l| l.index);
            if record.owned & OWN_FILTERS != 0 {
                // Egress first: it is what starts steering.
                let filters = ifaces
                    .iter()
                    .map(|(_, n)| (index(n), true))
                    .chain([(lo, true)])
                    .chain(ifaces.iter().map(|(_, n)| (index(n), false)));
                let mut all = true;
                for (ifindex, egress) in filters {
                    let Some(ifindex) = ifindex else { continue };
                    if let Err(e) = nl.del_filter(ifindex, egress, TC_PRIORITY, TC_HANDLE.into()) {
                        all = false;
                        keep("delete tc filter", e.to_string());
                    }
                }
                if all {
                    record.owned &= !OWN_FILTERS;
                }
            }
            let qdiscs = ifaces
                .iter()
                .map(|(i, n)| (CLSACT_BASE << i, index(n)))
                .chain([(CLSACT_LO, lo)]);
            for (bit, ifindex) in qdiscs {
                if record.flags & bit == 0 {
                    continue;
                }
                match ifindex.map(|i| nl.del_clsact(i)) {
                    Some(Err(e)) => keep("delete clsact", e.to_string()),
                    _ => record.flags &= !bit,
                }
            }
            for v6 in [false, true] {
                let (rule, route) = if v6 {
                    (OWN_RULE_V6, OWN_ROUTE_V6)
                } else {
                    (OWN_RULE_V4, OWN_ROUTE_V4)
                };
                if record.owned & rule != 0 {
                    match nl.del_rule(v6, RETURN_MARK, MARK_MASK, RULE_PREF, ROUTE_TABLE) {
                        Ok(_) => record.owned &= !rule,
                        Err(e) => keep("delete rule", e.to_string()),
                    }
                }
                if record.owned & route != 0 {
                    match lo.map(|lo| nl.del_local_default(v6, lo, ROUTE_TABLE)) {
                        Some(Err(e)) => keep("delete route", e.to_string()),
                        _ => record.owned &= !route,
                    }
                }
            }
        }
        Err(e) => keep("netlink", e.to_string()),
    }
    for (i, name) in &ifaces {
        let on = match record.accept_local_before[*i] {
            1 => false,
            2 => true,
            _ => continue,
        };
        // No such interface any more: nothing to restore.
        match Netlink::open().and_then(|mut nl| nl.set_accept_local(name, on)) {
            Ok(_) => record.accept_local_before[*i] = 0,
            Err(e) => keep("restore accept_local", e.to_string()),
        }
    }
    first.map_or(Ok(()), Err)
}

/// Does the record still name something to undo inside the namespace?
fn left_in_ns(r: &PodRecord) -> bool {
    r.owned & OWN_ALL != 0 || r.flags & !0xff != 0 || r.accept_local_before.iter().any(|&v| v != 0)
}

/// Writes the record to the pinned index (what is left to undo, and that it is).
fn save_record(maps: &mut Maps, uid: &str, record: &PodRecord) {
    if let Err(e) = maps.pod_index.insert(uid_key(uid), *record, 0) {
        warn!(uid, error = %e, "redirect: cannot update the pod index");
    }
}

/// Undoes a pod's enrolment. The pinned record is marked releasing first and removed
/// last, only once everything is undone; on failure the pod stays releasing, its record
/// naming what is left, and calling this again finishes the job. `given` is the pod's
/// namespace when the caller has it and this process does not (a pod found in pinned
/// state).
pub(crate) fn unenrol(
    maps: &mut Maps,
    pin_dir: &Path,
    uid: &str,
    state: &mut PodState,
    given: Option<&Netns>,
) -> Result<(), EnrolError> {
    upgrade_legacy(&mut state.record);
    if state.netns.is_none()
        && let Some(ns) = given
        && ns.dev() == state.record.netns_dev
        && ns.ino() == state.record.netns_ino
    {
        state.netns = ns.try_clone().ok();
    }
    if !state.releasing() {
        state.record.owned |= RELEASING;
        save_record(maps, uid, &state.record);
    }
    // From here the programs and the watcher leave the pod alone: its connections go
    // direct while what is in its namespace is taken down.
    state.watch = None;
    let _ = maps.pods.remove(&state.record.netns_cookie);
    let mut result = Ok(());
    match &state.netns {
        Some(netns) => {
            let mut record = state.record;
            result = netns
                .run(|| undo_in_ns(&mut record, uid))
                .map_err(|source| EnrolError::Netns {
                    uid: uid.into(),
                    source,
                })
                .and_then(|r| r);
            state.record = record;
        }
        None if left_in_ns(&state.record) => warn!(
            uid,
            "redirect: un-enrolling a pod whose namespace this process never held; its tc filters and routes stay until the namespace goes"
        ),
        None => {}
    }
    // Both holders go: the pin and this process's fd.
    state.link = None;
    if let Err(e) = detach_sk_lookup(&pin_dir.join("links").join(uid)) {
        warn!(uid, error = %e, "redirect: un-enrolment step failed");
        result = result.and(Err(step(uid, "detach sk_lookup")(e)));
    }
    if let Err(e) = result {
        save_record(maps, uid, &state.record);
        warn!(uid, id = state.record.id, error = %e, "redirect: un-enrolment incomplete; the pod is kept as releasing and retried");
        return Err(e);
    }
    remove_maps(maps, uid, &state.record, &state.addrs);
    info!(uid, id = state.record.id, "redirect: pod un-enrolled");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_checked() {
        assert!(valid_uid("0b4a3c4e-6c43-4b43-9c1e-0123456789ab"));
        assert!(valid_uid("pod.a_b-1"));
        assert!(!valid_uid(""));
        assert!(!valid_uid("../etc"));
        assert!(!valid_uid("a/b"));
        assert!(!valid_uid(&"x".repeat(UID_LEN)));
    }

    #[test]
    fn addresses_are_stored_in_network_order() {
        let k = addr_key(&"10.1.2.3".parse().unwrap());
        assert_eq!(k.family, AF_INET);
        assert_eq!(k.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(&k.addr[1..], &[0, 0, 0]);
        let k = addr_key(&"fd00::1".parse().unwrap());
        assert_eq!(k.family, AF_INET6);
        assert_eq!(k.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(k.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn interface_names_round_trip_through_the_record() {
        let mut r = PodRecord {
            netns_cookie: 1,
            netns_dev: 2,
            netns_ino: 3,
            id: 4,
            flags: 0,
            ifaces: [[0; IFNAME_LEN]; MAX_POD_IFACES],
            accept_local_before: [0; MAX_POD_IFACES],
            owned: 0,
        };
        r.ifaces[0][..4].copy_from_slice(b"eth0");
        r.ifaces[1][..4].copy_from_slice(b"net1");
        let names: Vec<_> = ifaces_of(&r).collect();
        assert_eq!(
            names,
            vec![(0, "eth0".to_string()), (1, "net1".to_string())]
        );
    }

    #[test]
    fn an_enrolment_cut_short_is_undone_whole() {
        let mut r = PodRecord {
            netns_cookie: 1,
            netns_dev: 2,
            netns_ino: 3,
            id: 4,
            flags: POD_DNS_CAPTURE,
            ifaces: [[0; IFNAME_LEN]; MAX_POD_IFACES],
            accept_local_before: [0; MAX_POD_IFACES],
            owned: OWN_TRACKED | APPLYING,
        };
        r.ifaces[0][..4].copy_from_slice(b"eth0");
        r.accept_local_before[0] = 2;
        r.ifaces[1][..4].copy_from_slice(b"net1");
        let finished = PodRecord {
            owned: OWN_TRACKED,
            ..r
        };
        let mut done = finished;
        settle_cut_short(&mut done);
        assert_eq!(done, finished, "a finished enrolment's record is exact");
        settle_cut_short(&mut r);
        assert_eq!(r.owned, OWN_TRACKED | OWN_ALL);
        assert_eq!(
            r.flags,
            POD_DNS_CAPTURE | CLSACT_BASE | CLSACT_BASE << 1 | CLSACT_LO
        );
        // A value read before is kept; one never read is taken as 0 ("was 0": 1).
        assert_eq!(r.accept_local_before[..2], [2, 1]);
        assert!(left_in_ns(&r));
    }
}
