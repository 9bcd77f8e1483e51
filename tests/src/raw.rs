//! Packets built by hand, as an attacker builds them: TCP segments in IPv4 or IPv6,
//! split into fragments or put behind chains of extension headers, sent from a raw
//! socket inside a namespace. And the few header fields the security tests read back
//! from a capture (sequence numbers, the MSS option).

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};

use crate::Netns;

pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;
pub const PSH: u8 = 0x08;

/// A TCP segment to build.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// The MSS option (SYNs); none when 0.
    pub mss: u16,
    pub payload: Vec<u8>,
}

impl Segment {
    pub fn syn(src: SocketAddr, dst: SocketAddr, seq: u32) -> Self {
        Self {
            src,
            dst,
            seq,
            ack: 0,
            flags: SYN,
            mss: 1400,
            payload: Vec::new(),
        }
    }

    /// The TCP header and payload, checksummed.
    pub fn tcp_bytes(&self) -> Vec<u8> {
        let opts: Vec<u8> = if self.mss != 0 {
            let m = self.mss.to_be_bytes();
            vec![2, 4, m[0], m[1]]
        } else {
            Vec::new()
        };
        let hlen = 20 + opts.len();
        let mut t = Vec::with_capacity(hlen + self.payload.len());
        t.extend_from_slice(&self.src.port().to_be_bytes());
        t.extend_from_slice(&self.dst.port().to_be_bytes());
        t.extend_from_slice(&self.seq.to_be_bytes());
        t.extend_from_slice(&self.ack.to_be_bytes());
        t.push(((hlen / 4) as u8) << 4);
        t.push(self.flags);
        t.extend_from_slice(&65535u16.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        t.extend_from_slice(&opts);
        t.extend_from_slice(&self.payload);
        let sum = l4_checksum(self.src.ip(), self.dst.ip(), 6, &t);
        t[16..18].copy_from_slice(&sum.to_be_bytes());
        t
    }
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn add_bytes(sum: &mut u32, b: &[u8]) {
    for c in b.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        *sum += w as u32;
    }
}

/// The TCP/UDP checksum over the pseudo-header of either family.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, data: &[u8]) -> u16 {
    let mut sum = 0u32;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            add_bytes(&mut sum, &s.octets());
            add_bytes(&mut sum, &d.octets());
            sum += proto as u32;
            sum += data.len() as u32;
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            add_bytes(&mut sum, &s.octets());
            add_bytes(&mut sum, &d.octets());
            sum += data.len() as u32;
            sum += proto as u32;
        }
        _ => panic!("mixed families"),
    }
    add_bytes(&mut sum, data);
    fold(sum)
}

/// An IPv4 packet of TCP bytes `chunk`, `frag` the flags and fragment offset field.
fn ipv4(seg: &Segment, id: u16, frag: u16, chunk: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (seg.src.ip(), seg.dst.ip()) else {
        panic!("IPv4 addresses")
    };
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, 6, 0, 0]);
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&d.octets());
    let mut sum = 0;
    add_bytes(&mut sum, &h);
    let c = fold(sum);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(chunk);
    h
}

/// IPv4 packets carrying the segment, split so that the first fragment holds `first`
/// bytes of it (a multiple of 8), the rest in one more fragment.
pub fn ipv4_fragments(seg: &Segment, first: usize, id: u16) -> Vec<Vec<u8>> {
    assert!(first.is_multiple_of(8) && first > 0);
    let l4 = seg.tcp_bytes();
    vec![
        ipv4(seg, id, 0x2000, &l4[..first]),
        ipv4(seg, id, (first / 8) as u16, &l4[first..]),
    ]
}

/// An IPv6 header for `payload_len` bytes after it, first next header `next`.
fn ipv6_header(seg: &Segment, next: u8, payload_len: usize) -> Vec<u8> {
    let (IpAddr::V6(s), IpAddr::V6(d)) = (seg.src.ip(), seg.dst.ip()) else {
        panic!("IPv6 addresses")
    };
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload_len as u16).to_be_bytes());
    h.push(next);
    h.push(64);
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&d.octets());
    h
}

