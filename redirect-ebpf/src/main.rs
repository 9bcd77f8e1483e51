//! The redirection programs. Loaded once per process, attached to every enrolled pod;
//! every per-pod decision comes from the maps, keyed by the pod's netns cookie.
//!
//! - `redirect_lookup` (sk_lookup, on the pod netns): picks the proxy listener for a new
//!   connection noted by the tc programs (parity rows 1, 2, 3, 8), leaves alone those
//!   noted as local (row 5), and drops it when the listener is missing (row 11).
//! - `redirect_egress` (tc egress, on the pod's interfaces): turns new outbound TCP
//!   flows (and DNS with capture on) back into the pod, marked 0x111, so that the
//!   `fwmark 0x111 lookup 100` rule delivers them locally and `redirect_lookup` sees
//!   them (row 3); leaves the proxy's own sockets (row 6, not a forged mark: row 7) and
//!   connections that were open before enrolment (row 10) alone.
//! - `redirect_ingress` (tc ingress, on the pod's interfaces): notes new inbound
//!   connections but probes (row 4), and drops packets from outside that carry one of
//!   the pod's own addresses as source.
//! - `redirect_loopback` (tc egress, on the pod's lo): notes connections the pod opens
//!   to itself, which sk_lookup cannot tell from outside ones (row 5).
//!
//! sk_lookup has no helper for its namespace, so it cannot find the pod by itself: the
//! tc programs, which see every new connection first and know the namespace, note each
//! one (5-tuple to pod and kind) in the `flows` map, and sk_lookup acts on that note.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The programs only exist for the bpf target: `cargo xtask build-ebpf`.
}
