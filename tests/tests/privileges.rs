//! Least privilege, proven (issue 9, item 3): the agent's image (built by the code of
//! `cargo xtask image`) runs under containerd (tests/src/cri.rs) with the container
//! settings `deploy/daemonset.yaml` gives it, read from the manifest: capabilities
//! (drop ALL, add the list), `hostNetwork`, no privilege escalation, a read-only root,
//! and its hostPath mounts (the node's state directories replaced by directories of the
//! test). With exactly those capabilities the mesh works: a real pod of the runtime,
//! enrolled through `/host/proc/<pid>/ns/net` as pods found at start are, has its
//! outbound connection redirected to the proxy, and a node socket (the kubelet's probe)
//! reaches its app directly, which needs the sock_ops program on the host's cgroup2
//! root. With any one capability of the list removed the agent exits non-zero with one
//! line naming it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};
use redirect_tests::{
    agent_image,
    cri::{
        CniSetup, ContainerDef, Pod, PodDef, Runtime,
        api::{self, LinuxContainerSecurityContext, container_state, propagation},
    },
    echo_server,
    process::{RemoveDir, cli, pods_by_uid, wait_for},
};
use redirect_user::{demo::ask, netns::Netns};

/// The app's port in its pod.
const APP: u16 = 8080;
/// The node-side listener the pod connects out to.
const GATEWAY_PORT: u16 = 9393;

/// The kubelet's default masked and read-only paths of an unprivileged container.
const KUBELET_MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const KUBELET_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// What `deploy/daemonset.yaml` says about the agent's container.
struct Spec {
    container: Container,
    host_network: bool,
    /// (hostPath, mountPath, readOnly, HostToContainer)
    mounts: Vec<(String, String, bool, bool)>,
}

fn manifest() -> Spec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let ds: DaemonSet = serde_yaml_ng::from_str(&text).unwrap();
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(
        pod.host_pid, None,
        "hostPID: the test would have to give it"
    );
    let volumes: BTreeMap<String, String> = pod
        .volumes
        .unwrap()
        .into_iter()
        .map(|v| (v.name, v.host_path.expect("hostPath volumes only").path))
        .collect();
    let container = pod.containers[0].clone();
    let mounts = container
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .map(|m| {
            (
                volumes[&m.name].clone(),
                m.mount_path,
                m.read_only.unwrap_or(false),
                m.mount_propagation.as_deref() == Some("HostToContainer"),
            )
        })
        .collect();
    Spec {
        container,
        host_network: pod.host_network == Some(true),
        mounts,
    }
}

impl Spec {
    fn added(&self) -> Vec<String> {
        let caps = self.security().capabilities.clone().unwrap();
        assert_eq!(caps.drop.unwrap(), ["ALL"]);
        caps.add.unwrap()
    }

    fn security(&self) -> &k8s_openapi::api::core::v1::SecurityContext {
        self.container.security_context.as_ref().unwrap()
    }

    /// The container's security context for the CRI with `add` as the added set.
    fn cri_security(&self, add: &[String]) -> LinuxContainerSecurityContext {
        let sc = self.security();
        LinuxContainerSecurityContext {
            capabilities: Some(api::Capability {
                add_capabilities: add.to_vec(),
                drop_capabilities: vec!["ALL".into()],
            }),
            privileged: sc.privileged.unwrap_or(false),
            readonly_rootfs: sc.read_only_root_filesystem.unwrap_or(false),
            // As the kubelet maps allowPrivilegeEscalation: false.
            no_new_privs: sc.allow_privilege_escalation == Some(false),
            // What the kubelet sends for procMount: Default (containerd adds nothing):
            // among them a read-only /proc/sys.
            masked_paths: KUBELET_MASKED_PATHS.map(String::from).to_vec(),
            readonly_paths: KUBELET_READONLY_PATHS.map(String::from).to_vec(),
            ..Default::default()
        }
    }

    /// The hostPath mounts; the node's state directories (where the agent writes its
    /// own files) come from `state` instead of the host: the kernel's filesystems, the
    /// host's /proc and the netns directory are the node's own. HostToContainer needs
    /// a shared (or slave) mount on the host, as a systemd node has: `binds` gives the
    /// node's directory as a shared bind mount of the test's.
    fn cri_mounts(&self, state: &Path, binds: &Binds) -> Vec<api::Mount> {
        const NODE_WIDE: [&str; 4] = ["/sys/fs/bpf", "/sys/fs/cgroup", "/proc", "/var/run/netns"];
        self.mounts
            .iter()
            .map(|(host, path, ro, h2c)| {
                let host_path = if NODE_WIDE.contains(&host.as_str()) && *h2c {
                    binds.shared(host).display().to_string()
                } else if NODE_WIDE.contains(&host.as_str()) {
                    host.clone()
                } else {
                    let d = state.join(host.trim_start_matches('/'));
                    std::fs::create_dir_all(&d).unwrap();
                    d.display().to_string()
                };
                api::Mount {
                    container_path: path.clone(),
                    host_path,
                    readonly: *ro,
                    propagation: if *h2c {
                        propagation::HOST_TO_CONTAINER
                    } else {
                        propagation::PRIVATE
                    },
                }
            })
            .collect()
    }

