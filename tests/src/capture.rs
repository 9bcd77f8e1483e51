//! A wire capture for the tests, with no external tool: an AF_PACKET socket bound to one
//! interface inside a namespace, read by a background thread until [`Capture::stop`].
//! Every frame is counted and its IPv4/IPv6 TCP/UDP headers parsed; the frames' bytes
//! are kept up to [`STORE_LIMIT`] (tests push gigabytes through), and needles given to
//! [`Capture::watching`] are searched in every frame, kept or not.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context, Result, bail};

use crate::Netns;

/// Frame bytes kept at most; beyond, frames are still counted, parsed and searched for
/// the watched needles, but not kept.
pub const STORE_LIMIT: usize = 512 << 20;

/// The largest frame read whole (a GSO frame on a veth is up to 64 KiB, more with BIG
/// TCP); longer ones are kept truncated.
const FRAME_MAX: usize = 256 << 10;

/// The socket's receive buffer: the kernel drops frames (counted) when it is full.
const RCVBUF: libc::c_int = 256 << 20;

/// A capture running in the background.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Frames>>>,
}

impl Capture {
    /// Starts capturing every frame (both directions) of `ifname` in `netns`.
    pub fn start(netns: &Netns, ifname: &str) -> Result<Capture> {
        Self::watching(netns, ifname, &[])
    }

    /// Like `start`, and counts the frames containing each of `needles`, all of them,
    /// beyond [`STORE_LIMIT`] too (see [`Frames::contains`]).
    pub fn watching(netns: &Netns, ifname: &str, needles: &[&[u8]]) -> Result<Capture> {
        if needles.iter().any(|n| n.is_empty()) {
            bail!("empty needle");
        }
        let fd = netns.run(|| open_socket(ifname))??;
        let stop = Arc::new(AtomicBool::new(false));
        let watched = needles.iter().map(|n| (n.to_vec(), 0)).collect();
        let thread = std::thread::Builder::new()
            .name(format!("capture-{ifname}"))
            .spawn({
                let stop = stop.clone();
                move || collect(fd, &stop, watched)
            })?;
        Ok(Capture {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the capture (after reading what the socket holds) and returns the frames.
    pub fn stop(mut self) -> Result<Frames> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("capture thread");
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("capture thread panicked"))?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn os_err(what: &str) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::last_os_error()).context(what.to_string())
}

/// An AF_PACKET socket bound to `ifname` of the current namespace, all protocols.
fn open_socket(ifname: &str) -> Result<OwnedFd> {
    let name = CString::new(ifname)?;
    // SAFETY: plain calls with valid pointers; the fd is owned right away.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            return Err(os_err(&format!("no interface {ifname}")));
        }
        // Protocol 0: no frame is queued until the bind below names the interface.
        let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if raw < 0 {
            return Err(os_err("AF_PACKET socket (needs CAP_NET_RAW)"));
        }
        let fd = OwnedFd::from_raw_fd(raw);
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            let r = libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                opt,
                (&RCVBUF as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as _,
            );
            if r == 0 {
                break;
            }
        }
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as _;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = index as _;
        let r = libc::bind(
            raw,
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as _,
        );
        if r < 0 {
            return Err(os_err(&format!("binding to {ifname}")));
        }
        Ok(fd)
    }
}

/// The capture thread: reads frames until `stop`, then what is left in the socket.
fn collect(fd: OwnedFd, stop: &AtomicBool, watched: Vec<(Vec<u8>, usize)>) -> Result<Frames> {
    let mut out = Frames {
        watched,
        ..Frames::default()
    };
    let mut buf = vec![0u8; FRAME_MAX];
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, if stopping { 0 } else { 50 }) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(anyhow::Error::new(e).context("poll"));
        }
        if r == 0 {
            if stopping {
                break;
            }
            continue;
        }
        // Everything queued now.
        loop {
            // SAFETY: zeroed sockaddr_ll is valid; buf and sll outlive the call.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut sll_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            let n = unsafe {
                libc::recvfrom(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut sll_len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => break,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => return Err(anyhow::Error::new(e).context("recvfrom")),
                }
            }
            let len = n as usize;
            let outgoing = sll.sll_pkttype == libc::PACKET_OUTGOING;
            out.add(&buf[..len.min(buf.len())], len, outgoing);
        }
    }
    out.dropped = dropped(&fd).context("PACKET_STATISTICS")?;
    Ok(out)
}

