//! The pinned maps of one scope: writing the desired entries (add before remove, so nothing that
//! stays in the policy is ever missing) and reading them back.

use std::{collections::BTreeSet, os::fd::AsFd, path::Path};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, IterableMap, Map, MapData, PerCpuArray,
    },
    Pod,
};
use killswitch_common::{
    lists, Direction, DropEvent, EventLimit, InboundKey, InterfaceKey, NamedServerKey, Reason,
    ServerKey, Settings, COUNTER_ENTRIES, LOCKDOWN_REASON_BYTES, MAX_ADDRESSES, MAX_INTERFACES,
    MAX_PREFIXES, MAX_SERVERS, MAX_VPN_CLIENTS, RECENT_DROPS_PER_CPU,
};

use super::{
    entries::{InterfaceEntries, MapEntries},
    sys,
};
use crate::error::{Error, Result};

pub const TUNNELS: &str = "TUNNELS";
pub const UPLINKS: &str = "UPLINKS";
pub const SERVERS: &str = "SERVERS";
pub const SETTINGS: &str = "SETTINGS";
pub const COUNTERS: &str = "COUNTERS";
pub const NTP_SERVERS: &str = "NTP_SERVERS";
pub const DNS_SERVERS: &str = "DNS_SERVERS";
pub const LAN: &str = "LAN";
pub const INBOUND: &str = "INBOUND";
pub const EVENTS: &str = "EVENTS";
pub const EVENT_LIMIT: &str = "EVENT_LIMIT";
pub const LOCKDOWN: &str = "LOCKDOWN";
pub const SERVER_NAMES: &str = "SERVER_NAMES";
pub const ICMP_ERRORS: &str = "ICMP_ERRORS";
pub const VPN_CLIENTS: &str = "VPN_CLIENTS";
pub const RECENT_DROPS: &str = "RECENT_DROPS";
pub const TUNNELS_CHANGED: &str = "TUNNELS_CHANGED";
pub const GUARDED: &str = "GUARDED";
pub const GUARD_COUNTERS: &str = "GUARD_COUNTERS";
pub const POLICY: &str = "POLICY";
/// The scratch slot of an older build's ICMP-error program (made with each load, never pinned,
/// holding nothing between packets): `verify` takes it for ours until the next `up` replaces it.
pub const QUOTED: &str = "QUOTED";
pub const ALL: [&str; 20] = [
    POLICY,
    GUARDED,
    GUARD_COUNTERS,
    RECENT_DROPS,
    TUNNELS_CHANGED,
    VPN_CLIENTS,
    ICMP_ERRORS,
    LOCKDOWN,
    SERVER_NAMES,
    EVENTS,
    EVENT_LIMIT,
    TUNNELS,
    UPLINKS,
    SERVERS,
    SETTINGS,
    COUNTERS,
    NTP_SERVERS,
    DNS_SERVERS,
    LAN,
    INBOUND,
];

pub struct PinnedMaps {
    tunnels: HashMap<MapData, InterfaceKey, u8>,
    uplinks: HashMap<MapData, InterfaceKey, u8>,
    servers: HashMap<MapData, ServerKey, u8>,
    server_names: HashMap<MapData, NamedServerKey, u8>,
    settings: Array<MapData, Settings>,
    counters: PerCpuArray<MapData, u64>,
    ntp_servers: HashMap<MapData, [u8; 16], u8>,
    dns_servers: HashMap<MapData, [u8; 16], u8>,
    lan: LpmTrie<MapData, [u8; 16], u8>,
    inbound: HashMap<MapData, InboundKey, u8>,
    vpn_clients: HashMap<MapData, u64, u8>,
    event_limit: PerCpuArray<MapData, EventLimit>,
    /// `None` in scopes an older version pinned, until the next `up` (status shows none).
    recent_drops: Option<PerCpuArray<MapData, DropEvent>>,
    tunnels_changed: Option<Array<MapData, u64>>,
    /// The guard's devices (ifindex -> link-layer header length) and counters; `None` as above.
    guarded: Option<HashMap<MapData, u32, u8>>,
    guard_counters: Option<PerCpuArray<MapData, u64>>,
    /// The fingerprint of the policy last written; `None` as above.
    policy: Option<Array<MapData, u64>>,
}

