//! The QUIC transport: the same tunnels as HBONE (one TCP connection per CONNECT, the
//! same identities, the same checks and statuses), carried over QUIC on UDP port 15009
//! of every pod instead of HTTP/2 over TLS on TCP 15008. No deployed peer speaks it;
//! both ends are this proxy.
//!
//! - [`PodEndpoint`]: one QUIC endpoint per pod, bound to `[::]:15009` (dual stack;
//!   `0.0.0.0:15009` without IPv6) inside the pod's namespace, marked like every proxy
//!   socket. It serves inbound tunnels with the pod's identity and is the client side
//!   of the pod's outbound tunnels, so those leave from the pod's own address.
//! - [`QuicTransport`]: the client side shared by all pods. One QUIC connection per
//!   (source identity, destination identity, source pod, peer address) carries every
//!   stream to that peer (a second one opens only beyond 1024 tunnels at once); it is
//!   replaced when it closes, and released after 5 minutes without streams.
//!   Connections send keep-alives every 15 s and die after 5 minutes of silence; a
//!   peer that stays silent through a CONNECT's 20 s wait loses its connection at once.
//! - [`QuicStream`]: one tunnel as `AsyncRead + AsyncWrite`.
//!
//! ## Wire format
//!
//! - UDP port 15009, QUIC v1, TLS 1.3 with mutual authentication exactly as HBONE (the
//!   client presents the source workload's SPIFFE identity and accepts the server only
//!   if it shows one of the identities expected for the destination; the server requires
//!   a client certificate of the mesh; no SNI). ALPN `hbone-quic`: not `h3`, since the
//!   streams do not carry HTTP/3 frames.
//! - One client-initiated bidirectional stream per tunnelled TCP connection.
//! - The stream starts with an HTTP/1.1-style request head, at most 8 KiB:
//!   ```text
//!   CONNECT <authority> HTTP/1.1\r\n
//!   forwarded: for="<client ip:port>"\r\n
//!   traceparent: 00-<32 hex>-<16 hex>-01\r\n      (optional)
//!   \r\n
//!   ```
//!   `<authority>` is the original destination `ip:port` (`[v6]:port`), which must be an
//!   address of the pod the datagrams arrived at. As in the HBONE server, the app sees
//!   the tunnel peer's IP with a port of the kernel's choosing; `forwarded` is only
//!   logged, and other header lines are ignored.
//! - The server answers with a response head `HTTP/1.1 <code> <reason>\r\n\r\n`:
//!   200 once its TCP connection to the app is established; 400 for anything but
//!   CONNECT, a malformed head or an authority that is not this pod; 401 when denied by
//!   policy; 431 for a head over 8 KiB or over 32 header lines; 503 when the app
//!   cannot be reached; 408 when the head does not arrive within 10 s. A refusal ends
//!   the server's side (FIN) and stops the request side (STOP_SENDING, code 2).
//! - After a 200, raw bytes flow both ways. FIN is a half-close (the TCP side gets
//!   `shutdown(SHUT_WR)`, and the TCP side's end of file becomes FIN). RESET_STREAM /
//!   STOP_SENDING is an abort (code 1; the TCP side is reset), and a TCP reset or error
//!   becomes RESET_STREAM + STOP_SENDING.
//! - Application error codes: 0 connection closed normally (idle, endpoint closed),
//!   1 stream aborted, 2 request refused.
//! - Transport: up to 1024 concurrent bidirectional streams per connection (no
//!   unidirectional streams, no datagrams), stream window 4 MiB, connection window
//!   16 MiB, no connection migration.
//!
//! ## Limits
//!
//! - An upgraded proxy can bind 15009 beside the old one (SO_REUSEPORT), but the kernel
//!   then spreads incoming datagrams over both sockets by address hash, so live QUIC
//!   connections of the old one may be lost; TCP tunnels have no such problem.
//! - Service hostnames as authority are refused (400), as in the HBONE server.

use std::{
    collections::HashMap,
    fmt, io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes};
use http::StatusCode;
use quinn::{
    Connection, Endpoint, EndpointConfig, IdleTimeout, Incoming, RecvStream, SendStream,
    TokioRuntime, TransportConfig, VarInt,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use rustls::pki_types::CertificateDer;
use socket2::{Protocol, Type};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::{debug, info};

use super::{
    any,
    drain::PodTasks,
    hbone::{self, Inbound, Outbound, check_request, pipe},
    identity::{Identity, Tls, identities_of},
    proxy_socket, unmap,
};
use crate::netns::Netns;

/// The UDP port of every pod's QUIC endpoint.
pub const PORT_QUIC: u16 = 15009;
/// Our own protocol on QUIC streams (see the module documentation), hence not `h3`.
pub const ALPN_QUIC: &[u8] = b"hbone-quic";
/// Concurrent bidirectional streams a peer may open on one connection.
pub const MAX_STREAMS: u32 = 1024;
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// A connection that hears nothing from its peer for this long is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A pooled client connection without streams for this long is closed.
pub const POOL_IDLE: Duration = Duration::from_secs(300);
/// Largest request or response head.
pub const MAX_HEAD: usize = 8 << 10;
/// Most header lines in a head.
const MAX_HEADERS: usize = 32;
/// A stream whose request head has not arrived by then is answered 408.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the client waits for the answer: the server answers within its own
/// connect timeout, so a longer wait means the peer is gone.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(20);

/// The connection ended normally (idle, endpoint closed).
const CODE_NO_ERROR: u32 = 0;
/// RESET_STREAM / STOP_SENDING: the tunnel was aborted.
const CODE_ABORT: u32 = 1;
/// RESET_STREAM / STOP_SENDING: the request was refused.
const CODE_REFUSED: u32 = 2;

fn transport_config() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .keep_alive_interval(Some(KEEPALIVE))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(IDLE_TIMEOUT).expect("5 minutes is a valid idle timeout"),
        ))
        .datagram_receive_buffer_size(None);
    Arc::new(t)
}

