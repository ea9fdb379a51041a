//! `killswitch verify` on a live scope (a child cgroup in a client namespace): a correct scope
//! passes with both backends, and each way of breaking it behind killswitch's back makes the
//! right check fail: a program detached with bpftool, a map entry added or removed by hand, a
//! tunnel made again with a new ifindex and no daemon, a second program of ours attached beside
//! the scope's, the nft table edited by hand.

use std::{path::PathBuf, process::Output};

use killswitch::ebpf::Programs;
use killswitch_common::Direction;
use serde_json::Value;
use testbed::{
    net::TestNet,
    process::{killswitch_command, nft_in},
    require_root, run, Cgroup, PinRoot,
};

const CONFIG: &str = r#"
tunnels = ["tun0"]
[[server]]
address = "198.51.100.1"
port = 1194
protocol = "udp"
[lan]
networks = ["192.168.77.0/24"]
[ntp]
servers = ["203.0.113.123"]
"#;

/// The NTP server's map key: its address, IPv4-mapped, in hex bytes for bpftool.
const NTP_KEY: &str = "00 00 00 00 00 00 00 00 00 00 ff ff cb 00 71 7b";
/// Another address (203.0.113.124), as a hand-added entry.
const OTHER_KEY: &str = "00 00 00 00 00 00 00 00 00 00 ff ff cb 00 71 7c";

