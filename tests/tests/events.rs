//! Drop events with real packets: `status --follow` names the packet, its interface and its
//! cgroup; a flood is held to the in-kernel budget and everything held back is counted.

use std::time::Duration;

use serde_json::Value;
use testbed::{
    net::{TestNet, OTHER_V4},
    process::{killswitch_command, killswitch_ok, output_in, Background},
    require_root, Cgroup, PinRoot,
};

const PROBE: &str = env!("CARGO_BIN_EXE_ks-probe");
/// Per-CPU budget in the kernel (killswitch_common::EVENT_*): 100 events a second, bursts of 20.
const EVENTS_PER_SECOND: f64 = 100.0;
const BURST: f64 = 21.0;

struct Setup {
    net: TestNet,
    cgroup: Cgroup,
    pins: PinRoot,
    dir: std::path::PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let net = TestNet::new();
        let dir = testbed::private_dir("kstest");
        let config = dir.join("killswitch.toml");
        testbed::write_config(&config, "tunnels = [\"tun0\"]\n");
        let s = Setup {
            net,
            cgroup: Cgroup::new(),
            pins: PinRoot::new(),
            dir,
        };
        s.killswitch(&["--config", config.to_str().unwrap(), "up"]);
        s
    }

    fn killswitch(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--cgroup", &self.cgroup.relative]);
        killswitch_ok(&self.net.client, &self.pins, &all)
    }

    fn follow(&self, json: bool) -> Background {
        let mut args = vec!["status", "--follow", "--cgroup", &self.cgroup.relative];
        if json {
            args.push("--json");
        }
        Background::start(killswitch_command(&self.net.client, &self.pins, &args))
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.killswitch(&["status", "--json"])).unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Dropped packets counted by the kernel, all reasons and both directions.
fn drops(status: &Value) -> u64 {
    status["scopes"][0]["counters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "drop")
        .map(|c| c["packets"].as_u64().unwrap())
        .sum()
}

#[test]
fn follow_names_the_dropped_packet_its_interface_and_cgroup() {
    require_root!();
    let s = Setup::new();
    let follower = s.follow(false);
    // The follower prints nothing until it reads; give it time to open the ring buffer.
    std::thread::sleep(Duration::from_millis(300));
    let target = format!("{OTHER_V4}:8080");
    let probe = output_in(&s.net.client, Some(&s.cgroup), PROBE, &["tcp", &target]);
    assert!(!probe.status.success(), "the probe must be dropped");
    let line = follower
        .line(Duration::from_secs(5))
        .expect("a drop event within 5 s");
    assert!(
        line.contains("drop egress default-drop tcp 192.0.2.2:"),
        "{line}"
    );
    assert!(line.contains(&format!("-> {target} dev up0")), "{line}");
    assert!(
        line.ends_with(&format!("cgroup /{}", s.cgroup.relative)),
        "{line}"
    );
}

#[test]
fn a_flood_is_held_to_the_event_budget_and_the_rest_is_counted() {
    require_root!();
    let s = Setup::new();
    let follower = s.follow(true);
    std::thread::sleep(Duration::from_millis(300));
    let target = format!("{OTHER_V4}:9");
    let flood = output_in(
        &s.net.client,
        Some(&s.cgroup),
        PROBE,
        &["flood", &target, "2000"],
    );
    assert!(flood.status.success());
    let sent: u64 = String::from_utf8_lossy(&flood.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .parse()
        .unwrap();
    let records: Vec<Value> = follower
        .lines_until_quiet(Duration::from_secs(2), 100_000)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    drop(follower);
    let status = s.status();
    let dropped = drops(&status);
    let suppressed = status["scopes"][0]["events_suppressed"].as_u64().unwrap();
    eprintln!(
        "sent {sent}, dropped {dropped}, events {}, suppressed {suppressed}",
        records.len()
    );
    assert!(dropped >= sent, "every flood datagram is dropped");
    // Every drop is either reported or counted as held back.
    assert_eq!(records.len() as u64 + suppressed, dropped);
    // The budget: per CPU a burst plus the rate over the time the events span.
    let times: Vec<f64> = records
        .iter()
        .map(|r| {
            let t = humantime::parse_rfc3339(r["time"].as_str().unwrap()).unwrap();
            t.duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        })
        .collect();
    let span = times.iter().cloned().fold(f64::MIN, f64::max)
        - times.iter().cloned().fold(f64::MAX, f64::min);
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let budget = cpus * (BURST + EVENTS_PER_SECOND * (span + 0.01));
    assert!(
        (records.len() as f64) <= budget,
        "{} events over {span:.3} s exceed the budget of {budget:.0}",
        records.len()
    );
    assert!(suppressed > 0, "a 1 kHz flood must exceed the budget");
    let first = &records[0];
    assert_eq!(first["destination"], OTHER_V4);
    assert_eq!(first["destination_port"], 9);
    assert_eq!(first["protocol"], "udp");
    assert_eq!(first["interface"], "up0");
}
