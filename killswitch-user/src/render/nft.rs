//! The nft script: one transaction that replaces the scope's own table.

use std::{fmt::Write, net::IpAddr};

use super::{
    client_matches, counter_name, drops_for, interface_names, step, v4, CgroupMatch, Lists,
    Ruleset, DROPS, HIDDEN_NEXT_HEADERS,
};
use crate::{
    error::{Error, Result},
    model::{Direction, Reason},
    policy::{Ipv6Mode, Prefix, ServerEndpoint},
};

/// An IPv4 packet whose ports can be read: not a later fragment (nft's `th` would read the
/// fragment's payload as ports).
const WHOLE: &str = "ip frag-off & 0x1fff == 0";

/// The table a scope's ruleset lives in: `killswitch` system-wide, one per cgroup otherwise.
pub fn table_name(cgroup: Option<&CgroupMatch>) -> String {
    match cgroup {
        None => "killswitch".into(),
        Some(c) => {
            let plain: String = c
                .path
                .chars()
                .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
                .collect();
            // The hash keeps `a/b` and `a_b` apart.
            format!(
                "killswitch_{plain}_{:016x}",
                crate::servers::name_tag(&c.path)
            )
        }
    }
}

/// The whole nft script for `ruleset`.
pub fn nft(ruleset: &Ruleset) -> Result<String> {
    let policy = ruleset.policy;
    let tunnels = interface_names(&policy.tunnels)?;
    let uplinks = policy.uplinks.as_deref().map(interface_names).transpose()?;
    let lists = Lists::new(ruleset);
    let table = table_name(ruleset.cgroup.as_ref());
    let mut out = String::new();
    let w = &mut out;
    writeln!(w, "#!/usr/sbin/nft -f").unwrap();
    writeln!(
        w,
        "# killswitch {}: {}. Load with `nft -f FILE`;",
        env!("CARGO_PKG_VERSION"),
        match &ruleset.cgroup {
            None => "every socket of this network namespace".to_owned(),
            Some(c) => format!("sockets of cgroup {}", c.path),
        }
    )
    .unwrap();
    writeln!(
        w,
        "# it replaces table inet {table} (and the guard's table netdev {table}) in one\n# transaction. No connection tracking: each verdict"
    )
    .unwrap();
    writeln!(w, "# depends on the packet alone.").unwrap();
    writeln!(w, "table inet {table}").unwrap();
    writeln!(w, "delete table inet {table}").unwrap();
    writeln!(w, "table inet {table} {{").unwrap();
    let comment = table_comment(ruleset)?;
    writeln!(w, "\tcomment \"{comment}\"").unwrap();

    for direction in Direction::ALL {
        for reason in Reason::ALL {
            if reachable(reason) && drops_for(policy, direction, reason) {
                writeln!(w, "\tcounter {} {{ }}", counter_name(direction, reason)).unwrap();
            }
        }
    }

    sets(w, &lists);

    // The hooks: everything (system-wide), or the scope's sockets only.
    for (hook, direction) in [("output", Direction::Egress), ("input", Direction::Ingress)] {
        let (policy_verdict, select) = match &ruleset.cgroup {
            None => ("drop", String::new()),
            Some(c) => (
                "accept",
                format!("socket cgroupv2 level {} \"{}\" ", c.level, c.path),
            ),
        };
        writeln!(w, "\tchain {hook} {{").unwrap();
        writeln!(
            w,
            "\t\ttype filter hook {hook} priority filter; policy {policy_verdict};"
        )
        .unwrap();
        // The same comment as the table's: nft's JSON shows a rule's comment, not a table's.
        writeln!(
            w,
            "\t\t{select}goto {} comment \"{comment}\"",
            direction.name(),
        )
        .unwrap();
        writeln!(w, "\t}}").unwrap();
    }

    // Steps 1-3, per direction.
    for direction in Direction::ALL {
        let d = direction.name();
        let ifname = match direction {
            Direction::Egress => "oifname",
            Direction::Ingress => "iifname",
        };
        let mut c = Chain::new(w, d);
        c.rule(
            &format!("{ifname} \"lo\""),
            Allow(direction, Reason::Loopback),
        );
        if policy.ipv6 == Ipv6Mode::Block {
            c.rule("meta nfproto ipv6", Drop(direction, Reason::Ipv6Blocked));
        }
        for (name, wildcard) in &tunnels {
            let name = format!("\"{name}{}\"", if *wildcard { "*" } else { "" });
            match direction {
                Direction::Egress => c.rule(
                    &format!("{ifname} {name}"),
                    Allow(direction, Reason::Tunnel),
                ),
                Direction::Ingress => c.rule(
                    &format!("{ifname} {name}"),
                    Goto("tunnel_ingress", "2 tunnel"),
                ),
            }
        }
        let uplink_chain = format!("{d}_uplink");
        match &uplinks {
            Some(uplinks) => {
                for (name, wildcard) in uplinks {
                    let name = format!("\"{name}{}\"", if *wildcard { "*" } else { "" });
                    c.rule(
                        &format!("{ifname} {name}"),
                        Goto(&uplink_chain, "3 an uplink"),
                    );
                }
                c.rule("", Drop(direction, Reason::NotUplink));
            }
            None => c.rule(
                "",
                Goto(&uplink_chain, "3 every other interface is an uplink"),
            ),
        }
        c.end();
        uplink(
            w,
            direction,
            policy,
            &UplinkChain {
                name: &uplink_chain,
                client_chain: Some("vpn_client"),
                neighbour_discovery: ruleset.lockdown.is_none(),
                ipv6: INET_IPV6,
            },
        );
    }
    if policy.guarded() && ruleset.lockdown.is_none() {
        guard(w, policy, &tunnels, uplinks.as_deref(), &comment);
    }
    tunnel_ingress(w, policy);
    if let Some(client) = &policy.vpn_client {
        // Step 4's condition: a server's packet comes back from here unless the VPN client
        // sent it.
        let mut c = Chain::new(w, "vpn_client");
        if let Some(mark) = client.mark {
            c.rule(
                &format!("meta mark {mark:#x}"),
                Allow(Direction::Egress, Reason::Server),
            );
        }
        for (path, level) in client_matches(ruleset.clients)? {
            c.rule(
                &format!("socket cgroupv2 level {level} \"{path}\""),
                Allow(Direction::Egress, Reason::Server),
            );
        }
        c.end();
    }

    for direction in Direction::ALL {
        drop_chains(
            w,
            direction,
            DROPS
                .into_iter()
                .filter(|r| drops_for(policy, direction, *r)),
        );
    }
    writeln!(w, "}}").unwrap();
    // The guard's frames (a netdev table: another family, so the same name is free).
    writeln!(w, "table netdev {table}").unwrap();
    writeln!(w, "delete table netdev {table}").unwrap();
    if policy.guarded() && ruleset.lockdown.is_none() && !ruleset.guarded.is_empty() {
        frames(w, ruleset, &lists, &table, &comment)?;
    }
    Ok(out)
}

