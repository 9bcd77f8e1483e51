//! Soak: the real agent process (`redirect-user run`: node agent and proxy in one) with
//! pods enrolled and released through its control socket in a loop, for N minutes,
//! under traffic: every pod's app talks to an outside peer and to a steady pod of the
//! mesh all along, and the steady pod's app opens short connections as fast as it can,
//! so the `flows` notes fill up. At the end, with every cycling pod released and the
//! traffic stopped, the agent's memory and open fds, the engine's map entries (but for
//! the notes, which are LRU maps that stay full by design), its pinned links, and the
//! pods' routes, rules, qdiscs and tc filters must be back where they were at the start;
//! and a pod's release must cost no more with the notes full than with them empty
//! (median of the last tenth of the releases at most 2x the first tenth's, give or take
//! 1 ms of noise). Run by `cargo xtask soak --minutes N`.
//!
//! Output: a summary on stdout, `target/bench/soak.{md,json}`; exit status 1 when
//! something did not come back or release cost grew.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use redirect_tests::{
    process::{Proc, RemoveDir, wait_for},
    *,
};
use redirect_user::agent::{
    PodSpec,
    control::{ControlRequest, request},
};

/// Pods enrolled and released in turn.
const CYCLING: usize = 6;
/// The outside peer listens on these ports (many ports: more distinct 5-tuples for
/// the notes than one port's ephemeral range gives).
const PEER_PORTS: [u16; 2] = [PEER_PORT, PEER_PORT + 1];
/// RSS growth tolerated between start and end (allocator arenas, lazily grown pools).
const RSS_SLACK_KIB: u64 = 8 * 1024;
/// Release cost: the last tenth's median may exceed 2x the first tenth's by this
/// much (scheduling noise on a busy machine).
const RELEASE_NOISE_MS: f64 = 1.0;

/// One look at the agent and the kernel state.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct Sample {
    rss_kib: u64,
    fds: usize,
    /// The agent's fds by kind (socket, anon_inode:bpf-map, a path…).
    fd_kinds: BTreeMap<String, usize>,
    /// Entries per pinned map (the note maps left out).
    maps: BTreeMap<String, usize>,
    links: usize,
    /// Per pod: routes (all tables), rules, qdiscs and tc filters, as `ip`/`tc` print them.
    pods: BTreeMap<String, String>,
    /// The agent's sockets as `ss` shows them in each namespace of the topology and the
    /// host's, to name the ones an fd count difference is made of.
    #[serde(skip)]
    sockets: Vec<String>,
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn fd_kinds(pid: i32) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let t = std::fs::read_link(e.path())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kind = if t.starts_with("socket:") {
            "socket".to_string()
        } else {
            t
        };
        *out.entry(kind).or_default() += 1;
    }
    out
}

fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The LRU note maps: full by design once traffic ran, not state of any pod.
const NOTE_MAPS: [&str; 3] = ["flows", "proxy_flows", "host_flows"];

fn map_entries(pin: &Path) -> Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(pin.join("maps"))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if NOTE_MAPS.contains(&name.as_str()) || name == "AYA_LOGS" {
            continue;
        }
        let path = pin.join("maps").join(&name);
        // Socket storage (`steered`) cannot be dumped: it goes with its sockets.
        let Ok(dump) = bpftool_json(&["map", "dump", "pinned", path.to_str().unwrap()]) else {
            continue;
        };
        out.insert(name, dump.as_array().map_or(0, Vec::len));
    }
    Ok(out)
}

/// Entries of the `flows` notes map (65,536 at most), read through its pin.
fn flows_fill(pin: &Path) -> Result<usize> {
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(pin.join("maps/flows")).context("opening the flows map")?;
    let map: HashMap<_, redirect_ebpf::FlowKey, redirect_ebpf::FlowVal> =
        HashMap::try_from(Map::LruHashMap(data))?;
    Ok(map.keys().filter(Result::is_ok).count())
}

fn files_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                files_under(&e.path())
            } else {
                1
            }
        })
        .sum()
}

fn pod_state(ns: &str) -> String {
    let mut s = String::new();
    for args in [
        &["route", "show", "table", "all"][..],
        &["-6", "route", "show", "table", "all"],
        &["rule"],
        &["-6", "rule"],
    ] {
        s += &ip_out(ns, args);
    }
    s += &tc_out(ns, &["qdisc", "show"]);
    for dev in ["eth0", "lo"] {
        for dir in ["ingress", "egress"] {
            s += &tc_out(ns, &["filter", "show", "dev", dev, dir]);
        }
    }
    s
}

