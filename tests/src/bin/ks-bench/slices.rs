//! 64-byte UDP datagrams per second in short interleaved slices. One sender per variant, in
//! that variant's client namespace and scope, and one receiver per variant; each sender is told
//! in turn to send for a few milliseconds, round after round, in an order that changes from
//! round to round ([`orders`]). This VM's speed drifts over hundreds of milliseconds (a sender
//! alone ran at 0.9–1.5 million datagrams a second in consecutive half-second slices), which
//! iperf3's one-second runs, seconds apart, cannot leave out; the ratio of two slices of the
//! same round, a few tenths of a second apart, mostly can.
//!
//! The sender's own count is what is reported: it does all the work a datagram costs (the
//! filter, veth, and the receiving namespace's stack, in its softirq), so it is the side a
//! filter slows. The receivers keep the datagrams from drawing ICMP errors and say how many
//! arrived.

use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use testbed::{
    process::{command_in_for, Background},
    Cgroup, Netns,
};

/// `ks-bench --udp-sender ADDRESS:PORT CPU`, started by [`measure`] only.
pub const SENDER: &str = "--udp-sender";
/// `ks-bench --udp-receiver ADDRESS:PORT CPU`, started by [`measure`] only.
pub const RECEIVER: &str = "--udp-receiver";

/// The bytes of each datagram's payload, as iperf3's `-l 64`.
const PAYLOAD: usize = 64;

/// Where one variant's traffic goes from and to.
pub struct Place<'a> {
    pub client: &'a Netns,
    pub cgroup: &'a Cgroup,
    pub server: &'a Netns,
}

/// One variant's slices: datagrams per second in each round, and how many of all it sent
/// arrived.
pub struct Measured {
    pub rates: Vec<f64>,
    pub arrived: f64,
}

/// The helper processes' side: `args` after the mode.
pub fn helper(mode: &str, args: &[String]) -> Result<()> {
    let [address, cpu] = args else {
        bail!("usage: ks-bench {mode} ADDRESS:PORT CPU (CPU empty: wherever it runs)");
    };
    let address: SocketAddr = address.parse().context("ADDRESS:PORT")?;
    if !cpu.is_empty() {
        pin(cpu.parse().context("CPU")?)?;
    }
    match mode {
        SENDER => send(address),
        RECEIVER => receive(address),
        _ => bail!("no helper {mode:?}"),
    }
}

/// For each line "MS" on stdin: sends for MS ms and answers "SENT FAILED NANOSECONDS".
fn send(to: SocketAddr) -> Result<()> {
    let socket = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    socket.connect(to)?;
    let payload = [0u8; PAYLOAD];
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let slice = Duration::from_millis(line?.trim().parse()?);
        let (mut sent, mut failed) = (0u64, 0u64);
        let started = Instant::now();
        while started.elapsed() < slice {
            // The clock is read once per 32 datagrams: a vDSO call, next to a system call each.
            for _ in 0..32 {
                match socket.send(&payload) {
                    Ok(_) => sent += 1,
                    Err(_) => failed += 1,
                }
            }
        }
        writeln!(out, "{sent} {failed} {}", started.elapsed().as_nanos())?;
        out.flush()?;
    }
    Ok(())
}

