//! The proxy's connection and byte counters, under the upstream proxy's metric names and
//! labels (`istio_tcp_*`, reporter `source` or `destination`, unknown values `unknown`),
//! so that dashboards built for it work unchanged.
//!
//! A connection is counted opened when the proxy starts serving it (outbound: accepted
//! on 15001; inbound: the app connection is up), closed when its [`Tracked`] drops, and
//! failed when the upstream side cannot be reached. Bytes are counted as they flow, on
//! the side facing the client: `received` from it, `sent` to it.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{identity::Identity, registry::Workload};

/// What an unknown label value reads, as upstream writes it.
pub const UNKNOWN: &str = "unknown";

/// The labels of every `istio_tcp_*` metric, in upstream's names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// One side of a connection: a workload's name, namespace and principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
}

impl Peer {
    pub fn unknown() -> Self {
        Self {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
        }
    }

    /// A workload of the registry with the identity it presents.
    pub fn of(w: &Workload, id: &Identity) -> Self {
        Self {
            workload: or_unknown(&w.name),
            namespace: or_unknown(&w.namespace),
            principal: id.to_string(),
        }
    }

    /// A peer known only by the identity in its certificate.
    pub fn by_identity(id: Option<&Identity>) -> Self {
        match id {
            Some(id) => Self {
                workload: UNKNOWN.into(),
                namespace: id.namespace.clone(),
                principal: id.to_string(),
            },
            None => Self::unknown(),
        }
    }
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.into()
    } else {
        s.into()
    }
}

/// The proxy's metrics; one per proxy process, shared by its pods.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    /// Pods served (upstream's in-pod workload manager gauges).
    pub active_pods: Gauge,
    pub pending_pods: Gauge,
    /// Connected to the node agent and its snapshot received.
    ready: AtomicBool,
    /// Connections open now (opened and not yet closed), all pods together.
    open: Arc<std::sync::atomic::AtomicU64>,
}

impl ProxyMetrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds these metrics to `r` (the counters are shared, not copied).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "istio_tcp_connections_opened",
            "TCP connections opened by the proxy",
            self.opened.clone(),
        );
        r.register(
            "istio_tcp_connections_closed",
            "TCP connections closed by the proxy",
            self.closed.clone(),
        );
        r.register(
            "istio_tcp_connections_failed",
            "TCP connections the proxy could not open upstream",
            self.failed.clone(),
        );
        r.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client side of TCP connections",
            self.received.clone(),
        );
        r.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client side of TCP connections",
            self.sent.clone(),
        );
        r.register(
            "workload_manager_active_proxy_count",
            "Pods the proxy serves",
            self.active_pods.clone(),
        );
        r.register(
            "workload_manager_pending_proxy_count",
            "Pods whose listeners could not start yet (retried)",
            self.pending_pods.clone(),
        );
    }

    /// Connected to the node agent, its snapshot received.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// A pod's view: its own side of every connection is known.
    pub fn pod(self: &Arc<Self>, me: Peer) -> Arc<PodMetrics> {
        Arc::new(PodMetrics {
            metrics: self.clone(),
            me,
        })
    }

    /// Connections open now: what a draining proxy waits for.
    pub fn open_connections(&self) -> u64 {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn track(&self, labels: TcpLabels) -> Tracked {
        self.opened.get_or_create(&labels).inc();
        self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Tracked {
            open: self.open.clone(),
            received: self.received.get_or_create_owned(&labels),
            sent: self.sent.get_or_create_owned(&labels),
            closed: self.closed.get_or_create_owned(&labels),
            failed: self.failed.get_or_create_owned(&labels),
        }
    }
}

/// One pod's metrics: the pod is the source of its outbound connections and the
/// destination of its inbound ones.
#[derive(Debug)]
pub struct PodMetrics {
    metrics: Arc<ProxyMetrics>,
    me: Peer,
}

/// How the connection was secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    MutualTls,
    Unknown,
}

impl Security {
    fn label(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::Unknown => UNKNOWN,
        }
    }
}

impl PodMetrics {
    /// An outbound connection of the pod's app (reporter `source`).
    pub fn outbound(&self, dst: &Peer, service: Option<&str>, security: Security) -> Tracked {
        self.metrics.track(labels(
            "source",
            &self.me,
            dst,
            service.unwrap_or(UNKNOWN),
            security,
        ))
    }

    /// An inbound connection to the pod's app (reporter `destination`).
    pub fn inbound(&self, src: &Peer, security: Security) -> Tracked {
        self.metrics
            .track(labels("destination", src, &self.me, UNKNOWN, security))
    }
}

