//! What the engine needs from the kernel, checked before anything is loaded so that a
//! missing piece is named at start rather than failing later.

use std::path::Path;

use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_program_supported},
};

#[derive(Debug, thiserror::Error)]
#[error("the kernel lacks what the redirection engine needs:\n  - {}", .missing.join("\n  - "))]
pub struct KernelCheckError {
    pub missing: Vec<String>,
}

/// Helpers each program type calls, as (program type, type name, helper, helper name).
const HELPERS: &[(ProgramType, &str, BpfHelper, &str)] = &[
    (
        ProgramType::SockOps,
        "sock_ops",
        BpfHelper::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie",
    ),
    (
        ProgramType::SockOps,
        "sock_ops",
        BpfHelper::BPF_FUNC_sock_ops_cb_flags_set,
        "bpf_sock_ops_cb_flags_set",
    ),
    (
        ProgramType::SkLookup,
        "sk_lookup",
        BpfHelper::BPF_FUNC_sk_assign,
        "bpf_sk_assign",
    ),
    (
        ProgramType::SkLookup,
        "sk_lookup",
        BpfHelper::BPF_FUNC_sk_release,
        "bpf_sk_release",
    ),
    (
        ProgramType::SkLookup,
        "sk_lookup",
        BpfHelper::BPF_FUNC_ringbuf_output,
        "bpf_ringbuf_output",
    ),
    (
        ProgramType::SchedClassifier,
        "tc",
        BpfHelper::BPF_FUNC_redirect,
        "bpf_redirect",
    ),
    (
        ProgramType::SchedClassifier,
        "tc",
        BpfHelper::BPF_FUNC_sk_fullsock,
        "bpf_sk_fullsock",
    ),
    (
        ProgramType::SchedClassifier,
        "tc",
        BpfHelper::BPF_FUNC_sk_storage_get,
        "bpf_sk_storage_get",
    ),
    (
        ProgramType::SchedClassifier,
        "tc",
        BpfHelper::BPF_FUNC_ktime_get_ns,
        "bpf_ktime_get_ns",
    ),
    (
        ProgramType::SchedClassifier,
        "tc",
        BpfHelper::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie",
    ),
    (
        ProgramType::SchedClassifier,
        "tc",
        BpfHelper::BPF_FUNC_skb_cgroup_id,
        "bpf_skb_cgroup_id",
    ),
    (
        ProgramType::SchedClassifier,
        "tc",
        BpfHelper::BPF_FUNC_skb_load_bytes,
        "bpf_skb_load_bytes",
    ),
    (
        ProgramType::SchedClassifier,
        "tc",
        BpfHelper::BPF_FUNC_skb_store_bytes,
        "bpf_skb_store_bytes",
    ),
    (
        ProgramType::SchedClassifier,
        "tc",
        BpfHelper::BPF_FUNC_fib_lookup,
        "bpf_fib_lookup",
    ),
    (
        ProgramType::CgroupSkb,
        "cgroup_skb",
        BpfHelper::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie",
    ),
    (
        ProgramType::CgroupSkb,
        "cgroup_skb",
        BpfHelper::BPF_FUNC_sk_storage_get,
        "bpf_sk_storage_get",
    ),
];

/// Checks bpffs at `pin_root`'s mount, kernel BTF, the program types and every helper.
pub fn check_kernel(pin_root: &Path) -> Result<(), KernelCheckError> {
    let mut missing = Vec::new();

    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push(
            "kernel BTF (/sys/kernel/btf/vmlinux): a kernel built with CONFIG_DEBUG_INFO_BTF=y"
                .into(),
        );
    }
    if !is_on_bpffs(pin_root) {
        missing.push(format!(
            "a bpffs at {}: mount one with `mount -t bpf bpf {}`",
            pin_root.parent().unwrap_or(pin_root).display(),
            pin_root.parent().unwrap_or(pin_root).display()
        ));
    }
    for (ty, name, cfg) in [
        (
            ProgramType::SkLookup,
            "sk_lookup programs",
            "CONFIG_BPF_SYSCALL=y and a kernel >= 5.9",
        ),
        (
            ProgramType::SchedClassifier,
            "tc (sched_cls) programs",
            "CONFIG_NET_CLS_BPF and CONFIG_NET_SCH_INGRESS",
        ),
        (
            ProgramType::SockOps,
            "sock_ops programs (the kubelet's probes)",
            "CONFIG_CGROUP_BPF",
        ),
        (
            ProgramType::CgroupSkb,
            "cgroup_skb programs (the guard of interfaces added to pods)",
            "CONFIG_CGROUP_BPF",
        ),
    ] {
        match is_program_supported(ty) {
            Ok(true) => {}
            Ok(false) => missing.push(format!("{name} ({cfg})")),
            Err(e) => missing.push(format!("{name}: probing failed: {e}")),
        }
    }
    for (ty, tyname, helper, hname) in HELPERS {
        match is_helper_supported(*ty, *helper) {
            Ok(true) => {}
            Ok(false) => missing.push(format!("helper {hname} in {tyname} programs")),
            Err(e) => missing.push(format!(
                "helper {hname} in {tyname} programs: probing failed: {e}"
            )),
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelCheckError { missing })
    }
}

/// True if `path` (or its nearest existing ancestor) is on a bpf filesystem.
fn is_on_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let mut p = Some(path);
    while let Some(dir) = p {
        if dir.exists() {
            return nix::sys::statfs::statfs(dir)
                .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
                .unwrap_or(false);
        }
        p = dir.parent();
    }
    false
}
