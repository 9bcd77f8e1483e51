//! The mesh data path between two simulated nodes: HBONE (HTTP/2 CONNECT in mutual TLS
//! to 15008) and the QUIC transport, with real namespaces, real certificates and a
//! capture of the wire between the nodes.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use redirect_tests::{
    APP_PORT, bulk_exchange, bulk_server,
    capture::Capture,
    cluster::{Cluster, NodeConfig, PodDef, TRUST_DOMAIN, outside, pod},
};
use redirect_user::{
    demo::ask,
    netns::Netns,
    proxy::{
        identity::{ALPN_H2, CertSource, Identity, LocalCa, Tls},
        mesh::DefaultTransport,
        quic::PORT_QUIC,
    },
};

const PODS: &[PodDef] = &[
    pod("a1", 1, 1, "sa-a"),
    pod("b1", 2, 1, "sa-b"),
    outside("x", 1, 9),
];

fn peer_ip(reply: &str) -> Option<IpAddr> {
    // "<who> from <ip:port> got <line>"
    let from = reply.split(" from ").nth(1)?.split(' ').next()?;
    from.parse::<SocketAddr>().ok().map(|a| a.ip())
}

#[test]
fn pod_to_pod_across_nodes_travels_as_tls_to_15008_only() -> Result<()> {
    let c = Cluster::new("hb", PODS)?;
    let (node, wire) = c.topo.wire().unwrap();
    let node_ns = Netns::open(format!("/var/run/netns/{node}"))?;
    let marker = "plaintext-that-must-never-cross-the-wire-7f3a";
    let cap = Capture::watching(&node_ns, wire, &[marker.as_bytes()])?;
    for v6 in [false, true] {
        let to = c.addr("b1", v6, APP_PORT);
        let reply = ask(&c.ns("a1"), to, marker).with_context(|| format!("a1 -> {to}"))?;
        assert!(reply.starts_with("b1 from "), "{reply}");
        assert!(reply.ends_with(marker), "{reply}");
        // The app sees the client pod's address, as without a mesh.
        assert_eq!(peer_ip(&reply), Some(c.addr("a1", v6, 0).ip()), "{reply}");
    }
    let frames = cap.stop()?;
    assert!(frames.count() > 0, "nothing captured on the wire");
    assert!(
        !frames.contains(marker.as_bytes()),
        "the app's plaintext crossed the wire"
    );
    let tcp: Vec<_> = frames
        .packets()
        .iter()
        .filter(|p| p.proto == redirect_tests::capture::Proto::Tcp)
        .collect();
    assert!(!tcp.is_empty());
    for p in &tcp {
        assert!(
            p.sport == 15008 || p.dport == 15008,
            "TCP between the nodes not to 15008: {p:?}"
        );
    }
    // Both families crossed as tunnels.
    assert!(tcp.iter().any(|p| p.src.is_ipv4()) && tcp.iter().any(|p| p.src.is_ipv6()));
    // The node's registry knew b1 from the workload file; a1's pool holds one
    // connection per destination address.
    assert!(c.node(1).pool.connections() >= 1);
    Ok(())
}

#[test]
fn a_peer_with_the_wrong_identity_or_trust_domain_is_rejected() -> Result<()> {
    let c = Cluster::new("hbid", PODS)?;
    let to = c.addr("b1", false, APP_PORT);
    assert!(ask(&c.ns("a1"), to, "before")?.starts_with("b1 from"));

    // Node 1 now expects another identity for b1: its certificate does not match.
    c.load_remote_with(1, "", |_, lines| {
        lines.retain(|l| !l.starts_with("serviceAccount"));
        lines.push("serviceAccount: sa-impostor".into());
    })?;
    let r = ask(&c.ns("a1"), c.addr("b1", true, APP_PORT), "to an impostor");
    assert!(
        r.as_ref().map(|s| s.is_empty()).unwrap_or(true),
        "reached a server with an unexpected identity: {r:?}"
    );
    c.load_remote(1, "")?;
    assert!(ask(&c.ns("a1"), to, "after")?.starts_with("b1 from"));

    // A client certificate from the same roots but another trust domain, and one from
    // other roots, are refused by b1's server.
    let b1 = c.identity("b1");
    let evil = Identity::new("evil.local", "default", "sa-a");
    let same_roots = Tls::new(c.ca.clone(), "evil.local");
    let err = h2_client(&c, "x", &same_roots, &evil, &b1).err();
    assert!(
        err.is_some(),
        "a client of trust domain evil.local was accepted"
    );
    let other_ca = LocalCa::ephemeral()?;
    let key = other_ca.certified_key(&c.identity("a1"))?;
    let err = H2::connect(&c, "x", raw_client(Some(key))?).err();
    assert!(
        err.is_some(),
        "a client certificate of unknown roots was accepted"
    );
    // The same identity from the mesh's roots is served (the check above is the roots').
    let key = c.ca.certified_key(&c.identity("a1"))?;
    assert!(H2::connect(&c, "x", raw_client(Some(key))?).is_ok());
    Ok(())
}