fn open<T: TryFrom<Map>>(dir: &Path, name: &str) -> Result<T>
where
    T::Error: std::fmt::Display,
{
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::kernel(format!("cannot open the pinned map {}", path.display()), e))?;
    let map = Map::from_map_data(data)
        .map_err(|e| Error::kernel(format!("unexpected map {}", path.display()), e))?;
    T::try_from(map).map_err(|e| Error::kernel(format!("unexpected map {}", path.display()), e))
}

/// What both `a` and `b` allow: uplinks restricted and IPv6 blocked if either says so, DHCP
/// and DNS to the LAN only if both allow them, the servers held to the VPN client if either
/// holds them, by a mark and at cgroup levels both trust.
fn strictest(a: &Settings, b: &Settings) -> Settings {
    let (vpn_client_mark, vpn_client_levels) = match (a.vpn_client, b.vpn_client) {
        (0, _) => (b.vpn_client_mark, b.vpn_client_levels),
        (_, 0) => (a.vpn_client_mark, a.vpn_client_levels),
        _ => (
            if a.vpn_client_mark == b.vpn_client_mark {
                a.vpn_client_mark
            } else {
                0
            },
            a.vpn_client_levels & b.vpn_client_levels,
        ),
    };
    Settings {
        vpn_client: a.vpn_client.max(b.vpn_client),
        vpn_client_mark,
        vpn_client_levels,
        uplinks_restricted: a.uplinks_restricted.max(b.uplinks_restricted),
        // DHCP in a namespace that is the scope's in only one of the two is in neither.
        dhcp: if a.netns_cookie == b.netns_cookie {
            a.dhcp.min(b.dhcp)
        } else {
            0
        },
        netns_cookie: b.netns_cookie,
        lan_dns: a.lan_dns.min(b.lan_dns),
        // Other namespaces pass only where the guard holds the uplinks under both.
        guard: a.guard.min(b.guard),
        ipv6_block: a.ipv6_block.max(b.ipv6_block),
        // Lookups for every list either holds: while the lists change, each entry present is
        // looked up (a missing bit would drop what an entry allows; a spare one costs a lookup).
        empty_lists: a.empty_lists & b.empty_lists,
        // Likewise every tunnel either holds is looked up.
        tunnel_free: a.tunnel_free & b.tunnel_free,
        ..*b
    }
}

/// The [`lists`] bits of these server keys' kinds.
pub(crate) fn server_kinds<'a>(keys: impl Iterator<Item = &'a ServerKey>) -> u32 {
    keys.fold(0, |bits, key| bits | lists::server_kind(key))
}

/// Records why the scope is held in lockdown; an empty reason means the policy is in force.
pub fn set_lockdown_reason(pin_dir: &Path, reason: &str) -> Result<()> {
    let mut map: Array<MapData, [u8; LOCKDOWN_REASON_BYTES]> = open(pin_dir, LOCKDOWN)?;
    let mut value = [0u8; LOCKDOWN_REASON_BYTES];
    // Cut on a character boundary so the stored text stays valid UTF-8.
    let mut end = reason.len().min(LOCKDOWN_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].copy_from_slice(&reason.as_bytes()[..end]);
    map.set(0, value, 0)
        .map_err(|e| Error::kernel("cannot record the lockdown reason", e))
}

/// Why the scope is in lockdown, if it is (`None` also for scopes pinned before the map existed).
pub fn lockdown_reason(pin_dir: &Path) -> Option<String> {
    let map: Array<MapData, [u8; LOCKDOWN_REASON_BYTES]> = open(pin_dir, LOCKDOWN).ok()?;
    let value = map.get(&0, 0).ok()?;
    let text = String::from_utf8_lossy(&value);
    let text = text.trim_end_matches('\0');
    (!text.is_empty()).then(|| text.to_owned())
}

