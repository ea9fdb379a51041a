//! The control plane at scale, with the release binary, each next to its nftables equivalent
//! in the same rounds: `check` against `nft -c -f`; a cold `up` (from nothing to enforced) and a
//! re-`up` (the same policy again) with the eBPF backend and with the nftables backend, against
//! `nft -f` of the same lists as sets (cold: a new table; again: the table replaced in one
//! transaction).

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::Result;
use serde_json::{json, Value};
use testbed::{Cgroup, PinRoot};

use crate::{progress, server, stats, timed, Options};

struct Sizes {
    rounds: usize,
    servers: u32,
    lan: u32,
}

fn sizes(options: Options) -> Sizes {
    if options.quick {
        Sizes {
            rounds: 2,
            servers: 1_000,
            lan: 400,
        }
    } else {
        Sizes {
            // Each round takes about a second; more of them steady the medians on a shared VM.
            rounds: 9,
            servers: 10_000,
            lan: 4_000,
        }
    }
}

pub fn run(bin: &Path, options: Options) -> Result<Value> {
    crate::in_private_dir("ksbenchcp", |dir| measure(bin, dir, sizes(options)))
}

/// LAN `i`: a /24 under 10.0.0.0/8.
fn lan(i: u32) -> String {
    format!("10.{}.{}.0/24", i / 256, i % 256)
}

fn measure(bin: &Path, dir: &Path, sizes: Sizes) -> Result<Value> {
    let config = dir.join("killswitch.toml");
    let mut text = String::from("tunnels = [\"tun0\"]\n[lan]\nnetworks = [");
    for i in 0..sizes.lan {
        write!(text, "{}\"{}\"", if i == 0 { "" } else { ", " }, lan(i))?;
    }
    text.push_str("]\n");
    for i in 0..sizes.servers {
        writeln!(
            text,
            "[[server]]\naddress = \"{}\"\nport = 1194\nprotocol = \"udp\"",
            server(i)
        )?;
    }
    testbed::write_config(&config, &text);
    let ruleset = dir.join("ruleset.nft");
    std::fs::write(&ruleset, nft_ruleset(&sizes))?;
    // The same table again, replacing the first in one transaction.
    let replace = dir.join("replace.nft");
    std::fs::write(
        &replace,
        format!(
            "add table inet ksbench\ndelete table inet ksbench\n{}",
            nft_ruleset(&sizes)
        ),
    )?;

    progress(&format!(
        "control plane: check, cold up and re-up of {} servers + {} LAN prefixes, eBPF, nftables backend, nft -f ({} rounds)",
        sizes.servers, sizes.lan, sizes.rounds
    ));
    let pins = PinRoot::new();
    let names = [
        "check",
        "nft -c -f",
        "cold up, eBPF",
        "cold up, nftables backend",
        "nft -f, new table",
        "re-up, eBPF",
        "re-up, nftables backend",
        "nft -f, table replaced",
    ];
    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..sizes.rounds {
        ms[0].push(timed(
            Command::new(bin).arg("--config").arg(&config).arg("check"),
        )?);
        ms[1].push(timed(
            Command::new("nft").arg("-c").arg("-f").arg(&ruleset),
        )?);
        for (backend, cold, again) in [("ebpf", 2, 5), ("nftables", 3, 6)] {
            let cgroup = Cgroup::new();
            let scoped = |action: &str| {
                let mut cmd = Command::new(bin);
                cmd.arg("--config")
                    .arg(&config)
                    .args(["-q", action, "--cgroup", &cgroup.relative]);
                if action == "up" {
                    cmd.args(["--backend", backend]);
                }
                cmd.env("KILLSWITCH_PIN_ROOT", &pins.path)
                    .env("KILLSWITCH_STATE_DIR", &pins.state);
                cmd
            };
            ms[cold].push(timed(&mut scoped("up"))?);
            ms[again].push(timed(&mut scoped("up"))?);
            timed(&mut scoped("down"))?;
        }
        ms[4].push(timed(Command::new("nft").arg("-f").arg(&ruleset))?);
        ms[7].push(timed(Command::new("nft").arg("-f").arg(&replace))?);
        timed(Command::new("nft").args(["delete", "table", "inet", "ksbench"]))?;
    }
    let rows: Vec<Value> = names
        .iter()
        .zip(&ms)
        .map(|(name, values)| json!({ "what": name, "ms": stats(values) }))
        .collect();
    Ok(json!({
        "servers": sizes.servers, "lan_prefixes": sizes.lan, "rounds": sizes.rounds,
        "rows": rows,
    }))
}

/// The same lists as nftables would hold them: an output chain that drops by default and
/// accepts the tunnel, the servers (address . protocol . port) and the LAN prefixes.
fn nft_ruleset(sizes: &Sizes) -> String {
    let servers: Vec<String> = (0..sizes.servers)
        .map(|i| format!("{} . udp . 1194", server(i)))
        .collect();
    let lans: Vec<String> = (0..sizes.lan).map(lan).collect();
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
