//! `cargo xtask setup`: installs only what is missing, one line per step with its duration. With
//! everything present it runs two quick queries and touches no network.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// Debian's second Rust compiler with a precompiled BPF `core`, LLVM 22 for bpf-linker, and the
/// tools the tests and the demonstration drive.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "openvpn",
    "tcpdump",
    "nftables",
    "iptables",
    "iproute2",
    // pkill, for the end-to-end suite's reloads
    "procps",
    "iperf3",
    "bpftool",
    "openssl",
    "iputils-ping",
    "util-linux",
    // systemd-analyze, for the test that verifies the units
    "systemd",
    // Debian 12's and 13's kernels booted in qemu (tests/tests/kernels.rs)
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "binutils",
    // The package `cargo xtask dist` builds is checked with it (tests/tests/dist.rs)
    "lintian",
    // A real systemd boot: a Debian root made with debootstrap, booted with systemd-nspawn
    // (tests/tests/boot.rs)
    "debootstrap",
    "systemd-container",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    packages()?;
    bpf_linker()
}

/// Prints "setup: WHAT ... N.N s" around one step, so a slow one shows what it is doing.
fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    print!("setup: {what} ... ");
    let _ = std::io::stdout().flush();
    let start = Instant::now();
    let result = f();
    let took = start.elapsed().as_secs_f64();
    match &result {
        Ok(_) => println!("{took:.1} s"),
        Err(_) => println!("failed after {took:.1} s"),
    }
    result
}

fn packages() -> Result<()> {
    let missing = step("checking Debian packages", missing_packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "installing packages needs root: sudo apt-get install {}",
            missing.join(" ")
        );
    }
    step("apt-get update", || {
        quiet(
            Command::new("apt-get").args(["update", "-q"]),
            "apt-get update",
        )
    })?;
    step(&format!("installing {}", missing.join(" ")), || {
        quiet(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
            "apt-get install",
        )
    })
}

fn missing_packages() -> Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Abbrev}\n"])
        .args(PACKAGES)
        .stderr(Stdio::null())
        .output()
        .context("dpkg-query not found: this task expects Debian")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    Ok(PACKAGES
        .iter()
        .filter(|name| {
            !listed.lines().any(|l| {
                let mut parts = l.split_whitespace();
                parts.next() == Some(**name) && parts.next() == Some("ii")
            })
        })
        .map(|name| name.to_string())
        .collect())
}

fn bpf_linker() -> Result<()> {
    let present = step(&format!("checking bpf-linker {BPF_LINKER_VERSION}"), || {
        Ok(Command::new("bpf-linker")
            .arg("--version")
            .output()
            .is_ok_and(|out| {
                out.status.success()
                    && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
            }))
    })?;
    if present {
        return Ok(());
    }
    step(
        &format!("building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 75 s)"),
        || {
            quiet(
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    // bpf-linker's build finds libLLVM through this; without it, it picks LLVM 14.
                    .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                    .args([
                        "install",
                        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                        "--locked",
                    ])
                    .args(["--no-default-features", "--features", "llvm-22"]),
                "cargo install bpf-linker",
            )
        },
    )
}

/// Runs a step, showing its output only if it fails.
fn quiet(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:").map(str::to_owned))
        })
        .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}
