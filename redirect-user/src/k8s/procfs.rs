//! Pods already running when the agent starts (kubernetes.md, "Pods already running"):
//! their network namespace is found through `/proc`. A process's cgroup path names its
//! pod (`pod<uid>`, or `pod<uid with _ for ->` under the systemd driver); the oldest
//! process of the pod outside the host's namespace is preferred, and a namespace is
//! taken only if it holds one of the pod's IPs (upstream paired pods with the wrong
//! namespace when it trusted the first process it met, istio#55139).
//!
//! The /proc root is configurable: a DaemonSet mounts the host's at `/host/proc`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::{netlink::Netlink, netns::Netns};

/// The pod uid named in a `/proc/<pid>/cgroup` file, lowercase with `-`, if any.
///
/// cgroupfs driver: `…/kubepods/burstable/pod<uid>/<container>`;
/// systemd driver: `…/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`.
pub fn pod_uid_of_cgroup(content: &str) -> Option<String> {
    for line in content.lines() {
        // hierarchy-id:controllers:path
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        for part in path.split('/') {
            let part = part.strip_suffix(".slice").unwrap_or(part);
            let rest = if let Some(r) = part.strip_prefix("pod") {
                r
            } else if let Some(i) = part.rfind("-pod") {
                &part[i + 4..]
            } else {
                continue;
            };
            if let Some(uid) = normalize_uid(rest) {
                return Some(uid);
            }
        }
    }
    None
}

/// A pod uid as Kubernetes writes it: a UUID (36 characters), or the 32 hex digits of
/// a static pod's hash. `_` (systemd driver) reads as `-`.
fn normalize_uid(s: &str) -> Option<String> {
    let uid: String = s
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    let hex = |c: char| c.is_ascii_hexdigit();
    let ok = match uid.len() {
        36 => uid.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                hex(c)
            }
        }),
        32 => uid.chars().all(hex),
        _ => false,
    };
    ok.then_some(uid)
}

/// Field 22 of `/proc/<pid>/stat`: the process's start time (clock ticks after boot).
pub fn start_time_of_stat(stat: &str) -> Option<u64> {
    // The command (field 2) is in parentheses and may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest begins with field 3 (state): field 22 is the 20th of rest.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A process of a pod, outside the host's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub pid: u32,
    pub start_time: u64,
    /// The namespace's (device, inode).
    pub netns: (u64, u64),
}

/// The host's network namespace: that of `<proc_root>/1`; if PID 1 cannot be looked at
/// (a sandbox whose init holds more privileges than we do), this process's own, which
/// is the host's for an agent running with `hostNetwork`.
pub fn host_netns(proc_root: &Path) -> std::io::Result<(u64, u64)> {
    ns_id(&proc_root.join("1/ns/net")).or_else(|_| ns_id(Path::new("/proc/self/ns/net")))
}

/// Reads `<proc_root>` once: the processes of the pods in `uids`, per pod uid, oldest
/// first. Processes in the host's namespace ([`host_netns`]) are skipped; processes
/// that vanish during the scan are skipped.
pub fn scan(
    proc_root: &Path,
    uids: &BTreeSet<String>,
) -> std::io::Result<BTreeMap<String, Vec<Candidate>>> {
    let host = host_netns(proc_root)?;
    let mut out: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
    for entry in std::fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let Some(uid) = pod_uid_of_cgroup(&cgroup).filter(|u| uids.contains(u)) else {
            continue;
        };
        let Ok(netns) = ns_id(&dir.join("ns/net")) else {
            continue;
        };
        if netns == host {
            continue;
        }
        let Some(start_time) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| start_time_of_stat(&s))
        else {
            continue;
        };
        out.entry(uid).or_default().push(Candidate {
            pid,
            start_time,
            netns,
        });
    }
    for c in out.values_mut() {
        c.sort_by_key(|c| (c.start_time, c.pid));
    }
    Ok(out)
}

fn ns_id(path: &Path) -> std::io::Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Why no namespace was taken for a pod.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("no process of the pod outside the host's network namespace")]
    NoProcess,
    #[error(
        "no namespace of the pod's processes holds one of its IPs {ips:?} (looked at {looked})"
    )]
    NoneHoldsTheIp { ips: Vec<IpAddr>, looked: usize },
    #[error("the pod has no IP yet")]
    NoIp,
}

/// The namespace of the pod among `candidates` (oldest first): each distinct namespace
/// in the order of its oldest process, the first that holds one of `ips`. Returns the
/// path `<proc_root>/<pid>/ns/net` of that oldest process, usable as `PodSpec.netns`.
pub fn choose(
    proc_root: &Path,
    candidates: &[Candidate],
    ips: &[IpAddr],
    holds: impl Fn(&Path, &[IpAddr]) -> bool,
) -> Result<PathBuf, FindError> {
    if ips.is_empty() {
        return Err(FindError::NoIp);
    }
    if candidates.is_empty() {
        return Err(FindError::NoProcess);
    }
    let mut seen = BTreeSet::new();
    for c in candidates {
        if !seen.insert(c.netns) {
            continue;
        }
        let path = proc_root.join(c.pid.to_string()).join("ns/net");
        if holds(&path, ips) {
            return Ok(path);
        }
    }
    Err(FindError::NoneHoldsTheIp {
        ips: ips.to_vec(),
        looked: seen.len(),
    })
}

