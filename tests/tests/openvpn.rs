//! End to end over a real OpenVPN tunnel, with the leak oracle on the router outside the client.

use testbed::{require_root, story::Story};

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
