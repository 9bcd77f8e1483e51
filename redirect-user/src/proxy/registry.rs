//! The workloads the proxy knows, and the authorization policies that guard them.
//!
//! Two sources feed the [`Registry`]: the node agent, which enrols the pods of this node
//! ([`Registry::upsert_local`]), and a YAML *workload file* describing the rest of the mesh
//! ([`Registry::load_file`], [`Registry::watch_file`]). Lookups go by IP (where does a
//! steered connection go, and how) and by uid.
//!
//! # The workload file
//!
//! The file has the shape of the upstream proxy's (ztunnel's) local configuration, the
//! file it reads from `LOCAL_XDS_PATH` (`LocalConfig` in its `src/xds.rs`, example in its
//! `examples/localhost.yaml`), so one file can describe a mesh to both. Field names are
//! camelCase. We read the fields listed below and **ignore every other field** (top-level
//! `services`, `network`, `networkMode`, `waypoint`, `canonicalName`, `locality`, ...).
//!
//! Top level:
//! - `workloads`: list of workloads (absent: none).
//! - `policies`: list of authorization policies (absent: none).
//!
//! A workload:
//! - `uid` (required, unique in the file): the key of [`Registry::by_uid`].
//! - `name`, `namespace` (required), `serviceAccount` (empty: `default`, as the upstream
//!   control plane does), `trustDomain` (empty: the proxy's default), `node`.
//! - `workloadIps`: IPv4 and IPv6 addresses (an address may belong to one workload only;
//!   `network` is not read, so this holds across networks too).
//! - `protocol`: `HBONE` (reached through the mesh tunnel) or `TCP` (plaintext, the
//!   default).
//! - `services`: map of service key (`namespace/hostname`) to port map; we keep the keys.
//! - `authorizationPolicies`: keys (`namespace/name`) of the `WorkloadSelector` policies
//!   that select this workload.
//! - `tunnelTransport` (**our extension**): `TCP` (HBONE over TLS over TCP to port 15008,
//!   the default) or `QUIC` (this project's QUIC transport; needs `protocol: HBONE`).
//!
//! Enum values in policies are written with YAML tags, the encoding the upstream proxy's
//! YAML library uses (`!Exact value`); the one-entry map form (`{Exact: value}`) is
//! accepted too.
//!
//! ```yaml
//! workloads:
//! # A pod on another node, reached with HBONE over QUIC.
//! - uid: cluster1//v1/Pod/shop/cart-7d9f
//!   name: cart-7d9f
//!   namespace: shop
//!   serviceAccount: cart
//!   trustDomain: cluster.local
//!   workloadIps: ["10.20.0.7", "fd00:20::7"]
//!   protocol: HBONE
//!   tunnelTransport: QUIC      # our extension: leave it out of a file ztunnel reads
//!   node: node-b
//!   services:
//!     "shop/cart.shop.svc.cluster.local": {80: 8080}
//! # A workload outside the mesh: plain TCP, no tunnel.
//! - uid: cluster1//v1/Pod/legacy/db-0
//!   name: db-0
//!   namespace: legacy
//!   serviceAccount: db
//!   workloadIps: ["10.30.0.5"]
//!   protocol: TCP
//!   node: node-c
//!   services: {}
//! policies:
//! # Pods of namespace `shop` accept only the `web` service account, or anyone from `ops`.
//! - name: shop-from-web
//!   namespace: shop
//!   scope: Namespace
//!   action: Allow
//!   rules:
//!   - - - principals: [!Exact cluster.local/ns/shop/sa/web]
//!       - namespaces: [!Exact ops]
//!   dryRun: false
//! ```
//!
//! For ztunnel to read the same file: it refuses unknown fields (so no `tunnelTransport`),
//! requires `namespace`, `workloadIps` and `services` on every workload, and all six
//! fields (`name`, `namespace`, `scope`, `action`, `rules`, `dryRun`) on every policy.
//!
//! # Authorization: the subset we apply
//!
//! A policy (ztunnel's `Authorization`, `src/rbac.rs`) has `name`, `namespace`, `scope`
//! (`Global`, `Namespace`, `WorkloadSelector`), `action` (`Allow`, `Deny`), `dryRun` and
//! `rules`, a list of rules, each a list of clauses, each a list of matches:
//! - it *applies* to a destination when its scope is `Global`, when its scope is
//!   `Namespace` and its `namespace` is the destination's, or when its key is listed in
//!   the `authorizationPolicies` of the file entry describing the destination (same
//!   `uid`, or same `namespace` and `name`, so a file entry can attach policies to a pod
//!   the agent enrolled). `dryRun: true` policies are never enforced;
//! - it *matches* a source when any rule matches; a rule when all its clauses match (an
//!   empty clause matches); a clause when any of its non-empty matches matches; a match
//!   when every condition it sets holds. No rules: never matches;
//! - conditions on the source: `principals` / `notPrincipals` (the identity written
//!   *without* the scheme, `<trust-domain>/ns/<namespace>/sa/<service-account>`, as
//!   ztunnel compares them; a plaintext source has no principal),
//!   `namespaces` / `notNamespaces` (a plaintext source's namespace is empty) and
//!   `serviceAccounts` / `notServiceAccounts` (`{namespace, serviceAccount}`). Strings
//!   match with `!Exact`, `!Prefix`, `!Suffix` or `!Presence []` (non-empty);
//! - conditions this proxy cannot evaluate here (`sourceIps`, `destinationIps`,
//!   `destinationPorts` and their `not` forms) are read conservatively: they hold in a
//!   `Deny` policy and fail in an `Allow` policy (so the result never admits more than
//!   ztunnel would), with a warning at load time. Unknown fields of a match are ignored
//!   with a warning;
//! - decision: a matching `Deny` policy refuses; otherwise, when `Allow` policies apply,
//!   one of them must match; when none applies, the connection is allowed.
//!
//! There is no mTLS mode in ztunnel's format: the control plane turns a STRICT
//! PeerAuthentication into a `Deny` policy with `notPrincipals: [!Presence []]`.
//! [`Registry::requires_mtls`] is true when a plaintext source would be refused, which
//! covers that policy, a deny-all, and any `Allow` policy naming identities.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt, io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use serde::{Deserialize, de::IgnoredAny};
use serde_yaml_ng::Value;
use tracing::{debug, info, warn};

/// What the workload itself accepts: the mesh tunnel (`HBONE`) or plaintext (`TCP`).
/// In YAML, `TCP` / `HBONE`, as ztunnel writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP", alias = "Tcp", alias = "tcp")]
    Tcp,
    #[serde(rename = "HBONE", alias = "Hbone", alias = "hbone")]
    Hbone,
}

