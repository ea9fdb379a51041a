//! Throughput through veth pairs between namespaces (iperf3): TCP Gbit/s and 64-byte UDP
//! packets per second received, with no filter, the empty program (the kernel's cgroup_skb
//! hook alone), the floor program (the hook and a program that only counts: what any filter
//! that keeps counters pays), the eBPF backend, the nftables backend and the
//! iptables rendering, on the tunnel path and on the server path (to the last server added) as
//! the server list grows. One pair of namespaces per variant, all set up before the rounds, so
//! each round runs every variant once (A B C D A B C D ...).
//!
//! ```text
//!  client tun0 10.99.0.2 ──────── tun0p 10.99.0.1   server (iperf3 -s)
//!         up0  192.0.2.2 ──────── up0p  192.0.2.1 + the last server's address
//! ```

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{links::CgroupAttachMode, CgroupSkb, CgroupSkbAttachType},
    Ebpf, EbpfLoader,
};
use killswitch::ebpf::OBJECT;
use serde_json::{json, Value};
use testbed::{
    process::{command_in, Background},
    Cgroup, Netns, PinRoot,
};

use crate::{median, progress, server, slices, stats, timed, Options};

/// `ebpf+guard`: the eBPF backend with the uplink guard on `up0` too (the tunnel has none).
const VARIANTS: [&str; 7] = [
    "none",
    "empty",
    "floor",
    "ebpf",
    "ebpf+guard",
    "nftables",
    "iptables",
];
const PORT: u16 = 5201;
const TUNNEL_PEER: &str = "10.99.0.1";

struct Sizes {
    rounds: usize,
    seconds: &'static str,
    servers: &'static [u32],
    /// UDP in interleaved slices ([`crate::slices`]): rounds (a multiple of twice the 7
    /// variants, for a whole number of balanced orders), and ms per slice.
    slice_rounds: usize,
    slice_ms: u64,
}

fn sizes(options: Options) -> Sizes {
    if options.quick {
        Sizes {
            rounds: 1,
            seconds: "1",
            servers: &[1],
            slice_rounds: 14,
            slice_ms: 20,
        }
    } else {
        Sizes {
            rounds: 7,
            seconds: "1",
            servers: &[1, 1_000, 100_000],
            slice_rounds: 112,
            slice_ms: 20,
        }
    }
}

/// One variant's client and server namespaces, its scope's cgroup and its iperf3 server.
struct Side {
    variant: &'static str,
    client: Netns,
    cgroup: Cgroup,
    pins: PinRoot,
    /// The empty or the floor program, attached both ways while this lives.
    _program: Option<Ebpf>,
    _iperf: Vec<Background>,
    server: Netns,
}

impl Side {
    fn new(variant: &'static str, sizes: &Sizes) -> Side {
        let client = Netns::new("tq");
        let server = Netns::new("tr");
        client.veth("tun0", &server, "tun0p");
        client.veth("up0", &server, "up0p");
        client.addr("tun0", "10.99.0.2/24");
        server.addr("tun0p", "10.99.0.1/24");
        client.addr("up0", "192.0.2.2/24");
        server.addr("up0p", "192.0.2.1/24");
        let mut addresses = vec![TUNNEL_PEER.to_owned()];
        for &count in sizes.servers {
            let last = server_address(count);
            server.addr("up0p", &format!("{last}/32"));
            client.ip(&["route", "add", &format!("{last}/32"), "via", "192.0.2.1"]);
            addresses.push(last.to_string());
        }
        // One iperf3 server per address, bound to it: UDP answers must come from the address
        // the client sent to, not the interface's first one.
        let iperf = addresses
            .iter()
            .map(|address| {
                let mut iperf = Command::new("nsenter");
                iperf
                    .arg(format!("--net={}", server.path().display()))
                    // Bounded: a bench killed from outside leaves no server running for ever.
                    .args(["--", "timeout", "3600", "iperf3", "-s", "-B", address])
                    .args(["-p", &PORT.to_string()])
                    .stderr(std::process::Stdio::null());
                Background::start(iperf)
            })
            .collect();
        let cgroup = Cgroup::new();
        let pins = PinRoot::new();
        let program = ["empty", "floor"]
            .contains(&variant)
            .then(|| attach(variant, &cgroup, &pins));
        Side {
            variant,
            client,
            cgroup,
            pins,
            _program: program,
            _iperf: iperf,
            server,
        }
    }

