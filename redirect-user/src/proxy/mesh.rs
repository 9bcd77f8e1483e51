//! The mesh data path behind a pod's listeners: which connections are tunnelled, with
//! which identities, and what the pod's inbound side accepts.
//!
//! - Outbound (15001): a destination the [`Registry`] knows as an HBONE workload gets a
//!   tunnel to its 15008 (or the QUIC transport), presenting the source pod's identity
//!   and expecting the destination's; anything else is passed through as plain TCP.
//! - Inbound tunnel (15008): [`hbone::serve`] with the pod's identity; each stream is
//!   authorised by the registry's policies and connected to the app from inside the pod
//!   with the client's address.
//! - Inbound plaintext (15006): passed on, unless the pod's policy requires mTLS.

use std::{io, net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::{debug, info};

use super::{
    connect_as,
    drain::PodTasks,
    hbone::{self, Outbound, Pool, Refusal},
    identity::{Identity, Tls},
    metrics::{Peer, PodMetrics, Security, Tracked},
    outbound_socket,
    quic::{PodEndpoint, QuicTransport},
    registry::{Decision, Protocol, Registry, SourcePeer, Transport, Workload},
};
use crate::netns::Netns;

/// How HBONE destinations are reached when the registry does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DefaultTransport {
    /// HTTP/2 over TLS to 15008, as the upstream proxy speaks.
    #[default]
    Tcp,
    /// Our QUIC transport (UDP 15009) for every HBONE destination.
    Quic,
}

/// What a proxy shares between its pods.
pub struct Mesh {
    pub tls: Tls,
    pub registry: Arc<Registry>,
    pub pool: Pool,
    pub quic: QuicTransport,
    pub transport: DefaultTransport,
    /// How often inbound tunnel connections are pinged, in milliseconds.
    keepalive_ms: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("trust_domain", &self.tls.trust_domain())
            .field("transport", &self.transport)
            .finish()
    }
}

impl Mesh {
    pub fn new(tls: Tls, registry: Arc<Registry>, transport: DefaultTransport) -> Arc<Self> {
        Arc::new(Self {
            pool: Pool::new(tls.clone()),
            quic: QuicTransport::new(tls.clone()),
            tls,
            registry,
            transport,
            keepalive_ms: (hbone::KEEPALIVE.as_millis() as u64).into(),
        })
    }

