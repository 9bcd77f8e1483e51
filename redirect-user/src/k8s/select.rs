//! Which pods are in the mesh (kubernetes.md, "Which pods are in the mesh"): a pure
//! function of the pod, its namespace and the agent's configuration.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Namespace, Pod};

/// The label that opts a pod or a whole namespace in (`ambient`) or a pod out (`none`).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// A pod carrying this annotation has a sidecar: never ours.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

/// What the rule needs besides the pod and its namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectConfig {
    /// Namespaces never enrolled, whatever their labels (default `kube-system`).
    pub excluded_namespaces: BTreeSet<String>,
    /// The agent's and the proxy's own pods: a pod carrying any one of these labels
    /// (`key`, `value`) is never enrolled (default `app=redirect-agent`, `app=ztunnel`).
    pub own_pod_labels: Vec<(String, String)>,
    /// The agent's own pod (`namespace`, `name`), from `POD_NAMESPACE`/`POD_NAME`
    /// (the downward API), never enrolled either.
    pub own_pod: Option<(String, String)>,
}

impl Default for SelectConfig {
    fn default() -> Self {
        Self {
            excluded_namespaces: ["kube-system".to_string()].into(),
            own_pod_labels: vec![
                ("app".into(), "redirect-agent".into()),
                ("app".into(), "ztunnel".into()),
            ],
            own_pod: None,
        }
    }
}

/// Why a pod is not in the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotInMesh {
    /// Phase `Succeeded` or `Failed`: its containers are done.
    Terminal(String),
    HostNetwork,
    /// Annotated `sidecar.istio.io/status`: it has a sidecar proxy.
    Sidecar,
    ExcludedNamespace(String),
    /// The agent's or the proxy's own pod.
    OwnPod,
    /// Labelled `istio.io/dataplane-mode=none`.
    OptedOut,
    /// Neither the pod nor its namespace is labelled `istio.io/dataplane-mode=ambient`.
    NotLabelled,
}

impl std::fmt::Display for NotInMesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotInMesh::Terminal(phase) => write!(f, "phase {phase}"),
            NotInMesh::HostNetwork => write!(f, "hostNetwork"),
            NotInMesh::Sidecar => write!(f, "has a sidecar ({SIDECAR_STATUS})"),
            NotInMesh::ExcludedNamespace(ns) => write!(f, "namespace {ns} is excluded"),
            NotInMesh::OwnPod => write!(f, "the agent's or the proxy's own pod"),
            NotInMesh::OptedOut => write!(f, "labelled {DATAPLANE_MODE}=none"),
            NotInMesh::NotLabelled => write!(f, "not labelled {DATAPLANE_MODE}=ambient"),
        }
    }
}

