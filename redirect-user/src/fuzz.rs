//! Entry points for fuzzing: one per decoder of bytes that come from a peer or from a
//! file we do not write, each asserting what the decoder must hold (a panic is a
//! finding). The cargo-fuzz targets in `redirect-user/fuzz/` call them, one target each;
//! the unit test below replays the committed corpus (`fuzz/corpus/<target>/`) and every
//! kept crash (`fuzz/regressions/<target>/`) through them on the stable toolchain.
//!
//! Each function says how its input is laid out (what a corpus file holds).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use crate::{
    admin::{self, Head},
    agent::control,
    cni::{
        self, PluginRequest, PluginResponse,
        plugin::{self, Command},
    },
    proxy::{
        hbone::{self, Inbound, Refusal},
        identity::{Identity, identities_of},
        quic::{self, HeadError, HeadReader, MAX_HEAD},
        registry::{Registry, SourcePeer},
        unmap,
    },
    zds::codec::{self, MAX_MESSAGE, Request, Response},
};

/// A fuzz target's entry: the input bytes, nothing returned; panics on a finding.
pub type Entry = fn(&[u8]);

/// Every target, by the name of its cargo-fuzz target and corpus directory.
pub const TARGETS: &[(&str, Entry)] = &[
    ("zds_request", zds_request),
    ("zds_response", zds_response),
    ("hbone_request", hbone_request),
    ("hbone_h2", hbone_h2),
    ("quic_head", quic_head),
    ("workload_file", workload_file),
    ("control_request", control_request),
    ("cni_request", cni_request),
    ("cni_plugin", cni_plugin),
    ("peer_identity", peer_identity),
    ("admin_head", admin_head),
];

/// Runs the target named `name` on `data`; `false` when there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, f)) => {
            f(data);
            true
        }
        None => false,
    }
}

// ---------------------------------------------------------------------------------------
// The node-agent protocol.

