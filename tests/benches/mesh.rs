//! The cost of redirection, side by side in one run over one topology (pods a and b on
//! one node): `direct` (no mesh: the limit), `iptables` (the in-pod rule set of
//! inpod-rules.md with its routes and marks) and `ebpf` (this engine), the last two in
//! front of the same proxy, run twice: as a bare TCP relay (the cost of redirection
//! alone) and as the full mesh data path (`+hbone`: a's app -> a's 15001 -> HBONE, mutual
//! TLS and HTTP/2 CONNECT -> b's 15008 -> b's app; `ebpf+quic`: the same over our QUIC
//! transport). With `EXTERNAL_PROXY=<binary>`, also `external`: that proxy under our node
//! agent and engine. Run by `cargo xtask bench`.
//!
//! Figures from our load generator: new connections per second (one request per
//! connection) at several concurrencies, request latency p50/p99/p99.9 over persistent
//! connections, bulk throughput over one stream with the CPU time per GB (all CPUs, from
//! /proc/stat). From real tools when installed (`cargo xtask bench` installs them; each
//! run bounded in time, client in pod a, server in pod b): iperf3, one stream; wrk, HTTP
//! requests over keep-alive connections and, with `Connection: close`, new connections
//! per second, against a fixed-answer HTTP/1.1 server of this bench in pod b.
//! Output: a table on stdout, `target/bench/mesh.{md,json,svg}`.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use redirect_tests::{process::RemoveDir, *};
use redirect_user::proxy::{
    identity::{LocalCa, Tls},
    mesh::{DefaultTransport, Mesh as ProxyMesh},
    registry::Registry,
    relay::Relay,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const ECHO_PORT: u16 = 7000;
const BULK_PORT: u16 = 7001;
const HTTP_PORT: u16 = 7080;
const IPERF_PORT: u16 = 7201;
const REQ: usize = 64;
const TRUST_DOMAIN: &str = "cluster.local";

/// How long and how hard, per variant.
struct Plan {
    seconds: f64,
    concurrency: Vec<usize>,
    latency_requests: usize,
    bulk_bytes: u64,
    bulk_runs: usize,
    /// Seconds per iperf3 and per wrk run.
    tool_seconds: u32,
    /// wrk's connections (one thread).
    wrk_connections: usize,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Figures {
    mode: String,
    conn_per_s: Vec<(usize, f64)>,
    /// The connection-rate phase, every concurrency: connections that failed, that
    /// took longer than [`SLOW`] (connect and one exchange), and the slowest (ms).
    conn_failed: u64,
    conn_slow: u64,
    conn_max_ms: f64,
    lat_us: [f64; 3],
    gbit_s: f64,
    cpu_s_per_gb: f64,
    /// iperf3, one stream a -> b.
    iperf3: Option<Iperf>,
    /// wrk over keep-alive connections.
    wrk_keepalive: Option<Wrk>,
    /// wrk with `Connection: close`: one request per connection.
    wrk_close: Option<Wrk>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Iperf {
    gbit_s: f64,
    retransmits: u64,
    seconds: f64,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Wrk {
    connections: usize,
    requests: u64,
    req_per_s: f64,
    /// p50, p99, p99.9 in µs (wrk's own histogram).
    lat_us: [f64; 3],
    /// The slowest request (µs).
    max_us: f64,
    /// Requests slower than [`SLOW`].
    slow: u64,
    errors: u64,
    /// connect, read, write, status, timeout.
    errors_by_kind: [u64; 5],
}

/// A connection or request slower than this waited for something (a SYN
/// retransmission costs 1 s): counted apart.
const SLOW: Duration = Duration::from_millis(100);

/// What the connection-rate phase saw at one concurrency.
struct Rate {
    per_s: f64,
    failed: u64,
    slow: u64,
    max: Duration,
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

/// The apps of pod b: an echo of fixed-size requests, a sink for bulk data, and a
/// fixed-answer HTTP/1.1 server (for wrk).
fn start_servers(ns: &Netns, ip: IpAddr) -> Result<()> {
    let echo = ns.run(|| std::net::TcpListener::bind((ip, ECHO_PORT)))??;
    let bulk = ns.run(|| std::net::TcpListener::bind((ip, BULK_PORT)))??;
    let http = ns.run(|| std::net::TcpListener::bind((ip, HTTP_PORT)))??;
    echo.set_nonblocking(true)?;
    bulk.set_nonblocking(true)?;
    http.set_nonblocking(true)?;
    let echo = TcpListener::from_std(echo)?;
    let bulk = TcpListener::from_std(bulk)?;
    let http = TcpListener::from_std(http)?;
    tokio::spawn(async move {
        while let Ok((s, _)) = http.accept().await {
            tokio::spawn(http_connection(s));
        }
    });
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

/// One HTTP/1.1 connection: every request (headers only, as wrk sends them) gets
/// `200 ok`; the connection stays open unless the request says `Connection: close`.
async fn http_connection(mut s: TcpStream) {
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";
    const OK_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nok";
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            let close = head
                .lines()
                .any(|l| l.starts_with("connection:") && l.contains("close"));
            if s.write_all(if close { OK_CLOSE } else { OK })
                .await
                .is_err()
                || close
            {
                let _ = s.shutdown().await;
                return;
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    }
}

async fn conn_rate(ns: Arc<Netns>, to: SocketAddr, conc: usize, secs: f64) -> Rate {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let slow = Arc::new(AtomicU64::new(0));
    let max_us = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (ns, stop, done, failed, slow, max_us) = (
            ns.clone(),
            stop.clone(),
            done.clone(),
            failed.clone(),
            slow.clone(),
            max_us.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut buf = [7u8; REQ];
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let Ok(mut s) = connect_from(&ns, to).await else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    // A refused connect can fail without ever yielding: back off, or a
                    // dead listener turns this loop into a spin that starves the timer
                    // that ends the phase (a bench run once hung here).
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let exchange = async { s.write_all(&buf).await.and(s.read_exact(&mut buf).await) };
                match tokio::time::timeout(Duration::from_secs(3), exchange).await {
                    Ok(Ok(_)) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        let took = t.elapsed();
                        max_us.fetch_max(took.as_micros() as u64, Ordering::Relaxed);
                        if took > SLOW {
                            slow.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
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
    let r = Rate {
        per_s: n as f64 / elapsed,
        failed: failed.load(Ordering::Relaxed),
        slow: slow.load(Ordering::Relaxed),
        max: Duration::from_micros(max_us.load(Ordering::Relaxed)),
    };
    if r.failed > 0 || r.slow > 0 {
        eprintln!(
            "  concurrency {conc}: {} connections failed, {} slower than {} ms (max {:?})",
            r.failed,
            r.slow,
            SLOW.as_millis(),
            r.max
        );
    }
    r
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

async fn measure(mode: &str, ns_a: Arc<Netns>, b: IpAddr, plan: &Plan) -> Result<Figures> {
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
        let r = conn_rate(ns_a.clone(), echo, c, plan.seconds).await;
        f.conn_per_s.push((c, r.per_s));
        f.conn_failed += r.failed;
        f.conn_slow += r.slow;
        f.conn_max_ms = f.conn_max_ms.max(r.max.as_secs_f64() * 1e3);
    }
    f.lat_us = latency(&ns_a, echo, plan.latency_requests)
        .await
        .context("latency over one connection")?;
    // One stream through a userspace relay on two cores varies run to run: the median.
    let mut runs = Vec::new();
    for i in 0..plan.bulk_runs {
        runs.push(
            bulk(&ns_a, SocketAddr::new(b, BULK_PORT), plan.bulk_bytes)
                .await
                .with_context(|| format!("bulk stream {}", i + 1))?,
        );
    }
    runs.sort_by(|x, y| x.0.partial_cmp(&y.0).unwrap());
    let (gbit, cpu) = runs[runs.len() / 2];
    f.gbit_s = gbit;
    f.cpu_s_per_gb = cpu;
    eprintln!("{mode}: {f:?}");
    Ok(f)
}

/// The real load tools found on this machine, and a directory of the bench's own files
/// (wrk's report script, the tools' output), removed at the end.
struct Tools {
    iperf3: bool,
    wrk: bool,
    dir: PathBuf,
    /// Namespace names for `ip netns exec`: the client's (pod a), the server's (pod b).
    client: String,
    server: String,
}

/// wrk's report, one line: requests, duration (µs), errors (connect, read, write,
/// status, timeout), p50/p99/p99.9 and max
/// (µs), and the requests slower than 100 ms ([`SLOW`]) from its histogram (`latency(i)`:
/// a recorded value and how many requests took it).
const WRK_SCRIPT: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  local slow = 0
  for i = 1, #latency do
    local v, n = latency(i)
    if v > 100000 then slow = slow + n end
  end
  io.write(string.format("WRK-RESULT %d %d %d %d %d %d %d %.1f %.1f %.1f %.1f %d\n",
    summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    latency.max, slow))
end
"#;

impl Tools {
    fn find(dir: PathBuf, client: &str, server: &str) -> Result<Self> {
        let have = |bin: &str| {
            Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let t = Self {
            iperf3: have("iperf3"),
            wrk: have("wrk"),
            dir,
            client: client.into(),
            server: server.into(),
        };
        let missing: Vec<&str> = [("iperf3", t.iperf3), ("wrk", t.wrk)]
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "mesh bench: {} not installed (`cargo xtask bench` installs them with apt-get): going on without their columns",
                missing.join(" and ")
            );
        }
        if t.wrk {
            std::fs::write(t.dir.join("report.lua"), WRK_SCRIPT)?;
        }
        Ok(t)
    }
}

/// Runs `cmd` for at most `limit` (killed then): its exit status, stdout and stderr
/// (through files of the bench's directory).
fn run_bounded(
    cmd: &mut Command,
    dir: &Path,
    limit: Duration,
) -> Result<(std::process::ExitStatus, String, String)> {
    let (out, err) = (dir.join("tool.out"), dir.join("tool.err"));
    let mut child = redirect_tests::process::Proc::adopt(
        cmd.env("TMPDIR", dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?,
    );
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait()? {
            break s;
        }
        anyhow::ensure!(
            t.elapsed() < limit,
            "still running after {} s: stopped",
            limit.as_secs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((
        status,
        std::fs::read_to_string(&out).unwrap_or_default(),
        std::fs::read_to_string(&err).unwrap_or_default(),
    ))
}

/// Whether a TCP socket listens on `port` in `ns`.
fn listening(ns: &Netns, port: u16) -> bool {
    let port = format!(":{port:04X}");
    ns.run(|| {
        ["tcp", "tcp6"].iter().any(|f| {
            std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .any(|l| {
                    let c: Vec<&str> = l.split_whitespace().collect();
                    c.len() > 3 && c[1].ends_with(&port) && c[3] == "0A"
                })
        })
    })
    .unwrap_or(false)
}

/// iperf3, one stream from pod a to `iperf3 -s -1` in pod b, `secs` long.
fn iperf3(t: &Tools, server_ns: &Netns, b: IpAddr, secs: u32) -> Result<Iperf> {
    let port = IPERF_PORT.to_string();
    let _server = redirect_tests::process::Proc::adopt(
        Command::new("ip")
            .args([
                "netns", "exec", &t.server, "iperf3", "-s", "-1", "-p", &port,
            ])
            .env("TMPDIR", &t.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?,
    );
    let started = Instant::now();
    while !listening(server_ns, IPERF_PORT) {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(5),
            "iperf3 -s did not listen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, out, err) = run_bounded(
        Command::new("ip")
            .args(["netns", "exec", &t.client, "iperf3", "-J"])
            .args(["-c", &b.to_string(), "-p", &port, "-t", &secs.to_string()]),
        &t.dir,
        Duration::from_secs(secs as u64 + 15),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("iperf3 ({status}): {}", err.trim()))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("iperf3: {e}");
    }
    let received = &v["end"]["sum_received"];
    Ok(Iperf {
        gbit_s: received["bits_per_second"]
            .as_f64()
            .context("iperf3: no end.sum_received")?
            / 1e9,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        seconds: received["seconds"].as_f64().unwrap_or(0.0),
    })
}

/// wrk, one thread and `conns` connections from pod a to the HTTP server in pod b;
/// with `close`, each request on a new connection.
fn wrk(t: &Tools, b: IpAddr, conns: usize, secs: u32, close: bool) -> Result<Wrk> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &t.client, "wrk", "-t1", "--timeout", "3s"])
        .args(["-c", &conns.to_string(), "-d", &format!("{secs}s"), "-s"])
        .arg(t.dir.join("report.lua"));
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{}/", SocketAddr::new(b, HTTP_PORT)));
    let (status, out, err) = run_bounded(&mut cmd, &t.dir, Duration::from_secs(secs as u64 + 15))?;
    anyhow::ensure!(status.success(), "wrk ({status}): {}", err.trim());
    let f: Vec<f64> = out
        .lines()
        .find_map(|l| l.strip_prefix("WRK-RESULT "))
        .context("wrk: no report")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    anyhow::ensure!(f.len() == 12 && f[1] > 0.0, "wrk: unreadable report");
    Ok(Wrk {
        connections: conns,
        requests: f[0] as u64,
        req_per_s: f[0] / (f[1] / 1e6),
        lat_us: [f[7], f[8], f[9]],
        max_us: f[10],
        slow: f[11] as u64,
        errors: f[2..7].iter().sum::<f64>() as u64,
        errors_by_kind: [f[2], f[3], f[4], f[5], f[6]].map(|v| v as u64),
    })
}

/// Our load, then the tools' (when installed; a tool's failure is reported, not fatal).
fn measure_mode(
    rt: &tokio::runtime::Runtime,
    mode: &str,
    ns_a: Arc<Netns>,
    ns_b: &Netns,
    b: IpAddr,
    plan: &Plan,
    tools: &Tools,
) -> Result<Figures> {
    let mut f = rt.block_on(measure(mode, ns_a, b, plan))?;
    if tools.iperf3 {
        match iperf3(tools, ns_b, b, plan.tool_seconds) {
            Ok(x) => f.iperf3 = Some(x),
            Err(e) => eprintln!("  {mode}: iperf3 failed: {e:#}"),
        }
    }
    if tools.wrk {
        for close in [false, true] {
            match wrk(tools, b, plan.wrk_connections, plan.tool_seconds, close) {
                Ok(w) => {
                    if w.errors > 0 {
                        let [connect, read, write, status, timeout] = w.errors_by_kind;
                        eprintln!(
                            "  {mode}: wrk{}: {} errors in {} requests (connect {connect}, read {read}, write {write}, status {status}, timeout {timeout})",
                            if close { " (Connection: close)" } else { "" },
                            w.errors,
                            w.requests
                        );
                    }
                    if close {
                        f.wrk_close = Some(w);
                    } else {
                        f.wrk_keepalive = Some(w);
                    }
                }
                Err(e) => eprintln!("  {mode}: wrk failed: {e:#}"),
            }
        }
    }
    eprintln!(
        "{mode}: iperf3 {:?}, wrk keep-alive {:?}, wrk close {:?}",
        f.iperf3, f.wrk_keepalive, f.wrk_close
    );
    Ok(f)
}

/// The connection rate at the highest concurrency.
fn top(x: &Figures) -> f64 {
    x.conn_per_s.last().map(|v| v.1).unwrap_or(0.0)
}

/// The row a row is compared with behind the rule set: the same proxy (bare relay or
/// the HBONE path). None for an external proxy.
fn iptables_base(mode: &str) -> Option<&'static str> {
    if mode.starts_with("external") {
        None
    } else if mode.contains("hbone") || mode.contains("quic") {
        Some("iptables+hbone")
    } else {
        Some("iptables")
    }
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b > 0.0 && a > 0.0 => format!("{:.2}x", a / b),
        _ => "–".into(),
    }
}

fn table(rows: &[Figures]) -> String {
    let find = |m: &str| rows.iter().find(|r| r.mode == m);
    let direct = find("direct");
    let external = rows.iter().find(|r| r.mode.starts_with("external"));
    let iperf = rows.iter().any(|r| r.iperf3.is_some());
    let keepalive = rows
        .iter()
        .find_map(|r| r.wrk_keepalive.as_ref().map(|w| w.connections));
    let close = rows
        .iter()
        .find_map(|r| r.wrk_close.as_ref().map(|w| w.connections));
    let dash = || "–".to_string();
    let mut head = vec!["mode".to_string()];
    if let Some(r) = rows.first() {
        head.extend(r.conn_per_s.iter().map(|(c, _)| format!("conn/s c={c}")));
    }
    head.extend(["failed", "> 100 ms"].map(String::from));
    head.extend(["p50 µs", "p99 µs", "p99.9 µs", "Gbit/s", "CPU s/GB"].map(String::from));
    if iperf {
        head.push("iperf3 Gbit/s".into());
    }
    if let Some(c) = keepalive {
        head.push(format!("wrk req/s keep-alive c={c}"));
        head.extend(["wrk p50 µs", "wrk p99 µs"].map(String::from));
    }
    if let Some(c) = close {
        head.push(format!("wrk conn/s c={c}"));
        head.extend(["wrk close errors", "wrk close > 100 ms"].map(String::from));
    }
    head.extend(
        [
            "conn/s vs direct",
            "conn/s vs iptables",
            "Gbit/s vs iptables",
        ]
        .map(String::from),
    );
    if external.is_some() {
        head.extend(["conn/s vs external", "Gbit/s vs external"].map(String::from));
    }
    let mut s = format!(
        "| {} |\n|---|{}\n",
        head.join(" | "),
        "---:|".repeat(head.len() - 1)
    );
    for r in rows {
        let base = iptables_base(&r.mode).and_then(find);
        let mut c = vec![r.mode.clone()];
        c.extend(r.conn_per_s.iter().map(|(_, v)| format!("{v:.0}")));
        c.push(r.conn_failed.to_string());
        c.push(r.conn_slow.to_string());
        c.extend(r.lat_us.iter().map(|v| format!("{v:.1}")));
        c.push(format!("{:.2}", r.gbit_s));
        c.push(format!("{:.2}", r.cpu_s_per_gb));
        if iperf {
            c.push(
                r.iperf3
                    .as_ref()
                    .map_or_else(dash, |x| format!("{:.2}", x.gbit_s)),
            );
        }
        if keepalive.is_some() {
            match &r.wrk_keepalive {
                Some(w) => c.extend([
                    format!("{:.0}", w.req_per_s),
                    format!("{:.1}", w.lat_us[0]),
                    format!("{:.1}", w.lat_us[1]),
                ]),
                None => c.extend([dash(), dash(), dash()]),
            }
        }
        if close.is_some() {
            match &r.wrk_close {
                Some(w) => c.extend([
                    format!("{:.0}", w.req_per_s),
                    w.errors.to_string(),
                    w.slow.to_string(),
                ]),
                None => c.extend([dash(), dash(), dash()]),
            }
        }
        c.push(ratio(top(r), direct.map(top)));
        c.push(ratio(top(r), base.map(top)));
        c.push(ratio(r.gbit_s, base.map(|b| b.gbit_s)));
        if let Some(e) = external {
            c.push(ratio(top(r), Some(top(e))));
            c.push(ratio(r.gbit_s, Some(e.gbit_s)));
        }
        s.push_str(&format!("| {} |\n", c.join(" | ")));
    }
    s
}

/// The tails of short connections, per mode: the slowest connection of the rate phase
/// and wrk's close-mode request latency (p50, p99, p99.9, max), in ms.
fn tails(rows: &[Figures]) -> String {
    let ms = |us: f64| format!("{:.2}", us / 1e3);
    let mut s = String::from(
        "| mode | rate phase max ms | wrk close p50 ms | p99 ms | p99.9 ms | max ms | p99/p50 |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let mut c = vec![r.mode.clone(), format!("{:.2}", r.conn_max_ms)];
        match &r.wrk_close {
            Some(w) => {
                c.extend(w.lat_us.iter().map(|v| ms(*v)));
                c.push(ms(w.max_us));
                c.push(ratio(w.lat_us[1], Some(w.lat_us[0])));
            }
            None => c.extend(std::iter::repeat_n("–".to_string(), 5)),
        }
        s.push_str(&format!("| {} |\n", c.join(" | ")));
    }
    s
}

/// A chart's title and the value it shows per mode (None: not measured).
type Chart = (&'static str, fn(&Figures) -> Option<f64>);

/// Bar charts per mode, one above the other: the connection rate (highest
/// concurrency), throughput, and the tools' figures when measured.
fn svg(rows: &[Figures]) -> String {
    let all: [Chart; 4] = [
        ("new connections/s, highest concurrency", |r| Some(top(r))),
        ("Gbit/s, one stream", |r| Some(r.gbit_s)),
        ("iperf3 Gbit/s, one stream", |r| {
            r.iperf3.as_ref().map(|x| x.gbit_s)
        }),
        ("wrk new connections/s", |r| {
            r.wrk_close.as_ref().map(|w| w.req_per_s)
        }),
    ];
    let charts: Vec<&Chart> = all
        .iter()
        .filter(|(_, v)| rows.iter().any(|r| v(r).is_some()))
        .collect();
    let (ch, bar, step) = (240.0, 40.0, 110.0);
    let w = 40.0 + step * rows.len() as f64;
    let tails = rows.iter().any(|r| r.wrk_close.is_some());
    let h = ch * charts.len() as f64 + if tails { TAIL_CHART_H } else { 0.0 };
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='11'>\n"
    );
    for (i, (title, value)) in charts.iter().enumerate() {
        let y0 = i as f64 * ch;
        let max = rows.iter().filter_map(value).fold(0.0, f64::max).max(1e-9);
        out.push_str(&format!(
            "<text x='20' y='{}' font-size='13'>{title}</text>\n",
            y0 + 20.0
        ));
        for (j, r) in rows.iter().enumerate() {
            let x = 20.0 + j as f64 * step;
            let base = y0 + ch - 30.0;
            out.push_str(&format!(
                "<text x='{x}' y='{}'>{}</text>\n",
                base + 15.0,
                r.mode
            ));
            let Some(v) = value(r) else { continue };
            let bh = (ch - 80.0) * v / max;
            out.push_str(&format!(
                "<rect x='{x}' y='{}' width='{bar}' height='{bh}' fill='#4a7ab0'/><text x='{x}' y='{}'>{}</text>\n",
                base - bh,
                base - bh - 5.0,
                if v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            ));
        }
    }
    if tails {
        out.push_str(&tail_chart(rows, ch * charts.len() as f64, step));
    }
    out.push_str("</svg>\n");
    out
}

const TAIL_CHART_H: f64 = 300.0;

/// One series of the tail chart: its name, colour and value.
type Series = (&'static str, &'static str, fn(&Wrk) -> f64);

/// wrk's close-mode latency per mode, p50, p99, p99.9 and max side by side on a log
/// scale (whole decades), with the 100 ms target marked; drawn from `y0` down.
fn tail_chart(rows: &[Figures], y0: f64, step: f64) -> String {
    let series: [Series; 4] = [
        ("p50", "#9cc3e6", |w| w.lat_us[0]),
        ("p99", "#4a7ab0", |w| w.lat_us[1]),
        ("p99.9", "#1f3f66", |w| w.lat_us[2]),
        ("max", "#c0504d", |w| w.max_us),
    ];
    let values: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.wrk_close.as_ref())
        .flat_map(|w| series.iter().map(move |(_, _, v)| v(w)))
        .filter(|v| *v > 0.0)
        .collect();
    // Decades of µs, covering the values and the 100 ms mark.
    let lo = values
        .iter()
        .fold(f64::MAX, |a, v| a.min(*v))
        .min(1e5)
        .log10()
        .floor();
    let hi = values
        .iter()
        .fold(0.0f64, |a, v| a.max(*v))
        .max(1e5)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let (top, base) = (y0 + 50.0, y0 + TAIL_CHART_H - 40.0);
    let y = |us: f64| base - (base - top) * (us.max(10f64.powf(lo)).log10() - lo) / (hi - lo);
    let right = 20.0 + step * rows.len() as f64;
    let mut out = format!(
        "<text x='20' y='{}' font-size='13'>wrk Connection: close, request latency (log scale): p50, p99, p99.9, max</text>\n",
        y0 + 20.0
    );
    for (k, (name, color, _)) in series.iter().enumerate() {
        let x = 20.0 + 70.0 * k as f64;
        out.push_str(&format!(
            "<rect x='{x}' y='{}' width='10' height='10' fill='{color}'/><text x='{}' y='{}'>{name}</text>\n",
            y0 + 28.0,
            x + 14.0,
            y0 + 37.0
        ));
    }
    let mut d = lo;
    while d <= hi {
        let us = 10f64.powf(d);
        let label = if us >= 1e6 {
            format!("{:.0} s", us / 1e6)
        } else if us >= 1e3 {
            format!("{:.0} ms", us / 1e3)
        } else {
            format!("{us:.0} µs")
        };
        out.push_str(&format!(
            "<line x1='20' x2='{right}' y1='{0}' y2='{0}' stroke='#ddd'/><text x='{1}' y='{2}' fill='#888'>{label}</text>\n",
            y(us),
            right + 2.0,
            y(us) + 4.0
        ));
        d += 1.0;
    }
    out.push_str(&format!(
        "<line x1='20' x2='{right}' y1='{0}' y2='{0}' stroke='#c0504d' stroke-dasharray='4 3'/>\n",
        y(1e5)
    ));
    for (j, r) in rows.iter().enumerate() {
        let x = 20.0 + j as f64 * step;
        out.push_str(&format!(
            "<text x='{x}' y='{}'>{}</text>\n",
            base + 15.0,
            r.mode
        ));
        let Some(w) = &r.wrk_close else { continue };
        for (k, (_, color, v)) in series.iter().enumerate() {
            let top = y(v(w));
            out.push_str(&format!(
                "<rect x='{}' y='{top}' width='18' height='{}' fill='{color}'/>\n",
                x + 20.0 * k as f64,
                base - top
            ));
        }
    }
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
    b: IpAddr,
    plan: &Plan,
    tools: &Tools,
    load: &tokio::runtime::Runtime,
) -> Result<Figures> {
    use redirect_user::agent::{Agent, PodSpec, PodState};
    let base = m.base();
    let dir = PathBuf::from(format!("/tmp/{base}-ext"));
    let _cleanup = (
        RemoveDir::new(dir.clone()),
        RemoveDir::new(format!("/sys/fs/bpf/{base}-ext")),
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
    let mut proxy = redirect_tests::process::Proc::adopt(
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
        let mut f = measure_mode(load, "external", ns_a, &m.ns("b"), b, plan, tools)?;
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

/// A proxy's shared mesh side as cluster.rs builds it: certificates from `ca`, its own
/// registry (pods a and b register as they are enrolled).
fn proxy_mesh(ca: &Arc<LocalCa>, transport: DefaultTransport) -> Arc<ProxyMesh> {
    let tls = Tls::new(ca.clone(), TRUST_DOMAIN);
    ProxyMesh::new(tls, Arc::new(Registry::new()), transport)
}

/// The table's order: bare relay rows, then the mesh data path, then others.
fn rank(mode: &str) -> usize {
    [
        "direct",
        "ebpf",
        "ebpf +500 pods",
        "iptables",
        "ebpf+hbone",
        "ebpf+quic",
        "iptables+hbone",
    ]
    .iter()
    .position(|m| *m == mode)
    .unwrap_or(usize::MAX)
}

fn main() -> Result<()> {
    // RUST_LOG=redirect_user=debug shows the proxies' logs.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let started = Instant::now();
    let quick = std::env::args().any(|a| a == "--quick");
    // MESH_MODES=ebpf+hbone,iptables+hbone: only these rows (all by default).
    let only = std::env::var("MESH_MODES").ok();
    let want = |mode: &str| {
        only.as_ref()
            .is_none_or(|o| o.split(',').any(|m| m.trim() == mode))
    };
    let plan = if quick {
        Plan {
            seconds: 1.5,
            concurrency: vec![1, 8, 32],
            latency_requests: 5_000,
            bulk_bytes: 1 << 30,
            bulk_runs: 1,
            tool_seconds: 2,
            wrk_connections: 32,
        }
    } else {
        Plan {
            seconds: 5.0,
            concurrency: vec![1, 8, 32],
            latency_requests: 20_000,
            bulk_bytes: 2 << 30,
            bulk_runs: 3,
            tool_seconds: 5,
            wrk_connections: 32,
        }
    };
    let mut m = Mesh::new("rmesh", &[("a", 10), ("b", 11)])?;
    // The CA of the HBONE rows and the tools' files; removed at the end, on failure too.
    let dir = std::env::temp_dir().join(format!("{}-mesh", m.base()));
    std::fs::create_dir_all(&dir)?;
    let _dir = RemoveDir::new(dir.clone());
    let ca = Arc::new(LocalCa::open_or_create(&dir.join("ca"))?);
    let tools = Tools::find(dir, &m.host("a").name, &m.host("b").name)?;
    for p in ["a", "b"] {
        tune_for_load(&m.ns(p))?;
    }
    let (ns_a, ns_b, b_ip) = (Arc::new(m.ns("a")), m.ns("b"), m.host("b").addr(false));
    // The proxies run on the fixture's runtime (2 workers: a proxy process of its own,
    // as an external proxy is); the apps of pod b and our load each on another.
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    let (apps, load) = (runtime()?, runtime()?);
    {
        let _g = apps.enter();
        start_servers(&ns_b, b_ip)?;
    }
    // A mode that fails is reported and left out; the others go on.
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    let mut run = |mode: &str, rows: &mut Vec<Figures>| {
        // A row starts without the last row's TIME_WAIT sockets on the proxy ports.
        // The rule set makes them: REDIRECT gives every connection of a pod the
        // same local address (its 15001 or 15006), so a new connection whose source
        // port conntrack rewrote can land on one, be refused by PAWS and wait out a SYN
        // retransmission. iptables+hbone measured right after iptables stalled 19 times
        // in its rate phase, and 0 times alone: the iptables row's stall, not its own.
        let waited = wait_proxy_time_wait(&[&*ns_a, &ns_b], Duration::from_secs(75));
        if !waited.is_zero() {
            eprintln!(
                "{mode}: waited {:.0} s for the last row's TIME_WAIT sockets on the proxy ports",
                waited.as_secs_f64()
            );
        }
        let drops = backlog_drops();
        let result = measure_mode(&load, mode, ns_a.clone(), &ns_b, b_ip, &plan, &tools);
        // Packets the kernel dropped for a full input backlog (any namespace, any
        // cause): a lost SYN there waits 1 s whatever the mode, so a stall is first
        // checked against this.
        eprintln!(
            "{mode}: kernel backlog drops during the row: {}",
            backlog_drops().saturating_sub(drops)
        );
        match result {
            Ok(f) => rows.push(f),
            Err(e) => {
                eprintln!("{mode}: FAILED: {e:#}");
                failed.push(format!("{mode} ({e:#})"));
            }
        }
    };

    if want("direct") {
        run("direct", &mut rows);
    }

    // ebpf first: the netfilter run leaves conntrack and nat hooks registered in the
    // pods (emptied tables stay), which would weigh on whatever runs after it.
    // ebpf: this engine, the same relay.
    for p in ["a", "b"] {
        m.enrol(p, PodOptions::default())?;
    }
    if want("ebpf") {
        run("ebpf", &mut rows);
    }
    if !quick && want("ebpf +500 pods") {
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
        run("ebpf +500 pods", &mut rows);
        for name in &extra {
            m.engine.unenrol(name)?;
        }
    }
    for p in ["a", "b"] {
        m.unenrol(p)?;
    }

    // The full data path behind the engine: QUIC first, as a stopped pod proxy's UDP
    // 15009 endpoint stays open while its idle tunnels do (they never carry QUIC after).
    for (mode, transport) in [
        ("ebpf+quic", DefaultTransport::Quic),
        ("ebpf+hbone", DefaultTransport::Tcp),
    ] {
        if !want(mode) {
            continue;
        }
        let mesh = proxy_mesh(&ca, transport);
        for p in ["a", "b"] {
            m.enrol_mesh(p, PodOptions::default(), &mesh)?;
        }
        run(mode, &mut rows);
        for p in ["a", "b"] {
            m.unenrol(p)?;
        }
    }

    // iptables: the in-pod rules in both pods, the same proxy behind them: the bare
    // relay, then the full data path.
    let v6 = netfilter::rules_v6();
    for (mode, mesh) in [
        ("iptables", None),
        (
            "iptables+hbone",
            Some(proxy_mesh(&ca, DefaultTransport::Tcp)),
        ),
    ] {
        if !want(mode) {
            continue;
        }
        let mut relays = Vec::new();
        for p in ["a", "b"] {
            netfilter::enrol(&m.ns(p), &v6)?;
            let l = PodListeners::open(&m.ns(p), false)?;
            let _g = m.rt.enter();
            relays.push(match &mesh {
                None => Relay::start(p, m.ns(p), l, None)?,
                Some(mesh) => {
                    let pod = mesh.pod(m.workload(p), m.ns(p))?;
                    Relay::start_mesh(p, m.ns(p), l, None, pod)?
                }
            });
        }
        run(mode, &mut rows);
        for r in relays.drain(..) {
            m.rt.block_on(r.stop());
        }
        for p in ["a", "b"] {
            if let Some(mesh) = &mesh {
                mesh.forget(p);
            }
            netfilter::unenrol(&m.ns(p))?;
        }
    }

    // external: a proxy binary the user built, under our agent and engine.
    if let Ok(bin) = std::env::var("EXTERNAL_PROXY")
        && want("external")
    {
        match external(&m, &bin, ns_a.clone(), b_ip, &plan, &tools, &load) {
            Ok(f) => rows.push(f),
            Err(e) => {
                eprintln!("external: FAILED: {e:#}");
                failed.push(format!("external ({e:#})"));
            }
        }
    }
    rows.sort_by_key(|r| rank(&r.mode));

    let md = format!(
        "{}\nShort connections' tails: the slowest connection of the rate phase, and wrk's request latency with `Connection: close`.\n\n{}",
        table(&rows),
        tails(&rows)
    );
    let failures = if failed.is_empty() {
        String::new()
    } else {
        format!("Failed, left out: {}.\n\n", failed.join("; "))
    };
    let header = format!(
        "Pods a -> b on one node, IPv4. ebpf and iptables: the same proxy behind this engine or the in-pod rule set, as a bare TCP relay (redirection alone) or as the full data path (+hbone: HBONE, mutual TLS and HTTP/2 CONNECT, a's 15001 -> b's 15008; +quic: our QUIC transport); external: the given proxy under our agent and engine. The `vs iptables` ratios of the +hbone and +quic rows are against iptables+hbone. Our load: {} s per rate point{}{}.\n\n",
        plan.seconds,
        if tools.iperf3 || tools.wrk {
            format!(
                "; iperf3 and wrk (one thread): {} s per run",
                plan.tool_seconds
            )
        } else {
            String::new()
        },
        if quick { " (--quick)" } else { "" }
    );
    let header = format!("{header}{failures}");
    println!("{header}{md}");
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("mesh.md"), format!("{header}{md}"))?;
    std::fs::write(
        out_dir.join("mesh.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    std::fs::write(out_dir.join("mesh.svg"), svg(&rows))?;
    eprintln!("mesh bench: {:.0} s", started.elapsed().as_secs_f64());
    anyhow::ensure!(failed.is_empty(), "failed: {}", failed.join("; "));
    Ok(())
}

/// Whether `ns` holds a TIME_WAIT socket whose local port is a proxy port: mostly an accepted
/// socket of a proxy behind REDIRECT that closed first (under sk_lookup an accepted
/// socket keeps the original destination as its local address; only tunnels to 15008
/// can leave one there).
fn has_proxy_time_wait(ns: &Netns) -> bool {
    const TCP_TIME_WAIT: u8 = 6;
    let ports = [
        redirect_ebpf::PORT_OUTBOUND,
        redirect_ebpf::PORT_INBOUND,
        redirect_ebpf::PORT_TUNNEL,
    ];
    ns.run(|| {
        ["tcp", "tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).ok())
            .flat_map(|t| redirect_user::agent::discover::parse_socket_table(&t))
            .any(|(port, state, _)| state == TCP_TIME_WAIT && ports.contains(&port))
    })
    .unwrap_or(false)
}

/// Waits, at most `limit`, until the namespaces hold no TIME_WAIT socket on a proxy
/// port; returns how long it waited (zero when there was none).
fn wait_proxy_time_wait(namespaces: &[&Netns], limit: Duration) -> Duration {
    let any = || namespaces.iter().any(|ns| has_proxy_time_wait(ns));
    if !any() {
        return Duration::ZERO;
    }
    let t = Instant::now();
    while t.elapsed() < limit && any() {
        std::thread::sleep(Duration::from_millis(500));
    }
    t.elapsed()
}

/// Packets dropped so far because a CPU's input backlog was full (`netdev_max_backlog`):
/// the second column of `/proc/net/softnet_stat`, summed over the CPUs.
fn backlog_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|d| u64::from_str_radix(d, 16).ok())
        .sum()
}
