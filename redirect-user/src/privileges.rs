//! The capabilities each long-running mode needs, checked at start so that a container
//! granted too little refuses to start with one line naming what is missing, instead
//! of failing later on the first pod (or, worse, half-way through an enrolment).
//!
//! The kernel's rules behind the table (each checked with `setpriv`, see
//! docs/kubernetes.md):
//! - `setns(CLONE_NEWNET)` into a pod's namespace: CAP_SYS_ADMIN, no alternative. The
//!   engine enters pods to attach tc filters, add the rule and routes and set
//!   `accept_local`; the proxy enters them to open its listeners.
//! - `bpf()` map creation and program loads: CAP_BPF or CAP_SYS_ADMIN. Our tc egress
//!   program passes the verifier only with CAP_PERFMON (or CAP_SYS_ADMIN) as well:
//!   without it the verifier also walks speculative paths (Spectre v1) and gives up
//!   ("the sequence of 8193 jumps is too complex"). The tc and sock_ops program types,
//!   tc filters, rules, routes and per-namespace settings need CAP_NET_ADMIN (or
//!   CAP_SYS_ADMIN for the program loads only).
//! - `IP_TRANSPARENT` and `SO_MARK` on the proxy's sockets: CAP_NET_ADMIN or CAP_NET_RAW.
//! - Another process's `/proc/<pid>/ns/net` (pods found through `/proc`) and
//!   `pidfd_getfd` of a proxy's listeners: CAP_SYS_PTRACE whenever that process holds a
//!   capability we do not (default container capabilities such as CAP_CHOWN) or runs as
//!   another user.

use std::fmt;

use caps::{CapSet, Capability};

/// The modes that run for long and touch the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `run`: the node agent and the proxy in one process.
    Run,
    /// `node-agent`: the agent alone.
    NodeAgent,
    /// `proxy`: the proxy alone.
    Proxy,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Run => "run",
            Mode::NodeAgent => "node-agent",
            Mode::Proxy => "proxy",
        })
    }
}

/// One thing the code does that the kernel guards: any of `any_of` lets it through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub any_of: &'static [Capability],
    pub what: &'static str,
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.any_of.iter().map(|c| c.to_string()).collect();
        write!(f, "{} ({})", names.join(" or "), self.what)
    }
}

const SETNS: Need = Need {
    any_of: &[Capability::CAP_SYS_ADMIN],
    what: "entering pods' network namespaces",
};
const NET_ADMIN: Need = Need {
    any_of: &[Capability::CAP_NET_ADMIN],
    what: "tc filters, rules, routes and accept_local in pods, loading tc and sock_ops programs",
};
const BPF: Need = Need {
    any_of: &[Capability::CAP_BPF, Capability::CAP_SYS_ADMIN],
    what: "creating maps and loading programs",
};
const PERFMON: Need = Need {
    any_of: &[Capability::CAP_PERFMON, Capability::CAP_SYS_ADMIN],
    what: "the verifier passing the tc programs, which Spectre v1 checks make too long",
};
const PTRACE: Need = Need {
    any_of: &[Capability::CAP_SYS_PTRACE],
    what: "pods' /proc/<pid>/ns/net and a proxy's listeners through pidfd_getfd",
};
const TRANSPARENT: Need = Need {
    any_of: &[Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW],
    what: "the proxy's IP_TRANSPARENT and SO_MARK sockets",
};

/// What `mode` needs, in the order it is reported.
pub fn needs(mode: Mode) -> &'static [Need] {
    match mode {
        Mode::Run => &[SETNS, NET_ADMIN, BPF, PERFMON, PTRACE, TRANSPARENT],
        Mode::NodeAgent => &[SETNS, NET_ADMIN, BPF, PERFMON, PTRACE],
        Mode::Proxy => &[SETNS, TRANSPARENT],
    }
}

