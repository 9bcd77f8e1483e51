//! The second part of `redirect-user demo`: the mesh data path across two simulated
//! nodes. Pod m1 on node 1 and pod m2 on node 2, one engine for both, one proxy per node
//! ([`Mesh`]) with certificates from one local CA (the shared root of the mesh); each
//! node knows its own pod as enrolled and the other node's from a workload file in the
//! upstream proxy's format. m1 then talks to m2's app over HBONE (HTTP/2 CONNECT in
//! mutual TLS to 15008), then over the QUIC transport, in both address families.
//! Everything is removed at the end, on failure too.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{
    demo::{RemoveOnDrop, ask, echo_server},
    ebpf::{Engine, EngineConfig, PodOptions},
    netns::Netns,
    proxy::{
        PodListeners,
        identity::{LocalCa, Tls},
        mesh::{DefaultTransport, Mesh, PodMesh},
        registry::{Protocol, Registry, Transport, Workload},
        relay::Relay,
    },
    topology::{Host, Topology},
};

const TRUST_DOMAIN: &str = "cluster.local";
const APP_PORT: u16 = 8080;
const PIN_DIR: &str = "/sys/fs/bpf/redirect-demo-mesh";

/// A pod of the demo: name, node, host number, service account.
struct PodDef {
    name: &'static str,
    node: usize,
    n: u16,
    service_account: &'static str,
}

const PODS: [PodDef; 2] = [
    PodDef {
        name: "m1",
        node: 1,
        n: 1,
        service_account: "sa-m1",
    },
    PodDef {
        name: "m2",
        node: 2,
        n: 1,
        service_account: "sa-m2",
    },
];

/// The workload of a pod as its own node's proxy registers it.
fn local_workload(p: &PodDef, h: &Host) -> Workload {
    Workload {
        uid: p.name.into(),
        name: p.name.into(),
        namespace: "default".into(),
        service_account: p.service_account.into(),
        trust_domain: None,
        ips: vec![h.v4.into(), h.v6.into()],
        protocol: Protocol::Hbone,
        transport: Transport::Tcp,
        node: format!("node{}", p.node),
        services: Vec::new(),
        local: true,
    }
}