impl PinnedMaps {
    pub fn open(pin_dir: &Path) -> Result<PinnedMaps> {
        super::shapes::check_not_staging(pin_dir)?;
        Ok(PinnedMaps {
            tunnels: open(pin_dir, TUNNELS)?,
            uplinks: open(pin_dir, UPLINKS)?,
            servers: open(pin_dir, SERVERS)?,
            server_names: open(pin_dir, SERVER_NAMES)?,
            settings: open(pin_dir, SETTINGS)?,
            counters: open(pin_dir, COUNTERS)?,
            ntp_servers: open(pin_dir, NTP_SERVERS)?,
            dns_servers: open(pin_dir, DNS_SERVERS)?,
            lan: open(pin_dir, LAN)?,
            inbound: open(pin_dir, INBOUND)?,
            vpn_clients: open(pin_dir, VPN_CLIENTS)?,
            event_limit: open(pin_dir, EVENT_LIMIT)?,
            recent_drops: open(pin_dir, RECENT_DROPS).ok(),
            tunnels_changed: open(pin_dir, TUNNELS_CHANGED).ok(),
            guarded: open(pin_dir, GUARDED).ok(),
            guard_counters: open(pin_dir, GUARD_COUNTERS).ok(),
            policy: open(pin_dir, POLICY).ok(),
        })
    }

    /// Makes the maps hold exactly `entries` without a moment that allows what neither the old
    /// nor the new policy allows: the stricter of both settings and only the uplinks and VPN
    /// client cgroups both have while the lists change (within each list additions land before removals, unless
    /// old and new together overflow the map), then the new uplinks, then the new settings.
    /// If the kernel refuses a change half-way, the maps go back to what they held (the same
    /// steps, towards the old entries): a failed update leaves the old policy, never a mix.
    pub fn write(&mut self, entries: &MapEntries) -> Result<()> {
        let before = self.entries()?;
        let Err(e) = self.change_to(entries) else {
            return Ok(());
        };
        match self.change_to(&before) {
            Ok(()) => Err(Error::kernel(
                "the update failed; the previous policy is back in force",
                e,
            )),
            Err(also) => Err(Error::kernel(
                format!("the update failed ({e}), and so did going back ({also})"),
                "the scope holds at most the old and the new lists with the stricter settings of \
                 both; run `killswitch up` again",
            )),
        }
    }

    /// [`PinnedMaps::write`] for maps this process made a moment ago and no program reads yet:
    /// no snapshot of what they held, so no way back.
    pub fn fill_new(&mut self, entries: &MapEntries) -> Result<()> {
        self.change_to(entries)
    }

    fn change_to(&mut self, entries: &MapEntries) -> Result<()> {
        // No policy recorded while the maps change: one that fails half-way matches no one's.
        self.record_policy(0)?;
        let old = self.settings()?;
        // The list bits follow what is written, whoever built the entries.
        let settings = Settings {
            empty_lists: entries.empty_lists(),
            tunnel_free: entries.interfaces.tunnel_free(),
            ..entries.settings
        };
        self.set_settings(&strictest(&old, &settings))?;
        let uplinks: BTreeSet<InterfaceKey> = entries.interfaces.uplinks.keys().copied().collect();
        shrink(&mut self.uplinks, &uplinks, UPLINKS)?;
        // While the servers change, the VPN clients both policies trust: where both hold the
        // servers to their clients, only the ones both list (the new ones come last); where
        // one lets every socket reach them, the other one's list (a client turned on or off
        // by a reload keeps its servers throughout).
        let restricts = (old.vpn_client != 0, entries.settings.vpn_client != 0);
        match restricts {
            (true, true) => shrink(&mut self.vpn_clients, &entries.vpn_clients, VPN_CLIENTS)?,
            (false, _) => {
                sync(
                    &mut self.vpn_clients,
                    entries.vpn_clients.iter().copied(),
                    VPN_CLIENTS,
                )?;
            }
            (true, false) => {}
        }
        self.sync_tunnels(&entries.interfaces)?;
        sync(&mut self.servers, entries.servers.iter().copied(), SERVERS)?;
        self.set_server_names(&entries.server_names)?;
        sync(
            &mut self.ntp_servers,
            entries.ntp_servers.iter().copied(),
            NTP_SERVERS,
        )?;
        sync(
            &mut self.dns_servers,
            entries.dns_servers.iter().copied(),
            DNS_SERVERS,
        )?;
        sync(&mut self.inbound, entries.inbound.iter().copied(), INBOUND)?;
        self.sync_lan(&entries.lan)?;
        self.sync_guarded(&entries.interfaces.guarded)?;
        sync(&mut self.uplinks, uplinks.into_iter(), UPLINKS)?;
        if restricts.1 {
            sync(
                &mut self.vpn_clients,
                entries.vpn_clients.iter().copied(),
                VPN_CLIENTS,
            )?;
        }
        self.set_settings(&settings)?;
        // Unrestricted now: the old list goes once nothing reads it.
        sync(
            &mut self.vpn_clients,
            entries.vpn_clients.iter().copied(),
            VPN_CLIENTS,
        )?;
        self.record_policy(entries.policy)
    }