/// A chain per reason that logs (rate-limited) and counts what it drops.
fn drop_chains(w: &mut String, direction: Direction, reasons: impl Iterator<Item = Reason>) {
    for reason in reasons {
        let name = counter_name(direction, reason);
        writeln!(w, "\tchain drop_{name} {{").unwrap();
        writeln!(
            w,
            "\t\tlimit rate 10/second burst 20 packets log prefix \"killswitch drop {} {}: \" level info",
            direction.name(),
            reason.name()
        )
        .unwrap();
        writeln!(w, "\t\tcounter name \"{name}\" drop").unwrap();
        writeln!(w, "\t}}").unwrap();
    }
}

/// The named sets both tables look packets up in (a rule sees only its own table's sets).
fn sets(w: &mut String, lists: &Lists) {
    for (name, key, elements) in server_sets(lists) {
        set(w, name, key, false, elements.into_iter());
    }
    set(
        w,
        "lan4",
        "ipv4_addr",
        true,
        lists
            .lan
            .iter()
            .filter(|p| p.addr.is_ipv4())
            .map(Prefix::to_string),
    );
    set(
        w,
        "lan6",
        "ipv6_addr",
        true,
        lists
            .lan
            .iter()
            .filter(|p| p.addr.is_ipv6())
            .map(Prefix::to_string),
    );
    set(
        w,
        "ntp4",
        "ipv4_addr",
        false,
        lists.ntp.iter().filter(|a| v4(a)).map(IpAddr::to_string),
    );
    set(
        w,
        "ntp6",
        "ipv6_addr",
        false,
        lists.ntp.iter().filter(|a| !v4(a)).map(IpAddr::to_string),
    );
    set(
        w,
        "dns4",
        "ipv4_addr",
        false,
        lists.dns.iter().filter(|a| v4(a)).map(IpAddr::to_string),
    );
    set(
        w,
        "dns6",
        "ipv6_addr",
        false,
        lists.dns.iter().filter(|a| !v4(a)).map(IpAddr::to_string),
    );
}

