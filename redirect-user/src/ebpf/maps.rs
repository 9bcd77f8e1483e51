//! Typed access to the engine's pinned maps.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
};
use redirect_ebpf::{
    AddrKey, GuardCounters, IfaceKey, ListenerKey, PodAddr, PodConfig, PodCounters, PodRecord,
    PodUid, names,
};

pub struct Maps {
    pub pods: HashMap<MapData, u64, PodConfig>,
    pub pod_addrs: HashMap<MapData, AddrKey, PodAddr>,
    /// A sockhash with 8-byte values: aya's `SockHash` wants 4, so it is used raw.
    pub listeners: MapData,
    pub proxy_cgroups: HashMap<MapData, u64, u8>,
    pub counters: PerCpuArray<MapData, PodCounters>,
    pub pod_index: HashMap<MapData, PodUid, PodRecord>,
    pub node_netns: HashMap<MapData, u64, u8>,
    /// The pods' interfaces that carry the tc programs: the guard lets a pod's TCP out
    /// through these only.
    pub covered: HashMap<MapData, IfaceKey, u32>,
    pub guard_counters: PerCpuArray<MapData, GuardCounters>,
    max_pods: u32,
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T, MapError> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| MapError::InvalidName { name: name.into() })?;
    T::try_from(map)
}

impl Maps {
    pub fn take(ebpf: &mut Ebpf, max_pods: u32) -> Result<Self, MapError> {
        Ok(Self {
            pods: take(ebpf, names::PODS)?,
            pod_addrs: take(ebpf, names::POD_ADDRS)?,
            listeners: match ebpf.take_map(names::LISTENERS) {
                Some(Map::SockHash(m)) => m,
                _ => {
                    return Err(MapError::InvalidName {
                        name: names::LISTENERS.into(),
                    });
                }
            },
            proxy_cgroups: take(ebpf, names::PROXY_CGROUPS)?,
            counters: take(ebpf, names::COUNTERS)?,
            pod_index: take(ebpf, names::POD_INDEX)?,
            node_netns: take(ebpf, names::NODE_NETNS)?,
            covered: take(ebpf, names::COVERED)?,
            guard_counters: take(ebpf, names::GUARD_COUNTERS)?,
            max_pods,
        })
    }

    /// Puts a socket in the listener map. The map's value is 8 bytes (so that `bpftool`
    /// can dump socket cookies) and aya writes a 4-byte fd, so the update is made here.
    pub fn insert_listener(&self, key: &ListenerKey, sock: BorrowedFd<'_>) -> std::io::Result<()> {
        let fd: u64 = sock.as_raw_fd() as u64;
        map_update(self.listeners.fd().as_fd(), key, &fd)
    }

    /// Removes a pod's socket from the listener map. Returns false if it was not there.
    pub fn remove_listener(&self, key: &ListenerKey) -> std::io::Result<bool> {
        match bpf_elem(
            BPF_MAP_DELETE_ELEM,
            self.listeners.fd().as_fd(),
            key,
            std::ptr::null::<u8>() as u64,
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The socket cookie under `key`, if any.
    pub fn listener_cookie(&self, key: &ListenerKey) -> std::io::Result<Option<u64>> {
        let mut cookie: u64 = 0;
        match bpf_elem(
            BPF_MAP_LOOKUP_ELEM,
            self.listeners.fd().as_fd(),
            key,
            &mut cookie as *mut u64 as u64,
        ) {
            Ok(()) => Ok(Some(cookie)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Each map held here, by its name (to pin it again).
    pub fn by_name(&self) -> [(&'static str, &MapData); 9] {
        use aya::maps::IterableMap;
        [
            (names::PODS, self.pods.map()),
            (names::POD_ADDRS, self.pod_addrs.map()),
            (names::LISTENERS, &self.listeners),
            (names::PROXY_CGROUPS, self.proxy_cgroups.map()),
            (names::COUNTERS, self.counters.map()),
            (names::POD_INDEX, self.pod_index.map()),
            (names::NODE_NETNS, self.node_netns.map()),
            (names::COVERED, self.covered.map()),
            (names::GUARD_COUNTERS, self.guard_counters.map()),
        ]
    }

    /// How many pods the maps hold.
    pub fn pod_index_capacity(&self) -> u32 {
        self.max_pods
    }

    pub fn zero_counters(&mut self, id: u32) -> Result<(), MapError> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            })
        })?;
        self.counters.set(
            id,
            PerCpuValues::try_from(vec![PodCounters::default(); n])?,
            0,
        )?;
        self.guard_counters.set(
            id,
            PerCpuValues::try_from(vec![GuardCounters::default(); n])?,
            0,
        )
    }

    pub fn read_guard_counters(&self, id: u32) -> Result<GuardCounters, MapError> {
        let mut total = GuardCounters::default();
        for c in self.guard_counters.get(&id, 0)?.iter() {
            total.add(c);
        }
        Ok(total)
    }

    /// The covered interfaces of a namespace (the wildcard 0 included).
    pub fn covered_of(&self, netns: u64) -> Vec<u32> {
        self.covered
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns == netns)
            .map(|k| k.ifindex)
            .collect()
    }

    pub fn cover(&mut self, netns: u64, ifindex: u32) -> Result<(), MapError> {
        self.covered.insert(iface_key(netns, ifindex), 1, 0)
    }

    pub fn uncover(&mut self, netns: u64, ifindex: u32) {
        let _ = self.covered.remove(&iface_key(netns, ifindex));
    }

