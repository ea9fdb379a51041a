//! Re-`up` without loading the programs again. Loading (the verifier's work) is most of an
//! `up`; when the programs attached to a scope are the ones this build would attach now, only
//! the maps need writing. A record in the state directory (root's alone) says which programs
//! an `up` of which build attached, in which boot; it is trusted only while the scope's pinned
//! links still hold exactly those programs on the scope's cgroup, so anything that replaced or
//! detached them (a lockdown, a `down`, another version, bpftool) makes the next `up` load
//! afresh, and so does an ICMP-error slot that no longer holds the recorded program, a program
//! that reads maps other than the pinned ones, or a pinned object someone else could change.

use std::path::{Path, PathBuf};

use killswitch_common::Direction;

use aya::{maps::MapInfo, programs::loaded_programs};

use super::{kernel::NetnsSource, link_pin, maps, pins, shapes, sys, Pair};
use crate::scope::Scope;

/// What an `up` attached: this build and pair, in this boot, as these programs on this cgroup.
#[derive(Debug, PartialEq, Eq)]
struct Record {
    build: u64,
    boot: String,
    cgroup_id: u64,
    programs: [u32; 2],
    /// The ICMP-error slot the pair tail-calls, and the program id in it.
    icmp: [u32; 2],
}

impl Record {
    fn parse(text: &str) -> Option<Record> {
        let mut fields = text.split_whitespace();
        let record = Record {
            build: u64::from_str_radix(fields.next()?, 16).ok()?,
            boot: fields.next()?.to_owned(),
            cgroup_id: fields.next()?.parse().ok()?,
            programs: [fields.next()?.parse().ok()?, fields.next()?.parse().ok()?],
            icmp: [fields.next()?.parse().ok()?, fields.next()?.parse().ok()?],
        };
        fields.next().is_none().then_some(record)
    }

    fn text(&self) -> String {
        format!(
            "{:016x} {} {} {} {} {} {}\n",
            self.build,
            self.boot,
            self.cgroup_id,
            self.programs[0],
            self.programs[1],
            self.icmp[0],
            self.icmp[1]
        )
    }
}

fn path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    crate::state::dir().join(format!("ebpf-{name}.loaded"))
}

/// This build (its object and its version) and the kind of policy pair it loaded, as one
/// number (FNV-1a). The pair's socket offsets are left out: they follow from the kernel, the same
/// for the whole boot; `None` for the lockdown pair, which is never reused.
fn build(pair: Pair) -> Option<u64> {
    let kind: &[u8] = match pair {
        Pair::Policy(NetnsSource::Helper) => b"helper",
        Pair::Policy(NetnsSource::Socket { .. }) => b"socket",
        Pair::Lockdown => return None,
    };
    let version = env!("CARGO_PKG_VERSION").as_bytes();
    // The object's part was hashed when it was built.
    Some(fnv(fnv(object_fnv::OBJECT_FNV, version), kind))
}

/// FNV-1a (64 bits) of `bytes`, continuing from `hash` (build.rs starts the object's).
fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

mod object_fnv {
    include!(concat!(env!("OUT_DIR"), "/object_fnv.rs"));
}

/// [`build`] of either policy pair: in one boot, this build always chooses the same one.
fn ours(build_id: u64) -> bool {
    [
        Pair::Policy(NetnsSource::Helper),
        Pair::Policy(NetnsSource::Socket {
            sock_net_offset: 0,
            net_cookie_offset: 0,
        }),
    ]
    .into_iter()
    .any(|pair| build(pair) == Some(build_id))
}

fn boot() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|b| b.trim().to_owned())
}

/// The programs the scope's pinned links hold now, on its cgroup.
fn current(scope: &Scope, pin_dir: &Path) -> Option<(u64, [u32; 2])> {
    let cgroup_id = scope.cgroup_id().ok()?;
    let mut programs = [0; 2];
    for (slot, direction) in Direction::ALL.into_iter().enumerate() {
        let link = sys::obj_get(&link_pin(pin_dir, direction)).ok()?;
        let info = sys::cgroup_link_info(&link).ok()?;
        if info.cgroup_id != cgroup_id {
            return None;
        }
        programs[slot] = info.program_id;
    }
    Some((cgroup_id, programs))
}

