//! Per-packet cost of each verdict path through BPF_PROG_TEST_RUN, as the
//! server list and the LAN list grow. The kernel reports the average time per run; each number
//! is the median of several rounds. Results go to `target/bench/per_packet.json`.

use std::{net::Ipv6Addr, path::Path, time::Duration};

use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use killswitch::{
    ebpf::{entries::address_key, MapEntries, PinnedMaps, Programs},
    events::EventReader,
    interfaces,
    policy::{resolve_servers, Policy},
};
use killswitch_common::{Direction, ServerKey, ANY_PORT, IPPROTO_UDP};
use serde_json::json;
use testbed::{packets::*, Netns, PinRoot};

const ROUNDS: usize = 7;
const REPEAT: u32 = 50_000;
/// Runs per round when every drop sends an event: fewer than the ring buffer holds.
const REPEAT_WITH_EVENTS: u32 = 2_000;
const SERVER_COUNTS: [usize; 3] = [1, 1_000, 100_000];
const LAN_COUNTS: [usize; 2] = [1, 1_000];

const POLICY: &str = r#"
tunnels = ["tun0"]
[[server]]
address = "198.51.100.1"
port = 1194
protocol = "udp"
[[server]]
address = "2001:db8:100::1"
port = 443
protocol = "tcp"
[lan]
networks = ["192.168.77.0/24", "2001:db8:77::/64"]
"#;

const ME4: &str = "192.0.2.2";
const ME6: &str = "2001:db8:2::2";

struct VerdictPath {
    name: &'static str,
    direction: Direction,
    on_tunnel: bool,
    frame: Vec<u8>,
}

fn paths() -> Vec<VerdictPath> {
    let out4 = |protocol, dst: &str, port| {
        let l4 = transport(protocol, 40000, port);
        let ip = ipv4(protocol, ME4.parse().unwrap(), dst.parse().unwrap(), 0, &l4);
        ethernet(ETH_P_IP, &ip)
    };
    let out6 = |protocol, dst: &str, port| {
        let l4 = transport(protocol, 40000, port);
        let ip = ipv6(protocol, ME6.parse().unwrap(), dst.parse().unwrap(), &l4);
        ethernet(ETH_P_IPV6, &ip)
    };
    let path = |name, on_tunnel, frame| VerdictPath {
        name,
        direction: Direction::Egress,
        on_tunnel,
        frame,
    };
    vec![
        path("tunnel allow v4", true, out4(TCP, "203.0.113.9", 80)),
        path("tunnel allow v6", true, out6(TCP, "2001:db8:203::9", 80)),
        path("server allow v4", false, out4(UDP, "198.51.100.1", 1194)),
        path("server allow v6", false, out6(TCP, "2001:db8:100::1", 443)),
        path("lan allow v4", false, out4(TCP, "192.168.77.5", 80)),
        path("lan allow v6", false, out6(TCP, "2001:db8:77::5", 80)),
        path("default drop v4", false, out4(TCP, "203.0.113.9", 80)),
        path("default drop v6", false, out6(TCP, "2001:db8:203::9", 80)),
    ]
}

/// Loaded programs and their maps in a private namespace with `tun0` and `up0`.
struct Bench {
    programs: Programs,
    maps: PinnedMaps,
    tun0: u32,
    up0: u32,
    base: MapEntries,
    pins: PinRoot,
    _netns: Netns,
}

impl Bench {
    fn new() -> Result<Bench> {
        let netns = Netns::entered_with_links("b", &["tun0", "up0"]);
        let policy = Policy::from_toml(POLICY, Path::new("bench.toml"))?;
        // The bench policy names addresses only: nothing to look up.
        let (servers, _) = resolve_servers(&policy.servers);
        let base = MapEntries::new(
            &policy,
            &interfaces::list()?,
            interfaces::netns_cookie()?,
            &servers,
            &[],
        );
        let pins = PinRoot::new();
        let programs = Programs::load(&pins.path)?;
        let maps = PinnedMaps::open(&pins.path)?;
        Ok(Bench {
            programs,
            maps,
            tun0: netns.ifindex("tun0"),
            up0: netns.ifindex("up0"),
            base,
            pins,
            _netns: netns,
        })
    }

