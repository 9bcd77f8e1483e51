//! HBONE: one TCP connection carried as one HTTP/2 CONNECT stream inside mutual TLS, to
//! the destination pod's port 15008 (reference: hbone.md).
//!
//! - [`Pool`] (client): TLS connections from the source pod's namespace presenting the
//!   source workload's identity, pooled per (source identity, destination identity,
//!   source pod namespace, source IP, destination address), at most 100 streams each,
//!   released after 5 idle minutes (upstream's `POOL_UNUSED_RELEASE_TIMEOUT`); a key
//!   leaves the pool with its last connection, and a removed pod's connections are
//!   closed ([`Pool::release_netns`]).
//! - [`serve`] (server): one TLS connection presenting the pod's identity; each CONNECT
//!   stream is checked ([`check_request`]), authorised, and answered 200 only once the
//!   connection to the app is up.
//! - [`H2Io`]: a stream as `AsyncRead + AsyncWrite`; shutting down the write side sends
//!   END_STREAM, the peer's END_STREAM reads as end of file (half-close both ways).

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::{debug, info, warn};

use super::{
    drain::PodTasks,
    identity::{Identity, Tls, identities_of},
    outbound_socket, unmap,
};
use crate::netns::Netns;

pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
pub const MAX_FRAME: u32 = 1 << 20;
/// Streams per pooled client connection.
pub const CLIENT_MAX_STREAMS: usize = 100;
/// Concurrent streams the server accepts per connection.
pub const SERVER_MAX_STREAMS: u32 = 200;
pub const POOL_IDLE: Duration = Duration::from_secs(300);
/// A peer that has not finished TLS and the HTTP/2 preface by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Larger request headers are refused (the stream is reset, the connection lives).
pub const MAX_HEADER_LIST: u32 = 16 << 10;
/// How often the server pings a connection; a ping unanswered for as long (at most 10 s)
/// closes it.
pub const KEEPALIVE: Duration = Duration::from_secs(30);

/// Set once this process's inbound servers are to wind down (a proxy that handed its
/// pods over and is stopping): each connection is told GOAWAY, finishes its streams
/// and closes; the clients open new connections (to the successor's listeners).
static SERVERS_DRAINING: std::sync::LazyLock<tokio::sync::watch::Sender<bool>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(false));
/// Inbound connections this process serves now.
static SERVER_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Winds every inbound HBONE connection of this process down (see
/// [`SERVERS_DRAINING`]); [`server_connections`] tells when they are gone.
pub fn drain_servers() {
    SERVERS_DRAINING.send_replace(true);
}

/// Inbound HBONE connections this process serves now.
pub fn server_connections() -> usize {
    SERVER_CONNECTIONS.load(Ordering::SeqCst)
}

/// Counts one inbound connection while it lives.
struct ServerConnection;

impl ServerConnection {
    fn new() -> Self {
        SERVER_CONNECTIONS.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for ServerConnection {
    fn drop(&mut self) {
        SERVER_CONNECTIONS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A stream the server refused unserved (GOAWAY, REFUSED_STREAM): safe to try again on
/// another connection.
fn refused(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// Why an inbound CONNECT is refused, with the status it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("denied: {0}")]
    Unauthorized(String),
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Checks a request's method and authority against the address the tunnel connection
/// arrived at; the authority's address is where the app connection goes. Service
/// hostnames are not resolved here: the authority must be `ip:port` (`[v6]:port`).
pub fn check_request(
    method: &str,
    authority: &str,
    arrived_at: IpAddr,
) -> Result<SocketAddr, Refusal> {
    if method != Method::CONNECT.as_str() {
        return Err(Refusal::BadRequest(format!("method {method}, not CONNECT")));
    }
    let target: SocketAddr = authority
        .parse()
        .map_err(|_| Refusal::BadRequest(format!("authority {authority:?} is not ip:port")))?;
    let target = unmap(target);
    if target.ip() != unmap(SocketAddr::new(arrived_at, 0)).ip() {
        return Err(Refusal::BadRequest(format!(
            "authority {target} is not this connection's destination {arrived_at}"
        )));
    }
    Ok(target)
}

/// `authority` as the request's URI: `ip:port`, `[v6]:port`.
pub fn authority_uri(target: SocketAddr) -> http::Uri {
    http::Uri::builder()
        .authority(target.to_string())
        .build()
        .expect("a socket address is an authority")
}

// ---------------------------------------------------------------------------------------
// Streams as byte pipes.

/// One HBONE stream as a byte pipe.
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    /// END_STREAM sent.
    ended: bool,
    /// Held while the stream lives (the pool's stream count).
    _guard: Option<StreamGuard>,
}

impl H2Io {
    fn new(send: SendStream<Bytes>, recv: RecvStream, guard: Option<StreamGuard>) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            ended: false,
            _guard: guard,
        }
    }
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(b)) => {
                    let n = b.len();
                    self.recv
                        .flow_control()
                        .release_capacity(n)
                        .map_err(h2_io_error)?;
                    self.pending = b;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io_error)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed by the peer",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-close: END_STREAM to the peer; reading goes on.
    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ended {
            return Poll::Ready(Ok(()));
        }
        self.ended = true;
        self.send.reserve_capacity(0);
        self.send
            .send_data(Bytes::new(), true)
            .map_err(h2_io_error)
            .into()
    }
}

/// Copies both ways until both sides have ended, half-closes carried across.
pub async fn pipe<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    // 64 KiB: a few TLS records per read; larger buffers cost a memset per connection.
    tokio::io::copy_bidirectional_with_sizes(a, b, 64 << 10, 64 << 10).await
}

