//! The container runtime fixture against a real containerd: pods made as the kubelet
//! makes them answer from the host over the runtime's bridge, many start at once, and a
//! failing chained CNI plugin stops a pod from starting without leaving anything behind.
//! After each test nothing of the runtime is left on the host.

use std::{
    io::Read,
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use redirect_tests::cri::{CniSetup, Footprint, PodDef, Runtime};
use serde_json::json;

const PORT: u16 = 8080;

/// Connects to `addr` until it answers (the app may still be starting), returns what it
/// sends before closing.
fn reply_from(addr: SocketAddr, within: Duration) -> Result<String> {
    let deadline = Instant::now() + within;
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(out) if !out.is_empty() => return Ok(out),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Ok(_) => bail!("{addr}: connection closed with no reply"),
            Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
        }
    }
}

/// Drops the runtime and asserts nothing of it is left; before that, asserts the check
/// sees the live runtime (so an empty result means something).
fn drop_and_check(rt: Runtime) {
    let fp: Footprint = rt.footprint();
    let live = fp.leftovers();
    assert!(
        live.iter().any(|l| l.starts_with("process"))
            && live.iter().any(|l| l.starts_with("directory")),
        "the leftover check does not see the running runtime: {live:?}"
    );
    let t = Instant::now();
    drop(rt);
    eprintln!("cri: runtime removed in {} ms", t.elapsed().as_millis());
    let left = fp.leftovers();
    assert!(left.is_empty(), "left behind by the runtime: {left:#?}");
}

/// A pod's app answers a TCP connection from the host (root namespace) over the
/// runtime's bridge, on IPv4 and IPv6.
#[test]
fn a_pod_answers_the_host_over_the_bridge() {
    let t = Instant::now();
    let rt = Runtime::start("cri-a", CniSetup::bridge()).expect("runtime");
    eprintln!("cri: runtime started in {} ms", t.elapsed().as_millis());
    let t = Instant::now();
    let pod = rt
        .run_pod(&PodDef::new("web").label("app", "web").tcp_responder(
            "app",
            PORT,
            "hello-from-web",
        ))
        .expect("pod");
    eprintln!(
        "cri: pod running in {} ms: {pod:?}",
        t.elapsed().as_millis()
    );
    assert!(pod.netns.starts_with("/var/run/netns"), "{pod:?}");
    assert!(pod.netns.exists());
    let v4 = pod.ipv4().expect("an IPv4 address");
    assert!(
        rt.net().subnet_v4().starts_with(&format!(
            "{}.{}.{}.",
            v4.octets()[0],
            v4.octets()[1],
            v4.octets()[2]
        )),
        "{v4} outside {}",
        rt.net().subnet_v4()
    );
    let v6 = pod.ipv6().expect("an IPv6 address (dual-stack bridge)");
    for ip in [IpAddr::V4(v4), IpAddr::V6(v6)] {
        let t = Instant::now();
        let got = reply_from(SocketAddr::new(ip, PORT), Duration::from_secs(30)).expect("reply");
        assert_eq!(got.trim(), "hello-from-web", "from {ip}");
        eprintln!("cri: {ip} answered after {} ms", t.elapsed().as_millis());
    }
    let listed = rt.list_pods().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, pod.id);
    assert_eq!(listed[0].metadata.as_ref().unwrap().name, "web");
    assert_eq!(rt.bridge_ports().len(), 1, "one veth on the bridge");
    drop_and_check(rt);
}

