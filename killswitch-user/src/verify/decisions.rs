//! Generated packets against the model: at least [`PACKETS`] aimed at the policy's entries and
//! edges, more (up to [`MOST`]) until every verdict step the policy can reach was reached.

use std::collections::BTreeSet;

use killswitch_common::Reason;

use super::{count, Check};
use crate::{
    model::{self, Direction, Interface, Packet},
    packets::Rng,
    policy::{Ipv6Mode, Policy},
    sample,
};

pub const PACKETS: usize = 1000;
const MOST: usize = 5000;
const CHECK: &str = "decisions";

/// What the filter under test made of one packet: allowed, and what it counted.
pub type Judged = (bool, Counted);

/// The counters a packet moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// The filter cannot tell (nftables: its counters are shared by the whole batch).
    Unknown,
    /// Exactly one reason's counter, as every packet must.
    One(Reason),
    /// This many counters moved instead of one: a mismatch whatever the verdict.
    Not(usize),
}

/// Packets drawn and judged at once.
const BATCH: usize = 100;

/// Runs packets through `judge`, a batch at a time, and compares each with the model as
/// `filter` reads packets. `judge` gives `None` for a packet it cannot judge (the kernel
/// itself does not deliver it without a filter either). `clients`: whether `judge` can send as
/// the VPN client (else every packet is from anyone else).
pub fn compare(
    policy: &Policy,
    filter: model::Filter,
    what: &str,
    clients: bool,
    mut judge: impl FnMut(&[Packet]) -> crate::Result<Vec<Option<Judged>>>,
) -> Check {
    let mut reachable = reachable(policy);
    // Without a socket in a client cgroup, no drawn packet is the VPN client's.
    let no_client = policy.vpn_client.is_some() && !clients;
    if no_client {
        reachable.remove(&Reason::Server);
    }
    let (v4, v6) = sample::aimed(policy);
    let seed = u64::from(std::process::id()) ^ 0x7e51;
    let mut rng = Rng::new(seed);
    let mut seen = BTreeSet::new();
    let (mut compared, mut drawn) = (0, 0);
    while compared < PACKETS || (drawn < MOST && !reachable.is_subset(&seen)) {
        if drawn >= 4 * MOST {
            break;
        }
        let batch: Vec<Packet> = (0..BATCH)
            .map(|_| {
                let mut packet = sample::steered_packet(&mut rng, policy, &v4, &v6);
                packet.vpn_client &= clients;
                packet
            })
            .collect();
        drawn += batch.len();
        let judged = match judge(&batch) {
            Ok(judged) => judged,
            Err(e) => {
                return Check::fail(
                    CHECK,
                    format!("packets could not be run: {e}"),
                    "run with -v, and report it with `killswitch --version`",
                )
            }
        };
        for (packet, judged) in batch.iter().zip(judged) {
            let Some(judged) = judged else {
                continue;
            };
            let (verdict, reason) = model::verdict_of(filter, policy, packet);
            let allowed = verdict == model::Verdict::Allow;
            let counted_right = match judged.1 {
                Counted::Unknown => true,
                Counted::One(counted) => counted == reason,
                Counted::Not(_) => false,
            };
            if judged.0 != allowed || !counted_right {
                return Check::fail(
                    CHECK,
                    format!(
                        "{what} {}{} where the policy says {} {}: {}",
                        if judged.0 { "allowed" } else { "dropped" },
                        match judged.1 {
                            Counted::Unknown => String::new(),
                            Counted::One(r) => format!(" {}", r.name()),
                            Counted::Not(n) => format!(" (counted {n} reasons, not one)"),
                        },
                        if allowed { "allow" } else { "drop" },
                        reason.name(),
                        describe(packet)
                    ),
                    "run `killswitch up` to put this build's policy in force; if it persists, report it",
                );
            }
            seen.insert(reason);
            compared += 1;
        }
    }
    let missed: Vec<&str> = reachable.difference(&seen).map(|r| r.name()).collect();
    let skipped = drawn - compared;
    let reached = format!(
        "{} through {what}, each as the policy says{}; {} of {} reachable steps reached",
        count(compared, "packet"),
        if skipped > 0 {
            format!(
                " ({skipped} more not compared: the kernel does not deliver them even unfiltered)"
            )
        } else {
            String::new()
        },
        reachable.intersection(&seen).count(),
        reachable.len()
    );
    if compared < PACKETS {
        return Check::fail(
            CHECK,
            format!("only {reached}"),
            "run `killswitch verify -v` and report it",
        );
    }
    let reached = if no_client {
        format!(
            "{reached}; the VPN client's own packets not drawn (verify runs in the cgroup2 root)"
        )
    } else {
        reached
    };
    if missed.is_empty() {
        Check::pass(CHECK, reached)
    } else {
        Check::warn(
            CHECK,
            format!("{reached}; never reached: {}", missed.join(", ")),
            "run `killswitch verify` again (the packets are drawn anew); if a step is never reached, report it",
        )
    }
}

/// The verdict steps `policy` can reach with the packets [`sample`] draws.
fn reachable(policy: &Policy) -> BTreeSet<Reason> {
    let mut steps: BTreeSet<Reason> = [
        Reason::Loopback,
        Reason::Tunnel,
        Reason::Default,
        Reason::SourceRoute,
    ]
    .into();
    let literal_servers = policy
        .servers
        .iter()
        .any(|s| matches!(s.address, crate::policy::ServerAddress::Ip(_)));
    let optional = [
        (policy.uplinks.is_some(), Reason::NotUplink),
        (literal_servers, Reason::Server),
        (policy.dhcp, Reason::Dhcp),
        (!policy.ntp_servers.is_empty(), Reason::Ntp),
        (!policy.dns_servers.is_empty(), Reason::Dns),
        (!policy.lan.networks.is_empty(), Reason::Lan),
        (
            !policy.lan.networks.is_empty() && !policy.lan.dns,
            Reason::LanDns,
        ),
        (policy.ipv6 == Ipv6Mode::Block, Reason::Ipv6Blocked),
        (policy.ipv6 == Ipv6Mode::Tunnel, Reason::NeighbourDiscovery),
        (literal_servers, Reason::IcmpError),
        (true, Reason::InboundRefused),
        (
            literal_servers && policy.vpn_client.is_some(),
            Reason::NotVpnClient,
        ),
    ];
    steps.extend(optional.into_iter().filter(|(on, _)| *on).map(|(_, r)| r));
    steps
}

/// One line for a packet: direction, interface, protocol, remote end.
pub fn describe(p: &Packet) -> String {
    let interface = match p.interface {
        Interface::Loopback => "lo",
        Interface::Tunnel => super::scratch::TUNNEL,
        Interface::Uplink | Interface::OtherNamespace => super::scratch::UPLINK,
        Interface::Other => super::scratch::OTHER,
    };
    let (direction, side) = match p.direction {
        Direction::Egress => ("egress", "to"),
        Direction::Ingress => ("ingress", "from"),
    };
    format!(
        "{direction} on {interface}, protocol {} {side} {} port {} (local port {}{}{}{}{})",
        p.protocol,
        p.remote,
        p.remote_port,
        p.local_port,
        if p.fragment { ", fragment" } else { "" },
        if p.source_route { ", source route" } else { "" },
        if p.mark != 0 {
            format!(", mark {:#x}", p.mark)
        } else {
            String::new()
        },
        if p.vpn_client {
            ", from the VPN client"
        } else {
            ""
        },
    )
}