// ---------------------------------------------------------------------------------------
// Client.

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    src: Identity,
    dst: Identity,
    /// The source pod's namespace (device, inode): its connections start there.
    netns: (u64, u64),
    src_ip: IpAddr,
    tunnel: SocketAddr,
}

struct Pooled {
    send: h2::client::SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    /// The task driving the connection: aborting it closes the connection.
    driver: tokio::task::AbortHandle,
}

/// Counts a pooled connection's live streams.
struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The pooled connections of one key, and its last failed connect: openers that queued
/// behind a failing connect fail with it for a moment instead of each trying in turn.
#[derive(Default)]
struct SlotState {
    conns: Vec<Pooled>,
    failed: Option<(Instant, io::ErrorKind, String)>,
}

impl SlotState {
    /// Nothing to keep: no live connection, no failure recent enough to fail fast on.
    fn unused(&mut self) -> bool {
        self.conns.retain(|p| !p.closed.load(Ordering::Acquire));
        self.conns.is_empty()
            && self
                .failed
                .as_ref()
                .is_none_or(|(at, _, _)| at.elapsed() >= FAIL_FAST)
    }
}

type Slots = Arc<Mutex<HashMap<PoolKey, Slot>>>;

fn lock_slots(
    s: &Mutex<HashMap<PoolKey, Slot>>,
) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Slot>> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes `key` if its slot is unused (a slot being opened on is kept).
fn forget_if_unused(slots: &Mutex<HashMap<PoolKey, Slot>>, key: &PoolKey) {
    let mut map = lock_slots(slots);
    let unused = map
        .get(key)
        .is_some_and(|slot| slot.try_lock().is_ok_and(|mut s| s.unused()));
    if unused {
        map.remove(key);
    }
}

type Slot = Arc<tokio::sync::Mutex<SlotState>>;

const FAIL_FAST: Duration = Duration::from_secs(1);

/// A tunnel to open: who asks, for where, through which peer.
#[derive(Debug, Clone)]
pub struct Outbound<'a> {
    /// The source pod's namespace: the tunnel's TCP connection starts there.
    pub netns: &'a Netns,
    pub src: &'a Identity,
    pub dst: &'a Identity,
    /// The app's address (the accepted connection's peer).
    pub client: SocketAddr,
    /// Where the app was going: the CONNECT authority.
    pub target: SocketAddr,
    /// The peer's tunnel port (`target.ip():15008`).
    pub tunnel: SocketAddr,
}

/// HBONE client connections, shared by every pod of a proxy.
pub struct Pool {
    tls: Tls,
    slots: Slots,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("keys", &self.keys()).finish()
    }
}