/// A CONNECT client of our own to `b1:15008` from host `from`, presenting `me`.
fn h2_client(c: &Cluster, from: &str, tls: &Tls, me: &Identity, expect: &Identity) -> Result<H2> {
    H2::connect(
        c,
        from,
        tls.client_config(me, std::slice::from_ref(expect), ALPN_H2),
    )
}

/// A client presenting `key` (any chain), trusting any server: to see what the server
/// does with a client certificate.
fn raw_client(key: Option<Arc<rustls::sign::CertifiedKey>>) -> Result<Arc<rustls::ClientConfig>> {
    let b = rustls::ClientConfig::builder_with_provider(
        redirect_user::proxy::identity::crypto_provider(),
    )
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut cfg = match key {
        Some(k) => b.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(k))),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// An HTTP/2 connection to b1's 15008 driven on its own runtime.
struct H2 {
    rt: tokio::runtime::Runtime,
    send: h2::client::SendRequest<Bytes>,
}

impl H2 {
    fn connect(c: &Cluster, from: &str, cfg: Arc<rustls::ClientConfig>) -> Result<Self> {
        let to = c.addr("b1", false, 15008);
        let tcp = c
            .ns(from)
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))??;
        tcp.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let send = rt.block_on(async {
            let tcp = tokio::net::TcpStream::from_std(tcp)?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(
                    rustls::pki_types::ServerName::IpAddress(to.ip().into()),
                    tcp,
                )
                .await?;
            let (send, conn) = h2::client::handshake(tls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            // The server refuses a bad client certificate after the handshake, so probe
            // the connection with a ping round trip through a first request's readiness.
            let send = send.ready().await?;
            anyhow::Ok(send)
        })?;
        let mut h = Self { rt, send };
        // A refused client certificate surfaces at the first exchange.
        h.request(
            http::Method::GET,
            &c.addr("b1", false, APP_PORT).to_string(),
            &[],
        )?;
        Ok(h)
    }

    /// Sends a request, returns its status (and the stream, for 200).
    fn request(
        &mut self,
        method: http::Method,
        authority: &str,
        headers: &[(&str, String)],
    ) -> Result<u16> {
        let mut req = http::Request::builder().method(method.clone());
        req = if method == http::Method::CONNECT {
            req.uri(authority)
        } else {
            req.uri(format!("https://{authority}/"))
        };
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req.body(())?;
        let send = self.send.clone();
        self.rt.block_on(async move {
            let mut send = send.ready().await?;
            let (resp, _stream) = send.send_request(req, true)?;
            let resp = tokio::time::timeout(Duration::from_secs(5), resp).await??;
            anyhow::Ok(resp.status().as_u16())
        })
    }
}

