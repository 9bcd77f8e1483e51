//! What the agent counts as it works: enrolment durations and the CNI plugin's requests
//! by result. Everything else the metrics show (pods by state, proxies connected, the
//! engine's per-pod counters) is read from the agent's own state at scrape time.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CniLabels {
    /// `add` (DEL and CHECK never reach the agent).
    pub r#type: &'static str,
    /// `enrolled`, `not_in_mesh`, `refused`, `busy`, `bad_request`.
    pub result: &'static str,
}

#[derive(Debug)]
pub struct AgentMetrics {
    /// Seconds an enrolment with the engine took (namespace work, maps, link).
    pub enrol_seconds: Histogram,
    pub cni_requests: Family<CniLabels, Counter>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            // 100 µs to ~1.6 s.
            enrol_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            cni_requests: Family::default(),
        }
    }
}

impl AgentMetrics {
    /// One CNI ADD answered with `result`.
    pub fn cni_request(&self, result: &'static str) {
        self.cni_requests
            .get_or_create(&CniLabels {
                r#type: "add",
                result,
            })
            .inc();
    }

    /// Adds these metrics to `r` (shared, not copied).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "redirect_agent_enrolment_duration_seconds",
            "Time an enrolment with the engine took",
            self.enrol_seconds.clone(),
        );
        r.register(
            "istio_cni_plugin_requests",
            "CNI plugin requests answered by the agent, by result",
            self.cni_requests.clone(),
        );
    }
}
