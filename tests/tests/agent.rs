//! The node agent and the proxy over the node-agent protocol: real Unix sockets, real
//! namespaces, real traffic. Our agent with our proxy; then each half against a minimal
//! peer written here to the protocol (zds.md), thrown bad input.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::Duration,
};

use redirect_ebpf::{PORT_OUTBOUND, PORT_TUNNEL};
use redirect_tests::*;
use redirect_user::{
    agent::{Agent, PodSpec, PodState},
    proxy::{
        identity::{DEFAULT_TRUST_DOMAIN, LocalCa, Tls},
        mesh::{DefaultTransport, Mesh},
        registry::Registry,
    },
    zds::{
        codec::{self, Request},
        proto::WorkloadInfo,
        proxy::{InpodProxy, ProxyConfig},
        wire,
    },
};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

/// A node: pods in namespaces, an engine, our agent serving a socket, and (when
/// started) our proxy connected to it, all in this process.
struct Node {
    rt: tokio::runtime::Runtime,
    topo: Topology,
    dir: PathBuf,
    pin: PathBuf,
    agent: Option<(Agent, JoinHandle<()>)>,
    proxy: Option<JoinHandle<()>>,
    events: mpsc::UnboundedSender<AcceptEvent>,
    rx: mpsc::UnboundedReceiver<AcceptEvent>,
    /// The proxy's mesh data path; `None`: the bare relay.
    mesh: Option<Arc<Mesh>>,
}

impl Node {
    fn new(tag: &str, hosts: &[(&str, u16)]) -> Node {
        let mut topo = Topology::new(tag).unwrap();
        for (n, i) in hosts {
            topo.add_host(n, *i).unwrap();
        }
        for (n, _) in hosts {
            let h = topo.host(n);
            for v6 in [false, true] {
                echo_server(
                    &h.netns().unwrap(),
                    n,
                    std::net::SocketAddr::new(h.addr(v6), PEER_PORT),
                )
                .unwrap();
            }
        }
        let base = topo.node().trim_end_matches("-node").to_string();
        let dir = PathBuf::from(format!("/tmp/{base}"));
        let pin = PathBuf::from(format!("/sys/fs/bpf/{base}"));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (events, rx) = mpsc::unbounded_channel();
        let mut node = Node {
            rt,
            topo,
            dir,
            pin,
            agent: None,
            proxy: None,
            events,
            rx,
            mesh: None,
        };
        node.start_agent();
        node
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("zds.sock")
    }

    fn start_agent(&mut self) {
        let engine = Arc::new(Engine::open(EngineConfig::at(&self.pin)).unwrap());
        let agent = Agent::new(engine, &self.dir).unwrap();
        let (a, sock) = (agent.clone(), self.socket());
        let task = self.rt.spawn(async move {
            a.serve(&sock).await.unwrap();
        });
        self.agent = Some((agent, task));
        // Let the socket appear.
        self.wait(|| self.socket().exists());
    }

    fn stop_agent(&mut self) {
        if let Some((_, task)) = self.agent.take() {
            task.abort();
            let _ = self.rt.block_on(task);
        }
    }

    fn agent(&self) -> &Agent {
        &self.agent.as_ref().unwrap().0
    }

    fn start_proxy(&mut self) {
        let cfg = ProxyConfig {
            socket: self.socket(),
            dns: false,
            events: Some(self.events.clone()),
            mesh: self.mesh.clone(),
        };
        self.proxy = Some(self.rt.spawn(InpodProxy::new(cfg).run()));
    }

    /// The proxy goes away (as if killed): its listeners close.
    fn kill_proxy(&mut self) {
        if let Some(t) = self.proxy.take() {
            t.abort();
            let _ = self.rt.block_on(t);
        }
        // Relay tasks are aborted with it; give them a moment to close their sockets.
        std::thread::sleep(Duration::from_millis(200));
    }