/// The needs of `mode` that none of `held` meets.
pub fn missing(mode: Mode, held: &[Capability]) -> Vec<Need> {
    needs(mode)
        .iter()
        .filter(|n| !n.any_of.iter().any(|c| held.contains(c)))
        .copied()
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("`{mode}` cannot start: missing capabilities: {}", list(.missing))]
    Missing { mode: Mode, missing: Vec<Need> },
    #[error("reading this process's effective capabilities: {0}")]
    Read(#[from] caps::errors::CapsError),
}

fn list(missing: &[Need]) -> String {
    let items: Vec<String> = missing.iter().map(Need::to_string).collect();
    items.join("; ")
}

/// Refuses when this process's effective set lacks what `mode` needs.
pub fn check(mode: Mode) -> Result<(), PrivilegeError> {
    let held: Vec<Capability> = caps::read(None, CapSet::Effective)?.into_iter().collect();
    let missing = missing(mode, &held);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing { mode, missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Capability::*;

    const MANIFEST_RUN: &[Capability] = &[CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_PTRACE];

    fn names(m: &[Need]) -> Vec<String> {
        m.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn the_manifests_set_is_enough_for_every_mode() {
        for mode in [Mode::Run, Mode::NodeAgent, Mode::Proxy] {
            assert!(missing(mode, MANIFEST_RUN).is_empty(), "{mode}");
        }
    }

    #[test]
    fn each_capability_removed_is_named() {
        for gone in MANIFEST_RUN {
            let held: Vec<Capability> =
                MANIFEST_RUN.iter().copied().filter(|c| c != gone).collect();
            let m = missing(Mode::Run, &held);
            assert!(!m.is_empty(), "{gone} is not needed by run");
            assert!(
                m.iter().all(|n| n.any_of.contains(gone)),
                "{gone}: {:?}",
                names(&m)
            );
        }
    }

    #[test]
    fn bpf_and_perfmon_stand_in_only_for_the_bpf_part_of_sys_admin() {
        let held = [CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE];
        assert_eq!(missing(Mode::NodeAgent, &held), vec![SETNS]);
        assert_eq!(
            missing(Mode::NodeAgent, &[CAP_NET_ADMIN, CAP_BPF, CAP_SYS_PTRACE]),
            vec![SETNS, PERFMON]
        );
        assert_eq!(missing(Mode::NodeAgent, &[]).len(), 5);
        // Without SYS_ADMIN, BPF nor PERFMON every line names SYS_ADMIN.
        let m = missing(Mode::NodeAgent, &[CAP_NET_ADMIN, CAP_SYS_PTRACE]);
        assert_eq!(
            names(&m),
            [
                "CAP_SYS_ADMIN (entering pods' network namespaces)",
                "CAP_BPF or CAP_SYS_ADMIN (creating maps and loading programs)",
                "CAP_PERFMON or CAP_SYS_ADMIN (the verifier passing the tc programs, which Spectre v1 checks make too long)"
            ]
        );
    }

    #[test]
    fn the_proxy_takes_net_raw_or_net_admin() {
        assert!(missing(Mode::Proxy, &[CAP_SYS_ADMIN, CAP_NET_RAW]).is_empty());
        assert!(missing(Mode::Proxy, &[CAP_SYS_ADMIN, CAP_NET_ADMIN]).is_empty());
        assert_eq!(missing(Mode::Proxy, &[CAP_SYS_ADMIN]), vec![TRANSPARENT]);
        assert_eq!(missing(Mode::Proxy, &[CAP_NET_RAW]), vec![SETNS]);
    }

    #[test]
    fn the_message_is_one_line_naming_each_missing_capability() {
        let e = PrivilegeError::Missing {
            mode: Mode::Run,
            missing: missing(Mode::Run, &[CAP_SYS_ADMIN, CAP_NET_ADMIN]),
        };
        assert_eq!(
            e.to_string(),
            "`run` cannot start: missing capabilities: CAP_SYS_PTRACE (pods' /proc/<pid>/ns/net and a proxy's listeners through pidfd_getfd)"
        );
        assert!(!e.to_string().contains('\n'));
    }
}