    /// `killswitch ARGS` in the client's namespace, for this side's scope.
    fn killswitch(&self, bin: &Path, config: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.client.path().display()))
            .args(["--", "timeout", "600"])
            .arg(bin)
            .arg("--config")
            .arg(config)
            .arg("-q")
            .args(args)
            .env("KILLSWITCH_PIN_ROOT", &self.pins.path)
            .env("KILLSWITCH_STATE_DIR", &self.pins.state);
        cmd
    }

    /// Puts this variant's filter in force for `config`.
    fn apply(&self, bin: &Path, config: &Path, dir: &Path) -> Result<()> {
        let scope = ["--cgroup", self.cgroup.relative.as_str()];
        match self.variant {
            "ebpf" | "nftables" => {
                let mut args = vec!["up", "--backend", self.variant];
                args.extend(scope);
                timed(&mut self.killswitch(bin, config, &args))?;
            }
            "ebpf+guard" => {
                let guarded = dir.join("guarded.toml");
                let text = std::fs::read_to_string(config)?;
                testbed::write_config(
                    &guarded,
                    &format!("uplinks = [\"up0\"]\n{text}\n[guard]\nenabled = true\n"),
                );
                let mut args = vec!["up", "--backend", "ebpf"];
                args.extend(scope);
                timed(&mut self.killswitch(bin, &guarded, &args))?;
            }
            "iptables" => {
                let out = self
                    .killswitch(bin, config, &["render", "iptables"])
                    .output()?;
                if !out.status.success() {
                    bail!("render: {}", String::from_utf8_lossy(&out.stderr));
                }
                let rules = dir.join("iptables.rules");
                std::fs::write(&rules, &out.stdout)?;
                timed(
                    Command::new("nsenter")
                        .arg(format!("--net={}", self.client.path().display()))
                        .arg("iptables-restore")
                        .arg(&rules),
                )?;
            }
            _ => {}
        }
        Ok(())
    }

    /// One iperf3 run from inside the scope: TCP Gbit/s, or UDP 64-byte packets received per
    /// second.
    fn iperf(&self, target: &str, udp: bool, seconds: &str, affinity: &str) -> Result<f64> {
        let port = PORT.to_string();
        let mut args = vec!["-c", target, "-p", &port, "-t", seconds, "-J"];
        if !affinity.is_empty() {
            args.extend(["-A", affinity]);
        }
        if udp {
            args.extend(["-u", "-l", "64", "-b", "0"]);
        }
        let out = command_in(&self.client, Some(&self.cgroup), "iperf3", &args).output()?;
        let report: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3 {}", String::from_utf8_lossy(&out.stderr)))?;
        if let Some(error) = report["error"].as_str() {
            bail!("iperf3 to {target} ({}): {error}", self.variant);
        }
        let received = &report["end"]["sum_received"];
        let value = if udp {
            let packets = received["packets"].as_f64().unwrap_or(0.0)
                - received["lost_packets"].as_f64().unwrap_or(0.0);
            packets / received["seconds"].as_f64().unwrap_or(f64::NAN)
        } else {
            received["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9
        };
        Ok(value)
    }
}

/// The address of the last server of a list of `count`.
fn server_address(count: u32) -> std::net::Ipv4Addr {
    server(count - 1)
}

/// A config with `count` UDP servers on the iperf3 port, the last one (the iperf3 server) for
/// TCP too (iperf3's control connection).
fn config(dir: &Path, count: u32) -> Result<std::path::PathBuf> {
    let path = dir.join(format!("throughput-{count}.toml"));
    let mut text = String::from("tunnels = [\"tun0\"]\n");
    for i in 0..count {
        writeln!(
            text,
            "[[server]]\naddress = \"{}\"\nport = {PORT}\nprotocol = \"udp\"",
            server(i)
        )?;
    }
    writeln!(
        text,
        "[[server]]\naddress = \"{}\"\nport = {PORT}\nprotocol = \"tcp\"",
        server_address(count)
    )?;
    testbed::write_config(&path, &text);
    Ok(path)
}

/// The object's program `name` (`empty` or `floor`), attached to `cgroup` for egress and
/// ingress as the policy's programs are; its maps pinned under `pins`.
fn attach(name: &str, cgroup: &Cgroup, pins: &PinRoot) -> Ebpf {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&pins.path)
        .load(OBJECT)
        .expect("the object loads");
    let program: &mut CgroupSkb = ebpf
        .program_mut(name)
        .expect("the benchmark's program")
        .try_into()
        .expect("a cgroup_skb program");
    program.load().expect("the benchmark's program loads");
    let fd = std::fs::File::open(&cgroup.path).expect("the cgroup opens");
    for way in [CgroupSkbAttachType::Egress, CgroupSkbAttachType::Ingress] {
        program
            .attach(&fd, way, CgroupAttachMode::Single)
            .expect("the benchmark's program attaches");
    }
    ebpf
}

pub fn run(bin: &Path, options: Options) -> Result<Value> {
    crate::in_private_dir("ksbenchtp", |dir| measure(bin, dir, options))
}