/// Frames the kernel dropped for want of room in the socket.
fn dropped(fd: &OwnedFd) -> Result<u64> {
    // SAFETY: tpacket_stats is plain data; the kernel fills at most `len` bytes.
    let mut st: libc::tpacket_stats = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut st as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(os_err("getsockopt"));
    }
    Ok(st.tp_drops as u64)
}

/// One captured frame whose bytes were kept.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The bytes from the Ethernet header on (at most 256 KiB).
    pub data: Vec<u8>,
    /// The frame's real length.
    pub len: usize,
    /// Sent by the interface (rather than received).
    pub outgoing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// The headers of an IPv4 or IPv6 TCP or UDP frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub proto: Proto,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10); 0 for UDP.
    pub flags: u8,
    /// The TCP or UDP payload's length (of the whole GSO frame if it is one).
    pub payload_len: usize,
    /// Sent by the captured interface (rather than received).
    pub outgoing: bool,
}

impl Packet {
    /// Parses an Ethernet frame (VLAN tags skipped): IPv4 or IPv6 (extension headers
    /// walked) carrying TCP or UDP; None for anything else and for non-first fragments.
    pub fn parse(frame: &[u8]) -> Option<Packet> {
        parse(frame, frame.len(), false)
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// `frame` holds the first bytes of a frame `wire_len` long.
fn parse(frame: &[u8], wire_len: usize, outgoing: bool) -> Option<Packet> {
    let mut off = 12;
    let mut ethertype = be16(frame, off)?;
    while matches!(ethertype, 0x8100 | 0x88a8) {
        off += 4;
        ethertype = be16(frame, off)?;
    }
    off += 2;
    let l3 = frame.get(off..)?;
    let l3_wire = wire_len.checked_sub(off)?;
    // (src, dst, protocol, L4 offset in l3, L3 length)
    let (src, dst, mut proto, mut l4, l3_len): (IpAddr, IpAddr, u8, usize, usize) = match ethertype
    {
        0x0800 => {
            let ihl = (*l3.first()? & 0xf) as usize * 4;
            if l3[0] >> 4 != 4 || ihl < 20 || l3.len() < ihl {
                return None;
            }
            if be16(l3, 6)? & 0x1fff != 0 {
                return None;
            }
            let src: [u8; 4] = l3[12..16].try_into().ok()?;
            let dst: [u8; 4] = l3[16..20].try_into().ok()?;
            // 0 for BIG TCP frames over 64 KiB.
            let tot = be16(l3, 2)? as usize;
            let len = if tot >= ihl { tot } else { l3_wire };
            (
                Ipv4Addr::from(src).into(),
                Ipv4Addr::from(dst).into(),
                l3[9],
                ihl,
                len,
            )
        }
        0x86dd => {
            if l3.len() < 40 || l3[0] >> 4 != 6 {
                return None;
            }
            let src: [u8; 16] = l3[8..24].try_into().ok()?;
            let dst: [u8; 16] = l3[24..40].try_into().ok()?;
            // 0 for jumbograms (BIG TCP).
            let plen = be16(l3, 4)? as usize;
            let len = if plen > 0 { 40 + plen } else { l3_wire };
            (
                Ipv6Addr::from(src).into(),
                Ipv6Addr::from(dst).into(),
                l3[6],
                40,
                len,
            )
        }
        _ => return None,
    };
    if ethertype == 0x86dd {
        loop {
            let h = l3.get(l4..l4 + 8)?;
            let len = match proto {
                // Hop-by-hop, routing, destination options.
                0 | 43 | 60 => (h[1] as usize + 1) * 8,
                // Authentication header.
                51 => (h[1] as usize + 2) * 4,
                // Fragment: only the first carries the L4 header.
                44 => {
                    if be16(h, 2)? >> 3 != 0 {
                        return None;
                    }
                    8
                }
                _ => break,
            };
            proto = h[0];
            l4 += len;
        }
    }
    let l4_len = l3_len.checked_sub(l4)?;
    let h = l3.get(l4..)?;
    let (proto, hdr_len, flags) = match proto {
        6 => (Proto::Tcp, (*h.get(12)? >> 4) as usize * 4, *h.get(13)?),
        17 => (Proto::Udp, 8, 0),
        _ => return None,
    };
    Some(Packet {
        proto,
        src,
        dst,
        sport: be16(h, 0)?,
        dport: be16(h, 2)?,
        flags,
        payload_len: l4_len.saturating_sub(hdr_len),
        outgoing,
    })
}

/// Whether `needle` (not empty) occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> bool {
    let n = needle.len();
    let mut i = 0;
    while let Some(p) = hay
        .get(i..)
        .and_then(|h| h.iter().position(|&b| b == needle[0]))
    {
        let s = i + p;
        match hay.get(s..s + n) {
            None => return false,
            Some(w) if w == needle => return true,
            Some(_) => i = s + 1,
        }
    }
    false
}

/// What a capture saw.
#[derive(Debug, Default)]
pub struct Frames {
    frames: Vec<Frame>,
    packets: Vec<Packet>,
    count: usize,
    wire_bytes: u64,
    stored: usize,
    unstored: usize,
    truncated: usize,
    dropped: u64,
    /// Needle, frames containing it.
    watched: Vec<(Vec<u8>, usize)>,
}

impl Frames {
    fn add(&mut self, data: &[u8], len: usize, outgoing: bool) {
        self.count += 1;
        self.wire_bytes += len as u64;
        if data.len() < len {
            self.truncated += 1;
        }
        for (needle, hits) in &mut self.watched {
            if find(data, needle) {
                *hits += 1;
            }
        }
        if let Some(p) = parse(data, len, outgoing) {
            self.packets.push(p);
        }
        if self.stored + data.len() <= STORE_LIMIT {
            self.stored += data.len();
            self.frames.push(Frame {
                data: data.to_vec(),
                len,
                outgoing,
            });
        } else {
            self.unstored += 1;
        }
    }