/// How the tunnel to a workload travels, our extension (the workload field
/// `tunnelTransport`): `Tcp` is HBONE over TLS over TCP to 15008, `Quic` our QUIC
/// transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Transport {
    #[default]
    Tcp,
    Quic,
}

/// A workload: a pod of this node (from the agent) or one described by the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// None: the proxy's default.
    pub trust_domain: Option<String>,
    pub ips: Vec<IpAddr>,
    pub protocol: Protocol,
    pub transport: Transport,
    pub node: String,
    /// Service keys (`namespace/hostname`) as the file names them.
    pub services: Vec<String>,
    /// Enrolled on this node (from the agent), vs from the file.
    pub local: bool,
}

/// The outcome of [`Registry::authorize`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused: which policy, and why.
    Deny(String),
}

/// A source as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourcePeer {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a workload file was not loaded. The registry is unchanged when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("reading workload file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not YAML, or not the expected shape; `line` is 1-based.
    #[error("{}invalid workload YAML: {message}", origin(.path))]
    Yaml {
        path: Option<PathBuf>,
        line: Option<usize>,
        message: String,
    },
    /// A workload entry (named by uid, or by position when it has none) is wrong.
    #[error("{}workload {workload}: field `{field}`: {reason}", origin(.path))]
    InvalidWorkload {
        path: Option<PathBuf>,
        workload: String,
        field: &'static str,
        reason: String,
    },
    /// A policy entry (named `namespace/name`, or by position) is wrong.
    #[error("{}policy {policy}: field `{field}`: {reason}", origin(.path))]
    InvalidPolicy {
        path: Option<PathBuf>,
        policy: String,
        field: &'static str,
        reason: String,
    },
}

fn origin(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!("{}: ", p.display()),
        None => String::new(),
    }
}

impl RegistryError {
    fn in_file(mut self, file: &Path) -> Self {
        match &mut self {
            Self::Read { .. } => {}
            Self::Yaml { path, .. }
            | Self::InvalidWorkload { path, .. }
            | Self::InvalidPolicy { path, .. } => *path = Some(file.to_path_buf()),
        }
        self
    }
}

/// Everything the proxy knows about workloads: local pods (from the agent) and remote
/// ones from a YAML file, with the file's policies.
///
/// Readers take a reference-counted snapshot (a read lock held for one `Arc` clone);
/// writers build a new snapshot and swap it in, one at a time.
#[derive(Debug, Default)]
pub struct Registry {
    current: RwLock<Arc<Snapshot>>,
    /// Serializes writers (read, rebuild, swap) and numbers local upserts.
    writer: Mutex<u64>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A local pod appears or changes (replaces by uid). Its addresses win over file
    /// entries and over earlier local pods holding the same address (warning).
    pub fn upsert_local(&self, mut w: Workload) {
        w.local = true;
        canonical_ips(&mut w.ips);
        let uid = w.uid.clone();
        let conflicts = self.update(|seq, snap| {
            snap.local.insert(uid.clone(), (seq, Arc::new(w)));
        });
        for c in conflicts.iter().filter(|c| c.winner.uid == uid) {
            if c.loser.local {
                warn!(ip = %c.ip, pod = %c.winner.uid, other = %c.loser.uid,
                    "workload address held by two local pods, the latest wins");
            } else {
                warn!(ip = %c.ip, pod = %c.winner.uid, file_workload = %c.loser.uid,
                    "workload address held by a local pod and a file entry, the local pod wins");
            }
        }
    }

    /// A local pod leaves.
    pub fn remove_local(&self, uid: &str) {
        self.update(|_, snap| {
            snap.local.remove(uid);
        });
    }

    /// Replaces the file-sourced workloads and policies with the content of `yaml`;
    /// on error nothing changes. Returns the number of workloads read.
    pub fn load_yaml(&self, yaml: &str) -> Result<usize, RegistryError> {
        let content = FileContent::parse(yaml)?;
        let count = content.workloads.len();
        let content = Arc::new(content);
        let conflicts = self.update(|_, snap| snap.file = content.clone());
        for c in conflicts.iter().filter(|c| !c.loser.local) {
            warn!(ip = %c.ip, pod = %c.winner.uid, file_workload = %c.loser.uid,
                "workload address held by a local pod and a file entry, the local pod wins");
        }
        debug!(
            workloads = count,
            policies = content.policies.len(),
            "workload file content applied"
        );
        Ok(count)
    }

    /// [`Registry::load_yaml`] with the content of `path`.
    pub fn load_file(&self, path: &Path) -> Result<usize, RegistryError> {
        let yaml = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.load_yaml(&yaml).map_err(|e| e.in_file(path))
    }

