//! The agent's plugin socket: answers the CNI plugin's ADD requests.
//!
//! For each request, [`Membership`] decides (waiting a bounded time for a pod it has not
//! seen); a pod of the mesh is enrolled through [`Agent::add_pod`], and the answer is
//! `enrolled` only once its proxy has acknowledged it and its listeners are in place
//! (state `ready`). Otherwise the ADD is refused with the reason, the pod is let go
//! again (the runtime tears the sandbox down and retries), and the runtime never starts
//! it unredirected.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};
use tracing::{info, warn};

use super::{MAX_LINE, PluginRequest, PluginResponse};
use crate::{
    agent::{Agent, PodSpec, PodState},
    membership::{CniPod, Decision, Membership},
};

/// How long membership may wait for a pod it has not seen yet.
pub const MEMBERSHIP_WAIT: Duration = Duration::from_secs(5);
/// How long an enrolled pod may take to become ready (a proxy connecting, its
/// listeners being found) before the ADD is refused.
pub const READY_WAIT: Duration = Duration::from_secs(4);
/// Requests served at once; more are refused ("agent busy") and the runtime retries.
pub const MAX_CONCURRENT: usize = 32;
/// How long a connection may take to send its request line.
const READ_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("plugin socket {path}: {source}")]
    Socket {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Serves the plugin socket at `path` (mode 0600, taking the path over from an
/// earlier agent) until the task is dropped.
pub async fn serve(
    agent: Agent,
    membership: Arc<dyn Membership>,
    path: &Path,
) -> Result<(), ServeError> {
    let err = |source| ServeError::Socket {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // Bound under a temporary name and made private before it takes the real name:
    // never connectable by others, not even for a moment.
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    info!(socket = %path.display(), "cni: serving the plugin socket");
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "cni: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = slots.clone().try_acquire_owned();
        let (agent, membership) = (agent.clone(), membership.clone());
        tokio::spawn(async move {
            let r = match slot {
                Ok(_slot) => session(&agent, membership.as_ref(), stream).await,
                Err(_) => {
                    agent.metrics().cni_request("busy");
                    warn!(
                        max = MAX_CONCURRENT,
                        "cni: too many requests at once, refusing one"
                    );
                    let busy = PluginResponse::Refused {
                        reason: format!(
                            "agent busy: {MAX_CONCURRENT} requests under way, try again"
                        ),
                    };
                    let (_, mut w) = stream.into_split();
                    write_answer(&mut w, &busy).await
                }
            };
            if let Err(e) = r {
                warn!(error = %e, "cni: plugin connection ended with an error");
            }
        });
    }
}

async fn write_answer(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    answer: &PluginResponse,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(answer).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await
}

/// One connection: requests line by line; a malformed one is answered and ends it.
async fn session(
    agent: &Agent,
    membership: &dyn Membership,
    stream: UnixStream,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut lines).take(MAX_LINE as u64 + 1);
        let n = match tokio::time::timeout(READ_WAIT, limited.read_line(&mut line)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        let (answer, fatal) = match parse_request(&line) {
            Ok(PluginRequest::Add { pod }) => {
                let answer = add(agent, membership, pod).await;
                agent.metrics().cni_request(match &answer {
                    PluginResponse::Enrolled { .. } => "enrolled",
                    PluginResponse::NotInMesh { .. } => "not_in_mesh",
                    PluginResponse::Refused { .. } => "refused",
                });
                (answer, false)
            }
            Err(refusal) => {
                agent.metrics().cni_request("bad_request");
                (refusal, true)
            }
        };
        if fatal {
            warn!(answer = ?answer, "cni: malformed request, closing the connection");
        }
        write_answer(&mut w, &answer).await?;
        if fatal {
            return Ok(());
        }
    }
}

/// One request line as read (at most [`MAX_LINE`] + 1 bytes): the request, or the
/// answer that refuses it (and ends the connection).
pub fn parse_request(line: &str) -> Result<PluginRequest, PluginResponse> {
    if line.len() > MAX_LINE || !line.ends_with('\n') {
        return Err(refused("bad request: line too long or unterminated"));
    }
    serde_json::from_str::<PluginRequest>(line).map_err(|e| refused(format!("bad request: {e}")))
}

fn refused(reason: impl Into<String>) -> PluginResponse {
    PluginResponse::Refused {
        reason: reason.into(),
    }
}

/// An ADD: decide, enrol, wait for the proxy, answer.
pub async fn add(agent: &Agent, membership: &dyn Membership, pod: CniPod) -> PluginResponse {
    let who = format!("{}/{}", pod.namespace, pod.name);
    if pod.name.is_empty() || pod.namespace.is_empty() || pod.netns.as_os_str().is_empty() {
        return refused("bad request: the pod's name, namespace and netns are required");
    }
    // Bounded even if an implementation ignores its wait.
    let decided = tokio::time::timeout(
        MEMBERSHIP_WAIT + Duration::from_secs(1),
        membership.decide(&pod, MEMBERSHIP_WAIT),
    )
    .await;
    let decision = match decided {
        Err(_) => {
            warn!(pod = who, "cni: membership did not answer in time");
            return refused(format!(
                "enrolment failed: membership of pod {who} not decided within {MEMBERSHIP_WAIT:?}"
            ));
        }
        Ok(Err(e)) => {
            warn!(pod = who, error = %e, "cni: membership unknown, ADD refused");
            return refused(format!("enrolment failed: {e}"));
        }
        Ok(Ok(d)) => d,
    };
    let (uid, service_account, dns_capture) = match decision {
        Decision::NotInMesh(reason) => {
            info!(
                pod = who,
                reason, "cni: pod not in the mesh, passed through"
            );
            return PluginResponse::NotInMesh { reason };
        }
        Decision::InMesh {
            uid,
            service_account,
            dns_capture,
        } => (uid, service_account, dns_capture),
    };
    let uid = if uid.is_empty() { pod.uid.clone() } else { uid };
    if uid.is_empty() {
        return refused(format!("enrolment failed: no uid known for pod {who}"));
    }
    let spec = PodSpec {
        uid: uid.clone(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account,
        netns: pod.netns.clone(),
        dns_capture,
    };
    if let Err(pending) = wait_takeover(agent).await {
        warn!(
            pod = who,
            uid, pending, "cni: the takeover from the previous agent is not complete, ADD refused"
        );
        return refused(format!(
            "enrolment deferred: the agent is taking the node over from its predecessor, whose proxy still serves {pending} pods; retry"
        ));
    }
    let state = match agent.add_pod(spec).await {
        Ok(s) => s,
        Err(e) => {
            warn!(pod = who, uid, error = %e, "cni: enrolment failed, ADD refused");
            return refused(format!("enrolment failed: {e}"));
        }
    };
    let state = wait_ready(agent, &uid, state).await;
    if state != PodState::Ready && agent.handed_over() {
        // The successor took the pod over with the rest (it was saved first) and answers
        // the runtime's retry; this agent changes nothing any more.
        warn!(
            pod = who,
            uid, "cni: the agent handed the node over during the ADD, refused for a retry"
        );
        return refused(format!(
            "enrolment interrupted: the agent handed the node over to its successor; retry pod {who}"
        ));
    }
    let reason = match state {
        PodState::Ready => {
            info!(pod = who, uid, "cni: pod enrolled and served by its proxy");
            return PluginResponse::Enrolled { uid };
        }
        PodState::WaitingForProxy => {
            format!("no proxy connected to the agent within {READY_WAIT:?}: pod {who} not enrolled")
        }
        PodState::ProxyRefused(r) => format!("enrolment failed: the proxy refused pod {who}: {r}"),
        PodState::FindingListeners => format!(
            "enrolment failed: the proxy acknowledged pod {who} but its listeners were not found within {READY_WAIT:?}"
        ),
        PodState::Releasing(r) => format!("enrolment failed: pod {who} is being removed: {r}"),
    };
    // The runtime tears this sandbox down on a failed ADD: let the pod go with it (a
    // retry enrols it again).
    match agent.del_pod(&uid).await {
        Ok(()) => {}
        Err(e) => warn!(pod = who, uid, error = %e, "cni: releasing a refused pod failed"),
    }
    warn!(pod = who, uid, reason, "cni: ADD refused");
    refused(reason)
}

/// Waits up to [`READY_WAIT`] while the agent takes the node over from its predecessor
/// ([`Agent::taking_over`]): a pod enrolled meanwhile would be unknown to the proxy that
/// still serves the other pods. `Err` with the pods still pending when the wait ran out.
async fn wait_takeover(agent: &Agent) -> Result<(), usize> {
    let start = Instant::now();
    while agent.taking_over() {
        if start.elapsed() >= READY_WAIT {
            return Err(agent.takeover_pending());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits up to [`READY_WAIT`] for a pod that is not ready yet (no proxy yet, listeners
/// not found yet, the proxy retrying a refusal).
async fn wait_ready(agent: &Agent, uid: &str, mut state: PodState) -> PodState {
    let start = Instant::now();
    while !matches!(state, PodState::Ready | PodState::Releasing(_))
        && start.elapsed() < READY_WAIT
        && !agent.handed_over()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match agent.list().into_iter().find(|p| p.spec.uid == uid) {
            Some(p) => state = p.state,
            None => return PodState::Releasing("removed meanwhile".into()),
        }
    }
    state
}