    fn spec(&self, pod: &str) -> PodSpec {
        PodSpec {
            uid: format!("uid-{pod}"),
            name: pod.into(),
            namespace: "default".into(),
            service_account: "sa".into(),
            netns: self.topo.host(pod).path().into(),
            dns_capture: false,
        }
    }

    fn add(&self, pod: &str) -> PodState {
        let spec = self.spec(pod);
        self.rt.block_on(self.agent().add_pod(spec)).unwrap()
    }

    fn state(&self, pod: &str) -> Option<PodState> {
        let uid = format!("uid-{pod}");
        self.agent()
            .list()
            .into_iter()
            .find(|p| p.spec.uid == uid)
            .map(|p| p.state)
    }

    fn wait(&self, ok: impl Fn() -> bool) {
        for _ in 0..100 {
            if ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("condition not reached in 5 s");
    }

    fn ask_out(&self, from: &str, to: &str) -> anyhow::Result<String> {
        let h = self.topo.host(to);
        ask(
            &self.topo.host(from).netns().unwrap(),
            std::net::SocketAddr::new(h.addr(false), PEER_PORT),
        )
    }

    fn events(&mut self) -> Vec<AcceptEvent> {
        std::thread::sleep(Duration::from_millis(50));
        let mut out = Vec::new();
        while let Ok(e) = self.rx.try_recv() {
            out.push(e);
        }
        out
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.abort();
        }
        if let Some((agent, task)) = self.agent.take() {
            task.abort();
            for p in agent.list() {
                let _ = agent.engine().unenrol(&p.spec.uid);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

#[test]
fn our_agent_and_our_proxy_enrol_serve_and_remove_a_pod() {
    let mut n = Node::new("ag", &[("a", 10), ("c", 100)]);
    n.start_proxy();
    n.wait(|| !n.agent().proxies().is_empty());
    assert_eq!(n.add("a"), PodState::Ready);
    let answer = n.ask_out("a", "c").unwrap();
    assert!(answer.starts_with("c from "), "{answer}");
    let ev = n.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!((ev[0].pod.as_str(), ev[0].listener), ("uid-a", 15001));
    // Adding it again changes nothing.
    assert_eq!(n.add("a"), PodState::Ready);

    n.rt.block_on(n.agent().del_pod("uid-a")).unwrap();
    assert!(n.agent().list().is_empty());
    assert!(n.ask_out("a", "c").unwrap().starts_with("c from "));
    assert_eq!(n.events(), vec![]);
    assert!(!ip_out(&n.topo.host("a").name, &["rule"]).contains("0x111"));
}

#[test]
fn a_pod_added_before_any_proxy_is_refused_until_one_takes_it() {
    let mut n = Node::new("early", &[("a", 10), ("c", 100)]);
    assert_eq!(n.add("a"), PodState::WaitingForProxy);
    // Redirected from the start: nothing escapes while no proxy serves it.
    assert!(n.ask_out("a", "c").is_err());
    n.start_proxy();
    n.wait(|| n.state("a") == Some(PodState::Ready));
    assert!(n.ask_out("a", "c").unwrap().starts_with("c from "));
}

#[test]
fn a_dead_proxy_fails_closed_and_a_new_one_takes_over() {
    let mut n = Node::new("crash", &[("a", 10), ("c", 100)]);
    n.start_proxy();
    n.wait(|| !n.agent().proxies().is_empty());
    assert_eq!(n.add("a"), PodState::Ready);
    assert!(n.ask_out("a", "c").is_ok());
    n.kill_proxy();
    assert!(
        n.ask_out("a", "c").is_err(),
        "traffic passed without a proxy"
    );
    n.wait(|| n.state("a") == Some(PodState::WaitingForProxy));
    n.start_proxy();
    n.wait(|| n.state("a") == Some(PodState::Ready));
    assert!(n.ask_out("a", "c").unwrap().starts_with("c from "));
}

#[test]
fn a_restarted_agent_takes_its_pods_back_and_traffic_never_stops() {
    let mut n = Node::new("agrst", &[("a", 10), ("c", 100)]);
    n.start_proxy();
    n.wait(|| !n.agent().proxies().is_empty());
    assert_eq!(n.add("a"), PodState::Ready);
    n.stop_agent();
    // The proxy keeps serving while the agent is away.
    assert!(n.ask_out("a", "c").unwrap().starts_with("c from "));
    n.start_agent();
    assert_eq!(
        n.agent().list().len(),
        1,
        "pod list rebuilt from the state file"
    );
    // The proxy reconnects (backoff) and gets a snapshot naming the pod.
    n.wait(|| n.state("a") == Some(PodState::Ready));
    assert!(n.ask_out("a", "c").unwrap().starts_with("c from "));
    assert_eq!(n.events().len(), 2);
}

/// A proxy written here: hello, then answers what it is sent.
async fn fake_proxy(path: &std::path::Path) -> UnixSeqpacket {
    let s = UnixSeqpacket::connect(path).await.unwrap();
    wire::send(&s, &codec::encode_hello(), None).await.unwrap();
    s
}

async fn expect_request(s: &UnixSeqpacket) -> (Request, Vec<OwnedFd>) {
    let dg = tokio::time::timeout(Duration::from_secs(5), wire::recv(s))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let req = Request::decode(&dg.bytes, dg.fds.len()).unwrap();
    (req, dg.fds)
}

#[test]
fn our_agent_speaks_the_protocol_and_survives_a_bad_proxy() {
    let n = Node::new("fakep", &[("a", 10), ("b", 11), ("c", 100)]);
    assert_eq!(n.add("a"), PodState::WaitingForProxy);
    let sock = n.socket();
    let p = n.rt.block_on(async {
        // A bad hello: the agent hangs up, and keeps serving.
        let bad = UnixSeqpacket::connect(&sock).await.unwrap();
        bad.send(b"\xff\xff garbage").await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(6), wire::recv(&bad))
            .await
            .unwrap();
        assert!(matches!(closed, Ok(None)), "{closed:?}");

        // A proper proxy gets the snapshot: Add for pod a with its namespace, then SnapshotSent.
        let p = fake_proxy(&sock).await;
        let (req, fds) = expect_request(&p).await;
        let Request::Add { uid, info } = req else {
            panic!("{req:?}")
        };
        assert_eq!(
            (
                uid.as_str(),
                info.name.as_str(),
                info.service_account.as_str()
            ),
            ("uid-a", "a", "sa")
        );
        let ns =
            Netns::from_fd(fds.into_iter().next().unwrap()).expect("the fd is a network namespace");
        assert!(ns.same_as(&n.topo.host("a").netns().unwrap()));
        wire::send(&p, &codec::encode_response(&Ok(())), None)
            .await
            .unwrap();
        let (req, fds) = expect_request(&p).await;
        assert_eq!((req, fds.len()), (Request::SnapshotSent, 0));
        wire::send(&p, &codec::encode_response(&Ok(())), None)
            .await
            .unwrap();
        // Acked but this proxy opened no listener: the pod stays refused.
        tokio::time::sleep(Duration::from_millis(100)).await;
        p
    });
    assert_eq!(n.state("a"), Some(PodState::FindingListeners));
    assert!(n.ask_out("a", "c").is_err());
    drop(p);

    // A second proxy takes the snapshot (refusing pod a) and becomes the newest; a new
    // pod then goes to it, and a garbage answer ends that connection only.
    let p2 = n.rt.block_on(async {
        let p2 = fake_proxy(&sock).await;
        let (req, _) = expect_request(&p2).await;
        assert!(matches!(req, Request::Add { .. }));
        wire::send(&p2, &codec::encode_response(&Err("no room".into())), None)
            .await
            .unwrap();
        let (req, _) = expect_request(&p2).await;
        assert_eq!(req, Request::SnapshotSent);
        wire::send(&p2, &codec::encode_response(&Ok(())), None)
            .await
            .unwrap();
        p2
    });
    // The first proxy hung up when its block ended: the second is the only one.
    n.wait(|| n.agent().proxies().len() == 1);
    let agent = n.agent().clone();
    let spec = n.spec("b");
    let add = n.rt.spawn(async move { agent.add_pod(spec).await });
    n.rt.block_on(async {
        let (req, fds) = expect_request(&p2).await;
        assert!(
            matches!(&req, Request::Add { uid, .. } if uid == "uid-b"),
            "{req:?}"
        );
        assert_eq!(fds.len(), 1);
        wire::send(&p2, b"\x0a\x02\xff", None).await.unwrap(); // malformed ack
        let closed = tokio::time::timeout(Duration::from_secs(6), wire::recv(&p2))
            .await
            .unwrap();
        assert!(matches!(closed, Ok(None)), "{closed:?}");
    });
    let state = n.rt.block_on(add).unwrap().unwrap();
    assert!(
        matches!(
            state,
            PodState::WaitingForProxy | PodState::FindingListeners | PodState::ProxyRefused(_)
        ),
        "{state:?}"
    );
    // The agent still runs and still has both pods, both refused.
    assert_eq!(n.agent().list().len(), 2);
    assert!(n.ask_out("b", "c").is_err());
}

/// An agent written here: accepts our proxy and sends what the test wants.
struct FakeAgent {
    listener: UnixSeqpacketListener,
}

async fn accept_proxy(fa: &mut FakeAgent) -> UnixSeqpacket {
    let s = tokio::time::timeout(Duration::from_secs(5), fa.listener.accept())
        .await
        .unwrap()
        .unwrap();
    let hello = wire::recv(&s).await.unwrap().unwrap();
    codec::decode_hello(&hello.bytes).expect("hello");
    s
}

async fn call(
    s: &UnixSeqpacket,
    msg: &[u8],
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> codec::Response {
    wire::send(s, msg, fd).await.unwrap();
    let dg = tokio::time::timeout(Duration::from_secs(5), wire::recv(s))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    codec::decode_response(&dg.bytes).unwrap()
}

fn info() -> WorkloadInfo {
    WorkloadInfo {
        name: "a".into(),
        namespace: "default".into(),
        service_account: "sa".into(),
    }
}

#[test]
fn our_proxy_answers_bad_input_and_keeps_serving() {
    let mut n = Node::new("fakea", &[("a", 10), ("c", 100)]);
    n.stop_agent();
    let sock = n.dir.join("fake.sock");
    let _ = std::fs::remove_file(&sock);
    let pod_ns = n.topo.host("a").netns().unwrap();
    let cfg = ProxyConfig {
        socket: sock.clone(),
        dns: false,
        events: None,
        mesh: None,
    };
    n.rt.block_on(async {
        let mut fa = FakeAgent {
            listener: UnixSeqpacketListener::bind(&sock).unwrap(),
        };
        let proxy = tokio::spawn(InpodProxy::new(cfg).run());
        let s = accept_proxy(&mut fa).await;
        let add = Request::Add {
            uid: "uid-a".into(),
            info: info(),
        }
        .encode();

        let r = call(&s, &add, None).await;
        assert!(
            r.as_ref().unwrap_err().contains("file descriptors"),
            "{r:?}"
        );
        let uts = std::fs::File::open("/proc/self/ns/uts").unwrap();
        let r = call(&s, &add, Some(uts.as_fd())).await;
        assert!(
            r.as_ref().unwrap_err().contains("not a network namespace"),
            "{r:?}"
        );
        let r = call(&s, &vec![0x0a; 2000], None).await;
        assert!(r.as_ref().unwrap_err().contains("over 1024"), "{r:?}");
        let r = call(&s, b"\xff\xfe\xfd", None).await;
        assert!(r.as_ref().unwrap_err().contains("malformed"), "{r:?}");
        let keep_with_fd = Request::Keep { uid: "x".into() }.encode();
        let r = call(&s, &keep_with_fd, Some(pod_ns.as_fd())).await;
        assert!(r.is_err(), "{r:?}");

        // A valid Add: the pod's listeners open in its namespace.
        assert_eq!(call(&s, &add, Some(pod_ns.as_fd())).await, Ok(()));
        let found =
            redirect_user::agent::discover::find_listeners(std::process::id() as i32, &pod_ns)
                .unwrap();
        assert!(found.complete(), "{found:?}");
        drop(found); // duplicates: they would keep the sockets open
        // Idempotent.
        assert_eq!(call(&s, &add, Some(pod_ns.as_fd())).await, Ok(()));
        assert_eq!(
            call(&s, &Request::SnapshotSent.encode(), None).await,
            Ok(())
        );
        let r = call(&s, &Request::SnapshotSent.encode(), None).await;
        assert!(r.as_ref().unwrap_err().contains("second snapshot"), "{r:?}");
        let r = call(
            &s,
            &Request::Keep {
                uid: "uid-a".into(),
            }
            .encode(),
            None,
        )
        .await;
        assert!(
            r.as_ref().unwrap_err().contains("after the snapshot"),
            "{r:?}"
        );
        assert_eq!(
            call(
                &s,
                &Request::Del {
                    uid: "unknown".into()
                }
                .encode(),
                None
            )
            .await,
            Ok(())
        );

        // The agent goes away mid-way: the pod proxy keeps running.
        drop(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let found =
            redirect_user::agent::discover::find_listeners(std::process::id() as i32, &pod_ns)
                .unwrap();
        assert!(found.complete());
        drop(found);
        // It reconnects; a snapshot that does not name the pod drains it.
        let s = accept_proxy(&mut fa).await;
        assert_eq!(
            call(&s, &Request::SnapshotSent.encode(), None).await,
            Ok(())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let found =
            redirect_user::agent::discover::find_listeners(std::process::id() as i32, &pod_ns)
                .unwrap();
        assert!(!found.complete() && found.outbound.is_none(), "{found:?}");
        proxy.abort();
    });
}

#[test]
fn a_namespace_deleted_while_enrolled_harms_no_other_pod() {
    let mut n = Node::new("nsdel", &[("a", 10), ("b", 11), ("c", 100)]);
    n.start_proxy();
    n.wait(|| !n.agent().proxies().is_empty());
    assert_eq!(n.add("a"), PodState::Ready);
    assert_eq!(n.add("b"), PodState::Ready);
    // Pod a's namespace is deleted under the agent (its name goes; the agent and the
    // proxy still hold it open).
    let a_name = n.topo.host("a").name.clone();
    assert!(
        Command::new("ip")
            .args(["netns", "del", &a_name])
            .status()
            .unwrap()
            .success()
    );
    assert!(n.ask_out("b", "c").unwrap().starts_with("c from "));
    // The agent restarts: pod a cannot be opened by its path any more and is let go
    // (un-enrolled); pod b is taken back.
    n.stop_agent();
    n.start_agent();
    let pods: Vec<String> = n.agent().list().into_iter().map(|p| p.spec.uid).collect();
    assert_eq!(pods, vec!["uid-b".to_string()]);
    assert_eq!(n.agent().engine().pods().len(), 1);
    n.wait(|| n.state("b") == Some(PodState::Ready));
    assert!(n.ask_out("b", "c").unwrap().starts_with("c from "));
}

#[test]
fn the_control_socket_answers_garbage_with_errors() {
    use std::io::{BufRead, BufReader, Write};
    let n = Node::new("ctl", &[("a", 10), ("c", 100)]);
    let path = n.dir.join("control.sock");
    let agent = n.agent().clone();
    let p = path.clone();
    let _srv =
        n.rt.spawn(async move { redirect_user::agent::control::serve(agent, &p).await });
    n.wait(|| path.exists());
    let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut roundtrip = |line: &str| -> serde_json::Value {
        writeln!(w, "{line}").unwrap();
        let mut out = String::new();
        r.read_line(&mut out).unwrap();
        serde_json::from_str(&out).unwrap()
    };
    for bad in [
        "not json",
        "{\"op\":\"launch\"}",
        "{\"op\":\"add\"}",
        "{\"op\":\"del\",\"uid\":\"nobody\"}",
    ] {
        let v = roundtrip(bad);
        assert_eq!(v["ok"], false, "{bad}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{bad}: {v}"
        );
    }
    let missing = serde_json::json!({"op": "add", "pod": {"uid": "x", "name": "x", "namespace": "d",
        "service_account": "s", "netns": "/var/run/netns/does-not-exist"}});
    let v = roundtrip(&missing.to_string());
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("does-not-exist"),
        "{v}"
    );
    // Still serving, nothing enrolled by the bad requests.
    let v = roundtrip("{\"op\":\"list\"}");
    assert_eq!(
        (v["ok"].clone(), v["pods"].as_array().map(|a| a.len())),
        (serde_json::json!(true), Some(0))
    );
}

#[test]
fn a_pod_added_during_a_snapshot_reaches_that_proxy() {
    let n = Node::new("race", &[("a", 10), ("c", 100)]);
    let sock = n.socket();
    // A proxy connects; its snapshot (empty) is still open when the pod is added.
    let p = n.rt.block_on(async {
        let p = fake_proxy(&sock).await;
        let (req, _) = expect_request(&p).await;
        assert_eq!(req, Request::SnapshotSent);
        p
    });
    assert_eq!(n.add("a"), PodState::WaitingForProxy);
    n.rt.block_on(async {
        wire::send(&p, &codec::encode_response(&Ok(())), None)
            .await
            .unwrap();
        // Now the proxy is the newest, and gets the pod.
        let (req, fds) = expect_request(&p).await;
        assert!(
            matches!(&req, Request::Add { uid, .. } if uid == "uid-a"),
            "{req:?}"
        );
        assert_eq!(fds.len(), 1);
        wire::send(&p, &codec::encode_response(&Ok(())), None)
            .await
            .unwrap();
    });
    // Acked, but this proxy opened no listeners: the agent keeps looking, the pod stays refused.
    n.wait(|| n.state("a") == Some(PodState::FindingListeners));
    assert!(n.ask_out("a", "c").is_err());
}

#[test]
fn two_enrolled_pods_talk_over_hbone_with_no_configuration() {
    let mut n = Node::new("agmesh", &[("a", 10), ("b", 11)]);
    let ca = LocalCa::open_or_create(&n.dir.join("ca")).unwrap();
    n.mesh = Some(Mesh::new(
        Tls::new(Arc::new(ca), DEFAULT_TRUST_DOMAIN),
        Arc::new(Registry::new()),
        DefaultTransport::Tcp,
    ));
    n.start_proxy();
    n.wait(|| !n.agent().proxies().is_empty());
    assert_eq!(n.add("a"), PodState::Ready);
    assert_eq!(n.add("b"), PodState::Ready);
    n.events();
    let reply = n.ask_out("a", "b").unwrap();
    let a_ip = n.topo.host("a").addr(false);
    assert!(reply.starts_with(&format!("b from {a_ip}:")), "{reply}");
    // a's proxy took the connection on 15001 and tunnelled it to b's 15008.
    let ev = n.events();
    assert!(
        ev.iter()
            .any(|e| e.pod == "uid-a" && e.listener == PORT_OUTBOUND),
        "{ev:?}"
    );
    assert!(
        ev.iter()
            .any(|e| e.pod == "uid-b" && e.listener == PORT_TUNNEL && e.peer.ip() == a_ip),
        "{ev:?}"
    );
    // Both pods were registered from the agent alone, addresses read from their namespaces.
    let w = n
        .mesh
        .as_ref()
        .unwrap()
        .registry
        .by_ip(n.topo.host("b").addr(true));
    assert_eq!(w.map(|w| w.service_account.clone()), Some("sa".to_string()));
}