// ---------------------------------------------------------------------------------------
// Streams as byte pipes.

/// Counts a pooled connection's live streams.
struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One tunnel as a byte pipe. Shutting down the write side sends FIN; the peer's FIN
/// reads as end of file. Dropped before its write side was shut down, it aborts the
/// stream (RESET_STREAM and, unless the peer's side was read to its end, STOP_SENDING).
pub struct QuicStream {
    send: SendStream,
    recv: RecvStream,
    /// Bytes that arrived with the head, read first.
    early: Bytes,
    finished: bool,
    eof: bool,
    _guard: Option<StreamGuard>,
}

impl fmt::Debug for QuicStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicStream")
            .field("id", &self.send.id())
            .field("finished", &self.finished)
            .field("eof", &self.eof)
            .finish()
    }
}

impl QuicStream {
    fn new(send: SendStream, recv: RecvStream, early: Bytes, guard: Option<StreamGuard>) -> Self {
        Self {
            send,
            recv,
            early,
            finished: false,
            eof: false,
            _guard: guard,
        }
    }

    /// Ends both directions with `code` instead of a FIN.
    fn abort(&mut self, code: u32) {
        if !self.finished {
            let _ = self.send.reset(VarInt::from_u32(code));
            self.finished = true;
        }
        if !self.eof {
            let _ = self.recv.stop(VarInt::from_u32(code));
            self.eof = true;
        }
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        self.abort(CODE_ABORT);
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early[..n]);
            self.early.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = AsyncRead::poll_read(Pin::new(&mut self.recv), cx, buf);
        if let Poll::Ready(Ok(())) = r
            && buf.filled().len() == before
            && buf.remaining() > 0
        {
            self.eof = true;
        }
        r
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    /// Half-close: FIN to the peer; reading goes on.
    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        self.finished = true;
        Poll::Ready(self.send.finish().map_err(io::Error::from))
    }
}

// ---------------------------------------------------------------------------------------
// Heads.

#[derive(Debug)]
pub(crate) enum HeadError {
    /// Over [`MAX_HEAD`] bytes or [`MAX_HEADERS`] lines: 431.
    TooLarge,
    /// Not a head of our format: 400.
    Malformed(String),
    /// The stream ended or failed before the head was complete.
    Ended(io::Error),
}

impl From<HeadError> for io::Error {
    fn from(e: HeadError) -> Self {
        match e {
            HeadError::TooLarge => io::Error::new(io::ErrorKind::InvalidData, "head too large"),
            HeadError::Malformed(m) => io::Error::new(io::ErrorKind::InvalidData, m),
            HeadError::Ended(e) => e,
        }
    }
}

/// What a request head says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHead {
    pub(crate) method: String,
    pub(crate) authority: String,
    pub(crate) forwarded: Option<String>,
}

/// Parses a request head at the start of `buf`: `Ok(None)` while incomplete, else the
/// head and its length.
pub(crate) fn parse_request(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(format!("request head: {e}"))),
    };
    if req.version != Some(1) {
        return Err(HeadError::Malformed("not HTTP/1.1".into()));
    }
    let forwarded = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("forwarded"))
        .map(|h| String::from_utf8_lossy(h.value).into_owned());
    let head = RequestHead {
        method: req.method.unwrap_or_default().to_owned(),
        authority: req.path.unwrap_or_default().to_owned(),
        forwarded,
    };
    Ok(Some((head, n)))
}

/// Parses a response head at the start of `buf`: its status code and length.
pub(crate) fn parse_response(buf: &[u8]) -> Result<Option<(u16, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Ok(Some((resp.code.unwrap_or_default(), n))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::Malformed(format!("response head: {e}"))),
    }
}

/// A head being read: the bytes so far, at most [`MAX_HEAD`], parsed after each read.
pub(crate) struct HeadReader {
    buf: Vec<u8>,
    len: usize,
}

impl HeadReader {
    pub(crate) fn new() -> Self {
        Self {
            buf: vec![0u8; MAX_HEAD],
            len: 0,
        }
    }

    /// Where the next read goes; `Err` once [`MAX_HEAD`] bytes came without a head.
    pub(crate) fn space(&mut self) -> Result<&mut [u8], HeadError> {
        if self.len == MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        Ok(&mut self.buf[self.len..])
    }

    /// `n` more bytes were read into [`HeadReader::space`]: the head and the bytes that
    /// came after it, or `None` while it is incomplete.
    pub(crate) fn filled<T>(
        &mut self,
        n: usize,
        parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, HeadError>,
    ) -> Result<Option<(T, Bytes)>, HeadError> {
        self.len += n;
        Ok(parse(&self.buf[..self.len])?
            .map(|(head, n)| (head, Bytes::copy_from_slice(&self.buf[n..self.len]))))
    }
}

