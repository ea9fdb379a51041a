//! The kernel side of `killswitch trace`: the scope's programs are swapped, one link at a time
//! and without a gap, for a copy loaded with aya-log's level at info, and swapped back when
//! tracing ends. Both copies read the same pinned maps, so they enforce the same policy; only
//! the copy in force while tracing pays for its records.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
};

use killswitch_common::Direction;

use super::{
    chain, kernel, link_pin, maps, pins, program_names, reuse, shapes, sys, NetnsSource, Pair,
    Programs,
};
use crate::{
    error::{Error, Result},
    scope::Scope,
};

/// A scope whose links run the traced copy until [`Tracing::stop`] (or drop).
pub struct Tracing {
    traced: Programs,
    pin_dir: PathBuf,
    scope: Scope,
    /// The programs the links ran before, by direction, to put back.
    originals: Vec<(Direction, OwnedFd)>,
    /// The ICMP-error slot and the program it held before.
    icmp: Option<(u32, OwnedFd)>,
}

impl Tracing {
    pub fn start(scope: &Scope) -> Result<Tracing> {
        let not_enforced = || {
            Error::Runtime(format!(
                "{} is not enforced by eBPF; run `killswitch up`",
                scope.display_cgroup()
            ))
        };
        let _lock = pins::ScopeLock::existing(scope)?.ok_or_else(not_enforced)?;
        let pin_dir = pins::pin_dir(scope);
        shapes::check_not_staging(&pin_dir)?;
        // Only a copy of exactly what runs, on exactly its maps: the programs an `up` of this
        // build recorded, reading the pinned maps (not a lockdown, another version's programs,
        // an unfinished upgrade, or another trace's copy).
        if !shapes::stale(&pin_dir)?.is_empty() || !reuse::attached_are_ours(scope, &pin_dir) {
            return Err(Error::Runtime(format!(
                "{} does not run the programs this version's `killswitch up` attached (lockdown, \
                 another version, an unfinished upgrade, or another trace); run `killswitch up` \
                 first",
                scope.display_cgroup()
            )));
        }
        let names = program_names();
        let mut originals = Vec::new();
        let mut attached = Vec::new();
        for direction in Direction::ALL {
            let link = sys::obj_get(&link_pin(&pin_dir, direction)).map_err(|_| not_enforced())?;
            let info = sys::cgroup_link_info(&link)
                .map_err(|e| Error::kernel("cannot read the scope's link", e))?;
            let name = names.get(&info.program_id).cloned().unwrap_or_default();
            let program = sys::program_by_id(info.program_id)
                .map_err(|e| Error::kernel("cannot open the scope's program", e))?;
            attached.push(name);
            originals.push((direction, program));
        }
        let pair = pair_of(&attached)?;
        let icmp = match pair.icmp_error_program() {
            Some((_, slot)) => Some((slot, program_in_icmp_slot(&pin_dir, slot)?)),
            None => None,
        };
        // Also puts the traced ICMP-error program in its slot (same policy, same maps).
        let traced = Programs::load_traced(&pin_dir, pair)?;
        let tracing = Tracing {
            traced,
            pin_dir,
            scope: scope.clone(),
            originals,
            icmp,
        };
        for (direction, original) in &tracing.originals {
            let link = sys::obj_get(&link_pin(&tracing.pin_dir, *direction))
                .map_err(|e| Error::kernel("cannot open the scope's link", e))?;
            let new = tracing.traced_fd(*direction)?;
            sys::link_replace_program(link.as_fd(), new.as_fd(), original.as_fd())
                .map_err(|e| Error::kernel("cannot swap in the traced programs", e))?;
        }
        Ok(tracing)
    }

    /// Starts reading the traced copy's aya-log records into `logger`.
    pub fn logger<L: log::Log>(&mut self, logger: L) -> Result<aya_log::EbpfLogger<L>> {
        self.traced.log_reader(logger)
    }

