//! One owner of a pin directory across processes. The engine allocates pod ids and
//! writes the pod index from its own memory and re-pins the programs at start, so two
//! engines on one directory (a rolling update with surge, a second `run` by mistake)
//! would corrupt each other's state. The owner holds an exclusive `flock` on the
//! directory for its life; the kernel drops it when the process ends, even on SIGKILL.

use std::{
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("cannot open the pin directory {path} to take ownership: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock the pin directory {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the pin directory {path} is owned by another engine, {holder}; waited {waited:?} for it to exit. Two engines on one pinned state corrupt it: stop the other one, or give this one its own --pin-dir"
    )]
    Busy {
        path: PathBuf,
        holder: String,
        waited: Duration,
    },
}

/// The held ownership; dropping it (or the process ending) gives the directory up.
#[derive(Debug)]
pub struct PinOwner {
    _fd: OwnedFd,
}

impl PinOwner {
    /// Takes the directory, waiting up to `wait` for an owner to exit.
    pub fn acquire(dir: &Path, wait: Duration) -> Result<Self, OwnerError> {
        let file = std::fs::File::open(dir).map_err(|source| OwnerError::Open {
            path: dir.into(),
            source,
        })?;
        let fd: OwnedFd = file.into();
        let started = Instant::now();
        let mut told = false;
        loop {
            // SAFETY: flock on an fd we own.
            let r = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                if told {
                    info!(pin_dir = %dir.display(), waited_ms = started.elapsed().as_millis() as u64, "redirect: pin directory taken over from the previous owner");
                }
                return Ok(Self { _fd: fd });
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(OwnerError::Lock {
                    path: dir.into(),
                    source: e,
                });
            }
            if started.elapsed() >= wait {
                return Err(OwnerError::Busy {
                    path: dir.into(),
                    holder: holder(dir),
                    waited: started.elapsed(),
                });
            }
            if !told {
                warn!(pin_dir = %dir.display(), holder = holder(dir), wait_s = wait.as_secs_f32(), "redirect: pin directory owned by another engine, waiting for it to exit");
                told = true;
            }
            std::thread::sleep(Duration::from_millis(50).min(wait));
        }
    }
}

/// Whether another engine holds `dir` now (a probe: the lock is not kept). False when
/// the directory does not exist.
pub fn held(dir: &Path) -> bool {
    let Ok(file) = std::fs::File::open(dir) else {
        return false;
    };
    // SAFETY: flock on an fd we own; closing it gives the probe's lock up.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

/// Who holds the lock on `dir`, from `/proc/locks`: "process <pid> (<command line>)".
pub fn holder(dir: &Path) -> String {
    let Ok(md) = std::fs::metadata(dir) else {
        return "an unknown process".into();
    };
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let pids = lock_holders(
        &locks,
        libc::major(md.dev()),
        libc::minor(md.dev()),
        md.ino(),
    );
    let Some(pid) = pids.into_iter().find(|p| *p != std::process::id()) else {
        return "a process of this program (another engine in this process, or an unknown one)"
            .into();
    };
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .split('\0')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    format!("process {pid} ({cmd})")
}

/// Pids holding an flock on the inode `major:minor:ino`, from `/proc/locks` text
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:28:1 0 EOF`, device numbers in hex).
pub fn lock_holders(text: &str, major: u32, minor: u32, ino: u64) -> Vec<u32> {
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Blocked waiters are listed as "1: -> FLOCK ..."; skip them.
            if f.get(1) != Some(&"FLOCK") {
                return None;
            }
            (f.get(5) == Some(&want.as_str()))
                .then(|| f.get(4)?.parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let text = "1: FLOCK  ADVISORY  WRITE 11588 fe:00:5341351 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 12421 00:28:1 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 999 00:28:1 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 77 00:28:1 0 EOF\n";
        assert_eq!(lock_holders(text, 0, 0x28, 1), vec![12421]);
        assert_eq!(lock_holders(text, 0xfe, 0, 5341351), vec![11588]);
        assert!(lock_holders(text, 0, 0x28, 2).is_empty());
    }

    #[test]
    fn a_second_owner_waits_then_is_refused_naming_the_first() {
        let dir = std::env::temp_dir().join(format!("redirect-owner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = PinOwner::acquire(&dir, Duration::ZERO).unwrap();
        let t = Instant::now();
        let err = PinOwner::acquire(&dir, Duration::from_millis(200)).unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!(matches!(err, OwnerError::Busy { .. }), "{err}");
        assert!(held(&dir), "the probe sees the first owner");
        assert!(err.to_string().contains("owned by another engine"), "{err}");
        // Given up, the directory can be taken.
        drop(first);
        assert!(!held(&dir), "nobody holds it");
        let again = PinOwner::acquire(&dir, Duration::ZERO);
        assert!(again.is_ok());
        drop(again);
        let _ = std::fs::remove_dir(&dir);
    }
}
