//! The backends side by side, with the release binary, in one namespace and run: apply (from
//! nothing) and re-apply of a scope with 1 and 10,000 servers under eBPF, nftables and the
//! iptables files; the rendered sizes; and what one UDP send to the last server costs with each
//! (the output hooks run in the sender's system call), against no filter.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use testbed::{process::command_in, Cgroup, Netns, PinRoot};

use crate::{control::server, timed};

const COUNTS: [u32; 2] = [1, 10_000];
const RUNS: usize = 5;
/// Sends per measurement: enough for a stable mean, few enough for a linear rule list.
const SENDS: &str = "20000";

pub fn run(bin: &Path) -> Result<Value> {
    crate::in_private_dir("ksbenchbk", |dir| measure(bin, dir))
}

fn measure(bin: &Path, dir: &Path) -> Result<Value> {
    let netns = Netns::new("bk");
    netns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up0p"]);
    for dev in ["up0", "up0p"] {
        netns.ip(&["link", "set", dev, "up"]);
    }
    netns.ip(&["link", "set", "up0", "arp", "off"]);
    netns.addr("up0", "192.0.2.2/24");
    netns.ip(&["route", "add", "default", "dev", "up0"]);
    let pins = PinRoot::new();
    let probe = testbed::story::probe_bin();
    let mut rows = Vec::new();
    for servers in COUNTS {
        let config = dir.join(format!("killswitch-{servers}.toml"));
        let mut text = String::from("tunnels = [\"tun0\"]\n");
        for i in 0..servers {
            writeln!(
                text,
                "[[server]]\naddress = \"{}\"\nport = 1194\nprotocol = \"udp\"",
                server(i)
            )?;
        }
        testbed::write_config(&config, &text);
        // The last server: a linear list walks all of them.
        let target = format!("{}:1194", server(servers - 1));
        let cgroup = Cgroup::new();
        let killswitch = |args: &[&str]| {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net={}", netns.path().display()))
                .arg(bin)
                .arg("--config")
                .arg(&config)
                .arg("-q")
                .args(args)
                .args(["--cgroup", &cgroup.relative])
                .env("KILLSWITCH_PIN_ROOT", &pins.path)
                .env("KILLSWITCH_STATE_DIR", &pins.state);
            cmd
        };
        let send_cost = || -> Result<f64> {
            let out =
                command_in(&netns, Some(&cgroup), &probe, &["blast", &target, SENDS]).output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let (ns, refused) = text.trim().split_once(' ').context("blast output")?;
            if refused != "0" {
                bail!("{refused} sends to an allowed server were refused");
            }
            Ok(ns.parse()?)
        };
        let unfiltered = median((0..RUNS).map(|_| send_cost()).collect::<Result<_>>()?);
        eprintln!("bench: backends with {servers} servers");

        for backend in ["ebpf", "nftables"] {
            let mut first = Vec::new();
            let mut again = Vec::new();
            for _ in 0..RUNS {
                first.push(timed(&mut killswitch(&["up", "--backend", backend]))?);
                again.push(timed(&mut killswitch(&["up", "--backend", backend]))?);
                timed(&mut killswitch(&["down"]))?;
            }
            timed(&mut killswitch(&["up", "--backend", backend]))?;
            let send = median((0..RUNS).map(|_| send_cost()).collect::<Result<_>>()?);
            timed(&mut killswitch(&["down"]))?;
            rows.push(json!({
                "backend": backend, "servers": servers,
                "apply_ms": median(first), "reapply_ms": median(again),
                "send_ns": send, "send_unfiltered_ns": unfiltered,
            }));
        }

        // The iptables files, as a user loads them.
        let mut files = Vec::new();
        for (format, tool) in [
            ("iptables", "iptables-restore"),
            ("ip6tables", "ip6tables-restore"),
        ] {
            let out = killswitch(&["render", format]).output()?;
            if !out.status.success() {
                bail!("render {format}: {}", String::from_utf8_lossy(&out.stderr));
            }
            let path = dir.join(format!("{format}-{servers}"));
            std::fs::write(&path, &out.stdout)?;
            files.push((tool, path));
        }
        let restore = |tool: &str, file: &Path| {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net={}", netns.path().display()))
                .arg(tool)
                .arg(file);
            cmd
        };
        let empty = dir.join("empty");
        std::fs::write(
            &empty,
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
        )?;
        let mut first = Vec::new();
        let mut again = Vec::new();
        let both = |files: &[(&str, std::path::PathBuf)]| -> Result<f64> {
            let mut ms = 0.0;
            for (tool, file) in files {
                ms += timed(&mut restore(tool, file))?;
            }
            Ok(ms)
        };
        let reset = || -> Result<()> {
            timed(&mut restore("iptables-restore", &empty))?;
            timed(&mut restore("ip6tables-restore", &empty))?;
            Ok(())
        };
        for _ in 0..RUNS {
            first.push(both(&files)?);
            again.push(both(&files)?);
            reset()?;
        }
        both(&files)?;
        let send = median((0..RUNS).map(|_| send_cost()).collect::<Result<_>>()?);
        reset()?;
        rows.push(json!({
            "backend": "iptables", "servers": servers,
            "apply_ms": median(first), "reapply_ms": median(again),
            "send_ns": send, "send_unfiltered_ns": unfiltered,
        }));

        let mut sizes = serde_json::Map::new();
        for format in ["nft", "iptables", "ip6tables"] {
            let out = killswitch(&["render", format]).output()?;
            sizes.insert(format.to_owned(), json!(out.stdout.len()));
        }
        rows.push(json!({ "servers": servers, "rendered_bytes": sizes }));
    }
    Ok(json!({ "runs": RUNS, "sends": SENDS, "rows": rows }))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
