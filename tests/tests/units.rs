//! The systemd units in dist/systemd: accepted by `systemd-analyze verify` without a warning, and
//! ordered so the policy is enforced before any network comes up.

use std::{path::Path, process::Command};

use testbed::process::killswitch_bin;

const UNITS: [&str; 2] = ["killswitch.service", "killswitch-daemon.service"];

fn unit(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist/systemd")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn systemd_analyze_verify_accepts_both_units() {
    let dir = std::env::temp_dir().join(testbed::unique_name("ksunits"));
    std::fs::create_dir(&dir).unwrap();
    // verify checks that ExecStart exists: point it at the binary under test.
    let bin = killswitch_bin();
    for name in UNITS {
        let text = unit(name).replace("/usr/local/bin/killswitch", bin.to_str().unwrap());
        std::fs::write(dir.join(name), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(UNITS.map(|u| dir.join(u)))
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.expect("systemd-analyze is missing: run `cargo xtask setup`");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Unknown keys are only warnings to systemd: refuse them here.
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");
}

#[test]
fn the_boot_unit_runs_up_before_the_network() {
    let boot = unit("killswitch.service");
    for line in [
        "DefaultDependencies=no",
        "Before=sysinit.target network-pre.target",
        "Wants=network-pre.target",
        "Type=oneshot",
        "ExecStart=/usr/local/bin/killswitch up",
    ] {
        assert!(
            boot.lines().any(|l| l == line),
            "killswitch.service lacks {line}"
        );
    }
    let daemon = unit("killswitch-daemon.service");
    for line in [
        "After=killswitch.service",
        "StartLimitIntervalSec=0",
        "Restart=always",
        "ExecStart=/usr/local/bin/killswitch daemon",
    ] {
        assert!(
            daemon.lines().any(|l| l == line),
            "killswitch-daemon.service lacks {line}"
        );
    }
}
