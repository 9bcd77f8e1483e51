//! SIGTERM or SIGINT in the middle of a run removes what the run made: the demo (its
//! namespaces, pin directories and CA directory), and a test process holding the
//! fixtures (a topology with an engine and an enrolled pod, a node agent process with
//! its state and pin directories and a pod enrolled through it, a containerd runtime
//! with a running pod). Each run is a separate process, signalled once it holds
//! everything; afterwards `ip netns list`, the host's links, the bpffs, the directories
//! and the process table are read for anything of it.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use redirect_tests::{
    cri::{CniSetup, Footprint, PodDef, Runtime},
    process::{Proc, RemoveDir, pod_add, wait_for},
    *,
};
use serde::{Deserialize, Serialize};

/// The names of the namespaces in `ip netns list`.
fn netns_list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The host's link names (`ip -o link`).
fn host_links() -> Vec<String> {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?;
            Some(name.split('@').next()?.to_string())
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    // A zombie is gone for our purpose: it holds nothing.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// Waits for `child` to end, at most `secs`.
fn wait_exit(child: &mut Child, secs: u64) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "did not end within {secs} s of the signal"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `child`'s stdout on a thread: its lines, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rx
}

/// Waits for a line starting with `marker`; panics with what came instead.
fn wait_line(rx: &mpsc::Receiver<String>, marker: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(marker) => return,
            Ok(l) => seen.push(l),
            Err(_) => break,
        }
    }
    panic!(
        "no line {marker:?} within {secs} s; got:\n{}",
        seen.join("\n")
    );
}

/// A child killed when dropped (the test failed before it ended).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// The demo, stopped during its first part (SIGTERM) and during its second, the mesh
/// across two nodes (SIGINT): nothing of it is left, and it ended by the signal.
#[test]
fn the_demo_removes_what_it_made_when_interrupted() {
    for (sig, marker, part) in [
        (libc::SIGTERM, "== traffic", "rdemo"),
        (libc::SIGINT, "== m1 -> m2", "rdmesh"),
    ] {
        let mut run = Running(
            Command::new(redirect_user_bin().unwrap())
                .arg("demo")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let demo = &mut run.0;
        let rx = lines_of(demo);
        wait_line(&rx, marker, 60);
        // Topology names: <tag>-<pid & 0xffff in hex><sequence in hex>-…; the first
        // part's topology is the process's first, the mesh part's its second.
        let seq = if part == "rdemo" { 0 } else { 1 };
        let prefix = format!("{part}-{:x}{seq:x}-", demo.id() & 0xffff);
        let pin = PathBuf::from(if part == "rdemo" {
            "/sys/fs/bpf/redirect-demo"
        } else {
            "/sys/fs/bpf/redirect-demo-mesh"
        });
        let ours = || -> Vec<String> {
            netns_list()
                .into_iter()
                .filter(|n| n.starts_with(&prefix))
                .collect()
        };
        let made = ours();
        assert!(
            made.len() >= 4,
            "the demo's namespaces are not seen: {made:?}"
        );
        assert!(pin.exists(), "{} is not there while it runs", pin.display());
        let ca = std::env::temp_dir().join(format!("{prefix}ca"));
        let ca = if part == "rdmesh" {
            assert!(ca.exists(), "{} is not there while it runs", ca.display());
            Some(ca)
        } else {
            None
        };

        signal(demo, sig);
        let status = wait_exit(demo, 30);
        assert_eq!(
            status.signal(),
            Some(sig),
            "the demo did not end by signal {sig}: {status}"
        );
        assert_eq!(
            ours(),
            Vec::<String>::new(),
            "namespaces left after signal {sig}"
        );
        assert!(!pin.exists(), "{} left after signal {sig}", pin.display());
        if let Some(ca) = ca {
            assert!(!ca.exists(), "{} left after signal {sig}", ca.display());
        }
        assert!(!alive(demo.id() as i32));
    }
}

/// What the fixture-holding child made, for the parent to look for afterwards.
#[derive(Serialize, Deserialize, Debug)]
struct Made {
    netns: Vec<String>,
    paths: Vec<PathBuf>,
    pids: Vec<i32>,
    links: Vec<String>,
    runtime: Option<Footprint>,
}

const REPORT: &str = "INTERRUPT_REPORT";
const WITH_CRI: &str = "INTERRUPT_WITH_CRI";

/// Not a test on its own: the child of [`a_test_process_removes_its_fixtures_when_interrupted`].
/// Makes every kind of fixture, writes down what it made, then waits to be signalled.
#[test]
#[ignore = "run as a child by a_test_process_removes_its_fixtures_when_interrupted"]
fn holds_fixtures_until_signalled() {
    let Some(report) = std::env::var_os(REPORT) else {
        return;
    };
    let m = Mesh::new("rsig", &[("a", 10), ("c", 100)]).unwrap();
    m.enrol("a", PodOptions::default()).unwrap();
    let base = m.base();
    let dir = PathBuf::from(format!("/tmp/{base}-agent"));
    let pin = format!("/sys/fs/bpf/{base}-agent");
    let _dirs = (RemoveDir::new(&dir), RemoveDir::new(&pin));
    let agent = Proc::node_agent(&dir, &pin, &dir.join("agent.log"));
    wait_for("agent control socket", 15, || {
        dir.join("control.sock").exists()
    });
    pod_add(dir.to_str().unwrap(), &m.host("c").path(), "c").unwrap();
    let runtime = std::env::var_os(WITH_CRI).map(|_| {
        let rt = Runtime::start("rsig", CniSetup::bridge()).unwrap();
        rt.run_pod(&PodDef::new("web").tcp_responder("app", 8080, "hi"))
            .unwrap();
        rt
    });
    let mut netns: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{base}-")))
        .collect();
    let fp = runtime.as_ref().map(Runtime::footprint);
    if let Some(fp) = &fp {
        netns.extend(
            fp.netns
                .iter()
                .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned())),
        );
    }
    let made = Made {
        netns,
        paths: vec![m.pin_dir.clone(), dir.clone(), pin.clone().into()],
        pids: vec![agent.pid()],
        links: fp.iter().map(|f| f.bridge.clone()).collect(),
        runtime: fp,
    };
    let tmp = Path::new(&report).with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&made).unwrap()).unwrap();
    std::fs::rename(&tmp, &report).unwrap();
    std::thread::sleep(Duration::from_secs(600));
    panic!("not signalled");
}