/// Reads one head from `recv` (at most [`MAX_HEAD`] bytes); returns it and the bytes
/// that came after it.
async fn read_head<T>(
    recv: &mut RecvStream,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, HeadError>,
) -> Result<(T, Bytes), HeadError> {
    let mut reader = HeadReader::new();
    loop {
        let n = match recv.read(reader.space()?).await {
            Ok(Some(n)) => n,
            Ok(None) => {
                return Err(HeadError::Ended(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended inside the head",
                )));
            }
            Err(e) => return Err(HeadError::Ended(e.into())),
        };
        if let Some(done) = reader.filled(n, &parse)? {
            return Ok(done);
        }
    }
}

pub(crate) fn request_head(
    target: SocketAddr,
    client: SocketAddr,
    traceparent: Option<&str>,
) -> Vec<u8> {
    let mut h = format!("CONNECT {target} HTTP/1.1\r\nforwarded: for=\"{client}\"\r\n");
    if let Some(tp) = traceparent {
        h.push_str("traceparent: ");
        h.push_str(tp);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    h.into_bytes()
}

pub(crate) fn response_head(status: StatusCode) -> Vec<u8> {
    format!(
        "HTTP/1.1 {} {}\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------
// The pod's endpoint and its server side.

static NEXT_ENDPOINT: AtomicU64 = AtomicU64::new(1);

/// One pod's QUIC endpoint on UDP 15009, opened inside its namespace.
pub struct PodEndpoint {
    endpoint: Endpoint,
    /// Tells endpoints apart in the client pool.
    id: u64,
    identity: Identity,
    netns: Arc<Netns>,
    accept: Mutex<Option<tokio::task::AbortHandle>>,
}

impl fmt::Debug for PodEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodEndpoint")
            .field("id", &self.id)
            .field("identity", &self.identity.to_string())
            .field("local", &self.endpoint.local_addr().ok())
            .finish()
    }
}

impl PodEndpoint {
    /// Binds 15009 in `netns` and serves nothing until [`PodEndpoint::serve`].
    /// Call inside a tokio runtime.
    pub fn open(netns: &Netns, tls: &Tls, identity: &Identity) -> io::Result<Self> {
        let socket = netns
            .run(|| -> io::Result<std::net::UdpSocket> {
                // Marked (the engine lets the proxy's marked sockets through) and
                // reusable, so an upgraded proxy can bind beside this one.
                let (s, v6) = proxy_socket(Type::DGRAM, Protocol::UDP)?;
                s.bind(&any(PORT_QUIC, v6))?;
                s.set_nonblocking(true)?;
                Ok(s.into())
            })
            .map_err(io::Error::other)??;
        let crypto = QuicServerConfig::try_from(tls.server_config(identity, ALPN_QUIC))
            .map_err(io::Error::other)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport_config());
        // Peers are pods with fixed addresses, and the app sees the tunnel's source
        // address as its client: it must not change under a connection.
        server.migration(false);
        let endpoint = Endpoint::new(
            EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(TokioRuntime),
        )?;
        Ok(Self {
            endpoint,
            id: NEXT_ENDPOINT.fetch_add(1, Ordering::Relaxed),
            identity: identity.clone(),
            netns: Arc::new(netns.try_clone()?),
            accept: Mutex::new(None),
        })
    }

    /// The bound address (`[::]:15009` or `0.0.0.0:15009`).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Open QUIC connections, inbound and outbound.
    pub fn connections(&self) -> usize {
        self.endpoint.open_connections()
    }

    /// Accepts connections and streams until the endpoint is dropped; each stream is
    /// one CONNECT, checked, authorised and connected by `inbound`, answered 200 once
    /// the app connection is up, then piped both ways. A second call replaces the first.
    ///
    /// Connections and streams run as the pod's tasks ([`Inbound::tasks`]), so its
    /// removal ends them.
    pub fn serve<I: Inbound>(&self, inbound: Weak<I>) {
        let endpoint = self.endpoint.clone();
        let netns = self.netns.clone();
        let tasks = inbound.upgrade().and_then(|i| i.tasks().cloned());
        let task = tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let conn =
                    serve_connection(incoming, inbound.clone(), netns.clone(), tasks.clone());
                if !hbone::spawn_in(tasks.as_ref(), conn) {
                    // The pod is draining: new connections are refused.
                    debug!("quic: connection refused, the pod is draining");
                }
            }
        });
        if let Some(old) = self.accept.lock().unwrap().replace(task.abort_handle()) {
            old.abort();
        }
    }
}

impl Drop for PodEndpoint {
    fn drop(&mut self) {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
        self.endpoint
            .close(VarInt::from_u32(CODE_NO_ERROR), b"pod endpoint closed");
    }
}

/// What every stream of an inbound connection shares.
struct ConnInfo {
    /// The peer, v4-mapped addresses unmapped.
    remote: SocketAddr,
    /// The local address the peer's datagrams arrive at.
    arrived_at: Option<IpAddr>,
    peer: Option<Identity>,
    netns: Arc<Netns>,
}

fn peer_identity(conn: &Connection) -> Option<Identity> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    identities_of(certs.first()?).into_iter().next()
}

async fn serve_connection<I: Inbound>(
    incoming: Incoming,
    inbound: Weak<I>,
    netns: Arc<Netns>,
    tasks: Option<PodTasks>,
) {
    let remote = unmap(incoming.remote_address());
    let conn = match tokio::time::timeout(hbone::HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            info!(%remote, error = %e, "quic: inbound handshake refused");
            return;
        }
        Err(_) => {
            info!(%remote, "quic: inbound handshake timed out");
            return;
        }
    };
    let info = Arc::new(ConnInfo {
        remote,
        arrived_at: conn.local_ip().map(|ip| unmap(SocketAddr::new(ip, 0)).ip()),
        peer: peer_identity(&conn),
        netns,
    });
    debug!(%remote, peer = ?info.peer.as_ref().map(|i| i.to_string()), "quic: inbound connection");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                // Refused while the pod drains: the stream is dropped (reset).
                hbone::spawn_in(
                    tasks.as_ref(),
                    serve_stream(inbound.clone(), info.clone(), send, recv),
                );
            }
            Err(e) => {
                debug!(%remote, error = %e, "quic: inbound connection ended");
                break;
            }
        }
    }
}

