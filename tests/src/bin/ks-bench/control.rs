//! The control plane at scale, with the release binary: `check` and a cold `up` (load, verify,
//! fill, attach, then `down`) of a config with 10,000 servers and 4,000 LAN prefixes, next to
//! `nft -c -f` and `nft -f` of the same lists as nftables sets, in the same run and namespace.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::Result;
use serde_json::{json, Value};
use testbed::{Cgroup, PinRoot};

use crate::timed;

const SERVERS: u32 = 10_000;
const LAN: u32 = 4_000;
const RUNS: usize = 5;

pub fn run(bin: &Path) -> Result<Value> {
    crate::in_private_dir("ksbenchcp", |dir| measure(bin, dir))
}

/// Server `i`: 198.18.0.0/15 (benchmark range); LAN `i`: a /24 under 10.0.0.0/8.
pub fn server(i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0xc612_0000u32 + i)
}

fn lan(i: u32) -> String {
    format!("10.{}.{}.0/24", i / 256, i % 256)
}

fn measure(bin: &Path, dir: &Path) -> Result<Value> {
    let config = dir.join("killswitch.toml");
    let mut text = String::from("tunnels = [\"tun0\"]\n[lan]\nnetworks = [");
    for i in 0..LAN {
        write!(text, "{}\"{}\"", if i == 0 { "" } else { ", " }, lan(i))?;
    }
    text.push_str("]\n");
    for i in 0..SERVERS {
        writeln!(
            text,
            "[[server]]\naddress = \"{}\"\nport = 1194\nprotocol = \"udp\"",
            server(i)
        )?;
    }
    testbed::write_config(&config, &text);

    let ruleset = dir.join("ruleset.nft");
    std::fs::write(&ruleset, nft_ruleset())?;

    eprintln!(
        "bench: check, cold up and nft -c -f / nft -f of {SERVERS} servers + {LAN} LAN prefixes"
    );
    let pins = PinRoot::new();
    let mut check = Vec::new();
    let mut up = Vec::new();
    let mut nft_check = Vec::new();
    let mut nft_load = Vec::new();
    for _ in 0..RUNS {
        check.push(timed(
            Command::new(bin).arg("--config").arg(&config).arg("check"),
        )?);
        let cgroup = Cgroup::new();
        let scoped = |action: &str| {
            let mut cmd = Command::new(bin);
            cmd.arg("--config")
                .arg(&config)
                .args(["-q", action, "--cgroup", &cgroup.relative])
                .env("KILLSWITCH_PIN_ROOT", &pins.path)
                .env("KILLSWITCH_STATE_DIR", &pins.state);
            cmd
        };
        up.push(timed(&mut scoped("up"))?);
        timed(&mut scoped("down"))?;
        nft_check.push(timed(
            Command::new("nft").arg("-c").arg("-f").arg(&ruleset),
        )?);
        nft_load.push(timed(Command::new("nft").arg("-f").arg(&ruleset))?);
        timed(Command::new("nft").args(["delete", "table", "inet", "ksbench"]))?;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (check, up, nft_check, nft_load) = (
        median(&mut check),
        median(&mut up),
        median(&mut nft_check),
        median(&mut nft_load),
    );
    Ok(json!({
        "servers": SERVERS, "lan_prefixes": LAN, "runs": RUNS,
        "check_ms": check, "nft_check_ms": nft_check, "check_vs_nft_check": check / nft_check,
        "cold_up_ms": up, "cold_up_vs_nft_check": up / nft_check,
        "nft_load_ms": nft_load, "cold_up_vs_nft_load": up / nft_load,
    }))
}

/// The same lists as nftables would hold them: an output chain that drops by default and
/// accepts the tunnel, the servers (address . protocol . port) and the LAN prefixes.
fn nft_ruleset() -> String {
    let servers: Vec<String> = (0..SERVERS)
        .map(|i| format!("{} . udp . 1194", server(i)))
        .collect();
    let lans: Vec<String> = (0..LAN).map(lan).collect();
    format!(
        "table inet ksbench {{\n\
         \x20 set servers {{ type ipv4_addr . inet_proto . inet_service; elements = {{ {} }} }}\n\
         \x20 set lan {{ type ipv4_addr; flags interval; elements = {{ {} }} }}\n\
         \x20 chain output {{\n\
         \x20   type filter hook output priority 0; policy drop;\n\
         \x20   oifname \"lo\" accept\n\
         \x20   oifname \"tun0\" accept\n\
         \x20   ip daddr . meta l4proto . th dport @servers accept\n\
         \x20   ip daddr @lan accept\n\
         \x20 }}\n\
         }}\n",
        servers.join(", "),
        lans.join(", ")
    )
}
