//! Embeds the eBPF object that `cargo xtask build-ebpf` builds.
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    let obj = std::env::var_os("REDIRECT_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/bpfel-unknown-none/release/redirect-ebpf"));
    println!("cargo:rerun-if-env-changed=REDIRECT_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", obj.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("redirect-ebpf.o");
    if let Err(e) = std::fs::copy(&obj, &out) {
        panic!(
            "the eBPF object {} is missing ({e}): run `cargo xtask build-ebpf` first",
            obj.display()
        );
    }
}