/// Whether the namespace at `path` has one of `ips` on an interface (netlink, inside it).
pub fn netns_holds(path: &Path, ips: &[IpAddr]) -> bool {
    let Ok(ns) = Netns::open(path) else {
        return false;
    };
    let addrs = ns.run(|| Netlink::open().and_then(|mut nl| nl.addresses()));
    match addrs {
        Ok(Ok(addrs)) => addrs.iter().any(|(_, a)| ips.contains(a)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";

    #[test]
    fn cgroupfs_paths_name_the_pod() {
        let v1 = format!(
            "12:pids:/kubepods/besteffort/pod{UID}/4f3c\n11:cpu,cpuacct:/kubepods/besteffort/pod{UID}/4f3c\n0::/\n"
        );
        assert_eq!(pod_uid_of_cgroup(&v1).as_deref(), Some(UID));
        let guaranteed = format!("0::/kubepods/pod{UID}/abcdef\n");
        assert_eq!(pod_uid_of_cgroup(&guaranteed).as_deref(), Some(UID));
        // The pod's own level (the sandbox's parent) without a container below.
        let own = format!("0::/kubepods/burstable/pod{UID}\n");
        assert_eq!(pod_uid_of_cgroup(&own).as_deref(), Some(UID));
    }

    #[test]
    fn systemd_paths_name_the_pod() {
        let u = UID.replace('-', "_");
        let v2 = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-0123abcd.scope\n"
        );
        assert_eq!(pod_uid_of_cgroup(&v2).as_deref(), Some(UID));
        let guaranteed = format!("0::/kubepods.slice/kubepods-pod{u}.slice/docker-ab.scope\n");
        assert_eq!(pod_uid_of_cgroup(&guaranteed).as_deref(), Some(UID));
        let upper = format!("0::/kubepods/pod{}/x\n", UID.to_uppercase());
        assert_eq!(pod_uid_of_cgroup(&upper).as_deref(), Some(UID));
    }

    #[test]
    fn static_pods_hash_uids_are_read() {
        let h = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            pod_uid_of_cgroup(&format!("0::/kubepods/burstable/pod{h}/c\n")).as_deref(),
            Some(h)
        );
    }

    #[test]
    fn other_cgroups_name_no_pod() {
        for c in [
            "0::/\n",
            "0::/system.slice/containerd.service\n",
            "0::/kubepods/besteffort\n",
            "0::/user.slice/user-1000.slice/pod-manager.scope\n",
            "0::/podman/pod1234\n",
            // One character short, one too many, a bad character.
            "0::/kubepods/pod0a1b2c3d-4e5f-6789-abcd-ef012345678\n",
            "0::/kubepods/pod0a1b2c3d-4e5f-6789-abcd-ef01234567890\n",
            "0::/kubepods/pod0a1b2c3d-4e5f-6789-abcd-ef012345678g\n",
            "0::/kubepods/pod0a1b2c3d4e5f-6789-abcd-ef0123456789-\n",
            "garbage without colons pod0a1b2c3d-4e5f-6789-abcd-ef0123456789\n",
            "",
        ] {
            assert_eq!(pod_uid_of_cgroup(c), None, "{c:?}");
        }
    }

    #[test]
    fn start_time_is_field_22_whatever_the_command_name() {
        let fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        let tail = fields.join(" ");
        assert_eq!(
            start_time_of_stat(&format!("1234 (sleep) {tail}")),
            Some(22)
        );
        assert_eq!(
            start_time_of_stat(&format!("1234 (a) b (c) d) {tail}")),
            Some(22)
        );
        assert_eq!(start_time_of_stat("1234 (sleep) S 1 2"), None);
        assert_eq!(start_time_of_stat("no parenthesis"), None);
    }

    fn cand(pid: u32, start_time: u64, ino: u64) -> Candidate {
        Candidate {
            pid,
            start_time,
            netns: (4, ino),
        }
    }

    #[test]
    fn the_oldest_namespace_holding_an_ip_is_chosen() {
        let root = Path::new("/host/proc");
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        // Oldest first: pid 10 (ns 100), pid 11 (ns 100), pid 20 (ns 200).
        let c = [cand(10, 5, 100), cand(11, 6, 100), cand(20, 7, 200)];
        let looked = std::cell::RefCell::new(Vec::new());
        let holds = |p: &Path, _: &[IpAddr]| {
            looked.borrow_mut().push(p.to_path_buf());
            p.starts_with("/host/proc/20")
        };
        // The oldest process's namespace lacks the IP: the next namespace is tried,
        // each namespace once.
        assert_eq!(
            choose(root, &c, &[ip], holds).unwrap(),
            PathBuf::from("/host/proc/20/ns/net")
        );
        assert_eq!(
            *looked.borrow(),
            vec![
                PathBuf::from("/host/proc/10/ns/net"),
                PathBuf::from("/host/proc/20/ns/net")
            ]
        );
        // Both hold it: the oldest wins.
        assert_eq!(
            choose(root, &c, &[ip], |_, _| true).unwrap(),
            PathBuf::from("/host/proc/10/ns/net")
        );
        // None holds it: refused.
        assert!(matches!(
            choose(root, &c, &[ip], |_, _| false),
            Err(FindError::NoneHoldsTheIp { looked: 2, .. })
        ));
        assert!(matches!(
            choose(root, &[], &[ip], |_, _| true),
            Err(FindError::NoProcess)
        ));
        assert!(matches!(
            choose(root, &c, &[], |_, _| true),
            Err(FindError::NoIp)
        ));
    }

    #[test]
    fn a_scan_of_this_machine_finds_no_pod_in_the_host_namespace() {
        // This process is in no pod cgroup: nothing found, and the scan reads /proc whole.
        let uids: BTreeSet<String> = [UID.to_string()].into();
        let found = scan(Path::new("/proc"), &uids).unwrap();
        assert!(found.is_empty(), "{found:?}");
        assert!(netns_holds(
            Path::new("/proc/self/ns/net"),
            &["127.0.0.1".parse().unwrap()]
        ));
        assert!(!netns_holds(
            Path::new("/proc/self/ns/net"),
            &["192.0.2.77".parse().unwrap()]
        ));
    }
}
