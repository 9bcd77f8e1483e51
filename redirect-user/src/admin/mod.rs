//! Metrics, readiness, liveness and the admin dump, over a small HTTP/1.1 server.
//!
//! Nothing here keeps state of its own: each request asks the parts that own it (the
//! agent and its engine, the watch, the CNI installation, the proxy's counters), so the
//! endpoints and `redirect-user status` cannot disagree.
//!
//! Routes (GET or HEAD; one request per connection):
//! - `/metrics`: Prometheus text format (0.0.4).
//! - `/readyz`, `/healthz/ready`: 200 `ready`, or 503 with one line per reason
//!   ([`ready::readiness`]).
//! - `/healthz`, `/livez`: 200 while the process serves (its serving tasks are what
//!   keeps it running: the process exits when one of them ends).
//! - `/debug/pods`: the agent's pods and their state, the JSON of `status --json`;
//!   answered only to loopback peers (403 otherwise).

pub mod metrics;
pub mod ready;

use std::{
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, info, warn};

use crate::{agent::Agent, k8s::KubeWatch, proxy::metrics::ProxyMetrics};
use ready::{AgentFacts, Facts, KubeFacts};

/// A request head must arrive whole within this long.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The answer must be taken within this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request head.
const MAX_HEAD: usize = 8 * 1024;
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;
/// How often a busy address is tried again.
const BIND_RETRY: Duration = Duration::from_secs(1);

/// An address to serve on, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") || s.is_empty() {
            return Ok(Listen::Off);
        }
        s.parse()
            .map(Listen::At)
            .map_err(|e| format!("{s:?}: {e} (an address such as 0.0.0.0:15014, or `off`)"))
    }
}

/// The parts whose state the endpoints read; what a command does not run is `None`.
#[derive(Default)]
pub struct Parts {
    pub agent: Option<Agent>,
    pub kube: Option<Arc<KubeWatch>>,
    /// Set by the CNI installation after each pass (`--cni-install`).
    pub cni_installed: Option<Arc<AtomicBool>>,
    pub proxy: Option<Arc<ProxyMetrics>>,
}

/// What the endpoints serve from.
pub struct Admin {
    parts: Parts,
    registry: Registry,
}

impl Admin {
    pub fn new(parts: Parts) -> Arc<Self> {
        let mut registry = Registry::default();
        if let Some(p) = &parts.proxy {
            p.register(&mut registry);
        }
        if let Some(a) = &parts.agent {
            a.metrics().register(&mut registry);
        }
        registry.register_collector(Box::new(metrics::StateCollector {
            agent: parts.agent.clone(),
            kube: parts.kube.clone(),
            cni_installed: parts.cni_installed.clone(),
        }));
        Arc::new(Self { parts, registry })
    }

    /// The facts readiness is decided from, now.
    pub fn facts(&self) -> Facts {
        let p = &self.parts;
        Facts {
            agent: p.agent.as_ref().map(|a| AgentFacts {
                // The agent exists only once it took back the pinned state.
                pinned_reconciled: true,
                proxies: a.proxies().len(),
                takeover_pending: a.takeover_pending(),
            }),
            kube: p.kube.as_ref().map(|k| {
                let s = k.status();
                KubeFacts {
                    pods_synced: s.pods_synced,
                    namespaces_synced: s.namespaces_synced,
                }
            }),
            cni_installed: p
                .cni_installed
                .as_ref()
                .map(|c| c.load(std::sync::atomic::Ordering::Relaxed)),
            // Under `run` the agent's proxy count says it; the proxy alone says itself.
            proxy_served: match (&p.agent, &p.proxy) {
                (None, Some(m)) => Some(m.ready()),
                _ => None,
            },
        }
    }

