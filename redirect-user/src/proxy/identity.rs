//! Workload identities and the mutual TLS of the mesh.
//!
//! An identity is a SPIFFE URI, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! carried as a URI SAN of a workload certificate. In the in-pod model the proxy presents
//! the *workload's* identity: the source pod's on outbound connections, the destination
//! pod's on inbound ones (`shared/reference/hbone.md`).
//!
//! Certificates come from a [`CertSource`], asked at every handshake: the built-in
//! [`LocalCa`] (a root shared through a directory, short-lived leaves issued on demand) or
//! [`FileCerts`] (files written by someone else, re-read when they change). [`Tls`] turns
//! a source into rustls configurations: TLS 1.3 only, AES-GCM suites only, mutual
//! authentication mandatory, peers checked by SPIFFE identity rather than DNS name.

use std::{
    collections::HashMap,
    fmt,
    fs::{self, DirBuilder, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, string::Ia5String,
};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName as TlsDn, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert, Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime, pem::PemObject,
    },
    server::{
        ClientHello, NoServerSessionStorage, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use tracing::{debug, info, warn};

/// The trust domain of a mesh that does not configure one.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// ALPN of HBONE over TCP.
pub const ALPN_H2: &[u8] = b"h2";

/// Lifetime of a leaf issued by [`LocalCa`].
const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A [`LocalCa`] leaf is re-issued when it has less than this left.
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(3600);
/// Leaves start this long in the past, for peers whose clocks lag a little.
const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Lifetime of a [`LocalCa`] root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// [`FileCerts`] looks at a file's metadata at most this often.
const RECHECK: Duration = Duration::from_secs(1);

const ROOT_CERT: &str = "root-cert.pem";
const ROOT_KEY: &str = "root-key.pem";
const CHAIN: &str = "cert-chain.pem";
const KEY: &str = "key.pem";
const CA_LOCK: &str = ".ca.lock";

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
/// exactly that shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    /// The identity of `service_account` in `namespace` (not validated: [`Identity::from_str`]
    /// is the strict way in).
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    /// Parses exactly `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`: the
    /// trust domain in lower case letters, digits, `.`, `-` and `_`; the namespace and
    /// service account non-empty, of letters, digits, `.`, `-` and `_`, neither `.` nor `..`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &'static str| IdentityError::BadIdentity {
            uri: s.to_owned(),
            reason,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("the scheme must be spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, ns_key, ns, sa_key, sa] = parts[..] else {
            return Err(bad(
                "the shape must be spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
            ));
        };
        if ns_key != "ns" || sa_key != "sa" {
            return Err(bad(
                "the shape must be spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
            ));
        }
        if td.is_empty() {
            return Err(bad("empty trust domain"));
        }
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(bad("the trust domain has a character outside [a-z0-9._-]"));
        }
        for (part, what) in [(ns, "namespace"), (sa, "service account")] {
            if part.is_empty() {
                return Err(bad(if what == "namespace" {
                    "empty namespace"
                } else {
                    "empty service account"
                }));
            }
            if part == "." || part == ".." {
                return Err(bad("a path segment is . or .."));
            }
            if !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(bad("a path segment has a character outside [A-Za-z0-9._-]"));
            }
        }
        Ok(Self::new(td, ns, sa))
    }
}

/// What can go wrong with identities, certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("bad identity URI {uri:?}: {reason}")]
    BadIdentity { uri: String, reason: &'static str },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("bad PEM in {}: {reason}", path.display())]
    BadPem { path: PathBuf, reason: String },
    #[error("bad private key in {}: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("issuing a certificate for {what}: {source}")]
    Issue { what: String, source: rcgen::Error },
    #[error("no certificate for {id}: {reason}")]
    NoCertificate { id: Identity, reason: String },
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Read {
        path: path.to_owned(),
        source,
    }
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Write {
        path: path.to_owned(),
        source,
    }
}

/// Where certificates come from. Asked at every handshake, so a rotated certificate is
/// used by the next handshake and live connections are untouched.
pub trait CertSource: Send + Sync + fmt::Debug + 'static {
    /// The chain and key presenting `id` (issued or loaded as needed, cached).
    fn certified_key(&self, id: &Identity) -> Result<Arc<CertifiedKey>, IdentityError>;
    /// The mesh roots as they are now.
    fn roots(&self) -> Arc<RootCertStore>;
}

/// The ring provider restricted to the mesh's suites: TLS13_AES_256_GCM_SHA384 and
/// TLS13_AES_128_GCM_SHA256 (no ChaCha20). Also used by the QUIC transport.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::{cipher_suite, default_provider};
            let mut p = default_provider();
            p.cipher_suites = vec![
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                cipher_suite::TLS13_AES_128_GCM_SHA256,
            ];
            Arc::new(p)
        })
        .clone()
}

