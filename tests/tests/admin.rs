//! The HTTP endpoints of real processes: `/metrics` scraped and parsed during traffic and
//! compared with `redirect-user status --json`, `/debug/pods` against the same, and
//! `/readyz` following the facts it is derived from (a proxy connecting, leaving).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use redirect_tests::{
    process::{Proc, RemoveDir, cli, pod_add, wait_for},
    *,
};
use serde_json::Value;

/// A port free on 127.0.0.1 now (the kernel's pick; released for the process to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path`: (status, body); `None` if nothing answers.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// One sample of the text format: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format; panics on a line it cannot read, and on a sample
/// whose family has no `# TYPE` line before it.
fn parse(text: &str) -> Vec<Sample> {
    let mut typed: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line == "# EOF" {
            continue;
        }
        if let Some(t) = line.strip_prefix("# TYPE ") {
            typed.push(t.split(' ').next().unwrap().to_string());
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("no value: {line:?}"),
        };
        let mut labels = BTreeMap::new();
        let rest = if let Some(mut r) = rest.strip_prefix('{') {
            loop {
                if let Some(after) = r.strip_prefix('}') {
                    break after;
                }
                let (k, v) = r
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("label: {line:?}"));
                let mut value = String::new();
                let mut chars = v.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c)) => value.push(c),
                            None => panic!("escape: {line:?}"),
                        },
                        Some((i, '"')) => break i,
                        Some((_, c)) => value.push(c),
                        None => panic!("unterminated label: {line:?}"),
                    }
                };
                labels.insert(k.trim_start_matches(',').to_string(), value);
                r = v[end + 1..].trim_start_matches(',');
            }
        } else {
            rest
        };
        let value: f64 = rest
            .trim()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("value ({e}): {line:?}"));
        assert!(
            typed.iter().any(|t| name.starts_with(t.as_str())),
            "sample before its # TYPE: {line:?}"
        );
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// The sum of `name` over the samples whose labels include `with`.
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// The engine's counters: (status field, metric, label, label value).
const COUNTERS: [(&str, &str, &str, &str); 12] = [
    (
        "redirected_15001",
        "redirect_pod_redirected_connections_total",
        "listener",
        "15001",
    ),
    (
        "redirected_15006",
        "redirect_pod_redirected_connections_total",
        "listener",
        "15006",
    ),
    (
        "redirected_15008",
        "redirect_pod_redirected_connections_total",
        "listener",
        "15008",
    ),
    (
        "redirected_15053",
        "redirect_pod_redirected_connections_total",
        "listener",
        "15053",
    ),
    (
        "bypassed_probe",
        "redirect_pod_bypassed_connections_total",
        "reason",
        "probe",
    ),
    (
        "bypassed_loopback",
        "redirect_pod_bypassed_connections_total",
        "reason",
        "loopback",
    ),
    (
        "bypassed_proxy",
        "redirect_pod_bypassed_connections_total",
        "reason",
        "proxy",
    ),
    (
        "dropped_no_listener",
        "redirect_pod_dropped_total",
        "reason",
        "no_listener",
    ),
    (
        "dropped_spoofed",
        "redirect_pod_dropped_total",
        "reason",
        "spoofed",
    ),
    (
        "dropped_error",
        "redirect_pod_dropped_total",
        "reason",
        "error",
    ),
    (
        "dropped_unparsable",
        "redirect_pod_dropped_total",
        "reason",
        "unparsable",
    ),
    (
        "dropped_unknown_dst",
        "redirect_pod_dropped_total",
        "reason",
        "unknown_dst",
    ),
];

/// A node: pods with echo apps, an outside peer, the processes' directories.
struct Node {
    topo: Topology,
    dir: PathBuf,
    pin: String,
    procs: Vec<(String, Proc)>,
    _rm: (RemoveDir, RemoveDir),
}

impl Node {
    fn new(tag: &str) -> Node {
        let mut topo = Topology::new(tag).unwrap();
        for (n, i) in [("a", 10), ("b", 11), ("c", 100)] {
            topo.add_host(n, i).unwrap();
            let h = topo.host(n);
            echo_server(
                &h.netns().unwrap(),
                n,
                SocketAddr::new(h.addr(false), PEER_PORT),
            )
            .unwrap();
        }
        let base = topo.node().trim_end_matches("-node").to_string();
        let dir = PathBuf::from(format!("/tmp/{base}"));
        std::fs::create_dir_all(&dir).unwrap();
        let pin = format!("/sys/fs/bpf/{base}");
        Node {
            topo,
            _rm: (RemoveDir::new(dir.clone()), RemoveDir::new(pin.clone())),
            dir,
            pin,
            procs: Vec::new(),
        }
    }

    fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn sock(&self) -> String {
        format!("{}/zds.sock", self.d())
    }

    fn spawn(&mut self, name: &str, args: &[&str]) {
        let log = self.dir.join(format!("{name}.log"));
        self.procs.push((name.into(), Proc::spawn(args, &log)));
    }

    fn stop(&mut self, name: &str) {
        self.procs.retain(|(n, _)| n != name);
    }

    fn status(&self) -> Value {
        serde_json::from_str(&cli(&["status", "--json", "--state-dir", self.d()]).unwrap()).unwrap()
    }

    fn ready(&self, uid: &str) -> bool {
        self.status()["pods"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["spec"]["uid"] == uid && p["state"]["state"] == "ready")
        })
    }

    fn ask(&self, from: &str, to: &str) -> String {
        let addr = SocketAddr::new(self.topo.host(to).addr(false), PEER_PORT);
        ask(&self.topo.host(from).netns().unwrap(), addr).unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, _) in &self.procs {
                let text = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                eprintln!("---- {name} ----\n{text}");
            }
        }
        self.procs.clear();
    }
}

#[test]
fn metrics_and_the_pod_dump_agree_with_status_during_traffic() {
    let mut n = Node::new("admm");
    let (admin, metrics) = (free_port(), free_port());
    let (d, sock, pin) = (n.d().to_string(), n.sock(), n.pin.clone());
    let (admin_s, metrics_s) = (format!("127.0.0.1:{admin}"), format!("127.0.0.1:{metrics}"));
    n.spawn(
        "run",
        &[
            "run",
            "--bare-relay",
            "--drain-secs",
            "0",
            "--socket",
            &sock,
            "--state-dir",
            &d,
            "--pin-dir",
            &pin,
            "--admin-addr",
            &admin_s,
            "--metrics-addr",
            &metrics_s,
        ],
    );
    wait_for("ready", 15, || {
        get(admin, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    assert_eq!(get(metrics, "/healthz").unwrap().0, 200);
    assert_eq!(get(admin, "/livez").unwrap().0, 200);
    // Each listener answers its own routes only.
    assert_eq!(get(admin, "/metrics").unwrap().0, 404);
    assert_eq!(get(metrics, "/debug/pods").unwrap().0, 404);
    assert_eq!(get(admin, "/nothing").unwrap().0, 404);

    for pod in ["a", "b"] {
        pod_add(&d, &n.topo.host(pod).path(), pod).unwrap();
    }
    wait_for("pods ready", 10, || n.ready("uid-a") && n.ready("uid-b"));
    let before = parse(&get(metrics, "/metrics").unwrap().1);
    let opened = |s: &[Sample], reporter, who: (&str, &str)| {
        sum(
            s,
            "istio_tcp_connections_opened_total",
            &[("reporter", reporter), who],
        )
    };
    let (a_out0, b_in0) = (
        opened(&before, "source", ("source_workload", "a")),
        opened(&before, "destination", ("destination_workload", "b")),
    );

    // Traffic: a -> b (a's 15001, then b's 15006), scraped while it runs.
    const N: usize = 20;
    let mut during = Vec::new();
    for i in 0..N {
        assert!(n.ask("a", "b").starts_with("b from "));
        if i % 5 == 0 {
            let (status, text) = get(metrics, "/metrics").unwrap();
            assert_eq!(status, 200);
            during.push(parse(&text));
        }
    }
    assert!(during.iter().all(|s| !s.is_empty()));
    let after = parse(&get(metrics, "/metrics").unwrap().1);
    let (a_out, b_in) = (
        opened(&after, "source", ("source_workload", "a")),
        opened(&after, "destination", ("destination_workload", "b")),
    );
    assert!(a_out >= a_out0 + N as f64, "a outbound {a_out0} -> {a_out}");
    assert!(b_in >= b_in0 + N as f64, "b inbound {b_in0} -> {b_in}");
    // Upstream's label set, unknown values `unknown`.
    let s = after
        .iter()
        .find(|s| {
            s.name == "istio_tcp_connections_opened_total" && s.labels["source_workload"] == "a"
        })
        .unwrap();
    for (k, v) in [
        ("source_workload_namespace", "default"),
        ("destination_workload", "unknown"),
        ("destination_principal", "unknown"),
        ("destination_service", "unknown"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "unknown"),
    ] {
        assert_eq!(s.labels[k], v, "{s:?}");
    }
    assert!(s.labels.contains_key("source_principal") && s.labels.contains_key("response_flags"));
    let received = |s: &[Sample]| {
        sum(
            s,
            "istio_tcp_received_bytes_total",
            &[("source_workload", "a")],
        )
    };
    let sent = |s: &[Sample]| sum(s, "istio_tcp_sent_bytes_total", &[("source_workload", "a")]);
    assert!(
        received(&after) > received(&before),
        "bytes from the app counted"
    );
    assert!(sent(&after) > sent(&before), "bytes to the app counted");
    // Every connection ends: closed catches up with opened.
    wait_for("connections closed", 10, || {
        let s = parse(&get(metrics, "/metrics").unwrap().1);
        sum(&s, "istio_tcp_connections_closed_total", &[])
            == sum(&s, "istio_tcp_connections_opened_total", &[])
    });

    // At rest, the engine's per-pod counters read the same through both.
    let status = n.status();
    let scraped = parse(&get(metrics, "/metrics").unwrap().1);
    for pod in status["pods"].as_array().unwrap() {
        let name = pod["spec"]["name"].as_str().unwrap();
        for (field, metric, key, value) in COUNTERS {
            let want = pod["counters"][field].as_u64().unwrap() as f64;
            let got = sum(
                &scraped,
                metric,
                &[("pod", name), ("namespace", "default"), (key, value)],
            );
            assert_eq!(got, want, "pod {name} {field}");
        }
    }
    assert!(
        sum(
            &scraped,
            "redirect_pod_redirected_connections_total",
            &[("pod", "a"), ("listener", "15001")]
        ) >= N as f64
    );
    assert!(
        sum(
            &scraped,
            "redirect_pod_redirected_connections_total",
            &[("pod", "b"), ("listener", "15006")]
        ) >= N as f64
    );
    assert_eq!(
        sum(&scraped, "redirect_agent_pods", &[("state", "ready")]),
        2.0
    );
    assert_eq!(sum(&scraped, "ztunnel_connected", &[]), 1.0);
    assert_eq!(
        sum(
            &scraped,
            "redirect_agent_enrolment_duration_seconds_count",
            &[]
        ),
        2.0
    );
    assert_eq!(
        sum(&scraped, "workload_manager_active_proxy_count", &[]),
        2.0
    );

    // The admin dump is the report `status --json` prints.
    let (code, body) = get(admin, "/debug/pods").unwrap();
    assert_eq!(code, 200);
    let dump: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["pods"], status["pods"]);
    assert_eq!(dump["proxies"], status["proxies"]);

    // A pod removed leaves both.
    cli(&["pod", "del", "--state-dir", &d, "--uid", "uid-b"]).unwrap();
    let scraped = parse(&get(metrics, "/metrics").unwrap().1);
    assert_eq!(
        sum(
            &scraped,
            "redirect_pod_redirected_connections_total",
            &[("pod", "b")]
        ),
        0.0
    );
    assert_eq!(
        sum(&scraped, "redirect_agent_pods", &[("state", "ready")]),
        1.0
    );
    let dump: Value = serde_json::from_str(&get(admin, "/debug/pods").unwrap().1).unwrap();
    assert_eq!(dump["pods"].as_array().unwrap().len(), 1);
}

#[test]
fn the_agent_is_ready_only_while_a_proxy_is_connected() {
    let mut n = Node::new("admr");
    let (admin, metrics, proxy_admin) = (free_port(), free_port(), free_port());
    let (d, sock, pin) = (n.d().to_string(), n.sock(), n.pin.clone());
    let (admin_s, metrics_s, proxy_admin_s) = (
        format!("127.0.0.1:{admin}"),
        format!("127.0.0.1:{metrics}"),
        format!("127.0.0.1:{proxy_admin}"),
    );
    n.spawn(
        "agent",
        &[
            "node-agent",
            "--socket",
            &sock,
            "--state-dir",
            &d,
            "--pin-dir",
            &pin,
            "--admin-addr",
            &admin_s,
            "--metrics-addr",
            &metrics_s,
        ],
    );
    wait_for("agent serving", 15, || get(admin, "/healthz").is_some());
    let (code, body) = get(admin, "/readyz").unwrap();
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready:\nagent: no proxy connected\n")
    );
    assert_eq!(
        get(metrics, "/readyz").unwrap().0,
        503,
        "same answer on both listeners"
    );
    let s = parse(&get(metrics, "/metrics").unwrap().1);
    assert_eq!(sum(&s, "ztunnel_connected", &[]), 0.0);
    // Alive while not ready.
    assert_eq!(get(admin, "/healthz").unwrap().0, 200);

    // A pod added meanwhile waits for a proxy, and says so.
    pod_add(&d, &n.topo.host("a").path(), "a").unwrap();
    let s = parse(&get(metrics, "/metrics").unwrap().1);
    assert_eq!(
        sum(&s, "redirect_agent_pods", &[("state", "waiting_for_proxy")]),
        1.0
    );

    let spawn_proxy = |n: &mut Node| {
        n.spawn(
            "proxy",
            &[
                "proxy",
                "--bare-relay",
                "--socket",
                &sock,
                "--drain-secs",
                "0",
                "--admin-addr",
                &proxy_admin_s,
                "--metrics-addr",
                "off",
            ],
        )
    };
    spawn_proxy(&mut n);
    wait_for("agent ready", 15, || {
        get(admin, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    wait_for("proxy ready", 15, || {
        get(proxy_admin, "/healthz/ready").is_some_and(|(c, _)| c == 200)
    });
    wait_for("pod ready", 10, || n.ready("uid-a"));
    assert!(n.ask("a", "c").starts_with("c from "));
    let s = parse(&get(metrics, "/metrics").unwrap().1);
    assert_eq!(sum(&s, "ztunnel_connected", &[]), 1.0);
    assert_eq!(sum(&s, "redirect_agent_pods", &[("state", "ready")]), 1.0);

    // The proxy leaves: not ready again.
    n.stop("proxy");
    wait_for("agent not ready", 10, || {
        get(admin, "/readyz").is_some_and(|(c, _)| c == 503)
    });
    assert!(
        get(proxy_admin, "/healthz").is_none(),
        "the proxy's endpoints went with it"
    );
    spawn_proxy(&mut n);
    wait_for("agent ready again", 15, || {
        get(admin, "/readyz").is_some_and(|(c, _)| c == 200)
    });
}

#[test]
fn mesh_connections_carry_both_identities_in_upstream_labels() {
    let mut n = Node::new("admh");
    let metrics = free_port();
    let (d, sock, pin) = (n.d().to_string(), n.sock(), n.pin.clone());
    let metrics_s = format!("127.0.0.1:{metrics}");
    // The HBONE data path (mutual TLS between the pods' identities), no bare relay.
    n.spawn(
        "run",
        &[
            "run",
            "--drain-secs",
            "0",
            "--socket",
            &sock,
            "--state-dir",
            &d,
            "--pin-dir",
            &pin,
            "--admin-addr",
            "off",
            "--metrics-addr",
            &metrics_s,
        ],
    );
    wait_for("ready", 15, || {
        get(metrics, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    for pod in ["a", "b"] {
        let (netns, uid, sa) = (
            n.topo.host(pod).path(),
            format!("uid-{pod}"),
            format!("sa-{pod}"),
        );
        cli(&[
            "pod",
            "add",
            "--state-dir",
            &d,
            "--netns",
            &netns,
            "--uid",
            &uid,
            "--name",
            pod,
            "--namespace",
            "default",
            "--service-account",
            &sa,
        ])
        .unwrap();
    }
    wait_for("pods ready", 10, || n.ready("uid-a") && n.ready("uid-b"));
    for _ in 0..3 {
        assert!(n.ask("a", "b").starts_with("b from "));
    }
    let s = parse(&get(metrics, "/metrics").unwrap().1);
    let (ida, idb) = (
        "spiffe://cluster.local/ns/default/sa/sa-a",
        "spiffe://cluster.local/ns/default/sa/sa-b",
    );
    let mtls = ("connection_security_policy", "mutual_tls");
    let out = sum(
        &s,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("source_workload", "a"),
            ("source_principal", ida),
            ("destination_workload", "b"),
            ("destination_workload_namespace", "default"),
            ("destination_principal", idb),
            mtls,
        ],
    );
    assert!(out >= 3.0, "outbound tunnelled connections of a: {out}");
    let inb = sum(
        &s,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", ida),
            ("source_workload_namespace", "default"),
            ("destination_workload", "b"),
            ("destination_principal", idb),
            mtls,
        ],
    );
    assert!(inb >= 3.0, "inbound tunnel streams of b: {inb}");
    assert_eq!(
        sum(&s, "istio_tcp_connections_failed_total", &[]),
        0.0,
        "no failed connection"
    );
}
