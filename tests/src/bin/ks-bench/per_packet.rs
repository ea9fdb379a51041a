//! Per-packet cost of each verdict path through BPF_PROG_TEST_RUN as the server list and the
//! LAN list grow, against a floor program that only counts and allows, in the same rounds:
//! each round runs the floor and every path once (A B C ... A B C ...), so drift of the
//! machine reaches them all alike. The kernel reports the average time per run.

use std::{net::Ipv6Addr, path::Path, time::Duration};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, Map, MapData},
    programs::{CgroupSkb, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use killswitch::{
    ebpf::{entries::address_key, MapEntries, PinnedMaps, Programs, OBJECT},
    events::EventReader,
    interfaces,
    policy::{resolve_servers, Policy},
};
use killswitch_common::{Direction, ServerKey, Settings, IPPROTO_UDP};
use serde_json::{json, Value};
use testbed::{packets::*, Netns, PinRoot};

use crate::{median, progress, stats, Options};

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

struct Sizes {
    rounds: usize,
    repeat: u32,
    servers: &'static [usize],
    lan: &'static [usize],
}

fn sizes(options: Options) -> Sizes {
    if options.quick {
        Sizes {
            rounds: 5,
            repeat: 5_000,
            servers: &[1, 1_000],
            lan: &[1],
        }
    } else {
        Sizes {
            rounds: 7,
            repeat: 50_000,
            servers: &[1, 1_000, 100_000],
            lan: &[1, 1_000],
        }
    }
}

/// Runs per round when every drop sends an event: fewer than the ring buffer holds.
const REPEAT_WITH_EVENTS: u32 = 2_000;
/// Runs per measurement with `trace` on: each writes a record of about 200 bytes, and the
/// 128 KiB log ring (drained after each measurement) must not fill.
const REPEAT_TRACED: u32 = 400;

/// aya-log's records of the traced copy, read and thrown away.
struct Discard;

impl log::Log for Discard {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, _: &log::Record<'_>) {}
    fn flush(&self) {}
}

pub struct VerdictPath {
    pub name: &'static str,
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
        on_tunnel,
        frame,
    };
    vec![
        path("tunnel v4", true, out4(TCP, "203.0.113.9", 80)),
        path("tunnel v6", true, out6(TCP, "2001:db8:203::9", 80)),
        path("server v4", false, out4(UDP, "198.51.100.1", 1194)),
        path("server v6", false, out6(TCP, "2001:db8:100::1", 443)),
        path("lan v4", false, out4(TCP, "192.168.77.5", 80)),
        path("lan v6", false, out6(TCP, "2001:db8:77::5", 80)),
        path("default drop v4", false, out4(TCP, "203.0.113.9", 80)),
        path("default drop v6", false, out6(TCP, "2001:db8:203::9", 80)),
    ]
}

/// The policy's programs and their maps, and the floor, in the bench's namespace.
struct Bench {
    programs: Programs,
    maps: PinnedMaps,
    floor: Ebpf,
    tun0: u32,
    up0: u32,
    base: MapEntries,
    pins: PinRoot,
    _floor_pins: PinRoot,
}

impl Bench {
    fn new(netns: &Netns) -> Result<Bench> {
        let policy = Policy::from_toml(POLICY, Path::new("bench.toml"))?;
        // The bench policy names addresses only: nothing to look up.
        let (servers, _) = resolve_servers(&policy.servers);
        let base = MapEntries::new(
            &policy,
            &interfaces::list()?,
            interfaces::netns_cookie()?,
            &servers,
            &[],
            Vec::new(),
        );
        let pins = PinRoot::new();
        let programs = Programs::load(&pins.path)?;
        let maps = PinnedMaps::open(&pins.path)?;
        // The floor's own copy of the object's maps, pinned apart from the policy's.
        let floor_pins = PinRoot::new();
        let mut floor = EbpfLoader::new()
            .default_map_pin_directory(&floor_pins.path)
            .load(OBJECT)
            .context("the object loads")?;
        let program: &mut CgroupSkb = floor
            .program_mut("floor")
            .context("the floor program")?
            .try_into()?;
        program.load().context("the floor program loads")?;
        Ok(Bench {
            programs,
            maps,
            floor,
            tun0: netns.ifindex("tun0"),
            up0: netns.ifindex("up0"),
            base,
            pins,
            _floor_pins: floor_pins,
        })
    }