    fn record_policy(&mut self, fingerprint: u64) -> Result<()> {
        match self.policy.as_mut() {
            Some(map) => map
                .set(0, fingerprint, 0)
                .map_err(|e| Error::kernel("cannot record the policy in force", e)),
            None => Ok(()),
        }
    }

    /// What the maps hold now (interface names are not kept in the kernel: empty).
    pub fn entries(&self) -> Result<MapEntries> {
        let unnamed =
            |keys: Vec<InterfaceKey>| keys.into_iter().map(|k| (k, String::new())).collect();
        Ok(MapEntries {
            settings: self.settings()?,
            interfaces: InterfaceEntries {
                tunnels: unnamed(self.tunnels()?),
                uplinks: unnamed(self.uplinks()?),
                guarded: self.guarded()?,
            },
            servers: self.servers()?.into_iter().collect(),
            server_names: self.server_names()?.into_iter().collect(),
            ntp_servers: self.ntp_servers()?.into_iter().collect(),
            dns_servers: self.dns_servers()?.into_iter().collect(),
            lan: self.lan()?.into_iter().collect(),
            inbound: self.inbound()?.into_iter().collect(),
            vpn_clients: keys(&self.vpn_clients, VPN_CLIENTS)?.into_iter().collect(),
            policy: self.policy().unwrap_or(0),
        })
    }

    /// The fingerprint of the policy the maps were last written from (`up`, a reload); `None`
    /// when none was recorded.
    pub fn policy(&self) -> Option<u64> {
        self.policy
            .as_ref()?
            .get(&0, 0)
            .ok()
            .filter(|fingerprint| *fingerprint != 0)
    }

