//! Our node agent driving an unmodified upstream proxy (ztunnel) that the user built, and
//! HBONE between that proxy and ours:
//! `ZTUNNEL_BIN=/path/to/ztunnel ZTUNNEL_TEST_CA=/path/to/ztunnel/src/tls cargo xtask test -- --ignored upstream`.
//! The proxy runs in its in-pod mode with its test CA (FAKE_CA, built with its `testing`
//! feature) and a local workload file, in a namespace of its own; nothing of it is built
//! or shipped here.

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
    Proc::adopt(child)
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
        RemoveDir::new(dir.clone()),
        RemoveDir::new(PathBuf::from(format!("/sys/fs/bpf/{base}-zt"))),
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

    let _agent = Proc::node_agent(&dir, &pin, &dir.join("agent.log"));
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

/// HBONE both ways between our proxy (node 1, pod a1) and an upstream proxy (node 2,
/// pod b1, under our node agent), across the wire between two simulated nodes. Both
/// proxies issue from one root: the upstream proxy's test CA (its FAKE_CA mode), whose
/// root certificate and key the user points at with ZTUNNEL_TEST_CA (a directory
/// holding `root-cert.pem` and `ca-key.pem`, e.g. the upstream checkout's `src/tls`).
/// Both read the same workload file.
#[test]
#[ignore = "needs an upstream proxy binary and its test CA: ZTUNNEL_BIN, ZTUNNEL_TEST_CA"]
fn upstream_proxy_hbone_both_directions() {
    use redirect_tests::cluster::{Cluster, NodeConfig, outside, pod};
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let bin =
        std::env::var("ZTUNNEL_BIN").expect("ZTUNNEL_BIN: the path of an upstream ztunnel binary");
    let test_ca = PathBuf::from(std::env::var("ZTUNNEL_TEST_CA").expect(
        "ZTUNNEL_TEST_CA: a directory with the upstream test root-cert.pem and ca-key.pem",
    ));
    let ca_dir = std::env::temp_dir().join(format!("zthb-{}-ca", std::process::id()));
    let _rm_ca = RemoveDir::new(ca_dir.clone());
    std::fs::create_dir_all(&ca_dir).unwrap();
    std::fs::copy(test_ca.join("root-cert.pem"), ca_dir.join("root-cert.pem")).unwrap();
    std::fs::copy(test_ca.join("ca-key.pem"), ca_dir.join("root-key.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        ca_dir.join("root-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    // b1 is left to the upstream proxy: the fixture does not enrol it.
    let pods = [pod("a1", 1, 1, "sa-a"), outside("b1", 2, 1)];
    let c = Cluster::with("zthb", &pods, |_, _| NodeConfig {
        ca_dir: Some(ca_dir.clone()),
        ..NodeConfig::default()
    })
    .unwrap();
    let workloads = c.path("workloads.yaml");
    let (a1, b1) = (c.topo.host("a1"), c.topo.host("b1"));
    std::fs::write(
        &workloads,
        format!(
            "workloads:\n\
             - uid: uid-a1\n  name: a1\n  namespace: default\n  serviceAccount: sa-a\n  \
               trustDomain: cluster.local\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n  node: node1\n  network: \"\"\n  services: {{}}\n\
             - uid: uid-b1\n  name: b1\n  namespace: default\n  serviceAccount: sa-b\n  \
               trustDomain: cluster.local\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n  node: node2\n  network: \"\"\n  services: {{}}\n",
            a1.v4, b1.v4
        ),
    )
    .unwrap();
    // Our proxy on node 1 reads the same file.
    c.node(1).registry.load_file(&workloads).unwrap();

    let d = c.path("agent2").to_str().unwrap().to_string();
    std::fs::create_dir_all(&d).unwrap();
    let sock = format!("{d}/zds.sock");
    let pin = format!("{}-node2", c.pin_dir().display());
    let _rm_pin = RemoveDir::new(PathBuf::from(&pin));
    let _agent = Proc::node_agent(Path::new(&d), &pin, &c.path("agent2.log"));
    let node2 = c.topo.node_ns(2).to_string();
    let log = c.path("ztunnel.log");
    let _zt = Proc::adopt(
        Command::new("ip")
            .args(["netns", "exec", &node2, &bin])
            .env("NODE_NAME", "node2")
            .env("PROXY_MODE", "shared")
            .env("INPOD_UDS", &sock)
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("LOCAL_XDS_PATH", &workloads)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let out = cli(&[
        "pod",
        "add",
        "--state-dir",
        &d,
        "--netns",
        &b1.path(),
        "--uid",
        "uid-b1",
        "--name",
        "b1",
        "--namespace",
        "default",
        "--service-account",
        "sa-b",
    ]);
    assert!(out.is_ok(), "{out:?}");
    wait_for("b1 ready on the upstream proxy", 20, || {
        pod_state(&d) == "ready"
    });

    // Our client to the upstream proxy's 15008, and its client to ours.
    let to_b1 = c.addr("b1", false, APP_PORT);
    let answer = redirect_user::demo::ask(&c.ns("a1"), to_b1, "ours-to-upstream");
    if answer.is_err() {
        let _ = std::fs::copy(&log, "/tmp/zthb-ztunnel.log");
    }
    let answer = answer.unwrap();
    assert!(
        answer.starts_with(&format!("b1 from {}:", a1.v4)),
        "{answer}"
    );
    let to_a1 = c.addr("a1", false, APP_PORT);
    let answer = redirect_user::demo::ask(&c.ns("b1"), to_a1, "upstream-to-ours").unwrap();
    assert!(
        answer.starts_with(&format!("a1 from {}:", b1.v4)),
        "{answer}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("direction=\"inbound\"") && log.contains("direction=\"outbound\""),
        "{log}"
    );
    // Both tunnels carried the workloads' identities.
    assert!(
        log.contains("spiffe://cluster.local/ns/default/sa/sa-a"),
        "{log}"
    );
    cli(&["pod", "del", "--state-dir", &d, "--uid", "uid-b1"]).unwrap();
}
