//! The eBPF traffic redirection engine for ambient meshes, and what is built on it.
//!
//! - [`admin`]: metrics, readiness, liveness and the admin dump over HTTP.
//! - [`ebpf`]: loads the programs once, pins the maps, enrols and un-enrols pods.
//! - [`netns`]: network namespace handles.
//! - [`netlink`]: links, addresses, rules and routes inside a namespace.
//! - [`proxy`]: the proxy's sockets in a pod and a plain TCP relay.
//! - [`k8s`]: the pods of the mesh from the Kubernetes API (watch, /proc discovery).
//! - [`membership`]: which pods belong to the mesh (the CNI plugin asks, the cluster answers).
//! - [`cni`]: the chained CNI plugin, the agent's plugin socket, the CNI configuration.
//! - [`privileges`]: the capabilities each mode needs, checked at start.
//! - [`fuzz`]: the fuzz targets' entry points: each decoder of untrusted bytes, with its properties.
//! - [`interrupt`]: what the demo, tests and benches made, removed on SIGINT/SIGTERM.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod cni;
pub mod demo;
pub mod demo_mesh;
pub mod ebpf;
pub mod fuzz;
pub mod interrupt;
pub mod k8s;
pub mod membership;
pub mod netlink;
pub mod netns;
pub mod privileges;
pub mod probe;
pub mod proxy;
pub mod topology;
pub mod uninstall;
pub mod zds;
