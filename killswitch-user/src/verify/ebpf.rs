//! The eBPF backend's kernel state, asked of the kernel: which programs are attached to the
//! scope's cgroup, whether they are the ones this build makes (tags) reading the scope's pinned
//! maps, whether the maps hold what the policy plans now, and how a copy of those programs with
//! the same map contents decides generated packets.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::fd::AsFd,
    path::Path,
};

use aya::{
    maps::MapInfo,
    programs::{loaded_programs, ProgramInfo, TestRun},
};
use killswitch_common::{Direction, InterfaceKey, Reason};

use super::{count, decisions, scratch, servers_check, with_servers, Check, State};
use crate::{
    ebpf::{
        entries::{key_address, lan_prefix, server_endpoint},
        kernel::{socket_offsets, NetnsSource},
        maps, pins, sys, MapEntries, Pair, PinnedMaps, Programs,
    },
    error::{Error, Result},
    interfaces,
    model::{Interface, Packet},
    policy::Policy,
    scope::Scope,
    vpn_client::ClientCgroup,
};

/// The programs of ours attached to the scope, one per direction.
struct Attached {
    egress: ProgramInfo,
    ingress: ProgramInfo,
}

pub(super) fn checks(scope: &Scope, policy: &Policy, answers: &super::Answers) -> Result<State> {
    let pin_dir = pins::pin_dir(scope);
    // The copy is loaded before the lock (the verifier's work must not hold up a daemon
    // following a reconnect), for the pair attached now; again below if that changed.
    let pair_now = || -> Option<Result<Pair>> {
        let (_, attached) = attached(scope).ok()?;
        Some(pair_of(attached?.egress.name_as_str().unwrap_or_default()))
    };
    let mut preloaded = pair_now().map(|pair| pair.and_then(Copy::load));
    // The kernel's state is read under the scope's lock, so that an update in progress (`up`,
    // the daemon) is not caught half done; the packets then run on that snapshot without it.
    let lock = pins::ScopeLock::existing(scope)?;
    let mut checks = Vec::new();
    let attached = match attached(scope) {
        Ok(attached) => {
            checks.push(attached.0);
            attached.1
        }
        Err(check) => {
            checks.push(check);
            None
        }
    };
    let Some(attached) = attached else {
        return Ok(State::not_enforced(
            checks,
            Check::skip("decisions", "no policy programs are attached to compare"),
            policy,
        ));
    };
    checks.push(pinned_check(scope, &attached));
    // Failing to load the copy or to read the maps is a FAIL line, not an abort: the report
    // still says what was seen.
    let copy =
        pair_of(attached.egress.name_as_str().unwrap_or_default()).and_then(|pair| match preloaded
            .take()
        {
            Some(Ok(copy)) if copy.pair == pair => Ok(copy),
            _ => Copy::load(pair),
        });
    let copy = match copy {
        Ok(copy) => copy,
        Err(e) => {
            checks.push(Check::fail(
                "programs",
                format!("this build's programs could not be loaded to compare: {e}"),
                "run `killswitch verify -v` for the kernel's reason",
            ));
            return Ok(State::not_enforced(
                checks,
                Check::skip("decisions", "nothing to run the packets through"),
                policy,
            ));
        }
    };
    checks.push(programs_check(&attached, &copy, &pin_dir));
    let live = match PinnedMaps::open(&pin_dir).and_then(|maps| maps.entries()) {
        Ok(live) => live,
        Err(e) => {
            checks.push(Check::fail(
                "lists",
                format!(
                    "the maps pinned in {} cannot be read: {e}",
                    pin_dir.display()
                ),
                "run `killswitch up` to pin them again",
            ));
            return Ok(State::not_enforced(
                checks,
                Check::skip("decisions", "the scope's map contents are unknown"),
                policy,
            ));
        }
    };
    checks.extend(maps_checks(policy, &live, answers));
    checks.push(guard_check(policy, &live, &pin_dir));
    let held_servers: Vec<_> = live.servers.iter().map(server_endpoint).collect();
    let judged_by = with_servers(policy, &held_servers);
    let snapshot = Snapshot {
        attached: attached_ids(scope),
        entries: live,
    };
    drop(lock);
    let decisions = copy.decide(&snapshot.entries, &judged_by);
    let enforced = checks
        .iter()
        .take(3)
        .all(|c| c.result == super::Outcome::Pass);
    Ok(State {
        enforced,
        checks,
        decisions,
        policy: judged_by,
        unchanged: Box::new(move |scope| snapshot.holds(scope)),
    })
}

