//! `redirect-cni`: the chained CNI plugin. The container runtime runs it last in the
//! node's plugin list with the CNI environment and the configuration (with `prevResult`)
//! on stdin. Blocking std code: one request to the agent's plugin socket, bounded in
//! time; no API credentials.
//!
//! - ADD of a Kubernetes pod (`K8S_POD_NAME` in `CNI_ARGS`): the agent decides; the ADD
//!   succeeds (printing `prevResult` unchanged) only once the pod is enrolled and its
//!   proxy serves it, or when it is not in the mesh. Anything else fails the ADD, and the
//!   runtime tears the sandbox down and retries: the pod never runs unredirected.
//! - ADD of anything else: passed through.
//! - DEL, CHECK, GC: succeed (the agent releases pods when the cluster says they went).
//! - STATUS: fails (code 50) while the agent's socket does not answer.
//! - VERSION: the versions below.
//!
//! Configuration keys of ours: `socket` (the agent's plugin socket, default
//! [`super::DEFAULT_SOCKET`]) and `timeout_secs` (default 10).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{DEFAULT_SOCKET, MAX_LINE, PluginRequest, PluginResponse};
use crate::membership::CniPod;

/// The configuration versions accepted, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest, used where no configuration says which.
pub const LATEST_VERSION: &str = "1.1.0";
/// How long an ADD waits for the agent unless the configuration says (`timeout_secs`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_TIMEOUT_SECS: u64 = 300;

/// Error codes: the spec's well-known ones (0-99) where they fit, ours from 100.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    /// STATUS: the plugin cannot serve ADDs (CNI 1.1).
    pub const NOT_AVAILABLE: u32 = 50;
    pub const AGENT_UNREACHABLE: u32 = 100;
    pub const TIMEOUT: u32 = 101;
    pub const REFUSED: u32 = 102;
    pub const BAD_ANSWER: u32 = 103;
}

/// A CNI error, printed as `{"cniVersion","code","msg","details"}` on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    fn details(mut self, d: impl Into<String>) -> Self {
        self.details = d.into();
        self
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

pub fn parse_command(s: Option<&str>) -> Result<Command, CniError> {
    Ok(match s {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => Command::Version,
        Some("GC") => Command::Gc,
        Some("STATUS") => Command::Status,
        Some(other) => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("unknown CNI_COMMAND {other:?}"),
            ));
        }
        None => return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
    })
}

/// What `CNI_ARGS` says of the pod (`K=V;K=V`, any order; unknown keys ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_uid: Option<String>,
    pub infra_container_id: Option<String>,
    pub ignore_unknown: bool,
}

pub fn parse_cni_args(s: &str) -> Result<CniArgs, CniError> {
    let mut a = CniArgs::default();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            ));
        };
        let v = Some(v.to_string()).filter(|v| !v.is_empty());
        match k {
            "K8S_POD_NAME" => a.pod_name = v,
            "K8S_POD_NAMESPACE" => a.pod_namespace = v,
            "K8S_POD_UID" => a.pod_uid = v,
            "K8S_POD_INFRA_CONTAINER_ID" => a.infra_container_id = v,
            "IgnoreUnknown" => {
                a.ignore_unknown = matches!(v.as_deref(), Some("1" | "true" | "True"))
            }
            _ => {}
        }
    }
    Ok(a)
}

/// The network configuration on stdin, as far as we read it.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    pub socket: PathBuf,
    pub timeout: Duration,
    pub prev_result: Option<Value>,
}

/// The `cniVersion` a (maybe invalid) configuration declares, to answer in it.
pub fn declared_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    Some(v.get("cniVersion")?.as_str()?.to_string())
}