    /// Loads `path` now and again whenever it changes (device, inode, size, mtime or
    /// ctime, polled every `every`), until the task is aborted or the registry dropped
    /// (the task holds no strong reference in between polls; dropping the handle alone
    /// does not stop it). A missing, empty or broken file logs a warning once per change
    /// and keeps the previous content. Write the file atomically (rename) where possible;
    /// a change seen during a read is read again at the next poll. Call inside a tokio
    /// runtime.
    pub fn watch_file(
        self: &Arc<Self>,
        path: PathBuf,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let registry = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The last state acted on: a loaded or refused version, or a missing file.
            let mut seen: Option<Result<Fingerprint, io::ErrorKind>> = None;
            loop {
                tick.tick().await;
                let Some(reg) = registry.upgrade() else {
                    return;
                };
                let before = match Fingerprint::of(&path) {
                    Ok(f) => f,
                    Err(e) => {
                        if seen != Some(Err(e.kind())) {
                            warn!(path = %path.display(), error = %e,
                                "workload file reload failed, keeping previous content");
                            seen = Some(Err(e.kind()));
                        }
                        continue;
                    }
                };
                if seen == Some(Ok(before)) {
                    continue;
                }
                if before.len == 0 {
                    warn!(path = %path.display(), error = "the file is empty",
                        "workload file reload failed, keeping previous content");
                    seen = Some(Ok(before));
                    continue;
                }
                let p = path.clone();
                let outcome = tokio::task::spawn_blocking(move || {
                    let r = reg.load_file(&p);
                    (r, Fingerprint::of(&p).ok())
                })
                .await;
                match outcome {
                    Ok((_, after)) if after != Some(before) => {
                        debug!(path = %path.display(), "workload file changed while read, reading again");
                    }
                    Ok((Ok(n), _)) => {
                        info!(path = %path.display(), workloads = n, "workload file loaded");
                        seen = Some(Ok(before));
                    }
                    Ok((Err(e), _)) => {
                        warn!(path = %path.display(), error = %e,
                            "workload file reload failed, keeping previous content");
                        seen = Some(Ok(before));
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e,
                            "workload file reload failed, keeping previous content");
                        seen = Some(Ok(before));
                    }
                }
            }
        })
    }

    /// The workload holding `ip` (IPv4-mapped IPv6 addresses are looked up as IPv4).
    /// Local pods win over file entries.
    pub fn by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.snapshot().by_ip.get(&ip.to_canonical()).cloned()
    }

    /// The workload with this uid (the local pod when the file has the same uid).
    pub fn by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.snapshot().by_uid.get(uid).cloned()
    }

    /// Whether `dst` accepts a connection from `src` (None: plaintext, no identity) under
    /// the file's policies (see the module documentation for the subset applied).
    pub fn authorize(&self, dst: &Workload, src: Option<&SourcePeer>) -> Decision {
        let snap = self.snapshot();
        let policies = snap.file.applicable(dst);
        let peer = Peer::new(src);
        let (dry, enforced): (Vec<&Policy>, Vec<&Policy>) =
            policies.into_iter().partition(|p| p.dry_run);
        for p in &dry {
            if p.matches(&peer) {
                debug!(policy = %p.key, action = ?p.action, "dry-run policy matches");
            }
        }
        if let Some(p) = enforced
            .iter()
            .find(|p| p.action == Action::Deny && p.matches(&peer))
        {
            return Decision::Deny(format!("denied by policy {}", p.key));
        }
        let allow: Vec<&&Policy> = enforced
            .iter()
            .filter(|p| p.action == Action::Allow)
            .collect();
        if allow.is_empty() || allow.iter().any(|p| p.matches(&peer)) {
            return Decision::Allow;
        }
        let keys: Vec<&str> = allow.iter().map(|p| p.key.as_str()).collect();
        Decision::Deny(format!(
            "not allowed by any of the policies {}",
            keys.join(", ")
        ))
    }

    /// Whether `dst` refuses plaintext inbound: a source without identity would be
    /// denied (a STRICT mode as the control plane converts it, `Deny` with
    /// `notPrincipals: [!Presence []]`; a deny-all; an `Allow` policy naming identities).
    pub fn requires_mtls(&self, dst: &Workload) -> bool {
        matches!(self.authorize(dst, None), Decision::Deny(_))
    }

    /// Every workload, local and from the file, sorted by uid.
    pub fn workloads(&self) -> Vec<Arc<Workload>> {
        let snap = self.snapshot();
        let mut all: Vec<Arc<Workload>> = snap.by_uid.values().cloned().collect();
        all.sort_by(|a, b| a.uid.cmp(&b.uid));
        all
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Applies `change` to a copy of the sources, rebuilds the indexes and swaps the
    /// result in. Returns the address conflicts of the new snapshot.
    fn update(&self, change: impl FnOnce(u64, &mut Sources)) -> Vec<Conflict> {
        let mut seq = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        *seq += 1;
        let old = self.snapshot();
        let mut sources = Sources {
            file: old.file.clone(),
            local: old.local.clone(),
        };
        change(*seq, &mut sources);
        let (snap, conflicts) = Snapshot::build(sources);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snap);
        conflicts
    }
}

fn canonical_ips(ips: &mut Vec<IpAddr>) {
    let mut seen = BTreeSet::new();
    ips.retain_mut(|ip| {
        *ip = ip.to_canonical();
        seen.insert(*ip)
    });
}

/// What the indexes are built from.
struct Sources {
    file: Arc<FileContent>,
    /// uid → (upsert number, pod).
    local: HashMap<String, (u64, Arc<Workload>)>,
}

#[derive(Debug, Default)]
struct Snapshot {
    file: Arc<FileContent>,
    local: HashMap<String, (u64, Arc<Workload>)>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    by_uid: HashMap<String, Arc<Workload>>,
}

/// An address held by two workloads: `winner` is the one lookups return.
struct Conflict {
    ip: IpAddr,
    winner: Arc<Workload>,
    loser: Arc<Workload>,
}

/// The same workload described twice (by the agent and by the file): not a conflict.
fn same_workload(a: &Workload, b: &Workload) -> bool {
    a.uid == b.uid || (!a.name.is_empty() && a.name == b.name && a.namespace == b.namespace)
}

impl Snapshot {
    fn build(src: Sources) -> (Self, Vec<Conflict>) {
        let mut by_ip: HashMap<IpAddr, Arc<Workload>> = HashMap::new();
        let mut by_uid: HashMap<String, Arc<Workload>> = HashMap::new();
        let mut conflicts = Vec::new();
        // File entries first (their addresses are unique), then local pods in upsert
        // order, each taking over what it shares with earlier ones.
        for w in &src.file.workloads {
            for ip in &w.ips {
                by_ip.insert(*ip, w.clone());
            }
            by_uid.insert(w.uid.clone(), w.clone());
        }
        let mut local: Vec<&(u64, Arc<Workload>)> = src.local.values().collect();
        local.sort_by_key(|(seq, _)| *seq);
        for (_, w) in local {
            for ip in &w.ips {
                if let Some(old) = by_ip.insert(*ip, w.clone())
                    && !same_workload(&old, w)
                {
                    conflicts.push(Conflict {
                        ip: *ip,
                        winner: w.clone(),
                        loser: old,
                    });
                }
            }
            by_uid.insert(w.uid.clone(), w.clone());
        }
        let snap = Snapshot {
            file: src.file,
            local: src.local,
            by_ip,
            by_uid,
        };
        (snap, conflicts)
    }
}

/// The workloads and policies of one version of the file.
#[derive(Debug, Default)]
struct FileContent {
    workloads: Vec<Arc<Workload>>,
    /// By key `namespace/name`.
    policies: BTreeMap<String, Arc<Policy>>,
    global: Vec<Arc<Policy>>,
    by_namespace: HashMap<String, Vec<Arc<Policy>>>,
    /// `authorizationPolicies` of each file workload, under its uid and under
    /// `namespace/name`.
    selected: HashMap<String, Vec<Arc<Policy>>>,
}

impl FileContent {
    fn parse(yaml: &str) -> Result<Self, RegistryError> {
        let raw: RawFile = serde_yaml_ng::from_str(yaml).map_err(|e| RegistryError::Yaml {
            path: None,
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        })?;
        let mut content = FileContent::default();

        for (i, rp) in raw.policies.into_iter().enumerate() {
            let p = Arc::new(Policy::parse(i, rp)?);
            if content.policies.contains_key(&p.key) {
                return Err(policy_err(
                    &p.key,
                    "name",
                    "a policy with this namespace and name is already defined",
                ));
            }
            match p.scope {
                Scope::Global => content.global.push(p.clone()),
                Scope::Namespace => content
                    .by_namespace
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone()),
                Scope::WorkloadSelector => {}
            }
            content.policies.insert(p.key.clone(), p);
        }