/// What the checks saw of the scope: the probes go out only while it is still so.
struct Snapshot {
    /// Every program attached to the scope's cgroup (ours and others), per direction.
    attached: Option<[Vec<u32>; 2]>,
    entries: MapEntries,
}

impl Snapshot {
    /// The scope's lock, when the scope is still as the checks saw it (`None`: it changed).
    fn holds(&self, scope: &Scope) -> Result<Option<super::Held>> {
        let Some(lock) = pins::ScopeLock::existing(scope)? else {
            return Ok(None);
        };
        let same = self.attached.is_some()
            && attached_ids(scope) == self.attached
            && PinnedMaps::open(&pins::pin_dir(scope))
                .and_then(|maps| maps.entries())
                .is_ok_and(|now| now == self.entries);
        Ok(same.then(|| super::Held::new(lock)))
    }
}

/// The ids of every program attached to the scope's cgroup, egress then ingress.
fn attached_ids(scope: &Scope) -> Option<[Vec<u32>; 2]> {
    let cgroup = File::open(&scope.cgroup).ok()?;
    let query = |attach_type| sys::attached_programs(cgroup.as_fd(), attach_type).ok();
    Some([query(1)?, query(0)?])
}

/// `attached`: the programs the kernel has on the scope's cgroup, ours among them. `Ok` with
/// `None` when ours are not both there in policy mode.
fn attached(scope: &Scope) -> std::result::Result<(Check, Option<Attached>), Check> {
    const CHECK: &str = "attached";
    let cgroup = File::open(&scope.cgroup).map_err(|e| {
        Check::fail(
            CHECK,
            format!("cannot open {}: {e}", scope.cgroup.display()),
            "check --cgroup",
        )
    })?;
    let programs: BTreeMap<u32, ProgramInfo> = loaded_programs()
        .filter_map(|info| info.ok())
        .map(|info| (info.id(), info))
        .collect();
    let mut found = Vec::new();
    let mut seen = Vec::new();
    let mut stacked = Vec::new();
    for (direction, attach_type) in [(Direction::Egress, 1), (Direction::Ingress, 0)] {
        let ids = sys::attached_programs(cgroup.as_fd(), attach_type).map_err(|e| {
            Check::fail(
                CHECK,
                format!("the kernel would not say what is attached: {e}"),
                "run as root",
            )
        })?;
        let ours: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| {
                programs
                    .get(id)
                    .and_then(|p| p.name_as_str())
                    .is_some_and(|name| is_ours(name, direction))
            })
            .collect();
        let others = ids.len() - ours.len();
        let names: Vec<String> = ours
            .iter()
            .map(|id| {
                let name = programs[id].name_as_str().unwrap_or("?");
                format!("{name} (id {id})")
            })
            .collect();
        seen.push(format!(
            "{}: {}{}",
            direction.name(),
            if names.is_empty() {
                "none of ours".to_owned()
            } else {
                names.join(", ")
            },
            if others > 0 {
                format!(" + {} of others", count(others, "program"))
            } else {
                String::new()
            }
        ));
        if ours.len() > 1 {
            stacked.push(direction.name());
        }
        found.push(ours.last().and_then(|id| programs.get(id)));
    }
    let evidence = format!(
        "{} on cgroup id {}, as the kernel reports it",
        seen.join("; "),
        scope.cgroup_id().unwrap_or(0)
    );
    let (Some(egress), Some(ingress)) = (found[0], found[1]) else {
        return Ok((
            Check::fail(
                CHECK,
                evidence,
                "run `killswitch up` (something detached the programs)",
            ),
            None,
        ));
    };
    if !stacked.is_empty() {
        // Each runs and the stricter wins, so nothing leaks, but one is not the planned policy.
        return Ok((
            Check::fail(
                CHECK,
                format!("{evidence}: more than one of ours on {}", stacked.join(" and ")),
                format!(
                    "`bpftool cgroup show {}` lists them; detach the one not held by a link pinned in {}",
                    scope.cgroup.display(),
                    pins::pin_dir(scope).display()
                ),
            ),
            None,
        ));
    }
    let locked = [egress, ingress]
        .iter()
        .any(|p| p.name_as_str().is_some_and(|n| n.ends_with("_locked")));
    if locked {
        let why = maps::lockdown_reason(&pins::pin_dir(scope)).unwrap_or_default();
        return Ok((
            Check::fail(
                CHECK,
                format!("{evidence}: in lockdown (loopback and DHCP only): {why}"),
                "fix what the lockdown reason says, then run `killswitch up`",
            ),
            None,
        ));
    }
    let reopen = |p: &ProgramInfo| {
        loaded_programs()
            .filter_map(|info| info.ok())
            .find(|info| info.id() == p.id())
    };
    match (reopen(egress), reopen(ingress)) {
        (Some(egress), Some(ingress)) => Ok((
            Check::pass(CHECK, evidence),
            Some(Attached { egress, ingress }),
        )),
        _ => Err(Check::fail(
            CHECK,
            "the attached programs went away while being read",
            "run `killswitch verify` again",
        )),
    }
}

