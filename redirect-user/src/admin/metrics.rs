//! The metrics read at scrape time from the state the parts own: the engine's per-pod
//! counters (from the same report `status` prints), pods by state, proxies connected,
//! the watch's sync and the CNI installation.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use redirect_ebpf::PodCounters;

use crate::{
    agent::{Agent, PodState, control},
    k8s::KubeWatch,
};

/// Label pairs of one sample.
type Labels = Vec<(&'static str, String)>;

/// One family being built: name, help, samples.
type Family = (String, &'static str, Vec<(Labels, u64)>);

/// The engine's counters by metric: (name, help, label, [(label value, value)]).
type Rows = [(
    &'static str,
    &'static str,
    &'static str,
    Vec<(&'static str, u64)>,
); 3];

/// The engine's counters grouped into three families with a label for the kind.
pub fn counter_rows(c: &PodCounters) -> Rows {
    [
        (
            "redirected_connections",
            "New connections steered to a proxy listener, by listener port",
            "listener",
            vec![
                ("15001", c.redirected_15001),
                ("15006", c.redirected_15006),
                ("15008", c.redirected_15008),
                ("15053", c.redirected_15053),
            ],
        ),
        (
            "bypassed_connections",
            "Connections left alone, by reason",
            "reason",
            vec![
                ("probe", c.bypassed_probe),
                ("loopback", c.bypassed_loopback),
                ("proxy", c.bypassed_proxy),
            ],
        ),
        (
            "dropped",
            "Connections or packets dropped (fail closed), by reason",
            "reason",
            vec![
                ("no_listener", c.dropped_no_listener),
                ("spoofed", c.dropped_spoofed),
                ("error", c.dropped_error),
                ("unparsable", c.dropped_unparsable),
                ("unknown_dst", c.dropped_unknown_dst),
            ],
        ),
    ]
}

/// The label value of a pod state.
pub fn state_name(s: &PodState) -> &'static str {
    match s {
        PodState::WaitingForProxy => "waiting_for_proxy",
        PodState::ProxyRefused(_) => "proxy_refused",
        PodState::FindingListeners => "finding_listeners",
        PodState::Ready => "ready",
        PodState::Releasing(_) => "releasing",
    }
}

const STATES: [&str; 5] = [
    "waiting_for_proxy",
    "proxy_refused",
    "finding_listeners",
    "ready",
    "releasing",
];

/// Collects, on each scrape, what the agent, the engine and the watch hold.
pub struct StateCollector {
    pub agent: Option<Agent>,
    pub kube: Option<Arc<KubeWatch>>,
    pub cni_installed: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(agent) = &self.agent {
            let report = control::report(agent);
            let pods = report.pods.unwrap_or_default();
            // Per pod, three families labelled pod and namespace.
            let mut families: Vec<Family> = Vec::new();
            for p in &pods {
                let Some(c) = &p.counters else { continue };
                for (i, (name, help, key, values)) in counter_rows(c).into_iter().enumerate() {
                    if families.len() <= i {
                        families.push((format!("redirect_pod_{name}"), help, Vec::new()));
                    }
                    for (v, n) in values {
                        families[i].2.push((
                            vec![
                                ("pod", p.status.spec.name.clone()),
                                ("namespace", p.status.spec.namespace.clone()),
                                (key, v.to_string()),
                            ],
                            n,
                        ));
                    }
                }
            }
            for (name, help, rows) in &families {
                counter(&mut e, name, help, rows)?;
            }
            // What no pod could be charged with (slot 0).
            if let Ok(c) = agent.engine().node_counters() {
                for (name, help, key, values) in counter_rows(&c) {
                    let rows: Vec<_> = values
                        .into_iter()
                        .map(|(v, n)| (vec![(key, v.to_string())], n))
                        .collect();
                    counter(&mut e, &format!("redirect_node_{name}"), help, &rows)?;
                }
            }
            let rows: Vec<_> = STATES
                .iter()
                .map(|s| {
                    let n = pods
                        .iter()
                        .filter(|p| state_name(&p.status.state) == *s)
                        .count();
                    (vec![("state", s.to_string())], n as i64)
                })
                .collect();
            gauge(
                &mut e,
                "redirect_agent_pods",
                "The agent's pods by state",
                &rows,
            )?;
            let proxies = report.proxies.unwrap_or_default().len() as i64;
            gauge(
                &mut e,
                "ztunnel_connected",
                "Proxies connected to the agent over the node-agent protocol",
                &[(Vec::new(), proxies)],
            )?;
        }
        if let Some(k) = &self.kube {
            let s = k.status();
            gauge(
                &mut e,
                "redirect_k8s_synced",
                "Pods and namespaces listed from the API at least once",
                &[(Vec::new(), i64::from(s.pods_synced && s.namespaces_synced))],
            )?;
            gauge(
                &mut e,
                "redirect_k8s_pods",
                "Pods of this node in the watch's store",
                &[(Vec::new(), s.pods as i64)],
            )?;
        }
        if let Some(c) = &self.cni_installed {
            gauge(
                &mut e,
                "istio_cni_install_ready",
                "Whether the CNI plugin and its configuration are in place",
                &[(Vec::new(), i64::from(c.load(Ordering::Relaxed)))],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_engine_counter_has_a_row() {
        // Each field set to a distinct value: each appears exactly once.
        let c = PodCounters {
            redirected_15001: 1,
            redirected_15006: 2,
            redirected_15008: 3,
            redirected_15053: 4,
            bypassed_probe: 5,
            bypassed_loopback: 6,
            bypassed_proxy: 7,
            dropped_no_listener: 8,
            dropped_spoofed: 9,
            dropped_error: 10,
            dropped_unparsable: 11,
            dropped_unknown_dst: 12,
        };
        let mut all: Vec<u64> = counter_rows(&c)
            .into_iter()
            .flat_map(|(_, _, _, v)| v.into_iter().map(|(_, n)| n))
            .collect();
        all.sort();
        assert_eq!(all, (1..=12).collect::<Vec<_>>());
    }
}
