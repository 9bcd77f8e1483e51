//! Whose 0x539-marked sockets are the proxy's (parity rows 6 and 7): the cgroups in
//! `proxy_cgroups`. A cgroup is trusted only while a proxy holds it, and never one that
//! pods share: the root of the cgroup2 hierarchy holds every process on a host where
//! nothing sorts processes into cgroups (this kind of machine), so trusting it would
//! trust every app. A proxy found there is moved into a cgroup of its own first
//! (`<cgroup2 mount>/redirect-proxy-<pid>`).
//!
//! [`TrustTable`] is the pure bookkeeping (which ids must be in the map, counted per
//! proxy connection); the rest reads and changes `/proc` and the cgroup2 filesystem.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::{
        fd::{AsRawFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::{info, warn};

/// Prefix of the cgroups the engine and the agent make for proxies.
pub const PROXY_CGROUP_PREFIX: &str = "redirect-proxy-";
/// How long entries found pinned from an earlier run stay trusted without a proxy
/// claiming them: the proxies of a restarted agent reconnect within this time, and
/// their upstream sockets must not be steered back to them meanwhile.
pub const CARRIED_TRUST_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("no cgroup2 filesystem mounted")]
    NoCgroup2,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("no cgroup v2 entry in /proc/{pid}/cgroup")]
    NoEntry { pid: String },
    #[error("cgroup {0:?} lies outside this process's cgroup namespace")]
    OutsideNamespace(String),
    #[error(
        "cgroup {id} is the root of the cgroup2 hierarchy, shared by every process that no one put elsewhere (pods' apps too): trusting it would let any app bypass the proxy with SO_MARK 0x539"
    )]
    Shared { id: u64 },
    #[error("process {pid} is in no cgroup under {mount}")]
    NotInMount { pid: String, mount: PathBuf },
    #[error("process {pid} exited while it was being moved into {path}")]
    Gone { pid: i32, path: PathBuf },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> TrustError + '_ {
    move |source| TrustError::Io {
        path: path.into(),
        source,
    }
}

/// Where the cgroup2 filesystem is mounted (`/sys/fs/cgroup` or, on hybrid hosts,
/// `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fs) = (f.next()?, f.next()?, f.next()?);
        (fs == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The id of a cgroup (the inode of its directory, as `bpf_skb_cgroup_id` reports it).
pub fn cgroup_id(dir: &Path) -> Result<u64, TrustError> {
    Ok(std::fs::metadata(dir).map_err(io_at(dir))?.ino())
}

/// The id of the root of the hierarchy this process sees.
pub fn root_cgroup_id() -> Result<u64, TrustError> {
    cgroup_id(&cgroup2_mount().ok_or(TrustError::NoCgroup2)?)
}

/// The cgroup v2 directory of a process (`"self"` or a pid).
///
/// `/proc/<pid>/cgroup` names it relative to this process's cgroup namespace. In a
/// container with a private cgroup namespace (containerd's default on cgroup v2) that
/// is `/`, while the mount (the host's hierarchy, a hostPath volume) shows the host's
/// root: the path is then checked against the directory's `cgroup.procs`, and when the
/// process is not there it is looked for in the whole hierarchy.
pub fn cgroup_dir_of(pid: &str) -> Result<PathBuf, TrustError> {
    let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = std::fs::read_to_string(&file).map_err(io_at(&file))?;
    let rel = parse_v2_entry(&text).ok_or_else(|| TrustError::NoEntry { pid: pid.into() })?;
    if rel.split('/').any(|c| c == "..") {
        return Err(TrustError::OutsideNamespace(rel.into()));
    }
    let mount = cgroup2_mount().ok_or(TrustError::NoCgroup2)?;
    let dir = mount.join(rel.trim_start_matches('/'));
    let tgid = match pid {
        "self" => std::process::id(),
        p => p.parse().unwrap_or(0),
    };
    if tgid == 0 || holds(&dir, tgid) {
        return Ok(dir);
    }
    let found = find_member(&mount, tgid).ok_or_else(|| TrustError::NotInMount {
        pid: pid.into(),
        mount: mount.clone(),
    })?;
    info!(
        pid,
        cgroup = %found.display(),
        "redirect: cgroup found by membership (this process has a cgroup namespace of its own)"
    );
    Ok(found)
}

/// True if `tgid` is listed in `dir/cgroup.procs`.
fn holds(dir: &Path, tgid: u32) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .is_ok_and(|t| t.lines().any(|l| l.trim().parse() == Ok(tgid)))
}