/// The SPIFFE identities in an end-entity certificate's URI SANs (others ignored).
pub fn identities_of(cert: &CertificateDer<'_>) -> Vec<Identity> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => uri.parse().ok(),
            _ => None,
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ----------------------------------------------------------------------------------------
// Files

/// Writes `bytes` to `path` atomically (a new file renamed over it), the new file created
/// with `mode` (so a key is never readable by others, not even for an instant).
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(write_err(path))
}

fn create_dir(path: &Path, mode: u32) -> Result<(), IdentityError> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(write_err(path))
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(read_err(path))
}

/// Warns when a key file is readable by group or others.
fn check_key_mode(path: &Path) {
    if let Ok(md) = fs::metadata(path)
        && md.permissions().mode() & 0o077 != 0
    {
        warn!(
            path = %path.display(),
            mode = format!("{:o}", md.permissions().mode() & 0o777),
            "private key file is readable by group or others"
        );
    }
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::BadPem {
            path: path.to_owned(),
            reason: "no CERTIFICATE section".into(),
        });
    }
    Ok(certs)
}

fn parse_roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, IdentityError> {
    let mut store = RootCertStore::empty();
    for cert in parse_certs(path, pem)? {
        store.add(cert).map_err(|e| IdentityError::BadPem {
            path: path.to_owned(),
            reason: format!("unusable root certificate: {e}"),
        })?;
    }
    Ok(store)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | ((b as u32) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

// ----------------------------------------------------------------------------------------
// LocalCa

/// A leaf issued by [`LocalCa`].
struct Issued {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

/// A built-in CA: a root created once in a directory (`root-cert.pem`, `root-key.pem`
/// mode 0600; the directory itself created 0700) and loaded on later starts, so several
/// proxies (two simulated nodes) share a root. Issues short-lived (24 h) leaf certs with
/// the identity as URI SAN, EC P-256 keys, cached per identity, re-issued when within 1 h
/// of expiry.
pub struct LocalCa {
    root_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    roots: Arc<RootCertStore>,
    dir: Option<PathBuf>,
    cache: Mutex<HashMap<Identity, Issued>>,
    lifetime: Duration,
    renew_before: Duration,
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa")
            .field("dir", &self.dir)
            .field("issued", &lock(&self.cache).len())
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    if crypto_provider().secure_random.fill(&mut bytes).is_err() {
        // Never expected with ring; a time-based serial still differs between issues.
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = t.to_be_bytes();
    }
    bytes[0] = (bytes[0] & 0x7f) | 0x40; // positive, and 16 bytes long
    SerialNumber::from_slice(&bytes)
}

fn issue_err(what: impl fmt::Display) -> impl FnOnce(rcgen::Error) -> IdentityError {
    let what = what.to_string();
    move |source| IdentityError::Issue { what, source }
}

impl LocalCa {
    /// Loads the CA of `dir`, or creates it there (directory 0700, key 0600) when it has
    /// none. Several processes may race: a lock file makes one create and the others load.
    pub fn open_or_create(dir: &Path) -> Result<Self, IdentityError> {
        create_dir(dir, 0o700)?;
        let lock_path = dir.join(CA_LOCK);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(write_err(&lock_path))?;
        lock_file.lock().map_err(write_err(&lock_path))?;
        let result = Self::open_or_create_locked(dir);
        drop(lock_file); // releases the lock
        result
    }

    fn open_or_create_locked(dir: &Path) -> Result<Self, IdentityError> {
        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        if cert_path.exists() {
            let cert_pem = read(&cert_path)?;
            let root_der = parse_certs(&cert_path, &cert_pem)?.swap_remove(0);
            check_key_mode(&key_path);
            let key_pem = read(&key_path)?;
            let key_pem = String::from_utf8(key_pem).map_err(|_| IdentityError::BadKey {
                path: key_path.clone(),
                reason: "not UTF-8 PEM".into(),
            })?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| IdentityError::BadKey {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
            let (_, parsed) = x509_parser::parse_x509_certificate(&root_der).map_err(|e| {
                IdentityError::BadPem {
                    path: cert_path.clone(),
                    reason: e.to_string(),
                }
            })?;
            if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(IdentityError::BadKey {
                    path: key_path,
                    reason: format!("does not match the certificate {}", cert_path.display()),
                });
            }
            let issuer =
                Issuer::from_ca_cert_der(&root_der, key).map_err(issue_err("the root (loaded)"))?;
            debug!(dir = %dir.display(), "loaded the local CA");
            Self::from_parts(root_der, issuer, Some(dir.to_owned()))
        } else {
            let (root_der, key) = Self::new_root()?;
            write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_atomic(
                &cert_path,
                pem_encode("CERTIFICATE", &root_der).as_bytes(),
                0o644,
            )?;
            let issuer = Issuer::from_ca_cert_der(&root_der, key)
                .map_err(issue_err("the root (created)"))?;
            info!(dir = %dir.display(), "created the local CA");
            Self::from_parts(root_der, issuer, Some(dir.to_owned()))
        }
    }

    /// In memory only (unit tests).
    pub fn ephemeral() -> Result<Self, IdentityError> {
        let (root_der, key) = Self::new_root()?;
        let issuer =
            Issuer::from_ca_cert_der(&root_der, key).map_err(issue_err("the root (created)"))?;
        Self::from_parts(root_der, issuer, None)
    }

    fn new_root() -> Result<(CertificateDer<'static>, KeyPair), IdentityError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(issue_err("the root"))?;
        let mut p = CertificateParams::default();
        let serial = random_serial();
        // Each root has its own name, so a certificate of another root is an unknown
        // issuer rather than a bad signature.
        let tag: String = serial.to_bytes()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "redirect");
        dn.push(DnType::CommonName, format!("redirect mesh root CA {tag}"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.serial_number = Some(serial);
        let now = SystemTime::now();
        p.not_before = (now - CLOCK_SKEW).into();
        p.not_after = (now + ROOT_LIFETIME).into();
        let cert = p.self_signed(&key).map_err(issue_err("the root"))?;
        Ok((cert.der().clone(), key))
    }

    fn from_parts(
        root_der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
        dir: Option<PathBuf>,
    ) -> Result<Self, IdentityError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(root_der.clone())
            .map_err(|e| IdentityError::BadPem {
                path: dir
                    .as_deref()
                    .map(|d| d.join(ROOT_CERT))
                    .unwrap_or_default(),
                reason: format!("unusable root certificate: {e}"),
            })?;
        Ok(Self {
            root_der,
            issuer,
            roots: Arc::new(roots),
            dir,
            cache: Mutex::new(HashMap::new()),
            lifetime: LEAF_LIFETIME,
            renew_before: LEAF_RENEW_BEFORE,
        })
    }

    /// Issues a fresh leaf for `id`: (certificate DER, PKCS#8 key DER, expiry).
    fn issue(
        &self,
        id: &Identity,
    ) -> Result<(CertificateDer<'static>, Vec<u8>, SystemTime), IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(issue_err(id))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        let uri = Ia5String::try_from(id.to_string()).map_err(issue_err(id))?;
        p.subject_alt_names = vec![SanType::URI(uri)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        let now = SystemTime::now();
        let not_after = now + self.lifetime;
        p.not_before = (now - CLOCK_SKEW).into();
        p.not_after = not_after.into();
        let cert = p.signed_by(&key, &self.issuer).map_err(issue_err(id))?;
        debug!(identity = %id, "issued a workload certificate");
        Ok((cert.der().clone(), key.serialize_der(), not_after))
    }

    /// Writes `id`'s certificate chain and key in the [`FileCerts`] layout under `dir`
    /// (key 0600), plus `dir/root-cert.pem`. Each call issues a fresh certificate (new key,
    /// new serial), so calling it again simulates a rotation. For tests and demos of the
    /// file mode and of rotation.
    pub fn write_identity(&self, id: &Identity, dir: &Path) -> Result<(), IdentityError> {
        let id_dir = identity_dir(dir, id)?;
        let (cert, key, _) = self.issue(id)?;
        create_dir(&id_dir, 0o755)?;
        write_atomic(
            &dir.join(ROOT_CERT),
            pem_encode("CERTIFICATE", &self.root_der).as_bytes(),
            0o644,
        )?;
        write_atomic(
            &id_dir.join(KEY),
            pem_encode("PRIVATE KEY", &key).as_bytes(),
            0o600,
        )?;
        write_atomic(
            &id_dir.join(CHAIN),
            pem_encode("CERTIFICATE", &cert).as_bytes(),
            0o644,
        )
    }
}

impl CertSource for LocalCa {
    fn certified_key(&self, id: &Identity) -> Result<Arc<CertifiedKey>, IdentityError> {
        let mut cache = lock(&self.cache);
        if let Some(issued) = cache.get(id)
            && SystemTime::now() + self.renew_before < issued.not_after
        {
            return Ok(issued.key.clone());
        }
        let (cert, key, not_after) = self.issue(id)?;
        let key = CertifiedKey::from_der(
            vec![cert],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            &crypto_provider(),
        )
        .map_err(|e| IdentityError::NoCertificate {
            id: id.clone(),
            reason: format!("unusable issued key: {e}"),
        })?;
        let key = Arc::new(key);
        cache.insert(
            id.clone(),
            Issued {
                key: key.clone(),
                not_after,
            },
        );
        Ok(key)
    }

    fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }
}

// ----------------------------------------------------------------------------------------
// FileCerts

/// What a file looked like: (mtime, len, inode), or nothing when it could not be seen.
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(paths: &[&Path]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            fs::metadata(p).ok().map(|m| {
                (
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                    m.ino(),
                )
            })
        })
        .collect()
}

/// A value loaded from files, with what the files looked like then.
struct Watched<T> {
    value: T,
    stamp: Stamp,
    checked: Instant,
}

fn identity_dir(dir: &Path, id: &Identity) -> Result<PathBuf, IdentityError> {
    for part in [&id.namespace, &id.service_account] {
        if part.is_empty() || part == "." || part == ".." || part.contains('/') {
            return Err(IdentityError::BadIdentity {
                uri: id.to_string(),
                reason: "the namespace or service account is not a usable path segment",
            });
        }
    }
    Ok(dir.join(&id.namespace).join(&id.service_account))
}

/// Certificates from files, re-read when they change: `<dir>/root-cert.pem` (one or more
/// roots), and per identity `<dir>/<namespace>/<service-account>/cert-chain.pem` (leaf
/// first) + `key.pem` (PKCS#8, SEC1 or PKCS#1). The files' mtime, length and inode are
/// compared at most once per second per identity (cheap at handshake time); a broken new
/// file keeps the previous good certificate and logs a warning. A key file readable by
/// group or others is used, with a warning. The trust domain of a loaded leaf is not
/// checked here.
pub struct FileCerts {
    dir: PathBuf,
    roots: Mutex<Watched<Arc<RootCertStore>>>,
    ids: Mutex<HashMap<Identity, Watched<Arc<CertifiedKey>>>>,
    recheck: Duration,
}

impl fmt::Debug for FileCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileCerts")
            .field("dir", &self.dir)
            .field("identities", &lock(&self.ids).len())
            .finish_non_exhaustive()
    }
}

