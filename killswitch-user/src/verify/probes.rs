//! Live probes that cannot leak: from a short-lived child cgroup of the scope, UDP datagrams
//! and a TCP connect towards a documentation address (never routed on the internet) that the
//! policy drops, out of an uplink. The egress program drops them before they are transmitted
//! (`sendto` fails with EPERM; the SYN never leaves), and the scope's counter for that reason
//! must rise by exactly the number of packets. Only run when the scope is known to be enforced.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use killswitch_common::Reason;
use nix::fcntl::{Flock, FlockArg};

use super::{count, Check, Unchanged};
use crate::{
    backend::{nftables, Backend},
    error::{Error, Result},
    interfaces,
    model::{self, Direction, Packet},
    policy::Policy,
    scope::Scope,
};

const DATAGRAMS: usize = 3;
/// The discard port.
const PORT: u16 = 9;

pub(super) fn checks(
    scope: &Scope,
    backend: Backend,
    policy: &Policy,
    enforced: bool,
    unchanged: &Unchanged,
) -> Vec<Check> {
    if !enforced {
        return vec![Check::skip(
            "probes",
            "not probed: a check of the scope's kernel state failed, and a probe could leave",
        )];
    }
    let Some(uplink) = uplinks(policy).into_iter().next() else {
        return vec![Check::skip(
            "probes",
            "no uplink to probe (no interface is up besides loopback and the tunnels)",
        )];
    };
    let mut checks = Vec::new();
    for (check, candidates) in [
        (
            "probes-ipv4",
            ["203.0.113.254", "198.51.100.254", "192.0.2.254"].as_slice(),
        ),
        (
            "probes-ipv6",
            ["2001:db8:ffff::9", "2001:db8:fffe::9"].as_slice(),
        ),
    ] {
        let target = candidates
            .iter()
            .map(|a| a.parse::<IpAddr>().expect("a literal address"))
            .find(|&remote| dropped(policy, remote).is_some());
        let Some(target) = target else {
            checks.push(Check::skip(
                check,
                format!(
                    "the policy allows every candidate address ({})",
                    candidates.join(", ")
                ),
            ));
            continue;
        };
        checks.push(
            probe(scope, backend, policy, &uplink, target, unchanged).unwrap_or_else(|e| {
                Check::fail(check, format!("could not probe: {e}"), "run as root")
            }),
        );
        checks.last_mut().expect("just pushed").check = check;
    }
    checks
}

/// The reason the policy drops both a UDP and a TCP packet to `remote`'s discard port out of an
/// uplink, from anyone but the VPN client; `None` when it would allow one of them.
fn dropped(policy: &Policy, remote: IpAddr) -> Option<Reason> {
    let packet = |protocol: u8| Packet::leaving_uplink(remote, protocol, PORT);
    let (udp, udp_reason) = model::verdict(policy, &packet(17));
    let (tcp, tcp_reason) = model::verdict(policy, &packet(6));
    (udp == model::Verdict::Drop && tcp == model::Verdict::Drop && udp_reason == tcp_reason)
        .then_some(udp_reason)
}

/// Interfaces that are up and that the policy treats as uplinks, by name.
fn uplinks(policy: &Policy) -> Vec<String> {
    let list = interfaces::list().unwrap_or_default();
    let tunnels = interfaces::matching(&list, &policy.tunnels);
    let listed = policy
        .uplinks
        .as_deref()
        .map(|patterns| interfaces::matching(&list, patterns));
    list.into_iter()
        .filter(|i| i.index != killswitch_common::LOOPBACK_IFINDEX)
        .filter(|i| !tunnels.contains(i))
        .filter(|i| listed.as_ref().is_none_or(|l| l.contains(i)))
        .filter(|i| interfaces::is_up(&i.name))
        .map(|i| i.name)
        .collect()
}

