//! Turns configured server rules into concrete endpoints (hostnames through the system resolver).

use std::{collections::BTreeSet, net::ToSocketAddrs};

use super::{ServerAddress, ServerEndpoint, ServerRule};
use crate::error::{Error, Result};

/// Resolves every server; any name that does not resolve fails the whole call, so `up` never
/// applies a policy that silently lost a server.
pub fn resolve_servers(rules: &[ServerRule]) -> Result<Vec<ServerEndpoint>> {
    let mut endpoints = BTreeSet::new();
    for rule in rules {
        let addresses = match &rule.address {
            ServerAddress::Ip(ip) => vec![*ip],
            ServerAddress::Host(host) => lookup(host)?,
        };
        for address in addresses {
            endpoints.insert(ServerEndpoint {
                address,
                port: rule.port,
                protocol: rule.protocol,
            });
        }
    }
    Ok(endpoints.into_iter().collect())
}

/// The addresses of `host` through the system resolver.
pub fn lookup(host: &str) -> Result<Vec<std::net::IpAddr>> {
    let addresses: BTreeSet<_> = (host, 0)
        .to_socket_addrs()
        .map_err(|error| Error::Resolve {
            host: host.to_owned(),
            reason: error.to_string(),
        })?
        .map(|socket| socket.ip())
        .collect();
    if addresses.is_empty() {
        return Err(Error::Resolve {
            host: host.to_owned(),
            reason: "no addresses".into(),
        });
    }
    Ok(addresses.into_iter().collect())
}