/// nft keeps at most 128 bytes of a comment (a longer one fails the whole script).
pub const COMMENT_BYTES: usize = 128;

/// `killswitch policy for PATH[ #ID]` or `killswitch lockdown for PATH[ #ID]: REASON` (PATH: the
/// cgroup relative to the cgroup2 mount, `/` system-wide; ID: the cgroup's id when rendered):
/// what `status` reads back. A lockdown reason is cut to fit; a path that does not fit is an
/// error.
fn table_comment(ruleset: &Ruleset) -> Result<String> {
    let path = ruleset.cgroup.as_ref().map_or("/", |c| c.path.as_str());
    let id = match ruleset.cgroup.as_ref().and_then(|c| c.id) {
        Some(id) => format!(" #{id}"),
        None => String::new(),
    };
    let head = match &ruleset.lockdown {
        None => format!("{COMMENT_POLICY}{path}{id}"),
        Some(_) => format!("{COMMENT_LOCKDOWN}{path}{id}"),
    };
    if head.len() > COMMENT_BYTES {
        return Err(Error::Usage(format!(
            "the cgroup path {path} is too long for an nftables scope ({} bytes; at most {}); \
             use a shorter path or the eBPF backend",
            path.len(),
            path.len() + COMMENT_BYTES - head.len()
        )));
    }
    let Some(reason) = &ruleset.lockdown else {
        return Ok(head);
    };
    // No escape for a quote in nft; the reason is for a person, so it is cut to fit.
    let mut comment = format!("{head}: ");
    for c in reason.chars() {
        let c = if c == '"' || c == '\\' || c.is_control() {
            '\''
        } else {
            c
        };
        if comment.len() + c.len_utf8() > COMMENT_BYTES {
            break;
        }
        comment.push(c);
    }
    Ok(comment)
}

/// How an `[[inbound]]` rule's comment goes on after its step: `inbound PORT[ from A, B]`.
pub const INBOUND: &str = "inbound ";

pub const COMMENT_POLICY: &str = "killswitch policy for ";
pub const COMMENT_LOCKDOWN: &str = "killswitch lockdown for ";

/// The four server sets: (name, key type, elements).
fn server_sets(lists: &Lists) -> [(&'static str, &'static str, Vec<String>); 4] {
    let port = |family_v4: bool| -> Vec<String> {
        lists
            .servers_port
            .iter()
            .filter(|s| v4(&s.0) == family_v4)
            .map(|(a, p, port)| format!("{a} . {} . {port}", p.name()))
            .collect()
    };
    let any = |family_v4: bool| -> Vec<String> {
        lists
            .servers_any
            .iter()
            .filter(|s| v4(&s.0) == family_v4)
            .map(|(a, p)| format!("{a} . {}", p.name()))
            .collect()
    };
    [
        (
            "servers4_port",
            "ipv4_addr . inet_proto . inet_service",
            port(true),
        ),
        ("servers4_any", "ipv4_addr . inet_proto", any(true)),
        (
            "servers6_port",
            "ipv6_addr . inet_proto . inet_service",
            port(false),
        ),
        ("servers6_any", "ipv6_addr . inet_proto", any(false)),
    ]
}

/// Names of the server sets, for reading them back.
pub const SERVER_SETS: [&str; 4] = [
    "servers4_port",
    "servers4_any",
    "servers6_port",
    "servers6_any",
];

/// A counter whose presence says the server list in force was set with `killswitch servers`:
/// the daemon's lookups then leave it alone until `up` or a reload renders the table anew.
pub const SET_BY_COMMAND: &str = "servers_set_by_command";

/// One transaction that replaces the server sets of `table` with `servers` and marks the list
/// as the command's; `frames`: the guard's netdev table of the same name has them too.
pub fn servers_script(table: &str, servers: &[ServerEndpoint], frames: bool) -> String {
    let lists = Lists::of_servers(servers);
    let mut out = String::new();
    writeln!(out, "add counter inet {table} {SET_BY_COMMAND}").unwrap();
    let families: &[&str] = if frames {
        &["inet", "netdev"]
    } else {
        &["inet"]
    };
    for family in families {
        for (name, _, elements) in server_sets(&lists) {
            writeln!(out, "flush set {family} {table} {name}").unwrap();
            if !elements.is_empty() {
                writeln!(
                    out,
                    "add element {family} {table} {name} {{ {} }}",
                    elements.join(", ")
                )
                .unwrap();
            }
        }
    }
    out
}

