//! End to end over a real OpenVPN tunnel, with the leak oracle on the router outside the client.

use std::time::{Duration, Instant};

use testbed::{
    lab::WEB_HOST,
    process::{command_in, Background},
    require_root,
    story::{Story, APP_PORT, OUTSIDE_PORT},
};

const PROBE: &str = env!("CARGO_BIN_EXE_ks-probe");
/// Real OpenVPN reconnects, each with a new tun0 the daemon must follow on its own.
const RECONNECTS: usize = 3;

#[test]
fn killed_vpn_client_leaks_nothing_and_reconnect_needs_a_reapply() {
    require_root!();
    let mut story = Story::new();
    let seen = story.tell(&mut |line| eprintln!("story: {line}"));
    assert!(
        seen.through_tunnel,
        "traffic through the healthy tunnel failed: {seen:#?}"
    );
    assert!(
        !seen.after_kill_reached,
        "reached the web host with the tunnel dead: {seen:#?}"
    );
    assert!(
        seen.leaked.is_empty(),
        "leaked in the clear: {:#?}",
        seen.leaked
    );
    assert!(seen.dropped_while_down > 0, "{seen:#?}");
    // The oracle must see clear traffic when there is some, or the check above proves nothing.
    assert!(
        !seen.outside_clear.is_empty(),
        "the leak oracle saw nothing from outside the scope"
    );
    assert_ne!(
        seen.old_ifindex, seen.new_ifindex,
        "OpenVPN reused the ifindex"
    );
    assert!(
        !seen.new_tunnel_before_up,
        "a new tunnel ifindex was trusted before `up`"
    );
    assert!(
        seen.new_tunnel_after_up,
        "re-running `up` did not follow the new tunnel: {seen:#?}"
    );
    assert!(
        seen.status_table.contains("default-drop"),
        "{}",
        seen.status_table
    );
    assert!(
        seen.verified,
        "verify failed:\n{}",
        seen.verify_lines.join("\n")
    );
}

#[test]
fn the_daemon_follows_openvpn_reconnects_without_leaking() {
    require_root!();
    let mut story = Story::new();
    story.lab.connect();
    let daemon = story.daemon();
    assert!(story.request(Some(&story.cgroup), APP_PORT), "first tunnel");
    story.lab.start_capture();
    // One datagram a millisecond to the web host for the whole run: through the tunnel it is
    // encrypted; with the tunnel gone it would fall back to the uplink in the clear.
    let target = format!("{WEB_HOST}:{APP_PORT}");
    let flood = Background::start(command_in(
        &story.lab.client,
        Some(&story.cgroup),
        PROBE,
        &["flood", &target, "15000"],
    ));
    let mut ifindexes = vec![story.lab.tunnel_ifindex().unwrap()];
    let mut slowest = Duration::ZERO;
    for round in 0..RECONNECTS {
        story.lab.kill_vpn_client();
        std::thread::sleep(Duration::from_millis(200));
        story.lab.connect();
        ifindexes.push(story.lab.tunnel_ifindex().unwrap());
        let connected = Instant::now();
        let mut works = false;
        while !works && connected.elapsed() < Duration::from_secs(1) {
            works = story.request(Some(&story.cgroup), APP_PORT);
        }
        assert!(
            works,
            "reconnect {round}: the new tun0 did not carry traffic within 1 s of connecting; daemon log:\n{}",
            story.lab.log("daemon.log")
        );
        slowest = slowest.max(connected.elapsed());
    }
    drop(flood);
    let leaked = story.lab.stop_capture(&format!("dst host {WEB_HOST}"));
    eprintln!(
        "tun0 ifindexes across {RECONNECTS} reconnects: {ifindexes:?}; slowest from connected to \
         traffic: {slowest:?}"
    );
    assert!(leaked.is_empty(), "leaked in the clear: {leaked:#?}");
    let mut distinct = ifindexes.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), ifindexes.len(), "OpenVPN reused an ifindex");
    let log = story.lab.log("daemon.log");
    assert_eq!(
        log.matches("tunnel up: tun0").count(),
        RECONNECTS + 1,
        "one line per tunnel: {log}"
    );
    drop(daemon);
}

