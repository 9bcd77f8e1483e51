//! Enrolment cost, side by side in one run on the same namespaces: the engine's
//! `enrol` against what the netfilter design does per pod (the in-pod rule set of
//! inpod-rules.md applied with `iptables-restore` and `ip6tables-restore`, plus the
//! return-routing rule and routes). Run by `cargo xtask bench`.
//!
//! Output: a table on stdout, `target/bench/enrol.md` and `target/bench/enrol.json`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;
use redirect_tests::*;

fn settle(pods: usize) -> Duration {
    Duration::from_millis(200 + 4 * pods as u64)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

struct Row {
    pods: usize,
    ebpf: Vec<Duration>,
    ebpf_total: Duration,
    ipt: Vec<Duration>,
    ipt_total: Duration,
    rss_per_pod_kib: f64,
}

fn measure(pods: usize) -> Result<Row> {
    let mut topo = Topology::new("rbench")?;
    for i in 0..pods {
        topo.add_host(&format!("p{i}"), 10 + i as u16)?;
    }
    let pin = format!("/sys/fs/bpf/rbench-{}-{pods}", std::process::id());
    // Removed below, and on SIGINT/SIGTERM.
    let _pin = redirect_tests::process::RemoveDir::new(&pin);
    let engine = Engine::open(EngineConfig::at(&pin))?;
    let nss: Vec<Netns> = (0..pods)
        .map(|i| topo.host(&format!("p{i}")).netns())
        .collect::<Result<_>>()?;
    let listeners: Vec<PodListeners> = nss
        .iter()
        .map(|ns| PodListeners::open(ns, false))
        .collect::<Result<_, _>>()?;

    // Creating hundreds of namespaces leaves the kernel busy for a while (IPv6 address
    // configuration among others); both sides are measured once it has settled.
    std::thread::sleep(settle(pods));
    let mut ebpf = Vec::with_capacity(pods);
    let all = Instant::now();
    for (i, (ns, l)) in nss.iter().zip(&listeners).enumerate() {
        let t = Instant::now();
        engine.enrol(&format!("p{i}"), ns, &PodOptions::default(), &l.sockets())?;
        ebpf.push(t.elapsed());
    }
    let ebpf_total = all.elapsed();
    for i in 0..pods {
        engine.unenrol(&format!("p{i}"))?;
    }
    drop(listeners);
    let rss_per_pod_kib = agent_rss_per_pod(&topo, pods)?;

    let v6 = netfilter::rules_v6();
    let mut ipt = Vec::with_capacity(pods);
    let all = Instant::now();
    for ns in &nss {
        let t = Instant::now();
        netfilter::enrol(ns, &v6)?;
        ipt.push(t.elapsed());
    }
    let ipt_total = all.elapsed();
    for ns in &nss {
        netfilter::unenrol(ns)?;
    }
    drop(engine);
    let _ = std::fs::remove_dir_all(&pin);
    ebpf.sort();
    ipt.sort();
    Ok(Row {
        pods,
        ebpf,
        ebpf_total,
        ipt,
        ipt_total,
        rss_per_pod_kib,
    })
}

/// The memory a real node agent process (`redirect-user node-agent`, no proxy
/// connected) holds per enrolled pod: its resident set before and after `pod add` of
/// every pod through the control socket, divided by the pods. The pods are deleted
/// again through the agent.
fn agent_rss_per_pod(topo: &Topology, pods: usize) -> Result<f64> {
    use redirect_tests::process::{Proc, RemoveDir, cli, pod_add, wait_for};
    let base = format!("rbench-agent-{}-{pods}", std::process::id());
    let dir = std::env::temp_dir().join(&base);
    let pin = format!("/sys/fs/bpf/{base}");
    let _cleanup = (RemoveDir::new(dir.clone()), RemoveDir::new(pin.clone()));
    let d = dir.to_string_lossy().into_owned();
    let agent = Proc::node_agent(&dir, &pin, &dir.join("agent.log"));
    wait_for("agent control socket", 15, || {
        dir.join("control.sock").exists()
    });
    let pid = agent.pid().to_string();
    let before = rss_kib(&pid);
    for i in 0..pods {
        pod_add(&d, &topo.host(&format!("p{i}")).path(), &format!("p{i}"))?;
    }
    let after = rss_kib(&pid);
    for i in 0..pods {
        cli(&[
            "pod",
            "del",
            "--state-dir",
            &d,
            "--uid",
            &format!("uid-p{i}"),
        ])?;
    }
    drop(agent);
    Ok(after.saturating_sub(before) as f64 / pods as f64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    // RUST_LOG=redirect_user=debug shows each enrolment's steps.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[usize] = if quick { &[1, 100] } else { &[1, 100, 500] };
    let out_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let mut md = String::from(
        "| pods | eBPF p50 (ms) | eBPF p99 (ms) | eBPF total (ms) | iptables p50 (ms) | iptables p99 (ms) | iptables total (ms) | p50 ratio | agent RSS per pod (KiB)¹ |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut json = Vec::new();
    for &n in sizes {
        let r = measure(n)?;
        let (e50, e99, i50, i99) = (
            pct(&r.ebpf, 0.5),
            pct(&r.ebpf, 0.99),
            pct(&r.ipt, 0.5),
            pct(&r.ipt, 0.99),
        );
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} | {:.1} | {:.1}x | {:.1} |\n",
            r.pods,
            ms(e50),
            ms(e99),
            ms(r.ebpf_total),
            ms(i50),
            ms(i99),
            ms(r.ipt_total),
            ms(i50) / ms(e50),
            r.rss_per_pod_kib
        ));
        json.push(serde_json::json!({
            "pods": r.pods,
            "ebpf_ms": {"p50": ms(e50), "p99": ms(e99), "total": ms(r.ebpf_total)},
            "iptables_ms": {"p50": ms(i50), "p99": ms(i99), "total": ms(r.ipt_total)},
            "agent_rss_per_pod_kib": r.rss_per_pod_kib,
        }));
    }
    let ipt = Command::new("iptables-restore").arg("--version").output()?;
    let header = format!(
        "Enrolment per pod, one pod after another in fresh namespaces. eBPF: `Engine::enrol` \
         (maps, sk_lookup link, rule and routes, tc filters). iptables: the in-pod rule set \
         with `{}` and ip6tables-restore, plus the rule and routes over netlink.\n\n",
        String::from_utf8_lossy(&ipt.stdout).trim()
    );
    md.push_str(
        "\n¹ resident memory of a `redirect-user node-agent` process (no proxy connected) \
         after `pod add` of every pod, minus before, per pod.\n",
    );
    println!("{header}{md}");
    std::fs::write(out_dir.join("enrol.md"), format!("{header}{md}"))?;
    std::fs::write(
        out_dir.join("enrol.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}