/// Answers a stream with a refusal: the response, FIN, and STOP_SENDING on the request.
async fn refuse(mut send: SendStream, mut recv: RecvStream, status: StatusCode) {
    let _ = send.write_all(&response_head(status)).await;
    let _ = send.finish();
    let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
}

/// Whether `ip` is an address of `netns` (a socket can be bound to it there).
fn is_local(netns: &Netns, ip: IpAddr) -> bool {
    netns
        .run(|| std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok())
        .unwrap_or(false)
}

async fn serve_stream<I: Inbound>(
    inbound: Weak<I>,
    info: Arc<ConnInfo>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let remote = info.remote;
    let (head, early) =
        match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut recv, parse_request)).await {
            Ok(Ok(x)) => x,
            Ok(Err(HeadError::TooLarge)) => {
                info!(%remote, "quic: request head too large");
                return refuse(send, recv, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).await;
            }
            Ok(Err(HeadError::Malformed(why))) => {
                info!(%remote, %why, "quic: malformed request head");
                return refuse(send, recv, StatusCode::BAD_REQUEST).await;
            }
            Ok(Err(HeadError::Ended(e))) => {
                debug!(%remote, error = %e, "quic: stream ended before its request head");
                let _ = send.reset(VarInt::from_u32(CODE_ABORT));
                return;
            }
            Err(_) => {
                info!(%remote, "quic: request head timed out");
                return refuse(send, recv, StatusCode::REQUEST_TIMEOUT).await;
            }
        };
    let Some(pod) = inbound.upgrade() else {
        return refuse(send, recv, StatusCode::SERVICE_UNAVAILABLE).await;
    };
    // Linux reports where each datagram arrived; elsewhere the authority must at least
    // be an address of the pod.
    let arrived_at = info.arrived_at.unwrap_or_else(|| {
        head.authority
            .parse::<SocketAddr>()
            .ok()
            .map(|t| unmap(t).ip())
            .filter(|ip| is_local(&info.netns, *ip))
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    });
    let opened = match check_request(&head.method, &head.authority, arrived_at) {
        // The app sees the client pod's address; its port is the kernel's choice.
        Ok(target) => pod
            .open(target, SocketAddr::new(remote.ip(), 0), info.peer.as_ref())
            .await
            .map(|s| (s, target)),
        Err(r) => Err(r),
    };
    let pod_name = pod.pod().to_owned();
    let tracked = match &opened {
        Ok(_) => pod.track(info.peer.as_ref()),
        Err(_) => None,
    };
    // Only the open needs the pod; the pipe must not keep it alive.
    drop(pod);
    let (mut app, target) = match opened {
        Ok(x) => x,
        Err(r) => {
            info!(pod = pod_name, peer = %remote, identity = ?info.peer.as_ref().map(|i| i.to_string()), forwarded = ?head.forwarded, status = r.status().as_u16(), reason = %r, "quic: inbound stream refused");
            return refuse(send, recv, r.status()).await;
        }
    };
    if let Err(e) = send.write_all(&response_head(StatusCode::OK)).await {
        debug!(pod = pod_name, %target, error = %e, "quic: client left before the answer");
        reset_tcp(&app);
        return;
    }
    let mut tunnel = QuicStream::new(send, recv, early, None);
    let piped = match &tracked {
        Some(t) => pipe(&mut tunnel, &mut t.app_side(&mut app)).await,
        None => pipe(&mut tunnel, &mut app).await,
    };
    match piped {
        Ok((up, down)) => {
            debug!(pod = pod_name, %target, up, down, "quic: inbound stream done")
        }
        Err(e) => {
            debug!(pod = pod_name, %target, error = %e, "quic: inbound stream aborted");
            reset_tcp(&app);
            tunnel.abort(CODE_ABORT);
        }
    }
}

/// Makes the close of `s` a reset.
fn reset_tcp(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

// ---------------------------------------------------------------------------------------
// Client.

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    src: Identity,
    dst: Identity,
    endpoint: u64,
    peer: SocketAddr,
}

struct Pooled {
    conn: Connection,
    streams: Arc<AtomicUsize>,
}

impl Pooled {
    fn alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }
}

/// A key's connections: one, unless more than [`MAX_STREAMS`] tunnels to the peer are
/// open at once (the peer would hold the next stream back until one ends).
type Slot = Arc<tokio::sync::Mutex<Vec<Pooled>>>;

/// QUIC client connections, shared by every pod of a proxy.
pub struct QuicTransport {
    tls: Tls,
    slots: Arc<Mutex<HashMap<PoolKey, Slot>>>,
}

impl fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicTransport")
            .field("connections", &self.connections())
            .finish()
    }
}

impl QuicTransport {
    pub fn new(tls: Tls) -> Self {
        Self {
            tls,
            slots: Arc::default(),
        }
    }

    /// Keys (source, destination, source endpoint, peer) the pool holds.
    pub fn keys(&self) -> usize {
        self.slots.lock().unwrap().len()
    }

