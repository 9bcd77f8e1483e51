//! The manifests under `deploy/`, read as the API server would: every document parses
//! into its Kubernetes API type with no field left over (a misspelt or misplaced field
//! fails here, naming its path), and says what operators rely on: least privilege
//! (never `privileged`, all capabilities dropped and only the named ones added), the
//! API access kubernetes.md lists and nothing more, host paths, probes, tolerations,
//! priority, update strategy, and arguments the binary accepts.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    serde::{Serialize, de::DeserializeOwned},
};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every manifest, with the file it came from.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/");
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
            if !v.is_null() {
                out.push((name.clone(), v));
            }
        }
    }
    out
}

/// Paths of `orig` that `back` does not hold with the same value: the fields the typed
/// object dropped (unknown ones) or changed.
fn lost(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, v) in o {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(bv) => lost(v, bv, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (ov, bv)) in o.iter().zip(b).enumerate() {
                lost(ov, bv, &format!("{path}[{i}]"), out);
            }
        }
        (o, b) if o == b => {}
        _ => out.push(format!("{path} (was {orig}, read as {back})")),
    }
}

/// Parses `v` as `T` and checks that nothing was left over.
fn typed<T: DeserializeOwned + Serialize>(file: &str, v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", v["kind"]));
    let back = serde_json::to_value(&t).unwrap();
    let mut missing = Vec::new();
    lost(v, &back, "", &mut missing);
    assert!(
        missing.is_empty(),
        "{file}: {} has fields the API does not know: {missing:?}",
        v["kind"]
    );
    t
}

struct Manifests {
    daemonsets: Vec<(String, DaemonSet)>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    accounts: Vec<ServiceAccount>,
    configmaps: Vec<ConfigMap>,
    namespaces: Vec<Namespace>,
}

fn manifests() -> Manifests {
    let mut m = Manifests {
        daemonsets: Vec::new(),
        roles: Vec::new(),
        bindings: Vec::new(),
        accounts: Vec::new(),
        configmaps: Vec::new(),
        namespaces: Vec::new(),
    };
    for (file, v) in documents() {
        match (v["apiVersion"].as_str(), v["kind"].as_str()) {
            (Some("apps/v1"), Some("DaemonSet")) => {
                m.daemonsets.push((file.clone(), typed(&file, &v)))
            }
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => {
                m.roles.push(typed(&file, &v))
            }
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
                m.bindings.push(typed(&file, &v))
            }
            (Some("v1"), Some("ServiceAccount")) => m.accounts.push(typed(&file, &v)),
            (Some("v1"), Some("ConfigMap")) => m.configmaps.push(typed(&file, &v)),
            (Some("v1"), Some("Namespace")) => m.namespaces.push(typed(&file, &v)),
            (a, k) => panic!("{file}: unexpected {a:?} {k:?}"),
        }
    }
    m
}

#[test]
fn every_manifest_reads_into_the_api_types_with_no_unknown_field() {
    let m = manifests();
    assert_eq!(
        m.daemonsets.len(),
        2,
        "daemonset.yaml and daemonset-agent-only.yaml"
    );
    assert_eq!(m.roles.len(), 1);
    assert_eq!(m.bindings.len(), 1);
    assert_eq!(m.accounts.len(), 1);
    assert_eq!(m.configmaps.len(), 1);
    assert_eq!(m.namespaces.len(), 1);
}

#[test]
fn the_checker_catches_a_misspelt_field() {
    let v: Value = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "namespce": "typo"}
    });
    let r = std::panic::catch_unwind(|| typed::<ServiceAccount>("inline", &v));
    assert!(r.is_err(), "a misspelt field went unnoticed");
}