    /// The guard's devices: ifindex -> (no name, link-layer header length).
    pub fn guarded(&self) -> Result<super::guard::Guarded> {
        let Some(map) = &self.guarded else {
            return Ok(Default::default());
        };
        map.iter()
            .map(|entry| entry.map(|(ifindex, header)| (ifindex, (String::new(), header))))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::kernel(format!("cannot read the {GUARDED} map"), e))
    }

    /// Adds `new` to the guard's device map, removing nothing.
    pub fn add_guarded(&mut self, new: &super::guard::Guarded) -> Result<()> {
        let map = self.guarded.as_mut().ok_or_else(|| {
            Error::kernel(
                format!("the {GUARDED} map is missing"),
                "run `killswitch down` and `up` again",
            )
        })?;
        for (&ifindex, (_, header)) in new {
            map.insert(ifindex, header, 0)
                .map_err(|e| Error::kernel(format!("cannot update the {GUARDED} map"), e))?;
        }
        Ok(())
    }

    /// Removes `gone` from the guard's device map.
    pub fn remove_guarded(&mut self, gone: &[u32]) -> Result<()> {
        let Some(map) = self.guarded.as_mut() else {
            return Ok(());
        };
        for ifindex in gone {
            map.remove(ifindex)
                .map_err(|e| Error::kernel(format!("cannot update the {GUARDED} map"), e))?;
        }
        Ok(())
    }

    /// Makes the guard's device map hold exactly `wanted` (new entries first).
    fn sync_guarded(&mut self, wanted: &super::guard::Guarded) -> Result<()> {
        let current = self.guarded()?;
        let Some(map) = self.guarded.as_mut() else {
            return if wanted.is_empty() {
                Ok(())
            } else {
                Err(Error::kernel(
                    format!("the {GUARDED} map is missing"),
                    "run `killswitch down` and `up` again",
                ))
            };
        };
        let failed = |e| Error::kernel(format!("cannot update the {GUARDED} map"), e);
        for (&ifindex, (_, header)) in wanted {
            if current.get(&ifindex).map(|(_, h)| h) != Some(header) {
                map.insert(ifindex, header, 0).map_err(failed)?;
            }
        }
        for ifindex in current.keys().filter(|i| !wanted.contains_key(i)) {
            map.remove(ifindex).map_err(failed)?;
        }
        Ok(())
    }

    /// Sets only the guard switch (see [`crate::ebpf::apply`]: on once the guard runs).
    pub fn set_guard(&mut self, on: bool) -> Result<()> {
        let settings = Settings {
            guard: u32::from(on),
            ..self.settings()?
        };
        self.set_settings(&settings)
    }

    fn set_settings(&mut self, settings: &Settings) -> Result<()> {
        self.settings
            .set(0, *settings, 0)
            .map_err(|e| Error::kernel("cannot update the settings map", e))
    }

    /// Makes only the VPN client cgroups match `entries` (a client's cgroup came or went), with
    /// the stricter settings of old and new while they change.
    pub fn write_vpn_clients(&mut self, entries: &MapEntries) -> Result<()> {
        let mut settings = self.settings()?;
        let mut wanted = settings;
        wanted.vpn_client = entries.settings.vpn_client;
        wanted.vpn_client_mark = entries.settings.vpn_client_mark;
        wanted.vpn_client_levels = entries.settings.vpn_client_levels;
        settings = strictest(&settings, &wanted);
        self.set_settings(&settings)?;
        sync(
            &mut self.vpn_clients,
            entries.vpn_clients.iter().copied(),
            VPN_CLIENTS,
        )?;
        self.set_settings(&wanted)
    }

    /// Makes only the tunnel, uplink and guard device maps match `entries` (interfaces came or
    /// went).
    pub fn write_interfaces(&mut self, entries: &InterfaceEntries) -> Result<()> {
        sync(&mut self.uplinks, entries.uplinks.keys().copied(), UPLINKS)?;
        self.sync_guarded(&entries.guarded)?;
        self.sync_tunnels(entries)
    }

    /// Makes the tunnel map match `entries` and notes the time when that changed it. The new
    /// tunnels' bits are cleared before they land and the gone ones' set after they went, so
    /// no program skips the lookup of a tunnel the map holds.
    fn sync_tunnels(&mut self, entries: &InterfaceEntries) -> Result<()> {
        let free = entries.tunnel_free();
        self.set_tunnel_free(|held| held & free)?;
        let changed = sync(&mut self.tunnels, entries.tunnels.keys().copied(), TUNNELS)?;
        self.set_tunnel_free(|_| free)?;
        // Only for `status`: its failure must not fail (and roll back) a policy update.
        if let (true, Some(map)) = (changed, self.tunnels_changed.as_mut()) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            if let Err(e) = map.set(0, now, 0) {
                tracing::warn!("cannot record when the tunnels changed: {e}");
            }
        }
        Ok(())
    }

    /// Writes the settings with `tunnel_free` changed by `change`, if that changes it.
    fn set_tunnel_free(&mut self, change: impl FnOnce(u64) -> u64) -> Result<()> {
        let settings = self.settings()?;
        let tunnel_free = change(settings.tunnel_free);
        if tunnel_free == settings.tunnel_free {
            return Ok(());
        }
        self.set_settings(&Settings {
            tunnel_free,
            ..settings
        })
    }

    /// When the tunnel entries last changed; `None` if never (or before this record existed).
    pub fn tunnels_changed(&self) -> Option<std::time::SystemTime> {
        let ns = self
            .tunnels_changed
            .as_ref()?
            .get(&0, 0)
            .ok()
            .filter(|ns| *ns != 0)?;
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns))
    }

    /// The newest drop events the CPUs kept, newest first, at most `count`.
    pub fn recent_drops(&self, count: usize) -> Result<Vec<DropEvent>> {
        let mut all = Vec::new();
        let Some(recent_drops) = &self.recent_drops else {
            return Ok(all);
        };
        for slot in 0..RECENT_DROPS_PER_CPU {
            let values = recent_drops
                .get(&slot, 0)
                .map_err(|e| Error::kernel("cannot read the recent drops map", e))?;
            all.extend(values.iter().copied().filter(|e| e.timestamp_ns != 0));
        }
        all.sort_by_key(|e| std::cmp::Reverse(e.timestamp_ns));
        all.truncate(count);
        Ok(all)
    }

    /// Makes the server map hold exactly `servers`, adding before removing.
    /// Returns how many endpoints the map holds now.
    pub fn set_servers(&mut self, servers: &BTreeSet<ServerKey>) -> Result<usize> {
        // The new kinds are looked up before their entries land; the old ones stop after
        // theirs went.
        self.add_server_kinds(servers)?;
        sync(&mut self.servers, servers.iter().copied(), SERVERS)?;
        self.set_server_kinds(servers.iter())?;
        Ok(servers.len())
    }

    /// Clears the empty bits of the kinds of `servers` (before they are added).
    fn add_server_kinds(&mut self, servers: &BTreeSet<ServerKey>) -> Result<()> {
        let mut settings = self.settings()?;
        settings.empty_lists &= !server_kinds(servers.iter());
        self.set_settings(&settings)
    }

    /// Makes the server bits say what `held` has (once the map holds exactly them).
    fn set_server_kinds<'a>(&mut self, held: impl Iterator<Item = &'a ServerKey>) -> Result<()> {
        let mut settings = self.settings()?;
        settings.empty_lists =
            (settings.empty_lists & !lists::SERVERS) | (lists::SERVERS & !server_kinds(held));
        self.set_settings(&settings)
    }

    /// Records which hostname put which server entry in place (read back by
    /// [`PinnedMaps::server_names`] when a name later fails to resolve).
    pub fn set_server_names(&mut self, names: &BTreeSet<NamedServerKey>) -> Result<()> {
        sync(&mut self.server_names, names.iter().copied(), SERVER_NAMES)?;
        Ok(())
    }

    /// Adds one record to `SERVER_NAMES` (see `servers::COMMAND_OWNS_THE_LIST`).
    pub fn mark_server_names(&mut self, key: NamedServerKey) -> Result<()> {
        self.server_names
            .insert(key, 1, 0)
            .map_err(|e| Error::kernel("cannot update the SERVER_NAMES map", e))
    }

    pub fn has_server_name(&self, key: &NamedServerKey) -> Result<bool> {
        match self.server_names.get(key, 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(Error::kernel("cannot read the SERVER_NAMES map", e)),
        }
    }

    pub fn server_names(&self) -> Result<Vec<NamedServerKey>> {
        keys(&self.server_names, SERVER_NAMES)
    }

    /// Returns how many endpoints were given.
    pub fn add_servers(&mut self, servers: &BTreeSet<ServerKey>) -> Result<usize> {
        self.add_server_kinds(servers)?;
        for key in servers {
            self.servers
                .insert(key, 1, 0)
                .map_err(|e| Error::kernel("cannot update the SERVERS map", e))?;
        }
        Ok(servers.len())
    }

    /// Returns how many endpoints were given.
    pub fn remove_servers(&mut self, servers: &BTreeSet<ServerKey>) -> Result<usize> {
        for key in servers {
            match self.servers.remove(key) {
                Ok(()) => {}
                // Removing what is not there is what the caller wanted.
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::kernel("cannot update the SERVERS map", e)),
            }
        }
        let held = self.servers()?;
        self.set_server_kinds(held.iter())?;
        Ok(servers.len())
    }

    fn sync_lan(&mut self, desired: &BTreeSet<(u32, [u8; 16])>) -> Result<()> {
        let failed = |e: aya::maps::MapError| Error::kernel("cannot update the LAN map", e);
        let failed_io = |e: std::io::Error| Error::kernel("cannot update the LAN map", e);
        let current: BTreeSet<(u32, [u8; 16])> = self.lan()?.into_iter().collect();
        let fd = self
            .lan
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(failed_io)?;
        let keys_of = |keys: &[(u32, [u8; 16])]| -> Vec<Key<[u8; 16]>> {
            keys.iter()
                .map(|&(len, data)| Key::new(len, data))
                .collect()
        };
        // One batch per step where the kernel has batch writes for the trie; else one key at a
        // time (4,000 prefixes: about 5 ms of kernel time against 12).
        let lan = std::cell::RefCell::new(&mut self.lan);
        apply_difference(
            &current,
            desired,
            LAN,
            &mut |keys| {
                let keys = keys_of(keys);
                match sys::map_update_batch(fd.as_fd(), &keys, &vec![1u8; keys.len()]) {
                    Err(e) if sys::unsupported(&e) => keys
                        .iter()
                        .try_for_each(|key| lan.borrow_mut().insert(key, 1, 0).map_err(failed)),
                    done => done.map_err(failed_io),
                }
            },
            &mut |keys| {
                let keys = keys_of(keys);
                match sys::map_delete_batch(fd.as_fd(), &keys) {
                    Err(e) if sys::unsupported(&e) => keys
                        .iter()
                        .try_for_each(|key| lan.borrow_mut().remove(key).map_err(failed)),
                    done => done.map_err(failed_io),
                }
            },
        )
    }

    pub fn tunnels(&self) -> Result<Vec<InterfaceKey>> {
        keys(&self.tunnels, TUNNELS)
    }

    pub fn uplinks(&self) -> Result<Vec<InterfaceKey>> {
        keys(&self.uplinks, UPLINKS)
    }

    pub fn servers(&self) -> Result<Vec<ServerKey>> {
        keys(&self.servers, SERVERS)
    }

    pub fn ntp_servers(&self) -> Result<Vec<[u8; 16]>> {
        keys(&self.ntp_servers, NTP_SERVERS)
    }

    pub fn dns_servers(&self) -> Result<Vec<[u8; 16]>> {
        keys(&self.dns_servers, DNS_SERVERS)
    }

    pub fn inbound(&self) -> Result<Vec<InboundKey>> {
        keys(&self.inbound, INBOUND)
    }

    /// LAN prefixes as (length in the 128-bit key space, key), sorted.
    pub fn lan(&self) -> Result<Vec<(u32, [u8; 16])>> {
        let keys = all_keys::<Key<[u8; 16]>>(self.lan.map(), self.lan.keys(), "LAN")?;
        let mut prefixes: Vec<_> = keys.iter().map(|k| (k.prefix_len(), k.data())).collect();
        prefixes.sort();
        Ok(prefixes)
    }

    /// Drop events held back by the rate limit or a full ring buffer, summed over CPUs.
    pub fn suppressed_events(&self) -> Result<u64> {
        let values = self
            .event_limit
            .get(&0, 0)
            .map_err(|e| Error::kernel("cannot read the event limit map", e))?;
        Ok(values.iter().map(|v| v.suppressed_total).sum())
    }

    pub fn settings(&self) -> Result<Settings> {
        self.settings
            .get(&0, 0)
            .map_err(|e| Error::kernel("cannot read the settings map", e))
    }

    /// Packets counted per direction and reason, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Direction, Reason, u64)>> {
        sums(&self.counters, COUNTERS)
    }

    /// The guard's verdicts, as [`PinnedMaps::counters`]; none before the guard's map existed.
    pub fn guard_counters(&self) -> Result<Vec<(Direction, Reason, u64)>> {
        self.guard_counters
            .as_ref()
            .map_or(Ok(Vec::new()), |map| sums(map, GUARD_COUNTERS))
    }
}