#[test]
fn the_tunnel_server_answers_with_the_documented_statuses() -> Result<()> {
    let c = Cluster::new("hbst", PODS)?;
    let tls = &c.node(1).tls;
    let mut h = h2_client(&c, "x", tls, &c.identity("a1"), &c.identity("b1"))?;
    let b1 = c.addr("b1", false, APP_PORT);
    assert_eq!(h.request(http::Method::CONNECT, &b1.to_string(), &[])?, 200);
    assert_eq!(h.request(http::Method::GET, &b1.to_string(), &[])?, 400);
    assert_eq!(h.request(http::Method::POST, &b1.to_string(), &[])?, 400);
    // The authority must be the connection's destination.
    let a1 = c.addr("a1", false, APP_PORT);
    assert_eq!(h.request(http::Method::CONNECT, &a1.to_string(), &[])?, 400);
    assert_eq!(
        h.request(http::Method::CONNECT, "b1.default.svc:80", &[])?,
        400
    );
    // Nothing listens on that port of b1: the app connection fails.
    let down = SocketAddr::new(b1.ip(), 7);
    assert_eq!(
        h.request(http::Method::CONNECT, &down.to_string(), &[])?,
        503
    );
    // Oversized headers: refused (a little over the limit, that stream; far over, the
    // whole connection); other connections go on.
    for size in [20 << 10, 256 << 10] {
        let huge = "x".repeat(size);
        let r = h.request(http::Method::CONNECT, &b1.to_string(), &[("x-huge", huge)]);
        assert!(
            r.map(|s| s != 200).unwrap_or(true),
            "{size} bytes of headers accepted"
        );
        h = h2_client(&c, "x", tls, &c.identity("a1"), &c.identity("b1"))?;
        assert_eq!(h.request(http::Method::CONNECT, &b1.to_string(), &[])?, 200);
    }
    Ok(())
}

#[test]
fn garbage_and_stalled_clients_on_15008_do_not_affect_others() -> Result<()> {
    let c = Cluster::new("hbgb", PODS)?;
    let tunnel = c.addr("b1", false, 15008);
    let x = c.ns("x");
    let connect = || -> Result<TcpStream> {
        let s = x.run(|| TcpStream::connect_timeout(&tunnel, Duration::from_secs(3)))??;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        Ok(s)
    };
    // A client that never speaks.
    let mut staller = connect()?;
    let stalled_at = Instant::now();
    // Not TLS at all.
    let mut plain = connect()?;
    plain.write_all(b"GET / HTTP/1.1\r\nHost: b1\r\n\r\n")?;
    let mut buf = [0u8; 256];
    let n = plain.read(&mut buf).unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).contains("200"));
    // TLS without a client certificate.
    assert!(
        H2::connect(&c, "x", raw_client(None)?).is_err(),
        "a client without a certificate was served"
    );
    // Meanwhile the mesh goes on working.
    for i in 0..20 {
        assert!(
            ask(&c.ns("a1"), c.addr("b1", i % 2 == 1, APP_PORT), "still")?.starts_with("b1 from")
        );
    }
    // The staller is dropped after the handshake timeout.
    let n = staller.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the stalled connection got data");
    let waited = stalled_at.elapsed();
    assert!(
        waited >= Duration::from_secs(8) && waited < Duration::from_secs(14),
        "stalled client closed after {waited:?}"
    );
    Ok(())
}

#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        redirect_user::proxy::identity::crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[test]
fn a_thousand_concurrent_streams_share_pooled_connections() -> Result<()> {
    let c = Cluster::new("hbcc", PODS)?;
    let a1 = c.ns("a1");
    let to = c.addr("b1", false, APP_PORT);
    const N: usize = 1000;
    // Open all connections first, then exchange on each while all are open.
    let mut conns = Vec::with_capacity(N);
    for _ in 0..N {
        let s = a1.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))??;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        conns.push(s);
    }
    let mut failures = 0;
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::spawn(move || -> std::io::Result<(String, TcpStream)> {
                writeln!(s, "stream {i}")?;
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line)?;
                // Kept open until every stream has answered.
                Ok((line, s))
            })
        })
        .collect();
    let mut open = Vec::with_capacity(N);
    for (i, t) in threads.into_iter().enumerate() {
        match t.join().unwrap() {
            Ok((l, s)) if l.trim_end().ends_with(&format!("stream {i}")) => open.push(s),
            other => {
                failures += 1;
                eprintln!("stream {i}: {other:?}");
            }
        }
    }
    assert_eq!(failures, 0);
    let pooled = c.node(1).pool.connections();
    assert!(
        (N / 100..=N / 100 + 5).contains(&pooled),
        "{pooled} pooled connections for {N} concurrent streams (100 streams each)"
    );
    Ok(())
}