pub fn version_supported(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

pub fn parse_config(stdin: &[u8]) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "the network configuration on stdin is not JSON",
        )
        .details(e.to_string())
    })?;
    let Value::Object(o) = v else {
        return Err(CniError::new(
            code::DECODE,
            "the network configuration on stdin is not a JSON object",
        ));
    };
    let string = |key: &str, required: bool| -> Result<Option<String>, CniError> {
        match o.get(key) {
            None | Some(Value::Null) if !required => Ok(None),
            None | Some(Value::Null) => Err(CniError::new(
                code::INVALID_CONFIG,
                format!("the network configuration has no {key:?}"),
            )),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(CniError::new(
                code::INVALID_CONFIG,
                format!("{key:?} must be a string, not {other}"),
            )),
        }
    };
    let cni_version = string("cniVersion", true)?.unwrap_or_default();
    if !version_supported(&cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {cni_version:?} is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let timeout = match o.get("timeout_secs") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT,
        Some(t) => match t.as_u64() {
            Some(s) if (1..=MAX_TIMEOUT_SECS).contains(&s) => Duration::from_secs(s),
            _ => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!(
                        "\"timeout_secs\" must be a whole number from 1 to {MAX_TIMEOUT_SECS}, not {t}"
                    ),
                ));
            }
        },
    };
    let prev_result = match o.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p.clone()),
        Some(other) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("\"prevResult\" must be an object, not {other}"),
            ));
        }
    };
    Ok(NetConf {
        cni_version,
        name: string("name", false)?.unwrap_or_default(),
        plugin_type: string("type", false)?.unwrap_or_default(),
        socket: string("socket", false)?
            .filter(|s| !s.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from),
        timeout,
        prev_result,
    })
}

/// The pod's addresses in `prevResult`: `ips[].address` (CIDR), the same key in the
/// 0.3/0.4 results (which add `version`) and in 1.x ones.
pub fn pod_ips(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    let Some(ips) = prev.get("ips") else {
        return Ok(Vec::new());
    };
    let Some(ips) = ips.as_array() else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "prevResult.ips must be a list",
        ));
    };
    ips.iter()
        .enumerate()
        .map(|(i, ip)| {
            let addr = ip.get("address").and_then(Value::as_str).ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("prevResult.ips[{i}] has no \"address\""),
                )
            })?;
            let host = addr.split_once('/').map_or(addr, |(a, _)| a);
            host.parse().map_err(|_| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("prevResult.ips[{i}].address {addr:?} is not an address"),
                )
            })
        })
        .collect()
}

/// VERSION's answer, in the version asked for if we support it.
pub fn version_output(asked: Option<&str>) -> Value {
    let v = asked
        .filter(|v| version_supported(v))
        .unwrap_or(LATEST_VERSION);
    json!({ "cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS })
}

/// What a successful ADD prints: `prevResult` unchanged, or an empty result.
pub fn add_output(conf: &NetConf) -> Value {
    conf.prev_result.clone().unwrap_or_else(
        || json!({ "cniVersion": conf.cni_version, "interfaces": [], "ips": [], "dns": {} }),
    )
}

/// The environment variables the plugin reads.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
}

impl Env {
    pub fn from(get: impl Fn(&str) -> Option<String>) -> Self {
        let g = |k: &str| get(k).unwrap_or_default();
        Self {
            container_id: g("CNI_CONTAINERID"),
            netns: g("CNI_NETNS"),
            ifname: g("CNI_IFNAME"),
            args: g("CNI_ARGS"),
            path: g("CNI_PATH"),
        }
    }
}

/// The request for the agent, or `None` for a sandbox that is not a Kubernetes pod.
pub fn pod_request(env: &Env, conf: &NetConf) -> Result<Option<CniPod>, CniError> {
    let args = parse_cni_args(&env.args)?;
    let Some(name) = args.pod_name else {
        return Ok(None);
    };
    let namespace = args.pod_namespace.ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            "CNI_ARGS has K8S_POD_NAME but no K8S_POD_NAMESPACE",
        )
    })?;
    if env.netns.is_empty() {
        return Err(CniError::new(code::INVALID_ENV, "CNI_NETNS is not set"));
    }
    let container_id = if env.container_id.is_empty() {
        args.infra_container_id.unwrap_or_default()
    } else {
        env.container_id.clone()
    };
    if container_id.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            "CNI_CONTAINERID is not set",
        ));
    }
    let ips = match &conf.prev_result {
        Some(p) => pod_ips(p)?,
        None => Vec::new(),
    };
    Ok(Some(CniPod {
        uid: args.pod_uid.unwrap_or_default(),
        name,
        namespace,
        netns: PathBuf::from(&env.netns),
        container_id,
        ips,
    }))
}

