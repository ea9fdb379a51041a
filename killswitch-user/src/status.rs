//! What a pinned scope enforces right now, read back from the kernel (not from the config).

use std::path::PathBuf;

use killswitch_common::{Direction, InboundKey, InterfaceKey, Reason, Settings};
use schemars::JsonSchema;
use serde::Serialize;

use crate::{
    backend::nftables,
    ebpf::pins,
    ebpf::{
        self,
        entries::{key_address, lan_prefix, server_endpoint},
        sys, PinnedMaps,
    },
    error::Result,
    events::{DropRecord, Resolver},
    interfaces, render,
    scope::Scope,
};

#[derive(Debug, Serialize, JsonSchema)]
pub struct ScopeStatus {
    /// The scope's name (its cgroup relative to the cgroup2 mount, or `/`).
    pub scope: String,
    /// The scope's cgroup, absolute.
    pub cgroup: PathBuf,
    /// Where the eBPF backend pins the scope's programs and maps.
    pub pin_dir: Option<PathBuf>,
    /// The nftables backend's table (`inet` family) in this network namespace.
    pub table: Option<String>,
    /// "ebpf" or "nftables".
    pub backend: &'static str,
    /// Both programs attached to this scope's cgroup.
    pub enforced: bool,
    /// "policy", or "lockdown" (loopback and DHCP only: the policy could not be enforced).
    pub mode: &'static str,
    /// Why the scope is in lockdown (the error `up` or the daemon reported).
    pub lockdown_reason: Option<String>,
    /// How the programs learn a packet's network namespace: "bpf_get_netns_cookie", or
    /// "socket" (the socket's, through BTF offsets, on kernels before 6.17).
    pub namespace_from: Option<&'static str>,
    /// The eBPF backend's cgroup links, one per direction.
    pub links: Vec<LinkStatus>,
    /// eBPF policy: whether the attached programs are the ones this version's `up` attached;
    /// false while `trace` runs (or after one was killed) or when another version attached
    /// them (`up` loads this version's). `None` in lockdown and for nftables.
    pub attached_by_up: Option<bool>,
    /// The tunnel interfaces the scope trusts now.
    pub tunnels: Vec<InterfaceStatus>,
    /// nftables: the names (`wg*` patterns) its rules match; `tunnels` are those present now.
    pub tunnel_names: Option<Vec<String>>,
    /// `None` when exceptions may leave through any non-tunnel interface.
    pub uplinks: Option<Vec<InterfaceStatus>>,
    /// The server endpoints reachable outside the tunnel (`ADDRESS[:PORT][/PROTOCOL]`).
    pub servers: Vec<String>,
    /// The list in force was set with `killswitch servers` (the config's returns at the next
    /// `up` or reload).
    pub servers_set_by_command: bool,
    /// What else may use the uplinks.
    pub exceptions: Exceptions,
    /// `[vpn_client]`: who may reach the servers (`None`: every socket of the scope).
    pub vpn_client: Option<Vec<String>>,
    /// Packets per direction and reason.
    pub counters: Vec<CounterStatus>,
    /// Drop events held back by the in-kernel rate limit or a full ring buffer.
    pub events_suppressed: u64,
    /// The newest drop events, newest first (eBPF; at most [`RECENT_DROPS_SHOWN`]).
    pub recent_drops: Vec<DropRecord>,
    /// When the tunnel entries last changed (RFC 3339, UTC; eBPF): a tunnel came, went or
    /// came back as a new interface. `None` if they never changed since `up`.
    pub tunnels_changed: Option<String>,
    /// Seconds from `tunnels_changed` to now.
    pub tunnels_changed_seconds_ago: Option<u64>,
    /// The uplink guard (eBPF, `[guard]` on): `None` when the scope has none.
    pub guard: Option<GuardStatus>,
}