/// `pinned`: the attached programs are held by the links pinned for the scope, so they outlive
/// every process (a link held only by an open descriptor goes with its process).
fn pinned_check(scope: &Scope, attached: &Attached) -> Check {
    let pin_dir = pins::pin_dir(scope);
    let cgroup_id = scope.cgroup_id().unwrap_or(0);
    let mut problems = Vec::new();
    for (direction, program) in [
        (Direction::Egress, &attached.egress),
        (Direction::Ingress, &attached.ingress),
    ] {
        let pin = crate::ebpf::link_pin(&pin_dir, direction);
        match sys::obj_get(&pin).and_then(|link| sys::cgroup_link_info(&link)) {
            Ok(info) if info.program_id == program.id() && info.cgroup_id == cgroup_id => {}
            Ok(info) => problems.push(format!(
                "the {} link pinned at {} holds program {} on cgroup id {}, not the attached program {}",
                direction.name(),
                pin.display(),
                info.program_id,
                info.cgroup_id,
                program.id()
            )),
            Err(e) => problems.push(format!("no {} link pinned at {}: {e}", direction.name(), pin.display())),
        }
    }
    Check::from_problems(
        "pinned",
        format!(
            "both links pinned in {}: enforcement outlives every process",
            pin_dir.display()
        ),
        problems,
        "run `killswitch up` to attach and pin the programs again",
    )
}

fn is_ours(name: &str, direction: Direction) -> bool {
    [
        Pair::Policy(NetnsSource::Helper),
        Pair::Lockdown,
        Pair::Policy(NetnsSource::Socket {
            sock_net_offset: 0,
            net_cookie_offset: 0,
        }),
    ]
    .iter()
    .any(|pair| pair.program_name(direction) == name)
}

/// The pair an attached egress program belongs to (the socket pair needs this kernel's offsets).
fn pair_of(egress: &str) -> Result<Pair> {
    if egress == Pair::Policy(NetnsSource::Helper).program_name(Direction::Egress) {
        return Ok(Pair::Policy(NetnsSource::Helper));
    }
    socket_offsets(Path::new("/sys/kernel/btf/vmlinux"))
        .map(Pair::Policy)
        .map_err(|e| Error::kernel("cannot read this kernel's BTF", e))
}