/// One transaction that removes the scope's tables (the guard's netdev one when it is there).
pub fn delete_script(table: &str) -> String {
    // `table` first: deleting a table that is not there would fail the whole transaction.
    format!(
        "table inet {table}\ndelete table inet {table}\ntable netdev {table}\ndelete table netdev {table}\n"
    )
}

/// Whether a ruleset has a counter for the reason (netfilter never judges an ICMP error by
/// what it quotes, has no malformed header of its own, sees no other namespace and no link
/// layer).
fn reachable(reason: Reason) -> bool {
    !matches!(
        reason,
        Reason::IcmpError
            | Reason::Malformed
            | Reason::OtherNamespace
            | Reason::LinkControl
            | Reason::NotIp
    )
}

fn set(
    w: &mut String,
    name: &str,
    key: &str,
    interval: bool,
    elements: impl Iterator<Item = String>,
) {
    let elements: Vec<String> = elements.collect();
    write!(w, "\tset {name} {{ type {key};").unwrap();
    if interval {
        write!(w, " flags interval;").unwrap();
    }
    if !elements.is_empty() {
        write!(w, " elements = {{ {} }};", elements.join(", ")).unwrap();
    }
    writeln!(w, " }}").unwrap();
}

/// What a rule does when it matches.
enum Action<'a> {
    Allow(Direction, Reason),
    Drop(Direction, Reason),
    /// Allow, with a note after the step in the comment (read back by `status`).
    AllowNoted(Direction, Reason, String),
    /// Continue in another chain, with a comment saying why.
    Goto(&'a str, &'a str),
    /// Visit another chain and come back unless it decided, with a comment saying why.
    Jump(&'a str, &'a str),
}
use Action::{Allow, AllowNoted, Drop, Goto, Jump};

struct Chain<'w> {
    w: &'w mut String,
}