    /// The host directory the test gives for the container path `path`.
    fn host_dir(&self, state: &Path, path: &str) -> PathBuf {
        let (host, ..) = self
            .mounts
            .iter()
            .find(|(_, p, ..)| p == path)
            .unwrap_or_else(|| panic!("no mount at {path}"));
        state.join(host.trim_start_matches('/'))
    }

    /// The manifest's arguments, but for `--kube` (no API server here) and the pin
    /// directory (one of the test's own), with the HTTP endpoints off (the node's ports
    /// are shared with other tests).
    fn args(&self, pin: &str) -> Vec<String> {
        let mut args: Vec<String> = self
            .container
            .args
            .clone()
            .unwrap()
            .into_iter()
            .filter(|a| a != "--kube")
            .map(|a| {
                if a.starts_with("--pin-dir=") {
                    format!("--pin-dir={pin}")
                } else {
                    a
                }
            })
            .collect();
        args.extend(["--admin-addr=off".into(), "--metrics-addr=off".into()]);
        args
    }
}

/// Shared bind mounts of the node's directories, made once each, unmounted (never
/// recursed into: one is the node's bpffs) when dropped.
struct Binds {
    root: PathBuf,
    made: std::sync::Mutex<BTreeMap<String, PathBuf>>,
}

impl Binds {
    fn new(root: PathBuf) -> Binds {
        std::fs::create_dir_all(&root).unwrap();
        Binds {
            root,
            made: Default::default(),
        }
    }

    /// `host` bind-mounted at a directory of the test and made shared.
    fn shared(&self, host: &str) -> PathBuf {
        use nix::mount::{MsFlags, mount};
        let mut made = self.made.lock().unwrap();
        if let Some(p) = made.get(host) {
            return p.clone();
        }
        let at = self
            .root
            .join(host.trim_start_matches('/').replace('/', "-"));
        std::fs::create_dir_all(&at).unwrap();
        mount(
            Some(host),
            &at,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("bind {host}: {e}"));
        made.insert(host.into(), at.clone());
        mount(
            None::<&str>,
            &at,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("make {} shared: {e}", at.display()));
        at
    }
}