impl Pool {
    pub fn new(tls: Tls) -> Self {
        Self {
            tls,
            slots: Slots::default(),
        }
    }

    /// Keys (source, destination, source pod, peer) the pool holds.
    pub fn keys(&self) -> usize {
        lock_slots(&self.slots).len()
    }

    /// Closes the connections that started in the namespace (dev, ino) (a pod that
    /// left) and forgets their keys.
    pub fn release_netns(&self, dev: u64, ino: u64) {
        let gone: Vec<Slot> = {
            let mut map = lock_slots(&self.slots);
            let keys: Vec<PoolKey> = map
                .keys()
                .filter(|k| k.netns == (dev, ino))
                .cloned()
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        for slot in gone {
            // An opener holding the slot belongs to the pod, whose tasks ended first.
            match slot.try_lock() {
                Ok(s) => s.conns.iter().for_each(|p| {
                    p.closed.store(true, Ordering::Release);
                    p.driver.abort();
                }),
                Err(_) => debug!(dev, ino, "hbone: pooled slot busy at pod removal"),
            }
        }
    }

    /// Live pooled connections (all keys).
    pub fn connections(&self) -> usize {
        let slots: Vec<Slot> = lock_slots(&self.slots).values().cloned().collect();
        slots
            .iter()
            .map(|s| {
                s.try_lock()
                    .map(|v| {
                        v.conns
                            .iter()
                            .filter(|p| !p.closed.load(Ordering::Acquire))
                            .count()
                    })
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Opens one stream to `o.target` through the peer's 15008; returns once the peer
    /// answered 200 (its connection to the app is up). A stream refused by a server
    /// winding down (GOAWAY) is opened again on another connection.
    pub async fn open(&self, o: &Outbound<'_>) -> io::Result<H2Io> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.open_once(o).await {
                Err(Opened::Refused(e)) if tries < 3 => {
                    debug!(tunnel = %o.tunnel, error = %e, "hbone: stream refused by a server winding down, trying another connection");
                }
                Err(Opened::Refused(e)) => return Err(h2_io_error(e)),
                Err(Opened::Failed(e)) => return Err(e),
                Ok(io) => return Ok(io),
            }
        }
    }

    async fn open_once(&self, o: &Outbound<'_>) -> Result<H2Io, Opened> {
        let key = PoolKey {
            src: o.src.clone(),
            dst: o.dst.clone(),
            netns: (o.netns.dev(), o.netns.ino()),
            src_ip: o.client.ip(),
            tunnel: o.tunnel,
        };
        let slot = {
            let mut map = lock_slots(&self.slots);
            if !map.contains_key(&key) {
                // New keys are rare: forget the unused ones first (connections closed,
                // failures past their moment), so keys never outgrow what is in use.
                map.retain(|_, s| s.try_lock().map(|mut s| !s.unused()).unwrap_or(true));
            }
            map.entry(key.clone()).or_default().clone()
        };
        let (send, guard) = {
            let mut slot = slot.lock().await;
            slot.conns.retain(|p| !p.closed.load(Ordering::Acquire));
            let free = slot
                .conns
                .iter()
                .position(|p| p.streams.load(Ordering::Acquire) < CLIENT_MAX_STREAMS);
            let i = match free {
                Some(i) => i,
                None => {
                    if let Some((at, kind, why)) = &slot.failed
                        && at.elapsed() < FAIL_FAST
                    {
                        return Err(Opened::Failed(io::Error::new(*kind, why.clone())));
                    }
                    match self.connect(o, &key).await {
                        Ok(p) => {
                            slot.failed = None;
                            slot.conns.push(p);
                            slot.conns.len() - 1
                        }
                        Err(e) => {
                            slot.failed = Some((Instant::now(), e.kind(), e.to_string()));
                            return Err(Opened::Failed(e));
                        }
                    }
                }
            };
            let p = &slot.conns[i];
            p.streams.fetch_add(1, Ordering::AcqRel);
            (
                (p.send.clone(), p.closed.clone()),
                StreamGuard(p.streams.clone()),
            )
        };
        let (send, closed) = send;
        // A refusal means the connection takes no new streams: never pick it again.
        let sort = |e: h2::Error| {
            if refused(&e) {
                closed.store(true, Ordering::Release);
                Opened::Refused(e)
            } else {
                Opened::Failed(h2_io_error(e))
            }
        };
        let mut send = send.ready().await.map_err(sort)?;
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority_uri(o.target))
            .header("forwarded", format!("for=\"{}\"", o.client));
        if let Some(tp) = traceparent() {
            req = req.header("traceparent", tp);
        }
        let req = req
            .body(())
            .map_err(|e| Opened::Failed(io::Error::other(e)))?;
        let (resp, stream) = send.send_request(req, false).map_err(sort)?;
        let resp = resp.await.map_err(sort)?;
        if resp.status() != StatusCode::OK {
            return Err(Opened::Failed(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("HBONE peer {} answered {}", o.tunnel, resp.status()),
            )));
        }
        Ok(H2Io::new(stream, resp.into_body(), Some(guard)))
    }