    /// Every metric in the Prometheus text format. Blocking (the engine's counters).
    pub fn metrics_text(&self) -> String {
        let mut s = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut s, &self.registry)
        {
            warn!(error = %e, "admin: metrics could not be encoded");
        }
        s
    }

    /// The pods and their state, as `status --json` shows them. Blocking.
    pub fn pods_json(&self) -> Option<String> {
        let a = self.parts.agent.as_ref()?;
        serde_json::to_string_pretty(&crate::agent::control::report(a)).ok()
    }
}

/// Which routes a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routes {
    pub metrics: bool,
    pub debug: bool,
}

/// The metrics listener: `/metrics` and the probes.
pub const METRICS: Routes = Routes {
    metrics: true,
    debug: false,
};
/// The admin listener: the probes and `/debug/pods` (to loopback peers).
pub const ADMIN: Routes = Routes {
    metrics: false,
    debug: true,
};

/// Serves `routes` on `at` until the task is dropped. An address in use (another
/// process still holds it, as during a rolling update on the host network) is tried
/// again every second, with one warning: the rest of the process goes on meanwhile.
pub async fn serve(admin: Arc<Admin>, at: Listen, routes: Routes) -> std::io::Result<()> {
    let Listen::At(addr) = at else {
        return std::future::pending().await;
    };
    let mut warned = false;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if !warned {
                    warn!(%addr, "admin: address in use, trying again every second");
                    warned = true;
                }
                tokio::time::sleep(BIND_RETRY).await;
            }
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("admin: binding {addr}: {e}"),
                ));
            }
        }
    };
    serve_on(admin, listener, routes).await
}

/// The admin and metrics listeners of a command; one listener with both route sets
/// when they are given the same address.
pub async fn serve_both(
    admin: Arc<Admin>,
    admin_at: Listen,
    metrics_at: Listen,
) -> std::io::Result<()> {
    if admin_at == metrics_at {
        let both = Routes {
            metrics: true,
            debug: true,
        };
        return serve(admin, admin_at, both).await;
    }
    tokio::try_join!(
        serve(admin.clone(), admin_at, ADMIN),
        serve(admin, metrics_at, METRICS)
    )
    .map(|_| ())
}

/// [`serve`] on a bound listener.
pub async fn serve_on(
    admin: Arc<Admin>,
    listener: TcpListener,
    routes: Routes,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    info!(addr = %local, metrics = routes.metrics, debug = routes.debug, "admin: serving");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "admin: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(&admin, stream, peer, routes).await {
                debug!(%peer, error = %e, "admin: connection ended with an error");
            }
        });
    }
}

/// An answer: status, content type, body.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// What a request head asks for, or the error answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Head {
    /// Method is HEAD, path without its query.
    Get {
        head: bool,
        path: String,
    },
    Error(u16, &'static str),
    /// More bytes are needed.
    Partial,
}

pub(crate) fn parse_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(httparse::Error::TooManyHeaders) => Head::Error(431, "too many headers\n"),
        Err(_) => Head::Error(400, "malformed request\n"),
        Ok(httparse::Status::Complete(_)) => {
            let method = req.method.unwrap_or("");
            let path = req.path.unwrap_or("");
            let path = path.split(['?', '#']).next().unwrap_or("").to_string();
            match method {
                "GET" => Head::Get { head: false, path },
                "HEAD" => Head::Get { head: true, path },
                _ => Head::Error(405, "only GET and HEAD\n"),
            }
        }
    }
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Error(400, "incomplete request\n"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(h) = head_so_far(&buf) {
            return Ok(h);
        }
    }
}

/// What the bytes read so far of a request say: `None` while more must be read.
pub(crate) fn head_so_far(buf: &[u8]) -> Option<Head> {
    match parse_head(buf) {
        Head::Partial if buf.len() >= MAX_HEAD => {
            Some(Head::Error(431, "request head too large\n"))
        }
        Head::Partial => None,
        h => Some(h),
    }
}