    /// Live pooled connections (all keys).
    pub fn connections(&self) -> usize {
        let slots: Vec<Slot> = self.slots.lock().unwrap().values().cloned().collect();
        slots
            .iter()
            .map(|s| {
                s.try_lock()
                    .map(|v| v.iter().filter(|p| p.alive()).count())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Made for each new connection (rare: connections are pooled) around the TLS
    /// configuration, which [`Tls`] caches within its bound; nothing is cached here.
    fn client_config(&self, src: &Identity, dst: &Identity) -> io::Result<quinn::ClientConfig> {
        let crypto = QuicClientConfig::try_from(self.tls.client_config(
            src,
            std::slice::from_ref(dst),
            ALPN_QUIC,
        ))
        .map_err(io::Error::other)?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport_config());
        Ok(cfg)
    }

    /// Opens one tunnel to `o.target` through the peer's 15009, from `endpoint` (the
    /// source pod's); returns once the peer answered 200 (its connection to the app is
    /// up). Another answer is an error of kind `ConnectionRefused` naming the status.
    pub async fn open(&self, endpoint: &PodEndpoint, o: &Outbound<'_>) -> io::Result<QuicStream> {
        let (conn, guard) = self.connection(endpoint, o).await?;
        let head = request_head(o.target, o.client, super::hbone::traceparent().as_deref());
        let (status, mut stream) = request(&conn, &head, Some(guard))
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("QUIC peer {}: {e}", o.tunnel)))?;
        if status != StatusCode::OK.as_u16() {
            stream.abort(CODE_REFUSED);
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("QUIC peer {} answered {status} for {}", o.tunnel, o.target),
            ));
        }
        Ok(stream)
    }

    /// A pooled connection for `o` from `endpoint` with room for one more stream,
    /// connected if there is none, with that stream counted on it.
    async fn connection(
        &self,
        endpoint: &PodEndpoint,
        o: &Outbound<'_>,
    ) -> io::Result<(Connection, StreamGuard)> {
        let key = PoolKey {
            src: o.src.clone(),
            dst: o.dst.clone(),
            endpoint: endpoint.id,
            peer: o.tunnel,
        };
        let slot = {
            let mut slots = self.slots.lock().unwrap();
            if !slots.contains_key(&key) {
                // New keys are rare: forget the closed ones (peers and pods gone).
                slots.retain(|_, s| {
                    s.try_lock()
                        .map(|v| v.iter().any(Pooled::alive))
                        .unwrap_or(true)
                });
            }
            slots.entry(key.clone()).or_default().clone()
        };
        let mut pooled = slot.lock().await;
        pooled.retain(Pooled::alive);
        if let Some(p) = pooled
            .iter()
            .find(|p| p.streams.load(Ordering::Acquire) < MAX_STREAMS as usize)
        {
            return Ok((p.conn.clone(), StreamGuard::new(&p.streams)));
        }
        let conn = self.connect(endpoint, o).await?;
        let streams = Arc::new(AtomicUsize::new(0));
        let guard = StreamGuard::new(&streams);
        tokio::spawn(release_when_idle(
            conn.clone(),
            streams.clone(),
            Arc::downgrade(&self.slots),
            key,
        ));
        pooled.push(Pooled {
            conn: conn.clone(),
            streams,
        });
        Ok((conn, guard))
    }

    async fn connect(&self, endpoint: &PodEndpoint, o: &Outbound<'_>) -> io::Result<Connection> {
        let started = Instant::now();
        let config = self.client_config(o.src, o.dst)?;
        // No SNI is sent (the TLS config disables it); the name is a placeholder.
        let connecting = endpoint
            .endpoint
            .connect_with(config, o.tunnel, &o.tunnel.ip().to_string())
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("QUIC connection to {}: {e}", o.tunnel),
                )
            })?;
        let conn = match tokio::time::timeout(hbone::HANDSHAKE_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let kind = io::Error::from(e.clone()).kind();
                return Err(io::Error::new(
                    kind,
                    format!("QUIC handshake with {}: {e}", o.tunnel),
                ));
            }
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("QUIC handshake with {} timed out", o.tunnel),
                ));
            }
        };
        debug!(src = %o.src, dst = %o.dst, peer = %o.tunnel, elapsed_us = started.elapsed().as_micros() as u64, "quic: pooled connection opened");
        Ok(conn)
    }
}

/// Opens a stream on `conn`, sends `head` and reads the response head: its status and
/// the stream, positioned after it.
async fn request(
    conn: &Connection,
    head: &[u8],
    guard: Option<StreamGuard>,
) -> io::Result<(u16, QuicStream)> {
    let heard = conn.stats().udp_rx.datagrams;
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(head).await?;
        let (status, early) = read_head(&mut recv, parse_response).await?;
        io::Result::Ok((status, QuicStream::new(send, recv, early, guard)))
    };
    match tokio::time::timeout(RESPONSE_TIMEOUT, exchange).await {
        Ok(r) => r,
        Err(_) => {
            // Keep-alives are answered well within the wait: silence means the peer is
            // gone, and the next tunnel gets a new connection.
            if conn.stats().udp_rx.datagrams == heard {
                conn.close(VarInt::from_u32(CODE_NO_ERROR), b"peer silent");
            }
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer to CONNECT",
            ))
        }
    }
}