    async fn connect(&self, o: &Outbound<'_>, key: &PoolKey) -> io::Result<Pooled> {
        let started = Instant::now();
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            outbound_socket(o.netns, o.tunnel)?.connect(o.tunnel),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting to the HBONE peer"))??;
        // Built once per (source, destination) pair and cached by `Tls`.
        let config =
            self.tls
                .client_config(o.src, std::slice::from_ref(o.dst), super::identity::ALPN_H2);
        let connector = tokio_rustls::TlsConnector::from(config);
        // No SNI is sent (the config disables it); the name is a placeholder.
        let name = rustls::pki_types::ServerName::IpAddress(o.tunnel.ip().into());
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "TLS handshake with the HBONE peer")
            })??;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(h2_io_error)?;
        let streams = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicBool::new(false));
        debug!(src = %o.src, dst = %o.dst, peer = %o.tunnel, elapsed_us = started.elapsed().as_micros() as u64, "hbone: pooled connection opened");
        let driver = tokio::spawn(drive_client(
            conn,
            streams.clone(),
            closed.clone(),
            o.tunnel,
            Arc::downgrade(&self.slots),
            key.clone(),
        ));
        Ok(Pooled {
            send,
            streams,
            closed,
            driver: driver.abort_handle(),
        })
    }
}

/// Why a stream could not be opened.
enum Opened {
    /// The server refused it unserved: another connection may take it.
    Refused(h2::Error),
    Failed(io::Error),
}

/// Drives a pooled connection; closes it after [`POOL_IDLE`] without streams. Its key
/// leaves the pool with it, unless another connection uses the key.
async fn drive_client<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    streams: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    peer: SocketAddr,
    slots: std::sync::Weak<Mutex<HashMap<PoolKey, Slot>>>,
    key: PoolKey,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut idle_since = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    debug!(%peer, error = %e, "hbone: pooled connection ended");
                }
                break;
            }
            _ = tick.tick() => {
                if streams.load(Ordering::Acquire) > 0 {
                    idle_since = Instant::now();
                } else if idle_since.elapsed() >= POOL_IDLE {
                    debug!(%peer, "hbone: idle pooled connection released");
                    closed.store(true, Ordering::Release);
                    break;
                }
            }
        }
    }
    closed.store(true, Ordering::Release);
    drop(conn);
    if let Some(slots) = slots.upgrade() {
        forget_if_unused(&slots, &key);
    }
}

/// A W3C traceparent with a fresh random trace and span id.
pub(super) fn traceparent() -> Option<String> {
    let mut b = [0u8; 24];
    getrandom(&mut b)?;
    let hex = |s: &[u8]| s.iter().map(|x| format!("{x:02x}")).collect::<String>();
    Some(format!("00-{}-{}-01", hex(&b[..16]), hex(&b[16..])))
}

fn getrandom(buf: &mut [u8]) -> Option<()> {
    // SAFETY: writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    (n == buf.len() as isize).then_some(())
}

// ---------------------------------------------------------------------------------------
// Server.

