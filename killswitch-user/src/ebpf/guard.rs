//! The uplink guard's programs and attachments (kernel side: `killswitch-ebpf/src/guard.rs`).
//!
//! The two tc programs are loaded on the scope's pinned maps and pinned themselves, so that the
//! daemon attaches them to an uplink that appears without loading anything. Each attachment is
//! a TCX link (Linux 6.6), pinned as `guard_<ifindex>_<direction>_link` and first in the
//! device's chain; older kernels get a clsact filter (direct action, priority 1), which the
//! kernel keeps on the device without a pin and `down` removes by the program's name.

use std::{
    collections::BTreeMap,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, Link},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
    EbpfLoader,
};
use killswitch_common::Direction;

use super::{sys, OBJECT};
use crate::error::{chain, Error, Result};

/// A device the guard watches: its name and the length of its link-layer header.
pub type Guarded = BTreeMap<u32, (String, u8)>;

/// The clsact filter's priority on kernels without TCX: first. Its handle is the scope's own
/// ([`filter_handle`]): cls_bpf runs every filter of one priority in turn while they say
/// "go on", so two scopes' guards both judge, as two TCX links do.
const FILTER_PRIORITY: u16 = 1;

/// A scope's clsact filter handle, from its pin directory: 1 to 0xffff.
fn filter_handle(pin_dir: &Path) -> TcHandle {
    let tag = crate::servers::name_tag(&pin_dir.to_string_lossy());
    TcHandle::new(0, 1 + (tag % 0xffff) as u16)
}

pub fn program_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Egress => "guard_egress",
        Direction::Ingress => "guard_ingress",
    }
}

fn attach_type(direction: Direction) -> TcAttachType {
    match direction {
        Direction::Egress => TcAttachType::Egress,
        Direction::Ingress => TcAttachType::Ingress,
    }
}

pub fn program_pin(pin_dir: &Path, direction: Direction) -> PathBuf {
    pin_dir.join(format!("guard_{}_prog", direction.name()))
}

pub fn link_pin(pin_dir: &Path, ifindex: u32, direction: Direction) -> PathBuf {
    pin_dir.join(format!("guard_{ifindex}_{}_link", direction.name()))
}

/// Whether guards are TCX links here (pinned; Linux 6.6) rather than clsact filters.
pub fn uses_links() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Whether the guard's programs are pinned in `pin_dir`.
pub fn loaded(pin_dir: &Path) -> bool {
    Direction::ALL
        .iter()
        .all(|&d| program_pin(pin_dir, d).exists())
}

/// Loads both guard programs on the maps pinned in `map_dir` and pins them in `pin_dir`,
/// replacing what was pinned there (attachments keep the old ones until [`attach`]).
pub fn load(map_dir: &Path, pin_dir: &Path) -> Result<()> {
    let _signals = super::SignalsHeld::new();
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(map_dir);
    loader.override_global("AYA_LOG_LEVEL", &super::LOG_OFF, true);
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|e| Error::kernel("the kernel refused the killswitch maps", chain(&e)))?;
    for direction in Direction::ALL {
        let name = program_name(direction);
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| Error::kernel("broken eBPF object", "a guard program is missing"))?;
        super::load_with_retries(name, || program.load())?;
        let pin = program_pin(pin_dir, direction);
        let new = pin_dir.join(format!("guard_{}_prog_new", direction.name()));
        super::remove_if_present(&new)?;
        program
            .pin(&new)
            .map_err(|e| Error::kernel("cannot pin the guard program", chain(&e)))?;
        std::fs::rename(&new, &pin)
            .map_err(|e| Error::io("cannot replace the pinned guard program", &pin, e))?;
    }
    Ok(())
}

/// Runs the pinned guard programs on exactly the `guarded` devices: new devices get one,
/// devices that have one run the pinned programs from now (swapped in one step), and devices no
/// longer guarded lose theirs. Every device is tried; the first failure is returned.
pub fn attach(pin_dir: &Path, guarded: &Guarded) -> Result<()> {
    attach_devices(pin_dir, guarded, true)
}

/// Runs the pinned guard programs on the `guarded` devices too, taking no guard away.
pub fn attach_also(pin_dir: &Path, guarded: &Guarded) -> Result<()> {
    attach_devices(pin_dir, guarded, false)
}

fn attach_devices(pin_dir: &Path, guarded: &Guarded, exactly: bool) -> Result<()> {
    let tcx = uses_links();
    let mut failed = None;
    for direction in Direction::ALL {
        let mut program = if guarded.is_empty() {
            None
        } else {
            let pin = program_pin(pin_dir, direction);
            Some(SchedClassifier::from_pin(&pin).map_err(|e| {
                Error::kernel(
                    format!("cannot open the guard program {}", pin.display()),
                    chain(&e),
                )
            })?)
        };
        for (&ifindex, (name, _)) in guarded {
            let program = program.as_mut().expect("guarded is not empty");
            let attached = if tcx {
                attach_link(program, pin_dir, ifindex, name, direction)
            } else {
                attach_filter(program, filter_handle(pin_dir), name, direction)
            };
            if let Err(e) = attached {
                failed.get_or_insert(e);
            }
        }
        if exactly {
            detach_others(pin_dir, guarded, direction, !tcx)?;
        }
    }
    failed.map_or(Ok(()), Err)
}

