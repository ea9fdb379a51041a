//! `killswitch trace` with real packets: a dropped and an allowed packet each show their
//! direction, step, reason and interface; the policy holds while traced; the untraced programs
//! come back when trace ends, and they carry no logging code at all.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use testbed::{
    net::{TestNet, OTHER_V4, SERVER_V4, TUNNEL_PEER_V4},
    process::{killswitch_bin, killswitch_ok, output_in, Background},
    require_root, Cgroup, PinRoot,
};

const PROBE: &str = env!("CARGO_BIN_EXE_ks-probe");

/// The program ids the scope's links run, egress then ingress.
fn attached(net: &TestNet, pins: &PinRoot, cgroup: &Cgroup) -> Vec<u64> {
    let json: Value = serde_json::from_str(&killswitch_ok(
        &net.client,
        pins,
        &["status", "--json", "--cgroup", &cgroup.relative],
    ))
    .unwrap();
    json["scopes"][0]["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["program_id"].as_u64().unwrap())
        .collect()
}

/// How many aya-log ring-buffer reservations the loaded program `id` makes (its log calls).
fn log_calls(id: u64) -> usize {
    let out = Command::new("bpftool")
        .args(["prog", "dump", "xlated", "id", &id.to_string()])
        .output()
        .expect("bpftool runs");
    assert!(out.status.success(), "bpftool prog dump xlated id {id}");
    String::from_utf8_lossy(&out.stdout)
        .matches("bpf_ringbuf_reserve")
        .count()
}

/// The program ids in the scope's `ICMP_ERRORS` slots (bpftool reads the pinned array).
fn icmp_slots(net: &TestNet, pins: &PinRoot, cgroup: &Cgroup) -> Vec<u64> {
    let json: Value = serde_json::from_str(&killswitch_ok(
        &net.client,
        pins,
        &["status", "--json", "--cgroup", &cgroup.relative],
    ))
    .unwrap();
    let pin_dir = json["scopes"][0]["pin_dir"].as_str().unwrap().to_owned();
    let out = Command::new("bpftool")
        .args([
            "-j",
            "map",
            "dump",
            "pinned",
            &format!("{pin_dir}/ICMP_ERRORS"),
        ])
        .output()
        .expect("bpftool runs");
    let dump: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let ids: Vec<u64> = dump
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| match &entry["value"] {
            Value::Number(n) => n.as_u64(),
            // Bytes as "0x.." strings, little-endian.
            Value::Array(bytes) => Some(bytes.iter().rev().fold(0, |id, b| {
                id << 8
                    | b.as_str()
                        .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
                        .unwrap_or(0)
            })),
            _ => None,
        })
        .collect();
    assert!(!ids.is_empty(), "no ICMP-error program: {dump}");
    ids
}

/// Waits (bounded) until `done` holds.
/// Generous: under the kernels test's emulated CPU a load of the traced copy takes seconds.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(90), "{what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until trace has swapped its copy in; fails at once if trace ended instead.
fn wait_swapped(tracer: &mut Background, swapped: impl Fn() -> bool) {
    wait_for("trace did not swap the programs in", || {
        if let Some(status) = tracer.exited() {
            panic!("trace ended ({status}) before swapping its copy in");
        }
        swapped()
    });
}

