//! `ks-demo`: the demonstration behind `cargo xtask demo`. Builds the OpenVPN lab (client ->
//! router -> OpenVPN server with NAT -> web host), tells the story with the `killswitch` binary
//! next to this one, and removes everything afterwards.

use std::process::ExitCode;

fn main() -> ExitCode {
    if !testbed::privileged() {
        eprintln!(
            "ks-demo: run as root: the demonstration creates namespaces, cgroups and BPF programs"
        );
        return ExitCode::from(2);
    }
    if std::env::var_os("KILLSWITCH_BIN").is_none() {
        let exe = std::env::current_exe().expect("own path");
        std::env::set_var("KILLSWITCH_BIN", exe.with_file_name("killswitch"));
    }
    println!("demo: building the lab: client -> router -> OpenVPN server (NAT) -> web host");
    let mut story = testbed::story::Story::new();
    let seen = story.tell(&mut |line| println!("demo: {line}"));
    println!("demo: `killswitch status` while the tunnel was dead:");
    for line in seen.status_table.lines() {
        println!("      {line}");
    }
    drop(story);
    let verdict = seen.through_tunnel
        && !seen.after_kill_reached
        && seen.leaked.is_empty()
        && seen.new_tunnel_after_up
        && seen.verified;
    if !verdict {
        eprintln!("demo: the demonstration did not go as expected: {seen:#?}");
        return ExitCode::FAILURE;
    }
    println!("demo: done; namespaces, cgroup and pins removed");
    ExitCode::SUCCESS
}