/// The uplink guard: where it runs and what it decided.
#[derive(Debug, Serialize, JsonSchema)]
pub struct GuardStatus {
    /// The devices it watches.
    pub devices: Vec<GuardDevice>,
    /// Frames per direction and reason (every reason, as in `counters`).
    pub counters: Vec<CounterStatus>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct GuardDevice {
    pub ifindex: u32,
    /// Its name in this namespace, if it still exists.
    pub name: Option<String>,
    /// Its guard is attached to the device now (a TCX link; before Linux 6.6 a clsact filter,
    /// which has no pin: true whenever the device exists).
    pub attached: bool,
}

/// How many of the newest drop events `status` shows.
pub const RECENT_DROPS_SHOWN: usize = 5;

/// The uplink exceptions besides the servers, as the kernel holds them.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Exceptions {
    /// `[lan] networks`, as prefixes.
    pub lan: Vec<String>,
    /// DNS (ports 53 and 853) to the LAN is allowed.
    pub lan_dns: bool,
    /// DHCP and DHCPv6 on the uplinks are allowed.
    pub dhcp: bool,
    /// "tunnel" or "block".
    pub ipv6: &'static str,
    /// Addresses reachable on the NTP port outside the tunnel.
    pub ntp_servers: Vec<String>,
    /// Addresses reachable on the DNS ports outside the tunnel.
    pub dns_servers: Vec<String>,
    /// `PORT` or `PORT from SOURCE`.
    pub inbound: Vec<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct LinkStatus {
    /// "egress" or "ingress".
    pub direction: &'static str,
    /// The kernel's ids of the cgroup link and of the program it runs.
    pub link_id: u32,
    pub program_id: u32,
    /// The attached program's name in the kernel.
    pub program: Option<String>,
    /// The link is attached to this scope's cgroup.
    pub attached: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct InterfaceStatus {
    /// The interface index in its network namespace.
    pub ifindex: u32,
    /// The name in this network namespace; `None` if the interface is gone or in another one.
    pub name: Option<String>,
    /// The interface is in the network namespace `status` runs in.
    pub this_netns: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct CounterStatus {
    /// "egress" or "ingress".
    pub direction: &'static str,
    /// The verdict step that decided (`loopback`, `server`, `default-drop`, ...).
    pub reason: &'static str,
    /// "allow" or "drop".
    pub verdict: &'static str,
    /// Packets since the scope was set up, summed over CPUs.
    pub packets: u64,
}

/// What `status --json` prints.
#[derive(Debug, Serialize, JsonSchema)]
pub struct StatusReport {
    /// One entry per backend holding a scope (two while a scope moves between backends).
    pub scopes: Vec<ScopeStatus>,
    /// Scopes asked for (or left behind) that no backend enforces.
    pub not_enforced: Vec<String>,
}

/// The JSON Schema of `status --json`; a `status --follow --json` line is its
/// `$defs/DropRecord`.
pub fn schema() -> serde_json::Value {
    schemars::schema_for!(StatusReport).to_value()
}

pub fn read(scope: &Scope) -> Result<ScopeStatus> {
    let cgroup_id = scope.cgroup_id().ok();
    let names = ebpf::program_names();
    let links: Vec<LinkStatus> = Direction::ALL
        .iter()
        .filter_map(|&direction| {
            let fd = sys::obj_get(&ebpf::link_pin(&pins::pin_dir(scope), direction)).ok()?;
            let info = sys::cgroup_link_info(&fd).ok()?;
            Some(LinkStatus {
                direction: direction.name(),
                link_id: info.link_id,
                program_id: info.program_id,
                program: names.get(&info.program_id).cloned(),
                attached: info.cgroup_id != 0 && Some(info.cgroup_id) == cgroup_id,
            })
        })
        .collect();
    let enforced = links.len() == Direction::ALL.len() && links.iter().all(|l| l.attached);
    let programs: Vec<&str> = links.iter().filter_map(|l| l.program.as_deref()).collect();
    let program = programs.first().copied().unwrap_or("");
    let mode = ebpf::mode_of(&programs).unwrap_or("unknown");
    let namespace_from = match program {
        "egress" | "ingress" => Some("bpf_get_netns_cookie"),
        "egress_sock" | "ingress_sock" => Some("socket"),
        _ => None,
    };

    let maps = PinnedMaps::open(&pins::pin_dir(scope))?;
    let own_cookie = interfaces::netns_cookie()?;
    let describe = |keys: Vec<InterfaceKey>| -> Vec<InterfaceStatus> {
        keys.into_iter()
            .map(|key| {
                let this_netns = key.netns_cookie == own_cookie;
                InterfaceStatus {
                    ifindex: key.ifindex,
                    name: this_netns
                        .then(|| interfaces::name_of(key.ifindex))
                        .flatten(),
                    this_netns,
                }
            })
            .collect()
    };
    let settings = maps.settings()?;
    let uplinks = (settings.uplinks_restricted != 0)
        .then(|| maps.uplinks())
        .transpose()?;
    Ok(ScopeStatus {
        scope: scope.name.clone(),
        cgroup: scope.cgroup.clone(),
        pin_dir: Some(pins::pin_dir(scope)),
        table: None,
        backend: "ebpf",
        enforced,
        mode,
        lockdown_reason: (mode == "lockdown")
            .then(|| ebpf::maps::lockdown_reason(&pins::pin_dir(scope)))
            .flatten(),
        namespace_from,
        links,
        attached_by_up: (mode == "policy").then(|| ebpf::runs_what_up_attached(scope)),
        tunnels: describe(maps.tunnels()?),
        tunnel_names: None,
        uplinks: uplinks.map(describe),
        servers: maps
            .servers()?
            .iter()
            .map(|k| server_endpoint(k).to_string())
            .collect(),
        servers_set_by_command: maps.has_server_name(&crate::servers::COMMAND_OWNS_THE_LIST)?,
        exceptions: exceptions(&maps, &settings)?,
        vpn_client: (settings.vpn_client != 0).then(|| {
            let mut who: Vec<String> = maps
                .entries()
                .map(|e| e.vpn_clients)
                .unwrap_or_default()
                .into_iter()
                .map(|id| match crate::vpn_client::path_of(id) {
                    Some(path) => format!("cgroup {path}"),
                    None => format!("cgroup id {id} (gone)"),
                })
                .collect();
            if settings.vpn_client_mark != 0 {
                who.insert(0, format!("mark {:#x}", settings.vpn_client_mark));
            }
            who
        }),
        events_suppressed: maps.suppressed_events()?,
        counters: counters(maps.counters()?),
        recent_drops: {
            let mut resolver = Resolver::new(&crate::scope::cgroup2_mount()?)?;
            maps.recent_drops(RECENT_DROPS_SHOWN)?
                .iter()
                .map(|event| resolver.record(event))
                .collect()
        },
        tunnels_changed: maps
            .tunnels_changed()
            .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        tunnels_changed_seconds_ago: maps.tunnels_changed().map(|t| {
            std::time::SystemTime::now()
                .duration_since(t)
                .map_or(0, |d| d.as_secs())
        }),
        guard: guard_status(scope, &maps, &settings)?,
    })
}

fn guard_status(
    scope: &Scope,
    maps: &PinnedMaps,
    settings: &Settings,
) -> Result<Option<GuardStatus>> {
    let pin_dir = pins::pin_dir(scope);
    if settings.guard == 0 && !ebpf::guard::loaded(&pin_dir) {
        return Ok(None);
    }
    let devices = maps
        .guarded()?
        .into_keys()
        .map(|ifindex| {
            let name = interfaces::name_of(ifindex);
            let pinned = sys::obj_get(&ebpf::guard::link_pin(&pin_dir, ifindex, Direction::Egress));
            let attached = match pinned {
                Ok(link) => sys::tcx_link_ifindex(&link).ok() == Some(ifindex),
                Err(_) => name.is_some() && !ebpf::guard::uses_links(),
            };
            GuardDevice {
                ifindex,
                name,
                attached,
            }
        })
        .collect();
    Ok(Some(GuardStatus {
        devices,
        counters: counters(maps.guard_counters()?),
    }))
}

/// What an nftables table enforces, read back from the kernel.
pub fn read_nft(scope: &Scope) -> Result<ScopeStatus> {
    let table = nftables::read(scope)?;
    let comment = nftables::Comment::parse(&table.comment);
    let lockdown_reason = comment.as_ref().and_then(|c| c.lockdown.clone());
    // A rule matches the cgroup id it was made with: a cgroup removed and made again (a
    // service restarted) is a new one the table does not hold.
    let same_cgroup = match comment.as_ref().and_then(|c| c.id) {
        Some(id) => scope.cgroup_id().is_ok_and(|now| now == id),
        None => true,
    };
    let present = interfaces::list().unwrap_or_default();
    let matching = |names: &[String]| -> Vec<InterfaceStatus> {
        present
            .iter()
            .filter(|i| {
                names.iter().any(|n| match n.strip_suffix('*') {
                    Some(prefix) => i.name.starts_with(prefix),
                    None => &i.name == n,
                })
            })
            .map(|i| InterfaceStatus {
                ifindex: i.index,
                name: Some(i.name.clone()),
                this_netns: true,
            })
            .collect()
    };
    let has = |reason: Reason| {
        table
            .rules
            .iter()
            .any(|r| r.comment == render::step(reason))
    };
    let tunnel_names = table.interfaces("egress", render::step(Reason::Tunnel));
    let uplink_rules = table.rules.iter().any(|r| r.comment == UPLINK);
    let uplinks = uplink_rules.then(|| matching(&table.interfaces("egress", UPLINK)));
    let set = |names: &[&str]| -> Vec<String> {
        names
            .iter()
            .flat_map(|n| table.sets.get(*n).cloned().unwrap_or_default())
            .collect()
    };
    let servers = table.servers().iter().map(ToString::to_string).collect();
    let inbound = table
        .rules
        .iter()
        .filter(|r| r.chain == "tunnel_ingress")
        .filter_map(|r| {
            let note = r.comment.strip_prefix(render::step(Reason::Tunnel))?;
            note.strip_prefix(": ")?.strip_prefix(render::INBOUND)
        })
        .flat_map(|rest| match rest.split_once(" from ") {
            Some((port, sources)) => sources
                .split(", ")
                .map(|source| format!("{port} from {source}"))
                .collect::<Vec<_>>(),
            None => vec![rest.to_owned()],
        })
        .collect();
    let enforced = same_cgroup
        && ["output", "input"]
            .iter()
            .all(|h| table.hooks.iter().any(|t| t == h));
    Ok(ScopeStatus {
        scope: scope.name.clone(),
        cgroup: scope.cgroup.clone(),
        pin_dir: None,
        table: Some(nftables::table(scope)?),
        backend: "nftables",
        enforced,
        mode: if lockdown_reason.is_some() {
            "lockdown"
        } else {
            "policy"
        },
        lockdown_reason,
        namespace_from: None,
        links: Vec::new(),
        attached_by_up: None,
        tunnels: matching(&tunnel_names),
        tunnel_names: Some(tunnel_names),
        uplinks,
        servers,
        servers_set_by_command: table.servers_set_by_command(),
        exceptions: Exceptions {
            lan: set(&["lan4", "lan6"]),
            lan_dns: !has(Reason::LanDns),
            dhcp: has(Reason::Dhcp),
            ipv6: if has(Reason::Ipv6Blocked) {
                "block"
            } else {
                "tunnel"
            },
            ntp_servers: set(&["ntp4", "ntp6"]),
            dns_servers: set(&["dns4", "dns6"]),
            inbound,
        },
        vpn_client: table.chains.iter().any(|c| c == "vpn_client").then(|| {
            // `run --vpn-client` and the daemon may both have added the same client.
            let mut who: Vec<String> = Vec::new();
            for id in table
                .rules
                .iter()
                .filter(|r| r.chain == "vpn_client")
                .flat_map(|r| r.identifies.clone())
            {
                if !who.contains(&id) {
                    who.push(id);
                }
            }
            who
        }),
        counters: counters(table.counters()),
        events_suppressed: 0,
        // The kernel log holds an nftables table's drops; its rules follow tunnel names.
        recent_drops: Vec::new(),
        tunnels_changed: None,
        tunnels_changed_seconds_ago: None,
        guard: nft_guard_status(scope, &present)?,
    })
}

/// The guard's netdev chains: the devices they hook (attached: hooked by name now) and their
/// counters (egress only: they have no ingress chain).
fn nft_guard_status(
    scope: &Scope,
    present: &[interfaces::Interface],
) -> Result<Option<GuardStatus>> {
    let Some(counted) = nftables::frame_counters(scope)? else {
        return Ok(None);
    };
    let devices = nftables::frame_devices(scope)?
        .into_iter()
        .map(|(name, _)| {
            let index = present.iter().find(|i| i.name == name).map(|i| i.index);
            GuardDevice {
                ifindex: index.unwrap_or(0),
                attached: index.is_some(),
                name: Some(name),
            }
        })
        .collect();
    Ok(Some(GuardStatus {
        devices,
        counters: counters(counted),
    }))
}

/// The comment of the rules that send an uplink's packets on.
const UPLINK: &str = "3 an uplink";

fn counters(list: Vec<(Direction, Reason, u64)>) -> Vec<CounterStatus> {
    list.into_iter()
        .map(|(direction, reason, packets)| CounterStatus {
            direction: direction.name(),
            reason: reason.name(),
            verdict: if reason.allows() { "allow" } else { "drop" },
            packets,
        })
        .collect()
}

fn exceptions(maps: &PinnedMaps, settings: &Settings) -> Result<Exceptions> {
    let addresses = |keys: Vec<[u8; 16]>| -> Vec<String> {
        keys.into_iter()
            .map(|k| key_address(k).to_string())
            .collect()
    };
    Ok(Exceptions {
        lan: maps
            .lan()?
            .into_iter()
            .map(|(len, key)| lan_prefix(len, key).to_string())
            .collect(),
        lan_dns: settings.lan_dns != 0,
        dhcp: settings.dhcp != 0,
        ipv6: if settings.ipv6_block != 0 {
            "block"
        } else {
            "tunnel"
        },
        ntp_servers: addresses(maps.ntp_servers()?),
        dns_servers: addresses(maps.dns_servers()?),
        inbound: maps
            .inbound()?
            .into_iter()
            .map(|k| {
                if k.source == InboundKey::ANY_SOURCE {
                    k.port.to_string()
                } else {
                    format!("{} from {}", k.port, key_address(k.source))
                }
            })
            .collect(),
    })
}