    /// Removes every covered entry of a namespace.
    pub fn uncover_all(&mut self, netns: u64) {
        for i in self.covered_of(netns) {
            self.uncover(netns, i);
        }
    }
}

pub fn iface_key(netns: u64, ifindex: u32) -> IfaceKey {
    IfaceKey {
        netns,
        ifindex,
        _pad: 0,
    }
}

impl Maps {
    pub fn read_counters(&self, id: u32) -> Result<PodCounters, MapError> {
        let mut total = PodCounters::default();
        for c in self.counters.get(&id, 0)?.iter() {
            total.add(c);
        }
        Ok(total)
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// `BPF_MAP_UPDATE_ELEM` (BPF_ANY) with any key and value type.
fn map_update<K, V>(map: BorrowedFd<'_>, key: &K, value: &V) -> std::io::Result<()> {
    bpf_elem(BPF_MAP_UPDATE_ELEM, map, key, value as *const V as u64)
}

/// One map element command; `value` is a user pointer (or 0).
fn bpf_elem<K>(cmd: libc::c_long, map: BorrowedFd<'_>, key: &K, value: u64) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = Attr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value,
        flags: 0,
    };
    // SAFETY: attr points at a live key, and value at a buffer of the map's value size.
    unsafe { sys_bpf(cmd, &attr) }.map(|_| ())
}

/// The `bpf` syscall with an attribute struct of the command's layout.
///
/// # Safety
/// Every pointer in `attr` must be valid for what the command reads or writes.
pub(crate) unsafe fn sys_bpf<A>(cmd: libc::c_long, attr: &A) -> std::io::Result<i64> {
    // SAFETY: as the caller promises.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const A, size_of::<A>()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// What a map looks like to the kernel; a pinned map must look like this build's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLayout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B entries {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading the map definitions of the eBPF object: {0}")]
    Object(String),
    #[error("reading the pinned map {path}: {detail}")]
    Read {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error(
        "the pinned map {path} does not fit this build: it is {found}, this build needs {expected}. It was made by another version of the engine (or by hand): un-enrol every pod with the version that made it, or remove the pin directory once its pods are gone"
    )]
    Incompatible {
        path: std::path::PathBuf,
        found: MapLayout,
        expected: MapLayout,
    },
}

const BPF_MAP_TYPE_RINGBUF: u32 = 27;

/// The layouts of the object's maps, as the loader creates them (`max_pods` applied).
pub fn expected_layouts(
    object: &[u8],
    max_pods: u32,
) -> Result<std::collections::BTreeMap<String, MapLayout>, LayoutError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| LayoutError::Object(e.to_string()))?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            let max_entries = if name == names::PODS || name == names::POD_INDEX {
                max_pods
            } else {
                m.max_entries()
            };
            (
                name.clone(),
                MapLayout {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries,
                    flags: m.map_flags(),
                },
            )
        })
        .collect())
}

/// Compares one pinned map with what this build needs. A ring buffer of another size
/// still fits (its size is rounded to pages by the loader).
pub fn layout_fits(found: &MapLayout, expected: &MapLayout) -> bool {
    if expected.map_type == BPF_MAP_TYPE_RINGBUF {
        return found.map_type == expected.map_type;
    }
    found == expected
}

/// Checks every map already pinned in `maps_dir` against the object's definitions, so
/// that an incompatible map is refused rather than reused by the loader.
pub fn check_pinned(
    object: &[u8],
    maps_dir: &std::path::Path,
    max_pods: u32,
) -> Result<(), LayoutError> {
    for (name, expected) in expected_layouts(object, max_pods)? {
        let path = maps_dir.join(&name);
        if !path.exists() {
            continue;
        }
        let read = |detail: String| LayoutError::Read {
            path: path.clone(),
            detail,
        };
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|e| read(e.to_string()))?;
        let found = MapLayout {
            map_type: info.map_type().map_err(|e| read(e.to_string()))? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        };
        if !layout_fits(&found, &expected) {
            return Err(LayoutError::Incompatible {
                path,
                found,
                expected,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_defines_every_pinned_map() {
        let layouts = expected_layouts(super::super::OBJECT, 100).unwrap();
        for name in names::ALL_MAPS {
            assert!(layouts.contains_key(name), "{name} missing: {layouts:?}");
        }
        assert_eq!(layouts[names::PODS].max_entries, 100);
        assert_eq!(
            layouts[names::PODS].value_size as usize,
            size_of::<PodConfig>()
        );
    }

    #[test]
    fn layouts_are_compared_field_by_field() {
        let hash = MapLayout {
            map_type: 1,
            key_size: 8,
            value_size: 8,
            max_entries: 10,
            flags: 0,
        };
        assert!(layout_fits(&hash, &hash));
        let lru = MapLayout {
            map_type: 9,
            ..hash
        };
        assert!(!layout_fits(&hash, &lru), "a plain hash is no LRU");
        let wider = MapLayout {
            value_size: 16,
            ..hash
        };
        assert!(!layout_fits(&wider, &hash));
        let ring = MapLayout {
            map_type: BPF_MAP_TYPE_RINGBUF,
            key_size: 0,
            value_size: 0,
            max_entries: 4096,
            flags: 0,
        };
        let bigger_ring = MapLayout {
            max_entries: 8192,
            ..ring
        };
        assert!(layout_fits(&bigger_ring, &ring));
    }
}