/// Closes a pooled connection after [`POOL_IDLE`] without streams. When it has ended,
/// its key leaves the pool unless another live connection uses it.
async fn release_when_idle(
    conn: Connection,
    streams: Arc<AtomicUsize>,
    slots: Weak<Mutex<HashMap<PoolKey, Slot>>>,
    key: PoolKey,
) {
    let mut idle_since = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            e = conn.closed() => {
                debug!(peer = %conn.remote_address(), error = %e, "quic: pooled connection ended");
                break;
            }
            _ = tick.tick() => {
                if streams.load(Ordering::Acquire) > 0 {
                    idle_since = Instant::now();
                } else if idle_since.elapsed() >= POOL_IDLE {
                    debug!(peer = %conn.remote_address(), "quic: idle pooled connection released");
                    conn.close(VarInt::from_u32(CODE_NO_ERROR), b"idle");
                    break;
                }
            }
        }
    }
    let Some(slots) = slots.upgrade() else { return };
    let mut map = slots.lock().unwrap();
    let unused = map.get(&key).is_some_and(|slot| {
        slot.try_lock().is_ok_and(|mut pooled| {
            pooled.retain(Pooled::alive);
            pooled.is_empty()
        })
    });
    if unused {
        map.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use socket2::{Domain, Socket};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::{
        hbone::Refusal,
        identity::{DEFAULT_TRUST_DOMAIN, LocalCa},
        outbound_socket,
    };

    #[test]
    fn heads_round_trip() {
        let target: SocketAddr = "[fd00::2]:80".parse().unwrap();
        let client: SocketAddr = "[fd00::1]:4000".parse().unwrap();
        let head = request_head(target, client, Some("00-ab-cd-01"));
        let (req, n) = parse_request(&head).unwrap().unwrap();
        assert_eq!(n, head.len());
        assert_eq!(req.method, "CONNECT");
        assert_eq!(req.authority, "[fd00::2]:80");
        assert_eq!(req.forwarded.as_deref(), Some("for=\"[fd00::1]:4000\""));
        assert!(parse_request(&head[..head.len() - 1]).unwrap().is_none());
        assert!(matches!(
            parse_request(b"CONNECT 1.2.3.4:5 HTTP/1.0\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            parse_request(b"\x00\x01garbage\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let many: String = (0..40).map(|i| format!("x{i}: y\r\n")).collect();
        let many = format!("CONNECT 1.2.3.4:5 HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(
            parse_request(many.as_bytes()),
            Err(HeadError::TooLarge)
        ));
        let resp = response_head(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp, b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let mut with_data = resp.clone();
        with_data.extend_from_slice(b"data");
        assert_eq!(parse_response(&with_data).unwrap(), Some((503, resp.len())));
    }

    // -----------------------------------------------------------------------------------
    // Tests in real network namespaces (root needed): two namespaces joined by a veth
    // pair, a pod endpoint in each, an app server in B.

    fn ip(args: &[&str]) {
        let st = Command::new("ip").args(args).status().expect("run ip");
        assert!(st.success(), "ip {}", args.join(" "));
    }

    /// Namespaces A (10.250.0.1, fd00:250::1) and B (10.250.0.2, fd00:250::2) joined by
    /// a veth pair; both deleted on drop, also when a test panics.
    struct NsPair {
        a: String,
        b: String,
    }

    impl NsPair {
        fn new(tag: &str) -> Self {
            let pid = std::process::id();
            let pair = Self {
                a: format!("tq-{pid}-{tag}-a"),
                b: format!("tq-{pid}-{tag}-b"),
            };
            let (a, b) = (pair.a.as_str(), pair.b.as_str());
            ip(&["netns", "add", a]);
            ip(&["netns", "add", b]);
            ip(&[
                "link", "add", "qa", "netns", a, "type", "veth", "peer", "name", "qb", "netns", b,
            ]);
            for (ns, dev, v4, v6) in [
                (a, "qa", "10.250.0.1/24", "fd00:250::1/64"),
                (b, "qb", "10.250.0.2/24", "fd00:250::2/64"),
            ] {
                ip(&["-n", ns, "link", "set", "lo", "up"]);
                ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
                ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
                ip(&["-n", ns, "link", "set", dev, "up"]);
            }
            pair
        }

        fn netns(name: &str) -> Netns {
            Netns::open(format!("/var/run/netns/{name}")).unwrap()
        }
    }

    impl Drop for NsPair {
        fn drop(&mut self) {
            for ns in [&self.a, &self.b] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    /// Echoes every connection (half-close passed on).
    const PORT_ECHO: u16 = 7777;
    /// Reads to the end, then answers `got <n>` and closes.
    const PORT_COUNT: u16 = 7778;
    /// Reads one byte: `r` makes it reset the connection; anything else makes it read on
    /// and report how the connection ended on the channel given to `run_servers`.
    const PORT_ABORT: u16 = 7779;
    /// Nothing listens there.
    const PORT_CLOSED: u16 = 7070;

    fn listen(netns: &Netns, port: u16) -> tokio::net::TcpListener {
        let l = netns
            .run(|| -> io::Result<std::net::TcpListener> {
                let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
                s.set_only_v6(false)?;
                s.set_reuse_address(true)?;
                s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
                s.listen(1024)?;
                s.set_nonblocking(true)?;
                Ok(s.into())
            })
            .unwrap()
            .unwrap();
        tokio::net::TcpListener::from_std(l).unwrap()
    }

    fn run_servers(netns: &Netns, ended: tokio::sync::mpsc::UnboundedSender<io::ErrorKind>) {
        let echo = listen(netns, PORT_ECHO);
        tokio::spawn(async move {
            while let Ok((s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        let count = listen(netns, PORT_COUNT);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = count.accept().await {
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    if s.read_to_end(&mut all).await.is_ok() {
                        let _ = s.write_all(format!("got {}", all.len()).as_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        let abort = listen(netns, PORT_ABORT);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = abort.accept().await {
                let ended = ended.clone();
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    if b[0] == b'r' {
                        reset_tcp(&s);
                        return;
                    }
                    let mut rest = Vec::new();
                    let kind = match s.read_to_end(&mut rest).await {
                        Ok(_) => io::ErrorKind::UnexpectedEof,
                        Err(e) => e.kind(),
                    };
                    let _ = ended.send(kind);
                });
            }
        });
    }

    /// Pod B's inbound side: every peer allowed, the app reached from inside B.
    struct App {
        netns: Netns,
        /// (target, client, peer) of every open.
        seen: Mutex<Vec<(SocketAddr, SocketAddr, Option<Identity>)>>,
    }

    impl Inbound for App {
        async fn open(
            &self,
            target: SocketAddr,
            client: SocketAddr,
            peer: Option<&Identity>,
        ) -> Result<TcpStream, Refusal> {
            self.seen
                .lock()
                .unwrap()
                .push((target, client, peer.cloned()));
            let s = outbound_socket(&self.netns, target)
                .map_err(|e| Refusal::Unavailable(e.to_string()))?;
            s.connect(target)
                .await
                .map_err(|e| Refusal::Unavailable(format!("{target}: {e}")))
        }

        fn pod(&self) -> &str {
            "pod-b"
        }
    }

    struct Fixture {
        transport: QuicTransport,
        ep_a: PodEndpoint,
        ep_b: PodEndpoint,
        ns_a: Netns,
        app: Arc<App>,
        /// How PORT_ABORT's connections ended.
        ended: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<io::ErrorKind>>,
        id_a: Identity,
        id_b: Identity,
        /// Last: the namespaces go once everything in them is closed.
        _pair: NsPair,
    }

    const A4: &str = "10.250.0.1";
    const B4: &str = "10.250.0.2";
    const A6: &str = "fd00:250::1";
    const B6: &str = "fd00:250::2";

    fn fixture(tag: &str) -> Fixture {
        let pair = NsPair::new(tag);
        let ns_a = NsPair::netns(&pair.a);
        let ns_b = NsPair::netns(&pair.b);
        let ca = LocalCa::ephemeral().unwrap();
        let tls = Tls::new(Arc::new(ca), DEFAULT_TRUST_DOMAIN);
        let id_a = Identity::new(DEFAULT_TRUST_DOMAIN, "ns-a", "sa-a");
        let id_b = Identity::new(DEFAULT_TRUST_DOMAIN, "ns-b", "sa-b");
        let ep_a = PodEndpoint::open(&ns_a, &tls, &id_a).unwrap();
        let ep_b = PodEndpoint::open(&ns_b, &tls, &id_b).unwrap();
        assert_eq!(ep_b.local_addr().unwrap(), "[::]:15009".parse().unwrap());
        let (ended_tx, ended) = tokio::sync::mpsc::unbounded_channel();
        run_servers(&ns_b, ended_tx);
        let app = Arc::new(App {
            netns: ns_b,
            seen: Mutex::new(Vec::new()),
        });
        ep_b.serve(Arc::downgrade(&app));
        Fixture {
            transport: QuicTransport::new(tls),
            ep_a,
            ep_b,
            ns_a,
            app,
            ended: tokio::sync::Mutex::new(ended),
            id_a,
            id_b,
            _pair: pair,
        }
    }

    impl Fixture {
        /// A tunnel request from A's app to `target` (in B), expecting `dst`.
        fn outbound<'a>(&'a self, dst: &'a Identity, target: &str, port: u16) -> Outbound<'a> {
            let target = SocketAddr::new(target.parse().unwrap(), port);
            let client_ip: IpAddr = if target.is_ipv4() { A4 } else { A6 }.parse().unwrap();
            Outbound {
                netns: &self.ns_a,
                src: &self.id_a,
                dst,
                client: SocketAddr::new(client_ip, 40000),
                target,
                tunnel: SocketAddr::new(target.ip(), PORT_QUIC),
            }
        }

        /// Opens a tunnel, sends `data`, half-closes, reads everything back.
        async fn exchange(&self, target: &str, port: u16, data: &[u8]) -> Vec<u8> {
            let o = self.outbound(&self.id_b, target, port);
            let s = self.transport.open(&self.ep_a, &o).await.unwrap();
            let (mut r, mut w) = tokio::io::split(s);
            let data = data.to_vec();
            let writer = tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
                w
            });
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            let _w = writer.await.unwrap();
            back
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn netns_quic_tunnel_echoes_v4_and_v6() {
        let f = fixture("echo");
        let data: Vec<u8> = (0..(6 << 20)).map(|i: u32| (i % 251) as u8).collect();
        for (b, a) in [(B4, A4), (B6, A6)] {
            assert_eq!(f.exchange(b, PORT_ECHO, b"hello").await, b"hello");
            // More than a stream window, both ways at once.
            assert!(
                f.exchange(b, PORT_ECHO, &data).await == data,
                "6 MiB via {b}"
            );
            let seen = f.app.seen.lock().unwrap().last().cloned().unwrap();
            assert_eq!(seen.0, SocketAddr::new(b.parse().unwrap(), PORT_ECHO));
            // The app sees the client pod's address, port left to the kernel.
            assert_eq!(seen.1, SocketAddr::new(a.parse().unwrap(), 0));
            assert_eq!(seen.2.as_ref(), Some(&f.id_a));
        }
        // One connection per peer address.
        assert_eq!(f.transport.connections(), 2);
        // A closed connection is replaced by the next tunnel.
        let o = f.outbound(&f.id_b, B4, PORT_ECHO);
        let (conn, guard) = f.transport.connection(&f.ep_a, &o).await.unwrap();
        drop(guard);
        conn.close(VarInt::from_u32(CODE_NO_ERROR), b"test");
        assert_eq!(f.exchange(B4, PORT_ECHO, b"again").await, b"again");
        let (again, _guard) = f.transport.connection(&f.ep_a, &o).await.unwrap();
        assert_ne!(again.stable_id(), conn.stable_id());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn netns_quic_200_concurrent_streams_share_one_connection() {
        let f = Arc::new(fixture("many"));
        let tasks: Vec<_> = (0..200u32)
            .map(|i| {
                let f = f.clone();
                tokio::spawn(async move {
                    let data = format!("stream {i} ").repeat(100 + i as usize);
                    let back = f.exchange(B4, PORT_ECHO, data.as_bytes()).await;
                    assert!(back == data.as_bytes(), "stream {i}");
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(f.app.seen.lock().unwrap().len(), 200);
        assert_eq!(f.transport.slots.lock().unwrap().len(), 1);
        assert_eq!(f.transport.connections(), 1);
        assert_eq!(f.ep_a.connections(), 1);
        assert_eq!(f.ep_b.connections(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn netns_quic_half_close_carries_the_reply() {
        let f = fixture("half");
        for b in [B4, B6] {
            let o = f.outbound(&f.id_b, b, PORT_COUNT);
            let mut s = f.transport.open(&f.ep_a, &o).await.unwrap();
            s.write_all(&[7u8; 100_000]).await.unwrap();
            // The server answers only after our end of file.
            s.shutdown().await.unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).await.unwrap();
            assert_eq!(reply, "got 100000");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn netns_quic_aborts_reset_both_ways() {
        let f = fixture("abort");
        let o = f.outbound(&f.id_b, B4, PORT_ABORT);
        // Dropped without a shutdown: RESET_STREAM, and the app's connection is reset.
        let mut s = f.transport.open(&f.ep_a, &o).await.unwrap();
        s.write_all(b"k").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s);
        let kind = tokio::time::timeout(Duration::from_secs(5), f.ended.lock().await.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kind, io::ErrorKind::ConnectionReset);
        // A shutdown is a clean end of file instead.
        let mut s = f.transport.open(&f.ep_a, &o).await.unwrap();
        s.write_all(b"k").await.unwrap();
        s.shutdown().await.unwrap();
        let kind = tokio::time::timeout(Duration::from_secs(5), f.ended.lock().await.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kind, io::ErrorKind::UnexpectedEof);
        drop(s);
        // The app resets: the tunnel's reader sees a reset, not an end of file.
        let mut s = f.transport.open(&f.ep_a, &o).await.unwrap();
        s.write_all(b"r").await.unwrap();
        let mut rest = Vec::new();
        let e = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
        // The connection outlives its aborted streams.
        assert_eq!(f.exchange(B4, PORT_ECHO, b"fine").await, b"fine");
        assert_eq!(f.transport.connections(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn netns_quic_wrong_identity_is_refused() {
        let f = fixture("ident");
        let other = Identity::new(DEFAULT_TRUST_DOMAIN, "ns-b", "someone-else");
        let o = f.outbound(&other, B4, PORT_ECHO);
        let e = f.transport.open(&f.ep_a, &o).await.unwrap_err();
        assert!(e.to_string().contains("handshake"), "{e}");
        assert_eq!(f.transport.connections(), 0);
        assert!(f.app.seen.lock().unwrap().is_empty());
        // The right identity still works.
        assert_eq!(f.exchange(B4, PORT_ECHO, b"ok").await, b"ok");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn netns_quic_bad_requests_are_refused() {
        let f = fixture("bad");
        let o = f.outbound(&f.id_b, B4, PORT_ECHO);
        let (conn, _guard) = f.transport.connection(&f.ep_a, &o).await.unwrap();
        let status = |head: Vec<u8>| {
            let conn = conn.clone();
            async move {
                let (status, mut s) = request(&conn, &head, None).await.unwrap();
                // The refusal ends the server's side.
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
                status
            }
        };
        let get = b"GET 10.250.0.2:7777 HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(status(get).await, 400);
        let elsewhere = b"CONNECT 10.250.0.3:7777 HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(status(elsewhere).await, 400);
        let hostname = b"CONNECT svc.local:7777 HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(status(hostname).await, 400);
        assert_eq!(status(b"\x16\x03\x01 junk\r\n\r\n".to_vec()).await, 400);
        let big = format!(
            "CONNECT 10.250.0.2:7777 HTTP/1.1\r\nx-big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        assert_eq!(status(big.into_bytes()).await, 431);
        // None of them reached the app, and the connection lives on.
        assert!(f.app.seen.lock().unwrap().is_empty());
        assert_eq!(f.exchange(B4, PORT_ECHO, b"still").await, b"still");
        assert_eq!(f.transport.connections(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn netns_quic_closed_app_port_is_503() {
        let f = fixture("closed");
        for b in [B4, B6] {
            let o = f.outbound(&f.id_b, b, PORT_CLOSED);
            let e = f.transport.open(&f.ep_a, &o).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
            assert!(e.to_string().contains("503"), "{e}");
        }
        assert_eq!(f.app.seen.lock().unwrap().len(), 2);
        assert_eq!(f.exchange(B4, PORT_ECHO, b"up").await, b"up");
    }
}
