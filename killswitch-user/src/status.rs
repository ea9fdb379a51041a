//! What a pinned scope enforces right now, read back from the kernel (not from the config).

use std::path::PathBuf;

use killswitch_common::{Direction, InboundKey, InterfaceKey, Reason, Settings};
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
    interfaces, render,
    scope::Scope,
};

#[derive(Debug, Serialize)]
pub struct ScopeStatus {
    pub scope: String,
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
    pub links: Vec<LinkStatus>,
    pub tunnels: Vec<InterfaceStatus>,
    /// nftables: the names (`wg*` patterns) its rules match; `tunnels` are those present now.
    pub tunnel_names: Option<Vec<String>>,
    /// `None` when exceptions may leave through any non-tunnel interface.
    pub uplinks: Option<Vec<InterfaceStatus>>,
    pub servers: Vec<String>,
    /// The list in force was set with `killswitch servers` (the config's returns at the next
    /// `up` or reload).
    pub servers_set_by_command: bool,
    pub exceptions: Exceptions,
    /// `[vpn_client]`: who may reach the servers (`None`: every socket of the scope).
    pub vpn_client: Option<Vec<String>>,
    pub counters: Vec<CounterStatus>,
    /// Drop events held back by the in-kernel rate limit or a full ring buffer.
    pub events_suppressed: u64,
}

/// The uplink exceptions besides the servers, as the kernel holds them.
#[derive(Debug, Serialize)]
pub struct Exceptions {
    pub lan: Vec<String>,
    pub lan_dns: bool,
    pub dhcp: bool,
    /// "tunnel" or "block".
    pub ipv6: &'static str,
    pub ntp_servers: Vec<String>,
    pub dns_servers: Vec<String>,
    /// `PORT` or `PORT from SOURCE`.
    pub inbound: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct LinkStatus {
    pub direction: &'static str,
    pub link_id: u32,
    pub program_id: u32,
    /// The attached program's name in the kernel.
    pub program: Option<String>,
    pub attached: bool,
}

#[derive(Debug, Serialize)]
pub struct InterfaceStatus {
    pub ifindex: u32,
    /// The name in this network namespace; `None` if the interface is gone or in another one.
    pub name: Option<String>,
    pub this_netns: bool,
}

#[derive(Debug, Serialize)]
pub struct CounterStatus {
    pub direction: &'static str,
    pub reason: &'static str,
    pub verdict: &'static str,
    pub packets: u64,
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
    })
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
    })
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
