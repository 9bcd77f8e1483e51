//! The node agent as a separate process, as it runs on a node: it keeps serving while
//! an enrolment is stuck, and a removal that fails half-way is kept and completed.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redirect_tests::{process::*, *};

/// A node: pods in namespaces, the agent's directories (removed on drop).
struct Node {
    topo: Topology,
    dir: PathBuf,
    pin: String,
    _dirs: (RemoveDir, RemoveDir),
}

impl Node {
    fn new(tag: &str) -> Node {
        let mut topo = Topology::new(tag).unwrap();
        topo.add_host("a", 10).unwrap();
        topo.add_host("c", 100).unwrap();
        let base = topo.node().trim_end_matches("-node").to_string();
        let dir = PathBuf::from(format!("/tmp/{base}"));
        let pin = format!("/sys/fs/bpf/{base}");
        let dirs = (RemoveDir::new(dir.clone()), RemoveDir::new(pin.clone()));
        Node {
            topo,
            dir,
            pin,
            _dirs: dirs,
        }
    }

    fn state_dir(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn ns(&self, pod: &str) -> String {
        self.topo.host(pod).name.clone()
    }

    /// `redirect-user pod list`, which must answer within `secs`.
    fn list(&self, secs: u64) -> String {
        within(&["pod", "list", "--state-dir", self.state_dir()], secs).unwrap()
    }
}

/// A child killed when dropped.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redirect-user ARGS…`, which must end within `secs`: its stdout.
fn within(args: &[&str], secs: u64) -> anyhow::Result<String> {
    let mut child = Kill(
        Command::new(redirect_user_bin()?)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if t.elapsed() > Duration::from_secs(secs) {
            anyhow::bail!("`{}` got no answer within {secs} s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Small outputs: they fit in the pipes, read after the end.
    let (mut out, mut err) = (String::new(), String::new());
    child.0.stdout.take().unwrap().read_to_string(&mut out)?;
    child.0.stderr.take().unwrap().read_to_string(&mut err)?;
    anyhow::ensure!(status.success(), "{}: {err}", args.join(" "));
    Ok(out)
}

fn pod_add_args<'a>(state_dir: &'a str, netns: &'a str, uid: &'a str) -> Vec<&'a str> {
    vec![
        "pod",
        "add",
        "--state-dir",
        state_dir,
        "--netns",
        netns,
        "--uid",
        uid,
        "--name",
        uid,
        "--namespace",
        "default",
        "--service-account",
        "sa",
    ]
}

fn accept_local(ns: &Netns) -> String {
    ns.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/conf/eth0/accept_local"))
        .unwrap()
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn the_agent_keeps_serving_while_an_enrolment_is_slow() {
    let n = Node::new("slowadd");
    let log = n.dir.join("agent.log");
    let _agent = Proc::node_agent(&n.dir, &n.pin, &log);
    // Namespace paths that take forever to open (FIFOs: an open waits for a writer),
    // as a namespace on a stuck filesystem would; more of them than the agent has
    // runtime threads.
    let mut stuck = Vec::new();
    for i in 0..6 {
        let fifo = n.dir.join(format!("stuck-{i}"));
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let uid = format!("stuck-{i}");
        let args = pod_add_args(n.state_dir(), fifo.to_str().unwrap(), &uid);
        stuck.push(Kill(
            Command::new(redirect_user_bin().unwrap())
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
    }
    std::thread::sleep(Duration::from_millis(500));
    for k in &mut stuck {
        assert!(
            k.0.try_wait().unwrap().is_none(),
            "an add of a stuck pod ended"
        );
    }

    // Meanwhile the agent answers, and enrols another pod at once.
    n.list(5);
    let path = n.topo.host("a").path();
    let state = within(&pod_add_args(n.state_dir(), &path, "uid-a"), 5).unwrap();
    assert!(state.contains("waiting_for_proxy"), "{state}");
    assert!(n.list(5).contains("uid-a"));
    assert!(ip_out(&n.ns("a"), &["rule"]).contains("0x111"));
    within(
        &["pod", "del", "--state-dir", n.state_dir(), "--uid", "uid-a"],
        5,
    )
    .unwrap();
    assert!(!ip_out(&n.ns("a"), &["rule"]).contains("0x111"));
}

/// Runs `f` on a thread of its own inside the mount namespace of process `pid`.
fn in_mounts_of<T: Send>(pid: i32, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    std::thread::scope(|s| {
        s.spawn(|| {
            let mnt = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).unwrap();
            // SAFETY: unshare of this thread's filesystem attributes (required before
            // it may join another mount namespace) and setns with a valid fd.
            unsafe {
                assert_eq!(libc::unshare(libc::CLONE_FS), 0, "unshare");
                assert_eq!(libc::setns(mnt.as_raw_fd(), libc::CLONE_NEWNS), 0, "setns");
            }
            f()
        })
        .join()
        .unwrap()
    })
}

/// `mount(2)` of `src` (None: null) on `target`.
fn mount(src: Option<&str>, target: &str, flags: libc::c_ulong) {
    let c = |p: &str| std::ffi::CString::new(p).unwrap();
    let (src, target) = (src.map(c), c(target));
    let none = std::ptr::null();
    // SAFETY: valid C strings or null.
    let r = unsafe {
        libc::mount(
            src.as_ref().map_or(none, |s| s.as_ptr()),
            target.as_ptr(),
            none,
            flags,
            none.cast(),
        )
    };
    assert_eq!(r, 0, "mount: {}", std::io::Error::last_os_error());
}

fn saved_pods(dir: &Path) -> Vec<serde_json::Value> {
    let b = std::fs::read(dir.join("pods.json")).unwrap();
    serde_json::from_slice(&b).unwrap()
}

#[test]
fn a_removal_that_fails_half_way_is_kept_and_completed_by_the_agent() {
    let n = Node::new("delhalf");
    std::fs::create_dir_all(&n.dir).unwrap();
    // The agent in a mount namespace of its own, where its pin directory can be locked.
    let sock = n.dir.join("zds.sock");
    let log = std::fs::File::create(n.dir.join("agent.log")).unwrap();
    let mut cmd = Command::new(redirect_user_bin().unwrap());
    cmd.args(["node-agent", "--socket", sock.to_str().unwrap()])
        .args(["--state-dir", n.state_dir(), "--pin-dir", &n.pin])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: only async-signal-safe calls (unshare, mount) between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let none = std::ptr::null();
            let flags = libc::MS_REC | libc::MS_PRIVATE;
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(none, c"/".as_ptr(), none, flags, none.cast()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let agent = Kill(cmd.spawn().unwrap());
    wait_for("agent socket", 15, || sock.exists());
    let pid = agent.0.id() as i32;
    let ns = n.ns("a");
    let pod_ns = n.topo.host("a").netns().unwrap();
    let rules = ip_out(&ns, &["rule"]);
    let path = n.topo.host("a").path();
    within(&pod_add_args(n.state_dir(), &path, "uid-a"), 10).unwrap();
    assert_eq!(accept_local(&pod_ns), "1");

    // The pod's link pin cannot be removed (its directory is read-only where the agent
    // sees it): the removal fails half-way, after the namespace was cleaned.
    let links = format!("{}/links", n.pin);
    let l = links.clone();
    in_mounts_of(pid, move || {
        mount(Some(&l), &l, libc::MS_BIND);
        let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        mount(None, &l, ro);
    });
    let del = within(
        &["pod", "del", "--state-dir", n.state_dir(), "--uid", "uid-a"],
        10,
    );
    assert!(del.is_err(), "{del:?}");
    // Kept, as releasing, in the agent and in its saved state.
    let list = n.list(5);
    assert!(
        list.contains("uid-a") && list.contains("releasing"),
        "{list}"
    );
    let saved = saved_pods(&n.dir);
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0]["releasing"], true, "{saved:?}");
    let pin = Path::new(&links).join("uid-a");
    assert!(
        pin.exists(),
        "the link pin went although its removal failed"
    );

    // Once the pin can be removed, the agent completes the removal itself.
    let l = links.clone();
    in_mounts_of(pid, move || {
        let target = std::ffi::CString::new(l).unwrap();
        // SAFETY: umount2 with a valid C string.
        assert_eq!(unsafe { libc::umount2(target.as_ptr(), 0) }, 0);
    });
    wait_for("the removal completed", 15, || {
        n.list(5).trim().is_empty() && saved_pods(&n.dir).is_empty()
    });
    assert_eq!(accept_local(&pod_ns), "0");
    assert!(!pin.exists(), "the link pin is left");
    assert_eq!(ip_out(&ns, &["rule"]), rules);
    assert_eq!(ip_out(&ns, &["route", "show", "table", "100"]), "");
    assert!(!tc_out(&ns, &["qdisc", "show"]).contains("clsact"));
    let maps = Path::new(&n.pin).join("maps/pod_index");
    let dump = bpftool_json(&["map", "dump", "pinned", maps.to_str().unwrap()]).unwrap();
    assert_eq!(dump.as_array().unwrap().len(), 0, "{dump}");
}