/// The proxy's side of the node-agent protocol: one datagram from the agent.
/// Layout: the number of file descriptors that came with it (first byte, mod 4), then
/// the datagram.
pub fn zds_request(data: &[u8]) {
    let Some((&fds, bytes)) = data.split_first() else {
        return;
    };
    let fds = usize::from(fds % 4);
    let answer: Response = match Request::decode(bytes, fds) {
        Ok(req) => {
            assert_eq!(
                Request::decode(&req.encode(), fds).as_ref(),
                Ok(&req),
                "decode(encode(x)) != x"
            );
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    };
    // The proxy answers a refused message with the reason: the ack must still fit the
    // agent's buffer and read as a refusal.
    check_ack(&answer);
}

/// The agent's side: one datagram from the proxy. Layout: a first byte (odd: the
/// hello, even: an ack), then the datagram.
pub fn zds_response(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    if kind % 2 == 1 {
        let _ = codec::decode_hello(bytes);
        return;
    }
    if let Ok(r) = codec::decode_response(bytes) {
        assert_eq!(
            codec::decode_response(&codec::encode_response(&r)),
            Ok(r.clone()),
            "decode(encode(x)) != x"
        );
    }
    // Any text as the reason of a refusal (reasons carry what the agent sent).
    check_ack(&Err(String::from_utf8_lossy(bytes).into_owned()));
}

/// An ack as the proxy sends it fits the agent's buffer, and reads back as what it
/// says: a refusal as a refusal, with (a prefix of) its reason.
fn check_ack(r: &Response) {
    let out = codec::encode_response(r);
    assert!(
        out.len() < MAX_MESSAGE,
        "an ack of {} bytes (limit {MAX_MESSAGE})",
        out.len()
    );
    let back = codec::decode_response(&out).expect("our own ack decodes");
    match (r, &back) {
        (Ok(()), Ok(())) => {}
        // An empty reason is sent as a placeholder.
        (Err(sent), Err(read)) => assert!(
            sent.is_empty() || sent.starts_with(read.as_str()),
            "reason {read:?} is not a prefix of {sent:?}"
        ),
        (sent, read) => panic!("sent {sent:?}, the agent reads {read:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// HBONE.

/// The HBONE server's check of a CONNECT request. Layout: three lines, the address the
/// connection arrived at, the method, the authority (the rest of the input).
pub fn hbone_request(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (Some(at), Some(method), Some(authority)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let Ok(arrived_at) = at.parse::<IpAddr>() else {
        return;
    };
    check_connect(method, authority, arrived_at);
    // As the server sees them: through the HTTP types h2 builds the request with.
    if let (Ok(m), Ok(a)) = (
        http::Method::from_bytes(method.as_bytes()),
        http::uri::Authority::try_from(authority),
    ) {
        check_connect(m.as_str(), a.as_str(), arrived_at);
    }
}

fn check_connect(method: &str, authority: &str, arrived_at: IpAddr) {
    let Ok(target) = hbone::check_request(method, authority, arrived_at) else {
        return;
    };
    assert_eq!(method, "CONNECT");
    assert_eq!(
        target.ip(),
        unmap(SocketAddr::new(arrived_at, 0)).ip(),
        "a target outside the connection's destination"
    );
    let parsed: SocketAddr = authority.parse().expect("an accepted authority parses");
    assert_eq!(unmap(parsed), target);
    // What a client writes for that target is accepted as the same target.
    let uri = hbone::authority_uri(target);
    let written = uri.authority().expect("an authority").as_str();
    assert_eq!(
        hbone::check_request("CONNECT", written, arrived_at),
        Ok(target),
        "our own request for {target} ({written}) is refused"
    );
}

/// Where the fuzzed HBONE connection arrives, and where it comes from.
const H2_ARRIVED_AT: [u8; 4] = [10, 0, 0, 2];
const H2_PEER: &str = "10.0.0.1:40000";

/// An inbound side that refuses every app connection, recording what it was asked.
#[derive(Default)]
struct RecordingInbound {
    asked: Mutex<Vec<(SocketAddr, SocketAddr)>>,
}

impl Inbound for RecordingInbound {
    async fn open(
        &self,
        target: SocketAddr,
        client: SocketAddr,
        _peer: Option<&Identity>,
    ) -> Result<tokio::net::TcpStream, Refusal> {
        self.asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((target, client));
        Err(Refusal::Unavailable("fuzzing".into()))
    }

    fn pod(&self) -> &str {
        "fuzz"
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// The HBONE server after TLS: the bytes a client sends on one connection (HTTP/2:
/// the preface, then frames), all of them, then its end. Layout: those bytes.
pub fn hbone_h2(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let input = data.to_vec();
    runtime().block_on(async move {
        let (client, server) = tokio::io::duplex(64 << 10);
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        });
        // The server's answers are read and dropped, so that it never blocks on them.
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 16 << 10];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        let inbound = Arc::new(RecordingInbound::default());
        let arrived_at = IpAddr::from(H2_ARRIVED_AT);
        let peer: SocketAddr = H2_PEER.parse().unwrap();
        let serve = async {
            if let Ok(conn) = hbone::server_handshake(server).await {
                hbone::serve_connection(inbound.clone(), conn, arrived_at, peer, None).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), serve)
            .await
            .expect("the server ends once the client's bytes have ended");
        writer.abort();
        reader.abort();
        // Streams are served in tasks of their own: let them finish.
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        let asked = inbound.asked.lock().unwrap().clone();
        for (target, client) in asked {
            assert_eq!(target.ip(), arrived_at, "app connection to {target}");
            assert_eq!(client.ip(), peer.ip(), "app connection from {client}");
        }
    });
}

// ---------------------------------------------------------------------------------------
// The QUIC transport's stream heads.

/// What reading a head from a stream came to. `Head` holds the head and every byte of
/// the stream after it (read early, or still unread).
#[derive(Debug, PartialEq, Eq)]
enum HeadOutcome<T> {
    Head(T, Vec<u8>),
    TooLarge,
    Malformed,
    Ended,
}

/// Reads a head from `stream` as [`quic`] does, the stream arriving in reads of
/// `chunk` bytes.
fn read_head<T>(
    stream: &[u8],
    chunk: usize,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, HeadError>,
) -> HeadOutcome<T> {
    let mut reader = HeadReader::new();
    let mut rest = stream;
    loop {
        let space = match reader.space() {
            Ok(s) => s,
            Err(_) => return HeadOutcome::TooLarge,
        };
        if rest.is_empty() {
            return HeadOutcome::Ended;
        }
        let n = chunk.min(space.len()).min(rest.len());
        space[..n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        match reader.filled(n, &parse) {
            Ok(Some((head, early))) => {
                let mut after: Vec<u8> = early.to_vec();
                after.extend_from_slice(rest);
                return HeadOutcome::Head(head, after);
            }
            Ok(None) => {}
            Err(HeadError::TooLarge) => return HeadOutcome::TooLarge,
            Err(HeadError::Malformed(_)) => return HeadOutcome::Malformed,
            Err(HeadError::Ended(_)) => return HeadOutcome::Ended,
        }
    }
}

/// The QUIC transport's stream heads. Layout: a first byte (bit 0 set: a response
/// head, as the client reads it; clear: a request head, as the server reads it; the
/// other bits + 1: the size of the reads the stream arrives in), then the stream.
pub fn quic_head(data: &[u8]) {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(ctl >> 1) + 1;
    if ctl & 1 == 0 {
        let whole = read_head(stream, MAX_HEAD, quic::parse_request);
        assert_eq!(
            read_head(stream, chunk, quic::parse_request),
            whole,
            "the request head depends on how the stream arrives (reads of {chunk})"
        );
        if let HeadOutcome::Head(head, after) = &whole {
            assert!(stream.ends_with(after));
            // What our client writes for that target reads back the same.
            if let Ok(target) = head.authority.parse::<SocketAddr>() {
                let written = quic::request_head(target, target, Some("00-ab-cd-01"));
                let (back, n) = quic::parse_request(&written)
                    .ok()
                    .flatten()
                    .expect("our own request head parses");
                assert_eq!(n, written.len());
                assert_eq!(back.method, "CONNECT");
                assert_eq!(back.authority, target.to_string());
                assert_eq!(back.forwarded, Some(format!("for=\"{target}\"")));
            }
        }
    } else {
        let whole = read_head(stream, MAX_HEAD, quic::parse_response);
        assert_eq!(
            read_head(stream, chunk, quic::parse_response),
            whole,
            "the response head depends on how the stream arrives (reads of {chunk})"
        );
        if let HeadOutcome::Head(code, after) = &whole {
            assert!(stream.ends_with(after));
            if let Ok(status) = http::StatusCode::from_u16(*code) {
                let written = quic::response_head(status);
                assert_eq!(
                    quic::parse_response(&written).ok().flatten(),
                    Some((*code, written.len()))
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Files and local sockets.

/// The workload file (YAML). Layout: the file.
pub fn workload_file(data: &[u8]) {
    // The file is read as UTF-8 text: other bytes never reach the parser.
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    let r = Registry::new();
    let n = match r.load_yaml(yaml) {
        Ok(n) => n,
        Err(e) => {
            let _ = e.to_string();
            assert!(
                r.workloads().is_empty(),
                "a refused file changed the registry"
            );
            return;
        }
    };
    let all = r.workloads();
    assert_eq!(all.len(), n, "workloads read vs held");
    let peer = SourcePeer {
        trust_domain: "cluster.local".into(),
        namespace: "default".into(),
        service_account: "default".into(),
    };
    for w in &all {
        assert_eq!(r.by_uid(&w.uid).as_deref(), Some(&**w));
        for ip in &w.ips {
            assert_eq!(
                r.by_ip(*ip).map(|x| x.uid.clone()),
                Some(w.uid.clone()),
                "{ip} of {}",
                w.uid
            );
        }
        let _ = r.authorize(w, None);
        let _ = r.authorize(w, Some(&peer));
        let _ = r.requires_mtls(w);
    }
    // A broken file afterwards changes nothing.
    assert!(r.load_yaml("workloads: [").is_err());
    assert_eq!(r.workloads().len(), n);
}

/// The part of `data` one `read_line` takes (through the first newline), at most
/// `max` + 1 bytes, as text; `None` when it is not UTF-8 (the session ends there).
fn first_line(data: &[u8], max: usize) -> Option<&str> {
    let end = data
        .iter()
        .position(|&b| b == b'\n')
        .map_or(data.len(), |i| i + 1)
        .min(max + 1);
    std::str::from_utf8(&data[..end]).ok()
}

/// The agent's control socket: one request line. Layout: the bytes sent.
pub fn control_request(data: &[u8]) {
    let Some(line) = first_line(data, control::MAX_LINE) else {
        return;
    };
    match control::parse_request(line) {
        Ok(req) => {
            let again = serde_json::to_string(&req).expect("a request serializes");
            assert_eq!(control::parse_request(&again).ok(), Some(req));
        }
        Err(reason) => {
            let answer = control::ControlResponse::err(reason);
            let out = serde_json::to_vec(&answer).expect("an answer serializes");
            assert!(!out.contains(&b'\n'), "a refusal of more than one line");
        }
    }
}

/// The agent's plugin socket, both ways. Layout: a first byte (even: the request line
/// the agent reads; odd: the answer line the plugin reads), then the bytes sent.
pub fn cni_request(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    if kind % 2 == 1 {
        // The plugin reads up to a newline (at most MAX_LINE bytes) and decodes that.
        let end = bytes
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| i + 1);
        if end > cni::MAX_LINE {
            return;
        }
        if let Ok(answer) = serde_json::from_slice::<PluginResponse>(&bytes[..end]) {
            let again = serde_json::to_vec(&answer).expect("an answer serializes");
            assert_eq!(
                serde_json::from_slice::<PluginResponse>(&again).ok(),
                Some(answer)
            );
        }
        return;
    }
    let Some(line) = first_line(bytes, cni::MAX_LINE) else {
        return;
    };
    match cni::server::parse_request(line) {
        Ok(req) => check_plugin_line(&req),
        Err(answer) => {
            assert!(matches!(answer, PluginResponse::Refused { .. }));
            let out = serde_json::to_vec(&answer).expect("an answer serializes");
            assert!(!out.contains(&b'\n'), "a refusal of more than one line");
        }
    }
}

/// What the plugin sends for `req` is read back the same by the agent (when it fits a
/// line).
fn check_plugin_line(req: &PluginRequest) {
    let mut line = serde_json::to_string(req).expect("a request serializes");
    line.push('\n');
    if line.len() <= cni::MAX_LINE {
        assert_eq!(cni::server::parse_request(&line).as_ref(), Ok(req));
    }
}

/// The CNI plugin's input: its environment and stdin. Layout: `KEY=VALUE` lines (the
/// environment: `CNI_COMMAND`, `CNI_ARGS`, ...), an empty line, then stdin.
pub fn cni_plugin(data: &[u8]) {
    let (env_part, stdin) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let env: Vec<(String, String)> = String::from_utf8_lossy(env_part)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let get = |k: &str| {
        env.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    match plugin::parse_command(get("CNI_COMMAND").as_deref()) {
        Ok(Command::Add) => {
            let Ok(conf) = plugin::parse_config(stdin) else {
                check_outcome(&plugin::run(get, stdin), false);
                return;
            };
            match plugin::pod_request(&plugin::Env::from(get), &conf) {
                // The plugin would ask the agent now: what it sends must read back.
                Ok(Some(pod)) => check_plugin_line(&PluginRequest::Add { pod }),
                Ok(None) => {
                    let out = plugin::run(get, stdin);
                    check_outcome(&out, true);
                    assert_eq!(out.stdout, Some(plugin::add_output(&conf)));
                }
                Err(_) => check_outcome(&plugin::run(get, stdin), false),
            }
        }
        // STATUS connects to the agent's socket: only its configuration is decoded.
        Ok(Command::Status) => {
            let _ = plugin::parse_config(stdin);
        }
        Ok(_) => {
            let out = plugin::run(get, stdin);
            check_outcome(&out, out.ok);
        }
        Err(_) => check_outcome(&plugin::run(get, stdin), false),
    }
}

/// An outcome as the runtime reads it: a failure prints a CNI error object.
fn check_outcome(out: &plugin::Outcome, ok: bool) {
    assert_eq!(out.ok, ok, "outcome {out:?}");
    if !out.ok {
        let e = out.stdout.as_ref().expect("a failure prints an error");
        assert!(e.get("code").and_then(|c| c.as_u64()).is_some(), "{e}");
        assert!(e.get("msg").and_then(|c| c.as_str()).is_some(), "{e}");
        let v = e.get("cniVersion").and_then(|c| c.as_str()).unwrap_or("");
        assert!(plugin::version_supported(v), "answered in version {v:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Peers' certificates and identities.

/// A peer's certificate and identities. Layout: a first byte (even: a certificate in
/// DER, as a TLS peer presents it; odd: an identity URI), then the bytes.
pub fn peer_identity(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    if kind % 2 == 0 {
        let der = rustls::pki_types::CertificateDer::from(bytes);
        for id in identities_of(&der) {
            assert_eq!(id.to_string().parse::<Identity>().ok(), Some(id));
        }
        return;
    }
    let Ok(s) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(id) = s.parse::<Identity>() {
        assert_eq!(id.to_string(), s, "an identity reads back differently");
    }
}

// ---------------------------------------------------------------------------------------
// The admin server.

/// The admin server's request head (metrics and health ports, reachable from the
/// network). Layout: a first byte (+ 1: the size of the reads, at most 256), then the
/// bytes sent.
pub fn admin_head(data: &[u8]) {
    let Some((&ctl, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(ctl) + 1;
    let read = |chunk: usize| -> Head {
        let mut buf = Vec::new();
        for piece in bytes.chunks(chunk) {
            buf.extend_from_slice(piece);
            if let Some(h) = admin::head_so_far(&buf) {
                return h;
            }
        }
        Head::Error(400, "incomplete request\n")
    };
    let h = read(chunk);
    if let Head::Get { path, .. } = &h {
        assert!(!path.contains(['?', '#']), "path {path:?} keeps its query");
    }
    // Below the limit the answer cannot depend on how the bytes arrive.
    if bytes.len() < 7 * 1024 {
        assert_eq!(h, read(1024), "reads of {chunk} vs 1024");
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
    }

    /// The files of `dir/<target>/`, for each target directory there.
    fn inputs(dir: &Path) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        let Ok(targets) = std::fs::read_dir(dir) else {
            return out;
        };
        for t in targets.flatten().filter(|t| t.path().is_dir()) {
            let name = t.file_name().to_string_lossy().into_owned();
            assert!(
                TARGETS.iter().any(|(n, _)| *n == name),
                "{} is not a fuzz target",
                t.path().display()
            );
            for f in std::fs::read_dir(t.path()).unwrap().flatten() {
                if f.file_name() != ".gitkeep" {
                    out.push((name.clone(), f.path()));
                }
            }
        }
        out.sort();
        out
    }

    /// Every committed seed and every kept crash, through the target it belongs to.
    #[test]
    fn corpus_and_regressions_replay() {
        let mut count = 0;
        for dir in ["corpus", "regressions"] {
            for (target, path) in inputs(&fuzz_dir().join(dir)) {
                let data = std::fs::read(&path).unwrap();
                let r = std::panic::catch_unwind(|| run(&target, &data));
                assert!(r.is_ok(), "{} fails {target}", path.display());
                count += 1;
            }
        }
        assert!(count > 0, "no corpus found under {}", fuzz_dir().display());
    }

    /// Each target has a cargo-fuzz target and seeds, and nothing else is there.
    #[test]
    fn every_target_is_wired() {
        let bins = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        for (name, _) in TARGETS {
            let src = fuzz_dir().join(format!("fuzz_targets/{name}.rs"));
            let text =
                std::fs::read_to_string(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
            assert!(
                text.contains(&format!("fuzz::{name}(")),
                "{} must call fuzz::{name}",
                src.display()
            );
            assert!(
                bins.contains(&format!("name = \"{name}\"")),
                "no [[bin]] {name} in fuzz/Cargo.toml"
            );
            let seeds = std::fs::read_dir(fuzz_dir().join("corpus").join(name))
                .map(|d| d.count())
                .unwrap_or(0);
            assert!(seeds > 0, "no seed corpus for {name}");
        }
        let files = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
            .unwrap()
            .count();
        assert_eq!(files, TARGETS.len(), "fuzz_targets/ vs TARGETS");
    }

    /// Writes the seed corpus (`cargo test -p redirect-user --lib fuzz::tests::write_seeds
    /// -- --ignored`); files of the same name are replaced, others are kept.
    #[test]
    #[ignore = "writes the seed corpus into the source tree"]
    fn write_seeds() {
        for (target, name, bytes) in seeds() {
            let dir = fuzz_dir().join("corpus").join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    /// An HTTP/2 frame.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An HPACK header field, literal without indexing; the name is a static table
    /// index (below 15) or, with 0, a literal.
    fn field(index: u8, name: &str, value: &str) -> Vec<u8> {
        let mut b = vec![index];
        if index == 0 {
            b.push(name.len() as u8);
            b.extend(name.as_bytes());
        }
        b.push(value.len() as u8);
        b.extend(value.as_bytes());
        b
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;

    /// A client's connection: preface, SETTINGS, then `frames`.
    fn h2(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut b = PREFACE.to_vec();
        b.extend(frame(4, 0, 0, &[]));
        for f in frames {
            b.extend(f);
        }
        b
    }

    fn connect(stream: u32, authority: &str) -> Vec<u8> {
        let mut block = field(2, ":method", "CONNECT");
        block.extend(field(1, ":authority", authority));
        block.extend(field(0, "forwarded", "for=\"10.0.0.1:40000\""));
        frame(1, END_HEADERS, stream, &block)
    }

    const WORKLOAD_FILE: &str = r#"workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  locality: {region: r1, zone: z1, subzone: ""}
  services:
    "default/example.com":
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
      - namespaces: [!Prefix ops]
  dryRun: false
- name: strict
  namespace: legacy
  scope: Namespace
  action: Deny
  rules:
  - - - notPrincipals: [!Presence []]
  dryRun: false
- name: no-ports
  namespace: shop
  scope: Global
  action: Deny
  rules:
  - - - destinationPorts: [9090]
        serviceAccounts: [{namespace: shop, serviceAccount: bad}]
  dryRun: true
"#;

    /// The seed corpus: (target, file name, bytes), real messages of each protocol.
    fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
        use crate::{
            agent::PodSpec,
            membership::CniPod,
            proxy::identity::{CertSource, LocalCa},
            zds::proto::WorkloadInfo,
        };
        let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
        let mut add = |t: &'static str, name: &str, bytes: Vec<u8>| {
            out.push((t, name.to_string(), bytes));
        };
        let with = |first: u8, rest: &[u8]| [&[first][..], rest].concat();

        // Node-agent protocol.
        let info = WorkloadInfo {
            name: "web-0".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
        };
        let uid = "0f8a2c1e-5b7d-4c3a-9e21-7d6b5a4c3b2a";
        for (name, req, fds) in [
            (
                "add",
                Request::Add {
                    uid: uid.into(),
                    info: info.clone(),
                },
                1,
            ),
            (
                "add-no-fd",
                Request::Add {
                    uid: uid.into(),
                    info,
                },
                0,
            ),
            ("keep", Request::Keep { uid: uid.into() }, 0),
            ("del", Request::Del { uid: uid.into() }, 0),
            ("del-with-fd", Request::Del { uid: uid.into() }, 1),
            ("snapshot-sent", Request::SnapshotSent, 0),
        ] {
            add("zds_request", name, with(fds, &req.encode()));
        }
        add("zds_request", "empty", vec![0]);
        add(
            "zds_response",
            "ack",
            with(0, &codec::encode_response(&Ok(()))),
        );
        add(
            "zds_response",
            "nack",
            with(
                0,
                &codec::encode_response(&Err("add of \"u1\": no such namespace".into())),
            ),
        );
        add("zds_response", "hello", with(1, &codec::encode_hello()));
        add("zds_response", "hello-v2", vec![1, 0x08, 0x02]);

        // HBONE.
        for (name, text) in [
            ("v4", "10.0.0.2\nCONNECT\n10.0.0.2:8080"),
            ("v6", "fd00::2\nCONNECT\n[fd00::2]:443"),
            ("mapped", "::ffff:10.0.0.2\nCONNECT\n10.0.0.2:80"),
            ("elsewhere", "10.0.0.2\nCONNECT\n10.0.0.3:8080"),
            (
                "hostname",
                "10.0.0.2\nCONNECT\nsvc.shop.svc.cluster.local:80",
            ),
            ("get", "10.0.0.2\nGET\n10.0.0.2:8080"),
        ] {
            add("hbone_request", name, text.as_bytes().to_vec());
        }
        add(
            "hbone_h2",
            "connect",
            h2(&[
                connect(1, "10.0.0.2:8080"),
                frame(0, END_STREAM, 1, b"hello"),
            ]),
        );
        add(
            "hbone_h2",
            "connect-elsewhere",
            h2(&[connect(1, "10.0.0.3:8080")]),
        );
        add("hbone_h2", "connect-v6", h2(&[connect(1, "[fd00::2]:80")]));
        let mut get = vec![0x82, 0x86, 0x84];
        get.extend(field(1, ":authority", "10.0.0.2:8080"));
        add(
            "hbone_h2",
            "get",
            h2(&[frame(1, END_HEADERS | END_STREAM, 1, &get)]),
        );
        add(
            "hbone_h2",
            "two-streams-ping-reset",
            h2(&[
                connect(1, "10.0.0.2:8080"),
                connect(3, "10.0.0.2:9090"),
                frame(6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]),
                frame(8, 0, 0, &(1u32 << 20).to_be_bytes()),
                frame(3, 0, 3, &8u32.to_be_bytes()),
                frame(7, 0, 0, &[0, 0, 0, 3, 0, 0, 0, 0]),
            ]),
        );
        add("hbone_h2", "preface-only", PREFACE.to_vec());

        // QUIC stream heads.
        let target: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let mut req = quic::request_head(
            target,
            client,
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        req.extend(b"GET / HTTP/1.1\r\n\r\n");
        add("quic_head", "request", with(0, &req));
        add("quic_head", "request-in-reads-of-3", with(4, &req));
        let v6 = quic::request_head(
            "[fd00::2]:443".parse().unwrap(),
            "[fd00::1]:5000".parse().unwrap(),
            None,
        );
        add("quic_head", "request-v6", with(0, &v6));
        add(
            "quic_head",
            "request-http10",
            with(0, b"CONNECT 10.0.0.2:80 HTTP/1.0\r\n\r\n"),
        );
        let mut resp = quic::response_head(http::StatusCode::OK);
        resp.extend(b"early bytes");
        add("quic_head", "response-200", with(1, &resp));
        add(
            "quic_head",
            "response-503-in-reads-of-2",
            with(
                3,
                &quic::response_head(http::StatusCode::SERVICE_UNAVAILABLE),
            ),
        );

        // Files and local sockets.
        add(
            "workload_file",
            "upstream-format",
            WORKLOAD_FILE.as_bytes().to_vec(),
        );
        add(
            "workload_file",
            "one-workload",
            b"workloads:\n- uid: u1\n  namespace: a\n  workloadIps: [10.0.0.1]\n".to_vec(),
        );
        let pod = PodSpec {
            uid: uid.into(),
            name: "web-0".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            netns: "/var/run/netns/cni-1".into(),
            dns_capture: true,
        };
        for (name, req) in [
            ("add", control::ControlRequest::Add { pod }),
            ("del", control::ControlRequest::Del { uid: uid.into() }),
            ("list", control::ControlRequest::List),
            ("status", control::ControlRequest::Status),
        ] {
            let mut line = serde_json::to_vec(&req).unwrap();
            line.push(b'\n');
            add("control_request", name, line);
        }
        let cni_pod = CniPod {
            uid: uid.into(),
            name: "web-0".into(),
            namespace: "shop".into(),
            netns: "/var/run/netns/cni-1".into(),
            container_id: "c0ffee".into(),
            ips: vec!["10.1.0.5".parse().unwrap(), "fd00:1::5".parse().unwrap()],
        };
        let mut line = serde_json::to_vec(&PluginRequest::Add { pod: cni_pod }).unwrap();
        line.push(b'\n');
        add("cni_request", "add", with(0, &line));
        for (name, answer) in [
            ("enrolled", PluginResponse::Enrolled { uid: uid.into() }),
            (
                "not-in-mesh",
                PluginResponse::NotInMesh {
                    reason: "namespace shop is not labelled".into(),
                },
            ),
            (
                "refused",
                PluginResponse::Refused {
                    reason: "no proxy connected".into(),
                },
            ),
        ] {
            let mut line = serde_json::to_vec(&answer).unwrap();
            line.push(b'\n');
            add("cni_request", name, with(1, &line));
        }
        let conf = |version: &str, prev: bool| {
            let mut c = serde_json::json!({
                "cniVersion": version,
                "name": "k8s-pod-network",
                "type": "redirect-cni",
                "socket": "/nonexistent/pluginevent.sock",
                "timeout_secs": 1,
            });
            if prev {
                c["prevResult"] = serde_json::json!({
                    "cniVersion": version,
                    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/cni-1"}],
                    "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0}],
                    "dns": {"nameservers": ["10.96.0.10"]}
                });
            }
            serde_json::to_vec(&c).unwrap()
        };
        let pod_env = "CNI_COMMAND=ADD\nCNI_CONTAINERID=c0ffee\nCNI_NETNS=/var/run/netns/cni-1\nCNI_IFNAME=eth0\nCNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=0f8a2c1e\nCNI_PATH=/opt/cni/bin\n\n";
        for (name, env, stdin) in [
            ("add-pod", pod_env, conf("1.0.0", true)),
            ("add-pod-0.3.1", pod_env, conf("0.3.1", true)),
            (
                "add-not-a-pod",
                "CNI_COMMAND=ADD\nCNI_CONTAINERID=c1\nCNI_NETNS=/var/run/netns/x\nCNI_ARGS=IgnoreUnknown=1\n\n",
                conf("1.1.0", false),
            ),
            (
                "version",
                "CNI_COMMAND=VERSION\n\n",
                br#"{"cniVersion":"0.4.0"}"#.to_vec(),
            ),
            ("del", "CNI_COMMAND=DEL\n\n", conf("1.0.0", true)),
            ("check", "CNI_COMMAND=CHECK\n\n", conf("0.4.0", true)),
            ("status", "CNI_COMMAND=STATUS\n\n", conf("1.1.0", false)),
        ] {
            add("cni_plugin", name, [env.as_bytes(), &stdin].concat());
        }

        // Certificates and identities.
        let ca = LocalCa::ephemeral().unwrap();
        let id = Identity::new("cluster.local", "shop", "web");
        let key = ca.certified_key(&id).unwrap();
        add("peer_identity", "leaf-cert", with(0, &key.cert[0]));
        add(
            "peer_identity",
            "identity",
            with(1, b"spiffe://cluster.local/ns/shop/sa/web"),
        );
        add(
            "peer_identity",
            "identity-dots",
            with(1, b"spiffe://td-1.example_x/ns/My.Ns/sa/.."),
        );

        // The admin server.
        for (name, reads, head) in [
            (
                "metrics",
                255,
                &b"GET /metrics HTTP/1.1\r\nHost: node:15014\r\nAccept: */*\r\n\r\n"[..],
            ),
            (
                "readyz-in-reads-of-4",
                3,
                b"HEAD /readyz?verbose=1 HTTP/1.0\r\n\r\n",
            ),
            (
                "post",
                255,
                b"POST /debug/pods HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            ),
            ("tls", 255, b"\x16\x03\x01\x00\x05hello"),
        ] {
            add("admin_head", name, with(reads, head));
        }
        out
    }
}