impl<'w> Chain<'w> {
    fn new(w: &'w mut String, name: &str) -> Chain<'w> {
        writeln!(w, "\tchain {name} {{").unwrap();
        Chain { w }
    }

    fn rule(&mut self, matches: &str, action: Action) {
        let space = if matches.is_empty() { "" } else { " " };
        let (verdict, reason) = match action {
            Allow(d, r) => (format!("counter name \"{}\" accept", counter_name(d, r)), r),
            Drop(d, r) => (format!("goto drop_{}", counter_name(d, r)), r),
            AllowNoted(d, r, note) => {
                let counter = counter_name(d, r);
                let step = step(r);
                writeln!(self.w, "\t\t{matches}{space}counter name \"{counter}\" accept comment \"{step}: {note}\"").unwrap();
                return;
            }
            Goto(chain, why) => {
                writeln!(self.w, "\t\t{matches}{space}goto {chain} comment \"{why}\"").unwrap();
                return;
            }
            Jump(chain, why) => {
                writeln!(self.w, "\t\t{matches}{space}jump {chain} comment \"{why}\"").unwrap();
                return;
            }
        };
        writeln!(
            self.w,
            "\t\t{matches}{space}{verdict} comment \"{}\"",
            step(reason)
        )
        .unwrap();
    }

    fn end(self) {
        writeln!(self.w, "\t}}").unwrap();
    }
}

/// The uplink guard's part netfilter takes (docs/guard.md): what the host forwards out of or in
/// from an uplink is held to the uplink chains, as the eBPF guard holds it. Raw-socket frames
/// would need a netdev egress hook per device: not rendered.
fn guard(
    w: &mut String,
    policy: &crate::policy::Policy,
    tunnels: &[(String, bool)],
    uplinks: Option<&[(String, bool)]>,
    comment: &str,
) {
    writeln!(w, "\tchain forward {{").unwrap();
    writeln!(
        w,
        "\t\ttype filter hook forward priority filter; policy accept;"
    )
    .unwrap();
    if policy.ipv6 == Ipv6Mode::Block {
        writeln!(
            w,
            "\t\tmeta nfproto ipv6 goto drop_{} comment \"{}\"",
            counter_name(Direction::Egress, Reason::Ipv6Blocked),
            step(Reason::Ipv6Blocked)
        )
        .unwrap();
    }
    writeln!(w, "\t\tjump forward_out comment \"{comment}\"").unwrap();
    writeln!(w, "\t\tjump forward_in").unwrap();
    writeln!(w, "\t}}").unwrap();
    for direction in Direction::ALL {
        let (chain, ifname, kind) = match direction {
            Direction::Egress => ("forward_out", "oifname", "oifkind"),
            Direction::Ingress => ("forward_in", "iifname", "iifkind"),
        };
        let mut uplink_chain = format!("{}_uplink", direction.name());
        // `socket` cannot be asked in the forward hook: a forwarded packet has no socket, and
        // only the client's mark can make it the VPN client's.
        if let (Direction::Egress, Some(client)) = (direction, &policy.vpn_client) {
            uplink_chain = format!("guard_{uplink_chain}");
            uplink(
                w,
                direction,
                policy,
                &UplinkChain {
                    name: &uplink_chain,
                    client_chain: Some("guard_vpn_client"),
                    neighbour_discovery: true,
                    ipv6: INET_IPV6,
                },
            );
            let mut c = Chain::new(w, "guard_vpn_client");
            if let Some(mark) = client.mark {
                c.rule(
                    &format!("meta mark {mark:#x}"),
                    Allow(Direction::Egress, Reason::Server),
                );
            }
            c.end();
        }
        let mut c = Chain::new(w, chain);
        let quoted = |(name, wildcard): &(String, bool)| {
            format!("\"{name}{}\"", if *wildcard { "*" } else { "" })
        };
        for uplink in uplinks.unwrap_or_default() {
            c.rule(
                &format!("{ifname} {}", quoted(uplink)),
                Goto(&uplink_chain, "guard: an uplink"),
            );
        }
        writeln!(c.w, "\t\t{ifname} \"lo\" return").unwrap();
        for tunnel in tunnels {
            writeln!(c.w, "\t\t{ifname} {} return", quoted(tunnel)).unwrap();
        }
        writeln!(
            c.w,
            "\t\tmeta {kind} {{ {} }} return comment \"guard: leads back into this host or into a tunnel\"",
            crate::interfaces::INTERNAL_KINDS.map(|k| format!("\"{k}\"")).join(", ")
        )
        .unwrap();
        // A device onto a wire: an uplink, unless `uplinks` names others.
        match uplinks {
            Some(_) => c.rule("", Drop(direction, Reason::NotUplink)),
            None => c.rule(
                "",
                Goto(&uplink_chain, "guard: every other device is an uplink"),
            ),
        }
        c.end();
    }
}

/// How a rule says "an IPv6 packet" in an inet table.
const INET_IPV6: &str = "meta nfproto ipv6";
/// ... and in a netdev one (where the gate before has checked the frame says so too).
const NETDEV_IPV6: &str = "meta protocol ip6";

/// A chain of steps 4-10.
struct UplinkChain<'a> {
    name: &'a str,
    /// Under `[vpn_client]`, what leaves for a server asks this chain; `None`: not restricted.
    client_chain: Option<&'a str>,
    /// Step 9 (lockdown has only loopback and DHCP).
    neighbour_discovery: bool,
    /// [`INET_IPV6`] or [`NETDEV_IPV6`].
    ipv6: &'a str,
}

/// What the guard's frames can be judged for: the uplink chain's steps and the link layer.
const FRAME_REASONS: [Reason; 14] = [
    Reason::LinkControl,
    Reason::NotVpnClient,
    Reason::NotIp,
    Reason::NotUplink,
    Reason::Ipv6Blocked,
    Reason::SourceRoute,
    Reason::Server,
    Reason::Dhcp,
    Reason::Ntp,
    Reason::Dns,
    Reason::Lan,
    Reason::LanDns,
    Reason::NeighbourDiscovery,
    Reason::Default,
];

