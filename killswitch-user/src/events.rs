//! Drop events from a scope's ring buffer, with interface names and cgroup paths resolved.
//!
//! The ring buffer has one reader position: while one process follows a scope's events, another
//! following the same scope sees only part of them.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use aya::maps::{Map, MapData, RingBuf};
use killswitch_common::{Direction, DropEvent, Reason, IPPROTO_ICMP, IPPROTO_ICMPV6};
use killswitch_common::{IPPROTO_TCP, IPPROTO_UDP};
use nix::{
    poll::{poll, PollFd, PollFlags, PollTimeout},
    time::{clock_gettime, ClockId},
};
use serde::Serialize;

use crate::{
    ebpf::maps::EVENTS,
    error::{Error, Result},
    interfaces,
};

/// Reads drop events of one pinned scope.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub fn open(pin_dir: &Path) -> Result<EventReader> {
        let path = pin_dir.join(EVENTS);
        let data = MapData::from_pin(&path).map_err(|e| {
            Error::kernel(format!("cannot open the pinned map {}", path.display()), e)
        })?;
        let ring = RingBuf::try_from(Map::RingBuf(data))
            .map_err(|e| Error::kernel(format!("unexpected map {}", path.display()), e))?;
        Ok(EventReader { ring })
    }

    /// The events waiting now, after waiting up to `timeout` for the first one.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<DropEvent>> {
        let mut events = self.drain();
        if events.is_empty() {
            let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.ring.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(Error::kernel("cannot wait for drop events", e)),
            }
            events = self.drain();
        }
        Ok(events)
    }

    /// The events waiting now, without waiting.
    pub fn drain(&mut self) -> Vec<DropEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<DropEvent>() {
                // SAFETY: the kernel wrote a whole DropEvent; read_unaligned copies it out.
                events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        events
    }
}

impl std::os::fd::AsRawFd for EventReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// A drop event in the user's words.
#[derive(Debug, Serialize, schemars::JsonSchema, Clone, PartialEq, Eq)]
pub struct DropRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub direction: &'static str,
    pub reason: &'static str,
    pub protocol: String,
    pub source: Option<IpAddr>,
    pub destination: Option<IpAddr>,
    pub source_port: Option<u16>,
    pub destination_port: Option<u16>,
    pub ifindex: u32,
    /// `None` when the interface is gone or in another network namespace.
    pub interface: Option<String>,
    /// The sending or receiving socket's cgroup, relative to the cgroup2 mount.
    pub cgroup: Option<String>,
    /// Events this CPU held back (rate limit or full buffer) before this one.
    pub suppressed_before: u64,
}

impl DropRecord {
    /// "tcp 192.0.2.2:41872 -> 203.0.113.9:8080 dev up0 cgroup /app": the packet, for
    /// drop events and `trace` alike.
    pub fn packet(&self) -> String {
        let end = |addr: Option<IpAddr>, port: Option<u16>| match (addr, port) {
            (Some(IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
            (Some(a), Some(p)) => format!("{a}:{p}"),
            (Some(a), None) => a.to_string(),
            (None, _) => "?".to_string(),
        };
        let mut text = format!(
            "{} {} -> {} dev {}",
            self.protocol,
            end(self.source, self.source_port),
            end(self.destination, self.destination_port),
            self.interface
                .clone()
                .unwrap_or_else(|| format!("#{}", self.ifindex)),
        );
        if let Some(cgroup) = &self.cgroup {
            text.push_str(&format!(" cgroup {cgroup}"));
        }
        text
    }
}

impl std::fmt::Display for DropRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "drop {} {} {}",
            self.direction,
            self.reason,
            self.packet()
        )?;
        if self.suppressed_before > 0 {
            let n = self.suppressed_before;
            write!(
                f,
                " ({n} earlier event{} suppressed)",
                if n == 1 { "" } else { "s" }
            )?;
        }
        Ok(())
    }
}

/// Turns raw events into records: clock, interface names and cgroup paths, cached.
pub struct Resolver {
    cgroup_root: PathBuf,
    own_netns: u64,
    /// Wall-clock time minus the kernel's monotonic clock.
    clock_offset: Duration,
    cgroups: HashMap<u64, Option<String>>,
}