/// `programs`: the attached programs are this build's (same instructions: the kernel's tag
/// leaves map addresses out), the ICMP-error program they call is too, and they read the maps
/// pinned for the scope (the ones checked next), not some others.
fn programs_check(attached: &Attached, copy: &Copy, pin_dir: &Path) -> Check {
    const CHECK: &str = "programs";
    let mut problems = Vec::new();
    let mut tags = Vec::new();
    for (direction, live) in [
        (Direction::Egress, &attached.egress),
        (Direction::Ingress, &attached.ingress),
    ] {
        let built = match copy.programs.program(direction).info() {
            Ok(built) => built,
            Err(e) => {
                problems.push(format!("cannot read this build's program: {e}"));
                continue;
            }
        };
        if built.tag() == live.tag() {
            tags.push(format!("{} {:016x}", direction.name(), live.tag()))
        } else {
            problems.push(format!(
                "the attached {} program has tag {:016x}, this build's {:016x}",
                direction.name(),
                live.tag(),
                built.tag()
            ));
        }
        problems.extend(maps_read(live, &built, pin_dir));
    }
    // The ICMP-error program the attached pair tail-calls: the same instructions, maps and data.
    let slot = copy.pair.icmp_error_program().map(|(_, slot)| slot);
    if let (Some(slot), Some(built)) = (slot, copy.programs.icmp_error_program()) {
        match (icmp_error_in(pin_dir, slot), built.info()) {
            (Ok(live), Ok(built)) if live.tag() == built.tag() => {
                problems.extend(maps_read(&live, &built, pin_dir))
            }
            (Ok(live), _) => problems.push(format!(
                "the ICMP-error program in slot {slot} of {} is not this build's (tag {:016x})",
                maps::ICMP_ERRORS,
                live.tag()
            )),
            (Err(e), _) => problems.push(format!(
                "cannot read slot {slot} of {}: {e}",
                maps::ICMP_ERRORS
            )),
        }
    }
    Check::from_problems(
        CHECK,
        format!(
            "this build's programs ({}), reading the maps pinned in {}",
            tags.join(", "),
            pin_dir.display()
        ),
        problems,
        "run `killswitch up` to attach this build's programs",
    )
}

/// What the maps the attached program reads are not: ours must be the pinned ones, its global
/// data (`.rodata`: this kernel's socket offsets, which the tag leaves out) must hold what this
/// build's copy holds, and it reads nothing else.
fn maps_read(live: &ProgramInfo, built: &ProgramInfo, pin_dir: &Path) -> Vec<String> {
    let ids = |p: &ProgramInfo| p.map_ids().map(Option::unwrap_or_default);
    let (live_ids, built_ids) = match (ids(live), ids(built)) {
        (Ok(live), Ok(built)) => (live, built),
        (Err(e), _) | (_, Err(e)) => return vec![format!("cannot list the program's maps: {e}")],
    };
    let built_data: BTreeMap<String, Vec<u8>> = built_ids
        .into_iter()
        .filter_map(|id| {
            let info = MapInfo::from_id(id).ok()?;
            let name = info.name_as_str().filter(|n| is_global_data(n))?.to_owned();
            Some((name, global_data(&info).ok()?))
        })
        .collect();
    let mut problems = Vec::new();
    for id in live_ids {
        let info = match MapInfo::from_id(id) {
            Ok(info) => info,
            Err(e) => {
                problems.push(format!(
                    "cannot read map id {id} of the attached program: {e}"
                ));
                continue;
            }
        };
        let name = info.name_as_str().unwrap_or("?");
        if maps::ALL.contains(&name) {
            let pinned = MapInfo::from_pin(pin_dir.join(name)).map(|p| p.id());
            if pinned.as_ref().ok() != Some(&id) {
                problems.push(format!(
                    "the attached program reads {name} id {id}, not the pinned one ({})",
                    pinned.map_or("none".to_owned(), |p| format!("id {p}"))
                ));
            }
        } else if is_global_data(name) {
            if global_data(&info).ok().as_ref() != built_data.get(name) {
                problems.push(format!(
                    "the attached program's {name} (map id {id}) differs from this build's"
                ));
            }
        } else if name != AYA_LOGS && name != maps::QUOTED {
            problems.push(format!(
                "the attached program reads map {name} (id {id}), which is not one of ours"
            ));
        }
    }
    problems
}

