//! Local control of a running agent: JSON lines over a Unix stream socket
//! (`<state_dir>/control.sock`). One request per line, one answer per line. This is
//! what `redirect-user pod …` and `redirect-user status` speak.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::warn;

use super::{Agent, PodSpec, PodState, PodStatus};

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    Add {
        pod: PodSpec,
    },
    Del {
        uid: String,
    },
    List,
    Status,
    /// A successor (a newer agent, an uninstall) asks this agent to let go of the node:
    /// see [`super::handover`].
    Handover {
        by: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodReport {
    #[serde(flatten)]
    pub status: PodStatus,
    pub id: Option<u32>,
    pub netns_cookie: Option<u64>,
    pub interfaces: Vec<String>,
    /// Ports with a proxy socket in the engine (e.g. "15001/tcp").
    pub sockets: Vec<String>,
    pub counters: Option<redirect_ebpf::PodCounters>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlResponse {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<PodState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pods: Option<Vec<PodReport>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxies: Option<Vec<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handover: Option<super::handover::HandoverInfo>,
}

impl ControlResponse {
    pub fn err(e: impl ToString) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

/// Serves control requests until the task is dropped.
pub async fn serve(agent: Agent, path: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = session(agent, stream).await {
                warn!(error = %e, "control: session ended with an error");
            }
        });
    }
}

async fn session(agent: Agent, stream: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let answer = match parse_request(&line) {
            Ok(req) => handle(&agent, req).await,
            Err(reason) => ControlResponse::err(reason),
        };
        let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
        out.push(b'\n');
        w.write_all(&out).await?;
        if n > MAX_LINE {
            return Ok(());
        }
    }
}

use tokio::io::AsyncReadExt as _;

/// One request line as read (at most [`MAX_LINE`] + 1 bytes): the request, or why it
/// is refused.
pub fn parse_request(line: &str) -> Result<ControlRequest, String> {
    if line.len() > MAX_LINE {
        return Err("request too long".into());
    }
    serde_json::from_str::<ControlRequest>(line).map_err(|e| format!("bad request: {e}"))
}

async fn handle(agent: &Agent, req: ControlRequest) -> ControlResponse {
    match req {
        ControlRequest::Add { pod } => match agent.add_pod(pod).await {
            Ok(state) => ControlResponse {
                ok: true,
                state: Some(state),
                ..Default::default()
            },
            Err(e) => ControlResponse::err(e),
        },
        ControlRequest::Del { uid } => match agent.del_pod(&uid).await {
            Ok(()) => ControlResponse {
                ok: true,
                ..Default::default()
            },
            Err(e) => ControlResponse::err(e),
        },
        ControlRequest::Handover { by } => match agent.request_handover(by).await {
            Ok(info) => ControlResponse {
                ok: true,
                handover: Some(info),
                ..Default::default()
            },
            Err(e) => ControlResponse::err(e),
        },
        ControlRequest::List | ControlRequest::Status => {
            // The engine's lock can be held by an enrolment: wait for it off the runtime.
            let agent = agent.clone();
            tokio::task::spawn_blocking(move || report(&agent))
                .await
                .unwrap_or_else(|e| ControlResponse::err(format!("status: {e}")))
        }
    }
}

/// Every pod with what the engine holds for it: what `status` prints, `/debug/pods`
/// serves and the per-pod metrics are made of. Blocking (the engine's lock).
pub fn report(agent: &Agent) -> ControlResponse {
    let engine = agent.engine();
    let enrolled = engine.pods();
    let pods = agent
        .list()
        .into_iter()
        .map(|status| {
            let uid = status.spec.uid.clone();
            let e = enrolled.iter().find(|p| p.uid == uid);
            let sockets = engine
                .sockets(&uid)
                .unwrap_or_default()
                .into_iter()
                .map(|(port, udp, _)| format!("{port}/{}", if udp { "udp" } else { "tcp" }))
                .collect();
            PodReport {
                id: e.map(|p| p.id),
                netns_cookie: e.map(|p| p.netns_cookie),
                interfaces: e.map(|p| p.interfaces.clone()).unwrap_or_default(),
                sockets,
                counters: engine.counters(&uid).ok(),
                status,
            }
        })
        .collect();
    ControlResponse {
        ok: true,
        pods: Some(pods),
        proxies: Some(agent.proxies()),
        pin_dir: Some(engine.pin_dir().to_path_buf()),
        ..Default::default()
    }
}

/// Sends one request to the agent at `path` and returns its answer.
pub async fn request(path: &Path, req: &ControlRequest) -> anyhow::Result<ControlResponse> {
    use anyhow::Context;
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "connecting to the agent at {} (is `redirect-user run` or `node-agent` running?)",
            path.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut answer = String::new();
    BufReader::new(r).read_line(&mut answer).await?;
    serde_json::from_str(&answer).context("reading the agent's answer")
}