impl Resolver {
    pub fn new(cgroup_root: &Path) -> Result<Resolver> {
        let monotonic = clock_gettime(ClockId::CLOCK_MONOTONIC)
            .map_err(|e| Error::kernel("cannot read the monotonic clock", e))?;
        let monotonic = Duration::from(monotonic);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Resolver {
            cgroup_root: cgroup_root.to_path_buf(),
            own_netns: interfaces::netns_cookie()?,
            clock_offset: now.saturating_sub(monotonic),
            cgroups: HashMap::new(),
        })
    }

    pub fn record(&mut self, event: &DropEvent) -> DropRecord {
        let address = |bytes: [u8; 16]| match event.family {
            4 => Some(IpAddr::from([bytes[12], bytes[13], bytes[14], bytes[15]])),
            6 => Some(IpAddr::from(bytes)),
            _ => None,
        };
        let port = |p: u16| (event.ports_known != 0).then_some(p);
        let time =
            SystemTime::UNIX_EPOCH + self.clock_offset + Duration::from_nanos(event.timestamp_ns);
        DropRecord {
            time: humantime::format_rfc3339_millis(time).to_string(),
            direction: if event.direction == Direction::Ingress as u8 {
                Direction::Ingress.name()
            } else {
                Direction::Egress.name()
            },
            reason: Reason::from_value(u32::from(event.reason)).map_or("unknown", Reason::name),
            protocol: protocol_name(event.protocol, event.family),
            source: address(event.source),
            destination: address(event.destination),
            source_port: port(event.source_port),
            destination_port: port(event.destination_port),
            ifindex: event.ifindex,
            interface: (event.netns_cookie == self.own_netns)
                .then(|| interfaces::name_of(event.ifindex))
                .flatten(),
            cgroup: self.cgroup_path(event.cgroup_id),
            suppressed_before: event.suppressed,
        }
    }

    /// A cgroup's path from its id, asked of the kernel, remembered for the next events.
    fn cgroup_path(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(found) = self.cgroups.get(&id) {
            return found.clone();
        }
        // The handle needs CAP_DAC_READ_SEARCH; without it, a bounded walk of the tree.
        let found = cgroup_by_id(&self.cgroup_root, id)
            .or_else(|| find_inode(&self.cgroup_root, id, 0))
            .map(|path| {
                let relative = path.strip_prefix(&self.cgroup_root).unwrap_or(&path);
                format!("/{}", escaped(relative))
            });
        // Bounded: a flood from many short-lived cgroups must not grow the daemon.
        if self.cgroups.len() >= MAX_CACHED_CGROUPS {
            self.cgroups.clear();
        }
        self.cgroups.insert(id, found.clone());
        found
    }
}

/// Cgroup paths remembered by the event reader.
const MAX_CACHED_CGROUPS: usize = 4096;

/// The directory of the cgroup with this id, by the kernel's file handle for it (the id is the
/// handle of a cgroup2 directory): one lookup, no walk over the tree.
pub(crate) fn cgroup_by_id(root: &Path, id: u64) -> Option<PathBuf> {
    /// `struct file_handle` with the 8 bytes kernfs uses (FILEID_KERNFS).
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        id: u64,
    }
    const FILEID_KERNFS: i32 = 0xfe;
    let mount = std::fs::File::open(root).ok()?;
    let mut handle = Handle {
        bytes: 8,
        kind: FILEID_KERNFS,
        id,
    };
    // SAFETY: a valid mount fd and a handle of the size it declares.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            &mut handle as *mut Handle,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    let dir = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()
}

/// Depth-first search for the directory with inode `ino`, bounded in depth.
fn find_inode(dir: &Path, ino: u64, depth: u32) -> Option<PathBuf> {
    if std::fs::symlink_metadata(dir).ok()?.ino() == ino {
        return Some(dir.to_path_buf());
    }
    if depth >= 16 {
        return None;
    }
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find_inode(&e.path(), ino, depth + 1))
}

/// A path for logs and terminals: printable ASCII as is, every other byte as `\xNN`.
pub fn escaped(path: &Path) -> String {
    let mut out = String::new();
    for &byte in path.as_os_str().as_bytes() {
        if byte.is_ascii_graphic() && byte != b'\\' || byte == b' ' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

fn protocol_name(protocol: u8, family: u8) -> String {
    match protocol {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP if family == 4 => "icmp".into(),
        IPPROTO_ICMPV6 if family == 6 => "icmpv6".into(),
        255 if family == 6 => "ipv6-unknown".into(),
        other => format!("proto-{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_names_are_escaped_for_terminals() {
        use std::ffi::OsStr;
        let path = Path::new(OsStr::from_bytes(b"app\x1b[31m/a b\\c\xff"));
        assert_eq!(escaped(path), "app\\x1b[31m/a b\\x5cc\\xff");
    }
}