fn measure(bin: &Path, dir: &Path, options: Options) -> Result<Value> {
    let sizes = sizes(options);
    progress(
        "throughput: namespaces and iperf3 servers for no filter, the empty program, the floor, eBPF (and with the guard), nftables, iptables",
    );
    let sides: Vec<Side> = VARIANTS.iter().map(|v| Side::new(v, &sizes)).collect();
    // Let the iperf3 servers come up.
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The sender on one CPU, the receiver on another, in every run: left to the scheduler,
    // they sometimes shared one and sometimes not, and runs of the same filter were 1.3x apart.
    let cpus = match crate::cpus()[..] {
        [receiver, .., sender] => Some((sender, receiver)),
        _ => None,
    };
    let affinity = cpus.map_or(String::new(), |(s, r)| format!("{s},{r}"));
    let places: Vec<slices::Place> = sides
        .iter()
        .map(|side| slices::Place {
            client: &side.client,
            cgroup: &side.cgroup,
            server: &side.server,
        })
        .collect();
    let mut rows = Vec::new();
    for &count in sizes.servers {
        let config = config(dir, count)?;
        for side in &sides {
            progress(&format!(
                "throughput: {} with {count} servers: applying",
                side.variant
            ));
            side.apply(bin, &config, dir)?;
        }
        let last = server_address(count).to_string();
        for (path, target) in [("tunnel", TUNNEL_PEER), ("server", last.as_str())] {
            for udp in [true, false] {
                progress(&format!(
                    "throughput: {count} servers, {path} path, {} ({} rounds)",
                    if udp { "UDP 64-byte" } else { "TCP" },
                    sizes.rounds
                ));
                let mut values: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
                for _ in 0..sizes.rounds {
                    for (side, into) in sides.iter().zip(&mut values) {
                        into.push(side.iperf(target, udp, sizes.seconds, &affinity)?);
                    }
                }
                let unfiltered = &values[variant("none")];
                for (side, measured) in sides.iter().zip(&values) {
                    // Each round's runs follow one another within seconds, so the round's ratio
                    // leaves out how fast the machine was in that round.
                    let ratios = per_round(measured, unfiltered);
                    rows.push(json!({
                        "variant": side.variant, "path": path, "servers": count,
                        "test": if udp { "udp64_pps" } else { "tcp_gbits" },
                        "value": stats(measured),
                        "vs_no_filter": median(&ratios),
                        "vs_no_filter_rounds": stats(&ratios),
                    }));
                }
            }
            progress(&format!(
                "throughput: {count} servers, {path} path, UDP 64-byte in {} rounds of {} ms slices",
                sizes.slice_rounds, sizes.slice_ms
            ));
            let to = std::net::SocketAddr::new(target.parse()?, PORT);
            let measured = slices::measure(&places, to, sizes.slice_rounds, sizes.slice_ms, cpus)?;
            // Each round's ratio to the no-filter slice and to the floor program's slice.
            let unfiltered = &measured[variant("none")].rates;
            let floor = &measured[variant("floor")].rates;
            for (side, measured_side) in sides.iter().zip(&measured) {
                let ratios = per_round(&measured_side.rates, unfiltered);
                let to_floor = per_round(&measured_side.rates, floor);
                rows.push(json!({
                    "variant": side.variant, "path": path, "servers": count,
                    "test": "udp64_slices",
                    "value": stats(&measured_side.rates),
                    "vs_no_filter": median(&ratios),
                    "vs_no_filter_rounds": stats(&ratios),
                    "vs_no_filter_quartiles": quartiles(&ratios),
                    "vs_floor_quartiles": quartiles(&to_floor),
                    "arrived": measured_side.arrived,
                }));
            }
        }
    }
    for side in &sides {
        if ["ebpf", "ebpf+guard", "nftables"].contains(&side.variant) {
            let _ = side
                .killswitch(
                    bin,
                    &dir.join("throughput-1.toml"),
                    &["down", "--cgroup", &side.cgroup.relative],
                )
                .output();
        }
    }
    Ok(json!({
        "rounds": sizes.rounds, "seconds_per_run": sizes.seconds, "servers": sizes.servers,
        "slice_rounds": sizes.slice_rounds, "slice_ms": sizes.slice_ms,
        "rows": rows,
    }))
}

/// Where `name` is in [`VARIANTS`] (and so in every per-variant list here).
fn variant(name: &str) -> usize {
    VARIANTS
        .iter()
        .position(|v| *v == name)
        .expect("a variant of VARIANTS")
}

/// Each round's ratio of `measured` to `baseline` (rounds where the baseline got nothing left
/// out).
fn per_round(measured: &[f64], baseline: &[f64]) -> Vec<f64> {
    measured
        .iter()
        .zip(baseline)
        .filter(|&(_, &n)| n > 0.0)
        .map(|(v, n)| v / n)
        .collect()
}

/// The quartiles of `values` (linear between ranks, as the median is): how far the middle half
/// of the rounds spread.
fn quartiles(values: &[f64]) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let h = sorted.len().saturating_sub(1) as f64 * q;
        let (low, high) = (h.floor() as usize, h.ceil() as usize);
        let (a, b) = (sorted.get(low)?, sorted.get(high)?);
        Some(a + (b - a) * (h - h.floor()))
    };
    json!({ "q1": at(0.25), "median": at(0.5), "q3": at(0.75) })
}