struct Setup {
    net: TestNet,
    cgroup: Cgroup,
    pins: PinRoot,
    dir: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = testbed::private_dir("ksverify");
        testbed::write_config(&dir.join("killswitch.toml"), CONFIG);
        Setup {
            net: TestNet::new(),
            cgroup: Cgroup::new(),
            pins: PinRoot::new(),
            dir,
        }
    }

    fn killswitch(&self, args: &[&str]) -> Output {
        let config = self.dir.join("killswitch.toml").display().to_string();
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--cgroup", &self.cgroup.relative]);
        killswitch_command(&self.net.client, &self.pins, &all)
            .output()
            .expect("killswitch runs")
    }

    fn up(&self, backend: &str) {
        let out = self.killswitch(&["up", "--backend", backend]);
        assert!(out.status.success(), "up: {}", text(&out));
    }

    /// `verify --json`: exit status, and each check's result by name.
    fn verify(&self) -> (bool, Value) {
        let out = self.killswitch(&["verify", "--json"]);
        let json: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("verify --json printed no JSON ({e}): {}", text(&out)));
        assert_eq!(
            json["passed"].as_bool(),
            Some(out.status.success()),
            "exit status and `passed` disagree: {json:#}"
        );
        (out.status.success(), json)
    }

    fn pin_dir(&self) -> PathBuf {
        let out = self.killswitch(&["status", "--json"]);
        let json: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        PathBuf::from(json["scopes"][0]["pin_dir"].as_str().expect("a pin dir"))
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.killswitch(&["down"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn result<'a>(json: &'a Value, check: &str) -> &'a str {
    json["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["check"] == check)
        .and_then(|c| c["result"].as_str())
        .unwrap_or_else(|| panic!("no check {check}: {json:#}"))
}

/// Every check named passes, and nothing fails.
fn assert_passes(json: &Value, checks: &[&str]) {
    for check in checks {
        assert_eq!(result(json, check), "pass", "{check}: {json:#}");
    }
    let failed: Vec<&Value> = json["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["result"] == "fail")
        .collect();
    assert!(failed.is_empty(), "failed: {failed:#?}");
}

/// Only `check` fails.
fn assert_fails(json: &Value, check: &str) {
    assert_eq!(result(json, check), "fail", "{check} should fail: {json:#}");
    assert_eq!(json["passed"], false);
}

fn bpftool(args: &[&str]) {
    run("bpftool", args);
}

#[test]
fn ebpf_scope_passes_and_each_change_behind_its_back_fails_its_check() {
    require_root!();
    let s = Setup::new();
    s.up("ebpf");
    let all = [
        "attached",
        "pinned",
        "programs",
        "tunnels",
        "servers",
        "lists",
        "decisions",
        "probes-ipv4",
        "probes-ipv6",
        "tunnel",
    ];
    let (ok, json) = s.verify();
    assert!(ok, "{json:#}");
    assert_passes(&json, &all);
    let decided = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "decisions")
        .unwrap()["evidence"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(decided.contains("packets"), "{decided}");

    // The human form carries the same verdicts, one line each.
    let human = s.killswitch(&["verify"]);
    assert!(human.status.success(), "{}", text(&human));
    let human = text(&human);
    for check in all {
        assert!(
            human
                .lines()
                .any(|l| l.starts_with("PASS") && l.split_whitespace().nth(1) == Some(check)),
            "no PASS line for {check}:\n{human}"
        );
    }

    // A map entry added by hand, then one of the policy's removed.
    let ntp = s.pin_dir().join("NTP_SERVERS");
    let ntp = ntp.to_str().unwrap();
    bpftool(
        &["map", "update", "pinned", ntp, "key", "hex"]
            .into_iter()
            .chain(OTHER_KEY.split(' '))
            .chain(["value", "hex", "01"])
            .collect::<Vec<_>>(),
    );
    let (ok, json) = s.verify();
    assert!(!ok);
    assert_fails(&json, "lists");
    assert!(
        json.to_string().contains("203.0.113.124"),
        "the evidence names the entry: {json:#}"
    );
    bpftool(
        &["map", "delete", "pinned", ntp, "key", "hex"]
            .into_iter()
            .chain(OTHER_KEY.split(' '))
            .collect::<Vec<_>>(),
    );
    bpftool(
        &["map", "delete", "pinned", ntp, "key", "hex"]
            .into_iter()
            .chain(NTP_KEY.split(' '))
            .collect::<Vec<_>>(),
    );
    let (ok, json) = s.verify();
    assert!(!ok);
    assert_fails(&json, "lists");
    s.up("ebpf");
    assert!(s.verify().0, "up writes it back");

    // Every tunnel bit set free by hand: tun0's packets would be judged as an uplink's.
    let settings = s.pin_dir().join("SETTINGS");
    let settings = settings.to_str().unwrap();
    let key = ["key", "hex", "00", "00", "00", "00"];
    let found: Value = serde_json::from_str(&run(
        "bpftool",
        &[&["-j", "map", "lookup", "pinned", settings][..], &key].concat(),
    ))
    .expect("bpftool JSON");
    let mut value: Vec<String> = found["value"]
        .as_array()
        .expect("the value's bytes")
        .iter()
        .map(|b| b.as_str().unwrap().trim_start_matches("0x").to_owned())
        .collect();
    let free = std::mem::offset_of!(killswitch_common::Settings, tunnel_free);
    value[free..free + 8].fill("ff".to_owned());
    let value: Vec<&str> = value.iter().map(String::as_str).collect();
    bpftool(
        &[
            &["map", "update", "pinned", settings][..],
            &key,
            &["value", "hex"],
            &value,
        ]
        .concat(),
    );
    let (ok, json) = s.verify();
    assert!(!ok);
    assert_fails(&json, "lists");
    assert!(json.to_string().contains("tunnel-free"), "{json:#}");
    s.up("ebpf");
    assert!(s.verify().0, "up writes the bits back");

    // The tunnel made again: a new ifindex, and no daemon to follow it.
    s.net.remove_tunnel();
    s.net.add_tunnel();
    let (ok, json) = s.verify();
    assert!(!ok);
    assert_fails(&json, "tunnels");
    s.up("ebpf");
    assert!(s.verify().0, "up follows the new tunnel");

    // A second egress program of ours attached next to the scope's (a stale attachment): the
    // stricter wins, but it is not the plan, and it reads maps that are not the scope's.
    let extra = PinRoot::new();
    let programs = Programs::load(&extra.path).expect("a second copy loads");
    let id = programs
        .program(Direction::Egress)
        .info()
        .expect("program info")
        .id()
        .to_string();
    let cgroup = s.cgroup.path.to_str().unwrap();
    bpftool(&["cgroup", "attach", cgroup, "egress", "id", &id, "multi"]);
    let (ok, json) = s.verify();
    bpftool(&["cgroup", "detach", cgroup, "egress", "id", &id]);
    drop(programs);
    assert!(!ok);
    assert_fails(&json, "attached");
    assert!(
        json.to_string().contains("more than one of ours on egress"),
        "{json:#}"
    );
    assert!(s.verify().0, "passes again once it is gone");

    // A program detached behind killswitch's back.
    let out = s.killswitch(&["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let link = status["scopes"][0]["links"][0]["link_id"].as_u64().unwrap();
    bpftool(&["link", "detach", "id", &link.to_string()]);
    let (ok, json) = s.verify();
    assert!(!ok);
    assert_fails(&json, "attached");
    assert_eq!(
        result(&json, "probes"),
        "skip",
        "no probe from a scope that is not enforced"
    );
}

#[test]
fn nftables_scope_passes_and_a_hand_edit_fails_the_table_check() {
    require_root!();
    let s = Setup::new();
    s.up("nftables");
    let (ok, json) = s.verify();
    assert!(ok, "{json:#}");
    assert_eq!(json["backend"], "nftables");
    assert_passes(
        &json,
        &["attached", "table", "servers", "probes-ipv4", "probes-ipv6"],
    );

    let out = s.killswitch(&["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let table = status["scopes"][0]["table"].as_str().unwrap().to_owned();
    let edit = nft_in(
        &s.net.client,
        &[
            "insert", "rule", "inet", &table, "egress", "udp", "dport", "53", "accept",
        ],
    );
    assert!(edit.status.success(), "{}", text(&edit));
    let (ok, json) = s.verify();
    assert!(!ok);
    assert_fails(&json, "table");
    assert_eq!(
        result(&json, "probes"),
        "skip",
        "no probe while the table is not the planned one"
    );
    assert!(
        json.to_string()
            .contains("not planned: a rule in chain egress"),
        "the evidence names the rule: {json:#}"
    );
}

#[test]
fn a_scope_nothing_enforces_fails_with_the_fix() {
    require_root!();
    let s = Setup::new();
    let out = s.killswitch(&["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("FAIL  enforced"), "{said}");
    assert!(said.contains("fix: run `killswitch up`"), "{said}");
    assert!(said.contains("NOT verified"), "{said}");
}
