//! The proxy side of the node-agent protocol as a pure state machine: what to do with
//! each message, given the pods the proxy serves. No sockets, no namespaces: the driver
//! performs the decisions (start, replace, drain a pod proxy) and reports back.
//!
//! Rules (zds.md): an Add for a pod already served from the same namespace is a no-op;
//! from another namespace it replaces the pod proxy. Keep and Add during a snapshot name
//! the pods to keep; SnapshotSent drains every other one. Keep after the snapshot and a
//! second SnapshotSent are protocol errors. Del drains at once. Pod proxies keep running
//! while the agent is away; a new connection starts a new snapshot. Ready once a snapshot
//! arrived and no pod is pending.

use std::collections::{BTreeMap, BTreeSet};

use super::proto::WorkloadInfo;

/// A network namespace as (device, inode): the same namespace whatever fd carried it.
pub type NetnsId = (u64, u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodStatus {
    Running,
    /// Its listeners could not start; retried by the driver.
    Pending {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEntry {
    pub netns: NetnsId,
    pub info: WorkloadInfo,
    pub status: PodStatus,
}

/// What the driver must do for an Add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddPlan {
    /// Same pod, same namespace, running: acknowledge, nothing else.
    AlreadyRunning,
    /// Start a pod proxy in the namespace.
    Start,
    /// Drain the pod proxy in the old namespace, then start one in the new.
    Replace,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("keep of {uid:?} after the snapshot")]
    KeepAfterSnapshot { uid: String },
    #[error("second snapshot sent on one connection")]
    SecondSnapshot,
    #[error("message before the connection started")]
    NotConnected,
}

#[derive(Debug, Default)]
pub struct ProxyState {
    pods: BTreeMap<String, PodEntry>,
    /// Pods named by the snapshot under way; `None` once it is complete (or before any
    /// connection).
    snapshot: Option<BTreeSet<String>>,
    connected: bool,
    snapshot_received: bool,
}

impl ProxyState {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new connection to the agent: a new snapshot follows.
    pub fn connected(&mut self) {
        self.connected = true;
        self.snapshot = Some(BTreeSet::new());
    }

    /// The agent went away: pod proxies keep running.
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.snapshot = None;
    }

    pub fn on_add(&mut self, uid: &str, netns: NetnsId) -> Result<AddPlan, ProtocolError> {
        if !self.connected {
            return Err(ProtocolError::NotConnected);
        }
        if let Some(seen) = &mut self.snapshot {
            seen.insert(uid.to_string());
        }
        Ok(match self.pods.get(uid) {
            Some(p) if p.netns == netns && p.status == PodStatus::Running => {
                AddPlan::AlreadyRunning
            }
            Some(p) if p.netns == netns => AddPlan::Start,
            Some(_) => AddPlan::Replace,
            None => AddPlan::Start,
        })
    }

    /// The driver started the pod proxy.
    pub fn started(&mut self, uid: &str, netns: NetnsId, info: WorkloadInfo) {
        self.pods.insert(
            uid.into(),
            PodEntry {
                netns,
                info,
                status: PodStatus::Running,
            },
        );
    }

    /// The driver could not start the pod proxy: it stays pending and is retried.
    pub fn failed(&mut self, uid: &str, netns: NetnsId, info: WorkloadInfo, reason: String) {
        self.pods.insert(
            uid.into(),
            PodEntry {
                netns,
                info,
                status: PodStatus::Pending { reason },
            },
        );
    }

    pub fn on_keep(&mut self, uid: &str) -> Result<(), ProtocolError> {
        match &mut self.snapshot {
            Some(seen) => {
                seen.insert(uid.to_string());
                Ok(())
            }
            None if !self.connected => Err(ProtocolError::NotConnected),
            None => Err(ProtocolError::KeepAfterSnapshot { uid: uid.into() }),
        }
    }

    /// Returns the entry to drain, if the pod was known.
    pub fn on_del(&mut self, uid: &str) -> Option<PodEntry> {
        if let Some(seen) = &mut self.snapshot {
            seen.remove(uid);
        }
        self.pods.remove(uid)
    }

    /// Completes the snapshot: returns the pods to drain (served, but not named).
    pub fn on_snapshot_sent(&mut self) -> Result<Vec<String>, ProtocolError> {
        if !self.connected {
            return Err(ProtocolError::NotConnected);
        }
        let seen = self.snapshot.take().ok_or(ProtocolError::SecondSnapshot)?;
        let drain: Vec<String> = self
            .pods
            .keys()
            .filter(|u| !seen.contains(*u))
            .cloned()
            .collect();
        for u in &drain {
            self.pods.remove(u);
        }
        self.snapshot_received = true;
        Ok(drain)
    }

    /// Pods whose start failed, to retry.
    pub fn pending(&self) -> Vec<(String, PodEntry)> {
        self.pods
            .iter()
            .filter(|(_, p)| matches!(p.status, PodStatus::Pending { .. }))
            .map(|(u, p)| (u.clone(), p.clone()))
            .collect()
    }

    pub fn pods(&self) -> &BTreeMap<String, PodEntry> {
        &self.pods
    }

    /// Derived, never set: a snapshot arrived and nothing is pending.
    pub fn ready(&self) -> bool {
        self.snapshot_received && self.pending().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS1: NetnsId = (4, 100);
    const NS2: NetnsId = (4, 200);

    fn info(n: &str) -> WorkloadInfo {
        WorkloadInfo {
            name: n.into(),
            namespace: "default".into(),
            service_account: "sa".into(),
        }
    }

    fn add(s: &mut ProxyState, uid: &str, ns: NetnsId) -> AddPlan {
        let plan = s.on_add(uid, ns).unwrap();
        if plan != AddPlan::AlreadyRunning {
            s.started(uid, ns, info(uid));
        }
        plan
    }

    #[test]
    fn a_snapshot_keeps_what_it_names_and_drains_the_rest() {
        let mut s = ProxyState::new();
        s.connected();
        add(&mut s, "a", NS1);
        add(&mut s, "b", NS2);
        add(&mut s, "c", (4, 300));
        assert_eq!(s.on_snapshot_sent().unwrap(), Vec::<String>::new());
        assert!(s.ready());
        // The agent restarts: its new snapshot names a (Add) and b (Keep), not c.
        s.disconnected();
        assert_eq!(
            s.pods().len(),
            3,
            "pod proxies run on while the agent is away"
        );
        s.connected();
        assert_eq!(s.on_add("a", NS1).unwrap(), AddPlan::AlreadyRunning);
        s.on_keep("b").unwrap();
        assert_eq!(s.on_snapshot_sent().unwrap(), vec!["c".to_string()]);
        assert_eq!(s.pods().keys().cloned().collect::<Vec<_>>(), vec!["a", "b"]);
    }

    #[test]
    fn add_is_idempotent_and_a_new_namespace_replaces() {
        let mut s = ProxyState::new();
        s.connected();
        assert_eq!(add(&mut s, "a", NS1), AddPlan::Start);
        assert_eq!(add(&mut s, "a", NS1), AddPlan::AlreadyRunning);
        assert_eq!(add(&mut s, "a", NS2), AddPlan::Replace);
        assert_eq!(s.pods()["a"].netns, NS2);
    }

    #[test]
    fn keep_after_the_snapshot_and_a_second_snapshot_are_errors() {
        let mut s = ProxyState::new();
        s.connected();
        s.on_snapshot_sent().unwrap();
        assert_eq!(
            s.on_keep("a"),
            Err(ProtocolError::KeepAfterSnapshot { uid: "a".into() })
        );
        assert_eq!(s.on_snapshot_sent(), Err(ProtocolError::SecondSnapshot));
        // Neither error changes what is served.
        assert!(s.pods().is_empty());
        assert!(s.ready());
    }

    #[test]
    fn messages_without_a_connection_are_refused() {
        let mut s = ProxyState::new();
        assert_eq!(s.on_add("a", NS1), Err(ProtocolError::NotConnected));
        assert_eq!(s.on_keep("a"), Err(ProtocolError::NotConnected));
        assert_eq!(s.on_snapshot_sent(), Err(ProtocolError::NotConnected));
    }

    #[test]
    fn del_drains_known_pods_and_ignores_unknown_ones() {
        let mut s = ProxyState::new();
        s.connected();
        add(&mut s, "a", NS1);
        s.on_snapshot_sent().unwrap();
        assert_eq!(s.on_del("a").map(|p| p.netns), Some(NS1));
        assert_eq!(s.on_del("a"), None);
        assert_eq!(s.on_del("never"), None);
        assert!(s.pods().is_empty());
    }

    #[test]
    fn a_pod_that_failed_to_start_is_pending_until_it_starts() {
        let mut s = ProxyState::new();
        s.connected();
        assert_eq!(s.on_add("a", NS1).unwrap(), AddPlan::Start);
        s.failed("a", NS1, info("a"), "address in use".into());
        s.on_snapshot_sent().unwrap();
        assert!(!s.ready(), "not ready while a pod is pending");
        assert_eq!(s.pending().len(), 1);
        // A new Add for it (or the retry) starts it.
        assert_eq!(s.on_add("a", NS1).unwrap(), AddPlan::Start);
        s.started("a", NS1, info("a"));
        assert!(s.ready());
    }

    #[test]
    fn not_ready_before_the_first_snapshot() {
        let mut s = ProxyState::new();
        assert!(!s.ready());
        s.connected();
        add(&mut s, "a", NS1);
        assert!(!s.ready());
        s.on_snapshot_sent().unwrap();
        assert!(s.ready());
        s.disconnected();
        assert!(s.ready(), "stays ready while the agent is away");
    }

    #[test]
    fn del_during_a_snapshot_unnames_the_pod() {
        let mut s = ProxyState::new();
        s.connected();
        add(&mut s, "a", NS1);
        s.on_del("a");
        assert_eq!(s.on_snapshot_sent().unwrap(), Vec::<String>::new());
        assert!(s.pods().is_empty());
    }
}