/// Runs [`holds_fixtures_until_signalled`] as a test binary is run (libtest, one test),
/// signals it once it holds everything, and looks for anything it made.
fn interrupt_child(sig: i32, with_cri: bool) {
    let report =
        std::env::temp_dir().join(format!("rsig-report-{}-{sig}.json", std::process::id()));
    let _report = RemoveDir::new(&report);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "holds_fixtures_until_signalled",
        "--nocapture",
    ])
    .env(REPORT, &report)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if with_cri {
        cmd.env(WITH_CRI, "1");
    }
    let mut run = Running(cmd.spawn().unwrap());
    let child = &mut run.0;
    let t = Instant::now();
    while !report.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the child did not make its fixtures"
        );
        assert!(child.try_wait().unwrap().is_none(), "the child ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let made: Made = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    eprintln!("the child made: {made:?}");
    // The check sees what is there.
    assert!(made.netns.len() >= 3, "{made:?}");
    for n in &made.netns {
        assert!(netns_list().contains(n), "namespace {n} not seen");
    }
    for p in &made.paths {
        assert!(p.exists(), "{} not seen", p.display());
    }
    for &pid in &made.pids {
        assert!(alive(pid), "process {pid} not seen");
    }
    let live = made.runtime.as_ref().map(Footprint::leftovers);
    if let Some(live) = &live {
        assert!(
            live.iter().any(|l| l.starts_with("process")),
            "the runtime's processes are not seen: {live:?}"
        );
    }

    signal(child, sig);
    let status = wait_exit(child, 60);
    assert_eq!(
        status.signal(),
        Some(sig),
        "the child did not end by signal {sig}: {status}"
    );
    let mut left = Vec::new();
    let names = netns_list();
    left.extend(
        made.netns
            .iter()
            .filter(|n| names.contains(n))
            .map(|n| format!("netns {n}")),
    );
    let links = host_links();
    left.extend(
        made.links
            .iter()
            .filter(|l| links.contains(l))
            .map(|l| format!("link {l}")),
    );
    left.extend(
        made.paths
            .iter()
            .filter(|p| p.exists())
            .map(|p| format!("path {}", p.display())),
    );
    // Killed processes may take a moment to be reaped by init.
    let t = Instant::now();
    while made.pids.iter().any(|&p| alive(p)) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    left.extend(
        made.pids
            .iter()
            .filter(|&&p| alive(p))
            .map(|p| format!("process {p}")),
    );
    if let Some(fp) = &made.runtime {
        left.extend(fp.leftovers());
    }
    assert!(left.is_empty(), "left behind after signal {sig}: {left:#?}");
}

#[test]
fn a_test_process_removes_its_fixtures_when_interrupted() {
    interrupt_child(libc::SIGTERM, true);
    interrupt_child(libc::SIGINT, false);
}