/// The cgroup under `mount` whose `cgroup.procs` lists `tgid`.
fn find_member(mount: &Path, tgid: u32) -> Option<PathBuf> {
    let mut todo = vec![mount.to_path_buf()];
    while let Some(dir) = todo.pop() {
        if holds(&dir, tgid) {
            return Some(dir);
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            todo.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    None
}

/// True if `dir` is the root of its cgroup2 hierarchy, not a cgroup namespace's view
/// of it: the kernel shows `cgroup.type` in every cgroup but the root.
pub fn is_hierarchy_root(dir: &Path) -> bool {
    dir.join("cgroup.procs").exists() && !dir.join("cgroup.type").exists()
}

/// The path of the v2 entry (`0::<path>`) of a `/proc/<pid>/cgroup` file.
pub fn parse_v2_entry(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Serialises moves of this process, which every engine of the process may try at once.
static SELF_MOVE: Mutex<()> = Mutex::new(());

/// A cgroup a proxy can be trusted by: its own, never the hierarchy's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyCgroup {
    pub id: u64,
    pub dir: PathBuf,
    /// True if this call made the cgroup and moved the process into it.
    pub moved: bool,
}

/// The cgroup of process `pid` (this process with `None`), moved first into a cgroup of
/// its own under the cgroup2 mount if it sits in the hierarchy's root. `pidfd`, when
/// given, is the process the caller means: a pid reused meanwhile is caught.
pub fn proxy_cgroup(
    pid: Option<i32>,
    pidfd: Option<BorrowedFd<'_>>,
) -> Result<ProxyCgroup, TrustError> {
    let _guard = pid
        .is_none()
        .then(|| SELF_MOVE.lock().unwrap_or_else(|p| p.into_inner()));
    let who = pid.map_or("self".to_string(), |p| p.to_string());
    let mount = cgroup2_mount().ok_or(TrustError::NoCgroup2)?;
    let dir = cgroup_dir_of(&who)?;
    if dir != mount {
        let id = cgroup_id(&dir)?;
        alive(pid, pidfd, &dir)?;
        return Ok(ProxyCgroup {
            id,
            dir,
            moved: false,
        });
    }
    let pid = pid.unwrap_or(std::process::id() as i32);
    let own = mount.join(format!("{PROXY_CGROUP_PREFIX}{pid}"));
    match std::fs::create_dir(&own) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_at(&own)(e)),
    }
    let procs = own.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(io_at(&procs))?;
    alive(Some(pid), pidfd, &own)?;
    let id = cgroup_id(&own)?;
    info!(
        pid,
        cgroup = %own.display(),
        cgroup_id = id,
        "redirect: proxy moved out of the root cgroup into a cgroup of its own (parity row 7)"
    );
    Ok(ProxyCgroup {
        id,
        dir: own,
        moved: true,
    })
}

/// Fails if the process `pidfd` names has exited: its pid may name another one now.
fn alive(pid: Option<i32>, pidfd: Option<BorrowedFd<'_>>, dir: &Path) -> Result<(), TrustError> {
    let Some(fd) = pidfd else { return Ok(()) };
    // SAFETY: pidfd_send_signal with signal 0 only checks; no pointer is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(TrustError::Gone {
            pid: pid.unwrap_or(0),
            path: dir.into(),
        });
    }
    Ok(())
}

/// Removes the cgroup a proxy was moved into, if it is empty (a live process keeps it).
pub fn remove_if_empty(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}

/// For a process the engine moved into `redirect-proxy-<pid>`, at its exit: back into
/// the parent cgroup, and the cgroup made for it removed, so that nothing of ours is
/// left behind. Its sockets are closing; nothing is trusted by this any more.
pub fn leave_own_cgroup() {
    let pid = std::process::id();
    let Ok(dir) = cgroup_dir_of("self") else {
        return;
    };
    if dir.file_name().and_then(|n| n.to_str()) != Some(&format!("{PROXY_CGROUP_PREFIX}{pid}")) {
        return;
    }
    let Some(parent) = dir.parent() else { return };
    if std::fs::write(parent.join("cgroup.procs"), pid.to_string()).is_ok() {
        remove_if_empty(&dir);
    }
}

/// Removes `redirect-proxy-<pid>` cgroups whose process is gone (left by earlier runs).
/// A cgroup that still holds a process cannot be removed, so this never disturbs one.
pub fn remove_stale() {
    let Some(mount) = cgroup2_mount() else { return };
    let Ok(dir) = std::fs::read_dir(&mount) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PROXY_CGROUP_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// The ids of every cgroup that exists now (a walk of the cgroup2 hierarchy).
pub fn live_cgroup_ids() -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let Some(mount) = cgroup2_mount() else {
        return out;
    };
    let mut todo = vec![mount];
    while let Some(dir) = todo.pop() {
        if let Ok(md) = std::fs::metadata(&dir) {
            out.insert(md.ino());
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(e.path());
                }
            }
        }
    }
    out
}

/// Which cgroup ids must be in `proxy_cgroups`: the engine's own (for its life), those
/// of connected proxies (counted: several proxies may share a cgroup), and those found
/// pinned from an earlier run, until claimed or until their grace ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustTable {
    base: BTreeSet<u64>,
    refs: BTreeMap<u64, usize>,
    carried: BTreeSet<u64>,
    carried_until: Option<Instant>,
}