#[test]
fn a_gigabyte_through_one_tunnel_arrives_intact_both_ways() -> Result<()> {
    let c = Cluster::new("hbgb1", PODS)?;
    const GB: usize = 1 << 30;
    let to = c.addr("b1", false, 7000);
    bulk_server(&c.ns("b1"), to, GB)?;
    let started = Instant::now();
    bulk_exchange(&c.ns("a1"), to, GB)?;
    eprintln!(
        "1 GiB each way through one tunnel in {:?}",
        started.elapsed()
    );
    Ok(())
}

const STRICT: &str = "policies:
- name: strict
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - notPrincipals: [!Presence []]
";

const DENY_SA_A: &str = "policies:
- name: deny-sa-a
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [!Exact cluster.local/ns/default/sa/sa-a]
";

#[test]
fn plaintext_inbound_passes_unless_the_pod_requires_mtls() -> Result<()> {
    let c = Cluster::new("hbpt", PODS)?;
    let to = c.addr("b1", false, APP_PORT);
    // From outside the mesh, plaintext to b1 goes through its 15006 to the app.
    let reply = ask(&c.ns("x"), to, "plain")?;
    assert_eq!(peer_ip(&reply), Some(c.addr("x", false, 0).ip()), "{reply}");
    // b1's node now requires mTLS (the upstream STRICT form).
    c.load_remote(2, STRICT)?;
    let r = ask(&c.ns("x"), to, "plain again");
    assert!(
        r.as_ref().map(|s| s.is_empty()).unwrap_or(true),
        "plaintext reached a pod that requires mTLS: {r:?}"
    );
    // The mesh client still gets through, over HBONE.
    assert!(ask(&c.ns("a1"), to, "tunnelled")?.starts_with("b1 from"));
    Ok(())
}

#[test]
fn a_denied_identity_gets_401_and_no_connection() -> Result<()> {
    let c = Cluster::new("hbdn", PODS)?;
    c.load_remote(2, DENY_SA_A)?;
    let tls = &c.node(1).tls;
    let b1 = c.addr("b1", false, APP_PORT);
    // Our client presenting sa-a: TLS is fine, the stream is answered 401.
    let mut denied = h2_client(&c, "x", tls, &c.identity("a1"), &c.identity("b1"))?;
    assert_eq!(
        denied.request(http::Method::CONNECT, &b1.to_string(), &[])?,
        401
    );
    let mut other = h2_client(
        &c,
        "x",
        tls,
        &Identity::new(TRUST_DOMAIN, "default", "sa-other"),
        &c.identity("b1"),
    )?;
    assert_eq!(
        other.request(http::Method::CONNECT, &b1.to_string(), &[])?,
        200
    );
    // Through the mesh, a1's app sees its connection closed.
    let r = ask(&c.ns("a1"), b1, "denied");
    assert!(r.as_ref().map(|s| s.is_empty()).unwrap_or(true), "{r:?}");
    Ok(())
}

#[test]
fn a_rotated_certificate_serves_new_handshakes_and_live_connections_go_on() -> Result<()> {
    let c = Cluster::with("hbrot", PODS, |ca, k| {
        if k != 2 {
            return NodeConfig::default();
        }
        let dir = std::env::temp_dir().join(format!("hbrot-{}-certs", std::process::id()));
        ca.write_identity(&Identity::new(TRUST_DOMAIN, "default", "sa-b"), &dir)
            .expect("writing b1's certificate");
        NodeConfig {
            certs_dir: Some(dir),
            ..NodeConfig::default()
        }
    })?;
    let certs = std::env::temp_dir().join(format!("hbrot-{}-certs", std::process::id()));
    let _rm = redirect_tests::process::RemoveDir::new(certs.clone());
    let to = c.addr("b1", false, APP_PORT);
    // A live connection through the tunnel.
    let mut live = c
        .ns("a1")
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))??;
    live.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut lines = BufReader::new(live.try_clone()?);
    let mut exchange = |msg: &str| -> Result<String> {
        writeln!(live, "{msg}")?;
        let mut l = String::new();
        lines.read_line(&mut l)?;
        Ok(l)
    };
    assert!(exchange("before")?.contains("before"));
    let before = served_certificate(&c)?;
    // Rotation: the files are replaced with a new certificate.
    std::thread::sleep(Duration::from_millis(1100));
    c.ca.write_identity(&c.identity("b1"), &certs)?;
    std::thread::sleep(Duration::from_millis(1500));
    let after = served_certificate(&c)?;
    assert_ne!(before, after, "the new certificate is not served");
    assert!(
        exchange("after")?.contains("after"),
        "the live connection broke"
    );
    assert!(ask(&c.ns("a1"), to, "new")?.starts_with("b1 from"));
    Ok(())
}

