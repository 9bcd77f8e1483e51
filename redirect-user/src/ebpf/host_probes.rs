//! The kubelet's health probes: a TCP connection opened by a socket of the node's own
//! network namespace to an enrolled pod reaches the app directly (parity row 4), the
//! condition of the upstream host rule (`-m owner --socket-exists` to a pod address),
//! with no SNAT address for NetworkPolicies or other CNIs to break.
//!
//! A sock_ops program on the root of the cgroup2 hierarchy sees every TCP socket that
//! connects, with its namespace, before its SYN is built. For the node's namespaces
//! (`node_netns`) and a destination that is an enrolled pod's address it notes the
//! 5-tuple in `host_flows`, which the pod's sk_lookup reads; the note goes when the
//! socket closes. A packet forwarded through the node with the node's address as source
//! has no socket there, writes nothing, and is redirected like any other.
//!
//! Pinned: `progs/redirect_host_probes`, the link `node/host_probes`.

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, SockOps, links::FdLink},
};
use redirect_ebpf::names;
use tracing::{info, warn};

use super::{EngineError, pod};

/// Where the node-wide link is pinned.
pub(super) fn link_pin(pin_dir: &Path) -> PathBuf {
    pin_dir.join("node").join(names::LINK_HOST_PROBES)
}

/// Loads and pins the program, and attaches it to the cgroup2 root (or points the link
/// an earlier run pinned at this run's program). Without cgroup v2 the probes cannot be
/// told apart: they are redirected like any client (said once, in the log).
pub(super) fn attach(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<bool, EngineError> {
    let name = names::PROG_HOST_PROBES;
    let err = |source| EngineError::Program { name, source };
    let prog: &mut SockOps = ebpf
        .program_mut(name)
        .ok_or(err(aya::programs::ProgramError::NotLoaded))?
        .try_into()
        .map_err(err)?;
    prog.load().map_err(err)?;
    let attached = attach_on_root(
        name,
        prog,
        &link_pin(pin_dir),
        pin_dir,
        |p: &mut SockOps, cg| {
            let id = p.attach(cg, CgroupAttachMode::Single)?;
            p.take_link(id)?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| {
                    aya::programs::ProgramError::IOError(std::io::Error::other(e.to_string()))
                })
        },
    )?;
    if !attached {
        warn!(
            "redirect: no cgroup2 filesystem mounted: kubelet probes from the node cannot be told from forwarded traffic and are redirected like any client"
        );
    }
    Ok(attached)
}

/// A program that can be pinned and handed to the kernel by fd (the node-wide ones).
pub(super) trait NodeProgram {
    fn pin_to(&mut self, path: &Path) -> Result<(), aya::pin::PinError>;
    fn prog_fd(&self) -> Result<std::os::fd::OwnedFd, aya::programs::ProgramError>;
}

impl NodeProgram for SockOps {
    fn pin_to(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
        self.pin(path)
    }
    fn prog_fd(&self) -> Result<std::os::fd::OwnedFd, aya::programs::ProgramError> {
        self.fd()?
            .as_fd()
            .try_clone_to_owned()
            .map_err(aya::programs::ProgramError::IOError)
    }
}

impl NodeProgram for aya::programs::CgroupSkb {
    fn pin_to(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
        self.pin(path)
    }
    fn prog_fd(&self) -> Result<std::os::fd::OwnedFd, aya::programs::ProgramError> {
        self.fd()?
            .as_fd()
            .try_clone_to_owned()
            .map_err(aya::programs::ProgramError::IOError)
    }
}

/// Pins a loaded node-wide program as `progs/<name>` and attaches it to the cgroup2
/// root as the link pinned at `pin`; a link an earlier run pinned there is pointed at
/// this program (BPF_LINK_UPDATE) instead. False when no cgroup2 filesystem is mounted.
pub(super) fn attach_on_root<P: NodeProgram>(
    name: &'static str,
    prog: &mut P,
    pin: &Path,
    pin_dir: &Path,
    attach: impl FnOnce(&mut P, File) -> Result<FdLink, aya::programs::ProgramError>,
) -> Result<bool, EngineError> {
    let err = |source| EngineError::Program { name, source };
    let prog_path = pin_dir.join("progs").join(name);
    let _ = std::fs::remove_file(&prog_path);
    prog.pin_to(&prog_path).map_err(|source| EngineError::Pin {
        what: prog_path.display().to_string(),
        source,
    })?;
    match pod::bpf_obj_get(pin) {
        Ok(link) => {
            let prog_fd = prog.prog_fd().map_err(err)?;
            pod::bpf_link_update(link.as_fd(), prog_fd.as_fd()).map_err(|e| {
                EngineError::Attach {
                    what: format!("{} (BPF_LINK_UPDATE)", pin.display()),
                    detail: e.to_string(),
                }
            })?;
            info!(link = %pin.display(), program = name, "redirect: node link taken over");
            return Ok(true);
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => {
            return Err(EngineError::Attach {
                what: pin.display().to_string(),
                detail: e.to_string(),
            });
        }
    }
    let Some(root) = super::trust::cgroup2_mount() else {
        return Ok(false);
    };
    let attach_err = |detail: String| EngineError::Attach {
        what: format!("{name} on {}", root.display()),
        detail,
    };
    // A container's own cgroup2 mount under a private cgroup namespace shows only the
    // container's cgroup: attached there, the program would never see the kubelet.
    if !super::trust::is_hierarchy_root(&root) {
        return Err(attach_err(
            "this is not the root of the cgroup2 hierarchy but a cgroup namespace's view of it (a container with a private cgroup namespace): the kubelet's probes would not be seen; mount the host's /sys/fs/cgroup at /sys/fs/cgroup (a hostPath volume, as deploy/ does)".into(),
        ));
    }
    let cg = File::open(&root).map_err(|e| attach_err(e.to_string()))?;
    // A BPF link on a cgroup always lets others attach beside it (several engines:
    // tests, an upgrade's overlap); the kernel takes no flags with it.
    let link = attach(prog, cg).map_err(|e| {
        use std::error::Error as _;
        attach_err(match e.source() {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        })
    })?;
    if let Some(dir) = pin.parent() {
        std::fs::create_dir_all(dir).map_err(|e| attach_err(e.to_string()))?;
    }
    link.pin(pin).map_err(|e| attach_err(e.to_string()))?;
    info!(cgroup = %root.display(), link = %pin.display(), program = name, "redirect: node link attached");
    Ok(true)
}