        let mut uids: HashMap<String, usize> = HashMap::new();
        let mut owners: HashMap<IpAddr, String> = HashMap::new();
        for (i, rw) in raw.workloads.into_iter().enumerate() {
            let label = if rw.uid.is_empty() {
                format!("#{} ({}/{})", i + 1, rw.namespace, rw.name)
            } else {
                rw.uid.clone()
            };
            let bad = |field: &'static str, reason: String| RegistryError::InvalidWorkload {
                path: None,
                workload: label.clone(),
                field,
                reason,
            };
            if rw.uid.is_empty() {
                return Err(bad(
                    "uid",
                    "missing (every workload needs a unique uid)".into(),
                ));
            }
            if let Some(first) = uids.insert(rw.uid.clone(), i) {
                return Err(bad(
                    "uid",
                    format!("also the uid of workload #{}", first + 1),
                ));
            }
            if rw.namespace.is_empty() {
                return Err(bad("namespace", "missing".into()));
            }
            let mut ips = Vec::with_capacity(rw.workload_ips.len());
            for s in &rw.workload_ips {
                let ip: IpAddr = s
                    .trim()
                    .parse()
                    .map_err(|_| bad("workloadIps", format!("`{s}` is not an IP address")))?;
                let ip = ip.to_canonical();
                if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255u8; 4]) {
                    return Err(bad(
                        "workloadIps",
                        format!("`{s}` cannot be a workload address"),
                    ));
                }
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
            for ip in &ips {
                if let Some(other) = owners.insert(*ip, rw.uid.clone()) {
                    return Err(bad(
                        "workloadIps",
                        format!("{ip} is also an address of workload {other}"),
                    ));
                }
            }
            let protocol = match rw
                .protocol
                .as_deref()
                .map(str::to_ascii_uppercase)
                .as_deref()
            {
                None | Some("TCP") => Protocol::Tcp,
                Some("HBONE") => Protocol::Hbone,
                Some(_) => {
                    return Err(bad(
                        "protocol",
                        format!(
                            "`{}` is neither HBONE nor TCP",
                            rw.protocol.unwrap_or_default()
                        ),
                    ));
                }
            };
            let transport = match rw
                .tunnel_transport
                .as_deref()
                .map(str::to_ascii_uppercase)
                .as_deref()
            {
                None | Some("TCP") => Transport::Tcp,
                Some("QUIC") => Transport::Quic,
                Some(_) => {
                    return Err(bad(
                        "tunnelTransport",
                        format!(
                            "`{}` is neither TCP nor QUIC",
                            rw.tunnel_transport.unwrap_or_default()
                        ),
                    ));
                }
            };
            if transport == Transport::Quic && protocol != Protocol::Hbone {
                return Err(bad(
                    "tunnelTransport",
                    "QUIC needs `protocol: HBONE`".into(),
                ));
            }
            let mut chosen = Vec::new();
            for key in &rw.authorization_policies {
                match content.policies.get(key) {
                    Some(p) => chosen.push(p.clone()),
                    None => warn!(workload = %rw.uid, policy = %key,
                        "workload names an unknown policy, ignored"),
                }
            }
            if !chosen.is_empty() {
                content
                    .selected
                    .entry(rw.uid.clone())
                    .or_default()
                    .extend(chosen.iter().cloned());
                if !rw.name.is_empty() {
                    content
                        .selected
                        .entry(format!("{}/{}", rw.namespace, rw.name))
                        .or_default()
                        .extend(chosen);
                }
            }
            content.workloads.push(Arc::new(Workload {
                uid: rw.uid,
                name: rw.name,
                namespace: rw.namespace,
                service_account: if rw.service_account.is_empty() {
                    "default".into()
                } else {
                    rw.service_account
                },
                trust_domain: Some(rw.trust_domain).filter(|t| !t.is_empty()),
                ips,
                protocol,
                transport,
                node: rw.node,
                services: rw.services.into_keys().collect(),
                local: false,
            }));
        }
        Ok(content)
    }

    /// The policies that apply to `dst`, each once.
    fn applicable(&self, dst: &Workload) -> Vec<&Policy> {
        let by_name = format!("{}/{}", dst.namespace, dst.name);
        let selected = [
            Some(dst.uid.as_str()),
            (!dst.name.is_empty()).then_some(by_name.as_str()),
        ]
        .into_iter()
        .flatten()
        .filter_map(|k| self.selected.get(k))
        .flatten();
        let mut out: Vec<&Policy> = Vec::new();
        for p in self
            .global
            .iter()
            .chain(self.by_namespace.get(&dst.namespace).into_iter().flatten())
            .chain(selected)
        {
            if !out.iter().any(|q| q.key == p.key) {
                out.push(p);
            }
        }
        out
    }
}

fn policy_err(policy: &str, field: &'static str, reason: impl Into<String>) -> RegistryError {
    RegistryError::InvalidPolicy {
        path: None,
        policy: policy.into(),
        field,
        reason: reason.into(),
    }
}

// ---- The file as read: every field optional, unknown fields ignored. ----

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawFile {
    workloads: Vec<RawWorkload>,
    policies: Vec<RawPolicy>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawWorkload {
    uid: String,
    name: String,
    namespace: String,
    service_account: String,
    trust_domain: String,
    workload_ips: Vec<String>,
    protocol: Option<String>,
    tunnel_transport: Option<String>,
    node: String,
    services: BTreeMap<String, IgnoredAny>,
    authorization_policies: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawPolicy {
    name: String,
    namespace: String,
    scope: Option<String>,
    action: Option<String>,
    /// Rules, clauses, matches; a match is read by hand (tags, unknown fields).
    rules: Vec<Vec<Vec<Value>>>,
    dry_run: bool,
}

// ---- Policies as evaluated. ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
}

#[derive(Debug)]
struct Policy {
    key: String,
    namespace: String,
    scope: Scope,
    action: Action,
    rules: Vec<Vec<Vec<Match>>>,
    dry_run: bool,
}

#[derive(Debug)]
enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StrMatch {
    fn matches(&self, s: &str) -> bool {
        match self {
            StrMatch::Exact(v) => s == v,
            StrMatch::Prefix(v) => s.starts_with(v.as_str()),
            StrMatch::Suffix(v) => s.ends_with(v.as_str()),
            StrMatch::Presence => !s.is_empty(),
        }
    }

    fn value(&self) -> &str {
        match self {
            StrMatch::Exact(v) | StrMatch::Prefix(v) | StrMatch::Suffix(v) => v,
            StrMatch::Presence => "",
        }
    }
}

/// One match of a clause: every condition set must hold.
#[derive(Debug, Default)]
struct Match {
    namespaces: Vec<StrMatch>,
    not_namespaces: Vec<StrMatch>,
    /// (namespace, service account)
    service_accounts: Vec<(String, String)>,
    not_service_accounts: Vec<(String, String)>,
    principals: Vec<StrMatch>,
    not_principals: Vec<StrMatch>,
    /// Conditions set that this proxy cannot evaluate (field names).
    unevaluated: Vec<&'static str>,
}

/// A source reduced to what the conditions look at.
struct Peer<'a> {
    /// `td/ns/<ns>/sa/<sa>`; None for plaintext.
    principal: Option<String>,
    /// Empty for plaintext.
    namespace: &'a str,
    account: Option<(&'a str, &'a str)>,
}