/// One request to the agent, answered within `timeout`; a missing or refusing socket
/// fails at once.
pub fn ask_agent(
    socket: &Path,
    req: &PluginRequest,
    timeout: Duration,
) -> Result<PluginResponse, CniError> {
    let start = Instant::now();
    let unreachable = |e: std::io::Error| {
        CniError::new(
            code::AGENT_UNREACHABLE,
            format!("agent not reachable at {}: {e}", socket.display()),
        )
        .details("is `redirect-user run` or `redirect-user node-agent` running on this node?")
    };
    let timed_out = || {
        CniError::new(
            code::TIMEOUT,
            format!(
                "timed out after {}s waiting for the agent at {}",
                timeout.as_secs_f32(),
                socket.display()
            ),
        )
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    let mut line = serde_json::to_vec(req).expect("a request serializes");
    line.push(b'\n');
    stream
        .set_write_timeout(Some(timeout))
        .map_err(unreachable)?;
    stream.write_all(&line).map_err(|e| {
        if is_timeout(&e) {
            timed_out()
        } else {
            unreachable(e)
        }
    })?;
    let mut reader = BufReader::new(stream);
    let mut answer = Vec::new();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(timed_out());
        }
        reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(unreachable)?;
        let n = match (&mut reader)
            .take((MAX_LINE + 1 - answer.len()) as u64)
            .read_until(b'\n', &mut answer)
        {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return Err(timed_out()),
            Err(e) => return Err(unreachable(e)),
        };
        if answer.ends_with(b"\n") {
            break;
        }
        if n == 0 {
            return Err(CniError::new(
                code::BAD_ANSWER,
                format!(
                    "the agent at {} closed the connection without an answer",
                    socket.display()
                ),
            ));
        }
        if answer.len() > MAX_LINE {
            return Err(CniError::new(
                code::BAD_ANSWER,
                format!(
                    "the agent at {} answered an oversized line",
                    socket.display()
                ),
            ));
        }
    }
    serde_json::from_slice(&answer).map_err(|e| {
        CniError::new(
            code::BAD_ANSWER,
            format!(
                "the agent at {} answered something unreadable: {e}",
                socket.display()
            ),
        )
    })
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// One invocation: what to print on stdout (if anything) and whether it succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub stdout: Option<Value>,
    pub ok: bool,
}

impl Outcome {
    fn ok(v: Option<Value>) -> Self {
        Self {
            stdout: v,
            ok: true,
        }
    }

    fn err(version: &str, e: &CniError) -> Self {
        Self {
            stdout: Some(e.to_json(version)),
            ok: false,
        }
    }
}

/// The whole plugin, given its environment and stdin.
pub fn run(get_env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    let declared = declared_version(stdin);
    let answer_version = declared
        .clone()
        .filter(|v| version_supported(v))
        .unwrap_or_else(|| LATEST_VERSION.to_string());
    let command = match parse_command(get_env("CNI_COMMAND").as_deref()) {
        Ok(c) => c,
        Err(e) => return Outcome::err(&answer_version, &e),
    };
    match command {
        Command::Version => Outcome::ok(Some(version_output(declared.as_deref()))),
        // Releasing is the agent's job when the cluster says the pod went; a DEL that
        // fails would leave the sandbox behind, so DEL never fails.
        Command::Del | Command::Gc => Outcome::ok(None),
        Command::Check => match parse_config(stdin) {
            Err(e) => Outcome::err(&answer_version, &e),
            Ok(c) if matches!(c.cni_version.as_str(), "0.3.0" | "0.3.1") => Outcome::err(
                &answer_version,
                &CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!("CHECK is not defined for cniVersion {}", c.cni_version),
                ),
            ),
            Ok(_) => Outcome::ok(None),
        },
        Command::Status => match parse_config(stdin) {
            Err(e) => Outcome::err(&answer_version, &e),
            Ok(c) => match UnixStream::connect(&c.socket) {
                Ok(_) => Outcome::ok(None),
                Err(e) => Outcome::err(
                    &answer_version,
                    &CniError::new(
                        code::NOT_AVAILABLE,
                        format!("agent not reachable at {}: {e}", c.socket.display()),
                    ),
                ),
            },
        },
        Command::Add => {
            let conf = match parse_config(stdin) {
                Ok(c) => c,
                Err(e) => return Outcome::err(&answer_version, &e),
            };
            match add(&Env::from(&get_env), &conf) {
                Ok(v) => Outcome::ok(Some(v)),
                Err(e) => Outcome::err(&conf.cni_version, &e),
            }
        }
    }
}

fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let Some(pod) = pod_request(env, conf)? else {
        // Not a Kubernetes pod: nothing of ours.
        return Ok(add_output(conf));
    };
    let what = format!("pod {}/{} (uid {:?})", pod.namespace, pod.name, pod.uid);
    let req = PluginRequest::Add { pod };
    match ask_agent(&conf.socket, &req, conf.timeout) {
        Ok(PluginResponse::Enrolled { .. } | PluginResponse::NotInMesh { .. }) => {
            Ok(add_output(conf))
        }
        Ok(PluginResponse::Refused { reason }) => {
            Err(CniError::new(code::REFUSED, reason).details(what))
        }
        Err(e) => Err(if e.details.is_empty() {
            e.details(what)
        } else {
            let d = format!("{what}: {}", e.details);
            e.details(d)
        }),
    }
}

/// `redirect-cni`'s main.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    // VERSION may come without stdin; a read error leaves it empty (then a decode error).
    let command = std::env::var("CNI_COMMAND").ok();
    if command.as_deref() != Some("VERSION") || !is_terminal_stdin() {
        let _ = std::io::stdin()
            .take(4 * 1024 * 1024)
            .read_to_end(&mut stdin);
    }
    let out = run(|k| std::env::var(k).ok(), &stdin);
    if let Some(v) = &out.stdout {
        let mut s = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut s, v);
        let _ = s.write_all(b"\n");
        let _ = s.flush();
    }
    if out.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn is_terminal_stdin() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn conf(version: &str, prev: Option<Value>) -> Vec<u8> {
        let mut c = json!({
            "cniVersion": version,
            "name": "k8s-pod-network",
            "type": "redirect-cni",
            "socket": "/nonexistent/redirect-test.sock",
            "timeout_secs": 2,
        });
        if let Some(p) = prev {
            c["prevResult"] = p;
        }
        serde_json::to_vec(&c).unwrap()
    }

    fn prev_03() -> Value {
        json!({
            "cniVersion": "0.3.1",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
            "ips": [
                {"version": "4", "address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0},
                {"version": "6", "address": "fd00::5/64", "interface": 0}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        })
    }

    fn prev_1x() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/cni-1"}],
            "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0}],
            "dns": {"nameservers": ["10.96.0.10"]}
        })
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn every_supported_version_parses_and_others_are_refused() {
        for v in SUPPORTED_VERSIONS {
            let c = parse_config(&conf(v, None)).unwrap();
            assert_eq!(c.cni_version, *v);
            assert_eq!(c.name, "k8s-pod-network");
            assert_eq!(c.plugin_type, "redirect-cni");
            assert_eq!(c.timeout, Duration::from_secs(2));
        }
        for v in ["0.2.0", "0.1.0", "2.0.0", ""] {
            let e = parse_config(&conf(v, None)).unwrap_err();
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION, "{v}");
            assert!(e.msg.contains("not supported"), "{}", e.msg);
        }
    }

    #[test]
    fn defaults_and_bad_keys() {
        let c =
            parse_config(br#"{"cniVersion":"1.0.0","name":"n","type":"redirect-cni"}"#).unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.prev_result, None);
        for bad in [
            r#"{"cniVersion":"1.0.0","timeout_secs":0}"#,
            r#"{"cniVersion":"1.0.0","timeout_secs":"10"}"#,
            r#"{"cniVersion":"1.0.0","socket":5}"#,
            r#"{"cniVersion":"1.0.0","prevResult":[1]}"#,
            r#"{"name":"no version"}"#,
            r#"{"cniVersion":1}"#,
        ] {
            let e = parse_config(bad.as_bytes()).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{bad}: {e:?}");
        }
    }

    #[test]
    fn malformed_stdin_is_a_decode_error() {
        for bad in [&b""[..], b"{", b"not json", b"[1,2]", b"\"s\""] {
            let e = parse_config(bad).unwrap_err();
            assert_eq!(e.code, code::DECODE, "{:?}", String::from_utf8_lossy(bad));
        }
        // Through the whole plugin: an error JSON and a failure, in the latest version.
        let out = run(env(&[("CNI_COMMAND", "ADD")]), b"{oops");
        assert!(!out.ok);
        let v = out.stdout.unwrap();
        assert_eq!(v["code"], code::DECODE);
        assert_eq!(v["cniVersion"], LATEST_VERSION);
        assert!(v["msg"].as_str().unwrap().contains("not JSON"));
        assert!(v.get("details").is_some());
    }

    #[test]
    fn cni_args_in_any_order() {
        let want = CniArgs {
            pod_name: Some("web-0".into()),
            pod_namespace: Some("shop".into()),
            pod_uid: Some("0a1b-2c".into()),
            infra_container_id: Some("abc123".into()),
            ignore_unknown: true,
        };
        let parts = [
            "IgnoreUnknown=1",
            "K8S_POD_NAMESPACE=shop",
            "K8S_POD_NAME=web-0",
            "K8S_POD_INFRA_CONTAINER_ID=abc123",
            "K8S_POD_UID=0a1b-2c",
        ];
        // Every rotation and the reverse of each.
        for r in 0..parts.len() {
            let mut p = parts.to_vec();
            p.rotate_left(r);
            assert_eq!(parse_cni_args(&p.join(";")).unwrap(), want);
            p.reverse();
            assert_eq!(parse_cni_args(&p.join(";")).unwrap(), want);
        }
        // Unknown keys, a trailing separator, values holding '='.
        let a = parse_cni_args("FOO=bar;K8S_POD_NAME=a=b;").unwrap();
        assert_eq!(a.pod_name.as_deref(), Some("a=b"));
        assert!(!a.ignore_unknown);
        assert_eq!(parse_cni_args("").unwrap(), CniArgs::default());
        assert_eq!(
            parse_cni_args("K8S_POD_NAME").unwrap_err().code,
            code::INVALID_ENV
        );
    }

    #[test]
    fn pod_ips_from_both_result_formats() {
        let v4: IpAddr = "10.1.0.5".parse().unwrap();
        let v6: IpAddr = "fd00::5".parse().unwrap();
        assert_eq!(pod_ips(&prev_03()).unwrap(), vec![v4, v6]);
        assert_eq!(pod_ips(&prev_1x()).unwrap(), vec![v4]);
        assert!(pod_ips(&json!({"cniVersion": "1.0.0"})).unwrap().is_empty());
        for bad in [
            json!({"ips": "x"}),
            json!({"ips": [{"gateway": "10.0.0.1"}]}),
            json!({"ips": [{"address": "nonsense/24"}]}),
        ] {
            assert_eq!(pod_ips(&bad).unwrap_err().code, code::INVALID_CONFIG);
        }
    }

    #[test]
    fn version_answers_in_the_asked_version() {
        let out = run(
            env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"0.4.0"}"#,
        );
        assert!(out.ok);
        let v = out.stdout.unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
        let v = run(env(&[("CNI_COMMAND", "VERSION")]), b"").stdout.unwrap();
        assert_eq!(v["cniVersion"], LATEST_VERSION);
    }

    #[test]
    fn a_sandbox_that_is_not_a_pod_passes_through_unchanged() {
        for (v, prev) in [("0.3.1", prev_03()), ("1.0.0", prev_1x())] {
            // Not a Kubernetes pod: the agent (an unreachable socket here) is not asked.
            let e = env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/var/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", "IgnoreUnknown=1"),
            ]);
            let out = run(e, &conf(v, Some(prev.clone())));
            assert!(out.ok, "{out:?}");
            assert_eq!(out.stdout.unwrap(), prev);
        }
        // No prevResult: an empty result in the configuration's version.
        let out = run(env(&[("CNI_COMMAND", "ADD")]), &conf("0.4.0", None));
        let v = out.stdout.unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["ips"], json!([]));
    }

    #[test]
    fn the_pod_request_carries_what_the_runtime_said() {
        let e = Env {
            container_id: "sandbox1".into(),
            netns: "/var/run/netns/cni-1".into(),
            ifname: "eth0".into(),
            args: "K8S_POD_UID=u-1;K8S_POD_NAME=web;IgnoreUnknown=1;K8S_POD_NAMESPACE=shop".into(),
            path: "/opt/cni/bin".into(),
        };
        let c = parse_config(&conf("1.0.0", Some(prev_1x()))).unwrap();
        let pod = pod_request(&e, &c).unwrap().unwrap();
        assert_eq!(
            pod,
            CniPod {
                uid: "u-1".into(),
                name: "web".into(),
                namespace: "shop".into(),
                netns: "/var/run/netns/cni-1".into(),
                container_id: "sandbox1".into(),
                ips: vec!["10.1.0.5".parse().unwrap()],
            }
        );
        let no_ns = Env {
            args: "K8S_POD_NAME=web".into(),
            ..e.clone()
        };
        assert_eq!(pod_request(&no_ns, &c).unwrap_err().code, code::INVALID_ENV);
        let no_netns = Env {
            netns: String::new(),
            ..e.clone()
        };
        assert_eq!(
            pod_request(&no_netns, &c).unwrap_err().code,
            code::INVALID_ENV
        );
    }

    #[test]
    fn a_pod_add_without_an_agent_fails_naming_the_socket() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            (
                "CNI_ARGS",
                "K8S_POD_NAME=a;K8S_POD_NAMESPACE=mesh;K8S_POD_UID=u",
            ),
        ]);
        let out = run(e, &conf("1.0.0", Some(prev_1x())));
        assert!(!out.ok);
        let v = out.stdout.unwrap();
        assert_eq!(v["code"], code::AGENT_UNREACHABLE);
        assert_eq!(v["cniVersion"], "1.0.0");
        let msg = v["msg"].as_str().unwrap();
        assert!(
            msg.starts_with("agent not reachable at /nonexistent/redirect-test.sock: "),
            "{msg}"
        );
        assert!(v["details"].as_str().unwrap().contains("mesh/a"), "{v}");
    }

    #[test]
    fn del_check_gc_succeed_quietly() {
        for cmd in ["DEL", "GC"] {
            // Even with a configuration that cannot be read: a DEL never fails.
            let out = run(env(&[("CNI_COMMAND", cmd)]), b"garbage");
            assert_eq!(out, Outcome::ok(None), "{cmd}");
        }
        for v in ["0.4.0", "1.0.0", "1.1.0"] {
            let out = run(env(&[("CNI_COMMAND", "CHECK")]), &conf(v, Some(prev_1x())));
            assert_eq!(out, Outcome::ok(None), "{v}");
        }
        let out = run(env(&[("CNI_COMMAND", "CHECK")]), &conf("0.3.1", None));
        assert!(!out.ok);
        assert_eq!(out.stdout.unwrap()["code"], code::INCOMPATIBLE_VERSION);
        // STATUS asks whether the agent answers: not here.
        let out = run(env(&[("CNI_COMMAND", "STATUS")]), &conf("1.1.0", None));
        assert!(!out.ok);
        assert_eq!(out.stdout.unwrap()["code"], code::NOT_AVAILABLE);
    }

    /// A fake agent on a real socket, answering each connection with `answer` (after
    /// reading the request line); `None`: never answers.
    fn fake_agent(
        tag: &str,
        answer: Option<&'static [u8]>,
    ) -> (PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        let path =
            std::env::temp_dir().join(format!("redirect-cni-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            BufReader::new(&s).read_until(b'\n', &mut req).unwrap();
            match answer {
                Some(a) => (&s).write_all(a).unwrap(),
                None => std::thread::sleep(Duration::from_millis(1500)),
            }
            req
        });
        (path, t)
    }

    fn req() -> PluginRequest {
        PluginRequest::Add {
            pod: CniPod {
                uid: "u".into(),
                name: "p".into(),
                namespace: "mesh".into(),
                netns: "/n".into(),
                container_id: "c".into(),
                ips: vec![],
            },
        }
    }

    #[test]
    fn the_agent_exchange_is_bounded_and_checked() {
        let (p, t) = fake_agent("ok", Some(b"{\"result\":\"enrolled\",\"uid\":\"u\"}\n"));
        let r = ask_agent(&p, &req(), Duration::from_secs(5)).unwrap();
        assert_eq!(r, PluginResponse::Enrolled { uid: "u".into() });
        let sent: PluginRequest = serde_json::from_slice(&t.join().unwrap()).unwrap();
        assert_eq!(sent, req());
        let _ = std::fs::remove_file(&p);

        let (p, _t) = fake_agent("slow", None);
        let start = Instant::now();
        let e = ask_agent(&p, &req(), Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.code, code::TIMEOUT);
        assert!(e.msg.starts_with("timed out after 1s"), "{}", e.msg);
        assert!(start.elapsed() < Duration::from_millis(1400));
        let _ = std::fs::remove_file(&p);

        for (tag, bad) in [
            ("garbage", &b"nonsense\n"[..]),
            ("closed", b""),
            ("half", b"{\"result\""),
        ] {
            let (p, _t) = fake_agent(tag, Some(bad));
            let e = ask_agent(&p, &req(), Duration::from_secs(5)).unwrap_err();
            assert_eq!(e.code, code::BAD_ANSWER, "{tag}: {e:?}");
            let _ = std::fs::remove_file(&p);
        }
    }

    #[test]
    fn unknown_or_missing_command() {
        for e in [env(&[("CNI_COMMAND", "FROB")]), env(&[])] {
            let out = run(e, &conf("1.0.0", None));
            assert!(!out.ok);
            assert_eq!(out.stdout.unwrap()["code"], code::INVALID_ENV);
        }
    }
}