/// The program id in `slot` of the scope's pinned `ICMP_ERRORS`.
fn icmp_slot(pin_dir: &Path, slot: u32) -> Option<u32> {
    let map = sys::obj_get(&pin_dir.join(maps::ICMP_ERRORS)).ok()?;
    sys::program_in_slot(std::os::fd::AsFd::as_fd(&map), slot).ok()
}

/// Whether every map of ours that program `id` reads is the one pinned in `pin_dir`.
fn reads_pinned_maps(id: u32, pin_dir: &Path) -> bool {
    let Some(program) = loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == id)
    else {
        return false;
    };
    let Ok(Some(ids)) = program.map_ids() else {
        return false;
    };
    ids.into_iter().all(|map| {
        let Ok(info) = MapInfo::from_id(map) else {
            return false;
        };
        match info.name_as_str().filter(|n| maps::ALL.contains(n)) {
            Some(name) => MapInfo::from_pin(pin_dir.join(name)).is_ok_and(|p| p.id() == map),
            // Global data, made with the program.
            None => true,
        }
    })
}

/// Whether the programs attached to the scope are this build's policy programs, as an `up` in
/// this boot recorded, reading the pinned maps (of the shapes this build expects, each one
/// root's alone) with the recorded ICMP-error program in their slot: then writing the maps is
/// the whole update. Call under the scope's lock.
pub fn attached_are_ours(scope: &Scope, pin_dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path(pin_dir)) else {
        return false;
    };
    let (Some(record), Some(boot), Some((cgroup_id, programs))) =
        (Record::parse(&text), boot(), current(scope, pin_dir))
    else {
        return false;
    };
    let fresh_maps = shapes::stale(pin_dir).is_ok_and(|stale| stale.is_empty());
    let root_only = pins::check_pinned(pin_dir).is_ok()
        && std::fs::read_dir(pin_dir).is_ok_and(|entries| {
            entries
                .flatten()
                .all(|e| pins::check_pinned(&e.path()).is_ok())
        });
    ours(record.build)
        && record.boot == boot
        && record.cgroup_id == cgroup_id
        && record.programs == programs
        && icmp_slot(pin_dir, record.icmp[0]) == Some(record.icmp[1])
        && fresh_maps
        && root_only
        && programs.iter().all(|&id| reads_pinned_maps(id, pin_dir))
}

/// Records what the scope's pinned links hold after this build attached `pair` (a failure to
/// record only costs the next `up` a load).
pub fn record(scope: &Scope, pin_dir: &Path, pair: Pair) {
    let slot = pair.icmp_error_program().map(|(_, slot)| slot);
    let icmp = slot.and_then(|slot| Some([slot, icmp_slot(pin_dir, slot)?]));
    let (Some(build), Some(boot), Some((cgroup_id, programs)), Some(icmp)) =
        (build(pair), boot(), current(scope, pin_dir), icmp)
    else {
        forget(pin_dir);
        return;
    };
    let record = Record {
        build,
        boot,
        cgroup_id,
        programs,
        icmp,
    };
    let path = path(pin_dir);
    if crate::state::make_dir(&crate::state::dir()).is_err()
        || std::fs::write(&path, record.text()).is_err()
    {
        forget(pin_dir);
    }
}

/// Drops the record: the next `up` loads the programs.
pub fn forget(pin_dir: &Path) {
    let _ = std::fs::remove_file(path(pin_dir));
}

#[cfg(test)]
mod tests {
    use super::Record;

    #[test]
    fn the_object_hash_made_at_build_time_is_the_embedded_objects() {
        let hash = super::fnv(0xcbf2_9ce4_8422_2325, super::super::OBJECT);
        assert_eq!(hash, super::object_fnv::OBJECT_FNV);
    }

    #[test]
    fn a_record_reads_back_and_nothing_else_parses() {
        let record = Record {
            build: 0xdead_beef,
            boot: "4e1c-boot".into(),
            cgroup_id: 42,
            programs: [7, 8],
            icmp: [0, 9],
        };
        assert_eq!(Record::parse(&record.text()), Some(record));
        assert_eq!(Record::parse("00000000deadbeef 4e1c-boot 42 7 8"), None);
        assert_eq!(
            Record::parse("00000000deadbeef 4e1c-boot 42 7 8 0 9 1"),
            None
        );
        assert_eq!(Record::parse(""), None);
    }
}