#[test]
fn the_cluster_role_grants_exactly_what_kubernetes_md_lists() {
    let m = manifests();
    let mut got: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in m.roles[0].rules.as_ref().unwrap() {
        let groups = rule.api_groups.clone().unwrap_or_default();
        assert_eq!(groups, vec![String::new()], "core API group only");
        for r in rule.resources.as_ref().unwrap() {
            got.entry(r.clone())
                .or_default()
                .extend(rule.verbs.iter().cloned());
        }
    }
    let read: BTreeSet<String> = ["get", "list", "watch"].map(String::from).into();
    let want = BTreeMap::from([
        ("pods".to_string(), read.clone()),
        ("namespaces".to_string(), read.clone()),
        ("nodes".to_string(), read),
        (
            "pods/status".to_string(),
            BTreeSet::from(["patch".to_string()]),
        ),
    ]);
    assert_eq!(got, want);
    // Bound to the account the DaemonSets run as.
    let b = &m.bindings[0];
    assert_eq!(b.role_ref.name, m.roles[0].metadata.name.clone().unwrap());
    let subject = &b.subjects.as_ref().unwrap()[0];
    let sa = &m.accounts[0].metadata;
    assert_eq!(Some(&subject.name), sa.name.as_ref());
    assert_eq!(subject.namespace, sa.namespace);
    for (file, ds) in &m.daemonsets {
        let spec = ds.spec.template.spec.as_ref().unwrap();
        assert_eq!(spec.service_account_name, sa.name, "{file}");
        assert_eq!(ds.metadata.namespace, sa.namespace, "{file}");
    }
}

/// The capabilities the code needs, by mode: what `redirect_user::privileges` asks of
/// it, less those another capability of the set already stands in for (BPF and
/// PERFMON under SYS_ADMIN, NET_RAW under NET_ADMIN). tests/privileges.rs runs the
/// image with them.
fn allowed_caps(agent_only: bool) -> BTreeSet<String> {
    use redirect_user::privileges::{Mode, needs};
    let mode = if agent_only {
        Mode::NodeAgent
    } else {
        Mode::Run
    };
    let name = |c: &dyn std::fmt::Display| c.to_string()["CAP_".len()..].to_string();
    // The needs only one capability meets make the set; it must meet every other.
    let caps: BTreeSet<String> = needs(mode)
        .iter()
        .filter(|n| n.any_of.len() == 1)
        .map(|n| name(&n.any_of[0]))
        .collect();
    for n in needs(mode) {
        assert!(
            n.any_of.iter().any(|c| caps.contains(&name(c))),
            "{mode}: {n} is not met by {caps:?}"
        );
    }
    caps
}

#[test]
fn the_daemonsets_hold_least_privilege_and_what_a_node_agent_needs() {
    let m = manifests();
    for (file, ds) in &m.daemonsets {
        let agent_only = file.contains("agent-only");
        let spec = &ds.spec;
        let strategy = spec.update_strategy.as_ref().unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"), "{file}");
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.host_network, Some(true), "{file}: the node's namespace");
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical"),
            "{file}"
        );
        let tolerates_all = pod.tolerations.as_ref().unwrap().iter().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
        assert!(tolerates_all, "{file}: must tolerate every taint");
        assert_eq!(pod.containers.len(), 1, "{file}");
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(false), "{file}: never privileged");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{file}");
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{file}");
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(
            caps.drop.clone().unwrap(),
            vec!["ALL".to_string()],
            "{file}"
        );
        let added: BTreeSet<String> = caps.add.clone().unwrap().into_iter().collect();
        assert_eq!(added, allowed_caps(agent_only), "{file}");
        assert!(
            c.readiness_probe.is_some() && c.liveness_probe.is_some(),
            "{file}"
        );
        let env: BTreeSet<&str> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert!(
            env.contains("NODE_NAME"),
            "{file}: the watch needs NODE_NAME"
        );
        // Every host path is mounted, and every path the arguments name is a mount.
        let volumes: BTreeMap<String, String> = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v.name.clone(),
                    v.host_path.as_ref().expect("hostPath").path.clone(),
                )
            })
            .collect();
        let mounts: BTreeMap<String, String> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.mount_path.clone(), m.name.clone()))
            .collect();
        for name in volumes.keys() {
            assert!(
                mounts.values().any(|n| n == name),
                "{file}: volume {name} not mounted"
            );
        }
        for host in [
            "/sys/fs/bpf",
            "/proc",
            "/var/run/netns",
            "/etc/cni/net.d",
            "/opt/cni/bin",
        ] {
            assert!(
                volumes.values().any(|p| p == host),
                "{file}: {host} not mounted"
            );
        }
        let args = c.args.clone().unwrap();
        for a in &args {
            if let Some((_, path)) = a.split_once('=').filter(|(_, p)| p.starts_with('/')) {
                let covered = mounts.keys().any(|m| Path::new(path).starts_with(m));
                assert!(covered, "{file}: {a} names a path no volume provides");
            }
        }
        // The plugin socket the CNI configuration names (in the state directory) is the
        // same path on the node.
        let state = mounts
            .iter()
            .find(|(p, _)| p.as_str() == "/var/run/redirect")
            .map(|(_, n)| volumes[n].clone());
        assert_eq!(state.as_deref(), Some("/var/run/redirect"), "{file}");
    }
}

