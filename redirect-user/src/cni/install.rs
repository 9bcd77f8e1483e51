//! Puts the plugin on the node: copies `redirect-cni` into the CNI bin directory and
//! writes our own configuration, [`CONF_NAME`], next to the primary's (the file the
//! runtime would pick without us: the lexically first `*.conf`, `*.conflist` or
//! `*.json` that is not ours). Ours copies the primary's plugin list (a `.conf` becomes
//! a list of one), `cniVersion` and `name`, and appends our plugin; it sorts before the
//! primary, so the runtime uses it. The primary's file is never touched.
//!
//! [`watch`] polls the directory every second and rewrites ours when the primary
//! changes or ours was deleted or edited. Uninstalling removes ours and the binary; an
//! agent that merely stops leaves both, so that new pods wait (their ADD fails) instead
//! of starting unredirected.

use std::{
    io::Write as _,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};
use tracing::{error, info, warn};

use super::PLUGIN_TYPE;

/// Our configuration's file name. Runtimes take the lexically (bytewise) first file:
/// `0-` sorts before every name that starts with a letter, `1`-`9`, or `0` followed by
/// a digit (`00-multus.conf`, `05-cilium.conflist`, `10-calico.conflist`); a name that
/// still sorts before it is reported as an error, never silently used.
pub const CONF_NAME: &str = "0-redirect.conflist";
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
/// Most nodes; Debian's packages use `/usr/lib/cni`.
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
/// How often [`watch`] looks at the directory.
pub const POLL: Duration = Duration::from_secs(1);
const EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

#[derive(Debug, Clone)]
pub struct InstallConfig {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The `redirect-cni` binary to copy.
    pub plugin_bin: PathBuf,
    /// The agent's plugin socket, written into our plugin's configuration.
    pub socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("primary CNI configuration {path}: {detail}")]
    BadPrimary { path: PathBuf, detail: String },
    #[error(
        "{primary} sorts before {CONF_NAME}: the runtime would use it and pods would start unredirected; rename it"
    )]
    PrimarySortsFirst { primary: String },
    #[error("no CNI configuration in {0} yet (the primary CNI has not written one)")]
    NoPrimary(PathBuf),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// The configuration files in `dir` the runtime considers, sorted as it sorts them.
