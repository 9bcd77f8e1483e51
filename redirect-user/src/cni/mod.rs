//! The chained CNI plugin and the agent's side of it.
//!
//! - [`plugin`]: the `redirect-cni` binary the container runtime runs last in the node's
//!   plugin chain (blocking, no runtime, no API credentials). On ADD it asks the agent
//!   and fails unless the pod is enrolled and its proxy serves it, so a pod of the mesh
//!   never runs unredirected.
//! - [`server`]: the agent's plugin socket, which answers those requests through
//!   [`Membership`] and [`crate::agent::Agent::add_pod`].
//! - [`install`]: copies the binary into the node's CNI bin directory and keeps our own
//!   configuration (the primary's plugin list with ours appended) ahead of the primary's.
//!
//! The wire between plugin and agent: a Unix stream socket, one JSON request per line
//! ([`PluginRequest`]), one JSON answer per line ([`PluginResponse`]).

pub mod install;
pub mod plugin;
pub mod server;

use std::{collections::BTreeSet, time::Duration};

use serde::{Deserialize, Serialize};

use crate::membership::{CniPod, DecideFuture, Decision, Membership, MembershipError};

/// The plugin socket's file name in the agent's state directory. With the default state
/// directory: `/var/run/redirect/pluginevent.sock`.
pub const SOCKET_NAME: &str = "pluginevent.sock";
/// The plugin socket when the configuration names none.
pub const DEFAULT_SOCKET: &str = "/var/run/redirect/pluginevent.sock";
/// The plugin's binary name (and its `type` in the CNI configuration).
pub const PLUGIN_TYPE: &str = "redirect-cni";
/// Longest request or answer line.
pub const MAX_LINE: usize = 64 * 1024;

/// What the plugin asks the agent. Unknown keys are ignored, so that a plugin binary
/// newer or older than the agent (during an upgrade) still gets an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PluginRequest {
    /// A pod sandbox is being created (CNI ADD): enrol it if it belongs to the mesh.
    Add { pod: CniPod },
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum PluginResponse {
    /// Enrolled, and its proxy serves it: the pod may start.
    Enrolled { uid: String },
    /// Not in the mesh: the plugin passes the pod through untouched.
    NotInMesh { reason: String },
    /// The ADD must fail; `reason` reads "no proxy connected …", "enrolment failed: …",
    /// "bad request: …", "agent busy: …".
    Refused { reason: String },
}

/// Membership without a cluster: the pods of some namespaces are in the mesh, with the
/// service account `default` (`--mesh-namespaces a,b`). For nodes without Kubernetes
/// and for tests.
#[derive(Debug, Clone, Default)]
pub struct StaticMembership {
    namespaces: BTreeSet<String>,
}

impl StaticMembership {
    pub fn new<S: Into<String>>(namespaces: impl IntoIterator<Item = S>) -> Self {
        Self {
            namespaces: namespaces
                .into_iter()
                .map(Into::into)
                .filter(|n: &String| !n.is_empty())
                .collect(),
        }
    }

    fn decide_now(&self, pod: &CniPod) -> Result<Decision, MembershipError> {
        if !self.namespaces.contains(&pod.namespace) {
            return Ok(Decision::NotInMesh(format!(
                "namespace {} is not in --mesh-namespaces",
                pod.namespace
            )));
        }
        if pod.uid.is_empty() {
            return Err(MembershipError::Unavailable(
                "the runtime gave no K8S_POD_UID and there is no cluster to ask".into(),
            ));
        }
        Ok(Decision::InMesh {
            uid: pod.uid.clone(),
            service_account: "default".into(),
            dns_capture: false,
        })
    }
}

impl Membership for StaticMembership {
    fn decide<'a>(&'a self, pod: &'a CniPod, _wait: Duration) -> DecideFuture<'a> {
        Box::pin(async move { self.decide_now(pod) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, uid: &str) -> CniPod {
        CniPod {
            uid: uid.into(),
            name: "p".into(),
            namespace: ns.into(),
            netns: "/var/run/netns/x".into(),
            container_id: "c".into(),
            ips: vec![],
        }
    }

    #[test]
    fn static_membership_is_by_namespace() {
        let m = StaticMembership::new(["mesh", "other", ""]);
        assert_eq!(
            m.decide_now(&pod("mesh", "u1")).unwrap(),
            Decision::InMesh {
                uid: "u1".into(),
                service_account: "default".into(),
                dns_capture: false
            }
        );
        assert!(matches!(
            m.decide_now(&pod("default", "u1")).unwrap(),
            Decision::NotInMesh(r) if r.contains("default")
        ));
        assert!(m.decide_now(&pod("mesh", "")).is_err());
        // An empty list: nothing is in the mesh.
        let none = StaticMembership::new(Vec::<String>::new());
        assert!(matches!(
            none.decide_now(&pod("", "u")).unwrap(),
            Decision::NotInMesh(_)
        ));
    }

    #[test]
    fn wire_shapes() {
        let req = PluginRequest::Add {
            pod: pod("mesh", "u1"),
        };
        let line = serde_json::to_string(&req).unwrap();
        assert_eq!(
            line,
            r#"{"op":"add","pod":{"uid":"u1","name":"p","namespace":"mesh","netns":"/var/run/netns/x","container_id":"c","ips":[]}}"#
        );
        assert_eq!(serde_json::from_str::<PluginRequest>(&line).unwrap(), req);
        assert!(serde_json::from_str::<PluginRequest>(r#"{"op":"del"}"#).is_err());
        // A newer plugin's extra keys do not stop an older agent.
        let newer = r#"{"op":"add","v":2,"pod":{"uid":"u1","name":"p","namespace":"mesh","netns":"/var/run/netns/x","container_id":"c","ips":[],"labels":{}}}"#;
        assert_eq!(serde_json::from_str::<PluginRequest>(newer).unwrap(), req);
        let ok = PluginResponse::Enrolled { uid: "u1".into() };
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"result":"enrolled","uid":"u1"}"#
        );
        let no = PluginResponse::Refused { reason: "x".into() };
        assert_eq!(
            serde_json::to_string(&no).unwrap(),
            r#"{"result":"refused","reason":"x"}"#
        );
    }
}