/// What the server needs to know about the pod it serves and to reach its app.
pub trait Inbound: Send + Sync + 'static {
    /// Authorises the peer and connects to `target` inside the pod, the client's
    /// address as source; `Err` becomes the stream's status.
    fn open(
        &self,
        target: SocketAddr,
        client: SocketAddr,
        peer: Option<&Identity>,
    ) -> impl Future<Output = Result<TcpStream, Refusal>> + Send;
    /// The pod, for logs.
    fn pod(&self) -> &str;
    /// How often connections are pinged.
    fn keepalive(&self) -> Duration {
        KEEPALIVE
    }
    /// The pod's tasks, where each stream runs (so the pod's removal ends them);
    /// `None`: plain tokio tasks.
    fn tasks(&self) -> Option<&PodTasks> {
        None
    }
    /// Counts one inbound stream whose app connection is up (closed when dropped);
    /// `None`: not counted.
    fn track(&self, _peer: Option<&Identity>) -> Option<super::metrics::Tracked> {
        None
    }
}

/// Runs `f` as a task of the pod, or a plain task; `false` once the pod is draining.
pub(super) fn spawn_in<F>(tasks: Option<&PodTasks>, f: F) -> bool
where
    F: Future<Output = ()> + Send + 'static,
{
    match tasks {
        Some(t) => t.spawn(f),
        None => {
            tokio::spawn(f);
            true
        }
    }
}

/// Aborts a task when dropped (with the future that spawned it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves one accepted connection on 15008: TLS with the pod's identity, then HTTP/2;
/// each CONNECT stream in its own task. Returns when the connection ends.
pub async fn serve<I: Inbound>(
    inbound: Arc<I>,
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> io::Result<()> {
    let arrived_at = unmap(tcp.local_addr()?).ip();
    tcp.set_nodelay(true)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let setup = async {
        let tls = acceptor.accept(tcp).await?;
        let peer_id = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| identities_of(c).into_iter().next());
        let conn = server_handshake(tls).await?;
        io::Result::Ok((conn, peer_id))
    };
    let (conn, peer_id) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, setup).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            info!(pod = inbound.pod(), %peer, error = %e, "hbone: inbound handshake refused");
            return Err(e);
        }
        Err(_) => {
            info!(pod = inbound.pod(), %peer, "hbone: inbound handshake timed out");
            return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake"));
        }
    };
    serve_connection(inbound, conn, arrived_at, peer, peer_id).await;
    Ok(())
}

/// The server's HTTP/2 handshake on a connection (TLS done), with the server's limits.
pub(crate) async fn server_handshake<T>(io: T) -> io::Result<h2::server::Connection<T, Bytes>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(h2_io_error)
}

/// Serves the CONNECT streams of one HTTP/2 connection (the part of [`serve`] after the
/// handshakes: the peer's bytes from here on are HTTP/2 frames); returns when it ends.
pub(crate) async fn serve_connection<I, T>(
    inbound: Arc<I>,
    mut conn: h2::server::Connection<T, Bytes>,
    arrived_at: IpAddr,
    peer: SocketAddr,
    peer_id: Option<Identity>,
) where
    I: Inbound,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let peer_id = peer_id.map(Arc::new);
    let _counted = ServerConnection::new();
    let mut draining = SERVERS_DRAINING.subscribe();
    let mut winding_down = false;
    // Pings run beside the connection, which must go on being driven (by `accept`) for
    // the pong to be read at all.
    let dead = Arc::new(tokio::sync::Notify::new());
    let pinger = conn.ping_pong().map(|mut p| {
        let (every, dead) = (inbound.keepalive(), dead.clone());
        AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let wait = every.min(HANDSHAKE_TIMEOUT);
                let pong = tokio::time::timeout(wait, p.ping(h2::Ping::opaque())).await;
                if !matches!(pong, Ok(Ok(_))) {
                    dead.notify_one();
                    return;
                }
            }
        }))
    });
    loop {
        tokio::select! {
            next = conn.accept() => {
                let Some(next) = next else { break };
                let (req, respond) = match next {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(pod = inbound.pod(), %peer, error = %e, "hbone: inbound connection error");
                        break;
                    }
                };
                let task_inbound = inbound.clone();
                let peer_id = peer_id.clone();
                // Refused while the pod drains: the stream is reset unserved, the
                // connection goes on carrying the streams already open.
                spawn_in(inbound.tasks(), async move {
                    let inbound = task_inbound;
                    stream(&*inbound, req, respond, arrived_at, peer, peer_id.as_deref()).await;
                });
            }
            () = dead.notified() => {
                info!(pod = inbound.pod(), %peer, "hbone: peer did not answer a ping, connection closed");
                break;
            }
            told = async { draining.wait_for(|d| *d).await.is_ok() }, if !winding_down => {
                winding_down = true;
                if told {
                    debug!(pod = inbound.pod(), %peer, "hbone: winding down, GOAWAY sent");
                    conn.graceful_shutdown();
                }
            }
        }
    }
    drop(pinger);
}