impl FileCerts {
    /// Opens `dir`, which must hold a usable `root-cert.pem`; identities are loaded when
    /// first asked for.
    pub fn open(dir: &Path) -> Result<Self, IdentityError> {
        let roots_path = dir.join(ROOT_CERT);
        let st = stamp(&[&roots_path]);
        let roots = parse_roots(&roots_path, &read(&roots_path)?)?;
        Ok(Self {
            dir: dir.to_owned(),
            roots: Mutex::new(Watched {
                value: Arc::new(roots),
                stamp: st,
                checked: Instant::now(),
            }),
            ids: Mutex::new(HashMap::new()),
            recheck: RECHECK,
        })
    }

    fn load_identity(chain: &Path, key: &Path) -> Result<CertifiedKey, IdentityError> {
        let certs = parse_certs(chain, &read(chain)?)?;
        check_key_mode(key);
        let key_der =
            PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| IdentityError::BadKey {
                path: key.to_owned(),
                reason: e.to_string(),
            })?;
        CertifiedKey::from_der(certs, key_der, &crypto_provider()).map_err(|e| {
            IdentityError::BadKey {
                path: key.to_owned(),
                reason: format!("unusable with {}: {e}", chain.display()),
            }
        })
    }
}

impl CertSource for FileCerts {
    fn certified_key(&self, id: &Identity) -> Result<Arc<CertifiedKey>, IdentityError> {
        let id_dir = identity_dir(&self.dir, id)?;
        let (chain, key) = (id_dir.join(CHAIN), id_dir.join(KEY));
        let now = Instant::now();
        let mut ids = lock(&self.ids);
        if let Some(w) = ids.get_mut(id) {
            if now.duration_since(w.checked) < self.recheck {
                return Ok(w.value.clone());
            }
            w.checked = now;
            let st = stamp(&[&chain, &key]);
            if st != w.stamp {
                w.stamp = st;
                match Self::load_identity(&chain, &key) {
                    Ok(k) => {
                        info!(identity = %id, path = %chain.display(), "reloaded the certificate");
                        w.value = Arc::new(k);
                    }
                    Err(e) => warn!(
                        identity = %id,
                        error = %e,
                        "certificate files changed but cannot be used; keeping the previous certificate"
                    ),
                }
            }
            return Ok(w.value.clone());
        }
        let st = stamp(&[&chain, &key]);
        let k = Arc::new(Self::load_identity(&chain, &key).map_err(|e| {
            IdentityError::NoCertificate {
                id: id.clone(),
                reason: e.to_string(),
            }
        })?);
        ids.insert(
            id.clone(),
            Watched {
                value: k.clone(),
                stamp: st,
                checked: now,
            },
        );
        Ok(k)
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let path = self.dir.join(ROOT_CERT);
        let now = Instant::now();
        let mut w = lock(&self.roots);
        if now.duration_since(w.checked) >= self.recheck {
            w.checked = now;
            let st = stamp(&[&path]);
            if st != w.stamp {
                w.stamp = st;
                match read(&path).and_then(|pem| parse_roots(&path, &pem)) {
                    Ok(r) => {
                        info!(path = %path.display(), roots = r.len(), "reloaded the mesh roots");
                        w.value = Arc::new(r);
                    }
                    Err(e) => warn!(
                        error = %e,
                        "root certificate file changed but cannot be used; keeping the previous roots"
                    ),
                }
            }
        }
        w.value.clone()
    }
}