    /// Whether both links still run the traced copy (an `up` that loaded new programs, or a
    /// `down`, ends tracing).
    pub fn still_attached(&self) -> bool {
        Direction::ALL.iter().all(|&direction| {
            let running = sys::obj_get(&link_pin(&self.pin_dir, direction))
                .and_then(|link| sys::cgroup_link_info(&link));
            let traced = self.traced.program(direction).info().map(|i| i.id());
            matches!((running, traced), (Ok(r), Ok(t)) if r.program_id == t && r.cgroup_id != 0)
        })
    }

    /// Puts the programs that ran before back where the traced copy still runs.
    pub fn stop(mut self) -> Result<()> {
        self.restore()
    }

    fn restore(&mut self) -> Result<()> {
        let Some(_lock) = pins::ScopeLock::existing(&self.scope)? else {
            return Ok(());
        };
        let mut failed = None;
        for (direction, original) in std::mem::take(&mut self.originals) {
            let Ok(link) = sys::obj_get(&link_pin(&self.pin_dir, direction)) else {
                continue;
            };
            let traced = match self.traced_fd(direction) {
                Ok(traced) => traced,
                Err(e) => {
                    failed = Some(e);
                    continue;
                }
            };
            match sys::link_replace_program(link.as_fd(), original.as_fd(), traced.as_fd()) {
                Ok(()) => {}
                // EPERM: the link no longer runs the traced copy (an `up` loaded new programs).
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                Err(e) => failed = Some(Error::kernel("cannot swap the programs back", e)),
            }
        }
        if let Some((slot, original)) = self.icmp.take() {
            let traced = self
                .traced
                .icmp_error_program()
                .and_then(|p| p.info().ok())
                .map(|i| i.id());
            let restored = sys::obj_get(&self.pin_dir.join(maps::ICMP_ERRORS)).and_then(|slots| {
                // Only where the traced copy still is: an `up` since then filled it anew.
                match sys::program_in_slot(slots.as_fd(), slot).ok() == traced {
                    true => sys::set_program_in_slot(slots.as_fd(), slot, original.as_fd()),
                    false => Ok(()),
                }
            });
            if let Err(e) = restored {
                failed = Some(Error::kernel("cannot put the ICMP-error program back", e));
            }
        }
        failed.map_or(Ok(()), Err)
    }

    fn traced_fd(&self, direction: Direction) -> Result<OwnedFd> {
        self.traced
            .program(direction)
            .fd()
            .map_err(|e| Error::kernel("the traced program has no fd", chain(&e)))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::kernel("cannot duplicate a program fd", e))
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            tracing::warn!("{e}; `killswitch up` loads the untraced programs again");
        }
    }
}

/// The policy pair the scope runs, from its programs' names (both directions must agree; a
/// scope in lockdown never gets this far: `up` records no lockdown pair).
fn pair_of(names: &[String]) -> Result<Pair> {
    let pair = match names {
        [egress, ingress] if egress == "egress" && ingress == "ingress" => {
            Pair::Policy(NetnsSource::Helper)
        }
        [egress, ingress] if egress == "egress_sock" && ingress == "ingress_sock" => {
            match kernel::netns_source() {
                Ok(socket @ NetnsSource::Socket { .. }) => Pair::Policy(socket),
                _ => {
                    return Err(Error::Runtime(
                        "the kernel no longer offers what the scope's programs need".into(),
                    ))
                }
            }
        }
        _ => {
            return Err(Error::Runtime(format!(
                "the scope runs programs killswitch does not know ({}); run `killswitch up`",
                names.join(", ")
            )))
        }
    };
    Ok(pair)
}

fn program_in_icmp_slot(pin_dir: &std::path::Path, slot: u32) -> Result<OwnedFd> {
    let slots = sys::obj_get(&pin_dir.join(maps::ICMP_ERRORS))
        .map_err(|e| Error::kernel("cannot open the ICMP-error slots", e))?;
    let id = sys::program_in_slot(slots.as_fd(), slot)
        .map_err(|e| Error::kernel("cannot read the ICMP-error slot", e))?;
    sys::program_by_id(id).map_err(|e| Error::kernel("cannot open the ICMP-error program", e))
}