#[test]
fn trace_shows_each_verdict_with_its_step_and_reason_and_then_swaps_back() {
    require_root!();
    let net = TestNet::new();
    let cgroup = Cgroup::new();
    let pins = PinRoot::new();
    let dir = testbed::private_dir("kstest");
    let config = dir.join("killswitch.toml");
    testbed::write_config(
        &config,
        &format!("tunnels = [\"tun0\"]\n[[server]]\naddress = \"{SERVER_V4}\"\n"),
    );
    let up = || {
        let config = config.to_str().unwrap();
        killswitch_ok(
            &net.client,
            &pins,
            &["--config", config, "up", "--cgroup", &cgroup.relative],
        )
    };
    up();
    // `killswitch_command`'s 20 s are too few for loading the traced copy under the kernels
    // test's emulated CPU (about three times the work of an `up`).
    let trace = || {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", net.client.path().display()))
            .args(["--", "timeout", "300"])
            .arg(killswitch_bin())
            .args(["trace", "--cgroup", &cgroup.relative, "--json"])
            .env("KILLSWITCH_PIN_ROOT", &pins.path)
            .env("KILLSWITCH_STATE_DIR", &pins.state)
            .env_remove("KILLSWITCH_LOG");
        command
    };
    let untraced = attached(&net, &pins, &cgroup);
    let icmp_untraced = icmp_slots(&net, &pins, &cgroup);
    for id in &untraced {
        assert_eq!(
            log_calls(*id),
            0,
            "the enforcing program {id} carries logging"
        );
    }

    let mut tracer = Background::start(trace());
    wait_swapped(&mut tracer, || attached(&net, &pins, &cgroup) != untraced);
    let traced = attached(&net, &pins, &cgroup);
    let status = killswitch_ok(
        &net.client,
        &pins,
        &["status", "--cgroup", &cgroup.relative],
    );
    assert!(status.contains("a `killswitch trace` runs"), "{status}");
    assert!(traced.iter().all(|id| log_calls(*id) > 0), "{traced:?}");
    let icmp_traced = icmp_slots(&net, &pins, &cgroup);
    assert_ne!(
        icmp_traced, icmp_untraced,
        "the ICMP-error program was not swapped"
    );
    // One trace at a time: a second one finds programs `up` did not attach.
    let second = trace().output().unwrap();
    assert!(!second.status.success(), "a second trace started");

    // One packet the policy drops, one it allows (the tunnel), from the scope.
    let dropped = output_in(
        &net.client,
        Some(&cgroup),
        PROBE,
        &["tcp", &format!("{OTHER_V4}:8080"), "500"],
    );
    assert!(!dropped.status.success(), "dropped while traced too");
    let _ = output_in(
        &net.client,
        Some(&cgroup),
        PROBE,
        &["udp", &format!("{TUNNEL_PEER_V4}:9"), "200"],
    );
    let records: Vec<Value> = tracer
        .lines_until_quiet(Duration::from_secs(2), 1000)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |destination: &str, port: u64| {
        records
            .iter()
            .find(|r| r["destination"] == destination && r["destination_port"] == port)
            .unwrap_or_else(|| panic!("no record for {destination}:{port} in {records:#?}"))
    };
    let drop = find(OTHER_V4, 8080);
    assert_eq!(drop["verdict"], "drop", "{drop}");
    assert_eq!(drop["step"], 10, "{drop}");
    assert_eq!(drop["reason"], "default-drop", "{drop}");
    assert_eq!(drop["direction"], "egress", "{drop}");
    assert_eq!(drop["interface"], "up0", "{drop}");
    assert_eq!(drop["protocol"], "tcp", "{drop}");
    assert_eq!(drop["cgroup"], format!("/{}", cgroup.relative), "{drop}");
    let allow = find(TUNNEL_PEER_V4, 9);
    assert_eq!(allow["verdict"], "allow", "{allow}");
    assert_eq!(allow["step"], 2, "{allow}");
    assert_eq!(allow["reason"], "tunnel", "{allow}");
    assert_eq!(allow["interface"], "tun0", "{allow}");

    // SIGTERM: the programs that ran before are back.
    let group = nix::unistd::Pid::from_raw(tracer.pid() as i32);
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for("trace did not end on SIGTERM", || tracer.exited().is_some());
    assert!(tracer.exited().unwrap().success());
    assert_eq!(attached(&net, &pins, &cgroup), untraced);
    assert_eq!(icmp_slots(&net, &pins, &cgroup), icmp_untraced);
    let status = killswitch_ok(
        &net.client,
        &pins,
        &["status", "--cgroup", &cgroup.relative],
    );
    assert!(!status.contains("killswitch trace"), "{status}");
    let dropped = output_in(
        &net.client,
        Some(&cgroup),
        PROBE,
        &["tcp", &format!("{OTHER_V4}:8080"), "500"],
    );
    assert!(!dropped.status.success(), "dropped after trace too");

    // A trace killed outright leaves its copy in force (the same policy); the next `up`
    // loads the untraced programs again.
    let mut killed = Background::start(trace());
    wait_swapped(&mut killed, || attached(&net, &pins, &cgroup) != untraced);
    let group = nix::unistd::Pid::from_raw(killed.pid() as i32);
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for("trace did not die", || killed.exited().is_some());
    let left = attached(&net, &pins, &cgroup);
    assert!(left.iter().all(|id| log_calls(*id) > 0), "{left:?}");
    up();
    let again = attached(&net, &pins, &cgroup);
    assert!(again.iter().all(|id| log_calls(*id) == 0), "{again:?}");
    assert!(icmp_slots(&net, &pins, &cgroup)
        .iter()
        .all(|id| log_calls(*id) == 0));

    killswitch_ok(&net.client, &pins, &["down", "--cgroup", &cgroup.relative]);
    let _ = std::fs::remove_dir_all(&dir);
}
