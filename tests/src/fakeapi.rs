//! A small fake of the Kubernetes API server, enough for the agent's watch: lists and
//! watches of pods (field selector `spec.nodeName=`) and namespaces with resource
//! versions, bookmarks, `410 Gone` for an expired version, dropped watch connections,
//! an outage, and `PATCH …/pods/<name>/status` (merge patch) recorded and applied.
//! Plain HTTP/1.1 on 127.0.0.1, one request per connection, on a runtime of its own.
//! The test drives it: it adds, changes and deletes pods and namespaces.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::{broadcast, watch},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pods,
    Namespaces,
}

/// A PATCH request the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Debug, Clone)]
struct Event {
    kind: Kind,
    kind_type: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    pods: BTreeMap<(String, String), Value>,
    namespaces: BTreeMap<String, Value>,
    history: Vec<(u64, Event)>,
    patches: Vec<Recorded>,
    lists: BTreeMap<&'static str, usize>,
    watches_open: BTreeMap<&'static str, usize>,
    /// Every request is answered 503 and watches are closed.
    down: bool,
}

impl State {
    fn bump(&mut self, object: &mut Value) -> u64 {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.rv
    }
}

struct Inner {
    state: Mutex<State>,
    events: broadcast::Sender<(u64, Event)>,
    /// Bumped to close every open watch.
    drop_watches: watch::Sender<u64>,
}

pub struct FakeApi {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    rt: Option<tokio::runtime::Runtime>,
    dir: PathBuf,
    /// The directory, removed on SIGINT/SIGTERM.
    _interrupt: redirect_user::interrupt::Registered,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Pods => "pods",
        Kind::Namespaces => "namespaces",
    }
}

impl FakeApi {
    /// Listens on 127.0.0.1 (a free port) and writes a kubeconfig for it in a
    /// directory of its own (removed on drop).
    pub fn start(tag: &str) -> Result<FakeApi> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(4096);
        let (drop_watches, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                rv: 100,
                ..State::default()
            }),
            events,
            drop_watches,
        });
        let i = inner.clone();
        rt.spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let i = i.clone();
                tokio::spawn(async move {
                    let _ = serve(i, s).await;
                });
            }
        });
        let dir = std::env::temp_dir().join(format!("fakeapi-{tag}-{}", std::process::id()));
        let interrupt = redirect_user::interrupt::path(&dir);
        std::fs::create_dir_all(&dir)?;
        let api = FakeApi {
            addr,
            inner,
            rt: Some(rt),
            dir,
            _interrupt: interrupt,
        };
        std::fs::write(
            api.kubeconfig(),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
                 users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
                 current-context: fake\n"
            ),
        )?;
        Ok(api)
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    fn emit(
        &self,
        st: &mut State,
        kind: Kind,
        kind_type: &'static str,
        mut object: Value,
    ) -> Value {
        let rv = st.bump(&mut object);
        let ev = Event {
            kind,
            kind_type,
            object: object.clone(),
        };
        st.history.push((rv, ev.clone()));
        let _ = self.inner.events.send((rv, ev));
        object
    }

    /// Adds or replaces a namespace with these labels.
    pub fn put_namespace(&self, name: &str, labels: Value) {
        let mut st = self.inner.state.lock().unwrap();
        let (t, uid) = match st.namespaces.get(name) {
            Some(old) => ("MODIFIED", old["metadata"]["uid"].clone()),
            None => ("ADDED", json!(format!("ns-{name}"))),
        };
        let obj = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": uid, "labels": labels}});
        let obj = self.emit(&mut st, Kind::Namespaces, t, obj);
        st.namespaces.insert(name.into(), obj);
    }

    /// Adds or replaces a pod (a full object; `apiVersion`/`kind` are filled in).
    pub fn put_pod(&self, mut pod: Value) {
        pod["apiVersion"] = json!("v1");
        pod["kind"] = json!("Pod");
        let key = key_of(&pod);
        let mut st = self.inner.state.lock().unwrap();
        let t = if st.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let obj = self.emit(&mut st, Kind::Pods, t, pod);
        st.pods.insert(key, obj);
    }

    /// Changes a pod in place (a MODIFIED event).
    pub fn modify_pod(&self, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut pod = self.pod(ns, name).expect("no such pod");
        f(&mut pod);
        self.put_pod(pod);
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        let mut st = self.inner.state.lock().unwrap();
        if let Some(obj) = st.pods.remove(&(ns.to_string(), name.to_string())) {
            self.emit(&mut st, Kind::Pods, "DELETED", obj);
        }
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Value> {
        self.inner
            .state
            .lock()
            .unwrap()
            .pods
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// The pod's `ambient.istio.io/redirection` annotation as the server holds it.
    pub fn redirection(&self, ns: &str, name: &str) -> Option<String> {
        self.pod(ns, name)?["metadata"]["annotations"]["ambient.istio.io/redirection"]
            .as_str()
            .map(String::from)
    }

    /// Every PATCH received, oldest first.
    pub fn patches(&self) -> Vec<Recorded> {
        self.inner.state.lock().unwrap().patches.clone()
    }

    /// How many full lists of `kind` were served.
    pub fn lists(&self, kind: Kind) -> usize {
        *self
            .inner
            .state
            .lock()
            .unwrap()
            .lists
            .get(kind_name(kind))
            .unwrap_or(&0)
    }

    /// Watches of `kind` open now.
    pub fn watches(&self, kind: Kind) -> usize {
        *self
            .inner
            .state
            .lock()
            .unwrap()
            .watches_open
            .get(kind_name(kind))
            .unwrap_or(&0)
    }

    /// Closes every open watch connection (clients resume from their last version).
    pub fn drop_watches(&self) {
        self.inner.drop_watches.send_modify(|g| *g += 1);
    }

    /// Forgets the history: every version seen so far is expired (410 Gone), and the
    /// open watches are closed, so that clients must list again.
    pub fn expire(&self) {
        {
            let mut st = self.inner.state.lock().unwrap();
            st.rv += 1;
            st.compacted = st.rv;
            st.history.clear();
        }
        self.drop_watches();
    }

    /// An outage: every request answered 503 and the watches closed, until `false`.
    pub fn set_down(&self, down: bool) {
        self.inner.state.lock().unwrap().down = down;
        if down {
            self.drop_watches();
        }
    }
}

fn key_of(pod: &Value) -> (String, String) {
    (
        pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match h.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    content_type: String,
    body: Vec<u8>,
}

async fn read_request(s: &mut BufReader<TcpStream>) -> Result<Request> {
    let mut line = String::new();
    s.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        bail!("bad request line {line:?}");
    };
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let (mut len, mut content_type) = (0usize, String::new());
    loop {
        let mut h = String::new();
        s.read_line(&mut h).await?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().context("content-length")?,
                "content-type" => content_type = v.trim().to_string(),
                _ => {}
            }
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok(Request {
        method: method.into(),
        path: path.into(),
        query,
        content_type,
        body,
    })
}

async fn respond(s: &mut TcpStream, code: u16, body: &Value) -> Result<()> {
    let b = serde_json::to_vec(body)?;
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        415 => "Unsupported Media Type",
        503 => "Service Unavailable",
        _ => "Error",
    };
    s.write_all(
        format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            b.len()
        )
        .as_bytes(),
    )
    .await?;
    s.write_all(&b).await?;
    s.flush().await?;
    Ok(())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