impl<'a> Peer<'a> {
    fn new(src: Option<&'a SourcePeer>) -> Self {
        match src {
            None => Peer {
                principal: None,
                namespace: "",
                account: None,
            },
            Some(s) => Peer {
                principal: Some(format!(
                    "{}/ns/{}/sa/{}",
                    s.trust_domain, s.namespace, s.service_account
                )),
                namespace: &s.namespace,
                account: Some((&s.namespace, &s.service_account)),
            },
        }
    }
}

/// A condition pair: some positive entry matches (when any is set) and no negative one.
fn holds<T>(pos: &[T], neg: &[T], f: impl Fn(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&f)) && !neg.iter().any(&f)
}

impl Match {
    fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.unevaluated.is_empty()
    }

    fn matches(&self, peer: &Peer, action: Action) -> bool {
        let principal = |m: &StrMatch| peer.principal.as_deref().is_some_and(|p| m.matches(p));
        let account =
            |(ns, sa): &(String, String)| peer.account == Some((ns.as_str(), sa.as_str()));
        holds(&self.namespaces, &self.not_namespaces, |m| m.matches(peer.namespace))
            && holds(&self.service_accounts, &self.not_service_accounts, account)
            && holds(&self.principals, &self.not_principals, principal)
            // What cannot be evaluated never widens what is allowed.
            && (self.unevaluated.is_empty() || action == Action::Deny)
    }
}

impl Policy {
    fn matches(&self, peer: &Peer) -> bool {
        self.rules.iter().any(|rule| {
            rule.iter().all(|clause| {
                clause.is_empty()
                    || clause
                        .iter()
                        .any(|m| !m.is_empty() && m.matches(peer, self.action))
            })
        })
    }

    fn parse(index: usize, raw: RawPolicy) -> Result<Self, RegistryError> {
        let key = if raw.name.is_empty() {
            format!("#{} ({}/)", index + 1, raw.namespace)
        } else {
            format!("{}/{}", raw.namespace, raw.name)
        };
        let bad = |field: &'static str, reason: String| policy_err(&key, field, reason);
        if raw.name.is_empty() {
            return Err(bad("name", "missing".into()));
        }
        let scope = match raw.scope.as_deref().map(squash).as_deref() {
            Some("GLOBAL") => Scope::Global,
            Some("NAMESPACE") => Scope::Namespace,
            Some("WORKLOADSELECTOR") => Scope::WorkloadSelector,
            None => {
                return Err(bad(
                    "scope",
                    "missing (Global, Namespace or WorkloadSelector)".into(),
                ));
            }
            Some(_) => {
                return Err(bad(
                    "scope",
                    format!(
                        "`{}` is not Global, Namespace or WorkloadSelector",
                        raw.scope.unwrap_or_default()
                    ),
                ));
            }
        };
        let action = match raw.action.as_deref().map(squash).as_deref() {
            Some("ALLOW") => Action::Allow,
            Some("DENY") => Action::Deny,
            None => return Err(bad("action", "missing (Allow or Deny)".into())),
            Some(_) => {
                return Err(bad(
                    "action",
                    format!(
                        "`{}` is neither Allow nor Deny",
                        raw.action.unwrap_or_default()
                    ),
                ));
            }
        };
        if scope == Scope::Namespace && raw.namespace.is_empty() {
            return Err(bad(
                "namespace",
                "missing (needed by scope Namespace)".into(),
            ));
        }
        let mut unevaluated = BTreeSet::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for rule in raw.rules {
            let mut clauses = Vec::with_capacity(rule.len());
            for clause in rule {
                let mut matches = Vec::with_capacity(clause.len());
                for m in clause {
                    let m = parse_match(&key, m)?;
                    unevaluated.extend(m.unevaluated.iter().copied());
                    matches.push(m);
                }
                clauses.push(matches);
            }
            rules.push(clauses);
        }
        if !unevaluated.is_empty() {
            let fields: Vec<&str> = unevaluated.into_iter().collect();
            warn!(policy = %key, action = ?action, fields = %fields.join(","),
                "policy conditions on addresses and ports are not evaluated here: they hold in Deny and fail in Allow policies");
        }
        Ok(Policy {
            key,
            namespace: raw.namespace,
            scope,
            action,
            rules,
            dry_run: raw.dry_run,
        })
    }
}

/// Upper case without `_`: accepts `WorkloadSelector`, `WORKLOAD_SELECTOR`, `allow`...
fn squash(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '_')
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

fn parse_match(policy: &str, v: Value) -> Result<Match, RegistryError> {
    let Value::Mapping(map) = v else {
        return Err(policy_err(
            policy,
            "rules",
            "a match must be a mapping of conditions",
        ));
    };
    let mut m = Match::default();
    for (k, v) in map {
        let Value::String(k) = k else {
            return Err(policy_err(
                policy,
                "rules",
                "a condition name must be a string",
            ));
        };
        match k.as_str() {
            "namespaces" => m.namespaces = string_matches(policy, "namespaces", v)?,
            "notNamespaces" => m.not_namespaces = string_matches(policy, "notNamespaces", v)?,
            "principals" => m.principals = principals(policy, "principals", v)?,
            "notPrincipals" => m.not_principals = principals(policy, "notPrincipals", v)?,
            "serviceAccounts" => m.service_accounts = accounts(policy, "serviceAccounts", v)?,
            "notServiceAccounts" => {
                m.not_service_accounts = accounts(policy, "notServiceAccounts", v)?
            }
            other => match UNEVALUATED.iter().copied().find(|f| *f == other) {
                Some(field) => {
                    if !seq(policy, field, v)?.is_empty() {
                        m.unevaluated.push(field);
                    }
                }
                None => {
                    warn!(policy = %policy, field = %other, "ignoring unknown field in policy match")
                }
            },
        }
    }
    Ok(m)
}

const UNEVALUATED: [&str; 6] = [
    "sourceIps",
    "notSourceIps",
    "destinationIps",
    "notDestinationIps",
    "destinationPorts",
    "notDestinationPorts",
];

