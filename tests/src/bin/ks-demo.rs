//! `ks-demo`: the demonstration behind `cargo xtask demo`. Builds the OpenVPN lab (client ->
//! router -> OpenVPN server with NAT -> web host), tells the story (`testbed::demo`) with the
//! `killswitch` binary next to this one, and removes everything afterwards.

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
    match testbed::demo::tell(&mut |line| println!("demo: {line}")) {
        Ok(()) => {
            println!("demo: done; namespaces, cgroups and pins removed");
            ExitCode::SUCCESS
        }
        Err(what) => {
            eprintln!("demo: the demonstration did not go as expected: {what}");
            ExitCode::FAILURE
        }
    }
}
