//! Which pods belong to the mesh: the contract between whatever knows the cluster (the
//! Kubernetes watch in [`crate::k8s`], or a fixed rule when there is no cluster) and
//! whatever asks (the CNI plugin's requests, served by [`crate::cni`]).
//!
//! The CNI plugin holds no API credentials (kubernetes.md, complaint 1): it sends the
//! agent what the runtime told it, and the agent answers from its own knowledge,
//! waiting a bounded time for a pod it has not seen yet.

use std::{future::Future, net::IpAddr, path::PathBuf, pin::Pin, time::Duration};

use serde::{Deserialize, Serialize};

/// A pod as the container runtime describes it to the CNI plugin on ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniPod {
    /// `K8S_POD_UID` (may be empty with old runtimes).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// `CNI_NETNS`, e.g. `/var/run/netns/cni-<uuid>`.
    pub netns: PathBuf,
    /// The sandbox (infra) container id, `CNI_CONTAINERID`.
    pub container_id: String,
    /// The addresses `prevResult` gave the pod.
    pub ips: Vec<IpAddr>,
}

/// What membership says of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Enrol it with this identity.
    InMesh {
        /// The pod's uid as the cluster knows it (the CNI's may be empty).
        uid: String,
        service_account: String,
        /// Capture its DNS (port 53) to the proxy.
        dns_capture: bool,
    },
    /// Leave it alone; the reason is logged (`not labelled`, `hostNetwork`, …).
    NotInMesh(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum MembershipError {
    /// The pod was not seen in time: the ADD fails and the runtime retries.
    #[error("pod {namespace}/{name} not known after {waited:?}")]
    NotSeen {
        namespace: String,
        name: String,
        waited: Duration,
    },
    /// The source of truth is not usable (API not synced yet, …).
    #[error("membership unavailable: {0}")]
    Unavailable(String),
}

pub type DecideFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Decision, MembershipError>> + Send + 'a>>;

/// Decides whether a pod the runtime is creating belongs to the mesh.
pub trait Membership: Send + Sync + 'static {
    /// Waits at most `wait` for a pod not known yet.
    fn decide<'a>(&'a self, pod: &'a CniPod, wait: Duration) -> DecideFuture<'a>;
}