// ----------------------------------------------------------------------------------------
// TLS

/// An error message carried in a rustls certificate error.
struct Rejected(String);

impl fmt::Debug for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejected {}

fn rejected(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Rejected(msg)))))
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => return rejected(format!("certificate chain rejected: {other}")),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// Verifies `end_entity` (with `intermediates`) against `roots` for `usage`.
fn verify_chain(
    provider: &CryptoProvider,
    roots: &RootCertStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &roots.roots,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(webpki_error)
}

fn list(ids: &[Identity]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The server's check of a client: chain to the current roots, a SPIFFE identity in the
/// trust domain.
#[derive(Debug)]
struct ClientVerifier {
    source: Arc<dyn CertSource>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[TlsDn] {
        // The roots may change at any time: send no hints.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let roots = self.source.roots();
        verify_chain(
            &self.provider,
            &roots,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        let ids = identities_of(end_entity);
        if ids.iter().any(|i| i.trust_domain == self.trust_domain) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rejected(format!(
                "client certificate has no SPIFFE identity in trust domain {} (has: {})",
                self.trust_domain,
                list(&ids)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client's check of a server: chain to the current roots, a URI SAN among the
/// expected identities; no DNS name check.
#[derive(Debug)]
struct ServerVerifier {
    source: Arc<dyn CertSource>,
    expect: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.source.roots();
        verify_chain(
            &self.provider,
            &roots,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        let ids = identities_of(end_entity);
        if ids.iter().any(|i| self.expect.contains(i)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rejected(format!(
                "server identity not expected: it presents {}, expected {}",
                list(&ids),
                list(&self.expect)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Presents one identity, asking the source at each handshake.
#[derive(Debug)]
struct Presenter {
    source: Arc<dyn CertSource>,
    id: Identity,
}

impl Presenter {
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        match self.source.certified_key(&self.id) {
            Ok(k) => Some(k),
            Err(e) => {
                warn!(identity = %self.id, error = %e, "no certificate to present");
                None
            }
        }
    }
}

impl ResolvesServerCert for Presenter {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for Presenter {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

type ServerKey = (Identity, Vec<u8>);
type ClientKey = (Identity, Vec<Identity>, Vec<u8>);

/// Built configurations, reused (certificates and roots are asked at each handshake, so
/// a cached configuration never goes stale). Cleared when it grows past this.
const CONFIG_CACHE_MAX: usize = 4096;

#[derive(Default)]
struct Configs {
    server: HashMap<ServerKey, Arc<ServerConfig>>,
    client: HashMap<ClientKey, Arc<ClientConfig>>,
}

/// TLS configurations for the mesh: TLS 1.3 only, cipher suites TLS13_AES_256_GCM_SHA384
/// and TLS13_AES_128_GCM_SHA256 only (no ChaCha20), the ring provider; mutual
/// authentication mandatory.
#[derive(Clone)]
pub struct Tls {
    source: Arc<dyn CertSource>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    configs: Arc<Mutex<Configs>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("source", &self.source)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Tls {
    pub fn new(source: Arc<dyn CertSource>, trust_domain: &str) -> Self {
        Self {
            source,
            trust_domain: trust_domain.to_owned(),
            provider: crypto_provider(),
            configs: Arc::default(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A server presenting `id` (its cert asked from the source at each handshake),
    /// requiring a client certificate chaining to the current roots whose URI SANs include
    /// a SPIFFE identity in this trust domain; ALPN `alpn`. No session tickets or
    /// resumption.
    pub fn server_config(&self, id: &Identity, alpn: &[u8]) -> Arc<ServerConfig> {
        let key = (id.clone(), alpn.to_vec());
        let mut configs = lock(&self.configs);
        if let Some(c) = configs.server.get(&key) {
            return c.clone();
        }
        let verifier = Arc::new(ClientVerifier {
            source: self.source.clone(),
            trust_domain: self.trust_domain.clone(),
            provider: self.provider.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the mesh provider supports TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Presenter {
                source: self.source.clone(),
                id: id.clone(),
            }));
        config.alpn_protocols = vec![alpn.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        let config = Arc::new(config);
        if configs.server.len() >= CONFIG_CACHE_MAX {
            configs.server.clear();
        }
        configs.server.insert(key, config.clone());
        config
    }

    /// A client presenting `src`, accepting the server when its chain verifies to the
    /// current roots (no DNS name check at all) and one of its URI SANs equals one of
    /// `expect`; no SNI, no resumption; ALPN `alpn`.
    pub fn client_config(
        &self,
        src: &Identity,
        expect: &[Identity],
        alpn: &[u8],
    ) -> Arc<ClientConfig> {
        let key = (src.clone(), expect.to_vec(), alpn.to_vec());
        let mut configs = lock(&self.configs);
        if let Some(c) = configs.client.get(&key) {
            return c.clone();
        }
        let verifier = Arc::new(ServerVerifier {
            source: self.source.clone(),
            expect: expect.to_vec(),
            provider: self.provider.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the mesh provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Presenter {
                source: self.source.clone(),
                id: src.clone(),
            }));
        config.alpn_protocols = vec![alpn.to_vec()];
        config.enable_sni = false;
        config.resumption = Resumption::disabled();
        let config = Arc::new(config);
        if configs.client.len() >= CONFIG_CACHE_MAX {
            configs.client.clear();
        }
        configs.client.insert(key, config.clone());
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new(DEFAULT_TRUST_DOMAIN, ns, sa)
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "redirect-identity-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    type Handshake = (
        Result<server::TlsStream<DuplexStream>, io::Error>,
        Result<client::TlsStream<DuplexStream>, io::Error>,
    );

    async fn handshake(s: Arc<ServerConfig>, c: Arc<ClientConfig>) -> Handshake {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from("10.0.0.1").unwrap();
        tokio::join!(
            TlsAcceptor::from(s).accept(a),
            TlsConnector::from(c).connect(name, b)
        )
    }

    /// Client says ping, server says pong.
    async fn exchange(
        s: &mut server::TlsStream<DuplexStream>,
        c: &mut client::TlsStream<DuplexStream>,
    ) {
        c.write_all(b"ping").await.unwrap();
        c.flush().await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        s.write_all(b"pong").await.unwrap();
        s.flush().await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }

    /// The client of a handshake the server refused must not get data through.
    async fn client_is_cut(mut c: client::TlsStream<DuplexStream>) {
        let _ = c.write_all(b"ping").await;
        let _ = c.flush().await;
        let mut buf = [0u8; 4];
        match c.read(&mut buf).await {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("read {n} bytes from a refused connection"),
        }
    }

    fn serial(der: &CertificateDer<'_>) -> Vec<u8> {
        let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
        c.raw_serial().to_vec()
    }

    #[test]
    fn identity_round_trip() {
        let s = "spiffe://cluster.local/ns/default/sa/app-b";
        let i: Identity = s.parse().unwrap();
        assert_eq!(i, id("default", "app-b"));
        assert_eq!(i.to_string(), s);
        let odd = Identity::new("td-1.example_x", "My.Ns", "sa_1");
        assert_eq!(odd.to_string().parse::<Identity>().unwrap(), odd);
    }

    #[test]
    fn identity_rejections() {
        for bad in [
            "",
            "https://cluster.local/ns/a/sa/b",
            "SPIFFE://cluster.local/ns/a/sa/b",
            "spiffe:/cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/x/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local//ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:8443/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a b/sa/b",
        ] {
            let e = bad.parse::<Identity>().unwrap_err();
            assert!(matches!(e, IdentityError::BadIdentity { .. }), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn mutual_handshake_sees_identities() {
        let ca: Arc<dyn CertSource> = Arc::new(LocalCa::ephemeral().unwrap());
        let tls = Tls::new(ca, DEFAULT_TRUST_DOMAIN);
        assert_eq!(tls.trust_domain(), DEFAULT_TRUST_DOMAIN);
        let (a, b) = (id("ns-a", "sa-a"), id("ns-b", "sa-b"));
        let (s, c) = handshake(
            tls.server_config(&b, ALPN_H2),
            tls.client_config(&a, std::slice::from_ref(&b), ALPN_H2),
        )
        .await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        let (_, sc) = s.get_ref();
        assert_eq!(identities_of(&sc.peer_certificates().unwrap()[0]), vec![a]);
        assert_eq!(sc.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(sc.server_name(), None, "the client sends no SNI");
        let (_, cc) = c.get_ref();
        assert_eq!(identities_of(&cc.peer_certificates().unwrap()[0]), vec![b]);
        assert_eq!(
            cc.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(
            cc.negotiated_cipher_suite().unwrap().suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        exchange(&mut s, &mut c).await;
    }

    #[tokio::test]
    async fn client_refuses_unexpected_server() {
        let ca: Arc<dyn CertSource> = Arc::new(LocalCa::ephemeral().unwrap());
        let tls = Tls::new(ca, DEFAULT_TRUST_DOMAIN);
        let (a, b, c) = (id("n", "a"), id("n", "b"), id("n", "c"));
        let (s, cl) = handshake(
            tls.server_config(&b, ALPN_H2),
            tls.client_config(&a, &[c], ALPN_H2),
        )
        .await;
        let e = cl.unwrap_err().to_string();
        assert!(e.contains("server identity not expected"), "{e}");
        assert!(e.contains("spiffe://cluster.local/ns/n/sa/b"), "{e}");
        assert!(s.is_err());
    }

    /// Client certificates from `certs`, roots from `roots`.
    #[derive(Debug)]
    struct Mixed {
        certs: LocalCa,
        roots: Arc<RootCertStore>,
    }

    impl CertSource for Mixed {
        fn certified_key(&self, id: &Identity) -> Result<Arc<CertifiedKey>, IdentityError> {
            self.certs.certified_key(id)
        }
        fn roots(&self) -> Arc<RootCertStore> {
            self.roots.clone()
        }
    }

    #[tokio::test]
    async fn server_refuses_client_of_another_root() {
        let ca = Arc::new(LocalCa::ephemeral().unwrap());
        let server = Tls::new(ca.clone(), DEFAULT_TRUST_DOMAIN);
        let other = Mixed {
            certs: LocalCa::ephemeral().unwrap(),
            roots: ca.roots(),
        };
        let client = Tls::new(Arc::new(other), DEFAULT_TRUST_DOMAIN);
        let (a, b) = (id("n", "a"), id("n", "b"));
        let (s, c) = handshake(
            server.server_config(&b, ALPN_H2),
            client.client_config(&a, std::slice::from_ref(&b), ALPN_H2),
        )
        .await;
        let e = s.unwrap_err().to_string();
        assert!(e.contains("UnknownIssuer"), "{e}");
        if let Ok(c) = c {
            client_is_cut(c).await;
        }
    }

    #[tokio::test]
    async fn server_refuses_client_of_another_trust_domain() {
        let ca: Arc<dyn CertSource> = Arc::new(LocalCa::ephemeral().unwrap());
        let tls = Tls::new(ca, DEFAULT_TRUST_DOMAIN);
        let a = Identity::new("other.domain", "n", "a");
        let b = id("n", "b");
        let (s, c) = handshake(
            tls.server_config(&b, ALPN_H2),
            tls.client_config(&a, std::slice::from_ref(&b), ALPN_H2),
        )
        .await;
        let e = s.unwrap_err().to_string();
        assert!(
            e.contains("no SPIFFE identity in trust domain cluster.local"),
            "{e}"
        );
        assert!(e.contains("spiffe://other.domain/ns/n/sa/a"), "{e}");
        if let Ok(c) = c {
            client_is_cut(c).await;
        }
    }

    #[tokio::test]
    async fn chacha_only_client_fails() {
        let ca: Arc<dyn CertSource> = Arc::new(LocalCa::ephemeral().unwrap());
        let tls = Tls::new(ca.clone(), DEFAULT_TRUST_DOMAIN);
        let (a, b) = (id("n", "a"), id("n", "b"));
        let mut chacha = rustls::crypto::ring::default_provider();
        chacha.cipher_suites =
            vec![rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
        let chacha = Arc::new(chacha);
        let mut config = ClientConfig::builder_with_provider(chacha.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                source: ca.clone(),
                expect: vec![b.clone()],
                provider: chacha,
            }))
            .with_client_cert_resolver(Arc::new(Presenter { source: ca, id: a }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let (s, c) = handshake(tls.server_config(&b, ALPN_H2), Arc::new(config)).await;
        let e = s.unwrap_err().to_string();
        assert!(e.to_lowercase().contains("cipher"), "{e}");
        assert!(c.is_err());
    }

    #[tokio::test]
    async fn local_ca_shared_through_a_directory() {
        let tmp = TempDir::new("ca");
        let dir = tmp.0.join("nested/ca");
        let ca1 = LocalCa::open_or_create(&dir).unwrap();
        let ca2 = LocalCa::open_or_create(&dir).unwrap();
        assert_eq!(ca1.root_der, ca2.root_der);
        assert_eq!(ca1.roots().roots, ca2.roots().roots);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(ROOT_KEY)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        // Leaves of the reopened CA are trusted by the first one, and back.
        let n1 = Tls::new(Arc::new(ca1), DEFAULT_TRUST_DOMAIN);
        let n2 = Tls::new(Arc::new(ca2), DEFAULT_TRUST_DOMAIN);
        let (a, b) = (id("n", "a"), id("n", "b"));
        let (s, c) = handshake(
            n1.server_config(&b, ALPN_H2),
            n2.client_config(&a, std::slice::from_ref(&b), ALPN_H2),
        )
        .await;
        exchange(&mut s.unwrap(), &mut c.unwrap()).await;
        let (s, c) = handshake(
            n2.server_config(&b, ALPN_H2),
            n1.client_config(&a, std::slice::from_ref(&b), ALPN_H2),
        )
        .await;
        exchange(&mut s.unwrap(), &mut c.unwrap()).await;
    }

    #[test]
    fn local_ca_caches_and_renews() {
        let mut ca = LocalCa::ephemeral().unwrap();
        let a = id("n", "a");
        let k1 = ca.certified_key(&a).unwrap();
        let k2 = ca.certified_key(&a).unwrap();
        assert!(Arc::ptr_eq(&k1, &k2));
        let leaf = &k1.cert[0];
        assert_eq!(identities_of(leaf), vec![a.clone()]);
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).unwrap();
        let v = parsed.validity();
        assert_eq!(
            v.not_after.timestamp() - v.not_before.timestamp(),
            24 * 3600 + 300
        );
        let ku = parsed.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        // A leaf with less than the renewal margin left is re-issued at each ask.
        ca.lifetime = Duration::from_secs(1800);
        ca.cache = Mutex::default();
        let k3 = ca.certified_key(&a).unwrap();
        let k4 = ca.certified_key(&a).unwrap();
        assert_ne!(serial(&k3.cert[0]), serial(&k4.cert[0]));
    }

    #[test]
    fn identities_of_ignores_other_names() {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["host.example".to_string()]).unwrap();
        for uri in [
            "https://example.com/x",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns/a/sa/b",
        ] {
            p.subject_alt_names
                .push(SanType::URI(Ia5String::try_from(uri).unwrap()));
        }
        let cert = p.self_signed(&key).unwrap();
        assert_eq!(identities_of(cert.der()), vec![id("a", "b")]);
        assert!(identities_of(&CertificateDer::from(vec![1, 2, 3])).is_empty());
    }

    #[tokio::test]
    async fn file_certs_reload() {
        let tmp = TempDir::new("files");
        let ca = Arc::new(LocalCa::ephemeral().unwrap());
        let (a, b) = (id("n", "a"), id("n", "b"));
        ca.write_identity(&b, &tmp.0).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tmp.0.join("n/b").join(KEY)), 0o600);
        let files = Arc::new(FileCerts::open(&tmp.0).unwrap());
        assert!(matches!(
            files.certified_key(&a),
            Err(IdentityError::NoCertificate { .. })
        ));
        let server = Tls::new(files.clone(), DEFAULT_TRUST_DOMAIN);
        let client = Tls::new(ca.clone(), DEFAULT_TRUST_DOMAIN);
        let sc = server.server_config(&b, ALPN_H2);
        let cc = client.client_config(&a, std::slice::from_ref(&b), ALPN_H2);

        let (s1, c1) = handshake(sc.clone(), cc.clone()).await;
        let (mut s1, mut c1) = (s1.unwrap(), c1.unwrap());
        let first = c1.get_ref().1.peer_certificates().unwrap()[0].clone();
        exchange(&mut s1, &mut c1).await;

        // Rotation: a new certificate, seen by the next handshake after the recheck delay.
        ca.write_identity(&b, &tmp.0).unwrap();
        tokio::time::sleep(RECHECK + Duration::from_millis(100)).await;
        let (s2, c2) = handshake(sc.clone(), cc.clone()).await;
        let (mut s2, mut c2) = (s2.unwrap(), c2.unwrap());
        let second = c2.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_ne!(first, second);
        assert_ne!(serial(&first), serial(&second));
        assert_eq!(identities_of(&second), vec![b.clone()]);
        exchange(&mut s2, &mut c2).await;
        // The connection made with the old certificate is untouched.
        exchange(&mut s1, &mut c1).await;

        // A broken new file keeps the previous good certificate.
        fs::write(tmp.0.join("n/b").join(CHAIN), b"not a certificate").unwrap();
        tokio::time::sleep(RECHECK + Duration::from_millis(100)).await;
        let (s3, c3) = handshake(sc, cc).await;
        let (mut s3, mut c3) = (s3.unwrap(), c3.unwrap());
        assert_eq!(c3.get_ref().1.peer_certificates().unwrap()[0], second);
        exchange(&mut s3, &mut c3).await;
    }

    #[test]
    fn file_certs_roots_reload_and_errors() {
        let tmp = TempDir::new("roots");
        assert!(matches!(
            FileCerts::open(&tmp.0),
            Err(IdentityError::Read { .. })
        ));
        let ca1 = LocalCa::ephemeral().unwrap();
        ca1.write_identity(&id("n", "a"), &tmp.0).unwrap();
        let mut files = FileCerts::open(&tmp.0).unwrap();
        files.recheck = Duration::ZERO;
        assert_eq!(files.roots().roots, ca1.roots().roots);
        // Two roots in the file.
        let ca2 = LocalCa::ephemeral().unwrap();
        let both = format!(
            "{}{}",
            pem_encode("CERTIFICATE", &ca1.root_der),
            pem_encode("CERTIFICATE", &ca2.root_der)
        );
        write_atomic(&tmp.0.join(ROOT_CERT), both.as_bytes(), 0o644).unwrap();
        assert_eq!(files.roots().len(), 2);
        // Broken: the previous roots stay.
        write_atomic(&tmp.0.join(ROOT_CERT), b"garbage", 0o644).unwrap();
        assert_eq!(files.roots().len(), 2);
        // Bad identity path segments never reach the file system.
        let e = files
            .certified_key(&Identity::new("td", "..", "x"))
            .unwrap_err();
        assert!(matches!(e, IdentityError::BadIdentity { .. }), "{e}");
    }

    #[test]
    fn pem_encoding_round_trips() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 100] {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            if len == 0 {
                continue;
            }
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(back.as_ref(), &der[..]);
        }
    }
}
