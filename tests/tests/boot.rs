//! A real systemd boot (issue 11): a minimal Debian root (debootstrap, cached in
//! `target/boot-root/`) booted with systemd-nspawn inside a network namespace and a child cgroup
//! of the test, with the units of `dist/systemd` installed and enabled as shipped. Two ordinary
//! services send UDP datagrams and open TCP connections to a host beyond the router from their
//! first moment, IPv4 and IPv6: one ordered after `network.target`, one with no ordering of its
//! own. A tcpdump on the router's side of the machine's cable counts what leaves for that host
//! during the whole boot: 0 with a valid config (policy: only the VPN server, no tunnel up) and
//! 0 with a typo in it (lockdown). Skips with a printed reason when the tools are missing or
//! debootstrap cannot get the archive.

use std::{collections::HashMap, os::unix::fs::MetadataExt, path::Path, time::Duration};

use testbed::{
    boot::{self, Container},
    capture::Capture,
    process::{killswitch_bin, output_in},
    require_root, Netns,
};

/// The host beyond the router the services send to.
const DESTINATION_V4: &str = "198.51.100.77";
const DESTINATION_V6: &str = "2001:db8:99::77";
/// Where the test itself sends one datagram before and one after the boot, from the machine's
/// namespace but outside the container's cgroup: the oracle must see both.
const CANARY: &str = "198.51.100.78";
/// How long each service sends.
const SENDING_SECS: u32 = 6;
/// nspawn is stopped after this; a boot takes about 10 s.
const BOOT_LIMIT: Duration = Duration::from_secs(90);

