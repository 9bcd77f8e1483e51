//! Typed access to the engine's pinned maps.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
};
use redirect_ebpf::{
    AddrKey, ListenerKey, PodAddr, PodConfig, PodCounters, PodRecord, PodUid, names,
};

pub struct Maps {
    pub pods: HashMap<MapData, u64, PodConfig>,
    pub pod_addrs: HashMap<MapData, AddrKey, PodAddr>,
    /// A sockhash with 8-byte values: aya's `SockHash` wants 4, so it is used raw.
    pub listeners: MapData,
    pub proxy_cgroups: HashMap<MapData, u64, u8>,
    pub counters: PerCpuArray<MapData, PodCounters>,
    pub pod_index: HashMap<MapData, PodUid, PodRecord>,
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
        )
    }

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
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, &attr as *const Attr, size_of::<Attr>()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