async fn chunk(s: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    s.write_all(format!("{:x}\r\n", line.len()).as_bytes())
        .await?;
    s.write_all(&line).await?;
    s.write_all(b"\r\n").await?;
    s.flush().await
}

/// Does `pod` match `fieldSelector` (only `spec.nodeName=` is understood)?
fn selected(kind: Kind, obj: &Value, field_selector: Option<&String>) -> bool {
    if kind != Kind::Pods {
        return true;
    }
    match field_selector.and_then(|f| f.strip_prefix("spec.nodeName=")) {
        Some(node) => obj["spec"]["nodeName"].as_str() == Some(node),
        None => true,
    }
}

async fn serve(inner: Arc<Inner>, s: TcpStream) -> Result<()> {
    let mut r = BufReader::new(s);
    let req = read_request(&mut r).await?;
    let mut s = r.into_inner();
    if inner.state.lock().unwrap().down {
        return respond(
            &mut s,
            503,
            &status(503, "ServiceUnavailable", "down for the test"),
        )
        .await;
    }
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["api", "v1", "pods"]) => get(inner, s, Kind::Pods, &req).await,
        ("GET", ["api", "v1", "namespaces"]) => get(inner, s, Kind::Namespaces, &req).await,
        ("PATCH", ["api", "v1", "namespaces", ns, "pods", name, "status"]) => {
            let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let recorded = Recorded {
                method: req.method.clone(),
                path: req.path.clone(),
                content_type: req.content_type.clone(),
                body: body.clone(),
            };
            let answer = {
                let mut st = inner.state.lock().unwrap();
                st.patches.push(recorded);
                if req.content_type != "application/merge-patch+json" {
                    Err((
                        415,
                        status(415, "UnsupportedMediaType", "only merge patches here"),
                    ))
                } else if let Some(mut pod) =
                    st.pods.get(&(ns.to_string(), name.to_string())).cloned()
                {
                    merge(&mut pod, &body);
                    let rv = st.bump(&mut pod);
                    let ev = Event {
                        kind: Kind::Pods,
                        kind_type: "MODIFIED",
                        object: pod.clone(),
                    };
                    st.history.push((rv, ev.clone()));
                    let _ = inner.events.send((rv, ev));
                    st.pods
                        .insert((ns.to_string(), name.to_string()), pod.clone());
                    Ok(pod)
                } else {
                    Err((
                        404,
                        status(404, "NotFound", &format!("pods \"{name}\" not found")),
                    ))
                }
            };
            match answer {
                Ok(pod) => respond(&mut s, 200, &pod).await,
                Err((code, body)) => respond(&mut s, code, &body).await,
            }
        }
        _ => {
            respond(
                &mut s,
                404,
                &status(404, "NotFound", "not served by the fake"),
            )
            .await
        }
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