async fn stream<I: Inbound>(
    inbound: &I,
    req: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    arrived_at: IpAddr,
    tunnel_peer: SocketAddr,
    peer_id: Option<&Identity>,
) {
    let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
    let opened = match check_request(req.method().as_str(), authority, arrived_at) {
        Ok(target) => {
            // The app sees the client pod's address; its port is the kernel's choice.
            let client = SocketAddr::new(tunnel_peer.ip(), 0);
            inbound
                .open(target, client, peer_id)
                .await
                .map(|s| (s, target))
        }
        Err(r) => Err(r),
    };
    let (mut app, target) = match opened {
        Ok(x) => x,
        Err(r) => {
            info!(pod = inbound.pod(), peer = %tunnel_peer, identity = ?peer_id.map(|i| i.to_string()), status = r.status().as_u16(), reason = %r, "hbone: inbound stream refused");
            let resp = Response::builder().status(r.status()).body(()).unwrap();
            let _ = respond.send_response(resp, true);
            return;
        }
    };
    let resp = Response::builder().status(StatusCode::OK).body(()).unwrap();
    let send = match respond.send_response(resp, false) {
        Ok(s) => s,
        Err(e) => {
            debug!(pod = inbound.pod(), error = %e, "hbone: client left before the answer");
            return;
        }
    };
    let mut io = H2Io::new(send, req.into_body(), None);
    let piped = match inbound.track(peer_id) {
        Some(t) => pipe(&mut io, &mut t.app_side(&mut app)).await,
        None => pipe(&mut io, &mut app).await,
    };
    if let Err(e) = piped {
        debug!(pod = inbound.pod(), %target, error = %e, "hbone: inbound stream ended with an error");
    }
}

/// Logs an outbound tunnel failure once per kind.
pub fn log_open_failure(pod: &str, target: SocketAddr, e: &io::Error) {
    warn!(pod, %target, error = %e, "hbone: outbound tunnel failed, connection closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_requests_are_checked_against_the_connection() {
        let here: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            check_request("CONNECT", "10.0.0.2:8080", here),
            Ok("10.0.0.2:8080".parse().unwrap())
        );
        assert_eq!(
            check_request("GET", "10.0.0.2:8080", here)
                .unwrap_err()
                .status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            check_request("CONNECT", "10.0.0.3:8080", here)
                .unwrap_err()
                .status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            check_request("CONNECT", "svc.cluster.local:80", here)
                .unwrap_err()
                .status(),
            StatusCode::BAD_REQUEST
        );
        assert!(check_request("CONNECT", "10.0.0.2", here).is_err());
        let v6: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(
            check_request("CONNECT", "[fd00::2]:80", v6),
            Ok("[fd00::2]:80".parse().unwrap())
        );
        // A dual-stack listener reports IPv4 peers as v4-mapped.
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        assert!(check_request("CONNECT", "10.0.0.2:80", mapped).is_ok());
    }

    #[test]
    fn authorities_are_written_as_peers_expect() {
        assert_eq!(
            authority_uri("10.1.2.3:80".parse().unwrap()).to_string(),
            "10.1.2.3:80"
        );
        assert_eq!(
            authority_uri("[fd00::1]:443".parse().unwrap()).to_string(),
            "[fd00::1]:443"
        );
    }

    #[test]
    fn traceparent_has_the_w3c_shape() {
        let t = traceparent().unwrap();
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
    }
}