/// The certificate b1's 15008 presents to a new handshake.
fn served_certificate(c: &Cluster) -> Result<Vec<u8>> {
    let tls = &c.node(1).tls;
    let cfg = tls.client_config(&c.identity("a1"), &[c.identity("b1")], ALPN_H2);
    let to = c.addr("b1", false, 15008);
    let tcp = c
        .ns("x")
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))??;
    tcp.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(
                rustls::pki_types::ServerName::IpAddress(to.ip().into()),
                tcp,
            )
            .await?;
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .context("no server certificate")?;
        anyhow::Ok(cert.to_vec())
    })
}

#[test]
fn the_quic_transport_carries_pod_to_pod_over_udp_only() -> Result<()> {
    let c = Cluster::with("hbq", PODS, |_, k| NodeConfig {
        transport: if k == 1 {
            DefaultTransport::Quic
        } else {
            DefaultTransport::Tcp
        },
        ..NodeConfig::default()
    })?;
    let (node, wire) = c.topo.wire().unwrap();
    let node_ns = Netns::open(format!("/var/run/netns/{node}"))?;
    let marker = "quic-plaintext-must-not-cross-5b1e";
    let cap = Capture::watching(&node_ns, wire, &[marker.as_bytes()])?;
    for v6 in [false, true] {
        let to = c.addr("b1", v6, APP_PORT);
        let reply =
            ask(&c.ns("a1"), to, marker).with_context(|| format!("a1 -> {to} over QUIC"))?;
        assert!(reply.ends_with(marker), "{reply}");
        assert_eq!(peer_ip(&reply), Some(c.addr("a1", v6, 0).ip()), "{reply}");
    }
    // Many streams, one QUIC connection per peer address.
    let to = c.addr("b1", false, APP_PORT);
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let ns = c.ns("a1");
            std::thread::spawn(move || ask(&ns, to, &format!("q{i}")))
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap()?.starts_with("b1 from"));
    }
    let frames = cap.stop()?;
    assert!(
        !frames.contains(marker.as_bytes()),
        "plaintext crossed the wire"
    );
    assert!(
        frames
            .packets()
            .iter()
            .all(|p| p.proto == redirect_tests::capture::Proto::Udp
                && (p.sport == PORT_QUIC || p.dport == PORT_QUIC)),
        "traffic between the nodes other than QUIC to {PORT_QUIC}"
    );
    // Back from node 2 (TCP transport) over HBONE/TCP.
    assert!(ask(&c.ns("b1"), c.addr("a1", false, APP_PORT), "back")?.starts_with("a1 from"));
    Ok(())
}

#[test]
fn idle_tunnels_survive_keepalive_pings() -> Result<()> {
    let c = Cluster::new("hbka", PODS)?;
    // Pings every 300 ms on b1's node: a tunnel idle for many of them must live on.
    c.node(2).set_keepalive(Duration::from_millis(300));
    let to = c.addr("b1", false, APP_PORT);
    let mut s = c
        .ns("a1")
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))??;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    for round in 0..3 {
        writeln!(s, "round {round}")?;
        let mut l = String::new();
        r.read_line(&mut l)?;
        assert!(l.trim_end().ends_with(&format!("round {round}")), "{l:?}");
        std::thread::sleep(Duration::from_millis(1500));
    }
    Ok(())
}