async fn get(inner: Arc<Inner>, mut s: TcpStream, kind: Kind, req: &Request) -> Result<()> {
    let fs = req.query.get("fieldSelector");
    if req.query.get("watch").map(String::as_str) != Some("true") {
        let body = {
            let mut st = inner.state.lock().unwrap();
            *st.lists.entry(kind_name(kind)).or_default() += 1;
            let items: Vec<Value> = match kind {
                Kind::Pods => st
                    .pods
                    .values()
                    .filter(|p| selected(kind, p, fs))
                    .cloned()
                    .collect(),
                Kind::Namespaces => st.namespaces.values().cloned().collect(),
            };
            let list_kind = match kind {
                Kind::Pods => "PodList",
                Kind::Namespaces => "NamespaceList",
            };
            json!({"apiVersion": "v1", "kind": list_kind,
                "metadata": {"resourceVersion": st.rv.to_string()}, "items": items})
        };
        return respond(&mut s, 200, &body).await;
    }
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = req.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    // Subscribe under the lock: no event between the history and the live ones is lost.
    let (backlog, mut live, expired) = {
        let st = inner.state.lock().unwrap();
        let live = inner.events.subscribe();
        let backlog: Vec<(u64, Event)> = st
            .history
            .iter()
            .filter(|(rv, e)| *rv > from && e.kind == kind)
            .cloned()
            .collect();
        (backlog, live, from < st.compacted)
    };
    let mut dropped = inner.drop_watches.subscribe();
    s.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await?;
    if expired {
        let msg = format!("too old resource version: {from}");
        chunk(
            &mut s,
            &json!({"type": "ERROR", "object": status(410, "Expired", &msg)}),
        )
        .await?;
        s.write_all(b"0\r\n\r\n").await?;
        return Ok(());
    }
    let name = kind_name(kind);
    *inner
        .state
        .lock()
        .unwrap()
        .watches_open
        .entry(name)
        .or_default() += 1;
    let r = watch_loop(
        &mut s,
        kind,
        fs,
        from,
        backlog,
        &mut live,
        &mut dropped,
        bookmarks,
    )
    .await;
    *inner
        .state
        .lock()
        .unwrap()
        .watches_open
        .entry(name)
        .or_default() -= 1;
    r
}

#[allow(clippy::too_many_arguments)]
async fn watch_loop(
    s: &mut TcpStream,
    kind: Kind,
    fs: Option<&String>,
    from: u64,
    backlog: Vec<(u64, Event)>,
    live: &mut broadcast::Receiver<(u64, Event)>,
    dropped: &mut watch::Receiver<u64>,
    bookmarks: bool,
) -> Result<()> {
    let mut last = from;
    for (rv, e) in backlog {
        if selected(kind, &e.object, fs) {
            chunk(s, &json!({"type": e.kind_type, "object": e.object})).await?;
        }
        last = rv;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            ev = live.recv() => {
                let Ok((rv, e)) = ev else {
                    // Lagged or closed: the client lists again.
                    return Ok(());
                };
                if rv <= last || e.kind != kind {
                    continue;
                }
                last = rv;
                if selected(kind, &e.object, fs) {
                    chunk(s, &json!({"type": e.kind_type, "object": e.object})).await?;
                }
            }
            _ = dropped.changed() => {
                // An abrupt end: no final chunk.
                return Ok(());
            }
            _ = tick.tick(), if bookmarks => {
                // Never past an event not sent yet.
                let rv = last;
                let object_kind = match kind { Kind::Pods => "Pod", Kind::Namespaces => "Namespace" };
                chunk(s, &json!({"type": "BOOKMARK", "object": {"apiVersion": "v1", "kind": object_kind,
                    "metadata": {"resourceVersion": rv.to_string()}}})).await?;
            }
        }
    }
}

/// A pod object as the API holds it: on `node`, phase Running with `ips`.
pub fn pod_object(
    ns: &str,
    name: &str,
    uid: &str,
    node: &str,
    labels: Value,
    ips: &[&str],
) -> Value {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": format!("sa-{name}"), "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ips.first(), "podIPs": pod_ips},
    })
}