/// A counter map's values per direction and reason, summed over CPUs.
fn sums(map: &PerCpuArray<MapData, u64>, name: &str) -> Result<Vec<(Direction, Reason, u64)>> {
    let mut out = Vec::new();
    for direction in Direction::ALL {
        for reason in Reason::ALL {
            let index = reason.counter_index(direction);
            debug_assert!(index < COUNTER_ENTRIES);
            let values = map
                .get(&index, 0)
                .map_err(|e| Error::kernel(format!("cannot read the {name} map"), e))?;
            out.push((direction, reason, values.iter().sum()));
        }
    }
    Ok(out)
}

fn keys<K: Pod + Ord>(map: &HashMap<MapData, K, u8>, name: &str) -> Result<Vec<K>> {
    let mut keys = all_keys(map.map(), map.keys(), name)?;
    keys.sort();
    Ok(keys)
}

/// Every key of a map of `K` → u8, in batches where the kernel can (see
/// [`sys::map_keys_batch`]), else by `walk` (aya's key iterator: nothing is read until used).
fn all_keys<K: Pod>(
    map: &MapData,
    walk: impl Iterator<Item = std::result::Result<K, aya::maps::MapError>>,
    name: &str,
) -> Result<Vec<K>> {
    let what = format!("cannot read the {name} map");
    match sys::map_keys_batch::<K, u8>(map.fd().as_fd()) {
        Ok(Some(keys)) => Ok(keys),
        Ok(None) => walk
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::kernel(what, e)),
        Err(e) => Err(Error::kernel(what, e)),
    }
}

