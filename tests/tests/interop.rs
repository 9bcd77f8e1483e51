//! Our node agent driving an unmodified upstream proxy (ztunnel) that the user built:
//! `ZTUNNEL_BIN=/path/to/ztunnel cargo xtask test -- --ignored upstream`. The proxy
//! runs in its in-pod mode with a self-signed CA and a local workload file, in a
//! namespace of its own; nothing of it is built or shipped here.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use redirect_tests::{
    process::{Proc, RemoveDir, cli, pod_add, wait_for},
    *,
};

fn pod_state(dir: &str) -> String {
    let out = cli(&["status", "--json", "--state-dir", dir]).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v["pods"][0]["state"]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// The upstream proxy in its in-pod mode, in namespace `ns`, on the agent's socket.
fn ztunnel(bin: &str, ns: &str, sock: &str, workloads: &Path, log: &Path) -> Proc {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, bin])
        .env("NODE_NAME", "node1")
        .env("PROXY_MODE", "shared")
        .env("INPOD_UDS", sock)
        .env("FAKE_CA", "true")
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", workloads)
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

#[test]
#[ignore = "needs an upstream proxy binary: ZTUNNEL_BIN=/path/to/ztunnel"]
fn upstream_proxy_under_our_agent() {
    let bin =
        std::env::var("ZTUNNEL_BIN").expect("ZTUNNEL_BIN: the path of an upstream ztunnel binary");
    let m = Mesh::new("zti", &[("a", 10), ("c", 100)]).unwrap();
    let base = m.base();
    let dir = PathBuf::from(format!("/tmp/{base}-zt"));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = (
        RemoveDir(dir.clone()),
        RemoveDir(PathBuf::from(format!("/sys/fs/bpf/{base}-zt"))),
    );
    let d = dir.to_str().unwrap().to_string();
    let sock = format!("{d}/zds.sock");
    let pin = format!("/sys/fs/bpf/{base}-zt");
    let workloads = dir.join("workloads.yaml");
    std::fs::write(
        &workloads,
        format!(
            "workloads:\n- uid: uid-a\n  name: a\n  namespace: default\n  serviceAccount: sa\n  \
             workloadIps: [\"{}\"]\n  protocol: HBONE\n  node: node1\n  network: \"\"\n  services: {{}}\n",
            m.host("a").v4
        ),
    )
    .unwrap();

    let agent_log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let _agent = Proc(
        Command::new(redirect_user_bin().unwrap())
            .args([
                "node-agent",
                "--socket",
                &sock,
                "--state-dir",
                &d,
                "--pin-dir",
                &pin,
            ])
            .stdout(Stdio::null())
            .stderr(agent_log)
            .spawn()
            .unwrap(),
    );
    wait_for("agent socket", 15, || Path::new(&sock).exists());
    let node = m.topo.node().to_string();
    let zt = ztunnel(&bin, &node, &sock, &workloads, &dir.join("ztunnel.log"));
    let netns = m.host("a").path();
    pod_add(&d, &netns, "a").unwrap();
    wait_for("pod ready on the upstream proxy", 15, || {
        pod_state(&d) == "ready"
    });

    let out = m.addr("c", false, PEER_PORT);
    let inb = m.addr("a", false, APP_PORT);
    assert!(ask(&m.ns("a"), out).unwrap().starts_with("c from "));
    let answer = ask(&m.ns("c"), inb).unwrap();
    assert!(answer.contains(&m.host("c").v4.to_string()), "{answer}");
    std::thread::sleep(Duration::from_millis(200)); // access log lines follow the close
    let log = std::fs::read_to_string(dir.join("ztunnel.log")).unwrap();
    assert!(
        log.contains("direction=\"outbound\"") && log.contains("direction=\"inbound\""),
        "{log}"
    );

    // The upstream proxy dies: the pod fails closed; back, it serves again.
    drop(zt);
    std::thread::sleep(Duration::from_millis(300));
    assert!(ask(&m.ns("a"), out).is_err());
    assert!(ask(&m.ns("c"), inb).is_err());
    let _zt = ztunnel(&bin, &node, &sock, &workloads, &dir.join("ztunnel2.log"));
    wait_for("pod ready again", 15, || pod_state(&d) == "ready");
    assert!(ask(&m.ns("a"), out).unwrap().starts_with("c from "));

    cli(&["pod", "del", "--state-dir", &d, "--uid", "uid-a"]).unwrap();
}
