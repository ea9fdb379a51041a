//! The servers of the policy with their hostnames resolved, each name on its own schedule: again
//! when its records expire, or soon after a failure, which keeps the last known addresses. The
//! scope's `SERVER_NAMES` map records which name gave which entry, so that a name that fails at
//! the next `up` or daemon start keeps the addresses the scope already holds for it: a VPN
//! client that must reconnect while DNS is down still can.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

use killswitch_common::{NamedServerKey, ServerKey};

use crate::{
    ebpf::entries::{server_endpoint, server_key},
    error::{Error, Result},
    policy::{self, Lookup, Protocol, ServerAddress, ServerEndpoint, ServerRule},
};

/// A hostname rule: the same name with another port or protocol is another rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct HostRule {
    host: String,
    port: Option<u16>,
    protocol: Option<Protocol>,
}

#[derive(Clone, Debug)]
struct HostState {
    addresses: BTreeSet<IpAddr>,
    /// When to look the name up next.
    due: Instant,
    /// The last lookup failed (logged once, not on every retry).
    failing: bool,
}

#[derive(Clone, Debug, Default)]
pub struct ResolvedServers {
    /// Endpoints from rules with an IP address.
    fixed: BTreeSet<ServerEndpoint>,
    hosts: BTreeMap<HostRule, HostState>,
}

impl ResolvedServers {
    /// The servers of `rules`. A hostname rule that `previous` knows keeps its addresses and its
    /// schedule; a new one has no address yet and is due now.
    pub fn for_rules(rules: &[ServerRule], previous: Option<&ResolvedServers>) -> ResolvedServers {
        let now = Instant::now();
        let mut resolved = ResolvedServers::default();
        for rule in rules {
            match &rule.address {
                ServerAddress::Ip(address) => {
                    resolved.fixed.insert(ServerEndpoint {
                        address: *address,
                        port: rule.port,
                        protocol: rule.protocol,
                    });
                }
                ServerAddress::Host(host) => {
                    let key = HostRule {
                        host: host.clone(),
                        port: rule.port,
                        protocol: rule.protocol,
                    };
                    let state =
                        previous
                            .and_then(|p| p.hosts.get(&key))
                            .cloned()
                            .unwrap_or(HostState {
                                addresses: BTreeSet::new(),
                                due: now,
                                failing: false,
                            });
                    resolved.hosts.insert(key, state);
                }
            }
        }
        resolved
    }

    /// When the next name is due, if there are names.
    pub fn next_due(&self) -> Option<Instant> {
        self.hosts.values().map(|s| s.due).min()
    }

