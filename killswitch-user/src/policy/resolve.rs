//! Turns configured server rules into concrete endpoints. Hostnames go to the resolvers of
//! `/etc/resolv.conf` (and `/etc/hosts`) through hickory, which, unlike getaddrinfo, reports how
//! long an answer stays valid, so the daemon can re-resolve when the records expire.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use hickory_resolver::{config::LookupIpStrategy, TokioResolver};

use super::{ServerEndpoint, ServerRule};
use crate::error::{Error, Result};

/// Answers are looked up again after their TTL, but never sooner than this (a TTL of 0 would
/// otherwise mean a query in a loop)...
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
/// ...and never later than this, so a changed server list is seen within the hour.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// A failed lookup is retried after this; the name keeps its last known addresses meanwhile.
pub const RETRY: Duration = Duration::from_secs(10);

/// Most addresses one name may put in the server map; more are dropped with a warning (a
/// hostile resolver must not fill the map).
pub const MAX_ADDRESSES_PER_NAME: usize = 64;

/// The addresses of one hostname and when to ask again.
#[derive(Clone, Debug)]
pub struct Lookup {
    pub addresses: BTreeSet<IpAddr>,
    /// The records' TTL, held between [`MIN_REFRESH`] and [`MAX_REFRESH`].
    pub refresh_after: Duration,
}

/// Looks `host` up (A and AAAA) with the resolver configuration as it is now: a VPN client may
/// have rewritten `/etc/resolv.conf` since the last time.
pub async fn lookup(host: &str) -> Result<Lookup> {
    tokio::time::timeout(LOOKUP_LIMIT, lookup_unbounded(host))
        .await
        .unwrap_or_else(|_| {
            Err(Error::Resolve {
                host: host.to_owned(),
                reason: format!("no answer within {} s", LOOKUP_LIMIT.as_secs()),
            })
        })
}

/// Longest a hostname lookup may take before it counts as failed.
pub const LOOKUP_LIMIT: Duration = Duration::from_secs(30);

async fn lookup_unbounded(host: &str) -> Result<Lookup> {
    let failed = |reason: String| Error::Resolve {
        host: host.to_owned(),
        reason,
    };
    let mut builder = TokioResolver::builder_tokio()
        .map_err(|e| failed(format!("cannot read the resolver configuration: {e}")))?;
    // A fresh resolver each time, so its cache never answers: the caller schedules by TTL.
    builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    let resolver = builder.build().map_err(|e| failed(e.to_string()))?;
    let answer = resolver
        .lookup_ip(host)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let addresses = usable_answers(host, answer.iter());
    if addresses.is_empty() {
        return Err(failed("no usable addresses".into()));
    }
    let ttl = answer
        .valid_until()
        .saturating_duration_since(Instant::now());
    Ok(Lookup {
        addresses,
        refresh_after: ttl.clamp(MIN_REFRESH, MAX_REFRESH),
    })
}

/// The answers a server may have: the same rule as configured addresses (no unspecified,
/// broadcast, multicast, loopback or link-local address), at most [`MAX_ADDRESSES_PER_NAME`].
pub fn usable_answers(host: &str, answers: impl Iterator<Item = IpAddr>) -> BTreeSet<IpAddr> {
    let mut usable = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for ip in answers.map(|ip| ip.to_canonical()) {
        match super::not_a_peer(ip) {
            Some(_) => {
                refused.insert(ip);
            }
            None => {
                usable.insert(ip);
            }
        }
    }
    if !refused.is_empty() {
        tracing::warn!("{host}: ignoring answers that cannot be a server: {refused:?}");
    }
    if usable.len() > MAX_ADDRESSES_PER_NAME {
        tracing::warn!(
            "{host}: {} addresses, keeping the first {MAX_ADDRESSES_PER_NAME}",
            usable.len()
        );
        usable = usable.into_iter().take(MAX_ADDRESSES_PER_NAME).collect();
    }
    usable
}

/// Every endpoint the rules name, and one error per hostname that did not resolve. A name that
/// fails contributes no endpoint: its server stays blocked (fail closed) until it resolves.
pub fn resolve_servers(rules: &[ServerRule]) -> (Vec<ServerEndpoint>, Vec<Error>) {
    let (servers, failures) = crate::servers::ResolvedServers::resolve_now(rules);
    (servers.endpoints(), failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_that_cannot_be_servers_are_dropped_and_a_name_is_capped() {
        let bad = [
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.251",
            "127.0.0.1",
            "169.254.1.1",
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
        ];
        let good = (0..3000u32).map(|i| IpAddr::from((0xc633_6400u32 + i).to_be_bytes()));
        let answers = bad.iter().map(|a| a.parse().unwrap()).chain(good);
        let usable = usable_answers("vpn.example", answers);
        assert_eq!(usable.len(), MAX_ADDRESSES_PER_NAME);
        assert!(usable
            .iter()
            .all(|ip| super::super::not_a_peer(*ip).is_none()));
        // An IPv4-mapped answer counts as the IPv4 address it spells.
        let mapped = usable_answers(
            "vpn.example",
            ["::ffff:198.51.100.7".parse().unwrap()].into_iter(),
        );
        assert_eq!(mapped, BTreeSet::from(["198.51.100.7".parse().unwrap()]));
    }
}