/// An IPv6 packet whose TCP segment sits behind `n` destination-options headers
/// (8 bytes each, PadN).
pub fn ipv6_with_dstopts(seg: &Segment, n: usize) -> Vec<u8> {
    let l4 = seg.tcp_bytes();
    let mut ext = Vec::new();
    for i in 0..n {
        let next = if i + 1 == n { 6 } else { 60 };
        ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    let first = if n == 0 { 6 } else { 60 };
    let mut p = ipv6_header(seg, first, ext.len() + l4.len());
    p.extend_from_slice(&ext);
    p.extend_from_slice(&l4);
    p
}

/// IPv6 fragments of a TCP segment: the first holds `first` bytes of it (a multiple of
/// 8), the rest in one more.
pub fn ipv6_fragments(seg: &Segment, first: usize, id: u32) -> Vec<Vec<u8>> {
    assert!(first.is_multiple_of(8) && first > 0);
    let l4 = seg.tcp_bytes();
    let mut out = Vec::new();
    for (off, chunk, more) in [(0, &l4[..first], true), (first, &l4[first..], false)] {
        let mut p = ipv6_header(seg, 44, 8 + chunk.len());
        p.push(6);
        p.push(0);
        let fo = (off as u16) | u16::from(more);
        p.extend_from_slice(&fo.to_be_bytes());
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(chunk);
        out.push(p);
    }
    out
}

/// A whole IPv4 packet (don't fragment) carrying the segment.
pub fn ipv4_packet(seg: &Segment) -> Vec<u8> {
    ipv4(seg, 0, 0x4000, &seg.tcp_bytes())
}

/// A whole packet (IPv4, or IPv6 with no extension header) carrying the segment.
pub fn packet(seg: &Segment) -> Vec<u8> {
    if seg.src.is_ipv6() {
        ipv6_with_dstopts(seg, 0)
    } else {
        ipv4_packet(seg)
    }
}

/// A raw socket in a namespace that sends whole IP packets (headers included).
pub struct RawSender {
    fd: std::os::fd::OwnedFd,
    v6: bool,
}

impl RawSender {
    pub fn new(ns: &Netns, v6: bool) -> Result<Self> {
        use std::os::fd::FromRawFd;
        let fd = ns.run(|| {
            let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
            // SAFETY: plain socket call.
            let fd = unsafe { libc::socket(domain, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            if fd < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                // SAFETY: a fresh fd we own.
                Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
            }
        })??;
        Ok(Self { fd, v6 })
    }

    /// Sends one IP packet to `dst` (its destination address).
    pub fn send(&self, dst: IpAddr, packet: &[u8]) -> Result<()> {
        use std::os::fd::AsRawFd;
        let sa: socket2::SockAddr = SocketAddr::new(dst, 0).into();
        if dst.is_ipv6() != self.v6 {
            bail!("family mismatch");
        }
        // SAFETY: the buffer and address are valid for the call.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                sa.as_ptr().cast(),
                sa.len(),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error()).context("raw sendto");
        }
        Ok(())
    }

    pub fn send_all(&self, dst: IpAddr, packets: &[Vec<u8>]) -> Result<()> {
        for p in packets {
            self.send(dst, p)?;
        }
        Ok(())
    }
}

/// The TCP header fields of a captured frame (IPv4, or IPv6 with no extension header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSeen {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub mss: Option<u16>,
}

/// Reads the TCP header of an Ethernet frame.
pub fn tcp_of_frame(f: &[u8]) -> Option<TcpSeen> {
    let et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let ip = &f[14..];
    let (src, dst, t) = match et {
        0x0800 => {
            if *ip.get(9)? != 6 || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return None;
            }
            let ihl = ((ip[0] & 0xf) as usize) * 4;
            let s: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), ip.get(ihl..)?)
        }
        0x86dd => {
            if *ip.get(6)? != 6 {
                return None;
            }
            let s: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), ip.get(40..)?)
        }
        _ => return None,
    };
    if t.len() < 20 {
        return None;
    }
    let be32 = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
    let hlen = ((t[12] >> 4) as usize) * 4;
    let mut mss = None;
    let mut i = 20;
    while i < hlen.min(t.len()) {
        match t[i] {
            0 => break,
            1 => i += 1,
            k => {
                let l = *t.get(i + 1)? as usize;
                if k == 2 && l == 4 {
                    mss = Some(u16::from_be_bytes([t[i + 2], t[i + 3]]));
                }
                if l < 2 {
                    break;
                }
                i += l;
            }
        }
    }
    Some(TcpSeen {
        src: SocketAddr::new(src, u16::from_be_bytes([t[0], t[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([t[2], t[3]])),
        seq: be32(4),
        ack: be32(8),
        flags: t[13],
        mss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(v6: bool) -> Segment {
        let (s, d): (IpAddr, IpAddr) = if v6 {
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap())
        } else {
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap())
        };
        Segment::syn(SocketAddr::new(s, 40000), SocketAddr::new(d, 80), 7)
    }

    #[test]
    fn a_checksummed_segment_sums_to_zero() {
        for v6 in [false, true] {
            let s = seg(v6);
            let t = s.tcp_bytes();
            // Summing a segment with its own checksum in place gives 0 (ones' complement).
            assert_eq!(l4_checksum(s.src.ip(), s.dst.ip(), 6, &t), 0);
        }
    }

    #[test]
    fn fragments_carry_the_segment_in_pieces() {
        let s = seg(false);
        let f = ipv4_fragments(&s, 8, 1);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].len(), 28);
        assert_eq!(u16::from_be_bytes([f[0][6], f[0][7]]), 0x2000);
        assert_eq!(u16::from_be_bytes([f[1][6], f[1][7]]), 1);
        let f6 = ipv6_fragments(&seg(true), 8, 1);
        assert_eq!(f6[0][6], 44);
        assert_eq!(f6[0].len(), 40 + 8 + 8);
    }

    #[test]
    fn a_frame_reads_back() {
        for v6 in [false, true] {
            let s = seg(v6);
            let mut frame = vec![0u8; 12];
            frame.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
            frame.extend_from_slice(&packet(&s));
            let t = tcp_of_frame(&frame).unwrap();
            assert_eq!(
                (t.src, t.dst, t.seq, t.flags, t.mss),
                (s.src, s.dst, 7, SYN, Some(1400))
            );
        }
    }
}