/// `ss -anp` in every namespace of the topology (and the host's), the agent's lines
/// only, each prefixed with its namespace.
fn agent_sockets(agent: i32, topo: &Topology, pods: &[String]) -> Vec<String> {
    let who = format!("pid={agent},");
    let spaces = pods
        .iter()
        .map(|p| Some(topo.host(p).name.clone()))
        .chain([Some(topo.node().to_string()), None]);
    let mut out = Vec::new();
    for ns in spaces {
        let ss = ["ss", "-anp", "-A", "inet,unix,netlink,packet"];
        let mut cmd = match &ns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).args(ss);
                c
            }
            None => {
                let mut c = std::process::Command::new(ss[0]);
                c.args(&ss[1..]);
                c
            }
        };
        let Ok(o) = cmd.output() else { continue };
        let place = ns.as_deref().unwrap_or("host");
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains(&who))
                .map(|l| {
                    format!(
                        "{place}: {}",
                        l.split_whitespace().collect::<Vec<_>>().join(" ")
                    )
                }),
        );
    }
    out.sort();
    out
}

/// The lines of `b` not matched by one of `a` (a multiset difference).
fn extra_lines(a: &[String], b: &[String]) -> Vec<String> {
    let mut left: Vec<&String> = a.iter().collect();
    b.iter()
        .filter(|l| match left.iter().position(|x| x == l) {
            Some(i) => {
                left.swap_remove(i);
                false
            }
            None => true,
        })
        .cloned()
        .collect()
}

fn sample(agent: i32, pin: &Path, topo: &Topology, pods: &[String]) -> Result<Sample> {
    Ok(Sample {
        sockets: agent_sockets(agent, topo, pods),
        rss_kib: rss_kib(agent),
        fds: fds(agent),
        fd_kinds: fd_kinds(agent),
        maps: map_entries(pin)?,
        links: files_under(&pin.join("links")),
        pods: pods
            .iter()
            .map(|p| (p.clone(), pod_state(&topo.host(p).name)))
            .collect(),
    })
}

/// The agent, over its control socket.
struct Control {
    rt: tokio::runtime::Runtime,
    socket: PathBuf,
}

impl Control {
    fn call(&self, req: ControlRequest) -> Result<Duration> {
        let t = Instant::now();
        let r = self.rt.block_on(request(&self.socket, &req))?;
        let took = t.elapsed();
        if !r.ok {
            bail!("{req:?}: {}", r.error.unwrap_or_default());
        }
        Ok(took)
    }

    fn add(&self, topo: &Topology, pod: &str) -> Result<Duration> {
        self.call(ControlRequest::Add {
            pod: PodSpec {
                uid: format!("uid-{pod}"),
                name: pod.into(),
                namespace: "default".into(),
                service_account: format!("sa-{pod}"),
                netns: topo.host(pod).path().into(),
                dns_capture: false,
            },
        })
    }

    fn del(&self, pod: &str) -> Result<Duration> {
        self.call(ControlRequest::Del {
            uid: format!("uid-{pod}"),
        })
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Connections from `ns` to `targets` in turn, one at a time with `pause` between,
/// until `stop`.
fn traffic(
    ns: Netns,
    targets: Vec<SocketAddr>,
    pause: Duration,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let to = targets[i % targets.len()];
            i += 1;
            match ask(&ns, to) {
                Ok(a) if !a.is_empty() => tally.ok.fetch_add(1, Ordering::Relaxed),
                _ => tally.failed.fetch_add(1, Ordering::Relaxed),
            };
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    })
}

/// Many short connections want more ports than one TIME_WAIT period frees.
fn tune_for_churn(ns: &Netns) -> Result<()> {
    ns.run(|| -> std::io::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "16000 65535")
    })??;
    Ok(())
}

#[derive(serde::Serialize)]
struct Release {
    /// Seconds since the loop started.
    at_s: f64,
    flows: usize,
    ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Default)]
struct Stats {
    releases: std::sync::Mutex<Vec<Release>>,
    adds: std::sync::Mutex<Vec<f64>>,
    /// (seconds, notes)
    fill_over_time: std::sync::Mutex<Vec<(f64, usize)>>,
    /// (seconds, KiB)
    rss_over_time: std::sync::Mutex<Vec<(f64, u64)>>,
    rounds: AtomicU64,
    apps: Arc<Tally>,
    churn: Arc<Tally>,
}