impl TrustTable {
    pub fn new(base: impl IntoIterator<Item = u64>) -> Self {
        Self {
            base: base.into_iter().collect(),
            ..Self::default()
        }
    }

    /// The ids trusted for the engine's whole life (its own identity).
    pub fn base(&self) -> Vec<u64> {
        self.base.iter().copied().collect()
    }

    /// Keeps `ids` (found pinned, already checked) until `until` unless claimed.
    pub fn carry(&mut self, ids: impl IntoIterator<Item = u64>, until: Instant) {
        self.carried = ids
            .into_iter()
            .filter(|id| !self.base.contains(id))
            .collect();
        self.carried_until = Some(until);
    }

    /// Every id that must be in the map.
    pub fn wanted(&self) -> BTreeSet<u64> {
        let mut w = self.base.clone();
        w.extend(self.refs.keys());
        w.extend(&self.carried);
        w
    }

    /// One more proxy in `id`.
    pub fn add(&mut self, id: u64) {
        *self.refs.entry(id).or_default() += 1;
        self.carried.remove(&id);
    }

    /// One proxy of `id` less. False if none was counted.
    pub fn remove(&mut self, id: u64) -> bool {
        match self.refs.get_mut(&id) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.refs.remove(&id);
            }
            None => return false,
        }
        true
    }

    /// Proxies counted in `id` (the engine's own identity not included).
    pub fn count(&self, id: u64) -> usize {
        self.refs.get(&id).copied().unwrap_or(0)
    }

    /// Drops the carried ids once their grace is over; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        match self.carried_until {
            Some(t) if now >= t => {
                self.carried_until = None;
                std::mem::take(&mut self.carried).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }
}

/// Which pinned entries a new run keeps for a while: none that trusts everyone (0),
/// none that pods share (the root), none whose cgroup is gone.
pub fn carried_from_pinned(
    pinned: &[u64],
    root: Option<u64>,
    live: &BTreeSet<u64>,
) -> (Vec<u64>, Vec<u64>) {
    let (keep, drop): (Vec<u64>, Vec<u64>) = pinned
        .iter()
        .partition(|&&id| id != 0 && Some(id) != root && live.contains(&id));
    (keep, drop)
}

pub(crate) fn warn_mark_only(reason: &str) {
    warn!(
        reason,
        "redirect: TRUSTING THE 0x539 MARK ALONE: any app holding CAP_NET_ADMIN can bypass its proxy (parity row 7 not enforced)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_is_trusted_while_a_proxy_holds_it() {
        let mut t = TrustTable::new([7]);
        assert_eq!(t.wanted(), BTreeSet::from([7]));
        t.add(9);
        t.add(9);
        assert_eq!(t.wanted(), BTreeSet::from([7, 9]));
        assert!(t.remove(9));
        assert_eq!(t.wanted(), BTreeSet::from([7, 9]), "one proxy of 9 is left");
        assert!(t.remove(9));
        assert_eq!(t.wanted(), BTreeSet::from([7]));
        assert!(!t.remove(9), "nothing counted any more");
        // The engine's own cgroup stays, proxies come and go in it.
        t.add(7);
        assert!(t.remove(7));
        assert_eq!(t.wanted(), BTreeSet::from([7]));
    }

    #[test]
    fn pinned_entries_are_carried_until_claimed_or_expired() {
        let now = Instant::now();
        let mut t = TrustTable::new([1]);
        t.carry([1, 5, 6], now + Duration::from_secs(10));
        assert_eq!(t.wanted(), BTreeSet::from([1, 5, 6]));
        t.add(5);
        assert!(t.expire(now).is_empty(), "not before the deadline");
        assert_eq!(t.expire(now + Duration::from_secs(10)), vec![6]);
        assert_eq!(t.wanted(), BTreeSet::from([1, 5]), "5 was claimed");
        assert!(t.remove(5));
        assert_eq!(t.wanted(), BTreeSet::from([1]));
    }

    #[test]
    fn the_wildcard_the_root_and_vanished_cgroups_are_not_carried() {
        let live = BTreeSet::from([1, 40, 41]);
        let (keep, drop) = carried_from_pinned(&[0, 1, 40, 99], Some(1), &live);
        assert_eq!(keep, vec![40]);
        assert_eq!(drop, vec![0, 1, 99]);
    }

    #[test]
    fn the_v2_entry_is_found() {
        let text = "4:memory:/x\n0::/kubepods/pod1\n";
        assert_eq!(parse_v2_entry(text), Some("/kubepods/pod1"));
        assert_eq!(parse_v2_entry("0::/\n"), Some("/"));
        assert_eq!(parse_v2_entry("1:cpu:/\n"), None);
    }
}