    /// The distinct names due by `now`. They are marked as asked for, so that a lookup that never
    /// answers is asked again only after the retry period.
    pub fn take_due(&mut self, now: Instant) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (rule, state) in &mut self.hosts {
            if state.due <= now {
                state.due = now + policy::RETRY;
                names.insert(rule.host.clone());
            }
        }
        names
    }

    /// Records the answer for `host` (every rule with that name). A failure keeps the last known
    /// addresses and is logged when it starts and when it ends, not on every retry.
    pub fn record(&mut self, host: &str, answer: &Result<Lookup>) {
        let now = Instant::now();
        for (rule, state) in self.hosts.iter_mut().filter(|(r, _)| r.host == host) {
            match answer {
                Ok(lookup) => {
                    if state.failing {
                        tracing::info!("{host} resolves again");
                    }
                    state.addresses = lookup.addresses.clone();
                    state.due = now + lookup.refresh_after;
                    state.failing = false;
                    tracing::debug!(
                        host,
                        port = rule.port,
                        addresses = lookup.addresses.len(),
                        refresh_s = lookup.refresh_after.as_secs(),
                        "resolved"
                    );
                }
                Err(e) => {
                    if !state.failing && !state.addresses.is_empty() {
                        tracing::warn!(
                            "{e}; keeping its {} last known addresses and retrying every {} s",
                            state.addresses.len(),
                            policy::RETRY.as_secs()
                        );
                    } else if !state.failing {
                        tracing::warn!("{e}; retrying every {} s", policy::RETRY.as_secs());
                    }
                    state.due = now + policy::RETRY;
                    state.failing = true;
                }
            }
        }
    }

    /// The servers of `rules` with every name looked up now, for the one-shot commands, and
    /// the lookups that failed.
    pub fn resolve_now(rules: &[ServerRule]) -> (ResolvedServers, Vec<Error>) {
        let mut servers = ResolvedServers::for_rules(rules, None);
        // The one-shot commands have no event loop of their own: one for all their lookups.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let failures = match runtime {
            Ok(runtime) => runtime.block_on(servers.look_up_all()),
            Err(e) => vec![Error::Runtime(format!("cannot start the resolver: {e}"))],
        };
        (servers, failures)
    }

    /// Looks up every due name now, all at once (the daemon's start, the one-shot commands).
    /// Returns the failures; their names keep what they had.
    pub async fn look_up_all(&mut self) -> Vec<Error> {
        let names = self.take_due(Instant::now());
        let answers = futures::future::join_all(
            names
                .into_iter()
                .map(|name| async move { (policy::lookup(&name).await, name) }),
        )
        .await;
        let mut failures = Vec::new();
        for (answer, name) in answers {
            self.record(&name, &answer);
            failures.extend(answer.err());
        }
        failures
    }

    /// Gives each name that is failing and has no address yet the addresses the scope's
    /// record says it had, as far as the scope still holds them (`held`): nothing comes back
    /// that the scope does not allow already.
    pub fn keep_known(&mut self, record: &[NamedServerKey], held: &BTreeSet<ServerKey>) {
        for (rule, state) in &mut self.hosts {
            if !state.failing || !state.addresses.is_empty() {
                continue;
            }
            let tag = name_tag(&rule.host);
            let kept: BTreeSet<IpAddr> = record
                .iter()
                .filter(|named| named.name == tag && held.contains(&named.server))
                .map(|named| server_endpoint(&named.server))
                .filter(|e| e.port == rule.port && e.protocol == rule.protocol)
                .map(|e| e.address)
                .collect();
            if !kept.is_empty() {
                tracing::warn!(
                    "{}: keeping the {} addresses the scope already holds for it until it resolves",
                    rule.host,
                    kept.len()
                );
                state.addresses = kept;
            }
        }
    }

    /// [`ResolvedServers::keep_known`] with the record and the entries pinned in `pin_dir`
    /// (nothing when the scope has none yet). Call it under the scope's lock.
    pub fn keep_known_in(&mut self, pin_dir: &std::path::Path) {
        if self.failing().next().is_none() {
            return;
        }
        let pinned = crate::ebpf::PinnedMaps::open(pin_dir).and_then(|maps| {
            let held: BTreeSet<ServerKey> = maps.servers()?.into_iter().collect();
            Ok((maps.server_names()?, held))
        });
        match pinned {
            Ok((record, held)) => self.keep_known(&record, &held),
            // A new scope, or one an older version made: nothing known to keep.
            Err(e) => tracing::debug!("no record of server names to keep: {e}"),
        }
    }

    /// The scope's record of which name gave which entry.
    pub fn record_of_names(&self) -> BTreeSet<NamedServerKey> {
        self.hosts
            .iter()
            .flat_map(|(rule, state)| {
                let name = name_tag(&rule.host);
                state.addresses.iter().map(move |&address| NamedServerKey {
                    name,
                    server: server_key(&ServerEndpoint {
                        address,
                        port: rule.port,
                        protocol: rule.protocol,
                    }),
                    _pad: 0,
                })
            })
            .collect()
    }

    /// Whether any name's last lookup failed.
    pub fn failing(&self) -> impl Iterator<Item = &str> {
        self.hosts
            .iter()
            .filter(|(_, state)| state.failing)
            .map(|(rule, _)| rule.host.as_str())
    }

    pub fn endpoints(&self) -> Vec<ServerEndpoint> {
        self.keys_and_endpoints().into_values().collect()
    }

    pub fn keys(&self) -> BTreeSet<ServerKey> {
        self.keys_and_endpoints().into_keys().collect()
    }

    fn keys_and_endpoints(&self) -> BTreeMap<ServerKey, ServerEndpoint> {
        let resolved = self.hosts.iter().flat_map(|(rule, state)| {
            state.addresses.iter().map(|&address| ServerEndpoint {
                address,
                port: rule.port,
                protocol: rule.protocol,
            })
        });
        self.fixed
            .iter()
            .copied()
            .chain(resolved)
            .map(|e| (server_key(&e), e))
            .collect()
    }
}

