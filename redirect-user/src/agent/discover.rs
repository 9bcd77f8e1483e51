//! Finding the listeners a proxy opened inside a pod, so that the engine can steer to
//! them: a proxy speaking the node-agent protocol (ours or upstream's) never hands them
//! over. The pod namespace's own socket tables (`/proc/thread-self/net/…`, read from a
//! thread inside it) give the inodes of the sockets listening on the proxy ports; the
//! proxy's fd table gives which of its fds they are; `pidfd_getfd` duplicates them.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use redirect_ebpf::{PORT_DNS, PORT_INBOUND, PORT_OUTBOUND, PORT_TUNNEL};

use crate::{ebpf::PodSockets, netns::Netns};

/// The proxy sockets found in a pod.
#[derive(Debug, Default)]
pub struct FoundSockets {
    pub outbound: Option<OwnedFd>,
    pub inbound: Option<OwnedFd>,
    pub tunnel: Option<OwnedFd>,
    pub dns_udp: Option<OwnedFd>,
    pub dns_tcp: Option<OwnedFd>,
}

impl FoundSockets {
    pub fn sockets(&self) -> PodSockets<'_> {
        use std::os::fd::AsFd;
        PodSockets {
            outbound: self.outbound.as_ref().map(|f| f.as_fd()),
            inbound: self.inbound.as_ref().map(|f| f.as_fd()),
            tunnel: self.tunnel.as_ref().map(|f| f.as_fd()),
            dns_udp: self.dns_udp.as_ref().map(|f| f.as_fd()),
            dns_tcp: self.dns_tcp.as_ref().map(|f| f.as_fd()),
        }
    }

    /// The three TCP listeners every pod proxy has.
    pub fn complete(&self) -> bool {
        self.outbound.is_some() && self.inbound.is_some() && self.tunnel.is_some()
    }
}

/// What to look for: (port, udp).
const WANTED: [(u16, bool); 5] = [
    (PORT_OUTBOUND, false),
    (PORT_INBOUND, false),
    (PORT_TUNNEL, false),
    (PORT_DNS, true),
    (PORT_DNS, false),
];

/// Parses a `/proc/net/{tcp,tcp6,udp,udp6}` table: (local port, state, inode) per row.
pub fn parse_socket_table(text: &str) -> Vec<(u16, u8, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            let inode = f.get(9)?.parse().ok()?;
            Some((port, state, inode))
        })
        .collect()
}

const TCP_LISTEN: u8 = 0x0a;
const UDP_UNCONNECTED: u8 = 0x07;

/// Inodes of the sockets listening on the proxy ports in `netns`, by (port, udp).
fn listener_inodes(netns: &Netns) -> io::Result<HashMap<u64, (u16, bool)>> {
    netns
        .run(|| -> io::Result<HashMap<u64, (u16, bool)>> {
            let mut out = HashMap::new();
            for (file, udp) in [
                ("tcp", false),
                ("tcp6", false),
                ("udp", true),
                ("udp6", true),
            ] {
                let Ok(text) = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
                else {
                    continue;
                };
                for (port, state, inode) in parse_socket_table(&text) {
                    let want = WANTED.contains(&(port, udp));
                    let idle = if udp {
                        state == UDP_UNCONNECTED
                    } else {
                        state == TCP_LISTEN
                    };
                    if want && idle && inode != 0 {
                        out.insert(inode, (port, udp));
                    }
                }
            }
            Ok(out)
        })
        .map_err(io::Error::other)?
}

/// Like [`find_listeners_of`], for process `pid` as it is now.
pub fn find_listeners(pid: i32, netns: &Netns) -> io::Result<FoundSockets> {
    let pidfd = super::peer::pidfd_open(pid)?;
    find_listeners_of(pid, pidfd.as_fd(), netns)
}

/// Duplicates the proxy's listening sockets in `netns`. The proxy is `pidfd` (held since
/// it connected); `pid` is its number, whose fd table is read. With several sockets on
/// one port (SO_REUSEPORT), the one with the highest fd number is taken.
pub fn find_listeners_of(
    pid: i32,
    pidfd: BorrowedFd<'_>,
    netns: &Netns,
) -> io::Result<FoundSockets> {
    let inodes = listener_inodes(netns)?;
    let mut found = FoundSockets::default();
    if inodes.is_empty() {
        return Ok(found);
    }
    let mut fds: Vec<(i32, u64, (u16, bool))> = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let Some(ino) = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
        else {
            continue;
        };
        let (Ok(ino), Ok(fd)) = (
            ino.parse::<u64>(),
            entry.file_name().to_string_lossy().parse::<i32>(),
        ) else {
            continue;
        };
        if let Some(slot) = inodes.get(&ino) {
            fds.push((fd, ino, *slot));
        }
    }
    // Alive after the listing: the pid named the proxy while its fds were read.
    if !super::peer::pidfd_alive(pidfd) {
        return Err(io::Error::other(format!(
            "the proxy (pid {pid}) has exited"
        )));
    }
    fds.sort();
    for (fd, ino, slot) in fds {
        // SAFETY: pidfd_getfd returns a new fd (a duplicate of the target's) or -1.
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) } as i32;
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        // The fd number may have been closed and reused since the listing.
        if std::fs::File::from(dup.try_clone()?)
            .metadata()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok()
            != Some(ino)
        {
            continue;
        }
        let dup = Some(dup);
        match slot {
            (PORT_OUTBOUND, false) => found.outbound = dup,
            (PORT_INBOUND, false) => found.inbound = dup,
            (PORT_TUNNEL, false) => found.tunnel = dup,
            (PORT_DNS, true) => found.dns_udp = dup,
            (PORT_DNS, false) => found.dns_tcp = dup,
            _ => {}
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_tables_are_parsed() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(
            parse_socket_table(text),
            vec![(15001, 0x0a, 123456), (8080, 0x01, 777)]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:3A9E 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 42 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(parse_socket_table(v6), vec![(15006, 0x0a, 42)]);
        assert_eq!(parse_socket_table("header only\n"), vec![]);
        assert_eq!(parse_socket_table("h\n garbage line\n"), vec![]);
    }
}