/// Rounds (every cycling pod added, 0.5 s of traffic, every one released) for `length`
/// under traffic; then the traffic stops and the agent is given time to settle (past
/// the released pods' drain grace, and its fd count steady for 2 s; at most 20 s).
#[allow(clippy::too_many_arguments)]
fn run_rounds(
    topo: &Topology,
    nss: &BTreeMap<String, Netns>,
    control: &Control,
    pin: &Path,
    pid: i32,
    cycling: &[String],
    length: Duration,
    began: Instant,
    stats: &Stats,
) -> Result<()> {
    let (c, s) = (topo.host("c"), topo.host("s"));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for p in cycling {
        let mut targets = Vec::new();
        for v6 in [false, true] {
            targets.push(SocketAddr::new(c.addr(v6), PEER_PORT));
            targets.push(SocketAddr::new(s.addr(v6), APP_PORT));
        }
        threads.push(traffic(
            nss[p].try_clone()?,
            targets,
            Duration::from_millis(20),
            stop.clone(),
            stats.apps.clone(),
        ));
    }
    // The steady pod's short connections fill the notes.
    for _ in 0..2 {
        let targets = PEER_PORTS
            .iter()
            .flat_map(|&port| [false, true].map(|v6| SocketAddr::new(c.addr(v6), port)))
            .collect();
        threads.push(traffic(
            nss["s"].try_clone()?,
            targets,
            Duration::ZERO,
            stop.clone(),
            stats.churn.clone(),
        ));
    }
    let t = Instant::now();
    let result = (|| -> Result<()> {
        while t.elapsed() < length {
            for p in cycling {
                let took = control.add(topo, p)?;
                stats.adds.lock().unwrap().push(took.as_secs_f64() * 1e3);
            }
            // Serve traffic a while, enrolled.
            std::thread::sleep(Duration::from_millis(500));
            let flows = flows_fill(pin)?;
            let now = began.elapsed().as_secs_f64();
            stats.fill_over_time.lock().unwrap().push((now, flows));
            for p in cycling {
                let took = control.del(p)?;
                stats.releases.lock().unwrap().push(Release {
                    at_s: began.elapsed().as_secs_f64(),
                    flows,
                    ms: took.as_secs_f64() * 1e3,
                });
            }
            let rounds = stats.rounds.fetch_add(1, Ordering::Relaxed) + 1;
            if rounds.is_multiple_of(10) {
                let rss = rss_kib(pid);
                stats.rss_over_time.lock().unwrap().push((now, rss));
                println!(
                    "soak: {now:.0} s, {rounds} rounds, {flows} notes, connections: apps {} ok {} failed, churn {} ok {} failed, agent RSS {rss} KiB, {} fds",
                    stats.apps.ok.load(Ordering::Relaxed),
                    stats.apps.failed.load(Ordering::Relaxed),
                    stats.churn.ok.load(Ordering::Relaxed),
                    stats.churn.failed.load(Ordering::Relaxed),
                    fds(pid)
                );
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // Closed connections leave the proxy once both sides' FINs are in; a released pod's
    // connections still open are cancelled at the end of its drain grace, and its
    // namespace, listeners and pooled tunnels go with them: wait that long at least.
    let settle = Instant::now();
    let at_least = redirect_user::proxy::drain::DEFAULT_GRACE + Duration::from_secs(1);
    let (mut last, mut since) = (fds(pid), Instant::now());
    while settle.elapsed() < Duration::from_secs(20)
        && (since.elapsed() < Duration::from_secs(2) || settle.elapsed() < at_least)
    {
        std::thread::sleep(Duration::from_millis(200));
        let n = fds(pid);
        if n != last {
            (last, since) = (n, Instant::now());
        }
    }
    result
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let minutes: f64 = args
        .iter()
        .position(|a| a == "--minutes")
        .and_then(|i| args.get(i + 1))
        .map(|m| m.parse())
        .transpose()
        .context("--minutes N")?
        .unwrap_or(if args.iter().any(|a| a == "--quick") {
            0.5
        } else {
            3.0
        });
    let length = Duration::from_secs_f64(minutes * 60.0);

    let mut topo = Topology::new("rsoak")?;
    topo.add_host("s", 10)?;
    let cycling: Vec<String> = (0..CYCLING).map(|i| format!("p{i}")).collect();
    for (i, p) in cycling.iter().enumerate() {
        topo.add_host(p, 20 + i as u16)?;
    }
    topo.add_host("c", 100)?;
    let mut all_pods = vec!["s".to_string()];
    all_pods.extend(cycling.iter().cloned());
    for name in all_pods.iter().map(String::as_str).chain(["c"]) {
        let h = topo.host(name);
        let ns = h.netns()?;
        for v6 in [false, true] {
            for port in [APP_PORT].into_iter().chain(PEER_PORTS) {
                echo_server(&ns, name, SocketAddr::new(h.addr(v6), port))?;
            }
        }
        tune_for_churn(&ns)?;
    }

    // Opened once: the handles keep the namespaces whatever happens to their names.
    let nss: BTreeMap<String, Netns> = all_pods
        .iter()
        .map(|p| Ok((p.clone(), topo.host(p).netns()?)))
        .collect::<Result<_>>()?;
    let base = topo.prefix().to_string();
    let dir = std::env::temp_dir().join(format!("{base}-soak"));
    let pin = PathBuf::from(format!("/sys/fs/bpf/{base}-soak"));
    std::fs::create_dir_all(&dir)?;
    let _dirs = (RemoveDir::new(&dir), RemoveDir::new(&pin));
    let d = dir.to_str().unwrap();
    let agent = Proc::spawn(
        &[
            "run",
            "--drain-secs",
            "0",
            "--socket",
            &format!("{d}/zds.sock"),
            "--state-dir",
            d,
            "--pin-dir",
            pin.to_str().unwrap(),
            "--admin-addr",
            "off",
            "--metrics-addr",
            "off",
        ],
        &dir.join("agent.log"),
    );
    let pid = agent.pid();
    wait_for("agent control socket", 30, || {
        dir.join("control.sock").exists()
    });
    let control = Control {
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        socket: dir.join("control.sock"),
    };
    let ready = |pod: &str| {
        process::pods_by_uid(d)
            .get(&format!("uid-{pod}"))
            .is_some_and(|p| p["state"]["state"] == "ready")
    };

    // Warm-up: the steady pod stays; every cycling pod once in and out, with traffic.
    control.add(&topo, "s")?;
    wait_for("steady pod ready", 15, || ready("s"));
    let c = topo.host("c");
    let s = topo.host("s");
    for p in &cycling {
        control.add(&topo, p)?;
    }
    wait_for("cycling pods ready", 15, || {
        cycling.iter().all(|p| ready(p))
    });
    for p in &cycling {
        let ns = topo.host(p).netns()?;
        ask(&ns, SocketAddr::new(c.v4.into(), PEER_PORT)).context("warm-up to the peer")?;
        ask(&ns, SocketAddr::new(s.v4.into(), APP_PORT)).context("warm-up to the steady pod")?;
        control.del(p)?;
    }
    let stats = Stats::default();
    let began = Instant::now();
    // Warm-up under traffic (the proxy's pools, the allocator's arenas), then the start
    // is sampled at rest, then the soak proper, then the end at rest.
    let warm = (length / 5).clamp(Duration::from_secs(5), Duration::from_secs(60));
    run_rounds(
        &topo, &nss, &control, &pin, pid, &cycling, warm, began, &stats,
    )?;
    let start = sample(pid, &pin, &topo, &all_pods)?;
    let flows_start = flows_fill(&pin)?;
    println!(
        "soak: {minutes} min, agent pid {pid}, {CYCLING} pods cycling beside a steady one; after {:.0} s of warm-up: RSS {} KiB, {} fds, {} pinned links, {flows_start} notes",
        warm.as_secs_f64(),
        start.rss_kib,
        start.fds,
        start.links
    );
    run_rounds(
        &topo,
        &nss,
        &control,
        &pin,
        pid,
        &cycling,
        length.saturating_sub(warm),
        began,
        &stats,
    )?;
    let end = sample(pid, &pin, &topo, &all_pods)?;
    let flows_end = flows_fill(&pin)?;
    let Stats {
        releases,
        adds,
        fill_over_time,
        rss_over_time,
        rounds,
        apps,
        churn,
    } = stats;
    let releases = releases.into_inner().unwrap();
    let adds = adds.into_inner().unwrap();
    let fill_over_time = fill_over_time.into_inner().unwrap();
    let rss_over_time = rss_over_time.into_inner().unwrap();
    let rounds = rounds.load(Ordering::Relaxed);

    // The verdicts.
    let mut failures = Vec::new();
    if end.fds != start.fds {
        failures.push(format!(
            "agent fds {} -> {}: {:?} -> {:?}\nsockets only at the start: {:#?}\nsockets only at the end: {:#?}",
            start.fds,
            end.fds,
            start.fd_kinds,
            end.fd_kinds,
            extra_lines(&end.sockets, &start.sockets),
            extra_lines(&start.sockets, &end.sockets)
        ));
    }
    if end.rss_kib > start.rss_kib + RSS_SLACK_KIB {
        failures.push(format!(
            "agent RSS {} -> {} KiB (more than {RSS_SLACK_KIB} KiB growth)",
            start.rss_kib, end.rss_kib
        ));
    }
    if end.maps != start.maps {
        failures.push(format!("map entries {:?} -> {:?}", start.maps, end.maps));
    }
    if end.links != start.links {
        failures.push(format!("pinned links {} -> {}", start.links, end.links));
    }
    for (p, before) in &start.pods {
        if end.pods.get(p) != Some(before) {
            failures.push(format!(
                "pod {p}: routes, rules or tc state differ:\n--- start\n{before}--- end\n{}",
                end.pods.get(p).map_or("", String::as_str)
            ));
        }
    }
    let tenth = (releases.len() / 10).max(1);
    let first = median(releases[..tenth].iter().map(|r| r.ms).collect());
    let last = median(
        releases[releases.len() - tenth..]
            .iter()
            .map(|r| r.ms)
            .collect(),
    );
    let (first_fill, last_fill) = (
        median(releases[..tenth].iter().map(|r| r.flows as f64).collect()),
        median(
            releases[releases.len() - tenth..]
                .iter()
                .map(|r| r.flows as f64)
                .collect(),
        ),
    );
    if last > 2.0 * first + RELEASE_NOISE_MS {
        failures.push(format!(
            "release cost grew: median {first:.2} ms with {first_fill:.0} notes, {last:.2} ms with {last_fill:.0}"
        ));
    }
    let (apps_ok, apps_failed, churn_ok, churn_failed) = (
        apps.ok.load(Ordering::Relaxed),
        apps.failed.load(Ordering::Relaxed),
        churn.ok.load(Ordering::Relaxed),
        churn.failed.load(Ordering::Relaxed),
    );
    if churn_ok == 0 || apps_ok == 0 {
        failures.push("no traffic got through".into());
    }

    let map_line = |s: &Sample| {
        s.maps
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let md = format!(
        "Soak of {minutes} min ({rounds} rounds: {CYCLING} pods enrolled, 0.5 s of traffic, released; start sampled after {:.0} s of warm-up), \
         `redirect-user run`, pid {pid}.\n\n\
         | | start | end |\n|---|---:|---:|\n\
         | agent RSS (KiB) | {} | {} |\n\
         | agent open fds | {} | {} |\n\
         | pinned links | {} | {} |\n\
         | map entries (no notes) | {} | {} |\n\
         | `flows` notes | {flows_start} | {flows_end} |\n\
         | pods' routes, rules, qdiscs, tc filters | {} pods | {} |\n\n\
         Releases: {} in all; median {first:.2} ms in the first tenth (median {first_fill:.0} notes), \
         {last:.2} ms in the last tenth ({last_fill:.0} notes); p99 {:.2} ms. Enrolments: median {:.2} ms.\n\n\
         Connections: apps {apps_ok} ok, {apps_failed} failed; short connections filling the notes \
         {churn_ok} ok, {churn_failed} failed.\n\n\
         Verdict: {}\n",
        warm.as_secs_f64(),
        start.rss_kib,
        end.rss_kib,
        start.fds,
        end.fds,
        start.links,
        end.links,
        map_line(&start),
        map_line(&end),
        start.pods.len(),
        if start.pods == end.pods {
            "identical"
        } else {
            "differ"
        },
        releases.len(),
        {
            let mut v: Vec<f64> = releases.iter().map(|r| r.ms).collect();
            v.sort_by(f64::total_cmp);
            v.get(((v.len() as f64 - 1.0) * 0.99).round() as usize)
                .copied()
                .unwrap_or(0.0)
        },
        median(adds.clone()),
        if failures.is_empty() {
            "everything came back; release cost flat.".to_string()
        } else {
            format!("FAILED:\n\n- {}", failures.join("\n- "))
        }
    );
    println!("{md}");
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("soak.md"), &md)?;
    std::fs::write(
        out_dir.join("soak.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "minutes": minutes,
            "rounds": rounds,
            "start": start,
            "end": end,
            "flows": {"start": flows_start, "end": flows_end, "over_time": fill_over_time},
            "rss_kib_over_time": rss_over_time,
            "releases": releases,
            "enrol_ms": adds,
            "connections": {"apps_ok": apps_ok, "apps_failed": apps_failed,
                            "churn_ok": churn_ok, "churn_failed": churn_failed},
            "failures": failures,
        }))?,
    )?;
    drop(agent);
    if !failures.is_empty() {
        // Returned, not exit(): the topology and directories are removed on the way out.
        bail!("the soak failed: {}", failures.len());
    }
    Ok(())
}
