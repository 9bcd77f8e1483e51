//! The cost of redirection, side by side in one run over one topology (pods a and b on
//! one node): `direct` (no mesh: the limit), `iptables` (the in-pod rule set of
//! inpod-rules.md with its routes and marks) and `ebpf` (this engine), the last two in
//! front of the same bare TCP relay as the pods' proxy; with `EXTERNAL_PROXY=<binary>`,
//! also `external`: that proxy under our node agent and engine. Run by `cargo xtask bench`.
//!
//! Figures: new connections per second (one request per connection) at several
//! concurrencies, request latency p50/p99/p99.9 over persistent connections, bulk
//! throughput over one stream with the CPU time per GB (all CPUs, from /proc/stat).
//! Output: a table on stdout, `target/bench/mesh.{md,json,svg}`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use redirect_tests::*;
use redirect_user::proxy::relay::Relay;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const ECHO_PORT: u16 = 7000;
const BULK_PORT: u16 = 7001;
const REQ: usize = 64;

/// How long and how hard, per variant.
struct Plan {
    seconds: f64,
    concurrency: Vec<usize>,
    latency_requests: usize,
    bulk_bytes: u64,
    bulk_runs: usize,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Figures {
    mode: String,
    conn_per_s: Vec<(usize, f64)>,
    lat_us: [f64; 3],
    gbit_s: f64,
    cpu_s_per_gb: f64,
}

/// A socket of the app in `ns` (no mark: it is redirected like any app's).
async fn connect_from(ns: &Netns, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = ns
        .run(|| -> std::io::Result<socket2::Socket> {
            let d = if to.is_ipv6() {
                socket2::Domain::IPV6
            } else {
                socket2::Domain::IPV4
            };
            let s = socket2::Socket::new(d, socket2::Type::STREAM, None)?;
            s.set_nonblocking(true)?;
            s.set_tcp_nodelay(true)?;
            Ok(s)
        })
        .map_err(std::io::Error::other)??;
    let connect = tokio::net::TcpSocket::from_std_stream(sock.into()).connect(to);
    tokio::time::timeout(Duration::from_secs(3), connect)
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Load from many short connections wants the client side's TIME_WAIT ports back:
/// set in every pod, for every mode alike.
fn tune_for_load(ns: &Netns) -> Result<()> {
    ns.run(|| -> std::io::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
        // Above the proxy ports (15001-15053), which its listeners must be able to bind.
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "16000 65000")
    })??;
    Ok(())
}

/// The apps of pod b: an echo of fixed-size requests, and a sink for bulk data.
fn start_servers(ns: &Netns, ip: std::net::IpAddr) -> Result<()> {
    let echo = ns.run(|| std::net::TcpListener::bind((ip, ECHO_PORT)))??;
    let bulk = ns.run(|| std::net::TcpListener::bind((ip, BULK_PORT)))??;
    echo.set_nonblocking(true)?;
    bulk.set_nonblocking(true)?;
    let echo = TcpListener::from_std(echo)?;
    let bulk = TcpListener::from_std(bulk)?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; REQ];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = bulk.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    Ok(())
}