    /// The base policy plus filler servers and LAN prefixes up to the given sizes.
    fn fill(&mut self, servers: usize, lan: usize, every_drop_reported: bool) -> Result<()> {
        let mut entries = self.base.clone();
        // Filler servers: 198.18.0.0/15, one UDP endpoint each (the usual kind of entry).
        for i in 0..servers.saturating_sub(1) {
            let ip = crate::server(i as u32);
            entries
                .servers
                .insert(ServerKey::new(address_key(ip.into()), 1194, IPPROTO_UDP));
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

    /// Kernel-reported nanoseconds per run of `program` over `repeat` runs of `frame`.
    fn once(&self, program: &CgroupSkb, frame: &[u8], ifindex: u32, repeat: u32) -> Result<f64> {
        let ctx = skb_context(ifindex);
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        };
        Ok(program.test_run(opts)?.duration.as_nanos() as f64)
    }

    fn floor(&self) -> &CgroupSkb {
        self.floor
            .program("floor")
            .and_then(|p| <&CgroupSkb>::try_from(p).ok())
            .expect("loaded above")
    }

    fn path(&self, path: &VerdictPath, repeat: u32) -> Result<f64> {
        let ifindex = if path.on_tunnel { self.tun0 } else { self.up0 };
        self.once(
            self.programs.program(Direction::Egress),
            &path.frame,
            ifindex,
            repeat,
        )
        .with_context(|| format!("test run of {}", path.name))
    }
}

/// The uplink guard's tc program on the uplink's paths, beside the cgroup program and the floor
/// in the same rounds (1 server): what a frame pays on an uplink the guard watches, on top of
/// the cgroup program when it comes from a local socket.
fn guard(bench: &Bench, paths: &[VerdictPath], rounds: usize, repeat: u32) -> Result<Vec<Value>> {
    use aya::programs::SchedClassifier;
    use killswitch::ebpf::guard;
    progress("per-packet cost of the uplink guard");
    guard::load(&bench.pins.path, &bench.pins.path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut entries = bench
        .maps
        .entries()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .interfaces;
    entries.guarded = [(bench.up0, ("up0".to_owned(), 14))].into();
    PinnedMaps::open(&bench.pins.path)
        .and_then(|mut maps| maps.write_interfaces(&entries))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let program =
        SchedClassifier::from_pin(guard::program_pin(&bench.pins.path, Direction::Egress))?;
    let uplink: Vec<&VerdictPath> = paths.iter().filter(|p| !p.on_tunnel).collect();
    let mut measured = vec![(Vec::new(), Vec::new(), Vec::new()); uplink.len()];
    for _ in 0..rounds {
        for (path, (floor, cgroup, tc)) in uplink.iter().zip(&mut measured) {
            floor.push(bench.once(bench.floor(), &path.frame, bench.up0, repeat)?);
            cgroup.push(bench.path(path, repeat)?);
            let ctx = skb_context(bench.up0);
            let opts = TestRunOptions {
                data_in: Some(&path.frame),
                ctx_in: Some(&ctx),
                repeat,
                ..Default::default()
            };
            tc.push(program.test_run(opts)?.duration.as_nanos() as f64);
        }
    }
    Ok(uplink
        .iter()
        .zip(&measured)
        .map(|(path, (floor, cgroup, tc))| {
            json!({
                "path": format!("{}, guard", path.name), "servers": 1, "lan_prefixes": 1,
                "ns": stats(tc), "guard_vs_floor": median(tc) / median(floor),
                "guard_vs_cgroup": median(tc) / median(cgroup),
                "cgroup_ns": stats(cgroup), "floor_ns": stats(floor),
            })
        })
        .collect())
}

/// The uplink paths with the tunnel bits as `up` writes them and with them all 0 (every packet
/// looks TUNNELS up, as before they existed), in the same rounds, with `servers` and `lan`: what
/// the bits save, on any host, in one run.
fn tunnel_bits(
    bench: &mut Bench,
    paths: &[VerdictPath],
    (servers, lan): (usize, usize),
    sizes: &Sizes,
) -> Result<Vec<Value>> {
    progress("per-packet cost with the tunnel bits and without them");
    bench.fill(servers, lan, false)?;
    let settings = MapData::from_pin(bench.pins.path.join("SETTINGS"))?;
    let mut settings: Array<MapData, Settings> = Array::try_from(Map::Array(settings))?;
    let written = settings.get(&0, 0)?;
    let uplink: Vec<&VerdictPath> = paths.iter().filter(|p| !p.on_tunnel).collect();
    let mut measured = vec![(Vec::new(), Vec::new()); uplink.len()];
    for _ in 0..sizes.rounds {
        for (path, (with, without)) in uplink.iter().zip(&mut measured) {
            with.push(bench.path(path, sizes.repeat)?);
            let looked_up = Settings {
                tunnel_free: 0,
                ..written
            };
            settings.set(0, looked_up, 0)?;
            let run = bench.path(path, sizes.repeat);
            settings.set(0, written, 0)?;
            without.push(run?);
        }
    }
    Ok(uplink
        .iter()
        .zip(&measured)
        .map(|(path, (with, without))| {
            json!({
                "path": format!("{}, tunnel bits 0", path.name),
                "servers": servers, "lan_prefixes": lan,
                "ns": stats(without), "with_bits_ns": stats(with),
                "with_bits_vs_without": median(with) / median(without),
            })
        })
        .collect())
}

pub fn run(netns: &Netns, options: Options) -> Result<Value> {
    let sizes = sizes(options);
    let mut bench = Bench::new(netns)?;
    let paths = paths();
    let floor_frame = &paths[0].frame;
    let configs: Vec<(usize, usize)> = sizes
        .servers
        .iter()
        .flat_map(|&servers| sizes.lan.iter().map(move |&lan| (servers, lan)))
        .collect();
    // Per config: the floor's rounds, then each path's.
    let mut measured: Vec<(Vec<f64>, Vec<Vec<f64>>)> =
        vec![(Vec::new(), vec![Vec::new(); paths.len()]); configs.len()];
    // Rounds outermost: every config and path is measured once per round, so drift of the
    // machine (and the first, cold round) reaches them all alike.
    for round in 0..sizes.rounds {
        progress(&format!(
            "per-packet cost, round {} of {}: {} configurations of the lists",
            round + 1,
            sizes.rounds,
            configs.len()
        ));
        for (&(servers, lan), (floor, values)) in configs.iter().zip(&mut measured) {
            bench.fill(servers, lan, false)?;
            floor.push(bench.once(bench.floor(), floor_frame, bench.up0, sizes.repeat)?);
            for (path, into) in paths.iter().zip(values) {
                into.push(bench.path(path, sizes.repeat)?);
            }
        }
    }
    let mut rows = Vec::new();
    let mut floors = Vec::new();
    for (&(servers, lan), (floor, values)) in configs.iter().zip(&measured) {
        let floor_median = median(floor);
        floors.push(json!({ "servers": servers, "lan_prefixes": lan, "ns": stats(floor) }));
        for (path, values) in paths.iter().zip(values) {
            rows.push(json!({
                "path": path.name, "servers": servers, "lan_prefixes": lan,
                "ns": stats(values), "vs_floor": median(values) / floor_median,
            }));
        }
    }
    // The drop path when every packet sends an event (no rate limit), the ring drained per round.
    progress("per-packet cost of a drop that sends an event");
    bench.fill(1, 1, true)?;
    let mut reader = EventReader::open(&bench.pins.path).map_err(|e| anyhow::anyhow!("{e}"))?;
    for path in paths.iter().filter(|p| p.name.starts_with("default drop")) {
        let mut values = Vec::new();
        for _ in 0..sizes.rounds {
            values.push(bench.path(path, REPEAT_WITH_EVENTS)?);
            let _ = reader.wait(Duration::ZERO);
        }
        rows.push(json!({
            "path": format!("{} + event", path.name), "servers": 1, "lan_prefixes": 1,
            "ns": stats(&values),
        }));
    }
    // `trace` on against off: the same paths through a copy loaded with aya-log at info, in
    // the same rounds, the log ring drained after each run.
    progress("per-packet cost with `trace` on and off");
    bench.fill(1, 1, false)?;
    let mut traced = Programs::load_traced(&bench.pins.path, bench.programs.pair())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut logs = traced
        .log_reader(Discard)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut on_off = vec![(Vec::new(), Vec::new()); paths.len()];
    for _ in 0..sizes.rounds {
        for (path, (off, on)) in paths.iter().zip(&mut on_off) {
            let ifindex = if path.on_tunnel {
                bench.tun0
            } else {
                bench.up0
            };
            off.push(bench.path(path, REPEAT_TRACED)?);
            let program = traced.program(Direction::Egress);
            on.push(bench.once(program, &path.frame, ifindex, REPEAT_TRACED)?);
            logs.flush();
        }
    }
    for (path, (off, on)) in paths.iter().zip(&on_off) {
        rows.push(json!({
            "path": format!("{}, trace off", path.name), "servers": 1, "lan_prefixes": 1,
            "ns": stats(off),
        }));
        rows.push(json!({
            "path": format!("{}, trace on", path.name), "servers": 1, "lan_prefixes": 1,
            "ns": stats(on), "vs_off": median(on) / median(off),
        }));
    }
    drop(logs);
    drop(traced);
    let most = (
        *sizes.servers.last().expect("sizes"),
        *sizes.lan.last().expect("sizes"),
    );
    rows.extend(tunnel_bits(&mut bench, &paths, most, &sizes)?);
    bench.fill(1, 1, false)?;
    rows.extend(guard(&bench, &paths, sizes.rounds, sizes.repeat)?);
    let at = |name: &str, servers: usize, lan: usize| {
        rows.iter()
            .find(|r| r["path"] == name && r["servers"] == servers && r["lan_prefixes"] == lan)
            .and_then(|r| r["ns"]["median"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let growth: Vec<Value> = paths
        .iter()
        .map(|p| {
            json!({
                "path": p.name, "lan_prefixes": most.1, "servers": most.0,
                "vs_one_server": at(p.name, most.0, most.1) / at(p.name, 1, most.1),
            })
        })
        .collect();
    Ok(json!({
        "rounds": sizes.rounds, "repeat": sizes.repeat,
        "servers": sizes.servers, "lan_prefixes": sizes.lan,
        "floor": floors, "rows": rows, "growth": growth,
    }))
}