    /// Frames seen (kept or not; the kernel's drops aside).
    pub fn count(&self) -> usize {
        self.count
    }

    /// The frames' total length.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes
    }

    /// Frames the kernel dropped because the capture did not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Every frame was read whole and kept: `contains` then searched everything.
    pub fn complete(&self) -> bool {
        self.dropped == 0 && self.unstored == 0 && self.truncated == 0
    }

    /// The kept frames, in order.
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// The TCP and UDP frames, all of them, in order.
    pub fn packets(&self) -> &[Packet] {
        &self.packets
    }

    fn ports(&self, proto: Proto) -> BTreeSet<u16> {
        self.packets
            .iter()
            .filter(|p| p.proto == proto)
            .flat_map(|p| [p.sport, p.dport])
            .collect()
    }

    /// Source and destination ports of the TCP frames.
    pub fn tcp_ports(&self) -> BTreeSet<u16> {
        self.ports(Proto::Tcp)
    }

    /// Source and destination ports of the UDP frames.
    pub fn udp_ports(&self) -> BTreeSet<u16> {
        self.ports(Proto::Udp)
    }

    /// Payload bytes of `proto` by port: each frame counts under its source port and
    /// under its destination port, so `[&8080]` is what went to and from port 8080.
    pub fn payload_bytes_by_port(&self, proto: Proto) -> BTreeMap<u16, u64> {
        let mut out = BTreeMap::new();
        for p in self.packets.iter().filter(|p| p.proto == proto) {
            *out.entry(p.sport).or_default() += p.payload_len as u64;
            if p.dport != p.sport {
                *out.entry(p.dport).or_default() += p.payload_len as u64;
            }
        }
        out
    }