/// Removes every key that is not in `keep` (adds nothing).
fn shrink<K: Pod + Ord>(
    map: &mut HashMap<MapData, K, u8>,
    keep: &BTreeSet<K>,
    name: &str,
) -> Result<()> {
    for key in keys(map, name)? {
        if !keep.contains(&key) {
            map.remove(&key)
                .map_err(|e| Error::kernel(format!("cannot update the {name} map"), e))?;
        }
    }
    Ok(())
}

/// Makes the map hold exactly `desired`; true when that changed it.
fn sync<K: Pod + Ord>(
    map: &mut HashMap<MapData, K, u8>,
    desired: impl Iterator<Item = K>,
    name: &str,
) -> Result<bool> {
    let desired: BTreeSet<K> = desired.collect();
    let current: BTreeSet<K> = keys(map, name)?.into_iter().collect();
    if current == desired {
        return Ok(false);
    }
    let failed = |e| Error::kernel(format!("cannot update the {name} map"), e);
    let fd = map.map().fd().as_fd();
    apply_difference(
        &current,
        &desired,
        name,
        &mut |keys| sys::map_update_batch(fd, keys, &vec![1u8; keys.len()]).map_err(failed),
        &mut |keys| sys::map_delete_batch(fd, keys).map_err(failed),
    )?;
    Ok(true)
}