/// The guard's frame part (docs/guard.md): a netdev egress chain on every guarded device holds
/// each frame leaving it, whatever sent it (a raw packet socket too), to the uplink steps. What
/// the host's sockets and what it forwards send were held by the inet table before; the server
/// exception is not held to the VPN client here (a netdev hook cannot ask a socket's cgroup).
fn frames(
    w: &mut String,
    ruleset: &Ruleset,
    lists: &Lists,
    table: &str,
    comment: &str,
) -> Result<()> {
    let policy = ruleset.policy;
    let d = Direction::Egress;
    writeln!(w, "table netdev {table} {{").unwrap();
    writeln!(w, "\tcomment \"{comment}\"").unwrap();
    for reason in FRAME_REASONS {
        writeln!(w, "\tcounter {} {{ }}", counter_name(d, reason)).unwrap();
    }
    sets(w, lists);
    // One base chain per way a device's frames read, hooked on those devices.
    for (header, name) in FRAME_CHAINS {
        let devices: Vec<String> = ruleset
            .guarded
            .iter()
            .filter(|(_, h)| *h == header)
            .map(|(i, _)| {
                // A comma or brace would split nft's device list when it is read back.
                if i.name
                    .chars()
                    .all(|c| super::quotable(c) && !",{}".contains(c))
                {
                    Ok(format!("\"{}\"", i.name))
                } else {
                    Err(Error::Usage(format!(
                        "the interface name {:?} cannot be written in a netfilter ruleset; \
                         rename the interface or use the eBPF backend",
                        i.name
                    )))
                }
            })
            .collect::<Result<_>>()?;
        if devices.is_empty() {
            continue;
        }
        let mut c = Chain::new(w, name);
        writeln!(
            c.w,
            "\t\ttype filter hook egress devices = {{ {} }} priority filter; policy drop;",
            devices.join(", ")
        )
        .unwrap();
        // What the kernel was told (a raw sender sets the protocol itself, and the rules
        // after read by it), what the frame says, and the version in the IP header must all
        // agree: each stated, as nft drops a dependency it thinks another match implies.
        let (v4, v6) = match header {
            ETHERNET_HEADER => {
                c.rule(
                    "ether type { arp, 0x888e, 0x88c7, 0x8863 }",
                    Allow(d, Reason::LinkControl),
                );
                // PPP negotiation in a PPPoE session: the PPP protocol after the 6-byte
                // PPPoE header (bit 160 of the frame).
                c.rule(
                    "ether type 0x8864 @ll,160,16 >= 0x8000",
                    Allow(d, Reason::LinkControl),
                );
                (
                    "meta protocol ip ether type ip ip version 4",
                    "meta protocol ip6 ether type ip6 ip6 version 6",
                )
            }
            0 => (
                "meta protocol ip ip version 4",
                "meta protocol ip6 ip6 version 6",
            ),
            killswitch_common::GUARD_NOT_AN_UPLINK => {
                c.rule("", Drop(d, Reason::NotUplink));
                c.end();
                continue;
            }
            _ => {
                c.rule("", Drop(d, Reason::NotIp));
                c.end();
                continue;
            }
        };
        if policy.ipv6 == Ipv6Mode::Block {
            c.rule(NETDEV_IPV6, Drop(d, Reason::Ipv6Blocked));
            if header == ETHERNET_HEADER {
                c.rule("ether type ip6", Drop(d, Reason::Ipv6Blocked));
            }
        }
        c.rule(v4, Goto("frames_uplink", "guard: an IPv4 frame"));
        c.rule(v6, Goto("frames_uplink", "guard: an IPv6 frame"));
        c.rule("", Drop(d, Reason::NotIp));
        c.end();
    }
    // A client known by its mark alone: the mark is on every packet it sends, here too. One
    // known by a cgroup (configured, or one `run --vpn-client` made) cannot be asked for here
    // (no socket lookup in a netdev hook).
    let mark_only = policy
        .vpn_client
        .as_ref()
        .filter(|c| c.cgroup.is_none() && ruleset.clients.is_empty())
        .and_then(|c| c.mark);
    uplink(
        w,
        d,
        policy,
        &UplinkChain {
            name: "frames_uplink",
            client_chain: mark_only.map(|_| FRAMES_VPN_CLIENT),
            neighbour_discovery: true,
            ipv6: NETDEV_IPV6,
        },
    );
    if let Some(mark) = mark_only {
        let mut c = Chain::new(w, FRAMES_VPN_CLIENT);
        c.rule(&format!("meta mark {mark:#x}"), Allow(d, Reason::Server));
        c.end();
    }
    drop_chains(w, d, FRAME_REASONS.into_iter().filter(|r| !r.allows()));
    writeln!(w, "}}").unwrap();
    Ok(())
}

/// The length of an Ethernet header: what the guard's device list says of an Ethernet device.
const ETHERNET_HEADER: u8 = 14;

/// The netdev chain that holds servers' frames to a VPN client known by its mark alone.
pub const FRAMES_VPN_CLIENT: &str = "frames_vpn_client";