/// The TCX way: the pinned link gets the program, or a new link is made and pinned.
fn attach_link(
    program: &mut SchedClassifier,
    pin_dir: &Path,
    ifindex: u32,
    name: &str,
    direction: Direction,
) -> Result<()> {
    let failed = |e: &dyn std::fmt::Display| {
        Error::kernel(
            format!("cannot attach the uplink guard to {name}"),
            e.to_string(),
        )
    };
    let pin = link_pin(pin_dir, ifindex, direction);
    let fd = program.fd().map_err(|e| failed(&chain(&e)))?;
    if let Ok(link) = sys::obj_get(&pin) {
        // A link whose device went away is left with ifindex 0: it is made again.
        if sys::tcx_link_ifindex(&link).ok() == Some(ifindex) {
            return sys::link_update_program(link.as_fd(), fd.as_fd()).map_err(|e| failed(&e));
        }
        let _ = sys::link_detach(&link);
    }
    let id = program
        .attach_with_options(
            name,
            attach_type(direction),
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .map_err(|e| failed(&chain(&e)))?;
    let link: FdLink = program
        .take_link(id)
        .map_err(|e| failed(&chain(&e)))?
        .try_into()
        .map_err(|e| failed(&chain(&e)))?;
    let new = pin.with_file_name(format!("guard_{ifindex}_{}_link_new", direction.name()));
    super::remove_if_present(&new)?;
    link.pin(&new).map_err(|e| failed(&chain(&e)))?;
    std::fs::rename(&new, &pin).map_err(|e| Error::io("cannot pin the guard link", &pin, e))?;
    // The name was looked up again by the attach: a device renamed meanwhile is not guarded
    // by mistake for another (the daemon attaches again on the next link event).
    if let Ok(link) = sys::obj_get(&pin) {
        if sys::tcx_link_ifindex(&link).ok() != Some(ifindex) {
            let _ = sys::link_detach(&link);
            super::remove_if_present(&pin)?;
            return Err(failed(&"the device changed while it was attached"));
        }
    }
    Ok(())
}

/// The clsact way (before Linux 6.6): a filter of fixed priority and handle, replaced in place.
fn attach_filter(
    program: &mut SchedClassifier,
    handle: TcHandle,
    name: &str,
    direction: Direction,
) -> Result<()> {
    let failed = |e: String| Error::kernel(format!("cannot attach the uplink guard to {name}"), e);
    if let Err(e) = tc::qdisc_add_clsact(name) {
        // It is there already (ours, or someone's): fine.
        tracing::debug!("clsact on {name}: {e}");
    }
    let options = || NlOptions {
        priority: FILTER_PRIORITY,
        handle,
        classid: None,
    };
    let attached = program.attach_with_options(
        name,
        attach_type(direction),
        TcAttachOptions::Netlink(options()),
    );
    let exists = |e: &ProgramError| {
        matches!(e, ProgramError::TcError(tc::TcError::NetlinkError(e))
            if e.raw_os_error() == Some(libc::EEXIST))
    };
    let id = match attached {
        Ok(id) => id,
        Err(e) if !exists(&e) => return Err(failed(chain(&e))),
        Err(_) => {
            // This scope's filter is there (its own handle): replace its program.
            let existing = SchedClassifierLink::attached(
                name,
                attach_type(direction),
                FILTER_PRIORITY,
                handle,
                None,
            )
            .map_err(|e| failed(e.to_string()))?;
            program
                .attach_to_link(existing)
                .map_err(|e: ProgramError| failed(chain(&e)))?
        }
    };
    // The filter stays on the device when this process ends.
    let link = program.take_link(id).map_err(|e| failed(chain(&e)))?;
    std::mem::forget(link);
    Ok(())
}

/// Removes the guard from every device of this namespace not in `guarded`.
fn detach_others(
    pin_dir: &Path,
    guarded: &Guarded,
    direction: Direction,
    filters: bool,
) -> Result<()> {
    let suffix = format!("_{}_link", direction.name());
    if let Ok(entries) = std::fs::read_dir(pin_dir) {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(ifindex) = file
                .strip_prefix("guard_")
                .and_then(|rest| rest.strip_suffix(&suffix))
                .and_then(|index| index.parse::<u32>().ok())
            else {
                continue;
            };
            if guarded.contains_key(&ifindex) {
                continue;
            }
            if let Ok(link) = sys::obj_get(&entry.path()) {
                sys::link_detach(&link)
                    .map_err(|e| Error::kernel("cannot detach the uplink guard", e))?;
            }
            super::remove_if_present(&entry.path())?;
        }
    }
    if filters {
        for interface in crate::interfaces::list()? {
            if guarded.contains_key(&interface.index) {
                continue;
            }
            // This scope's filter only (its priority): no error when there is none.
            if let Ok(filter) = SchedClassifierLink::attached(
                &interface.name,
                attach_type(direction),
                FILTER_PRIORITY,
                filter_handle(pin_dir),
                None,
            ) {
                let _ = filter.detach();
            }
        }
    }
    Ok(())
}

/// Removes every guard of the scope and its pinned programs (`down`).
pub fn remove(pin_dir: &Path) -> Result<()> {
    let none = Guarded::new();
    // A filter is attached only once both programs are pinned (and unpinned only here).
    let pinned = Direction::ALL
        .iter()
        .any(|&d| program_pin(pin_dir, d).exists());
    let filters = pinned && !uses_links();
    // Every attachment first: while one is left, the programs stay pinned, so `loaded` still
    // says a guard is there and a later `remove` is tried.
    for direction in Direction::ALL {
        detach_others(pin_dir, &none, direction, filters)?;
    }
    for direction in Direction::ALL {
        super::remove_if_present(&program_pin(pin_dir, direction))?;
    }
    Ok(())
}