/// aya-log's ring buffer, made with each load and never pinned: the programs only write to it
/// (and the enforcing ones never do: their logging is removed by the verifier).
const AYA_LOGS: &str = "AYA_LOGS";

/// A loader-made map of global variables (`.rodata`, `.data`, `.bss`).
fn is_global_data(name: &str) -> bool {
    name.starts_with('.')
}

/// The one value of a global-data map.
fn global_data(info: &MapInfo) -> std::io::Result<Vec<u8>> {
    let fd = info.fd().map_err(std::io::Error::other)?;
    sys::array_value(fd.as_fd(), 0, info.value_size() as usize)
}

/// The ICMP-error program in `slot` of the scope's pinned `ICMP_ERRORS`.
fn icmp_error_in(pin_dir: &Path, slot: u32) -> std::io::Result<ProgramInfo> {
    let map = sys::obj_get(&pin_dir.join(maps::ICMP_ERRORS))?;
    let id = sys::program_in_slot(map.as_fd(), slot)?;
    loaded_programs()
        .filter_map(|info| info.ok())
        .find(|info| info.id() == id)
        .ok_or_else(|| std::io::Error::other(format!("no program with id {id}")))
}

/// `tunnels`, `uplinks`, `servers`, `lists`, `vpn-client`: the maps against the plan for the
/// interfaces and cgroups that exist now.
fn maps_checks(policy: &Policy, live: &MapEntries, answers: &super::Answers) -> Vec<Check> {
    let list = interfaces::list().unwrap_or_default();
    let cookie = interfaces::netns_cookie().unwrap_or(0);
    let clients = crate::vpn_client::current(policy);
    // The guard's devices are checked apart (`guard_check`).
    let plan = MapEntries::new(policy, &list, cookie, &[], &clients, Vec::new());
    let named = |keys: &BTreeMap<InterfaceKey, String>| -> Vec<String> {
        keys.keys()
            .map(|k| {
                let name = (k.netns_cookie == cookie)
                    .then(|| interfaces::name_of(k.ifindex))
                    .flatten();
                match name {
                    Some(name) => format!("{name} (ifindex {})", k.ifindex),
                    None => format!("ifindex {} (gone)", k.ifindex),
                }
            })
            .collect()
    };
    let interface_check = |check: &'static str, live: &BTreeMap<_, _>, plan: &BTreeMap<_, _>| {
        let (held, wanted) = (named(live), named(plan));
        if live.keys().eq(plan.keys()) {
            Check::pass(
                check,
                if held.is_empty() {
                    "none held, none present".to_owned()
                } else {
                    format!("{} held, as present now", held.join(", "))
                },
            )
        } else {
            Check::fail(
                check,
                format!(
                    "the map holds [{}], the interfaces present now are [{}]",
                    held.join(", "),
                    wanted.join(", ")
                ),
                "start `killswitch daemon`, which follows interfaces, or run `killswitch up`",
            )
        }
    };
    let mut checks = vec![interface_check(
        "tunnels",
        &live.interfaces.tunnels,
        &plan.interfaces.tunnels,
    )];
    if policy.uplinks.is_some() {
        checks.push(interface_check(
            "uplinks",
            &live.interfaces.uplinks,
            &plan.interfaces.uplinks,
        ));
    }
    let held: Vec<_> = live.servers.iter().map(server_endpoint).collect();
    let named_servers: Vec<(u64, _)> = live
        .server_names
        .iter()
        .map(|n| (n.name, server_endpoint(&n.server)))
        .collect();
    let set_by_command = live
        .server_names
        .contains(&crate::servers::COMMAND_OWNS_THE_LIST);
    checks.push(servers_check(
        policy,
        &held,
        Some(&named_servers),
        set_by_command,
        answers,
    ));
    checks.push(lists_check(live, &plan));
    if policy.vpn_client.is_some() {
        checks.push(clients_check(live, &plan, &clients));
    }
    checks
}