    /// The base policy plus filler servers and LAN prefixes up to the given sizes.
    fn fill(&mut self, servers: usize, lan: usize, every_drop_reported: bool) -> Result<()> {
        let mut entries = self.base.clone();
        // Filler servers: 198.18.0.0/15 (benchmark range), one UDP port each.
        for i in 0..servers.saturating_sub(1) {
            let ip = std::net::Ipv4Addr::from(0xc612_0000u32 + i as u32);
            let port = if i % 2 == 0 { 1194 } else { ANY_PORT };
            entries
                .servers
                .insert(ServerKey::new(address_key(ip.into()), port, IPPROTO_UDP));
        }
        // Filler LAN prefixes: /64s under 2001:db8:f000::/36.
        for i in 0..lan.saturating_sub(1) {
            let net = Ipv6Addr::new(
                0x2001,
                0xdb8,
                0xf000 | (i as u16 >> 4),
                (i as u16) << 12,
                0,
                0,
                0,
                0,
            );
            entries.lan.insert((64, net.octets()));
        }
        if every_drop_reported {
            entries.settings.event_interval_ns = 0;
            entries.settings.event_burst_ns = u64::MAX / 2;
        }
        self.maps
            .write(&entries)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Median kernel-reported nanoseconds per packet over `ROUNDS` rounds of `repeat` runs.
    fn measure(
        &self,
        path: &VerdictPath,
        repeat: u32,
        mut between: impl FnMut(),
    ) -> Result<(f64, Vec<f64>)> {
        let ifindex = if path.on_tunnel { self.tun0 } else { self.up0 };
        let ctx = skb_context(ifindex);
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            let opts = TestRunOptions {
                data_in: Some(&path.frame),
                ctx_in: Some(&ctx),
                repeat,
                ..Default::default()
            };
            let result = self
                .programs
                .program(path.direction)
                .test_run(opts)
                .with_context(|| format!("test run of {}", path.name))?;
            rounds.push(result.duration.as_nanos() as f64);
            between();
        }
        let mut sorted = rounds.clone();
        sorted.sort_by(f64::total_cmp);
        Ok((sorted[ROUNDS / 2], rounds))
    }
}