async fn connection(
    admin: &Arc<Admin>,
    mut stream: TcpStream,
    peer: SocketAddr,
    routes: Routes,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(h) => h?,
        Err(_) => Head::Error(408, "request head not received in time\n"),
    };
    let (answer, head_only) = match head {
        Head::Get { head, path } => (route(admin, &path, peer, routes).await, head),
        Head::Error(status, why) => (Answer::text(status, why), false),
        Head::Partial => unreachable!("read_head returns complete heads"),
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.status,
        reason(answer.status),
        answer.content_type,
        answer.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(answer.body.as_bytes());
    }
    match tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "answer not taken in time",
        )),
    }
}

/// Runs blocking work (engine reads) off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

async fn route(admin: &Arc<Admin>, path: &str, peer: SocketAddr, routes: Routes) -> Answer {
    match path {
        "/healthz" | "/livez" => Answer::text(200, "ok\n"),
        "/readyz" | "/healthz/ready" => match ready::readiness(&admin.facts()) {
            Ok(()) => Answer::text(200, "ready\n"),
            Err(reasons) => {
                let mut body = String::from("not ready:\n");
                for r in reasons {
                    body.push_str(&r);
                    body.push('\n');
                }
                Answer::text(503, body)
            }
        },
        "/metrics" if routes.metrics => {
            let a = admin.clone();
            match blocking(move || a.metrics_text()).await {
                Some(body) => Answer {
                    status: 200,
                    content_type: prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    body,
                },
                None => Answer::text(500, "metrics failed\n"),
            }
        }
        "/debug/pods" if routes.debug => {
            if !peer.ip().to_canonical().is_loopback() {
                return Answer::text(403, "only from the node itself (loopback)\n");
            }
            let a = admin.clone();
            match blocking(move || a.pods_json()).await {
                Some(Some(mut body)) => {
                    body.push('\n');
                    Answer {
                        status: 200,
                        content_type: "application/json",
                        body,
                    }
                }
                Some(None) => Answer::text(404, "no agent in this process\n"),
                None => Answer::text(500, "report failed\n"),
            }
        }
        _ => Answer::text(404, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_are_parsed_or_refused() {
        assert_eq!(
            parse_head(b"GET /readyz?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Head::Get {
                head: false,
                path: "/readyz".into()
            }
        );
        assert_eq!(
            parse_head(b"HEAD /metrics HTTP/1.0\r\n\r\n"),
            Head::Get {
                head: true,
                path: "/metrics".into()
            }
        );
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nHo"), Head::Partial);
        assert!(matches!(
            parse_head(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Head::Error(405, _)
        ));
        assert!(matches!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n"),
            Head::Error(400, _)
        ));
    }

    #[test]
    fn listen_addresses_parse_or_are_off() {
        assert_eq!("off".parse::<Listen>(), Ok(Listen::Off));
        assert_eq!(
            "127.0.0.1:0".parse::<Listen>(),
            Ok(Listen::At("127.0.0.1:0".parse().unwrap()))
        );
        assert!("localhost".parse::<Listen>().is_err());
    }

    async fn get(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_server_answers_probes_and_refuses_the_rest() {
        let metrics = ProxyMetrics::new();
        let admin = Admin::new(Parts {
            proxy: Some(metrics.clone()),
            ..Parts::default()
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve_on(admin, l, METRICS));
        let r = get(addr, b"GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("proxy: not connected"), "{r}");
        metrics.set_ready(true);
        let r = get(addr, b"GET /healthz/ready HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let r = get(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.contains("workload_manager_active_proxy_count 0"), "{r}");
        let r = get(addr, b"GET /debug/pods HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get(addr, b"garbage\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let r = get(addr, &[b'a'; MAX_HEAD]).await;
        assert!(r.starts_with("HTTP/1.1 4"), "{r}");
        // A client that sends nothing is let go; the server goes on serving.
        let start = std::time::Instant::now();
        let r = get(addr, b"").await;
        assert!(r.starts_with("HTTP/1.1 408"), "{r}");
        assert!(start.elapsed() < READ_TIMEOUT + Duration::from_secs(2));
        let r = get(addr, b"GET /livez HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        server.abort();
    }
}