/// A stable 64-bit tag of a hostname (FNV-1a), the `name` of its [`NamedServerKey`]s.
pub const fn name_tag(host: &str) -> u64 {
    let bytes = host.as_bytes();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash = (hash ^ bytes[i] as u64).wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The `SERVER_NAMES` entry that says the `servers` command set the list in force. The list has
/// one owner at a time: `up` and a reload install the config's (and remove this entry); `servers
/// set|add|remove` take it over until then, and meanwhile the daemon's lookups change nothing.
/// (A NUL cannot be in a hostname, so no name has this tag.)
pub const COMMAND_OWNS_THE_LIST: NamedServerKey = NamedServerKey {
    name: name_tag("\0the servers command"),
    server: ServerKey::new([0; 16], 0, 0),
    _pad: 0,
};

/// Says so when `up` or a reload is about to replace a list the `servers` command set (call it
/// under the scope's lock, before the write).
pub fn note_replaced_command_list(pin_dir: &std::path::Path) {
    let owned = crate::ebpf::PinnedMaps::open(pin_dir)
        .and_then(|maps| maps.has_server_name(&COMMAND_OWNS_THE_LIST))
        .unwrap_or(false);
    say_replaced(owned);
}

/// [`note_replaced_command_list`] for the nftables backend's table.
pub fn note_replaced_command_list_in_table(scope: &crate::scope::Scope) {
    let owned = crate::backend::nftables::servers_set_by_command(scope);
    say_replaced(owned);
}

fn say_replaced(owned: bool) {
    if owned {
        tracing::warn!(
            "the config's servers replace the list set with `killswitch servers` (the config \
             owns the list again)"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn rule(address: &str, port: u16) -> ServerRule {
        ServerRule {
            address: address
                .parse()
                .map(ServerAddress::Ip)
                .unwrap_or_else(|_| ServerAddress::Host(address.into())),
            port: Some(port),
            protocol: None,
        }
    }

    fn answer(addresses: &[&str], ttl: u64) -> Result<Lookup> {
        Ok(Lookup {
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            refresh_after: Duration::from_secs(ttl),
        })
    }

    fn failed(host: &str) -> Result<Lookup> {
        Err(Error::Resolve {
            host: host.into(),
            reason: "timed out".into(),
        })
    }

    #[test]
    fn a_name_that_fails_keeps_what_the_record_and_the_scope_hold_for_it() {
        let rules = [
            rule("vpn.example.test", 1194),
            rule("other.example.test", 1194),
        ];
        let mut before = ResolvedServers::for_rules(&rules, None);
        before.take_due(Instant::now());
        before.record(
            "vpn.example.test",
            &answer(&["198.51.100.7", "198.51.100.8"], 300),
        );
        before.record("other.example.test", &answer(&["198.51.100.9"], 300));
        let record: Vec<_> = before.record_of_names().into_iter().collect();
        let mut held = before.keys();

        // Next start: every name fails. Only what the scope still holds comes back, and
        // only for the name that had it.
        held.remove(&server_key(&ServerEndpoint {
            address: "198.51.100.8".parse().unwrap(),
            port: Some(1194),
            protocol: None,
        }));
        let mut after = ResolvedServers::for_rules(&rules, None);
        after.take_due(Instant::now());
        after.record("vpn.example.test", &failed("vpn.example.test"));
        after.record("other.example.test", &failed("other.example.test"));
        after.keep_known(&record, &held);
        let kept: BTreeSet<String> = after
            .endpoints()
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(
            kept,
            BTreeSet::from(["198.51.100.7".into(), "198.51.100.9".into()])
        );
        assert_eq!(after.record_of_names().len(), 2, "the record is carried on");

        // A name that resolves takes its answer, not the record; another port is another rule.
        let mut moved = ResolvedServers::for_rules(&[rule("vpn.example.test", 443)], None);
        moved.take_due(Instant::now());
        moved.record("vpn.example.test", &failed("vpn.example.test"));
        moved.keep_known(&record, &held);
        assert!(moved.endpoints().is_empty());
    }

    #[test]
    fn a_failure_keeps_the_last_addresses_and_a_reload_keeps_known_names() {
        let rules = [rule("198.51.100.1", 1194), rule("vpn.example.test", 1194)];
        let mut servers = ResolvedServers::for_rules(&rules, None);
        assert_eq!(servers.keys().len(), 1, "the name has no address yet");
        let now = Instant::now();
        assert_eq!(servers.take_due(now).len(), 1);
        assert!(servers.take_due(now).is_empty(), "asked for: not due twice");
        servers.record("vpn.example.test", &answer(&["198.51.100.7"], 300));
        assert_eq!(servers.keys().len(), 2);
        let due = servers.next_due().unwrap();
        assert!(
            due > now + Duration::from_secs(299),
            "the TTL sets the schedule"
        );

        servers.record("vpn.example.test", &failed("vpn.example.test"));
        assert_eq!(servers.keys().len(), 2, "a failure keeps the addresses");
        assert!(servers.next_due().unwrap() < now + Duration::from_secs(60));

        let reloaded = ResolvedServers::for_rules(&rules[1..], Some(&servers));
        assert_eq!(
            reloaded.endpoints().len(),
            1,
            "the kept name keeps its address"
        );
        let moved = ResolvedServers::for_rules(&[rule("vpn.example.test", 443)], Some(&servers));
        assert!(moved.keys().is_empty(), "another port is another rule");
    }
}
