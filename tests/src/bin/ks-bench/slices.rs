//! 64-byte UDP datagrams per second in short interleaved slices. One sender per variant, in
//! that variant's client namespace and scope, and one receiver per variant; each sender is told
//! in turn to send for a few milliseconds, round after round (A B C … B C A … C A B …). This
//! VM's speed drifts over hundreds of milliseconds (a sender alone ran at 0.9–1.5 million
//! datagrams a second in consecutive half-second slices), which one-second iperf3 runs cannot
//! leave out; the ratio of neighbouring slices can.
//!
//! The sender's own count is what is reported: it does all the work a datagram costs (the
//! filter, veth, and the receiving namespace's stack, in its softirq), so it is the side a
//! filter slows. The receivers keep the datagrams from drawing ICMP errors and say how many
//! arrived.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, UdpSocket},
    process::{Child, ChildStdin, ChildStdout, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use testbed::{process::command_in_for, Cgroup, Netns};

/// `ks-bench --udp-sender ADDRESS:PORT CPU`
pub const SENDER: &str = "--udp-sender";
/// `ks-bench --udp-receiver ADDRESS:PORT CPU`
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
        bail!("usage: ks-bench {mode} ADDRESS:PORT CPU");
    };
    let address: SocketAddr = address.parse().context("ADDRESS:PORT")?;
    pin(cpu.parse().context("CPU")?)?;
    match mode {
        SENDER => send(address),
        _ => receive(address),
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

/// Says "ready" once bound, counts datagrams until stdin closes, then prints the count.
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
    println!("{}", count.load(Ordering::Relaxed));
    Ok(())
}

fn pin(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// A helper process, spoken to line by line; killed with its process group when dropped.
struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    fn start(mut command: std::process::Command) -> Result<Helper> {
        use std::os::unix::process::CommandExt;
        let mut child = command
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("piped stdout")?);
        Ok(Helper {
            child,
            stdin,
            stdout,
        })
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("a UDP helper ended early");
        }
        Ok(line.trim().to_owned())
    }

    /// One slice: (datagrams sent, failed, seconds).
    fn slice(&mut self, ms: u64) -> Result<(u64, u64, f64)> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{ms}")?;
        stdin.flush()?;
        let line = self.line()?;
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

    /// Closes stdin: the receiver's last line is its count.
    fn finish(&mut self) -> Result<u64> {
        self.stdin = None;
        Ok(self.line()?.parse()?)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// `rounds` rounds of one `slice_ms` slice per place, sending to `target`, the senders on
/// `cpus.0` and the receivers on `cpus.1`; each round starts one place later than the one
/// before, so no variant always follows the same one.
pub fn measure(
    places: &[Place],
    target: SocketAddr,
    rounds: usize,
    slice_ms: u64,
    cpus: (usize, usize),
) -> Result<Vec<Measured>> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_string_lossy();
    let helper = |netns: &Netns, cgroup: Option<&Cgroup>, mode: &str, cpu: usize| {
        let args = [mode, &target.to_string(), &cpu.to_string()];
        Helper::start(command_in_for(netns, cgroup, "900", &exe, &args))
    };
    let mut receivers = Vec::new();
    for place in places {
        let mut receiver = helper(place.server, None, RECEIVER, cpus.1)?;
        if receiver.line()? != "ready" {
            bail!("a UDP receiver did not start");
        }
        receivers.push(receiver);
    }
    let mut senders = places
        .iter()
        .map(|place| helper(place.client, Some(place.cgroup), SENDER, cpus.0))
        .collect::<Result<Vec<_>>>()?;
    let mut sent = vec![0u64; places.len()];
    for (sender, sent) in senders.iter_mut().zip(&mut sent) {
        // Warms the path (neighbour entries, caches); not a round.
        *sent += sender.slice(slice_ms)?.0;
    }
    let mut rates = vec![Vec::new(); places.len()];
    for round in 0..rounds {
        for offset in 0..places.len() {
            let i = (round + offset) % places.len();
            let (ok, failed, seconds) = senders[i].slice(slice_ms)?;
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
    // What is still queued reaches the receivers before they are asked.
    std::thread::sleep(Duration::from_millis(50));
    let mut measured = Vec::new();
    for ((receiver, rates), sent) in receivers.iter_mut().zip(rates).zip(sent) {
        let arrived = receiver.finish()? as f64 / sent.max(1) as f64;
        measured.push(Measured { rates, arrived });
    }
    Ok(measured)
}