/// Probes `target` out of `uplink` from a child cgroup of the scope: the datagrams first, and
/// the TCP connect only when the counter rose by exactly the datagrams' number. Each attempt
/// holds the scope's lock and goes out only while the scope is as the checks saw it; an attempt
/// whose count other drops disturbed is made again, a few times.
fn probe(
    scope: &Scope,
    backend: Backend,
    policy: &Policy,
    uplink: &str,
    target: IpAddr,
    unchanged: &Unchanged,
) -> Result<Check> {
    let reason = dropped(policy, target).expect("a dropped target");
    let what = format!(
        "{} and a TCP connect to {target} port {PORT} out of {uplink}",
        count(DATAGRAMS, "UDP datagram")
    );
    let mut disturbed = Vec::new();
    for _ in 0..ATTEMPTS {
        // Before the scope's lock, as `run` takes them.
        let _run = crate::run::run_lock()?;
        let Some(_held) = unchanged(scope)? else {
            return Ok(Check::skip(
                "probes",
                format!("{what}: not sent: the scope changed while verify ran; run it again"),
            ));
        };
        match attempt(scope, backend, uplink, target, reason, &what)? {
            Attempt::Done(check) => return Ok(check),
            Attempt::Disturbed(rose) => disturbed.push(rose),
        }
    }
    Ok(Check::warn(
        "probes",
        format!(
            "{what}: refused before leaving, but in each of {ATTEMPTS} attempts the {} counter rose by more ({}): other traffic was dropped meanwhile, so the count proves nothing",
            reason.name(),
            disturbed.join(", ")
        ),
        "run `killswitch verify` again when less is being dropped (`killswitch status` shows the drops)",
    ))
}

/// Attempts at an exact count before giving up.
const ATTEMPTS: usize = 3;

enum Attempt {
    Done(Check),
    /// The counter rose by more than the probes (or was reset): how much, as said.
    Disturbed(String),
}

fn attempt(
    scope: &Scope,
    backend: Backend,
    uplink: &str,
    target: IpAddr,
    reason: Reason,
    what: &str,
) -> Result<Attempt> {
    let rose = |before: &BTreeMap<Reason, u64>| -> Result<Option<u64>> {
        let after = counters(scope, backend)?;
        let now = after.get(&reason).copied().unwrap_or(0);
        // A counter that went down was reset meanwhile (a table rewritten): no count.
        Ok(now.checked_sub(before.get(&reason).copied().unwrap_or(0)))
    };
    let disturbed = |rose: Option<u64>, expected: usize| {
        Attempt::Disturbed(rose.map_or("reset".into(), |r| format!("{r}, not {expected}")))
    };
    let before = counters(scope, backend)?;
    match in_child_cgroup(scope, || send_datagrams(uplink, target))?? {
        Outcome::NoRoute => {
            return Ok(Attempt::Done(Check::skip(
                "probes",
                format!("no route to {target} out of {uplink}"),
            )))
        }
        Outcome::Left(how) => return Ok(Attempt::Done(left(what, &how))),
        Outcome::Held => {}
    }
    match rose(&before)? {
        Some(n) if n == DATAGRAMS as u64 => {}
        Some(n) if n < DATAGRAMS as u64 => {
            return Ok(Attempt::Done(uncounted(what, reason, n, DATAGRAMS)))
        }
        other => return Ok(disturbed(other, DATAGRAMS)),
    }
    let before = counters(scope, backend)?;
    match in_child_cgroup(scope, || connect(uplink, target))?? {
        Outcome::Left(how) => return Ok(Attempt::Done(left(what, &how))),
        Outcome::NoRoute | Outcome::Held => {}
    }
    Ok(match rose(&before)? {
        Some(1) => Attempt::Done(Check::pass(
            "probes",
            format!(
                "{what}: refused before leaving (sendto: EPERM; the SYN counted, never answered); the {} counter rose by {} and 1",
                reason.name(),
                DATAGRAMS
            ),
        )),
        Some(0) => Attempt::Done(uncounted(what, reason, 0, 1)),
        other => disturbed(other, 1),
    })
}

fn left(what: &str, how: &str) -> Check {
    Check::fail(
        "probes",
        format!("{what}: {how}: the policy did NOT hold"),
        "run `killswitch down` and `killswitch up`, then verify again; report it",
    )
}

fn uncounted(what: &str, reason: Reason, rose: u64, expected: usize) -> Check {
    Check::fail(
        "probes",
        format!(
            "{what}: refused, but the {} counter rose by {rose}, not {expected}: something else dropped them",
            reason.name()
        ),
        "check `killswitch status` and other firewalls on the machine",
    )
}

enum Outcome {
    /// Every probe was refused at the scope's egress.
    Held,
    /// The uplink has no route there (or the family is off): nothing was sent.
    NoRoute,
    /// A probe was sent or connected: how.
    Left(String),
}

/// Sends the datagrams from the calling process (which is in the probe cgroup now).
fn send_datagrams(uplink: &str, target: IpAddr) -> Result<Outcome> {
    let any: SocketAddr = match target {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let to = SocketAddr::new(target, PORT);
    let socket = match UdpSocket::bind(any) {
        Ok(socket) => socket,
        // IPv6 turned off on this machine (ipv6.disable=1): nothing to probe.
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => return Ok(Outcome::NoRoute),
        Err(e) => return Err(Error::kernel("cannot open a UDP socket", e)),
    };
    bind_to_device(socket.as_raw_fd(), uplink)?;
    for i in 0..DATAGRAMS {
        match socket.send_to(b"killswitch verify probe", to) {
            Ok(_) => return Ok(Outcome::Left(format!("datagram {} was sent", i + 1))),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e)
                if i == 0
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL)
                    ) =>
            {
                return Ok(Outcome::NoRoute)
            }
            Err(e) => return Err(Error::kernel("a probe failed otherwise", e)),
        }
    }
    Ok(Outcome::Held)
}

