//! Random policies for the property tests: every policy the config accepts, with addresses
//! from a few small ranges so that entries and packets meet. The packets aimed at them and
//! their wire form come from the library (`killswitch::sample`, `killswitch::packets`).

use std::net::IpAddr;

pub use killswitch::packets::{frame, frame_with, quoted_frame, with_loose_source_route, ME4, ME6};
pub use killswitch::sample::*;

use crate::packets::*;

pub fn seed() -> u64 {
    std::env::var("KILLSWITCH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) ^ 0xfeed)
}

/// A random policy the config accepts: uplinks or not, 0-4 servers with and without port and
/// protocol, 0-4 LAN prefixes of every accepted length (overlapping now and then), NTP and
/// DNS servers, inbound rules with and without sources, every setting. Addresses come from
/// a few small ranges so entries and packets meet.
///
/// One policy in three has a `[vpn_client]`: the mark [`CLIENT_MARK`], the cgroup `client`
/// (when given), or both.
pub fn random_policy(rng: &mut Rng, client: Option<&str>) -> String {
    let block = rng.below(5) == 0;
    // IPv6 entries are errors in block mode.
    let address = |rng: &mut Rng| {
        let ipv6 = !block && rng.below(2) == 0;
        random_address(rng, ipv6)
    };
    let prefix = |rng: &mut Rng| {
        let ipv6 = !block && rng.below(2) == 0;
        random_prefix(rng, ipv6)
    };
    let mut text = String::from("tunnels = [\"tun0\"]\n");
    if rng.below(2) == 0 {
        text.push_str("uplinks = [\"up0\"]\n");
    }
    let mut servers = std::collections::BTreeSet::new();
    for _ in 0..rng.below(5) {
        // A server may not be link-local (fe80::/10).
        let address = match address(rng) {
            IpAddr::V6(v6) if v6.segments()[0] == 0xfe80 => {
                IpAddr::V6((u128::from(v6) ^ 0xfe80u128 << 112 | 0x2001_0db8u128 << 96).into())
            }
            other => other,
        };
        let port = (rng.below(2) == 0).then(|| pick(rng, PORTS));
        let protocol = pick(rng, &[None, Some("udp"), Some("tcp")]);
        if servers.insert((address, port, protocol)) {
            text.push_str(&format!("[[server]]\naddress = \"{address}\"\n"));
            if let Some(port) = port {
                text.push_str(&format!("port = {port}\n"));
            }
            if let Some(protocol) = protocol {
                text.push_str(&format!("protocol = \"{protocol}\"\n"));
            }
        }
    }
    let mut lan = std::collections::BTreeSet::new();
    for _ in 0..rng.below(5) {
        lan.insert(prefix(rng));
    }
    let quoted = |items: Vec<String>| {
        items
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    text.push_str(&format!(
        "[lan]\nnetworks = [{}]\ndns = {}\n",
        quoted(lan.into_iter().collect()),
        rng.below(2) == 0
    ));
    text.push_str(&format!("[dhcp]\nenabled = {}\n", rng.below(3) != 0));
    for section in ["ntp", "dns"] {
        let addresses: std::collections::BTreeSet<String> = (0..rng.below(3))
            .map(|_| address(rng).to_string())
            .collect();
        text.push_str(&format!(
            "[{section}]\nservers = [{}]\n",
            quoted(addresses.into_iter().collect())
        ));
    }
    text.push_str(&format!(
        "[ipv6]\nmode = \"{}\"\n",
        if block { "block" } else { "tunnel" }
    ));
    let mut ports = std::collections::BTreeSet::new();
    for _ in 0..rng.below(3) {
        let port = pick(rng, &[22, 51234, 443, 80]);
        if !ports.insert(port) {
            continue;
        }
        text.push_str(&format!("[[inbound]]\nport = {port}\n"));
        if rng.below(2) == 0 {
            let source = address(rng);
            text.push_str(&format!("sources = [\"{source}\"]\n"));
        }
    }
    match rng.below(3) {
        0 => text.push_str("[guard]\nenabled = true\n"),
        1 => text.push_str("[guard]\nenabled = false\n"),
        _ => {}
    }
    if rng.below(3) == 0 {
        text.push_str("[vpn_client]\n");
        match (client, rng.below(3)) {
            (Some(cgroup), 0) => text.push_str(&format!("cgroup = \"{cgroup}\"\n")),
            (Some(cgroup), 1) => {
                text.push_str(&format!("cgroup = \"{cgroup}\"\nmark = {CLIENT_MARK:#x}\n"))
            }
            _ => text.push_str(&format!("mark = {CLIENT_MARK:#x}\n")),
        }
    }
    text
}

/// An address in one of a few small ranges (so that entries overlap and packets hit them).
pub fn random_address(rng: &mut Rng, ipv6: bool) -> IpAddr {
    if ipv6 {
        let base: u128 = pick(
            rng,
            &[
                0x2001_0db8_0000_0000_0000_0000_0000_0000,
                0x2001_0db8_0077_0000_0000_0000_0000_0000,
                0xfd00_0000_0000_0000_0000_0000_0000_0000,
                0xfe80_0000_0000_0000_0000_0000_0000_0000,
            ],
        );
        IpAddr::V6((base | u128::from(rng.below(4)) << 64 | u128::from(rng.below(8))).into())
    } else {
        let base: u32 = pick(rng, &[0xc633_6400, 0xcb00_7100, 0xc0a8_4d00, 0x0a00_0000]);
        IpAddr::V4((base | rng.below(8) as u32 | (rng.below(2) as u32) << 16).into())
    }
}

/// A prefix the config accepts: IPv4 /8-/32 in 10/8, /16-/32 elsewhere; IPv6
/// /7-/128 in fc00::/7, /10-/128 in fe80::/10, /32-/128 elsewhere.
pub fn random_prefix(rng: &mut Rng, ipv6: bool) -> String {
    let address = random_address(rng, ipv6);
    match address {
        IpAddr::V4(v4) => {
            // 10/8 may be a LAN whole; every other base range allows a /16 at most.
            let shortest = if v4.octets()[0] == 10 { 8 } else { 16 };
            let len = shortest + rng.below(33 - u64::from(shortest)) as u32;
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let shortest = match v6.segments()[0] {
                0xfd00 => 7,
                0xfe80 => 10,
                _ => 32,
            };
            let len = shortest + rng.below(129 - u64::from(shortest)) as u32;
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            format!("{}/{len}", std::net::Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// A frame of another protocol than IP, with what the guard must say of it: link control
/// (ARP, EAPOL, pre-authentication, PPPoE discovery, PPP negotiation in a session) or other
/// (PPP data the guard cannot read, LLDP, Wake-on-LAN, an unknown type).
pub fn other_frame(rng: &mut Rng) -> (Vec<u8>, killswitch::model::Frame) {
    use killswitch::{
        model::Frame,
        packets::{ethernet, pppoe, ETH_P_PPPOE_SESSION},
    };
    let len = 28 + rng.below(40) as usize;
    let payload = rng.bytes(len);
    let (ethertype, body, expected) = match rng.below(9) {
        0 => (0x0806, payload, Frame::LinkControl),
        1 => (0x888e, payload, Frame::LinkControl),
        2 => (0x88c7, payload, Frame::LinkControl),
        3 => (0x8863, payload, Frame::LinkControl),
        4 => (
            ETH_P_PPPOE_SESSION,
            pppoe(0xc021, &payload),
            Frame::LinkControl,
        ),
        5 => (ETH_P_PPPOE_SESSION, pppoe(0x00fd, &payload), Frame::Other),
        6 => (0x88cc, payload, Frame::Other),
        7 => (0x0842, payload, Frame::Other),
        _ => (0x1234, payload, Frame::Other),
    };
    (ethernet(ethertype, &body), expected)
}
