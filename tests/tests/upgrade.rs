//! The split deployment as processes, driven through the CLI as a user would:
//! `redirect-user node-agent`, `redirect-user proxy`, `redirect-user pod add`,
//! `redirect-user status --json`. A connection loop runs while a second proxy takes over
//! from the first (upgrade) and while the agent is killed and restarted.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use redirect_tests::{
    process::{Proc, RemoveDir, cli, pod_add, wait_for},
    *,
};

/// The pid of the proxy serving `uid`, per `status --json`, once the pod is ready.
fn ready_with(dir: &str, uid: &str) -> Option<i64> {
    let out = cli(&["status", "--json", "--state-dir", dir]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let pod = v["pods"]
        .as_array()?
        .iter()
        .find(|p| p["spec"]["uid"] == uid)?
        .clone();
    (pod["state"]["state"] == "ready")
        .then(|| pod["proxy_pid"].as_i64())
        .flatten()
}

struct Loop {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u32, u32, Duration)>,
}

/// New connections from the pod to the peer, back to back, until stopped:
/// (successes, failures, longest time between two successes).
fn connection_loop(ns: Netns, to: std::net::SocketAddr) -> Loop {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        let (mut ok, mut failed, mut gap) = (0u32, 0u32, Duration::ZERO);
        let mut last = Instant::now();
        while !s.load(Ordering::Relaxed) {
            match ask(&ns, to) {
                Ok(a) if a.starts_with("c from ") => {
                    ok += 1;
                    gap = gap.max(last.elapsed());
                    last = Instant::now();
                }
                other => {
                    failed += 1;
                    eprintln!("connection failed: {other:?}");
                }
            }
        }
        (ok, failed, gap)
    });
    Loop { stop, handle }
}

impl Loop {
    fn finish(self) -> (u32, u32, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

#[test]
fn upgrade_and_agent_restart_under_a_connection_loop() {
    let m = Mesh::new("upg", &[("a", 10), ("c", 100)]).unwrap();
    let base = m.base();
    let dir = PathBuf::from(format!("/tmp/{base}-node"));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDir::new(dir.clone());
    let d = dir.to_str().unwrap().to_string();
    let sock = format!("{d}/zds.sock");
    let ca = format!("{d}/ca");
    let pin = format!("/sys/fs/bpf/{base}-node");
    let _pins = RemoveDir::new(pin.clone());
    let mut agent = Proc::node_agent(&dir, &pin, &dir.join("agent.log"));
    let mut v1 = Proc::spawn(
        &[
            "proxy",
            "--socket",
            &sock,
            "--drain-secs",
            "1",
            "--ca-dir",
            &ca,
        ],
        &dir.join("proxy1.log"),
    );
    let netns = m.host("a").path();
    let add = pod_add(&d, &netns, "a");
    // The proxy may connect just after the add: either way the pod becomes ready.
    assert!(add.is_ok(), "{add:?}");
    wait_for("pod ready on proxy 1", 10, || {
        ready_with(&d, "uid-a") == Some(v1.pid() as i64)
    });
    let to = m.addr("c", false, PEER_PORT);
    assert!(ask(&m.ns("a"), to).unwrap().starts_with("c from "));

    // Upgrade: a second proxy starts beside the first, takes the pod, the first leaves.
    let lp = connection_loop(m.ns("a"), to);
    std::thread::sleep(Duration::from_millis(300));
    let v2 = Proc::spawn(
        &[
            "proxy",
            "--socket",
            &sock,
            "--drain-secs",
            "1",
            "--ca-dir",
            &ca,
        ],
        &dir.join("proxy2.log"),
    );
    wait_for("pod ready on proxy 2", 10, || {
        ready_with(&d, "uid-a") == Some(v2.pid() as i64)
    });
    // The old proxy drains (serves on for its drain period) and exits.
    v1.signal(libc::SIGTERM);
    let (ok, failed, gap) = lp.finish();
    eprintln!("upgrade: {ok} connections, {failed} failed, longest gap {gap:?}");
    assert!(ok > 50, "{ok}");
    assert_eq!(failed, 0, "connections failed during the upgrade");

    // The agent dies (SIGKILL): the proxy keeps serving; a new agent takes over.
    let lp = connection_loop(m.ns("a"), to);
    std::thread::sleep(Duration::from_millis(200));
    agent.signal(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    let _agent2 = Proc::node_agent(&dir, &pin, &dir.join("agent2.log"));
    wait_for("pod ready again after the agent restart", 10, || {
        ready_with(&d, "uid-a") == Some(v2.pid() as i64)
    });
    std::thread::sleep(Duration::from_millis(200));
    let (ok, failed, gap) = lp.finish();
    eprintln!("agent restart: {ok} connections, {failed} failed, longest gap {gap:?}");
    assert!(ok > 50, "{ok}");
    assert_eq!(failed, 0, "connections failed while the agent restarted");

    // Operators' log lines.
    let log = std::fs::read_to_string(dir.join("proxy2.log")).unwrap();
    for line in [
        "inpod_uds:",
        "inpod_mark: 1337",
        "handling new stream",
        "received netns, starting proxy",
        "pod received snapshot sent",
    ] {
        assert!(log.contains(line), "{line} missing from the proxy log");
    }
    cli(&["pod", "del", "--state-dir", &d, "--uid", "uid-a"]).unwrap();
    assert!(!ip_out(&m.host("a").name, &["rule"]).contains("0x111"));
}
