//! The guard: a cgroup_skb egress program on the root of the cgroup2 hierarchy that
//! lets an enrolled pod's TCP (and captured DNS) leave only through interfaces that
//! carry our tc programs (the `covered` map, kept by enrolment and by the watcher) or
//! lo, and stops a connection whose SYN tc egress never took (its filter removed from
//! inside the pod). It runs for every socket's packets whatever the interface, before
//! tc, and no one inside a pod can detach it: an interface that appears in a pod is
//! closed to the pod's TCP from its first packet until the engine has attached to it,
//! and an L3 device (tun, wireguard, ipip, gre: no Ethernet header for the tc programs
//! to bounce) stays closed.
//!
//! Pinned: `progs/redirect_guard`, the link `node/guard`.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, links::FdLink},
};
use redirect_ebpf::names;
use tracing::warn;

use super::{EngineError, host_probes::attach_on_root};

/// Where the node-wide link is pinned.
pub(super) fn link_pin(pin_dir: &Path) -> PathBuf {
    pin_dir.join("node").join(names::LINK_GUARD)
}

/// Loads and pins the program and attaches it to the cgroup2 root (or points the link
/// an earlier run pinned at this run's program). False without cgroup v2: then nothing
/// guards interfaces the engine has not attached to (said in the log).
pub(super) fn attach(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<bool, EngineError> {
    let name = names::PROG_GUARD;
    let err = |source| EngineError::Program { name, source };
    let prog: &mut CgroupSkb = ebpf
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
        |p: &mut CgroupSkb, cg| {
            let id = p.attach(cg, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)?;
            let link: FdLink =
                p.take_link(id)?
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| {
                        aya::programs::ProgramError::IOError(std::io::Error::other(e.to_string()))
                    })?;
            Ok(link)
        },
    )?;
    if !attached {
        warn!(
            "redirect: no cgroup2 filesystem mounted: interfaces added to a pod after enrolment are not guarded until the engine attaches to them"
        );
    }
    Ok(attached)
}