/// Says "ready" once bound, counts datagrams until stdin closes and then until none has come
/// for 100 ms (what the buffer still held), then prints the count.
fn receive(on: SocketAddr) -> Result<()> {
    let socket = UdpSocket::bind(on)?;
    // Room for a whole slice's datagrams: the receiver, on another CPU, may fall behind a
    // slice and catch up in the next variant's.
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &(64 << 20))?;
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 2048];
        loop {
            if socket.recv(&mut buffer).is_ok() {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    println!("ready");
    std::io::stdin().read_to_end(&mut Vec::new())?;
    let mut last = count.load(Ordering::Relaxed);
    // Bounded: 64 MiB of queued datagrams drain within seconds.
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        let now = count.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    println!("{last}");
    Ok(())
}

fn pin(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// One slice of `sender`: (datagrams sent, failed, seconds).
fn slice(sender: &mut Background, ms: u64) -> Result<(u64, u64, f64)> {
    sender.say(&ms.to_string())?;
    let line = sender
        .line(Duration::from_millis(ms) + HELPER_SILENCE)
        .context("a UDP sender stopped answering")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("sender said {line:?}"))?;
    let [sent, failed, nanoseconds] = fields[..] else {
        bail!("sender said {line:?}");
    };
    Ok((sent, failed, nanoseconds as f64 / 1e9))
}

/// How long a helper may take to answer beyond its work.
const HELPER_SILENCE: Duration = Duration::from_secs(5);

/// The order of the places in each round: a Williams square, in which each place follows
/// every other equally often over `n` rounds (`n` even) or `2n` (odd), so no variant's slices
/// always come after, say, iptables walking 100,000 rules.
fn orders(n: usize) -> Vec<Vec<usize>> {
    // The first row: 0, 1, n-1, 2, n-2, ...; each next row adds 1.
    let first: Vec<usize> = (0..n)
        .map(|j| match j {
            0 => 0,
            j if j % 2 == 1 => j.div_ceil(2),
            j => n - j / 2,
        })
        .collect();
    let mut rows: Vec<Vec<usize>> = (0..n)
        .map(|r| first.iter().map(|&p| (p + r) % n).collect())
        .collect();
    if n % 2 == 1 {
        let reversed: Vec<Vec<usize>> = rows
            .iter()
            .map(|row| row.iter().rev().copied().collect())
            .collect();
        rows.extend(reversed);
    }
    rows
}

/// At least `rounds` rounds (made a whole number of [`orders`] cycles) of one `slice_ms`
/// slice per place, sending to `target`, the senders and the receivers each on a CPU of their
/// own where there are two (`cpus`: sender, receiver). Each variant's ratio to no filter is
/// taken within a round: its slice and the no-filter slice are at most a round
/// (`places.len()` slices, a few tenths of a second) apart.
pub fn measure(
    places: &[Place],
    target: SocketAddr,
    rounds: usize,
    slice_ms: u64,
    cpus: Option<(usize, usize)>,
) -> Result<Vec<Measured>> {
    let orders = orders(places.len());
    let rounds = rounds.div_ceil(orders.len()) * orders.len();
    let exe = std::env::current_exe()?;
    let exe = exe.to_string_lossy();
    // Bounded by the work it is given, with room for a slow machine.
    let seconds = (2 * rounds * places.len()) as u64 * slice_ms / 1000 + 60;
    let helper = |netns: &Netns, cgroup: Option<&Cgroup>, mode: &str, cpu: Option<usize>| {
        let cpu = cpu.map_or(String::new(), |c| c.to_string());
        let args = [mode, &target.to_string(), &cpu];
        Background::start_spoken(command_in_for(
            netns,
            cgroup,
            &seconds.to_string(),
            &exe,
            &args,
        ))
    };
    let mut receivers = Vec::new();
    for place in places {
        let receiver = helper(place.server, None, RECEIVER, cpus.map(|c| c.1));
        if receiver.line(HELPER_SILENCE).as_deref() != Some("ready") {
            bail!("a UDP receiver did not start");
        }
        receivers.push(receiver);
    }
    let mut senders: Vec<Background> = places
        .iter()
        .map(|place| helper(place.client, Some(place.cgroup), SENDER, cpus.map(|c| c.0)))
        .collect();
    let mut sent = vec![0u64; places.len()];
    for (sender, sent) in senders.iter_mut().zip(&mut sent) {
        // Warms the path (neighbour entries, caches); not a round.
        *sent += slice(sender, slice_ms)?.0;
    }
    let mut rates = vec![Vec::new(); places.len()];
    for round in 0..rounds {
        for &i in &orders[round % orders.len()] {
            let (ok, failed, seconds) = slice(&mut senders[i], slice_ms)?;
            if failed > ok / 1000 {
                bail!(
                    "{failed} of {} datagrams to {target} were refused",
                    ok + failed
                );
            }
            rates[i].push(ok as f64 / seconds);
            sent[i] += ok;
        }
    }
    drop(senders);
    let mut measured = Vec::new();
    for ((receiver, rates), sent) in receivers.iter_mut().zip(rates).zip(sent) {
        receiver.close_stdin();
        let count: u64 = receiver
            .line(HELPER_SILENCE)
            .context("a UDP receiver did not say its count")?
            .parse()?;
        let arrived = count as f64 / sent.max(1) as f64;
        measured.push(Measured { rates, arrived });
    }
    Ok(measured)
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_place_follows_every_other_equally_often() {
        for n in 2..=7 {
            let orders = super::orders(n);
            let mut follows = vec![vec![0; n]; n];
            for row in &orders {
                let mut sorted = row.clone();
                sorted.sort();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "{n}: {row:?}");
                for pair in row.windows(2) {
                    follows[pair[0]][pair[1]] += 1;
                }
            }
            let times = if n % 2 == 0 { 1 } else { 2 };
            for (a, row) in follows.iter().enumerate() {
                for (b, &count) in row.iter().enumerate() {
                    assert_eq!(count, if a == b { 0 } else { times }, "{n}: {a} then {b}");
                }
            }
        }
    }
}