pub fn run(release_bin: &std::path::Path) -> Result<()> {
    let mut bench = Bench::new()?;
    let paths = paths();
    let mut rows = Vec::new();
    let mut table = Vec::new();
    for servers in SERVER_COUNTS {
        for lan in LAN_COUNTS {
            eprintln!("bench: {servers} servers, {lan} LAN prefixes");
            bench.fill(servers, lan, false)?;
            for path in &paths {
                let (median, rounds) = bench.measure(path, REPEAT, || {})?;
                rows.push(json!({
                    "path": path.name, "servers": servers, "lan_prefixes": lan,
                    "ns_per_packet": median, "rounds": rounds, "repeat": REPEAT,
                }));
                table.push((path.name.to_string(), servers, lan, median));
            }
        }
    }
    // The drop path when every packet sends an event (no rate limit), ring drained per round.
    bench.fill(1, 1, true)?;
    let mut reader = EventReader::open(&bench.pins.path).map_err(|e| anyhow::anyhow!("{e}"))?;
    for path in paths.iter().filter(|p| p.name.starts_with("default drop")) {
        let name = format!("{} + event", path.name);
        let (median, rounds) = bench.measure(path, REPEAT_WITH_EVENTS, || {
            let _ = reader.wait(Duration::ZERO);
        })?;
        rows.push(json!({
            "path": name, "servers": 1, "lan_prefixes": 1,
            "ns_per_packet": median, "rounds": rounds, "repeat": REPEAT_WITH_EVENTS,
        }));
        table.push((name, 1, 1, median));
    }

    let at = |name: &str, servers: usize, lan: usize| {
        table
            .iter()
            .find(|r| r.0 == name && r.1 == servers && r.2 == lan)
            .map_or(f64::NAN, |r| r.3)
    };
    println!(
        "{:<24} {:>8} {:>6} {:>10}",
        "path", "servers", "lan", "ns/packet"
    );
    for (name, servers, lan, ns) in &table {
        println!("{name:<24} {servers:>8} {lan:>6} {ns:>10.1}");
    }
    let mut ratios = serde_json::Map::new();
    println!("\nratios (target: growth <= 1.20 at 100,000 servers; drop + event < 2.00 x allowed)");
    for path in &paths {
        for lan in LAN_COUNTS {
            let ratio = at(path.name, 100_000, lan) / at(path.name, 1, lan);
            let key = format!("{} at 100000 vs 1 servers, {lan} lan", path.name);
            println!("{key:<60} {ratio:>6.2}");
            ratios.insert(key, json!(ratio));
        }
    }
    for family in ["v4", "v6"] {
        let worst_allowed = ["server allow", "lan allow"]
            .iter()
            .map(|p| at(&format!("{p} {family}"), 1, 1))
            .fold(f64::MIN, f64::max);
        let ratio = at(&format!("default drop {family} + event"), 1, 1) / worst_allowed;
        let key = format!("default drop {family} + event vs worst allowed {family}");
        println!("{key:<60} {ratio:>6.2}");
        ratios.insert(key, json!(ratio));
    }
    let out = std::path::PathBuf::from("target/bench");
    std::fs::create_dir_all(&out)?;
    let report = json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
        "rounds": ROUNDS,
        "rows": rows,
        "ratios": ratios,
    });
    std::fs::write(
        out.join("per_packet.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("\nwritten: target/bench/per_packet.json");

    let control = crate::control::run(release_bin)?;
    let ms = |key: &str| control[key].as_f64().unwrap_or(f64::NAN);
    println!("\ncontrol plane, 10,000 servers + 4,000 LAN prefixes (release build, median of 5)");
    println!(
        "check: {:.1} ms; nft -c -f of the same sets: {:.1} ms; ratio {:.2} (target <= 1.00)",
        ms("check_ms"),
        ms("nft_check_ms"),
        ms("check_vs_nft_check")
    );
    println!(
        "cold up (load, verify, fill, attach): {:.1} ms; ratio to nft -c -f {:.2} (target <= 1.00); nft -f of the same ruleset: {:.1} ms, ratio {:.2}",
        ms("cold_up_ms"),
        ms("cold_up_ms") / ms("nft_check_ms"),
        ms("nft_load_ms"),
        ms("cold_up_vs_nft_load")
    );
    std::fs::write(
        out.join("control.json"),
        serde_json::to_string_pretty(&control)?,
    )?;

    let daemon = crate::daemon::run(release_bin)?;
    let field = |path: &[&str]| {
        path.iter()
            .fold(&daemon, |v, k| &v[*k])
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    println!("\ndaemon and live server changes (release build)");
    println!(
        "link event -> tunnel map: added median {:.0} us, max {:.0} us; removed median {:.0} us, max {:.0} us (target: median < 5,000 us)",
        field(&["link_added_to_map_us", "median"]),
        field(&["link_added_to_map_us", "max"]),
        field(&["link_removed_from_map_us", "median"]),
        field(&["link_removed_from_map_us", "max"]),
    );
    let set_ms = field(&["servers_set_10000_ms"]);
    let nft_ms = field(&["nft_f_10000_ms"]);
    println!(
        "servers set, 10,000 replacing 10,000: {set_ms:.1} ms (target < 50 ms); the same as one nft -f transaction: {nft_ms:.1} ms; ratio {:.2}",
        set_ms / nft_ms
    );
    println!(
        "daemon resident memory at 10,000 servers: {:.0} KiB",
        field(&["daemon_rss_kib_at_10000_servers"])
    );
    std::fs::write(
        out.join("daemon.json"),
        serde_json::to_string_pretty(&daemon)?,
    )?;
    println!("written: target/bench/daemon.json");

    let backends = crate::backends::run(release_bin)?;
    println!(
        "\nbackends side by side (release build, a cgroup scope, median of {} runs)",
        backends["runs"]
    );
    println!(
        "{:<10} {:>8} {:>10} {:>12} {:>10} {:>12}",
        "backend", "servers", "apply ms", "re-apply ms", "send ns", "vs no filter"
    );
    for row in backends["rows"].as_array().into_iter().flatten() {
        if let Some(sizes) = row.get("rendered_bytes") {
            println!("{:<10} {:>8} rendered bytes: {sizes}", "", row["servers"]);
            continue;
        }
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<10} {:>8} {:>10.1} {:>12.1} {:>10.0} {:>12.2}",
            row["backend"].as_str().unwrap_or(""),
            row["servers"],
            f("apply_ms"),
            f("reapply_ms"),
            f("send_ns"),
            f("send_ns") / f("send_unfiltered_ns")
        );
    }
    std::fs::write(
        out.join("backends.json"),
        serde_json::to_string_pretty(&backends)?,
    )?;
    println!("written: target/bench/backends.json");
    Ok(())
}