    /// Changes how often inbound tunnel connections are pinged (default 30 s).
    pub fn set_keepalive(&self, every: std::time::Duration) {
        self.keepalive_ms.store(
            every.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The identity a workload presents.
    pub fn identity_of(&self, w: &Workload) -> Identity {
        let td = w.trust_domain.as_deref().unwrap_or(self.tls.trust_domain());
        let sa = if w.service_account.is_empty() {
            "default"
        } else {
            &w.service_account
        };
        Identity::new(td, &w.namespace, sa)
    }

    /// Registers an enrolled pod and returns its mesh side (its QUIC endpoint serving).
    /// Call inside a tokio runtime. The registry entry stays until [`Mesh::forget`].
    pub fn pod(self: &Arc<Self>, workload: Workload, netns: Netns) -> io::Result<Arc<PodMesh>> {
        self.pod_with_metrics(workload, netns, None)
    }

    /// [`Mesh::pod`], counting the pod's inbound tunnel streams in `metrics`.
    pub fn pod_with_metrics(
        self: &Arc<Self>,
        workload: Workload,
        netns: Netns,
        metrics: Option<Arc<PodMetrics>>,
    ) -> io::Result<Arc<PodMesh>> {
        let identity = self.identity_of(&workload);
        let server = self.tls.server_config(&identity, super::identity::ALPN_H2);
        let quic = PodEndpoint::open(&netns, &self.tls, &identity)?;
        info!(uid = workload.uid, %identity, ips = ?workload.ips, "mesh: pod registered");
        self.registry.upsert_local(workload.clone());
        let pod = Arc::new(PodMesh {
            mesh: self.clone(),
            uid: workload.uid.clone(),
            workload,
            identity,
            netns,
            server,
            quic,
            tasks: PodTasks::new(),
            metrics,
        });
        pod.quic.serve(Arc::downgrade(&pod));
        Ok(pod)
    }

    /// A pod left this proxy: its workload leaves the registry.
    pub fn forget(&self, uid: &str) {
        self.registry.remove_local(uid);
    }
}

/// One pod's side of the mesh.
pub struct PodMesh {
    mesh: Arc<Mesh>,
    uid: String,
    workload: Workload,
    pub identity: Identity,
    netns: Netns,
    server: Arc<rustls::ServerConfig>,
    quic: PodEndpoint,
    /// Every connection and stream served for the pod (its relay's too).
    tasks: PodTasks,
    metrics: Option<Arc<PodMetrics>>,
}

/// The pod is gone (its relay drained, its tasks ended): the pooled tunnels that
/// started in its namespace are closed with it. Its QUIC endpoint closes as it drops.
impl Drop for PodMesh {
    fn drop(&mut self) {
        self.mesh
            .pool
            .release_netns(self.netns.dev(), self.netns.ino());
        debug!(pod = self.uid, "mesh: pod released");
    }
}

impl PodMesh {
    /// The pod's tasks: its relay runs its connections here.
    pub fn tasks(&self) -> &PodTasks {
        &self.tasks
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// The pod's own workload as the registry holds it now (policies may change).
    fn me(&self) -> Arc<Workload> {
        self.mesh
            .registry
            .by_uid(&self.uid)
            .unwrap_or_else(|| Arc::new(self.workload.clone()))
    }

    /// Whether 15006 refuses plaintext connections for this pod.
    pub fn refuses_plaintext(&self) -> bool {
        self.mesh.registry.requires_mtls(&self.me())
    }

    /// Carries an outbound connection of the pod's app: tunnelled when the destination
    /// is a mesh workload, passed through otherwise.
    pub async fn outbound(
        &self,
        app: TcpStream,
        client: SocketAddr,
        target: SocketAddr,
    ) -> io::Result<()> {
        self.outbound_counted(app, client, target, None).await
    }

    /// [`PodMesh::outbound`], counting the connection in `metrics`.
    pub async fn outbound_counted(
        &self,
        mut app: TcpStream,
        client: SocketAddr,
        target: SocketAddr,
        metrics: Option<&PodMetrics>,
    ) -> io::Result<()> {
        let Some(dst) = self
            .mesh
            .registry
            .by_ip(target.ip())
            .filter(|w| w.protocol == Protocol::Hbone)
        else {
            let tracked = metrics.map(|m| m.outbound(&Peer::unknown(), None, Security::Unknown));
            let up = match outbound_socket(&self.netns, target) {
                Ok(s) => s.connect(target).await,
                Err(e) => Err(e),
            };
            let mut up = up.inspect_err(|_| {
                if let Some(t) = &tracked {
                    t.failed();
                }
            })?;
            match &tracked {
                Some(t) => hbone::pipe(&mut t.client_side(&mut app), &mut up).await?,
                None => hbone::pipe(&mut app, &mut up).await?,
            };
            return Ok(());
        };
        let dst_id = self.mesh.identity_of(&dst);
        let tracked = metrics.map(|m| {
            m.outbound(
                &Peer::of(&dst, &dst_id),
                dst.services.first().map(String::as_str),
                Security::MutualTls,
            )
        });
        let quic =
            dst.transport == Transport::Quic || self.mesh.transport == DefaultTransport::Quic;
        let o = Outbound {
            netns: &self.netns,
            src: &self.identity,
            dst: &dst_id,
            client,
            target,
            tunnel: SocketAddr::new(
                target.ip(),
                if quic {
                    super::quic::PORT_QUIC
                } else {
                    redirect_ebpf::PORT_TUNNEL
                },
            ),
        };
        debug!(pod = self.uid, %target, dst = %dst_id, quic, "mesh: outbound tunnel");
        let r = if quic {
            match self.mesh.quic.open(&self.quic, &o).await {
                Ok(mut t) => pipe_counted(&mut app, &mut t, tracked.as_ref()).await,
                Err(e) => Err(opened_failed(e, tracked.as_ref())),
            }
        } else {
            match self.mesh.pool.open(&o).await {
                Ok(mut t) => pipe_counted(&mut app, &mut t, tracked.as_ref()).await,
                Err(e) => Err(opened_failed(e, tracked.as_ref())),
            }
        };
        if let Err(e) = &r {
            hbone::log_open_failure(&self.uid, target, e);
            // The app sees a reset, not a clean end, when its tunnel fails.
            let _ = socket2::SockRef::from(&app).set_linger(Some(std::time::Duration::ZERO));
        }
        r
    }
}

/// The tunnel could not be opened: counted failed.
fn opened_failed(e: io::Error, tracked: Option<&Tracked>) -> io::Error {
    if let Some(t) = tracked {
        t.failed();
    }
    e
}

/// Pipes the app's connection and its tunnel, counting the app side's bytes.
async fn pipe_counted<T>(
    app: &mut TcpStream,
    tunnel: &mut T,
    tracked: Option<&Tracked>,
) -> io::Result<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    match tracked {
        Some(t) => hbone::pipe(&mut t.client_side(app), tunnel)
            .await
            .map(|_| ()),
        None => hbone::pipe(app, tunnel).await.map(|_| ()),
    }
}

impl hbone::Inbound for PodMesh {
    async fn open(
        &self,
        target: SocketAddr,
        client: SocketAddr,
        peer: Option<&Identity>,
    ) -> Result<TcpStream, Refusal> {
        let src = peer.map(|p| SourcePeer {
            trust_domain: p.trust_domain.clone(),
            namespace: p.namespace.clone(),
            service_account: p.service_account.clone(),
        });
        if let Decision::Deny(why) = self.mesh.registry.authorize(&self.me(), src.as_ref()) {
            return Err(Refusal::Unauthorized(why));
        }
        match tokio::time::timeout(
            hbone::CONNECT_TIMEOUT,
            connect_as(&self.netns, target, client.ip()),
        )
        .await
        {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(Refusal::Unavailable(format!("{target}: {e}"))),
            Err(_) => Err(Refusal::Unavailable(format!("{target}: timed out"))),
        }
    }

    fn pod(&self) -> &str {
        &self.uid
    }

    fn tasks(&self) -> Option<&PodTasks> {
        Some(&self.tasks)
    }

    fn track(&self, peer: Option<&Identity>) -> Option<Tracked> {
        self.metrics
            .as_ref()
            .map(|m| m.inbound(&Peer::by_identity(peer), Security::MutualTls))
    }

    fn keepalive(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.mesh
                .keepalive_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}