fn labels(
    reporter: &'static str,
    src: &Peer,
    dst: &Peer,
    service: &str,
    security: Security,
) -> TcpLabels {
    TcpLabels {
        reporter,
        source_workload: src.workload.clone(),
        source_workload_namespace: src.namespace.clone(),
        source_principal: src.principal.clone(),
        destination_workload: dst.workload.clone(),
        destination_workload_namespace: dst.namespace.clone(),
        destination_principal: dst.principal.clone(),
        destination_service: service.into(),
        request_protocol: "tcp",
        response_flags: "-",
        connection_security_policy: security.label(),
    }
}

/// One open connection: counted closed when dropped.
#[derive(Debug)]
pub struct Tracked {
    open: Arc<std::sync::atomic::AtomicU64>,
    received: Counter,
    sent: Counter,
    closed: Counter,
    failed: Counter,
}

impl Tracked {
    /// The upstream side could not be reached.
    pub fn failed(&self) {
        self.failed.inc();
    }

    /// `s`, the client-facing side, with its bytes counted: read is received, written
    /// is sent.
    pub fn client_side<S>(&self, s: S) -> Counted<S> {
        Counted {
            inner: s,
            read: self.received.clone(),
            written: self.sent.clone(),
        }
    }

    /// `s`, the app side of an inbound connection: what the client sent is written to
    /// the app (received), what the app answers is read (sent).
    pub fn app_side<S>(&self, s: S) -> Counted<S> {
        Counted {
            inner: s,
            read: self.sent.clone(),
            written: self.received.clone(),
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.closed.inc();
    }
}

/// A stream whose bytes are counted as they pass.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    read: Counter,
    written: Counter,
}

impl<S> Counted<S> {
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.inc_by(n as u64);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.inc_by(*n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn text(m: &ProxyMetrics) -> String {
        let mut r = Registry::default();
        m.register(&mut r);
        let mut s = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut s, &r).unwrap();
        s
    }

    #[tokio::test]
    async fn a_connection_counts_opened_bytes_and_closed_under_upstream_names() {
        let m = ProxyMetrics::new();
        let pod = m.pod(Peer {
            workload: "a".into(),
            namespace: "ns".into(),
            principal: "spiffe://cluster.local/ns/ns/sa/a".into(),
        });
        let t = pod.outbound(&Peer::unknown(), None, Security::Unknown);
        let (client, mut far) = tokio::io::duplex(64);
        let mut c = t.client_side(client);
        far.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        c.write_all(b"hi").await.unwrap();
        let open = text(&m);
        assert!(open.contains("istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"a\",source_workload_namespace=\"ns\",source_principal=\"spiffe://cluster.local/ns/ns/sa/a\",destination_workload=\"unknown\",destination_workload_namespace=\"unknown\",destination_principal=\"unknown\",destination_service=\"unknown\",request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"unknown\"} 1"), "{open}");
        assert!(open.contains("istio_tcp_received_bytes_total{reporter=\"source\""));
        assert!(
            open.lines()
                .any(|l| l.starts_with("istio_tcp_received_bytes_total") && l.ends_with(" 5"))
        );
        assert!(
            open.lines()
                .any(|l| l.starts_with("istio_tcp_sent_bytes_total") && l.ends_with(" 2"))
        );
        assert!(
            open.lines()
                .any(|l| l.starts_with("istio_tcp_connections_closed_total") && l.ends_with(" 0"))
        );
        drop(c);
        drop(t);
        let closed = text(&m);
        assert!(
            closed
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_closed_total") && l.ends_with(" 1"))
        );
    }

    #[test]
    fn inbound_reports_the_pod_as_destination() {
        let m = ProxyMetrics::new();
        let pod = m.pod(Peer {
            workload: "b".into(),
            namespace: "nb".into(),
            principal: "spiffe://td/ns/nb/sa/b".into(),
        });
        let src = Identity::new("td", "na", "sa-a");
        let _t = pod.inbound(&Peer::by_identity(Some(&src)), Security::MutualTls);
        let s = text(&m);
        assert!(s.contains("reporter=\"destination\",source_workload=\"unknown\",source_workload_namespace=\"na\",source_principal=\"spiffe://td/ns/na/sa/sa-a\",destination_workload=\"b\""), "{s}");
        assert!(s.contains("connection_security_policy=\"mutual_tls\""));
    }
}
