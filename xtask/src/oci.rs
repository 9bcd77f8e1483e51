//! OCI image-layout archives written with no registry and no base image: what
//! `ctr images import`, `podman load` and `skopeo copy oci-archive:` read. Layers are
//! uncompressed tars (each layer's diff_id is its blob digest), owned by root, with fixed
//! times, so equal input gives equal digests.
//!
//! Shared, as source, by `cargo xtask image` and the tests' container runtime fixture
//! (`tests/src/cri/image.rs`), which includes this file with `#[path]`.

use serde_json::json;
use sha2::{Digest, Sha256};

/// One entry of a layer.
pub enum Entry<'a> {
    /// A directory (mode 0755).
    Dir(&'a str),
    /// A file at the path, with these bytes and mode.
    File(&'a str, &'a [u8], u32),
    /// A symbolic link at the first path to the second (the tests' busybox applets;
    /// the agent's image has none).
    #[allow(dead_code)]
    Link(&'a str, &'a str),
}

/// An uncompressed tar of `entries`.
pub fn layer(entries: &[Entry]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty())?;
            }
            Entry::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data)?;
            }
            Entry::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target)?;
            }
        }
    }
    b.into_inner()
}

/// `sha256:<hex>`.
pub fn digest(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// An image: its fully qualified name (`localhost/x:tag`), one layer, and its config.
pub struct Image {
    pub name: String,
    pub layer: Vec<u8>,
    pub entrypoint: Vec<String>,
    pub env: Vec<String>,
}

/// The image-layout archive holding `images` (linux/amd64), each named by the
/// `io.containerd.image.name` and `org.opencontainers.image.ref.name` annotations.
pub fn layout_tar(images: &[Image]) -> std::io::Result<Vec<u8>> {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut manifests = Vec::new();
    for img in images {
        let layer_digest = digest(&img.layer);
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Entrypoint": img.entrypoint, "Env": img.env },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        }))?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(&config),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": img.layer.len(),
            }],
        }))?;
        manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": img.name,
                "org.opencontainers.image.ref.name": img.name.rsplit(':').next().unwrap_or("latest"),
            },
        }));
        blobs.push((layer_digest, img.layer.clone()));
        blobs.push((digest(&config), config));
        blobs.push((digest(&manifest), manifest));
    }
    let index = serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": manifests }))?;
    let oci_layout = br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec();
    let paths: Vec<String> = blobs
        .iter()
        .map(|(d, _)| format!("blobs/sha256/{}", d.trim_start_matches("sha256:")))
        .collect();
    let mut files = vec![
        Entry::Dir("blobs"),
        Entry::Dir("blobs/sha256"),
        Entry::File("oci-layout", &oci_layout, 0o644),
        Entry::File("index.json", &index, 0o644),
    ];
    files.extend(
        paths
            .iter()
            .zip(&blobs)
            .map(|(p, (_, data))| Entry::File(p, data, 0o644)),
    );
    layer(&files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_sha256_in_hex() {
        assert_eq!(
            digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn a_layout_names_its_images_and_holds_every_blob_it_points_at() {
        let l = layer(&[Entry::Dir("bin"), Entry::File("bin/x", b"hi", 0o755)]).unwrap();
        let tar = layout_tar(&[Image {
            name: "localhost/x:1".into(),
            layer: l.clone(),
            entrypoint: vec!["/bin/x".into()],
            env: vec![],
        }])
        .unwrap();
        let mut a = tar::Archive::new(&tar[..]);
        let mut files = std::collections::BTreeMap::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            files.insert(e.path().unwrap().to_string_lossy().into_owned(), data);
        }
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "localhost/x:1"
        );
        let blob = |d: &serde_json::Value| {
            files[&format!(
                "blobs/sha256/{}",
                d.as_str().unwrap().trim_start_matches("sha256:")
            )]
                .clone()
        };
        let manifest: serde_json::Value = serde_json::from_slice(&blob(&m["digest"])).unwrap();
        assert_eq!(blob(&manifest["layers"][0]["digest"]), l);
        let config: serde_json::Value =
            serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
    }
}
