//! The daemon and the live server list, measured with the release binary in the benchmark's
//! namespace on a child cgroup: link event → tunnel map update, `servers set` of 10,000
//! endpoints with the eBPF backend and with the nftables backend against the same change as one
//! `nft -f` transaction (interleaved rounds), and the daemon's memory.

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

use crate::{progress, stats, Options};

pub fn run(bin: &Path, options: Options) -> Result<Value> {
    crate::in_private_dir("ksbench", |dir| measure(bin, dir, options))
}

fn measure(bin: &Path, dir: &Path, options: Options) -> Result<Value> {
    let (link_events, servers, rounds) = if options.quick {
        (10, 1_000, 2)
    } else {
        (100, 10_000, 5)
    };
    let cgroup = Cgroup::new();
    let pins = PinRoot::new();
    let config = dir.join("killswitch.toml");
    let mut text = String::from("tunnels = [\"bt*\"]\n");
    for i in 0..servers {
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
    progress(&format!("daemon with {servers} servers"));
    let mut daemon = Daemon(
        killswitch(&["-q", "daemon"])
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the daemon")?,
    );
    let pin_dir = wait_for_pins(&pins.path, &mut daemon.0)?;
    let maps = PinnedMaps::open(&pin_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rss_kib = rss_kib(daemon.0.id())?;

    progress(&format!("{link_events} link events under the daemon"));
    let links = LinkEvents::subscribe()?;
    let mut added = Vec::new();
    let mut removed = Vec::new();
    for i in 0..link_events {
        let name = format!("bt{i}");
        let peer = format!("bp{i}");
        let add = ["add", &name, "type", "veth", "peer", "name", &peer];
        added.push(link_latency(&links, &maps, &add, &name, 1)?);
        removed.push(link_latency(&links, &maps, &["del", &name], &name, 0)?);
    }

    progress(&format!(
        "servers set of {servers} replacing {servers}: eBPF, nftables backend, nft -f ({rounds} rounds)"
    ));
    let nft_cgroup = Cgroup::new();
    let nft_scope = |args: &[&str]| {
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&config)
            .args(args)
            .args(["--cgroup", &nft_cgroup.relative])
            .env("KILLSWITCH_PIN_ROOT", &pins.path)
            .env("KILLSWITCH_STATE_DIR", &pins.state)
            .stdout(Stdio::null());
        cmd
    };
    crate::timed(&mut nft_scope(&["-q", "up", "--backend", "nftables"]))?;
    // Each round replaces the list in force with the other block's.
    let endpoints = |block: u32| -> Vec<String> {
        (0..servers)
            .map(|i| format!("{}:1194", v4(block, i)))
            .collect()
    };
    let lists = [endpoints(1), endpoints(0)];
    let mut ebpf_ms = Vec::new();
    let mut nftables_ms = Vec::new();
    let mut nft_ms = Vec::new();
    for round in 0..rounds {
        let list = &lists[round % 2];
        let mut set = killswitch(&["-q", "servers", "set"]);
        set.args(list).stdout(Stdio::null());
        ebpf_ms.push(crate::timed(&mut set)?);
        let mut set = nft_scope(&["-q", "servers", "set"]);
        set.args(list);
        nftables_ms.push(crate::timed(&mut set)?);
        nft_ms.push(nft_replace(dir, servers)?);
    }
    drop(daemon);
    crate::timed(&mut nft_scope(&["-q", "down"]))?;
    let status = killswitch(&["down"]).stdout(Stdio::null()).status()?;
    if !status.success() {
        bail!("killswitch down failed");
    }
    Ok(json!({
        "servers": servers, "rounds": rounds, "link_events": link_events,
        "link_added_to_map_us": stats(&added),
        "link_removed_from_map_us": stats(&removed),
        "servers_set_ms": { "ebpf": stats(&ebpf_ms), "nftables": stats(&nftables_ms), "nft": stats(&nft_ms) },
        "daemon_rss_kib": rss_kib,
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

/// The same change as one nftables transaction: a set of `servers` addresses replaced by as
/// many others (in this namespace only).
fn nft_replace(dir: &Path, servers: u32) -> Result<f64> {
    let elements = |block| {
        (0..servers)
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
