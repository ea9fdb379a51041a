//! The servers of the policy with their hostnames resolved, kept across re-resolutions.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use killswitch_common::ServerKey;

use crate::{
    ebpf::entries::server_key,
    policy::{lookup, ServerAddress, ServerEndpoint, ServerRule},
};

/// How often hostnames are resolved again. The system resolver does not report record TTLs, so
/// this is a fixed period between the shortest TTLs VPN providers use and an hour.
pub const REFRESH: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Default)]
pub struct ResolvedServers {
    /// Endpoints from rules with an IP address.
    fixed: BTreeSet<ServerEndpoint>,
    /// Per hostname rule (by its index in the config), the addresses it last resolved to.
    hosts: BTreeMap<usize, BTreeSet<ServerEndpoint>>,
}

impl ResolvedServers {
    /// Resolves every rule; a name that fails keeps what `previous` had for it (nothing at first).
    pub fn resolve(rules: &[ServerRule], previous: Option<&ResolvedServers>) -> ResolvedServers {
        let mut resolved = ResolvedServers::default();
        for (index, rule) in rules.iter().enumerate() {
            let endpoint = |address| ServerEndpoint {
                address,
                port: rule.port,
                protocol: rule.protocol,
            };
            match &rule.address {
                ServerAddress::Ip(ip) => {
                    resolved.fixed.insert(endpoint(*ip));
                }
                ServerAddress::Host(host) => {
                    let endpoints = match lookup(host) {
                        Ok(addresses) => addresses.into_iter().map(endpoint).collect(),
                        Err(e) => {
                            let kept = previous
                                .and_then(|p| p.hosts.get(&index))
                                .cloned()
                                .unwrap_or_default();
                            tracing::warn!("{e}; keeping its {} last known addresses", kept.len());
                            kept
                        }
                    };
                    resolved.hosts.insert(index, endpoints);
                }
            }
        }
        resolved
    }

    pub fn has_hostnames(&self) -> bool {
        !self.hosts.is_empty()
    }

    pub fn endpoints(&self) -> Vec<ServerEndpoint> {
        self.keys_and_endpoints().into_values().collect()
    }

    /// Map keys to add and to remove to go from `self` to `fresh`.
    pub fn difference(
        &self,
        fresh: &ResolvedServers,
    ) -> (BTreeSet<ServerKey>, BTreeSet<ServerKey>) {
        let old: BTreeSet<ServerKey> = self.keys_and_endpoints().into_keys().collect();
        let new: BTreeSet<ServerKey> = fresh.keys_and_endpoints().into_keys().collect();
        (
            new.difference(&old).copied().collect(),
            old.difference(&new).copied().collect(),
        )
    }

    fn keys_and_endpoints(&self) -> BTreeMap<ServerKey, ServerEndpoint> {
        self.fixed
            .iter()
            .chain(self.hosts.values().flatten())
            .map(|e| (server_key(e), *e))
            .collect()
    }
}
