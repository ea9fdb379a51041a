//! The daemon and the live server list, measured with the release binary in the benchmark's
//! namespace on a child cgroup: link event → tunnel map update, `servers set` of 10,000
//! endpoints against the same change as one `nft -f` transaction, and the daemon's memory.

use std::{
    fmt::Write as _,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use killswitch::ebpf::PinnedMaps;
use serde_json::{json, Value};
use testbed::{Cgroup, PinRoot};

const LINK_EVENTS: usize = 100;
const SERVERS: u32 = 10_000;

pub fn run(bin: &Path) -> Result<Value> {
    let dir = testbed::private_dir("ksbench");
    let result = measure(bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(bin: &Path, dir: &Path) -> Result<Value> {
    let cgroup = Cgroup::new();
    let pins = PinRoot::new();
    let config = dir.join("killswitch.toml");
    let mut text = String::from("tunnels = [\"bt*\"]\n");
    for i in 0..SERVERS {
        writeln!(text, "[[server]]\naddress = \"{}\"\nport = 1194", v4(0, i))?;
    }
    testbed::write_config(&config, &text);
    let killswitch = |args: &[&str]| {
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&config)
            .args(args)
            .args(["--cgroup", &cgroup.relative])
            .env("KILLSWITCH_PIN_ROOT", &pins.path)
            .env("KILLSWITCH_STATE_DIR", &pins.state);
        cmd
    };
    eprintln!("bench: daemon with {SERVERS} servers");
    let mut daemon = Daemon(
        killswitch(&["-q", "daemon"])
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the daemon")?,
    );
    let pin_dir = wait_for_pins(&pins.path, &mut daemon.0)?;
    let maps = PinnedMaps::open(&pin_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rss_kib = rss_kib(daemon.0.id())?;

    eprintln!("bench: {LINK_EVENTS} link events");
    let links = LinkEvents::subscribe()?;
    let mut added = Vec::new();
    let mut removed = Vec::new();
    for i in 0..LINK_EVENTS {
        let name = format!("bt{i}");
        let peer = format!("bp{i}");
        let add = ["add", &name, "type", "veth", "peer", "name", &peer];
        added.push(link_latency(&links, &maps, &add, &name, 1)?);
        removed.push(link_latency(&links, &maps, &["del", &name], &name, 0)?);
    }

    eprintln!("bench: servers set of {SERVERS} replacing {SERVERS}");
    let endpoints: Vec<String> = (0..SERVERS).map(|i| format!("{}:1194", v4(1, i))).collect();
    let mut set = killswitch(&["servers", "set"]);
    set.args(&endpoints).stdout(Stdio::null());
    let started = Instant::now();
    if !set.status()?.success() {
        bail!("killswitch servers set failed");
    }
    let servers_set_ms = started.elapsed().as_secs_f64() * 1000.0;
    let nft_ms = nft_replace(dir)?;
    drop(daemon);
    let status = killswitch(&["down"]).stdout(Stdio::null()).status()?;
    if !status.success() {
        bail!("killswitch down failed");
    }
    Ok(json!({
        "link_added_to_map_us": summary(&mut added),
        "link_removed_from_map_us": summary(&mut removed),
        "servers_set_10000_ms": servers_set_ms,
        "nft_f_10000_ms": nft_ms,
        "daemon_rss_kib_at_10000_servers": rss_kib,
    }))
}

/// Address number `i` of a block of 198.18.0.0/15 (benchmark range): block 0 or 1.
fn v4(block: u32, i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0xc612_0000u32 + block * 0x8000 + i)
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// The scope's pin directory once the daemon has applied the policy (bounded wait).
fn wait_for_pins(root: &Path, daemon: &mut Child) -> Result<PathBuf> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Some(status) = daemon.try_wait()? {
            bail!("the daemon exited: {status}");
        }
        if let Some(dir) = std::fs::read_dir(root)?.flatten().next() {
            if dir.path().join("egress_link").exists() {
                return Ok(dir.path());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("the daemon did not enforce the scope within 30 s")
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// A netlink socket on the link group: woken at the same moment as the daemon's.
struct LinkEvents(std::os::fd::OwnedFd);

impl LinkEvents {
    fn subscribe() -> Result<LinkEvents> {
        use nix::sys::socket::{
            bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        // RTMGRP_LINK
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1))?;
        // Every wait is bounded: a change that never comes fails the benchmark.
        let limit = nix::sys::time::TimeVal::new(5, 0);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &limit)?;
        Ok(LinkEvents(fd))
    }

    /// Waits (bounded) for the notification `kind` about interface `index`: the kernel's event
    /// itself, not the peer's or a state change that comes before it.
    fn wait_for(&self, kind: u16, index: impl Fn() -> Option<u32>) -> Result<()> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            let mut buf = [0u8; 65536];
            let len = self.receive(&mut buf, nix::sys::socket::MsgFlags::empty())?;
            if notifications(&buf[..len]).any(|(k, i)| k == kind && Some(i) == index()) {
                return Ok(());
            }
        }
        bail!("no notification {kind} for the interface within 5 s")
    }

    /// Discards the notifications already queued.
    fn drain(&self) {
        let mut buf = [0u8; 65536];
        while self
            .receive(&mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
            .is_ok()
        {}
    }

    fn receive(&self, buf: &mut [u8], flags: nix::sys::socket::MsgFlags) -> nix::Result<usize> {
        nix::sys::socket::recv(self.0.as_raw_fd(), buf, flags)
    }
}

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;

/// (message type, ifindex) of each message in one netlink datagram.
fn notifications(datagram: &[u8]) -> impl Iterator<Item = (u16, u32)> + '_ {
    let mut offset = 0;
    std::iter::from_fn(move || {
        // nlmsghdr: len u32, type u16, flags u16, seq u32, pid u32; then ifinfomsg, whose
        // ifindex is at byte 4.
        let header = datagram.get(offset..offset + 24)?;
        let len = u32::from_ne_bytes(header[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(header[4..6].try_into().ok()?);
        let index = u32::from_ne_bytes(header[20..24].try_into().ok()?);
        offset += len.next_multiple_of(4).max(24);
        Some((kind, index))
    })
}

/// Runs `ip link ARGS` on `name`, then measures from the kernel's notification about `name`
/// until the tunnel map holds `expected` entries. The map is polled every 20 µs rather than in a
/// busy loop, which would take a core from the daemon on this 2-core machine.
fn link_latency(
    links: &LinkEvents,
    maps: &PinnedMaps,
    args: &[&str],
    name: &str,
    expected: usize,
) -> Result<f64> {
    let index = || nix::net::if_::if_nametoindex(name).ok();
    let (kind, known) = if expected == 0 {
        (RTM_DELLINK, index())
    } else {
        (RTM_NEWLINK, None)
    };
    let mut ip = Command::new("ip").arg("link").args(args).spawn()?;
    links
        .wait_for(kind, || known.or_else(index))
        .with_context(|| format!("after `ip link {}`", args.join(" ")))?;
    let started = Instant::now();
    loop {
        let tunnels = maps.tunnels().map_err(|e| anyhow::anyhow!("{e}"))?;
        if tunnels.len() == expected {
            break;
        }
        if started.elapsed() > Duration::from_secs(5) {
            bail!("the tunnel map did not follow `ip link {}`", args.join(" "));
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    let micros = started.elapsed().as_secs_f64() * 1e6;
    ip.wait()?;
    // Let the remaining notifications of this change arrive before the next round.
    std::thread::sleep(Duration::from_millis(20));
    links.drain();
    Ok(micros)
}

/// The same change as one nftables transaction: a set of 10,000 addresses replaced by 10,000
/// others (in this namespace only).
fn nft_replace(dir: &Path) -> Result<f64> {
    let elements = |block| {
        (0..SERVERS)
            .map(|i| v4(block, i).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let setup = dir.join("setup.nft");
    std::fs::write(
        &setup,
        format!(
            "table inet ksbench {{\n set servers {{ type ipv4_addr; elements = {{ {} }} }}\n}}\n",
            elements(0)
        ),
    )?;
    let change = dir.join("change.nft");
    std::fs::write(
        &change,
        format!(
            "flush set inet ksbench servers\nadd element inet ksbench servers {{ {} }}\n",
            elements(1)
        ),
    )?;
    let nft = |file: &Path| -> Result<()> {
        if !Command::new("nft").arg("-f").arg(file).status()?.success() {
            bail!("nft -f {} failed", file.display());
        }
        Ok(())
    };
    nft(&setup)?;
    let started = Instant::now();
    nft(&change)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", "ksbench"])
        .status();
    Ok(ms)
}

fn summary(values: &mut [f64]) -> Value {
    values.sort_by(f64::total_cmp);
    json!({
        "median": values[values.len() / 2],
        "max": values[values.len() - 1],
        "count": values.len(),
    })
}