/// Issue 11 items 1 and 3 with real packets: a config that cannot be used leaks nothing, neither
/// at a first `up` (the scope is held in lockdown) nor over a policy in force (it stays). The
/// bad config is the one that opened all IPv4 before: an IPv6 LAN prefix covering
/// `::ffff:0:0/96`. The oracle is the capture on the router.
#[test]
fn a_config_that_cannot_be_used_leaks_nothing_at_first_up_or_over_a_policy_in_force() {
    require_root!();
    let mut story = Story::new();
    let flood_to_web = |story: &Story| {
        let flood = Background::start(command_in(
            &story.lab.client,
            Some(&story.cgroup),
            PROBE,
            &["flood", &format!("{WEB_HOST}:{APP_PORT}"), "1500"],
        ));
        let reached = story.request(Some(&story.cgroup), APP_PORT);
        let outside = story.request(None, OUTSIDE_PORT);
        assert!(
            flood.line(Duration::from_secs(10)).is_some(),
            "the flood ended"
        );
        (reached, outside)
    };
    let bad = |prefix: &str| {
        format!(
            "{}[lan]\nnetworks = [\"{prefix}\"]\n",
            Story::valid_config()
        )
    };

    // First `up` of the machine with the bad config: exit 2, lockdown, nothing leaves.
    story.write_config(&bad("::/64"));
    let out = story.killswitch(&["up"]);
    story.lab.start_capture();
    let (reached, outside) = flood_to_web(&story);
    let leaked = story
        .lab
        .stop_capture(&format!("dst host {WEB_HOST} and dst port {APP_PORT}"));
    let clear = story
        .lab
        .captured(&format!("dst host {WEB_HOST} and dst port {OUTSIDE_PORT}"));
    assert!(
        leaked.is_empty(),
        "leaked after a refused first up: {leaked:#?}"
    );
    assert!(!reached, "the scope reached the web host in lockdown");
    assert!(
        outside && !clear.is_empty(),
        "the oracle saw nothing from outside the scope"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("lockdown"), "{stderr}");
    let status = String::from_utf8_lossy(&story.killswitch(&["status"]).stdout).into_owned();
    assert!(status.contains("LOCKDOWN"), "{status}");

    // The fixed config takes over; then the bad one is refused over the policy in force.
    story.write_config(&Story::valid_config());
    story.lab.connect();
    assert!(story.killswitch(&["up"]).status.success());
    assert!(
        story.request(Some(&story.cgroup), APP_PORT),
        "through the tunnel"
    );
    story.write_config(&bad("::/80"));
    let out = story.killswitch(&["up"]);
    assert_eq!(out.status.code(), Some(2));
    story.lab.kill_vpn_client();
    story.lab.start_capture();
    let (reached, _) = flood_to_web(&story);
    let leaked = story
        .lab
        .stop_capture(&format!("dst host {WEB_HOST} and dst port {APP_PORT}"));
    assert!(
        !reached,
        "the scope reached the web host without the tunnel"
    );
    assert!(
        leaked.is_empty(),
        "leaked over the policy in force: {leaked:#?}"
    );
}

/// The same story with the nftables backend. Its rules match tunnels by name, so the tunnel
/// OpenVPN brings back with a new ifindex carries traffic before anyone runs `up` again.
#[test]
fn with_nftables_a_killed_vpn_client_leaks_nothing_and_a_reconnect_needs_nobody() {
    require_root!();
    let mut story = Story::with_backend("nftables");
    let seen = story.tell(&mut |line| eprintln!("story: {line}"));
    assert!(seen.through_tunnel, "healthy tunnel: {seen:#?}");
    assert!(
        !seen.after_kill_reached,
        "reached with the tunnel dead: {seen:#?}"
    );
    assert!(
        seen.leaked.is_empty(),
        "leaked in the clear: {:#?}",
        seen.leaked
    );
    assert!(
        seen.dropped_while_down > 0,
        "the nft counters saw no drop: {seen:#?}"
    );
    assert!(
        !seen.outside_clear.is_empty(),
        "the leak oracle saw nothing from outside the scope"
    );
    assert_ne!(
        seen.old_ifindex, seen.new_ifindex,
        "OpenVPN reused the ifindex"
    );
    assert!(
        seen.new_tunnel_before_up,
        "the new tun0 was not trusted by name: {seen:#?}"
    );
    assert!(seen.new_tunnel_after_up, "{seen:#?}");
    assert!(
        seen.status_table.contains("nftables") && seen.status_table.contains("default-drop"),
        "{}",
        seen.status_table
    );
    assert!(
        seen.verified,
        "verify failed:\n{}",
        seen.verify_lines.join("\n")
    );
}

/// An output `ct state established accept` leaks flows opened before the VPN (TESTBED.md). The
/// rendered ruleset has no conntrack; here another table does (as Docker or ufw would), and a
/// UDP flow answered before `up` keeps sending: nothing of it may reach the router.
#[test]
fn with_nftables_a_flow_opened_before_up_does_not_leak_while_conntrack_is_in_use() {
    require_root!();
    let mut story = Story::with_backend("nftables");
    let conntrack = "table inet other_firewall {\n\
        chain output { type filter hook output priority -10; policy accept; ct state established,related accept; }\n\
        chain input { type filter hook input priority -10; policy accept; ct state established,related accept; }\n\
    }\n";
    let file = story.lab.dir().join("conntrack.nft");
    std::fs::write(&file, conntrack).unwrap();
    let out = testbed::process::output_in(
        &story.lab.client,
        None,
        "nft",
        &["-f", file.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stream = Background::start(command_in(
        &story.lab.client,
        Some(&story.cgroup),
        PROBE,
        &["stream", &format!("{WEB_HOST}:{APP_PORT}"), "4000"],
    ));
    assert_eq!(
        stream.line(Duration::from_secs(5)).as_deref(),
        Some("established"),
        "the flow was not answered before up"
    );
    story.up();
    story.lab.start_capture();
    std::thread::sleep(Duration::from_secs(1));
    let leaked = story
        .lab
        .stop_capture(&format!("dst host {WEB_HOST} and udp dst port {APP_PORT}"));
    let sent = stream.line(Duration::from_secs(10));
    eprintln!("the flow's datagrams (sent, refused): {sent:?}");
    assert!(
        leaked.is_empty(),
        "the established flow leaked: {leaked:#?}"
    );
}