const VALID: &str = "\
# No tunnel comes up during this boot: only the VPN server may be reached.
tunnels = [\"tun0\"]

[[server]]
address = \"198.51.100.1\"
port = 1194
protocol = \"udp\"
";

#[test]
fn a_valid_config_lets_nothing_out_from_the_first_moment_of_boot() {
    boot_and_count(
        "valid config",
        VALID,
        Expect {
            up_exit: 0,
            mode: "policy",
        },
    );
}

#[test]
fn a_config_typo_holds_the_machine_in_lockdown_from_the_first_moment_of_boot() {
    boot_and_count(
        "config typo",
        &VALID.replace("tunnels =", "tunnel ="),
        Expect {
            up_exit: 2,
            mode: "lockdown",
        },
    );
}

struct Expect {
    /// `killswitch up`'s exit status in `killswitch.service`.
    up_exit: i32,
    /// `status --json`'s mode at the end of the boot.
    mode: &'static str,
}

const SENDERS: [&str; 2] = ["after-network", "plain"];

/// `ks-sender NAME SECONDS`: every 50 ms a datagram and a connection attempt to each address,
/// from the moment it starts; its tally goes to /var/lib/ks-boot/NAME.
const SENDER: &str = r#"#!/bin/bash
name=$1 end=$((SECONDS + $2)) attempts=0 sent=0 error=
while [ "$SECONDS" -lt "$end" ]; do
    for dst in @V4@ @V6@; do
        attempts=$((attempts + 1))
        if out=$( { echo "$name $attempts" > "/dev/udp/$dst/9999"; } 2>&1 ); then
            sent=$((sent + 1))
        else
            error=${out##*: }
        fi
        timeout 1 bash -c "exec 3<>/dev/tcp/$dst/80" 2>/dev/null &
    done
    sleep 0.05
done
wait
echo "attempts=$attempts sent=$sent error=$error" > "/var/lib/ks-boot/$name.tmp"
mv "/var/lib/ks-boot/$name.tmp" "/var/lib/ks-boot/$name"
"#;

/// Waits (bounded) for the senders' tallies, records the boot, powers off.
const FINISH: &str = r#"#!/bin/sh
out=/var/lib/ks-boot
i=0
while [ $i -lt 300 ] && ! { [ -e $out/after-network ] && [ -e $out/plain ]; }; do
    sleep 0.1
    i=$((i + 1))
done
/usr/local/bin/killswitch status --json > $out/status.json 2> $out/status.err
stat -c %i "$(awk '$(NF-2) == "cgroup2" { print $5; exit }' /proc/self/mountinfo)" > $out/cgroup-root
systemctl show -p Id,ActiveState,Result,ExecMainStatus \
    -p ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic \
    killswitch.service killswitch-daemon.service ks-sender-after-network.service \
    ks-sender-plain.service > $out/units
journalctl -b --no-pager -o short-monotonic > $out/journal
systemctl poweroff
"#;

fn sender_unit(name: &str) -> String {
    let ordering = match name {
        "after-network" => "After=network.target\n",
        _ => "",
    };
    format!(
        "[Unit]\nDescription=An ordinary service that sends from its first moment ({name})\n\
         {ordering}\n[Service]\nExecStart=/usr/local/bin/ks-sender {name} {SENDING_SECS}\n\n\
         [Install]\nWantedBy=multi-user.target\n"
    )
}

const FINISH_UNIT: &str = "[Unit]\nDescription=Record the boot and power off\n\n\
                           [Service]\nExecStart=/usr/local/bin/ks-finish\n\n\
                           [Install]\nWantedBy=multi-user.target\n";

/// A unit of dist/systemd as shipped.
fn shipped(unit: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist/systemd")
        .join(unit);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn boot_and_count(case: &str, config: &str, expect: Expect) {
    require_root!();
    if let Some(tool) = boot::missing_tool() {
        eprintln!("SKIPPED: {tool} is missing (cargo xtask setup installs it)");
        return;
    }
    let root = match boot::debian_root(boot::SUITE) {
        Ok(root) => root,
        Err(reason) => {
            eprintln!(
                "SKIPPED: cannot build a Debian {} root: {reason}",
                boot::SUITE
            );
            return;
        }
    };

    // The machine's namespace, cabled to a router of the test's that routes nothing further.
    let machine = Netns::new("bm");
    let router = Netns::new("br");
    machine.veth("eth0", &router, "rc");
    machine.addr("eth0", "192.168.77.2/24");
    router.addr("rc", "192.168.77.1/24");
    machine.addr("eth0", "2001:db8:77::2/64");
    router.addr("rc", "2001:db8:77::1/64");
    machine.ip(&["route", "add", "default", "via", "192.168.77.1"]);
    machine.ip(&["-6", "route", "add", "default", "via", "2001:db8:77::1"]);

    let mut container = Container::new(&root);
    container.add_binary(&killswitch_bin(), "/usr/local/bin/killswitch");
    for unit in ["killswitch.service", "killswitch-daemon.service"] {
        container.add_file(&format!("/etc/systemd/system/{unit}"), 0o644, shipped(unit));
        container.enable(unit);
    }
    container.add_file("/etc/killswitch/killswitch.toml", 0o600, config);
    let sender = SENDER
        .replace("@V4@", DESTINATION_V4)
        .replace("@V6@", DESTINATION_V6);
    container.add_file("/usr/local/bin/ks-sender", 0o755, sender);
    for name in SENDERS {
        let unit = format!("ks-sender-{name}.service");
        container.add_file(
            &format!("/etc/systemd/system/{unit}"),
            0o644,
            sender_unit(name),
        );
        container.enable(&unit);
    }
    container.add_file("/usr/local/bin/ks-finish", 0o755, FINISH);
    container.add_file("/etc/systemd/system/ks-finish.service", 0o644, FINISH_UNIT);
    container.enable("ks-finish.service");
    container.add_file("/var/lib/ks-boot/.keep", 0o644, "");

    let mut capture = Capture::start(&router, "rc", container.dir().join("uplink.pcap"));
    canary(&machine);
    let booted = container.boot(&machine, BOOT_LIMIT);
    canary(&machine);
    capture.stop();

    let destinations = format!("dst host {DESTINATION_V4} or dst host {DESTINATION_V6}");
    let leaked = capture.packets(&destinations);
    let canaries = capture.packets(&format!("dst host {CANARY}"));
    let all = capture.packets("");
    // Link-local traffic the kernel makes itself (ARP, router and neighbour solicitations, MLD
    // reports): no socket in the container sends it. Anything else must not leave either.
    let link_local =
        "arp or (ip6 and (src net fe80::/10 or dst net fe80::/10 or dst net ff02::/16))";
    let others = capture.packets(&format!(
        "not ({destinations} or dst host {CANARY} or {link_local})"
    ));
    let units = parse_units(&container.read("/var/lib/ks-boot/units").unwrap_or_default());
    let tallies: Vec<String> = SENDERS
        .iter()
        .map(|name| {
            let tally = container.read(&format!("/var/lib/ks-boot/{name}"));
            format!("{name}: {}", tally.as_deref().unwrap_or("none").trim())
        })
        .collect();
    let status: serde_json::Value = container
        .read("/var/lib/ks-boot/status.json")
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let scope = &status["scopes"][0];
    let ks = units.get("killswitch.service").cloned().unwrap_or_default();
    let micros = |unit: &HashMap<String, String>, key: &str| -> Option<i64> {
        unit.get(key)?.parse().ok().filter(|&t: &i64| t > 0)
    };
    let up_start = micros(&ks, "ExecMainStartTimestampMonotonic");
    let up_end = micros(&ks, "ExecMainExitTimestampMonotonic");

    eprintln!(
        "{case}: booted and powered off in {:.1} s (nspawn {}); killswitch up: exit {}, {} ms; \
         status: {} {}",
        booted.took.as_secs_f64(),
        booted.status,
        ks.get("ExecMainStatus").map_or("?", String::as_str),
        up_start
            .zip(up_end)
            .map_or("?".into(), |(s, e)| ((e - s) / 1000).to_string()),
        scope["mode"],
        scope["lockdown_reason"],
    );
    for name in SENDERS {
        let unit = units
            .get(&format!("ks-sender-{name}.service"))
            .cloned()
            .unwrap_or_default();
        let start = micros(&unit, "ExecMainStartTimestampMonotonic");
        eprintln!(
            "  ks-sender-{name} started {} ms after killswitch up ended",
            start.zip(up_end).map_or("?".into(), |(s, e)| format!(
                "{:.1}",
                (s - e) as f64 / 1000.0
            ))
        );
    }
    eprintln!("  tallies in the container: {}", tallies.join("; "));
    eprintln!(
        "  router side: {} packets to {DESTINATION_V4}/{DESTINATION_V6}, {} others besides \
         link-local ones, {} canaries, {} in all",
        leaked.len(),
        others.len(),
        canaries.len(),
        all.len()
    );
    for line in all.iter().filter(|l| !l.contains(CANARY)).take(8) {
        eprintln!("    {line}");
    }

    let journal = || {
        let text = container
            .read("/var/lib/ks-boot/journal")
            .unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("killswitch") || l.contains("ks-"))
            .collect();
        format!(
            "journal:\n{}\nconsole:\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n"),
            tail(&booted.console, 40)
        )
    };
    assert!(
        booted.status.success(),
        "the container did not power itself off: {}\n{}",
        booted.status,
        journal()
    );
    assert_eq!(
        canaries.len(),
        2,
        "the oracle missed the test's own datagrams"
    );
    assert!(
        leaked.is_empty(),
        "{} packets left the machine for the host beyond the router during boot:\n{}\n{}",
        leaked.len(),
        leaked[..leaked.len().min(20)].join("\n"),
        journal()
    );
    assert!(
        others.is_empty(),
        "packets other than link-local ones left the machine:\n{}",
        others.join("\n")
    );
    assert_eq!(
        ks.get("ExecMainStatus").map(String::as_str),
        Some(expect.up_exit.to_string().as_str()),
        "killswitch.service: {ks:?}\n{}",
        journal()
    );
    assert_eq!(
        scope["mode"],
        expect.mode,
        "status: {status:#}\n{}",
        journal()
    );
    // The system-wide scope inside is the test's own cgroup, never the host's root.
    let payload = container.payload_cgroup();
    assert_eq!(
        container
            .read("/var/lib/ks-boot/cgroup-root")
            .map(|s| s.trim().to_owned()),
        std::fs::metadata(&payload)
            .ok()
            .map(|m| m.ino().to_string()),
        "the container's cgroup2 root is not {}",
        payload.display()
    );
    let daemon = units.get("killswitch-daemon.service");
    assert_eq!(
        daemon
            .and_then(|d| d.get("ActiveState"))
            .map(String::as_str),
        Some("active"),
        "killswitch-daemon.service: {daemon:?}\n{}",
        journal()
    );
    for name in SENDERS {
        // The services did try, from their first moment, and were refused every time.
        let tally = container
            .read(&format!("/var/lib/ks-boot/{name}"))
            .unwrap_or_default();
        let field = |key: &str| {
            tally
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or("")
                .to_owned()
        };
        let attempts: u32 = field("attempts").parse().unwrap_or(0);
        assert!(attempts >= 20, "{name} hardly sent: {tally:?}");
        assert_eq!(field("sent"), "0", "{name}: {tally:?}");
        assert!(
            tally.contains("error=Operation not permitted"),
            "{name}: {tally:?}"
        );
        // Started after the policy was in force: the boot unit runs before sysinit.target.
        let unit = units
            .get(&format!("ks-sender-{name}.service"))
            .cloned()
            .unwrap_or_default();
        let start = micros(&unit, "ExecMainStartTimestampMonotonic");
        assert!(
            start.zip(up_end).is_some_and(|(s, e)| s >= e),
            "ks-sender-{name} started before killswitch up ended: {unit:?} {ks:?}"
        );
    }
}

/// One datagram from the machine's namespace, outside the container's cgroup.
fn canary(machine: &Netns) {
    let out = output_in(
        machine,
        None,
        "bash",
        &["-c", &format!("echo canary > /dev/udp/{CANARY}/7")],
    );
    assert!(out.status.success(), "the canary was not sent: {out:?}");
}

/// `systemctl show` of several units: blank-line separated blocks of KEY=VALUE, keyed by Id.
fn parse_units(text: &str) -> HashMap<String, HashMap<String, String>> {
    text.split("\n\n")
        .map(|block| {
            block
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<HashMap<_, _>>()
        })
        .filter_map(|unit| Some((unit.get("Id")?.clone(), unit)))
        .collect()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