/// `run` hands over to a new agent started beside it (docs/kubernetes.md, upgrades):
/// the update must surge, never leave the node without one, and give the old one the
/// time of its drain.
#[test]
fn the_run_daemonset_upgrades_by_handover() {
    let m = manifests();
    let (file, ds) = m
        .daemonsets
        .iter()
        .find(|(f, _)| f.as_str() == "daemonset.yaml")
        .expect("daemonset.yaml");
    let rolling = ds
        .spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .expect("a rolling update");
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)), "{file}");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)), "{file}");
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let args = pod.containers[0].args.clone().unwrap();
    assert_eq!(args[0], "run", "{file}");
    let drain: i64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--drain-secs="))
        .expect("--drain-secs")
        .parse()
        .unwrap();
    let grace = pod
        .termination_grace_period_seconds
        .expect("a grace period");
    assert!(grace > drain, "{file}: grace {grace} s, drain {drain} s");
}

#[test]
fn the_daemonsets_arguments_are_accepted_by_the_binary() {
    let bin = redirect_tests::redirect_user_bin().expect("redirect-user binary");
    let m = manifests();
    for (file, ds) in &m.daemonsets {
        let c = &ds.spec.template.spec.as_ref().unwrap().containers[0];
        let args = c.args.clone().unwrap();
        let help = std::process::Command::new(&bin)
            .args([args[0].as_str(), "--help"])
            .output()
            .unwrap();
        assert!(help.status.success(), "{file}: no subcommand {}", args[0]);
        let help = String::from_utf8_lossy(&help.stdout);
        for a in &args[1..] {
            let flag = a.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{file}: `{} {flag}` is not an option of the binary",
                args[0]
            );
        }
        assert!(
            c.command.as_ref().unwrap()[0].ends_with("/redirect-user"),
            "{file}"
        );
        // The probes and the scrape port are where the binary serves them by default.
        let port_of = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
            let g = p.as_ref().unwrap().http_get.as_ref().unwrap();
            (
                g.path.clone().unwrap(),
                serde_json::to_value(&g.port).unwrap(),
            )
        };
        for (probe, path) in [
            (&c.readiness_probe, "/readyz"),
            (&c.liveness_probe, "/healthz"),
        ] {
            let (p, port) = port_of(probe);
            assert_eq!(p, path, "{file}");
            assert!(
                help.contains("--admin-addr")
                    && help.contains(&format!("[default: 0.0.0.0:{port}]")),
                "{file}: {path} on port {port}, which the binary does not serve by default"
            );
        }
        let ports = c.ports.as_ref().unwrap();
        let metrics = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("metrics"))
            .unwrap();
        assert!(
            help.contains(&format!("[default: 0.0.0.0:{}]", metrics.container_port)),
            "{file}: metrics port {} is not the binary's default",
            metrics.container_port
        );
    }
}
