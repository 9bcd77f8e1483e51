//! `redirect-user uninstall`: nothing of ours left on the node. A running agent hands
//! over first (its proxy serves its connections in flight on until it is stopped); then
//! every pod is released (programs, rules, routes, map entries: its traffic flows
//! directly again), the node's sock_ops link, the programs and the pinned maps go with
//! the pin directory, the CNI configuration and binary are removed (new pods start
//! without the plugin), and the state directory and the protocol socket are deleted.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Args;
use tracing::{info, warn};

use crate::{
    agent::{Agent, handover},
    cli::{CniInstallArgs, DEFAULT_SOCKET, DEFAULT_STATE_DIR},
    ebpf::{DEFAULT_OWNER_WAIT, DEFAULT_PIN_DIR, Engine, EngineConfig, ProxyIdentity, trust},
};

#[derive(Debug, Clone, Args)]
pub struct UninstallArgs {
    /// The agent's node-agent protocol socket (removed).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The agent's state directory (its pod list; removed).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The engine's pinned state (removed).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Seconds to wait for a running agent to hand over.
    #[arg(long, default_value_t = DEFAULT_OWNER_WAIT.as_secs())]
    pub owner_wait_secs: u64,
    #[command(flatten)]
    pub cni: CniInstallArgs,
}

pub async fn run(args: UninstallArgs) -> Result<()> {
    let wait = Duration::from_secs(args.owner_wait_secs);
    match handover::take_over(&args.state_dir, &args.pin_dir, "uninstall", wait).await {
        Ok(Some(p)) => info!(
            pid = p.info.pid,
            "uninstall: the running agent handed over; stop it (delete its DaemonSet) once this is done"
        ),
        Ok(None) => {}
        Err(e) => {
            warn!(error = %e, "uninstall: no handover; waiting for the owner of the pin directory to exit")
        }
    }
    if args.pin_dir.exists() || args.state_dir.join("pods.json").exists() {
        let cfg = EngineConfig {
            pin_dir: args.pin_dir.clone(),
            // Nothing is served from here: no proxy to trust.
            proxy_identity: ProxyIdentity::Cgroups(Vec::new()),
            owner_wait: wait,
            ..EngineConfig::default()
        };
        let engine = Arc::new(Engine::open(cfg).context("opening the pinned state")?);
        // The pods of the pod list are taken back (with their namespaces), pinned pods
        // that no list names are let go, then every pod is released.
        let agent = Agent::new(engine.clone(), &args.state_dir).context("reading the pod list")?;
        let pods = agent.list().len();
        let failed = agent.release_all().await;
        if !failed.is_empty() {
            for (uid, e) in &failed {
                warn!(uid, error = %e, "uninstall: pod not released");
            }
            bail!(
                "{} of {pods} pods could not be released (see above); nothing else was removed: run uninstall again",
                failed.len()
            );
        }
        let left = tokio::task::spawn_blocking(move || engine.purge())
            .await
            .context("removing the pinned state")??;
        if !left.is_empty() {
            bail!("pinned pods could not be released: {left:?}");
        }
        info!(pods, pin_dir = %args.pin_dir.display(), "uninstall: every pod released, programs detached, pinned state removed");
    }
    crate::cni::install::uninstall(&args.cni.cni_conf_dir, &args.cni.cni_bin_dir)
        .context("removing the CNI configuration and binary")?;
    for file in [&args.socket] {
        match std::fs::remove_file(file) {
            Ok(()) => info!(path = %file.display(), "uninstall: removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %file.display(), error = %e, "uninstall: cannot remove"),
        }
    }
    match std::fs::remove_dir_all(&args.state_dir) {
        Ok(()) => info!(path = %args.state_dir.display(), "uninstall: state directory removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing {}", args.state_dir.display()));
        }
    }
    // Cgroups made for proxies that have exited (a live one goes with the next start,
    // or stays empty once its process exits).
    trust::remove_stale();
    info!("uninstall: done");
    Ok(())
}