/// The guard's netdev base chains, by what [`crate::interfaces::guarded`] says of a device.
pub const FRAME_CHAINS: [(u8, &str); 4] = [
    (ETHERNET_HEADER, "frames_ethernet"),
    (0, "frames_bare_ip"),
    (killswitch_common::GUARD_NOT_AN_UPLINK, "frames_not_uplink"),
    (killswitch_common::GUARD_UNREADABLE, "frames_unreadable"),
];

/// Steps 4-10 for a packet on an uplink (any interface but loopback and the tunnels).
fn uplink(
    w: &mut String,
    direction: Direction,
    policy: &crate::policy::Policy,
    chain: &UplinkChain,
) {
    let d = direction;
    let (addr, port, dhcp_ports_v4, dhcp_ports_v6) = match direction {
        Direction::Egress => (
            "daddr",
            "dport",
            "udp sport 68 udp dport 67",
            "udp sport 546 udp dport 547",
        ),
        Direction::Ingress => (
            "saddr",
            "sport",
            "udp sport 67 udp dport 68",
            "udp sport 547 udp dport 546",
        ),
    };
    let hidden = HIDDEN_NEXT_HEADERS.map(|n| n.to_string()).join(", ");
    let mut c = Chain::new(w, chain.name);
    // Transports the programs cannot read on an uplink: IPv4 options, a pending source route.
    c.rule("ip hdrlength != 5", Drop(d, Reason::SourceRoute));
    c.rule(
        &format!("{} rt seg-left != 0", chain.ipv6),
        Drop(d, Reason::SourceRoute),
    );
    c.rule(
        &format!("ip6 {addr} ::ffff:0.0.0.0/96"),
        Drop(d, Reason::Default),
    );
    // 4. servers: ports only where the transport header is the first one (ip6 nexthdr).
    // Under [vpn_client], what leaves for a server asks the vpn_client chain, and falls
    // through the later steps to its own drop when that chain does not accept it.
    let servers = [
        format!("{WHOLE} ip {addr} . ip protocol . th {port} @servers4_port"),
        format!("ip {addr} . ip protocol @servers4_any"),
        format!("ip6 {addr} . ip6 nexthdr . th {port} @servers6_port"),
        format!("ip6 {addr} . ip6 nexthdr @servers6_any"),
    ];
    let client_chain = chain
        .client_chain
        .filter(|_| policy.vpn_client.is_some() && direction == Direction::Egress);
    for server in &servers {
        if let Some(client_chain) = client_chain {
            c.rule(
                server,
                Jump(client_chain, "4 server, if the VPN client sent it"),
            );
        } else {
            c.rule(server, Allow(d, Reason::Server));
        }
    }
    // 5. DHCP: requests to the broadcast address or the LAN (v4), ff02::1:2 or link-local (v6).
    if policy.dhcp {
        match direction {
            Direction::Egress => {
                c.rule(
                    &format!("{WHOLE} ip protocol udp {dhcp_ports_v4} ip daddr 255.255.255.255"),
                    Allow(d, Reason::Dhcp),
                );
                c.rule(
                    &format!("{WHOLE} ip protocol udp {dhcp_ports_v4} ip daddr @lan4"),
                    Allow(d, Reason::Dhcp),
                );
                c.rule(
                    &format!(
                        "ip6 nexthdr udp {dhcp_ports_v6} ip6 daddr {{ ff02::1:2, fe80::/10 }}"
                    ),
                    Allow(d, Reason::Dhcp),
                );
            }
            Direction::Ingress => {
                c.rule(
                    &format!("{WHOLE} ip protocol udp {dhcp_ports_v4}"),
                    Allow(d, Reason::Dhcp),
                );
                c.rule(
                    &format!("ip6 nexthdr udp {dhcp_ports_v6}"),
                    Allow(d, Reason::Dhcp),
                );
            }
        }
    }
    // 6. NTP
    c.rule(
        &format!("{WHOLE} ip {addr} @ntp4 ip protocol udp udp {port} 123"),
        Allow(d, Reason::Ntp),
    );
    c.rule(
        &format!("ip6 {addr} @ntp6 ip6 nexthdr udp udp {port} 123"),
        Allow(d, Reason::Ntp),
    );
    // 7. DNS
    c.rule(
        &format!("{WHOLE} ip {addr} @dns4 ip protocol {{ tcp, udp }} th {port} {{ 53, 853 }}"),
        Allow(d, Reason::Dns),
    );
    c.rule(
        &format!("ip6 {addr} @dns6 ip6 nexthdr {{ tcp, udp }} th {port} {{ 53, 853 }}"),
        Allow(d, Reason::Dns),
    );
    // 8. LAN; DNS to it only with lan.dns. A port that cannot be read falls through to a drop.
    if policy.lan.dns {
        c.rule(&format!("ip {addr} @lan4"), Allow(d, Reason::Lan));
        c.rule(&format!("ip6 {addr} @lan6"), Allow(d, Reason::Lan));
    } else {
        c.rule(
            &format!("ip {addr} @lan4 ip protocol != {{ tcp, udp, esp, ah }}"),
            Allow(d, Reason::Lan),
        );
        c.rule(
            &format!("{WHOLE} ip {addr} @lan4 ip protocol {{ tcp, udp }} th {port} {{ 53, 853 }}"),
            Drop(d, Reason::LanDns),
        );
        c.rule(
            &format!(
                "{WHOLE} ip {addr} @lan4 ip protocol {{ tcp, udp }} th {port} != {{ 53, 853 }}"
            ),
            Allow(d, Reason::Lan),
        );
        c.rule(
            &format!("ip6 {addr} @lan6 ip6 nexthdr != {{ tcp, udp, {hidden} }}"),
            Allow(d, Reason::Lan),
        );
        c.rule(
            &format!("ip6 {addr} @lan6 ip6 nexthdr {{ tcp, udp }} th {port} {{ 53, 853 }}"),
            Drop(d, Reason::LanDns),
        );
        c.rule(
            &format!("ip6 {addr} @lan6 ip6 nexthdr {{ tcp, udp }} th {port} != {{ 53, 853 }}"),
            Allow(d, Reason::Lan),
        );
    }
    // 9. neighbour discovery, link-local or link-scope multicast only
    if chain.neighbour_discovery {
        c.rule(
            &format!("ip6 nexthdr icmpv6 icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect }} ip6 {addr} {{ fe80::/10, ff02::/16 }}"),
            Allow(d, Reason::NeighbourDiscovery),
        );
    }
    if client_chain.is_some() {
        for server in &servers {
            c.rule(server, Drop(d, Reason::NotVpnClient));
        }
    }
    // 10. (ICMP errors are not judged by what they quote: netfilter cannot read it.)
    c.rule("", Drop(d, Reason::Default));
    c.end();
}