impl Drop for Binds {
    fn drop(&mut self) {
        for at in self.made.lock().unwrap().values() {
            let _ = nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(at);
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// The agent's sandbox (a hostNetwork pod) and the image, in a runtime of the test.
struct Node {
    rt: Runtime,
    binds: Binds,
    spec: Spec,
    agent_def: PodDef,
    agent_pod: Pod,
    state: PathBuf,
    pin: String,
    _dirs: (RemoveDir, RemoveDir),
}

impl Node {
    fn new() -> Node {
        let spec = manifest();
        assert!(
            spec.host_network,
            "the DaemonSet runs in the node's namespace"
        );
        let rt = Runtime::start("cap", CniSetup::bridge().ipv4_only()).expect("containerd");
        let (tar, size) = agent_image::build().expect("the agent's image");
        eprintln!("image {} ({size} bytes)", tar.display());
        rt.import_image(&std::fs::read(&tar).unwrap()).unwrap();
        let base = format!("cap-{:x}", std::process::id());
        let state = rt.dir().join("node");
        let pin = format!("/sys/fs/bpf/{base}");
        let dirs = (RemoveDir::new(state.clone()), RemoveDir::new(pin.clone()));
        let agent_def = PodDef::new("redirect-agent")
            .namespace("redirect-system")
            .uid(&format!("{base}-agent"))
            .host_network();
        let agent_pod = rt.run_pod(&agent_def).expect("the agent's sandbox");
        Node {
            rt,
            binds: Binds::new(PathBuf::from(format!("/tmp/{base}-binds"))),
            spec,
            agent_def,
            agent_pod,
            state,
            pin,
            _dirs: dirs,
        }
    }

    /// Starts the agent's container with the capabilities `add` (ALL dropped).
    fn start_agent(&self, name: &str, add: &[String]) -> String {
        let c = &self.spec.container;
        let def = ContainerDef {
            name: name.into(),
            image: Some(agent_image::NAME.into()),
            command: c.command.clone().unwrap(),
            args: self.spec.args(&self.pin),
            env: vec![
                ("NODE_NAME".into(), "node1".into()),
                ("RUST_LOG".into(), "info".into()),
            ],
            mounts: self.spec.cri_mounts(&self.state, &self.binds),
            security: Some(self.spec.cri_security(add)),
        };
        self.rt
            .add_container(&self.agent_pod, &self.agent_def, &def)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"))
    }

    fn log(&self, name: &str) -> String {
        self.rt.container_log(&self.agent_def, name)
    }

    /// The exit code of container `id` once it exited (30 s at most).
    fn exit_code(&self, id: &str, name: &str) -> i32 {
        let t = Instant::now();
        loop {
            let s = self.rt.container_status(id).unwrap();
            if s.state == container_state::EXITED {
                return s.exit_code;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{name} still running:\n{}",
                self.log(name)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The test's directory behind the container's state directory.
    fn state_dir(&self) -> String {
        self.spec
            .host_dir(&self.state, "/var/run/redirect")
            .display()
            .to_string()
    }
}

/// A process of the pod (busybox `nc`, root, with the runtime's default capabilities,
/// some of which the agent lacks): its pid on the host.
fn pid_in(pod: &Pod) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(&pod.netns).unwrap().ino();
    let find = || {
        std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let ino = std::fs::metadata(e.path().join("ns/net")).ok()?.ino();
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (ino == want && comm.trim() == "nc").then_some(pid)
        })
    };
    wait_for("a process of the pod", 10, || find().is_some());
    find().unwrap()
}

fn counter(state: &str, uid: &str, name: &str) -> u64 {
    pods_by_uid(state)
        .get(uid)
        .and_then(|p| p["counters"][name].as_u64())
        .unwrap_or(0)
}

#[test]
fn the_manifests_capabilities_run_the_mesh_and_each_one_is_needed() {
    let node = Node::new();
    let granted = node.spec.added();
    assert!(!granted.is_empty());

    // Each capability removed in turn: the agent refuses at once, naming it.
    for gone in &granted {
        let add: Vec<String> = granted.iter().filter(|c| *c != gone).cloned().collect();
        let name = format!("without-{}", gone.to_lowercase().replace('_', "-"));
        let id = node.start_agent(&name, &add);
        let code = node.exit_code(&id, &name);
        let log = node.log(&name);
        eprintln!("{name}: exit {code}: {log}");
        assert_ne!(code, 0, "{name} did not fail:\n{log}");
        let line = log
            .lines()
            .find(|l| l.contains("cannot start: missing capabilities"))
            .unwrap_or_else(|| panic!("{name}: no refusal line:\n{log}"));
        assert!(line.contains(&format!("CAP_{gone} ")), "{name}: {line}");
        for held in &add {
            assert!(!line.contains(&format!("CAP_{held} ")), "{name}: {line}");
        }
        assert!(
            pods_by_uid(&node.state_dir()).is_empty(),
            "{name} started serving"
        );
    }

    // Exactly the manifest's capabilities: the mesh works.
    let id = node.start_agent("agent", &granted);
    let state = node.state_dir();
    let control = Path::new(&state).join("control.sock");
    wait_for("the agent's control socket", 30, || {
        control.exists() || node.rt.container_status(&id).unwrap().state == container_state::EXITED
    });
    assert!(control.exists(), "the agent exited:\n{}", node.log("agent"));

    let app = node
        .rt
        .run_pod(
            &PodDef::new("app")
                .uid("cap-app")
                .tcp_responder("app", APP, "app"),
        )
        .expect("the app's pod");
    let app_ip: IpAddr = app.ipv4().unwrap().into();
    // The node's listener on the bridge's gateway address (there once a pod is up).
    let host = Netns::open("/proc/self/ns/net").unwrap();
    let gateway = SocketAddr::new(node.rt.net().gateway_v4().into(), GATEWAY_PORT);
    echo_server(&host, "node", gateway).unwrap();
    let direct = ask(&app.open_netns().unwrap(), gateway, "hello").unwrap();
    assert!(direct.starts_with("node from "), "{direct}");

    // Enrolled as pods found through /proc are: by a process's namespace, which the
    // agent may open only with CAP_SYS_PTRACE (the pod's process holds capabilities
    // the agent does not).
    let netns = format!("/host/proc/{}/ns/net", pid_in(&app));
    let out = cli(&[
        "pod",
        "add",
        "--state-dir",
        &state,
        "--netns",
        &netns,
        "--uid",
        "cap-app",
        "--name",
        "app",
        "--namespace",
        "default",
        "--service-account",
        "default",
    ]);
    assert!(out.is_ok(), "{out:?}\n{}", node.log("agent"));
    wait_for("the pod ready", 20, || {
        pods_by_uid(&state)
            .get("cap-app")
            .is_some_and(|p| p["state"]["state"] == "ready")
    });

    // Outbound: redirected to the proxy (15001), which reaches the node's listener.
    let before = counter(&state, "cap-app", "redirected_15001");
    let answer = ask(&app.open_netns().unwrap(), gateway, "hello").unwrap();
    assert!(answer.starts_with("node from "), "{answer}");
    assert_eq!(
        counter(&state, "cap-app", "redirected_15001"),
        before + 1,
        "not redirected:\n{}",
        node.log("agent")
    );

    // A node socket (the kubelet's probe) reaches the app directly: the agent's
    // sock_ops program sits on the host's cgroup2 root, not the container's cgroup.
    let probes = counter(&state, "cap-app", "bypassed_probe");
    let inbound = counter(&state, "cap-app", "redirected_15006");
    let answer = ask(&host, SocketAddr::new(app_ip, APP), "probe").unwrap();
    assert_eq!(answer, "app");
    assert_eq!(counter(&state, "cap-app", "bypassed_probe"), probes + 1);
    assert_eq!(counter(&state, "cap-app", "redirected_15006"), inbound);

    let log = node.log("agent");
    assert!(
        log.lines()
            .any(|l| l.contains("node link attached")
                && l.contains("program=\"redirect_host_probes\"")),
        "{log}"
    );
    cli(&["pod", "del", "--state-dir", &state, "--uid", "cap-app"]).unwrap();
}

/// containerd's default on cgroup v2 nodes: the container has a cgroup namespace of its
/// own (its `/proc/self/cgroup` says `/`) and sees the host's hierarchy through the
/// DaemonSet's hostPath mount. Made here with `unshare(CLONE_NEWCGROUP)` from a cgroup
/// of the test: `run` must trust that cgroup as the proxy's (not try to move itself
/// into a new cgroup at the host's root, which the namespace forbids), and attach the
/// probes' sock_ops program to the host's root, not to its own cgroup.
#[test]
fn run_in_a_private_cgroup_namespace_finds_its_cgroup_and_the_hosts_root() {
    use std::os::unix::{fs::MetadataExt, process::CommandExt};

    let mount = redirect_user::ebpf::cgroup2_mount().expect("cgroup v2");
    let base = format!("cap-ns-{:x}", std::process::id());
    let cg = mount.join(&base);
    std::fs::create_dir_all(&cg).unwrap();
    // Removed once empty, after the agent (dropped first) has gone.
    struct Rmdir(PathBuf);
    impl Drop for Rmdir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _cg = Rmdir(cg.clone());
    let dir = PathBuf::from(format!("/tmp/{base}"));
    std::fs::create_dir_all(&dir).unwrap();
    let pin = format!("/sys/fs/bpf/{base}");
    let _cleanup = (RemoveDir::new(dir.clone()), RemoveDir::new(pin.clone()));
    let log = dir.join("agent.log");
    let procs = std::ffi::CString::new(cg.join("cgroup.procs").to_str().unwrap()).unwrap();
    let d = dir.to_str().unwrap();
    let mut cmd = std::process::Command::new(redirect_tests::redirect_user_bin().unwrap());
    cmd.args([
        "run",
        "--bare-relay",
        "--admin-addr=off",
        "--metrics-addr=off",
    ])
    .args(["--socket", &format!("{d}/zds.sock"), "--state-dir", d])
    .args(["--pin-dir", &pin])
    .env("RUST_LOG", "info")
    .stdout(std::process::Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: between fork and exec only open, write, close, getpid and unshare, on
    // buffers made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writer itself.
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n < 0 || libc::unshare(libc::CLONE_NEWCGROUP) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut agent = redirect_tests::process::Proc::adopt(cmd.spawn().unwrap());
    let ns_of = |pid: u32| std::fs::metadata(format!("/proc/{pid}/ns/cgroup")).map(|m| m.ino());
    assert_ne!(
        ns_of(agent.pid() as u32).unwrap(),
        ns_of(std::process::id()).unwrap(),
        "not in a cgroup namespace of its own"
    );
    wait_for("the agent's socket", 20, || dir.join("zds.sock").exists());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("cgroup found by membership"), "{text}");
    let id = std::fs::metadata(&cg).unwrap().ino();
    assert!(text.contains(&format!("trusted={{{id}}}")), "{text}");
    assert!(
        text.contains(&format!(
            "node link attached cgroup={} link={pin}/node/host_probes",
            mount.display()
        )),
        "{text}"
    );
    assert!(redirect_user::ebpf::trust::is_hierarchy_root(&mount));
    assert!(!redirect_user::ebpf::trust::is_hierarchy_root(&cg));
    agent.signal(libc::SIGTERM);
}