/// How many entries the map called `name` holds (the object declares the same; a test checks).
pub fn capacity(name: &str) -> u32 {
    match name {
        TUNNELS | UPLINKS | GUARDED => MAX_INTERFACES,
        SERVERS => MAX_SERVERS,
        // One more: the `servers` command's mark always fits.
        SERVER_NAMES => MAX_SERVERS + 1,
        NTP_SERVERS | DNS_SERVERS | INBOUND => MAX_ADDRESSES,
        VPN_CLIENTS => MAX_VPN_CLIENTS,
        LAN => MAX_PREFIXES,
        _ => u32::MAX,
    }
}

/// Takes a map from `current` to `desired`: additions first, so nothing that stays in the
/// policy is missing for a moment, unless both together would not fit in the map; then
/// removals first, which only narrows. Each step is one batch.
fn apply_difference<K: Ord + Copy>(
    current: &BTreeSet<K>,
    desired: &BTreeSet<K>,
    name: &str,
    insert: &mut dyn FnMut(&[K]) -> Result<()>,
    remove: &mut dyn FnMut(&[K]) -> Result<()>,
) -> Result<()> {
    let adding: Vec<K> = desired.difference(current).copied().collect();
    let removing: Vec<K> = current.difference(desired).copied().collect();
    if current.len() + adding.len() > capacity(name) as usize {
        remove(&removing)?;
        insert(&adding)
    } else {
        insert(&adding)?;
        remove(&removing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn while_settings_change_every_list_and_tunnel_either_holds_is_looked_up() {
        let a = Settings {
            empty_lists: lists::NTP | lists::LAN,
            tunnel_free: !0b0110,
            ..Default::default()
        };
        let b = Settings {
            empty_lists: lists::LAN | lists::DNS,
            tunnel_free: !0b1010,
            ..Default::default()
        };
        let both = strictest(&a, &b);
        assert_eq!(both.empty_lists, lists::LAN);
        assert_eq!(both.tunnel_free, !0b1110);
        assert_eq!(strictest(&b, &a).tunnel_free, both.tunnel_free);
    }
}