    /// Whether some frame holds `needle` (a sequence split across frames is not seen).
    /// A needle given to [`Capture::watching`] is answered for every frame read; any
    /// other for the kept frames only: check [`Self::complete`] before trusting a "no".
    pub fn contains(&self, needle: &[u8]) -> bool {
        if let Some((_, hits)) = self.watched.iter().find(|(n, _)| n == needle) {
            return *hits > 0;
        }
        !needle.is_empty() && self.frames.iter().any(|f| find(&f.data, needle))
    }

    /// How many frames held the watched `needle`; None if it was not watched.
    pub fn watched(&self, needle: &[u8]) -> Option<usize> {
        self.watched
            .iter()
            .find(|(n, _)| n == needle)
            .map(|(_, hits)| *hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = 5 << 4;
        h[13] = flags;
        h.extend_from_slice(payload);
        h
    }

    #[test]
    fn ipv4_tcp() {
        let l4 = tcp(40000, 8080, 0x18, b"hello\n");
        let mut f = eth(0x0800);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[10, 1, 1, 10, 10, 1, 2, 20]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f.extend_from_slice(&[0; 6]); // Ethernet padding is not payload.
        let p = Packet::parse(&f).unwrap();
        assert_eq!(p.proto, Proto::Tcp);
        assert_eq!(p.src, "10.1.1.10".parse::<IpAddr>().unwrap());
        assert_eq!(p.dst, "10.1.2.20".parse::<IpAddr>().unwrap());
        assert_eq!(
            (p.sport, p.dport, p.flags, p.payload_len),
            (40000, 8080, 0x18, 6)
        );
    }

    #[test]
    fn ipv6_udp_after_extension_headers_in_a_vlan() {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x81, 0x00, 0, 7, 0x86, 0xdd]);
        let mut l4 = vec![0u8; 8];
        l4[0..2].copy_from_slice(&53u16.to_be_bytes());
        l4[2..4].copy_from_slice(&5353u16.to_be_bytes());
        l4.extend_from_slice(b"query");
        // Hop-by-hop (8 bytes) -> destination options (16 bytes) -> UDP.
        let mut ext = vec![60, 0, 1, 4, 0, 0, 0, 0];
        ext.extend_from_slice(&[17, 1]);
        ext.extend_from_slice(&[0; 14]);
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 64]);
        let src: Ipv6Addr = "fd00:64:1::a".parse().unwrap();
        let dst: Ipv6Addr = "fd00:64:2::14".parse().unwrap();
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&ext);
        f.extend_from_slice(&l4);
        let p = Packet::parse(&f).unwrap();
        assert_eq!(p.proto, Proto::Udp);
        assert_eq!((p.src, p.dst), (src.into(), dst.into()));
        assert_eq!((p.sport, p.dport, p.payload_len), (53, 5353, 5));
    }

    #[test]
    fn other_frames_are_not_parsed() {
        assert!(Packet::parse(&eth(0x0806)).is_none());
        assert!(Packet::parse(&[0; 5]).is_none());
    }

    #[test]
    fn frames_count_search_and_sum() {
        let mut fr = Frames {
            watched: vec![(b"secret".to_vec(), 0)],
            ..Frames::default()
        };
        let l4 = tcp(1234, 8080, 0x18, b"a secret here");
        let mut f = eth(0x0800);
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        fr.add(&f, f.len(), true);
        fr.add(&eth(0x0806), 14, false);
        assert_eq!(fr.count(), 2);
        assert!(fr.contains(b"secret") && fr.contains(b"here") && !fr.contains(b"absent"));
        assert_eq!(fr.watched(b"secret"), Some(1));
        assert_eq!(fr.tcp_ports(), BTreeSet::from([1234, 8080]));
        assert_eq!(fr.payload_bytes_by_port(Proto::Tcp)[&8080], 13);
        assert!(fr.complete());
    }

    #[test]
    fn find_edges() {
        assert!(find(b"abcabd", b"abd"));
        assert!(!find(b"abcab", b"abd"));
        assert!(find(b"x", b"x"));
        assert!(!find(b"", b"x"));
    }
}