async fn conn_rate(ns: Arc<Netns>, to: SocketAddr, conc: usize, secs: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (ns, stop, done, failed) = (ns.clone(), stop.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = [7u8; REQ];
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = connect_from(&ns, to).await else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let exchange = async { s.write_all(&buf).await.and(s.read_exact(&mut buf).await) };
                match tokio::time::timeout(Duration::from_secs(3), exchange).await {
                    Ok(Ok(_)) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = t.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        eprintln!("  {failed} connections failed at concurrency {conc}");
    }
    n as f64 / elapsed
}

async fn latency(ns: &Netns, to: SocketAddr, requests: usize) -> Result<[f64; 3]> {
    let mut s = connect_from(ns, to).await?;
    let mut buf = [1u8; REQ];
    let mut lat = Vec::with_capacity(requests);
    for i in 0..requests + 200 {
        let t = Instant::now();
        let exchange = async { s.write_all(&buf).await.and(s.read_exact(&mut buf).await) };
        tokio::time::timeout(Duration::from_secs(3), exchange)
            .await
            .context("request timed out")??;
        if i >= 200 {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    Ok([p(0.5), p(0.99), p(0.999)])
}

/// Busy CPU seconds of the whole machine so far (all CPUs, /proc/stat).
fn busy_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 5 {
        return 0.0;
    }
    let total: f64 = f.iter().take(8).sum();
    (total - f[3] - f[4]) / 100.0
}

async fn bulk(ns: &Netns, to: SocketAddr, bytes: u64) -> Result<(f64, f64)> {
    let mut s = connect_from(ns, to).await?;
    let chunk = vec![0x5au8; 256 * 1024];
    let cpu0 = busy_cpu_s();
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    s.shutdown().await?;
    let mut got = [0u8; 8];
    s.read_exact(&mut got).await?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = busy_cpu_s() - cpu0;
    anyhow::ensure!(
        u64::from_be_bytes(got) == sent,
        "the sink got {} of {sent} bytes",
        u64::from_be_bytes(got)
    );
    let gb = sent as f64 / 1e9;
    Ok((gb * 8.0 / secs, cpu / gb))
}

async fn measure(
    mode: &str,
    ns_a: Arc<Netns>,
    b: std::net::IpAddr,
    plan: &Plan,
) -> Result<Figures> {
    let echo = SocketAddr::new(b, ECHO_PORT);
    // Warm up (and check the path works).
    latency(&ns_a, echo, 100)
        .await
        .with_context(|| format!("{mode}: no path to the server"))?;
    let mut f = Figures {
        mode: mode.into(),
        ..Default::default()
    };
    for &c in &plan.concurrency {
        f.conn_per_s
            .push((c, conn_rate(ns_a.clone(), echo, c, plan.seconds).await));
    }
    f.lat_us = latency(&ns_a, echo, plan.latency_requests).await?;
    // One stream through a userspace relay on two cores varies run to run: the median.
    let mut runs = Vec::new();
    for _ in 0..plan.bulk_runs {
        runs.push(bulk(&ns_a, SocketAddr::new(b, BULK_PORT), plan.bulk_bytes).await?);
    }
    runs.sort_by(|x, y| x.0.partial_cmp(&y.0).unwrap());
    let (gbit, cpu) = runs[runs.len() / 2];
    f.gbit_s = gbit;
    f.cpu_s_per_gb = cpu;
    eprintln!("{mode}: {f:?}");
    Ok(f)
}

fn table(rows: &[Figures]) -> String {
    let direct = rows
        .iter()
        .find(|r| r.mode == "direct")
        .cloned()
        .unwrap_or_default();
    let ipt = rows
        .iter()
        .find(|r| r.mode == "iptables")
        .cloned()
        .unwrap_or_default();
    let mut s = String::from("| mode |");
    for (c, _) in &direct.conn_per_s {
        s.push_str(&format!(" conn/s c={c} |"));
    }
    s.push_str(" p50 µs | p99 µs | p99.9 µs | Gbit/s | CPU s/GB | conn/s vs direct | vs iptables | Gbit/s vs iptables |\n|---|");
    for _ in &direct.conn_per_s {
        s.push_str("---:|");
    }
    s.push_str("---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        s.push_str(&format!("| {} |", r.mode));
        for (_, v) in &r.conn_per_s {
            s.push_str(&format!(" {v:.0} |"));
        }
        let top = |x: &Figures| x.conn_per_s.last().map(|v| v.1).unwrap_or(0.0);
        s.push_str(&format!(
            " {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2}x | {:.2}x | {:.2}x |\n",
            r.lat_us[0],
            r.lat_us[1],
            r.lat_us[2],
            r.gbit_s,
            r.cpu_s_per_gb,
            top(r) / top(&direct),
            top(r) / top(&ipt),
            r.gbit_s / ipt.gbit_s
        ));
    }
    s
}

/// A chart's title and the value it shows per mode.
type Chart = (&'static str, fn(&Figures) -> f64);

/// A bar chart of the connection rate (highest concurrency) and throughput per mode.
fn svg(rows: &[Figures]) -> String {
    let (w, h, bar) = (640.0, 300.0, 40.0);
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n"
    );
    let charts: [Chart; 2] = [
        ("new connections/s", |r| {
            r.conn_per_s.last().map(|v| v.1).unwrap_or(0.0)
        }),
        ("Gbit/s, one stream", |r| r.gbit_s),
    ];
    for (i, (title, value)) in charts.iter().enumerate() {
        let x0 = 20.0 + i as f64 * (w / 2.0);
        let max = rows.iter().map(value).fold(0.0, f64::max).max(1e-9);
        out.push_str(&format!("<text x='{x0}' y='20'>{title}</text>\n"));
        for (j, r) in rows.iter().enumerate() {
            let v = value(r);
            let bh = (h - 80.0) * v / max;
            let x = x0 + j as f64 * (bar + 30.0);
            out.push_str(&format!(
                "<rect x='{x}' y='{}' width='{bar}' height='{bh}' fill='#4a7ab0'/><text x='{x}' y='{}'>{v:.1}</text><text x='{x}' y='{}'>{}</text>\n",
                h - 40.0 - bh,
                h - 45.0 - bh,
                h - 25.0,
                r.mode
            ));
        }
    }
    out.push_str("</svg>\n");
    out
}

/// Runs `bin` as the node's proxy under our node agent (in this process) and measures
/// through it. The proxy is started in the node namespace with `INPOD_UDS` (the agent's
/// socket) and `LOCAL_XDS_PATH` (a workload file naming pods a and b, in the upstream
/// proxy's local format) set; anything else it needs comes from the environment
/// (for upstream ztunnel: `PROXY_MODE=shared FAKE_CA=true XDS_ADDRESS=`).
fn external(
    m: &Mesh,
    bin: &str,
    ns_a: Arc<Netns>,
    b: std::net::IpAddr,
    plan: &Plan,
) -> Result<Figures> {
    use redirect_tests::process::RemoveDir;
    use redirect_user::agent::{Agent, PodSpec, PodState};
    let base = m.base();
    let dir = std::path::PathBuf::from(format!("/tmp/{base}-ext"));
    let _cleanup = (
        RemoveDir(dir.clone()),
        RemoveDir(format!("/sys/fs/bpf/{base}-ext").into()),
    );
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("zds.sock");
    let mut workloads = String::from("workloads:\n");
    for p in ["a", "b"] {
        workloads.push_str(&format!(
            "- uid: ext-{p}\n  name: {p}\n  namespace: default\n  serviceAccount: sa-{p}\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n  node: node1\n  network: \"\"\n  services: {{}}\n",
            m.host(p).v4
        ));
    }
    std::fs::write(dir.join("workloads.yaml"), workloads)?;
    let engine = Arc::new(Engine::open(EngineConfig {
        proxy_identity: redirect_user::ebpf::ProxyIdentity::Cgroups(Vec::new()),
        ..EngineConfig::at(format!("/sys/fs/bpf/{base}-ext"))
    })?);
    let agent = Agent::new(engine, &dir)?;
    let serve = {
        let (a, s) = (agent.clone(), sock.clone());
        m.rt.spawn(async move {
            let _ = a.serve(&s).await;
        })
    };
    let log = std::fs::File::create(dir.join("proxy.log"))?;
    let mut proxy = redirect_tests::process::Proc(
        std::process::Command::new("ip")
            .args(["netns", "exec", m.topo.node(), bin])
            .env("INPOD_UDS", &sock)
            .env("LOCAL_XDS_PATH", dir.join("workloads.yaml"))
            .env("NODE_NAME", "node1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin}"))?,
    );
    let result = (|| -> Result<Figures> {
        let t = Instant::now();
        while agent.proxies().is_empty() {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(20),
                "{bin} did not connect to the node agent"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for p in ["a", "b"] {
            let spec = PodSpec {
                uid: format!("ext-{p}"),
                name: p.into(),
                namespace: "default".into(),
                service_account: format!("sa-{p}"),
                netns: m.host(p).path().into(),
                dns_capture: false,
            };
            let mut state = m.rt.block_on(agent.add_pod(spec))?;
            let t = Instant::now();
            while state != PodState::Ready {
                anyhow::ensure!(
                    t.elapsed() < Duration::from_secs(20),
                    "pod {p} not ready on {bin}: {state:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
                state = agent
                    .list()
                    .into_iter()
                    .find(|s| s.spec.name == p)
                    .map(|s| s.state)
                    .unwrap_or(state);
            }
        }
        let mut f = m.rt.block_on(measure("external", ns_a, b, plan))?;
        f.mode = format!(
            "external ({})",
            std::path::Path::new(bin)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
        );
        Ok(f)
    })();
    for p in ["a", "b"] {
        let _ = m.rt.block_on(agent.del_pod(&format!("ext-{p}")));
    }
    let _ = proxy.0.kill();
    serve.abort();
    result
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let plan = if quick {
        Plan {
            seconds: 2.0,
            concurrency: vec![1, 8],
            latency_requests: 5_000,
            bulk_bytes: 1 << 30,
            bulk_runs: 1,
        }
    } else {
        Plan {
            seconds: 5.0,
            concurrency: vec![1, 8, 32],
            latency_requests: 20_000,
            bulk_bytes: 2 << 30,
            bulk_runs: 3,
        }
    };
    let mut m = Mesh::new("rmesh", &[("a", 10), ("b", 11)])?;
    for p in ["a", "b"] {
        tune_for_load(&m.ns(p))?;
    }
    let (ns_a, b_ip) = (Arc::new(m.ns("a")), m.host("b").addr(false));
    {
        let _g = m.rt.enter();
        start_servers(&m.ns("b"), b_ip)?;
    }
    let mut rows = Vec::new();

    rows.push(m.rt.block_on(measure("direct", ns_a.clone(), b_ip, &plan))?);

    // ebpf first: the netfilter run leaves conntrack and nat hooks registered in the
    // pods (emptied tables stay), which would weigh on whatever runs after it.
    // ebpf: this engine, the same relay.
    for p in ["a", "b"] {
        m.enrol(p, PodOptions::default())?;
    }
    rows.push(m.rt.block_on(measure("ebpf", ns_a.clone(), b_ip, &plan))?);
    if !quick {
        // The per-packet path is a few hash lookups: it must not grow with the pods.
        let extra: Vec<String> = (0..500).map(|i| format!("x{i}")).collect();
        for (i, name) in extra.iter().enumerate() {
            m.topo.add_host(name, 1000 + i as u16)?;
        }
        std::thread::sleep(Duration::from_secs(3));
        for name in &extra {
            let ns = m.ns(name);
            m.engine
                .enrol(name, &ns, &PodOptions::default(), &Default::default())?;
        }
        let mut f =
            m.rt.block_on(measure("ebpf, 500 more pods", ns_a.clone(), b_ip, &plan))?;
        f.mode = "ebpf +500 pods".into();
        rows.push(f);
        for name in &extra {
            m.engine.unenrol(name)?;
        }
    }
    for p in ["a", "b"] {
        m.unenrol(p)?;
    }

    // iptables: the in-pod rules in both pods, the relay behind them.
    let v6 = netfilter::rules_v6();
    let mut relays = Vec::new();
    for p in ["a", "b"] {
        netfilter::enrol(&m.ns(p), &v6)?;
        let l = PodListeners::open(&m.ns(p), false)?;
        let _g = m.rt.enter();
        relays.push(Relay::start(p, m.ns(p), l, None)?);
    }
    rows.push(m.rt.block_on(measure("iptables", ns_a.clone(), b_ip, &plan))?);
    for r in relays.drain(..) {
        m.rt.block_on(r.stop());
    }
    for p in ["a", "b"] {
        netfilter::unenrol(&m.ns(p))?;
    }

    // external: a proxy binary the user built, under our agent and engine.
    if let Ok(bin) = std::env::var("EXTERNAL_PROXY") {
        rows.push(external(&m, &bin, ns_a.clone(), b_ip, &plan)?);
    }

    let md = table(&rows);
    let header = format!(
        "Redirection alone: pods a -> b on one node, IPv4, the bare TCP relay as the proxy of ebpf and iptables (external: the given proxy under our agent and engine), {} s per rate point{}.\n\n",
        plan.seconds,
        if quick { " (--quick)" } else { "" }
    );
    println!("{header}{md}");
    let out_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("mesh.md"), format!("{header}{md}"))?;
    std::fs::write(
        out_dir.join("mesh.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    std::fs::write(out_dir.join("mesh.svg"), svg(&rows))?;
    Ok(())
}