/// `guard`: with `[guard]`, the guard's device map holds exactly the devices present now that
/// should have one, and each has its TCX links in both directions (clsact filters, before
/// Linux 6.6, have no pin to check); without, no guard is pinned.
fn guard_check(policy: &Policy, live: &MapEntries, pin_dir: &Path) -> Check {
    use crate::ebpf::guard;
    const CHECK: &str = "guard";
    if !policy.guarded() {
        return if live.interfaces.guarded.is_empty() && !guard::loaded(pin_dir) {
            Check::pass(CHECK, "off, and none is attached")
        } else {
            Check::fail(
                CHECK,
                "the policy has no guard but one is pinned",
                "run `killswitch up` to remove it",
            )
        };
    }
    let list = interfaces::list().unwrap_or_default();
    let plan: BTreeMap<u32, u8> = interfaces::guarded(&list, policy)
        .into_iter()
        .map(|(i, header)| (i.index, header))
        .collect();
    let held: BTreeMap<u32, u8> = live
        .interfaces
        .guarded
        .iter()
        .map(|(&i, (_, h))| (i, *h))
        .collect();
    let name = |ifindex: &u32| {
        interfaces::name_of(*ifindex).map_or(format!("ifindex {ifindex} (gone)"), |n| {
            format!("{n} (ifindex {ifindex})")
        })
    };
    let mut problems = Vec::new();
    if held != plan {
        problems.push(format!(
            "it watches [{}], the devices present now that need it are [{}]",
            held.keys().map(name).collect::<Vec<_>>().join(", "),
            plan.keys().map(name).collect::<Vec<_>>().join(", ")
        ));
    }
    if live.settings.guard == 0 {
        problems.push(
            "other namespaces do not pass the cgroup programs: a guard failed to attach".into(),
        );
    }
    if guard::uses_links() {
        for ifindex in plan.keys() {
            for direction in Direction::ALL {
                let attached = sys::obj_get(&guard::link_pin(pin_dir, *ifindex, direction))
                    .and_then(|link| sys::tcx_link_ifindex(&link))
                    .is_ok_and(|at| at == *ifindex);
                if !attached {
                    problems.push(format!(
                        "no {} guard on {}",
                        direction.name(),
                        name(ifindex)
                    ));
                }
            }
        }
    }
    let devices: Vec<String> = plan.keys().map(name).collect();
    Check::from_problems(
        CHECK,
        if devices.is_empty() {
            "on; no device to watch now".to_owned()
        } else {
            format!("on {}", devices.join(", "))
        },
        problems,
        "run `killswitch up`; start `killswitch daemon`, which guards uplinks as they come",
    )
}