pub fn config_files(dir: &Path) -> Result<Vec<String>, InstallError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("reading", dir))? {
        let entry = entry.map_err(io("reading", dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let ext = Path::new(&name).extension().and_then(|e| e.to_str());
        if !ext.is_some_and(|e| EXTENSIONS.contains(&e)) {
            continue;
        }
        // Follows links, as the runtime does; directories are skipped.
        if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The primary: the first configuration file that is not ours.
pub fn primary_name(files: &[String]) -> Option<&str> {
    files.iter().map(String::as_str).find(|n| *n != CONF_NAME)
}

/// Our conflist for the primary's content: its plugins (ours left out if already
/// there) with ours appended.
pub fn our_conflist(primary: &[u8], socket: &Path) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(primary).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(o) = v else {
        return Err("not a JSON object".into());
    };
    let ours = json!({ "type": PLUGIN_TYPE, "socket": socket });
    let not_ours = |p: &&Value| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE);
    let list = match o.get("plugins") {
        Some(Value::Array(plugins)) => {
            if plugins.is_empty() {
                return Err("its plugin list is empty".into());
            }
            let mut list = o.clone();
            let mut chained: Vec<Value> = plugins.iter().filter(not_ours).cloned().collect();
            chained.push(ours);
            list.insert("plugins".into(), Value::Array(chained));
            list
        }
        Some(_) => return Err("\"plugins\" is not a list".into()),
        None => {
            // A single plugin's configuration: a list of one, as runtimes read it.
            if !o.get("type").is_some_and(Value::is_string) {
                return Err("neither a plugin list nor a plugin (no \"type\")".into());
            }
            let mut list = serde_json::Map::new();
            for key in ["cniVersion", "name"] {
                if let Some(v) = o.get(key) {
                    list.insert(key.into(), v.clone());
                }
            }
            list.insert("plugins".into(), json!([Value::Object(o), ours]));
            list
        }
    };
    for key in ["cniVersion", "name"] {
        if !list.get(key).is_some_and(Value::is_string) {
            return Err(format!("no {key:?}"));
        }
    }
    Ok(Value::Object(list))
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// Ours was already right.
    Unchanged { primary: String },
    /// Ours was (re)written.
    Written { primary: String },
}

/// Keeps the binary and our configuration in place; remembers what it copied so that
/// a poll does not read the binary again.
#[derive(Debug)]
pub struct Installer {
    cfg: InstallConfig,
    /// (size, mtime, inode) of the binary as last copied or checked.
    copied: Option<(u64, i64, u64)>,
}

impl Installer {
    pub fn new(cfg: InstallConfig) -> Self {
        Self { cfg, copied: None }
    }

    pub fn binary_path(&self) -> PathBuf {
        self.cfg.bin_dir.join(PLUGIN_TYPE)
    }

    pub fn conf_path(&self) -> PathBuf {
        self.cfg.conf_dir.join(CONF_NAME)
    }

    /// One pass: binary, then configuration.
    pub fn reconcile(&mut self) -> Result<Pass, InstallError> {
        self.install_binary()?;
        let dir = &self.cfg.conf_dir;
        let files = config_files(dir)?;
        let Some(primary) = primary_name(&files).map(String::from) else {
            return Err(InstallError::NoPrimary(dir.clone()));
        };
        if primary.as_str() < CONF_NAME {
            return Err(InstallError::PrimarySortsFirst { primary });
        }
        let path = dir.join(&primary);
        let bytes = std::fs::read(&path).map_err(io("reading", &path))?;
        let list =
            our_conflist(&bytes, &self.cfg.socket).map_err(|detail| InstallError::BadPrimary {
                path: path.clone(),
                detail,
            })?;
        let mut want = serde_json::to_vec_pretty(&list).expect("JSON serializes");
        want.push(b'\n');
        let ours = self.conf_path();
        if std::fs::read(&ours).is_ok_and(|have| have == want) {
            return Ok(Pass::Unchanged { primary });
        }
        write_atomically(&ours, &want, 0o644)?;
        Ok(Pass::Written { primary })
    }

    fn install_binary(&mut self) -> Result<(), InstallError> {
        let dst = self.binary_path();
        let stamp = |m: &std::fs::Metadata| (m.len(), m.mtime(), m.ino());
        if let (Some(done), Ok(m)) = (self.copied, std::fs::metadata(&dst))
            && stamp(&m) == done
        {
            return Ok(());
        }
        let src = &self.cfg.plugin_bin;
        let bytes = std::fs::read(src).map_err(io("reading the plugin binary", src))?;
        if std::fs::read(&dst).is_ok_and(|have| have == bytes) {
            self.copied = std::fs::metadata(&dst).ok().map(|m| stamp(&m));
            return Ok(());
        }
        std::fs::create_dir_all(&self.cfg.bin_dir).map_err(io("creating", &self.cfg.bin_dir))?;
        write_atomically(&dst, &bytes, 0o755)?;
        info!(path = %dst.display(), "cni: plugin binary installed");
        self.copied = std::fs::metadata(&dst).ok().map(|m| stamp(&m));
        Ok(())
    }
}

/// Written to a temporary file (a name the runtime ignores), synced, renamed over.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(io("writing", path))
}

/// `redirect-user cni install`: one pass; fails if there is no primary yet.
pub fn install(cfg: InstallConfig) -> Result<Pass, InstallError> {
    Installer::new(cfg).reconcile()
}

/// `redirect-user cni uninstall`: removes our configuration and the binary. The
/// primary's file is left as it is.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<(), InstallError> {
    for path in [conf_dir.join(CONF_NAME), bin_dir.join(PLUGIN_TYPE)] {
        match std::fs::remove_file(&path) {
            Ok(()) => info!(path = %path.display(), "cni: removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing", &path)(e)),
        }
    }
    Ok(())
}

/// Keeps the plugin installed until the task is dropped (returns only if a pass
/// panicked). Logs each change of state once ("cni: configuration written",
/// "cni: no primary CNI configuration yet").
pub async fn watch(cfg: InstallConfig) {
    watch_reporting(cfg, &std::sync::atomic::AtomicBool::new(false)).await
}

