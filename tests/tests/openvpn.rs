//! End to end over a real OpenVPN tunnel, with the leak oracle on the router outside the client.

use std::time::{Duration, Instant};

use testbed::{
    lab::WEB_HOST,
    process::{command_in, Background},
    require_root,
    story::{Story, APP_PORT},
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