/// `lists`: settings, NTP, DNS, LAN and inbound entries exactly as planned.
fn lists_check(live: &MapEntries, plan: &MapEntries) -> Check {
    let mut problems = Vec::new();
    let mut settings = live.settings;
    // Levels follow the client cgroups, checked with them; the list bits must say what the
    // maps hold (a missing bit skips the lookups of entries present).
    settings.vpn_client_levels = plan.settings.vpn_client_levels;
    settings.empty_lists = plan.settings.empty_lists;
    // The tunnel bits follow the tunnels, checked against what the maps hold just below.
    settings.tunnel_free = plan.settings.tunnel_free;
    if settings != plan.settings {
        problems.push(format!(
            "settings are {:?}, planned {:?}",
            live.settings, plan.settings
        ));
    }
    if live.settings.empty_lists != live.empty_lists() {
        problems.push(format!(
            "the empty-list bits are {:#x}, the lists say {:#x}",
            live.settings.empty_lists,
            live.empty_lists()
        ));
    }
    // A free bit where a tunnel is held judges that tunnel's packets as an uplink's.
    if live.settings.tunnel_free != live.interfaces.tunnel_free() {
        problems.push(format!(
            "the tunnel-free bits are {:#x}, the tunnels held say {:#x}",
            live.settings.tunnel_free,
            live.interfaces.tunnel_free()
        ));
    }
    let addresses = |set: &BTreeSet<[u8; 16]>| -> Vec<String> {
        set.iter().map(|k| key_address(*k).to_string()).collect()
    };
    let mut differ = |name: &str, live: Vec<String>, plan: Vec<String>| {
        if live != plan {
            problems.push(format!(
                "{name} holds [{}], planned [{}]",
                live.join(", "),
                plan.join(", ")
            ));
        }
    };
    differ(
        "NTP",
        addresses(&live.ntp_servers),
        addresses(&plan.ntp_servers),
    );
    differ(
        "DNS",
        addresses(&live.dns_servers),
        addresses(&plan.dns_servers),
    );
    let prefixes = |set: &BTreeSet<(u32, [u8; 16])>| -> Vec<String> {
        set.iter()
            .map(|(len, key)| lan_prefix(*len, *key).to_string())
            .collect()
    };
    differ("LAN", prefixes(&live.lan), prefixes(&plan.lan));
    let inbound = |set: &BTreeSet<killswitch_common::InboundKey>| -> Vec<String> {
        set.iter().map(|k| format!("{k:?}")).collect()
    };
    differ("inbound", inbound(&live.inbound), inbound(&plan.inbound));
    Check::from_problems(
        "lists",
        format!(
            "settings, {}, {}, {} and {} as configured",
            count(live.ntp_servers.len(), "NTP server"),
            count(live.dns_servers.len(), "DNS server"),
            count(live.lan.len(), "LAN prefix"),
            count(live.inbound.len(), "inbound rule"),
        ),
        problems,
        "run `killswitch up` to write the config again",
    )
}

/// `vpn-client`: the client cgroups in the map are the ones that exist now.
fn clients_check(live: &MapEntries, plan: &MapEntries, clients: &[ClientCgroup]) -> Check {
    let describe = |ids: &BTreeSet<u64>| -> Vec<String> {
        ids.iter()
            .map(|id| match crate::vpn_client::path_of(*id) {
                Some(path) => path,
                None => format!("cgroup id {id} (gone)"),
            })
            .collect()
    };
    if live.vpn_clients == plan.vpn_clients
        && live.settings.vpn_client_levels == plan.settings.vpn_client_levels
    {
        Check::pass(
            "vpn-client",
            format!(
                "only {} may reach the servers",
                if clients.is_empty() && live.settings.vpn_client_mark == 0 {
                    "no one (no client cgroup exists now)".to_owned()
                } else {
                    let mut who = describe(&live.vpn_clients);
                    if live.settings.vpn_client_mark != 0 {
                        who.insert(0, format!("mark {:#x}", live.settings.vpn_client_mark));
                    }
                    who.join(", ")
                }
            ),
        )
    } else {
        Check::fail(
            "vpn-client",
            format!(
                "the map trusts [{}], the client cgroups now are [{}]",
                describe(&live.vpn_clients).join(", "),
                describe(&plan.vpn_clients).join(", ")
            ),
            "start `killswitch daemon`, which follows the client's cgroup, or run `killswitch up`",
        )
    }
}

/// A copy of the attached pair, loaded by this build into a pin directory of its own (never a
/// scope: the name has `=`), removed on drop.
struct Copy {
    pair: Pair,
    programs: Programs,
    dir: pins::PrivateDir,
}

impl Copy {
    fn load(pair: Pair) -> Result<Copy> {
        pins::ensure_bpffs()?;
        crate::state::make_dir(&pins::pin_root())?;
        let dir = pins::PrivateDir::make("verify")?;
        Ok(Copy {
            pair,
            programs: Programs::load_pair(dir.path(), pair, None)?,
            dir,
        })
    }

