//! The pods of the mesh from the Kubernetes API.
//!
//! - [`select`]: the membership rule, a pure function of pod and namespace.
//! - [`watch`]: this node's pods and every namespace watched into stores; membership
//!   answered from them ([`crate::membership::Membership`]); the reconciler that
//!   enrols and releases the agent's pods and writes the redirection annotation.
//! - [`procfs`]: the network namespace of a pod already running, found through /proc.

pub mod procfs;
pub mod select;
pub mod watch;

use std::{collections::BTreeSet, path::PathBuf, sync::Arc};

use clap::Args;

pub use watch::{KubeConfig, KubeStatus, KubeWatch};

use crate::agent::Agent;
use select::SelectConfig;

/// Kubernetes mode of `run` and `node-agent`.
#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// Follow this node's pods in the Kubernetes API (in-cluster credentials unless
    /// --kubeconfig): enrol the pods of the mesh, release the others. The agent's pods
    /// are then this node's Kubernetes pods: one added by hand whose uid is no pod of
    /// this node is released after the first sync.
    #[arg(long)]
    pub kube: bool,
    /// A kubeconfig file instead of the in-cluster service account (implies --kube).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (its pods are watched with spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Namespaces whose pods are never enrolled.
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    pub excluded_namespaces: Vec<String>,
    /// Labels (key=value) of the agent's and the proxy's own pods, never enrolled; any
    /// one of them excludes a pod. The agent's own pod (POD_NAMESPACE/POD_NAME from the
    /// downward API) is excluded too.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "app=redirect-agent,app=ztunnel"
    )]
    pub own_pod_labels: Vec<String>,
    /// Where the host's /proc is mounted (running pods' namespaces are found there).
    #[arg(long, default_value = "/proc")]
    pub proc_root: PathBuf,
}

impl KubeArgs {
    /// The watcher's configuration, or `None` when Kubernetes mode is off.
    pub fn config(&self, dns_capture: bool) -> anyhow::Result<Option<KubeConfig>> {
        if !self.kube && self.kubeconfig.is_none() {
            return Ok(None);
        }
        let node_name = self
            .node_name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!("k8s: --node-name (or NODE_NAME) is required with --kube")
            })?;
        let mut own_pod_labels = Vec::new();
        for l in self.own_pod_labels.iter().filter(|l| !l.is_empty()) {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("k8s: --own-pod-labels: {l:?} is not key=value"))?;
            own_pod_labels.push((k.to_string(), v.to_string()));
        }
        let own_pod = match (std::env::var("POD_NAMESPACE"), std::env::var("POD_NAME")) {
            (Ok(ns), Ok(name)) if !ns.is_empty() && !name.is_empty() => Some((ns, name)),
            _ => None,
        };
        Ok(Some(KubeConfig {
            kubeconfig: self.kubeconfig.clone(),
            node_name,
            select: SelectConfig {
                excluded_namespaces: self
                    .excluded_namespaces
                    .iter()
                    .filter(|n| !n.is_empty())
                    .cloned()
                    .collect::<BTreeSet<_>>(),
                own_pod_labels,
                own_pod,
            },
            proc_root: self.proc_root.clone(),
            dns_capture,
        }))
    }
}

/// Starts the watches and the reconciler beside `agent`. The returned handle answers
/// membership (give it to the CNI server as `Arc<dyn Membership>`); its tasks stop when
/// the last handle is dropped.
pub async fn start(cfg: KubeConfig, agent: Agent) -> anyhow::Result<Arc<KubeWatch>> {
    KubeWatch::start(cfg, Some(agent)).await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kube: KubeArgs,
    }

    fn config(args: &[&str]) -> anyhow::Result<Option<KubeConfig>> {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))?;
        cli.kube.config(false)
    }

    #[test]
    fn off_unless_asked() {
        assert!(config(&[]).unwrap().is_none());
        assert!(config(&["--node-name", "n1"]).unwrap().is_none());
    }

    #[test]
    fn defaults_and_lists() {
        let c = config(&["--kube", "--node-name", "n1"]).unwrap().unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.kubeconfig, None);
        assert_eq!(c.proc_root, PathBuf::from("/proc"));
        assert_eq!(
            c.select.excluded_namespaces,
            ["kube-system".to_string()].into()
        );
        assert_eq!(
            c.select.own_pod_labels,
            vec![
                ("app".to_string(), "redirect-agent".to_string()),
                ("app".to_string(), "ztunnel".to_string())
            ]
        );
        let c = config(&[
            "--kubeconfig",
            "/k",
            "--node-name",
            "n1",
            "--excluded-namespaces",
            "kube-system,infra",
            "--own-pod-labels",
            "k8s-app=agent",
            "--proc-root",
            "/host/proc",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/k")));
        assert_eq!(
            c.select.excluded_namespaces,
            ["kube-system".to_string(), "infra".to_string()].into()
        );
        assert_eq!(
            c.select.own_pod_labels,
            vec![("k8s-app".to_string(), "agent".to_string())]
        );
        assert_eq!(c.proc_root, PathBuf::from("/host/proc"));
    }

    #[test]
    fn bad_input_is_refused_clearly() {
        // NODE_NAME is not set in the test environment: the flag is required.
        if std::env::var_os("NODE_NAME").is_none() {
            let e = config(&["--kube"]).unwrap_err().to_string();
            assert!(e.contains("--node-name"), "{e}");
        }
        let e = config(&["--kube", "--node-name", "n", "--own-pod-labels", "app"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not key=value"), "{e}");
    }
}
