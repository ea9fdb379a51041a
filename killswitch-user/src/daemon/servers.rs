//! The servers of the policy with their hostnames resolved, each name on its own schedule: again
//! when its records expire, or soon after a failure, which keeps the last known addresses.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

use killswitch_common::ServerKey;

use crate::{
    ebpf::entries::server_key,
    error::Result,
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
    pub fn record(&mut self, host: &str, answer: Result<Lookup>) {
        let now = Instant::now();
        for (rule, state) in self.hosts.iter_mut().filter(|(r, _)| r.host == host) {
            match &answer {
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
                    if !state.failing {
                        tracing::warn!(
                            "{e}; keeping its {} last known addresses and retrying every {} s",
                            state.addresses.len(),
                            policy::RETRY.as_secs()
                        );
                    }
                    state.due = now + policy::RETRY;
                    state.failing = true;
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::Error;

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

    #[test]
    fn a_failure_keeps_the_last_addresses_and_a_reload_keeps_known_names() {
        let rules = [rule("198.51.100.1", 1194), rule("vpn.example.test", 1194)];
        let mut servers = ResolvedServers::for_rules(&rules, None);
        assert_eq!(servers.keys().len(), 1, "the name has no address yet");
        let now = Instant::now();
        assert_eq!(servers.take_due(now).len(), 1);
        assert!(servers.take_due(now).is_empty(), "asked for: not due twice");
        servers.record("vpn.example.test", answer(&["198.51.100.7"], 300));
        assert_eq!(servers.keys().len(), 2);
        let due = servers.next_due().unwrap();
        assert!(
            due > now + Duration::from_secs(299),
            "the TTL sets the schedule"
        );

        servers.record(
            "vpn.example.test",
            Err(Error::Resolve {
                host: "vpn.example.test".into(),
                reason: "timed out".into(),
            }),
        );
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