fn seq(policy: &str, field: &'static str, v: Value) -> Result<Vec<Value>, RegistryError> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Sequence(s) => Ok(s),
        _ => Err(policy_err(policy, field, "expected a list")),
    }
}

fn string_matches(
    policy: &str,
    field: &'static str,
    v: Value,
) -> Result<Vec<StrMatch>, RegistryError> {
    seq(policy, field, v)?
        .into_iter()
        .map(|e| string_match(policy, field, e))
        .collect()
}

fn principals(policy: &str, field: &'static str, v: Value) -> Result<Vec<StrMatch>, RegistryError> {
    let all = string_matches(policy, field, v)?;
    if let Some(m) = all.iter().find(|m| m.value().starts_with("spiffe://")) {
        return Err(policy_err(
            policy,
            field,
            format!(
                "`{}`: principals are written without the scheme, \
                 `<trust-domain>/ns/<namespace>/sa/<service-account>`",
                m.value()
            ),
        ));
    }
    Ok(all)
}

/// `!Exact v`, `!Prefix v`, `!Suffix v`, `!Presence []`, or the same as a one-entry map.
fn string_match(policy: &str, field: &'static str, v: Value) -> Result<StrMatch, RegistryError> {
    let (kind, value) = match v {
        Value::Tagged(t) => (
            t.tag.to_string().trim_start_matches('!').to_string(),
            t.value,
        ),
        Value::Mapping(m) if m.len() == 1 => {
            let (k, v) = m.into_iter().next().expect("one entry");
            match k {
                Value::String(k) => (k, v),
                _ => (String::new(), v),
            }
        }
        _ => (String::new(), Value::Null),
    };
    let text = |value: Value| match value {
        Value::String(s) => Ok(s),
        _ => Err(policy_err(
            policy,
            field,
            format!("`{kind}` needs a string"),
        )),
    };
    match kind.to_ascii_lowercase().as_str() {
        "exact" => Ok(StrMatch::Exact(text(value)?)),
        "prefix" => Ok(StrMatch::Prefix(text(value)?)),
        "suffix" => Ok(StrMatch::Suffix(text(value)?)),
        "presence" => Ok(StrMatch::Presence),
        _ => Err(policy_err(
            policy,
            field,
            "each entry is `!Exact <value>`, `!Prefix <value>`, `!Suffix <value>` or `!Presence []`",
        )),
    }
}

fn accounts(
    policy: &str,
    field: &'static str,
    v: Value,
) -> Result<Vec<(String, String)>, RegistryError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Account {
        namespace: String,
        service_account: String,
    }
    seq(policy, field, v)?
        .into_iter()
        .map(|e| {
            serde_yaml_ng::from_value::<Account>(e)
                .map(|a| (a.namespace, a.service_account))
                .map_err(|e| {
                    policy_err(
                        policy,
                        field,
                        format!("expected {{namespace, serviceAccount}}: {e}"),
                    )
                })
        })
        .collect()
}

