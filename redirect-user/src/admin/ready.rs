//! Readiness as a pure function of what the parts report: no flag anyone sets by hand.

/// What readiness is decided from, read at the moment of the probe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The agent runs here (`run`, `node-agent`): pods of an earlier run taken back
    /// from the pinned state and the pod list (the agent is built only after that).
    pub agent: Option<AgentFacts>,
    /// Kubernetes mode: whether the pod and namespace lists have synced.
    pub kube: Option<KubeFacts>,
    /// `--cni-install`: whether our CNI configuration and binary are in place.
    pub cni_installed: Option<bool>,
    /// A proxy runs here (`run`, `proxy`): connected to the node agent with its
    /// snapshot received.
    pub proxy_served: Option<bool>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentFacts {
    pub pinned_reconciled: bool,
    /// Proxies connected over the node-agent protocol.
    pub proxies: usize,
    /// Pods taken back from an earlier run that no proxy of this run has answered for
    /// yet: during an upgrade the old proxy still serves them, and must not be stopped.
    pub takeover_pending: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KubeFacts {
    pub pods_synced: bool,
    pub namespaces_synced: bool,
}

/// Ready, or the reasons it is not, one line each.
pub fn readiness(f: &Facts) -> Result<(), Vec<String>> {
    let mut not = Vec::new();
    if let Some(a) = &f.agent {
        if !a.pinned_reconciled {
            not.push("agent: pinned state not reconciled yet".to_string());
        }
        // New pods are refused (fail closed) until a proxy serves them: not ready.
        if a.proxies == 0 {
            not.push("agent: no proxy connected".to_string());
        }
        if a.takeover_pending > 0 {
            not.push(format!(
                "agent: {} pods taken over from the previous run not yet on this run's proxy",
                a.takeover_pending
            ));
        }
    }
    if let Some(k) = &f.kube {
        if !k.pods_synced {
            not.push("k8s: pods not synced".to_string());
        }
        if !k.namespaces_synced {
            not.push("k8s: namespaces not synced".to_string());
        }
    }
    if f.cni_installed == Some(false) {
        not.push("cni: configuration not in place".to_string());
    }
    if f.proxy_served == Some(false) {
        not.push("proxy: not connected to the node agent (or snapshot not received)".to_string());
    }
    if f.agent.is_none() && f.proxy_served.is_none() {
        not.push("nothing to serve".to_string());
    }
    if not.is_empty() { Ok(()) } else { Err(not) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(proxies: usize) -> Option<AgentFacts> {
        Some(AgentFacts {
            pinned_reconciled: true,
            proxies,
            takeover_pending: 0,
        })
    }

    #[test]
    fn the_agent_alone_is_ready_once_a_proxy_connects() {
        let before = Facts {
            agent: agent(0),
            ..Facts::default()
        };
        assert_eq!(
            readiness(&before),
            Err(vec!["agent: no proxy connected".to_string()])
        );
        let after = Facts {
            agent: agent(1),
            ..Facts::default()
        };
        assert_eq!(readiness(&after), Ok(()));
    }

    #[test]
    fn every_missing_fact_is_named() {
        let f = Facts {
            agent: Some(AgentFacts {
                pinned_reconciled: false,
                proxies: 0,
                takeover_pending: 2,
            }),
            kube: Some(KubeFacts {
                pods_synced: false,
                namespaces_synced: false,
            }),
            cni_installed: Some(false),
            proxy_served: Some(false),
        };
        let reasons = readiness(&f).unwrap_err();
        assert_eq!(reasons.len(), 7, "{reasons:?}");
        for word in [
            "pinned",
            "no proxy",
            "2 pods taken over",
            "pods not synced",
            "namespaces",
            "cni",
            "proxy: not",
        ] {
            assert!(
                reasons.iter().any(|r| r.contains(word)),
                "{word}: {reasons:?}"
            );
        }
    }

    #[test]
    fn each_fact_alone_flips_readiness() {
        let ready = Facts {
            agent: agent(1),
            kube: Some(KubeFacts {
                pods_synced: true,
                namespaces_synced: true,
            }),
            cni_installed: Some(true),
            proxy_served: Some(true),
        };
        assert_eq!(readiness(&ready), Ok(()));
        let mut variants = Vec::new();
        let mut f = ready.clone();
        f.agent.as_mut().unwrap().pinned_reconciled = false;
        variants.push(f);
        let mut f = ready.clone();
        f.agent.as_mut().unwrap().proxies = 0;
        variants.push(f);
        let mut f = ready.clone();
        f.agent.as_mut().unwrap().takeover_pending = 1;
        variants.push(f);
        let mut f = ready.clone();
        f.kube.as_mut().unwrap().pods_synced = false;
        variants.push(f);
        let mut f = ready.clone();
        f.kube.as_mut().unwrap().namespaces_synced = false;
        variants.push(f);
        let mut f = ready.clone();
        f.cni_installed = Some(false);
        variants.push(f);
        let mut f = ready.clone();
        f.proxy_served = Some(false);
        variants.push(f);
        for f in variants {
            assert_eq!(readiness(&f).map_err(|r| r.len()), Err(1), "{f:?}");
        }
    }

    #[test]
    fn facts_that_do_not_apply_are_not_required() {
        // The proxy alone: no agent, no cluster, no CNI.
        let proxy = Facts {
            proxy_served: Some(true),
            ..Facts::default()
        };
        assert_eq!(readiness(&proxy), Ok(()));
        assert!(readiness(&Facts::default()).is_err());
    }
}