/// [`watch`], setting `in_place` after each pass: whether the binary and our
/// configuration are in place (the readiness and metrics read it).
pub async fn watch_reporting(cfg: InstallConfig, in_place: &std::sync::atomic::AtomicBool) {
    info!(
        conf_dir = %cfg.conf_dir.display(),
        bin_dir = %cfg.bin_dir.display(),
        plugin = %cfg.plugin_bin.display(),
        "cni: installing the plugin and watching the configuration"
    );
    let mut installer = Some(Installer::new(cfg));
    let mut last: Option<String> = None;
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let mut inst = installer
            .take()
            .expect("installer is put back after each pass");
        let (inst, r) = match tokio::task::spawn_blocking(move || {
            let r = inst.reconcile();
            (inst, r)
        })
        .await
        {
            Ok(v) => v,
            Err(e) => {
                error!(error = %e, "cni: install pass panicked");
                return;
            }
        };
        installer = Some(inst);
        in_place.store(r.is_ok(), std::sync::atomic::Ordering::Relaxed);
        let now = match &r {
            Ok(Pass::Unchanged { primary }) => format!("ok {primary}"),
            Ok(Pass::Written { .. }) => "written".into(),
            Err(e) => e.to_string(),
        };
        match &r {
            Ok(Pass::Written { primary }) => {
                info!(primary, file = CONF_NAME, "cni: configuration written")
            }
            Ok(Pass::Unchanged { .. }) => {}
            Err(e) if last.as_ref() != Some(&now) => match e {
                InstallError::NoPrimary(_) => {
                    warn!(error = %e, "cni: no primary CNI configuration yet, waiting")
                }
                _ => error!(error = %e, "cni: cannot install the plugin"),
            },
            Err(_) => {}
        }
        last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs {
        root: PathBuf,
    }

    impl Dirs {
        fn new(tag: &str) -> Self {
            let root = std::env::temp_dir()
                .join(format!("redirect-cni-install-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("net.d")).unwrap();
            std::fs::write(root.join("redirect-cni"), b"\x7fELF plugin v1").unwrap();
            Self { root }
        }

        fn conf(&self) -> PathBuf {
            self.root.join("net.d")
        }

        fn cfg(&self) -> InstallConfig {
            InstallConfig {
                conf_dir: self.conf(),
                bin_dir: self.root.join("bin"),
                plugin_bin: self.root.join("redirect-cni"),
                socket: "/run/test/pluginevent.sock".into(),
            }
        }

        fn ours(&self) -> Value {
            serde_json::from_slice(&std::fs::read(self.conf().join(CONF_NAME)).unwrap()).unwrap()
        }

        fn write(&self, name: &str, v: &Value) {
            std::fs::write(
                self.conf().join(name),
                serde_json::to_vec_pretty(v).unwrap(),
            )
            .unwrap();
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn bridge_conflist() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "containerd-net",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    fn ours_entry() -> Value {
        json!({"type": PLUGIN_TYPE, "socket": "/run/test/pluginevent.sock"})
    }

    #[test]
    fn a_conflist_primary_gets_our_plugin_appended() {
        let d = Dirs::new("list");
        d.write("10-containerd-net.conflist", &bridge_conflist());
        d.write(
            "99-loopback.conf",
            &json!({"cniVersion": "0.3.1", "name": "lo", "type": "loopback"}),
        );
        let mut i = Installer::new(d.cfg());
        assert_eq!(
            i.reconcile().unwrap(),
            Pass::Written {
                primary: "10-containerd-net.conflist".into()
            }
        );
        let mut want = bridge_conflist();
        want["plugins"].as_array_mut().unwrap().push(ours_entry());
        assert_eq!(d.ours(), want);
        assert_eq!(
            std::fs::read(d.root.join("bin/redirect-cni")).unwrap(),
            b"\x7fELF plugin v1"
        );
        let mode = std::fs::metadata(d.root.join("bin/redirect-cni"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        // The runtime now picks ours.
        assert_eq!(config_files(&d.conf()).unwrap()[0], CONF_NAME);
        // Nothing changed: nothing written.
        assert!(matches!(i.reconcile().unwrap(), Pass::Unchanged { .. }));
        // No temporary files left.
        let names: Vec<_> = std::fs::read_dir(d.conf())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn a_conf_primary_becomes_a_list() {
        let d = Dirs::new("conf");
        let conf = json!({"cniVersion": "0.3.1", "name": "mynet", "type": "bridge", "ipam": {"type": "host-local"}});
        d.write("10-mynet.conf", &conf);
        install(d.cfg()).unwrap();
        assert_eq!(
            d.ours(),
            json!({"cniVersion": "0.3.1", "name": "mynet", "plugins": [conf, ours_entry()]})
        );
    }

    #[test]
    fn a_rewritten_primary_is_followed_and_a_deleted_or_edited_one_of_ours_restored() {
        let d = Dirs::new("repair");
        d.write("10-net.conflist", &bridge_conflist());
        let mut i = Installer::new(d.cfg());
        i.reconcile().unwrap();
        // The primary CNI rewrites its file (new version, one plugin fewer).
        let mut changed = bridge_conflist();
        changed["cniVersion"] = json!("1.1.0");
        changed["plugins"].as_array_mut().unwrap().pop();
        d.write("10-net.conflist", &changed);
        assert!(matches!(i.reconcile().unwrap(), Pass::Written { .. }));
        let ours = d.ours();
        assert_eq!(ours["cniVersion"], "1.1.0");
        assert_eq!(ours["plugins"].as_array().unwrap().len(), 2);
        // Ours deleted: restored.
        std::fs::remove_file(d.conf().join(CONF_NAME)).unwrap();
        assert!(matches!(i.reconcile().unwrap(), Pass::Written { .. }));
        assert_eq!(d.ours(), ours);
        // Ours edited (our plugin dropped): restored.
        d.write(CONF_NAME, &changed);
        assert!(matches!(i.reconcile().unwrap(), Pass::Written { .. }));
        assert_eq!(d.ours(), ours);
        // The binary replaced by something else: copied again.
        std::fs::write(d.root.join("bin/redirect-cni"), b"other").unwrap();
        i.reconcile().unwrap();
        assert_eq!(
            std::fs::read(d.root.join("bin/redirect-cni")).unwrap(),
            b"\x7fELF plugin v1"
        );
    }

    #[test]
    fn ours_is_never_the_primary() {
        let d = Dirs::new("never");
        // Only ours: no primary.
        d.write(CONF_NAME, &bridge_conflist());
        assert!(matches!(install(d.cfg()), Err(InstallError::NoPrimary(_))));
        d.write("50-net.json", &bridge_conflist());
        install(d.cfg()).unwrap();
        assert_eq!(d.ours()["plugins"].as_array().unwrap().len(), 3);
        // Applying it again never chains ours twice.
        install(d.cfg()).unwrap();
        assert_eq!(d.ours()["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(
            primary_name(&[CONF_NAME.into(), "50-net.json".into()]),
            Some("50-net.json")
        );
        // A primary that already chains our plugin: not appended twice.
        let mut with_ours = bridge_conflist();
        with_ours["plugins"]
            .as_array_mut()
            .unwrap()
            .push(ours_entry());
        let list = our_conflist(&serde_json::to_vec(&with_ours).unwrap(), Path::new("/s")).unwrap();
        assert_eq!(list["plugins"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn names_the_runtime_ignores_or_that_sort_first() {
        let d = Dirs::new("names");
        d.write("10-net.conflist.bak", &bridge_conflist());
        std::fs::create_dir(d.conf().join("05-dir.conf")).unwrap();
        assert!(matches!(install(d.cfg()), Err(InstallError::NoPrimary(_))));
        d.write(
            "00-multus.conf",
            &json!({"cniVersion": "0.3.1", "name": "multus", "type": "multus"}),
        );
        assert!(
            install(d.cfg()).is_ok(),
            "0-redirect sorts before 00-multus"
        );
        d.write(
            "0-a.conf",
            &json!({"cniVersion": "0.3.1", "name": "a", "type": "bridge"}),
        );
        let e = install(d.cfg()).unwrap_err();
        assert!(matches!(e, InstallError::PrimarySortsFirst { .. }), "{e}");
    }

    #[test]
    fn a_bad_primary_is_an_error_and_ours_is_kept() {
        let d = Dirs::new("bad");
        d.write("10-net.conflist", &bridge_conflist());
        install(d.cfg()).unwrap();
        let before = d.ours();
        std::fs::write(d.conf().join("10-net.conflist"), b"{ half").unwrap();
        assert!(matches!(
            install(d.cfg()),
            Err(InstallError::BadPrimary { .. })
        ));
        assert_eq!(d.ours(), before);
        for bad in [
            json!({"plugins": []}),
            json!({"name": "x", "cniVersion": "1.0.0"}),
            json!([1]),
        ] {
            assert!(
                our_conflist(&serde_json::to_vec(&bad).unwrap(), Path::new("/s")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn uninstall_leaves_the_primary_byte_identical() {
        let d = Dirs::new("uninstall");
        // Odd formatting on purpose: any rewrite would show.
        let primary =
            b"{\"cniVersion\":\"0.4.0\",  \"name\":\"n\",\n\"plugins\":[{\"type\":\"ptp\"}]}";
        std::fs::write(d.conf().join("10-n.conflist"), primary).unwrap();
        install(d.cfg()).unwrap();
        assert!(d.conf().join(CONF_NAME).exists());
        uninstall(&d.conf(), &d.root.join("bin")).unwrap();
        assert!(!d.conf().join(CONF_NAME).exists());
        assert!(!d.root.join("bin/redirect-cni").exists());
        assert_eq!(
            std::fs::read(d.conf().join("10-n.conflist")).unwrap(),
            primary
        );
        // Again: nothing to remove is fine.
        uninstall(&d.conf(), &d.root.join("bin")).unwrap();
    }
}