/// The membership rule. `namespace` is the pod's namespace object (`None`: not known,
/// read as unlabelled; callers that can wait for it should).
pub fn select(
    pod: &Pod,
    namespace: Option<&Namespace>,
    cfg: &SelectConfig,
) -> Result<(), NotInMesh> {
    let meta = &pod.metadata;
    let ns = meta.namespace.as_deref().unwrap_or_default();
    if let Some(phase) = pod.status.as_ref().and_then(|s| s.phase.as_deref())
        && matches!(phase, "Succeeded" | "Failed")
    {
        return Err(NotInMesh::Terminal(phase.to_string()));
    }
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return Err(NotInMesh::HostNetwork);
    }
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SIDECAR_STATUS))
    {
        return Err(NotInMesh::Sidecar);
    }
    if cfg.excluded_namespaces.contains(ns) {
        return Err(NotInMesh::ExcludedNamespace(ns.to_string()));
    }
    let labels = meta.labels.as_ref();
    let own_label = cfg
        .own_pod_labels
        .iter()
        .any(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
    let own_name = cfg.own_pod.as_ref().is_some_and(|(own_ns, own_name)| {
        own_ns == ns && meta.name.as_deref() == Some(own_name.as_str())
    });
    if own_label || own_name {
        return Err(NotInMesh::OwnPod);
    }
    let pod_mode = labels
        .and_then(|l| l.get(DATAPLANE_MODE))
        .map(String::as_str);
    let ns_mode = namespace
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(DATAPLANE_MODE))
        .map(String::as_str);
    match (pod_mode, ns_mode) {
        (Some("ambient"), _) => Ok(()),
        (Some("none"), _) => Err(NotInMesh::OptedOut),
        (_, Some("ambient")) => Ok(()),
        _ => Err(NotInMesh::NotLabelled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Case {
        what: &'static str,
        pod: serde_json::Value,
        ns_labels: Option<serde_json::Value>,
        want: Result<(), NotInMesh>,
    }

    fn pod(ns: &str, labels: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": ns, "labels": labels},
            "spec": {"containers": []},
            "status": {"phase": "Running"},
        })
    }

    fn with(
        mut v: serde_json::Value,
        path: &[&str],
        value: serde_json::Value,
    ) -> serde_json::Value {
        let mut at = &mut v;
        for p in &path[..path.len() - 1] {
            at = at.as_object_mut().unwrap().entry(*p).or_insert(json!({}));
        }
        at[path[path.len() - 1]] = value;
        v
    }

    fn ambient() -> serde_json::Value {
        json!({DATAPLANE_MODE: "ambient"})
    }

    fn none() -> serde_json::Value {
        json!({DATAPLANE_MODE: "none"})
    }

    fn cases() -> Vec<Case> {
        let in_ = Ok(());
        vec![
            Case {
                what: "pod ambient, namespace unlabelled",
                pod: pod("app", ambient()),
                ns_labels: Some(json!({})),
                want: in_.clone(),
            },
            Case {
                what: "pod ambient, namespace unknown",
                pod: pod("app", ambient()),
                ns_labels: None,
                want: in_.clone(),
            },
            Case {
                what: "pod unlabelled, namespace ambient",
                pod: pod("app", json!({})),
                ns_labels: Some(ambient()),
                want: in_.clone(),
            },
            Case {
                what: "pod none, namespace ambient",
                pod: pod("app", none()),
                ns_labels: Some(ambient()),
                want: Err(NotInMesh::OptedOut),
            },
            Case {
                what: "pod none, namespace unlabelled",
                pod: pod("app", none()),
                ns_labels: Some(json!({})),
                want: Err(NotInMesh::OptedOut),
            },
            Case {
                what: "pod ambient, namespace none",
                pod: pod("app", ambient()),
                ns_labels: Some(none()),
                want: in_.clone(),
            },
            Case {
                what: "pod other value, namespace ambient",
                pod: pod("app", json!({DATAPLANE_MODE: "sidecar"})),
                ns_labels: Some(ambient()),
                want: in_.clone(),
            },
            Case {
                what: "pod other value, namespace unlabelled",
                pod: pod("app", json!({DATAPLANE_MODE: "sidecar"})),
                ns_labels: Some(json!({})),
                want: Err(NotInMesh::NotLabelled),
            },
            Case {
                what: "nothing labelled",
                pod: pod("app", json!({})),
                ns_labels: Some(json!({})),
                want: Err(NotInMesh::NotLabelled),
            },
            Case {
                what: "namespace unknown, pod unlabelled",
                pod: pod("app", json!({})),
                ns_labels: None,
                want: Err(NotInMesh::NotLabelled),
            },
            Case {
                what: "namespace label other value",
                pod: pod("app", json!({})),
                ns_labels: Some(json!({DATAPLANE_MODE: "Ambient"})),
                want: Err(NotInMesh::NotLabelled),
            },
            Case {
                what: "hostNetwork, pod ambient",
                pod: with(pod("app", ambient()), &["spec", "hostNetwork"], json!(true)),
                ns_labels: Some(ambient()),
                want: Err(NotInMesh::HostNetwork),
            },
            Case {
                what: "hostNetwork false",
                pod: with(
                    pod("app", ambient()),
                    &["spec", "hostNetwork"],
                    json!(false),
                ),
                ns_labels: Some(json!({})),
                want: in_.clone(),
            },
            Case {
                what: "sidecar, namespace ambient",
                pod: with(
                    pod("app", json!({})),
                    &["metadata", "annotations"],
                    json!({SIDECAR_STATUS: "{}"}),
                ),
                ns_labels: Some(ambient()),
                want: Err(NotInMesh::Sidecar),
            },
            Case {
                what: "sidecar, pod ambient",
                pod: with(
                    pod("app", ambient()),
                    &["metadata", "annotations"],
                    json!({SIDECAR_STATUS: ""}),
                ),
                ns_labels: Some(json!({})),
                want: Err(NotInMesh::Sidecar),
            },
            Case {
                what: "other annotations do not matter",
                pod: with(
                    pod("app", ambient()),
                    &["metadata", "annotations"],
                    json!({"x": "y"}),
                ),
                ns_labels: Some(json!({})),
                want: in_.clone(),
            },
            Case {
                what: "kube-system, pod ambient",
                pod: pod("kube-system", ambient()),
                ns_labels: Some(ambient()),
                want: Err(NotInMesh::ExcludedNamespace("kube-system".into())),
            },
            Case {
                what: "agent's pod by label",
                pod: pod(
                    "istio-system",
                    json!({"app": "redirect-agent", DATAPLANE_MODE: "ambient"}),
                ),
                ns_labels: Some(ambient()),
                want: Err(NotInMesh::OwnPod),
            },
            Case {
                what: "proxy's pod by label",
                pod: pod("istio-system", json!({"app": "ztunnel"})),
                ns_labels: Some(ambient()),
                want: Err(NotInMesh::OwnPod),
            },
            Case {
                what: "own pod by name",
                pod: pod("agents", ambient()),
                ns_labels: Some(json!({})),
                want: Err(NotInMesh::OwnPod),
            },
            Case {
                what: "same name, other namespace",
                pod: pod("app2", ambient()),
                ns_labels: Some(json!({})),
                want: in_.clone(),
            },
            Case {
                what: "Succeeded",
                pod: with(
                    pod("app", ambient()),
                    &["status", "phase"],
                    json!("Succeeded"),
                ),
                ns_labels: Some(ambient()),
                want: Err(NotInMesh::Terminal("Succeeded".into())),
            },
            Case {
                what: "Failed",
                pod: with(pod("app", json!({})), &["status", "phase"], json!("Failed")),
                ns_labels: Some(ambient()),
                want: Err(NotInMesh::Terminal("Failed".into())),
            },
            Case {
                what: "Pending is in",
                pod: with(
                    pod("app", ambient()),
                    &["status", "phase"],
                    json!("Pending"),
                ),
                ns_labels: Some(json!({})),
                want: in_.clone(),
            },
            Case {
                what: "no status yet is in",
                pod: with(pod("app", json!({})), &["status"], json!(null)),
                ns_labels: Some(ambient()),
                want: in_.clone(),
            },
            Case {
                what: "terminal wins over hostNetwork",
                pod: with(
                    with(pod("app", ambient()), &["spec", "hostNetwork"], json!(true)),
                    &["status", "phase"],
                    json!("Failed"),
                ),
                ns_labels: Some(json!({})),
                want: Err(NotInMesh::Terminal("Failed".into())),
            },
        ]
    }

    #[test]
    fn every_rule_and_their_combinations() {
        let cfg = SelectConfig {
            own_pod: Some(("agents".into(), "p".into())),
            ..SelectConfig::default()
        };
        for c in cases() {
            let pod: Pod = serde_json::from_value(c.pod.clone()).unwrap();
            let ns = c.ns_labels.map(|l| {
                serde_json::from_value::<Namespace>(json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": pod.metadata.namespace.clone(), "labels": l},
                }))
                .unwrap()
            });
            assert_eq!(select(&pod, ns.as_ref(), &cfg), c.want, "{}", c.what);
        }
    }

    #[test]
    fn excluded_namespaces_are_configurable() {
        let cfg = SelectConfig {
            excluded_namespaces: ["infra".to_string()].into(),
            own_pod_labels: Vec::new(),
            own_pod: None,
        };
        let p: Pod = serde_json::from_value(pod("infra", ambient())).unwrap();
        assert_eq!(
            select(&p, None, &cfg),
            Err(NotInMesh::ExcludedNamespace("infra".into()))
        );
        let p: Pod = serde_json::from_value(pod("kube-system", ambient())).unwrap();
        assert_eq!(select(&p, None, &cfg), Ok(()));
        // Without own-pod labels, the agent's label is just a label.
        let p: Pod = serde_json::from_value(pod(
            "x",
            json!({"app": "redirect-agent", DATAPLANE_MODE: "ambient"}),
        ))
        .unwrap();
        assert_eq!(select(&p, None, &cfg), Ok(()));
    }
}
