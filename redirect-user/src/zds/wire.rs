//! The node-agent protocol's transport: a SOCK_SEQPACKET Unix socket, one message per
//! datagram, the pod's netns fd as SCM_RIGHTS on Add.

use std::{
    io,
    os::fd::{BorrowedFd, OwnedFd},
};

use tokio_seqpacket::{
    UnixSeqpacket,
    ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage},
};

use super::codec::MAX_MESSAGE;

/// One received datagram.
#[derive(Debug)]
pub struct Datagram {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// The datagram did not fit the 1 KiB buffer (or its fds the control buffer).
    pub truncated: bool,
}

/// Sends one message, with at most one fd.
pub async fn send(sock: &UnixSeqpacket, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    match fd {
        None => {
            sock.send(msg).await?;
        }
        Some(fd) => {
            let fds = [fd];
            let mut cbuf = [0u8; 64];
            let mut anc = AncillaryMessageWriter::new(&mut cbuf);
            anc.add_fds(&fds)
                .map_err(|_| io::Error::other("no room for the fd"))?;
            sock.send_with_ancillary(msg, &mut anc).await?;
        }
    }
    Ok(())
}

/// Receives one message; `None` when the peer closed the connection.
pub async fn recv(sock: &UnixSeqpacket) -> io::Result<Option<Datagram>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cbuf = [0u8; 256];
    let (info, anc) = sock.recv_with_ancillary(&mut buf, &mut cbuf).await?;
    let truncated = info.truncated() || info.ancillary_truncated();
    let mut fds = Vec::new();
    for m in anc.into_messages() {
        if let OwnedAncillaryMessage::FileDescriptors(f) = m {
            fds.extend(f);
        }
    }
    let n = info.bytes_read();
    if n == 0 && fds.is_empty() && !truncated {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some(Datagram {
        bytes: buf,
        fds,
        truncated,
    }))
}

/// The pid of the process at the other end.
pub fn peer_pid(sock: &UnixSeqpacket) -> io::Result<i32> {
    sock.peer_cred()?
        .pid()
        .ok_or_else(|| io::Error::other("no peer pid"))
}