/// What the other node learns about a pod: a workload file in the upstream proxy's
/// (ztunnel's local configuration) format, which ztunnel itself would read too.
fn remote_yaml(p: &PodDef, h: &Host) -> String {
    format!(
        "workloads:
- uid: cluster1//v1/Pod/default/{name}
  name: {name}
  namespace: default
  serviceAccount: {sa}
  workloadIps: [\"{v4}\", \"{v6}\"]
  protocol: HBONE
  node: node{node}
  services: {{}}
",
        name = p.name,
        sa = p.service_account,
        v4 = h.v4,
        v6 = h.v6,
        node = p.node,
    )
}

/// Serves a pod with the proxy `mesh`: its mesh side and relay tasks on `listeners`.
fn serve(
    mesh: &Arc<Mesh>,
    p: &PodDef,
    h: &Host,
    ns: &Netns,
    listeners: PodListeners,
) -> Result<(Arc<PodMesh>, Relay)> {
    let pod = mesh.pod(local_workload(p, h), ns.try_clone()?)?;
    let relay = Relay::start_mesh(p.name, ns.try_clone()?, listeners, None, pod.clone())?;
    Ok((pod, relay))
}

/// Waits (at most `limit`) until no IPv6 address of the namespaces is tentative.
/// [`Topology`] adds its IPv6 addresses without duplicate address detection, but the
/// kernel still runs it on the link-local addresses, and until it is over the nodes do
/// not resolve their IPv6 neighbours: the first IPv6 connection across the nodes would
/// wait about 2 s. Returns how long it waited.
fn wait_for_dad(namespaces: &[&str], limit: Duration) -> Result<Duration> {
    let t = Instant::now();
    for ns in namespaces {
        loop {
            let out = std::process::Command::new("ip")
                .args(["-n", ns, "-6", "addr", "show", "tentative"])
                .output()
                .context("running ip")?;
            if out.stdout.is_empty() || t.elapsed() > limit {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(t.elapsed())
}

/// Runs the mesh part; returns how many of its steps failed.
pub async fn run() -> Result<usize> {
    println!("== the mesh data path across two simulated nodes");
    // Declaration order is the reverse of drop order: the directories go last, after
    // the namespaces, the engine and the proxies.
    let mut topo = Topology::two_nodes("rdmesh")?;
    for p in &PODS {
        topo.add_host_on(p.node, p.name, p.n)?;
    }
    let ca_dir = RemoveOnDrop::new(std::env::temp_dir().join(format!("{}-ca", topo.prefix())));
    let pin_dir = RemoveOnDrop::new(PIN_DIR);
    let _ = std::fs::remove_dir_all(&pin_dir.0); // a crashed run's leftovers
    let (h1, h2) = (topo.host("m1"), topo.host("m2"));
    let (n1, n2) = (h1.netns()?, h2.netns()?);
    println!(
        "   node 1 ({}): pod m1 {} {}\n   node 2 ({}): pod m2 {} {}\n   joined by the veth pair `wire`, routed",
        topo.node_ns(1),
        h1.v4,
        h1.v6,
        topo.node_ns(2),
        h2.v4,
        h2.v6
    );
    for (ns, who, h) in [(&n1, "app-m1", h1), (&n2, "app-m2", h2)] {
        for v6 in [false, true] {
            echo_server(ns, who, SocketAddr::new(h.addr(v6), APP_PORT))?;
        }
    }

    let engine = Engine::open(EngineConfig::at(&pin_dir.0)).context("opening the engine")?;
    let ca = Arc::new(LocalCa::open_or_create(&ca_dir.0)?);
    println!(
        "   one engine (pinned under {PIN_DIR}), one local CA in {} (the root both nodes trust), a proxy per node",
        ca_dir.0.display()
    );
    let tls = Tls::new(ca.clone(), TRUST_DOMAIN);
    let nodes = [1, 2].map(|_| {
        Mesh::new(
            tls.clone(),
            Arc::new(Registry::new()),
            DefaultTransport::Tcp,
        )
    });

    let mut pods = Vec::new();
    let mut relays = Vec::new();
    for (p, h, ns) in [(&PODS[0], h1, &n1), (&PODS[1], h2, &n2)] {
        let listeners = PodListeners::open(ns, false)?;
        engine.enrol(p.name, ns, &PodOptions::default(), &listeners.sockets())?;
        let (pod, relay) = serve(&nodes[p.node - 1], p, h, ns, listeners)?;
        println!(
            "   enrolled {} on node {} as {}",
            p.name, p.node, pod.identity
        );
        pods.push(pod);
        relays.push(relay);
    }
    for (k, other, h) in [(1, &PODS[1], h2), (2, &PODS[0], h1)] {
        let yaml = remote_yaml(other, h);
        let n = nodes[k - 1]
            .registry
            .load_yaml(&yaml)
            .with_context(|| format!("node {k} loading:\n{yaml}"))?;
        println!(
            "   node {k}'s registry learns {} ({n} workload) from the upstream format:",
            other.name
        );
        for l in yaml.lines() {
            println!("      {l}");
        }
    }

    let waited = wait_for_dad(
        &[topo.node_ns(1), topo.node_ns(2), &h1.name, &h2.name],
        Duration::from_secs(5),
    )?;
    println!(
        "   IPv6 link-local addresses usable after {waited:.1?} (duplicate address detection)"
    );

    let mut failures = 0;
    println!("== m1 -> m2:{APP_PORT} over HBONE (HTTP/2 CONNECT in mutual TLS to m2:15008)");
    for v6 in [false, true] {
        failures += exchange(&engine, &nodes[0], &pods[0], &n1, h1, h2, v6, false);
    }

    println!("== the same with node 1's proxy on the QUIC transport (UDP 15009)");
    // m1 is served again by a proxy whose default transport is QUIC (same registry and
    // certificates as node 1's): its relay and QUIC endpoint are closed first, then its
    // new listeners replace the old ones in the engine.
    let quic_node = Mesh::new(
        tls.clone(),
        nodes[0].registry.clone(),
        DefaultTransport::Quic,
    );
    relays.remove(0).stop().await;
    release(pods.remove(0)).await;
    let listeners = PodListeners::open(&n1, false)?;
    engine.set_sockets("m1", &listeners.sockets())?;
    let (pod, relay) = serve(&quic_node, &PODS[0], h1, &n1, listeners)?;
    pods.insert(0, pod);
    relays.insert(0, relay);
    for v6 in [false, true] {
        failures += exchange(&engine, &quic_node, &pods[0], &n1, h1, h2, v6, true);
    }

    println!("== counters (m1 on node 1, m2 on node 2)");
    for p in &PODS {
        let c = engine.counters(p.name)?;
        println!(
            "   {}: redirected 15001={} 15006={} 15008={}  bypassed proxy={}",
            p.name, c.redirected_15001, c.redirected_15006, c.redirected_15008, c.bypassed_proxy
        );
    }
    println!(
        "   node 1's pooled connections: HBONE {}, QUIC {}",
        nodes[0].pool.connections(),
        quic_node.quic.connections()
    );

    for r in relays {
        r.stop().await;
    }
    drop(pods);
    for p in &PODS {
        engine.unenrol(p.name)?;
    }
    Ok(failures)
}

/// Drops a pod's mesh side once the tasks still serving it are done, so its QUIC
/// endpoint (UDP 15009) is closed before another takes the port.
async fn release(pod: Arc<PodMesh>) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Arc::strong_count(&pod) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(pod);
    // The endpoint's driver closes the socket on its next turn.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// One exchange m1 -> m2:8080 through the proxies; prints it and returns 1 when it did
/// not take the mesh path (0 otherwise).
#[allow(clippy::too_many_arguments)]
fn exchange(
    engine: &Engine,
    node1: &Arc<Mesh>,
    m1: &PodMesh,
    n1: &Netns,
    h1: &Host,
    h2: &Host,
    v6: bool,
    quic: bool,
) -> usize {
    let fam = if v6 { "IPv6" } else { "IPv4" };
    let to = SocketAddr::new(h2.addr(v6), APP_PORT);
    let counters = || -> Result<_> { Ok((engine.counters("m1")?, engine.counters("m2")?)) };
    let t = Instant::now();
    let result = counters().and_then(|before| {
        let answer = ask(n1, to, "hello")?;
        Ok((before, answer, t.elapsed(), counters()?))
    });
    let (before, answer, took, after) = match result {
        Ok(x) => x,
        Err(e) => {
            println!("   [{fam}] m1 -> m2:{APP_PORT}: FAILED: {e:#}");
            return 1;
        }
    };
    let out = after.0.redirected_15001 - before.0.redirected_15001;
    let tunnel = after.1.redirected_15008 - before.1.redirected_15008;
    let plain = after.1.redirected_15006 - before.1.redirected_15006;
    let dst = node1
        .registry
        .by_ip(to.ip())
        .map(|w| node1.identity_of(&w).to_string())
        .unwrap_or_else(|| "none (not in node 1's registry)".into());
    let (wire, pooled) = if quic {
        (
            format!("QUIC to {}", SocketAddr::new(to.ip(), 15009)),
            format!("QUIC connections {}", node1.quic.connections()),
        )
    } else {
        (
            format!("TLS to {}", SocketAddr::new(to.ip(), 15008)),
            format!("pooled HBONE connections {}", node1.pool.connections()),
        )
    };
    println!(
        "   [{fam}] m1 -> m2:{APP_PORT}, {wire}\n        answer: {answer:?} in {took:?}\n        identities: {} -> {dst}\n        engine: m1 15001 +{out}, m2 15008 +{tunnel} 15006 +{plain}; node 1: {pooled}",
        m1.identity
    );
    let m1_addr = SocketAddr::new(h1.addr(v6), 0).to_string();
    let m1_ip = m1_addr.trim_end_matches(":0");
    let mut wrong = Vec::new();
    if !answer.starts_with("app-m2 from ") {
        wrong.push("the answer is not m2's app");
    }
    if !answer.contains(&format!("from {m1_ip}:")) {
        wrong.push("the app did not see m1's address");
    }
    if out == 0 {
        wrong.push("m1's connection was not redirected to 15001");
    }
    if plain != 0 {
        wrong.push("m2 got plaintext on 15006");
    }
    if quic && node1.quic.connections() == 0 {
        wrong.push("no QUIC connection");
    }
    if !quic && (tunnel == 0 || node1.pool.connections() == 0) {
        wrong.push("no tunnel to m2's 15008");
    }
    for w in &wrong {
        println!("        ERROR: {w}");
    }
    usize::from(!wrong.is_empty())
}