/// A TCP connect from the calling process: a refused SYN does not fail connect() (TCP retries
/// it), so it holds when no connection is made within 200 ms.
fn connect(uplink: &str, target: IpAddr) -> Result<Outcome> {
    let to = SocketAddr::new(target, PORT);
    let stream = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )
    .map_err(|e| Error::kernel("cannot open a TCP socket", e))?;
    bind_to_device(stream.as_raw_fd(), uplink)?;
    match stream.connect_timeout(&to.into(), Duration::from_millis(200)) {
        Ok(()) => {
            let _ = TcpStream::from(stream);
            Ok(Outcome::Left("the TCP connect completed".into()))
        }
        Err(e) if e.kind() == ErrorKind::TimedOut || e.raw_os_error() == Some(libc::EPERM) => {
            Ok(Outcome::Held)
        }
        Err(e) => Ok(Outcome::Left(format!("the TCP connect ended with {e}"))),
    }
}

fn bind_to_device(fd: i32, name: &str) -> Result<()> {
    // SAFETY: the name's bytes and their length are what SO_BINDTODEVICE reads.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::kernel(
            format!("cannot bind a probe to {name}"),
            std::io::Error::last_os_error(),
        ))
    }
}

/// Egress counters of the scope by reason.
fn counters(scope: &Scope, backend: Backend) -> Result<BTreeMap<Reason, u64>> {
    match backend {
        Backend::Ebpf => super::ebpf::egress_counters(scope),
        Backend::Nftables => Ok(nftables::read(scope)?
            .counters()
            .into_iter()
            .filter(|(d, _, _)| *d == Direction::Egress)
            .map(|(_, r, n)| (r, n))
            .collect()),
    }
}

/// Runs `f` with this process moved into a new child cgroup of the scope, then moves it back and
/// removes the child. Sockets made meanwhile belong to the child (and are closed by then). The
/// child is locked while in use: one whose lock is free was left by a killed `verify`.
fn in_child_cgroup<T>(scope: &Scope, f: impl FnOnce() -> T) -> Result<T> {
    let mount = crate::scope::cgroup2_mount()?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|p| mount.join(p.trim_start_matches('/')))
        })
        .ok_or_else(|| Error::Runtime("cannot tell this process's cgroup".into()))?;
    remove_stale(&scope.cgroup);
    // The time too: a `verify` in another pid namespace may have the same pid.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let child = scope
        .cgroup
        .join(format!("{PROBE_PREFIX}{}-{nanos}", std::process::id()));
    std::fs::create_dir(&child).map_err(|e| Error::io("cannot make", &child, e))?;
    let in_use = std::fs::File::open(&child)
        .ok()
        .and_then(|dir| Flock::lock(dir, FlockArg::LockExclusiveNonblock).ok());
    let moved = enter(&child);
    let result = moved.as_ref().ok().map(|()| f());
    let back = enter(&own);
    drop(in_use);
    let removed = remove(&child);
    moved?;
    back?;
    removed?;
    Ok(result.expect("ran when moved"))
}

const PROBE_PREFIX: &str = "killswitch-verify-";

/// Probe cgroups a killed `verify` left in the scope: their lock is free (a populated one is
/// never removed: rmdir refuses it).
fn remove_stale(scope: &Path) {
    let Ok(entries) = std::fs::read_dir(scope) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(PROBE_PREFIX)
        {
            continue;
        }
        let free = std::fs::File::open(entry.path())
            .is_ok_and(|dir| Flock::lock(dir, FlockArg::LockExclusiveNonblock).is_ok());
        if free {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

fn enter(cgroup: &Path) -> Result<()> {
    let procs: PathBuf = cgroup.join("cgroup.procs");
    std::fs::write(&procs, "0").map_err(|e| Error::io("cannot move into", &procs, e))
}

/// Removes the probe cgroup (a few tries: the kernel lets go of a cgroup a moment after its last
/// process left).
fn remove(cgroup: &Path) -> Result<()> {
    let mut last = None;
    for _ in 0..50 {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(Error::io(
        "cannot remove",
        cgroup,
        last.expect("tried at least once"),
    ))
}