    /// `decisions`: generated packets through the copy in a scratch namespace whose `tun0` and
    /// `up0` stand for the tunnels and uplinks, with the scope's other entries.
    fn decide(&self, live: &MapEntries, policy: &Policy) -> Check {
        let own = own_cgroup();
        let result = scratch::run(|net| {
            let cookie = interfaces::netns_cookie()?;
            let mut entries = live.clone();
            entries.settings.netns_cookie = cookie;
            entries.interfaces.tunnels =
                [(InterfaceKey::new(cookie, net.tunnel), String::new())].into();
            entries.interfaces.uplinks = if live.settings.uplinks_restricted != 0 {
                [(InterfaceKey::new(cookie, net.uplink), String::new())].into()
            } else {
                BTreeMap::new()
            };
            let clients = live.settings.vpn_client != 0 && own.is_some();
            entries.settings.vpn_client_levels = own.as_ref().map_or(0, |c| 1 << c.level);
            entries.vpn_clients = BTreeSet::new();
            let mut maps = PinnedMaps::open(self.dir.path())?;
            // `write` derives the copy's tunnel bits from its own tunnels: wrong bits in the
            // scope show in `lists`, not here.
            maps.write(&entries)?;
            let mut listed = false;
            let mut judge = |p: &Packet| -> Result<decisions::Judged> {
                if clients && p.vpn_client != listed {
                    let mut with = entries.clone();
                    if p.vpn_client {
                        with.vpn_clients = own.iter().map(|c| c.id).collect();
                    }
                    maps.write_vpn_clients(&with)?;
                    listed = p.vpn_client;
                }
                let ifindex = match p.interface {
                    Interface::Loopback => 1,
                    Interface::Tunnel => net.tunnel,
                    Interface::Uplink | Interface::OtherNamespace => net.uplink,
                    Interface::Other => net.other,
                };
                self.run(&maps, p, ifindex)
            };
            Ok(decisions::compare(
                policy,
                crate::model::Filter::Programs,
                "a copy of the attached programs with the scope's map contents",
                clients,
                |batch| batch.iter().map(|p| judge(p).map(Some)).collect(),
            ))
        });
        result.unwrap_or_else(|e| {
            Check::fail(
                "decisions",
                format!("the packets could not be run: {e}"),
                "run with -v; BPF_PROG_TEST_RUN needs root",
            )
        })
    }

    /// One packet through the copy: allowed, and the one counter that moved.
    fn run(&self, maps: &PinnedMaps, p: &Packet, ifindex: u32) -> Result<decisions::Judged> {
        let before = maps.counters()?;
        let frame = crate::packets::frame(p);
        let ctx = crate::packets::skb_context_marked(ifindex, p.mark);
        let options = aya::programs::TestRunOptions {
            data_in: Some(&frame),
            ctx_in: Some(&ctx),
            ..Default::default()
        };
        let result = self
            .programs
            .program(p.direction)
            .test_run(options)
            .map_err(|e| Error::kernel("BPF_PROG_TEST_RUN failed", e))?;
        let after = maps.counters()?;
        let moved: Vec<Reason> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| a.2 != b.2 && a.0 == p.direction)
            .map(|(_, a)| a.1)
            .collect();
        let counted = match moved.as_slice() {
            [reason] => decisions::Counted::One(*reason),
            several => decisions::Counted::Not(several.len()),
        };
        Ok((result.return_value == 1, counted))
    }
}

/// This process's cgroup, unless it is the root: the socket BPF_PROG_TEST_RUN makes is there.
fn own_cgroup() -> Option<ClientCgroup> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    ClientCgroup::find(&crate::scope::cgroup2_mount().ok()?, path)
}

/// Drop counters of the scope per reason, egress (for the probes).
pub(super) fn egress_counters(scope: &Scope) -> Result<BTreeMap<Reason, u64>> {
    let maps = PinnedMaps::open(&pins::pin_dir(scope))?;
    Ok(maps
        .counters()?
        .into_iter()
        .filter(|(d, _, _)| *d == Direction::Egress)
        .map(|(_, r, n)| (r, n))
        .collect())
}