/// What identifies a version of the watched file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    fn of(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow => f.write_str("allowed"),
            Decision::Deny(why) => f.write_str(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ztunnel's local file shape, with fields we ignore (network, networkMode,
    /// canonicalName, locality, status, top-level services, ...).
    const ZTUNNEL_FILE: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  networkMode: Standard
  canonicalName: local
  canonicalRevision: v1
  status: Healthy
  clusterId: cluster1
  locality: {region: r1, zone: z1, subzone: ""}
  capacity: 1
  services:
    "default/example.com":
      80: 8080
    "default/example2.com":
      80: 8080
- uid: cluster1//v1/Pod/shop/cart
  name: cart
  namespace: shop
  serviceAccount: cart
  trustDomain: td.example
  workloadIps: ["10.20.0.7", "fd00:20::7"]
  protocol: HBONE
  tunnelTransport: QUIC
  node: node-b
  services: {}
  authorizationPolicies: ["shop/only-web"]
- uid: cluster1//v1/Pod/legacy/db
  name: db
  namespace: legacy
  workloadIps: ["10.30.0.5"]
  protocol: TCP
  services: {}
policies:
- name: only-web
  namespace: shop
  scope: WorkloadSelector
  action: Allow
  rules:
  - - - principals: [!Exact td.example/ns/shop/sa/web]
      - namespaces: [!Exact ops]
  dryRun: false
- name: no-evil
  namespace: istio-system
  scope: Global
  action: Deny
  rules:
  - - - namespaces: [!Prefix evil]
  dryRun: false
services:
- name: local
  namespace: default
  hostname: example.com
  vips: ["/127.10.0.1"]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/local"]
  canonical: true
"#;

    fn peer(td: &str, ns: &str, sa: &str) -> SourcePeer {
        SourcePeer {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    fn pod(uid: &str, ns: &str, ips: &[&str]) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: ns.into(),
            service_account: "default".into(),
            trust_domain: None,
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            protocol: Protocol::Hbone,
            transport: Transport::Tcp,
            node: String::new(),
            services: Vec::new(),
            local: true,
        }
    }

    #[test]
    fn parses_ztunnel_format() {
        let r = Registry::new();
        assert_eq!(r.load_yaml(ZTUNNEL_FILE).unwrap(), 3);
        let local = r.by_uid("cluster1//v1/Pod/default/local").unwrap();
        assert_eq!(local.protocol, Protocol::Hbone);
        assert_eq!(local.transport, Transport::Tcp);
        assert_eq!(local.trust_domain, None);
        assert_eq!(local.node, "local");
        assert!(!local.local);
        assert_eq!(
            local.services,
            vec!["default/example.com", "default/example2.com"]
        );
        let cart = r.by_uid("cluster1//v1/Pod/shop/cart").unwrap();
        assert_eq!(cart.transport, Transport::Quic);
        assert_eq!(cart.trust_domain.as_deref(), Some("td.example"));
        assert_eq!(cart.service_account, "cart");
        let db = r.by_uid("cluster1//v1/Pod/legacy/db").unwrap();
        assert_eq!(db.protocol, Protocol::Tcp);
        assert_eq!(db.service_account, "default");
        assert_eq!(r.workloads().len(), 3);
    }

    /// The example of the module documentation (the README's) loads as described.
    #[test]
    fn documented_example_loads() {
        let src = include_str!("registry.rs");
        let yaml: String = src
            .lines()
            .skip_while(|l| *l != "//! ```yaml")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .map(|l| {
                format!(
                    "{}\n",
                    l.strip_prefix("//!")
                        .unwrap_or(l)
                        .strip_prefix(' ')
                        .unwrap_or("")
                )
            })
            .collect();
        let r = Registry::new();
        assert_eq!(r.load_yaml(&yaml).unwrap(), 2, "{yaml}");
        let cart = r.by_ip("fd00:20::7".parse().unwrap()).unwrap();
        assert_eq!(
            (cart.protocol, cart.transport),
            (Protocol::Hbone, Transport::Quic)
        );
        let db = r.by_ip("10.30.0.5".parse().unwrap()).unwrap();
        assert_eq!((db.protocol, db.transport), (Protocol::Tcp, Transport::Tcp));
        let mut shop_pod = pod("k", "shop", &["10.60.0.1"]);
        shop_pod.name = "front".into();
        let web = peer("cluster.local", "shop", "web");
        assert_eq!(r.authorize(&shop_pod, Some(&web)), Decision::Allow);
        assert_eq!(
            r.authorize(&shop_pod, Some(&peer("x", "ops", "y"))),
            Decision::Allow
        );
        assert!(r.requires_mtls(&shop_pod));
        assert!(!r.requires_mtls(&db));
    }

    #[test]
    fn lookups_v4_and_v6() {
        let r = Registry::new();
        r.load_yaml(ZTUNNEL_FILE).unwrap();
        let v4 = r.by_ip("10.20.0.7".parse().unwrap()).unwrap();
        let v6 = r.by_ip("fd00:20::7".parse().unwrap()).unwrap();
        assert_eq!(v4.uid, "cluster1//v1/Pod/shop/cart");
        assert!(Arc::ptr_eq(&v4, &v6));
        let mapped = r.by_ip("::ffff:10.30.0.5".parse().unwrap()).unwrap();
        assert_eq!(mapped.name, "db");
        assert!(r.by_ip("10.99.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn local_wins_over_file() {
        let r = Registry::new();
        r.load_yaml(ZTUNNEL_FILE).unwrap();
        r.upsert_local(pod("pod-x", "shop", &["10.20.0.7"]));
        assert_eq!(r.by_ip("10.20.0.7".parse().unwrap()).unwrap().uid, "pod-x");
        assert!(r.by_ip("10.20.0.7".parse().unwrap()).unwrap().local);
        // The file entry keeps its other address and its uid.
        assert_eq!(
            r.by_ip("fd00:20::7".parse().unwrap()).unwrap().uid,
            "cluster1//v1/Pod/shop/cart"
        );
        // A reload does not take the address back.
        r.load_yaml(ZTUNNEL_FILE).unwrap();
        assert_eq!(r.by_ip("10.20.0.7".parse().unwrap()).unwrap().uid, "pod-x");
        // Replace by uid, then leave.
        r.upsert_local(pod("pod-x", "shop", &["10.40.0.1"]));
        assert_eq!(
            r.by_ip("10.20.0.7".parse().unwrap()).unwrap().uid,
            "cluster1//v1/Pod/shop/cart"
        );
        assert_eq!(r.by_ip("10.40.0.1".parse().unwrap()).unwrap().uid, "pod-x");
        r.remove_local("pod-x");
        assert!(r.by_ip("10.40.0.1".parse().unwrap()).is_none());
        assert!(r.by_uid("pod-x").is_none());
    }

    #[test]
    fn reload_replaces_and_broken_yaml_keeps_old() {
        let r = Registry::new();
        r.load_yaml(ZTUNNEL_FILE).unwrap();
        let next =
            "workloads:\n- uid: u1\n  namespace: n\n  workloadIps: [10.1.1.1]\n  services: {}\n";
        assert_eq!(r.load_yaml(next).unwrap(), 1);
        assert!(r.by_ip("10.20.0.7".parse().unwrap()).is_none());
        assert_eq!(r.by_ip("10.1.1.1".parse().unwrap()).unwrap().uid, "u1");
        let err = r
            .load_yaml("workloads:\n- uid: u2\n  workloadIps: [\n")
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::Yaml { line: Some(_), .. }),
            "{err}"
        );
        assert_eq!(r.by_ip("10.1.1.1".parse().unwrap()).unwrap().uid, "u1");
        assert_eq!(r.workloads().len(), 1);
    }

    #[test]
    fn bad_and_duplicate_ips_name_the_workload() {
        let r = Registry::new();
        r.load_yaml(ZTUNNEL_FILE).unwrap();
        let bad = "workloads:\n- uid: w-bad\n  namespace: n\n  workloadIps: [10.0.0.300]\n";
        let e = r.load_yaml(bad).unwrap_err();
        match &e {
            RegistryError::InvalidWorkload {
                workload, field, ..
            } => {
                assert_eq!(workload, "w-bad");
                assert_eq!(*field, "workloadIps");
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("10.0.0.300"), "{e}");
        let dup = "workloads:\n- uid: a\n  namespace: n\n  workloadIps: [fd00::1]\n\
                   - uid: b\n  namespace: n\n  workloadIps: ['fd00:0::1']\n";
        let e = r.load_yaml(dup).unwrap_err().to_string();
        assert!(e.contains("workload b") && e.contains("workload a"), "{e}");
        let quic_tcp =
            "workloads:\n- uid: q\n  namespace: n\n  protocol: TCP\n  tunnelTransport: QUIC\n";
        let e = r.load_yaml(quic_tcp).unwrap_err().to_string();
        assert!(e.contains("tunnelTransport"), "{e}");
        let path = std::env::temp_dir().join("no-such-dir-registry/x.yaml");
        assert!(matches!(
            r.load_file(&path),
            Err(RegistryError::Read { .. })
        ));
        // Nothing changed.
        assert_eq!(r.workloads().len(), 3);
    }

    #[test]
    fn policy_decisions() {
        let r = Registry::new();
        r.load_yaml(ZTUNNEL_FILE).unwrap();
        let cart = r.by_uid("cluster1//v1/Pod/shop/cart").unwrap();
        let web = peer("td.example", "shop", "web");
        let ops = peer("other.td", "ops", "anyone");
        let other = peer("td.example", "shop", "cart");
        let evil = peer("td.example", "evil-ns", "web");
        // Allow list (WorkloadSelector via authorizationPolicies).
        assert_eq!(r.authorize(&cart, Some(&web)), Decision::Allow);
        assert_eq!(r.authorize(&cart, Some(&ops)), Decision::Allow);
        let d = r.authorize(&cart, Some(&other));
        assert!(
            matches!(&d, Decision::Deny(w) if w.contains("shop/only-web")),
            "{d}"
        );
        assert!(matches!(r.authorize(&cart, None), Decision::Deny(_)));
        // Deny wins (global).
        let d = r.authorize(&cart, Some(&evil));
        assert!(
            matches!(&d, Decision::Deny(w) if w.contains("istio-system/no-evil")),
            "{d}"
        );
        // No allow policy: allowed, apart from the global deny.
        let db = r.by_uid("cluster1//v1/Pod/legacy/db").unwrap();
        assert_eq!(r.authorize(&db, Some(&other)), Decision::Allow);
        assert_eq!(r.authorize(&db, None), Decision::Allow);
        assert!(matches!(r.authorize(&db, Some(&evil)), Decision::Deny(_)));
        // No policy at all: allow.
        let empty = Registry::new();
        assert_eq!(empty.authorize(&db, None), Decision::Allow);
        // A local pod described by a file entry of the same namespace/name gets its
        // WorkloadSelector policies.
        let mut local = pod("k8s-uid-1", "shop", &["10.50.0.1"]);
        local.name = "cart".into();
        r.upsert_local(local.clone());
        assert!(matches!(
            r.authorize(&local, Some(&other)),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn policy_details() {
        let yaml = r#"
policies:
- {name: ns-allow, namespace: a, scope: Namespace, action: Allow, dryRun: false,
   rules: [[[{serviceAccounts: [{namespace: b, serviceAccount: client}]}]]]}
- {name: dry, namespace: a, scope: Namespace, action: Deny, dryRun: true,
   rules: [[[{namespaces: [!Presence []]}]]]}
- {name: ports, namespace: c, scope: Namespace, action: Allow, dryRun: false,
   rules: [[[{notDestinationPorts: [9999]}]]]}
- {name: ports-deny, namespace: d, scope: Namespace, action: DENY, dryRun: false,
   rules: [[[{namespaces: [{Exact: x}]}], [{destinationPorts: [80]}]]]}
- {name: empty-match, namespace: e, scope: Namespace, action: Allow, dryRun: false,
   rules: [[[{}]]]}
- {name: empty-clause, namespace: f, scope: Namespace, action: Allow, dryRun: false,
   rules: [[[]]]}
- {name: suffix, namespace: g, scope: NAMESPACE, action: Allow, dryRun: false,
   rules: [[[{principals: [!Suffix /sa/admin], notNamespaces: [!Exact blocked]}]]]}
"#;
        let r = Registry::new();
        r.load_yaml(yaml).unwrap();
        let w = |ns: &str| pod(&format!("p-{ns}"), ns, &[]);
        let client = peer("td", "b", "client");
        assert_eq!(r.authorize(&w("a"), Some(&client)), Decision::Allow); // dry run not enforced
        assert!(matches!(
            r.authorize(&w("a"), Some(&peer("td", "b", "x"))),
            Decision::Deny(_)
        ));
        // Ports cannot be evaluated: Allow fails, Deny holds.
        assert!(matches!(
            r.authorize(&w("c"), Some(&client)),
            Decision::Deny(_)
        ));
        assert!(matches!(
            r.authorize(&w("d"), Some(&peer("td", "x", "s"))),
            Decision::Deny(_)
        ));
        assert_eq!(r.authorize(&w("d"), Some(&client)), Decision::Allow);
        // An empty match never matches; an empty clause always does.
        assert!(matches!(
            r.authorize(&w("e"), Some(&client)),
            Decision::Deny(_)
        ));
        assert_eq!(r.authorize(&w("f"), None), Decision::Allow);
        assert_eq!(
            r.authorize(&w("g"), Some(&peer("td", "ops", "admin"))),
            Decision::Allow
        );
        assert!(matches!(
            r.authorize(&w("g"), Some(&peer("td", "blocked", "admin"))),
            Decision::Deny(_)
        ));
        // Principals with the scheme never match in ztunnel: refused.
        let e = r
            .load_yaml("policies:\n- {name: p, namespace: a, scope: Global, action: Deny, rules: [[[{principals: [!Exact spiffe://td/ns/a/sa/b]}]]]}\n")
            .unwrap_err();
        assert!(
            matches!(
                e,
                RegistryError::InvalidPolicy {
                    field: "principals",
                    ..
                }
            ),
            "{e}"
        );
        let e = r
            .load_yaml("policies:\n- {name: p, namespace: a, scope: Sideways, action: Deny}\n")
            .unwrap_err();
        assert!(
            e.to_string().contains("a/p") && e.to_string().contains("scope"),
            "{e}"
        );
    }

    #[test]
    fn requires_mtls() {
        // STRICT as the control plane converts it.
        let yaml = r#"
policies:
- name: converted_peer_authentication_strict
  namespace: secure
  scope: Namespace
  action: Deny
  rules:
  - - - notPrincipals: [!Presence []]
  dryRun: false
"#;
        let r = Registry::new();
        r.load_yaml(yaml).unwrap();
        let secure = pod("s", "secure", &["10.0.0.1"]);
        let open = pod("o", "open", &["10.0.0.2"]);
        assert!(r.requires_mtls(&secure));
        assert!(!r.requires_mtls(&open));
        assert_eq!(
            r.authorize(&secure, Some(&peer("td", "x", "y"))),
            Decision::Allow
        );
        // An allow list of identities also refuses plaintext.
        r.load_yaml(ZTUNNEL_FILE).unwrap();
        let cart = r.by_uid("cluster1//v1/Pod/shop/cart").unwrap();
        assert!(r.requires_mtls(&cart));
        assert!(!r.requires_mtls(&secure));
    }

    #[tokio::test]
    async fn watch_file_picks_up_rewrites() {
        let dir = std::env::temp_dir().join(format!("registry-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("workloads.yaml");
        let one =
            "workloads:\n- uid: one\n  namespace: n\n  workloadIps: [10.9.0.1]\n  services: {}\n";
        let two = "workloads:\n- uid: two\n  namespace: n\n  workloadIps: [10.9.0.2, fd00:9::2]\n  services: {}\n";
        std::fs::write(&path, one).unwrap();
        let r = Arc::new(Registry::new());
        let task = r.watch_file(path.clone(), Duration::from_millis(20));

        async fn until(r: &Registry, ip: &str) -> bool {
            for _ in 0..250 {
                if r.by_ip(ip.parse().unwrap()).is_some() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        }
        assert!(until(&r, "10.9.0.1").await, "initial load");
        // Rewritten through a rename, as editors and config mounts do.
        let tmp = dir.join("workloads.yaml.tmp");
        std::fs::write(&tmp, two).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(until(&r, "fd00:9::2").await, "rewrite picked up");
        assert!(r.by_ip("10.9.0.1".parse().unwrap()).is_none());
        // A broken file keeps the content.
        std::fs::write(&path, "workloads: [\n").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(r.by_ip("10.9.0.2".parse().unwrap()).is_some());
        // Rewritten in place.
        std::fs::write(&path, one).unwrap();
        assert!(until(&r, "10.9.0.1").await, "in-place rewrite picked up");
        task.abort();
        let _ = task.await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