/// Eight sandboxes started at once each get their own address and answer as themselves;
/// removing one through the CRI releases its address and veth.
#[test]
fn eight_sandboxes_start_in_parallel() {
    let rt = Runtime::start("cri-b", CniSetup::bridge().ipv4_only()).expect("runtime");
    let t = Instant::now();
    let pods: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let rt = &rt;
                s.spawn(move || {
                    let name = format!("p{i}");
                    rt.run_pod(&PodDef::new(&name).tcp_responder("app", PORT, &name))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().expect("pod"))
            .collect()
    });
    eprintln!(
        "cri: 8 sandboxes with their apps in {} ms",
        t.elapsed().as_millis()
    );
    let mut ips: Vec<_> = pods.iter().map(|p| p.ipv4().expect("IPv4")).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 8, "distinct addresses: {pods:?}");
    assert_eq!(rt.bridge_ports().len(), 8);
    assert_eq!(rt.reserved_ips().len(), 8);
    for p in &pods {
        let got = reply_from(
            SocketAddr::new(p.ipv4().unwrap().into(), PORT),
            Duration::from_secs(30),
        )
        .expect("reply");
        assert_eq!(got.trim(), p.name);
    }
    let gone = &pods[0];
    rt.remove_pod(&gone.id).expect("remove");
    assert_eq!(rt.list_pods().unwrap().len(), 7);
    assert_eq!(rt.bridge_ports().len(), 7);
    assert_eq!(rt.reserved_ips().len(), 7);
    assert!(!gone.netns.exists(), "the removed pod's netns is gone");
    drop_and_check(rt);
}

/// A plugin program (a shell script) chained after the bridge that refuses every ADD with
/// a CNI error and logs each call's command and netns to `log`.
fn refusing_plugin(dir: &Path, log: &Path) -> PathBuf {
    let path = dir.join("refuse");
    let script = format!(
        r#"#!/bin/sh
cat > /dev/null
echo "$CNI_COMMAND $CNI_NETNS" >> {log}
case "$CNI_COMMAND" in
ADD)
  echo '{{"cniVersion":"1.0.0","code":101,"msg":"refuse: this pod may not start"}}'
  exit 1;;
VERSION)
  echo '{{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}}';;
esac
exit 0
"#,
        log = log.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A chained plugin that fails ADD makes RunPodSandbox fail with the plugin's message;
/// the runtime undoes the sandbox: none listed, no veth, no address held, no netns.
#[test]
fn a_failing_chained_plugin_stops_the_pod_and_leaves_nothing() {
    let dir = redirect_tests::process::RemoveDir::new(
        std::env::temp_dir().join(format!("cri-refuse-{}", std::process::id())),
    );
    std::fs::create_dir_all(&dir.0).unwrap();
    let log = dir.0.join("calls.log");
    let plugin = refusing_plugin(&dir.0, &log);
    let cni = CniSetup::bridge()
        .plugin(&plugin)
        .chain(json!({ "type": "refuse" }));
    let rt = Runtime::start("cri-c", cni).expect("runtime");
    let t = Instant::now();
    let err = rt
        .run_pod(&PodDef::new("denied").tcp_responder("app", PORT, "must-not-run"))
        .expect_err("the plugin refuses the pod");
    eprintln!("cri: refused in {} ms: {err:#}", t.elapsed().as_millis());
    let msg = format!("{err:#}");
    assert!(msg.contains("refuse: this pod may not start"), "{msg}");
    assert!(rt.list_pods().unwrap().is_empty(), "no sandbox listed");
    assert!(
        rt.bridge_ports().is_empty(),
        "no veth: {:?}",
        rt.bridge_ports()
    );
    assert!(
        rt.reserved_ips().is_empty(),
        "no address: {:?}",
        rt.reserved_ips()
    );
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    let add = calls
        .lines()
        .find_map(|l| l.strip_prefix("ADD "))
        .unwrap_or_else(|| panic!("the plugin saw no ADD: {calls:?}"));
    assert!(add.starts_with("/var/run/netns/cni-"), "{add}");
    assert!(
        calls.lines().any(|l| l.starts_with("DEL")),
        "the runtime undid the ADD: {calls:?}"
    );
    assert!(!Path::new(add).exists(), "the netns {add} is gone");
    drop_and_check(rt);
}

/// From an async test (as a watch or agent test is), the fixture's calls and its drop
/// work as they do from a plain one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fixture_serves_async_tests() {
    let rt = Runtime::start("cri-d", CniSetup::bridge().ipv4_only()).expect("runtime");
    let pod = rt
        .run_pod_async(&PodDef::new("async").tcp_responder("app", PORT, "from-async"))
        .await
        .expect("pod");
    let addr = SocketAddr::new(pod.ipv4().unwrap().into(), PORT);
    let got = tokio::task::spawn_blocking(move || reply_from(addr, Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("reply");
    assert_eq!(got.trim(), "from-async");
    assert_eq!(rt.list_pods().unwrap().len(), 1);
    drop_and_check(rt);
}