/// Ingress on a tunnel: everything but unsolicited TCP, which only `[[inbound]]` ports get.
fn tunnel_ingress(w: &mut String, policy: &crate::policy::Policy) {
    let d = Direction::Ingress;
    let hidden = HIDDEN_NEXT_HEADERS.map(|n| n.to_string()).join(", ");
    let mut c = Chain::new(w, "tunnel_ingress");
    // A transport that cannot be read could be a SYN.
    c.rule("ip protocol { esp, ah }", Drop(d, Reason::InboundRefused));
    c.rule(
        &format!("ip6 nexthdr {{ {hidden} }}"),
        Drop(d, Reason::InboundRefused),
    );
    c.rule("ip protocol != tcp", Allow(d, Reason::Tunnel));
    c.rule("ip6 nexthdr != tcp", Allow(d, Reason::Tunnel));
    c.rule("ip frag-off & 0x1fff != 0", Drop(d, Reason::InboundRefused));
    c.rule("ip hdrlength != 5", Drop(d, Reason::InboundRefused));
    c.rule("tcp flags & (syn | ack) != syn", Allow(d, Reason::Tunnel));
    for rule in &policy.inbound {
        let inbound = format!("{INBOUND}{}", rule.port);
        if rule.sources.is_empty() {
            let matches = format!("tcp dport {}", rule.port);
            c.rule(&matches, AllowNoted(d, Reason::Tunnel, inbound));
            continue;
        }
        // One rule per source: each comment names it and stays short.
        for source in &rule.sources {
            if matches!(source, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
                continue;
            }
            let family = if source.is_ipv4() { "ip" } else { "ip6" };
            let matches = format!("tcp dport {} {family} saddr {source}", rule.port);
            let note = format!("{inbound} from {source}");
            c.rule(&matches, AllowNoted(d, Reason::Tunnel, note));
        }
    }
    c.rule("", Drop(d, Reason::InboundRefused));
    c.end();
}
