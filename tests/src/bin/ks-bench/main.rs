//! `ks-bench RELEASE_KILLSWITCH [--quick]`: the measurements behind `cargo xtask bench`, in
//! one run and one report. Per-packet cost of each verdict path against a floor program as the
//! lists grow (BPF_PROG_TEST_RUN), throughput through veth pairs (iperf3) with no filter, the
//! eBPF backend, the nftables backend and the iptables rendering, and the control plane next
//! to its nftables equivalent. Every comparison is interleaved (A B A B ...) and reported as
//! medians with min–max. Writes `target/bench/report.{json,md,svg}` under the current
//! directory. `--quick`: a one-minute smoke run of the same code with fewer sizes and rounds.
//! `--only PART` (per-packet, throughput, control, daemon): that part alone, for working on it.
//! (`--udp-sender` and `--udp-receiver` as the first argument are the UDP slices' helpers,
//! which this program starts itself: see `slices.rs`.)
//!
//! The whole run happens in a network namespace of its own, entered at the start: nothing of
//! it touches the machine's own namespace.

mod control;
mod daemon;
mod per_packet;
mod plot;
mod report;
mod slices;
mod throughput;

use std::{path::PathBuf, process::ExitCode, time::Instant};

use serde_json::json;

/// How much to measure: the full run or the smoke run.
#[derive(Clone, Copy)]
pub struct Options {
    pub quick: bool,
}

/// The parts of the run, by the name `--only` takes.
const PARTS: [&str; 4] = ["per-packet", "throughput", "control", "daemon"];

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(first) = args.next() else {
        eprintln!("usage: ks-bench RELEASE_KILLSWITCH [--quick] (run by `cargo xtask bench`)");
        return ExitCode::from(2);
    };
    let args: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    if let Some(mode @ (slices::SENDER | slices::RECEIVER)) = first.to_str() {
        // A helper of the UDP slices, started by this program itself.
        return match slices::helper(mode, &args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ks-bench {mode}: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let release_bin = PathBuf::from(first);
    let options = Options {
        quick: args.iter().any(|a| a == "--quick"),
    };
    let only = args
        .iter()
        .position(|a| a == "--only")
        .map(|at| args.get(at + 1).map(String::as_str).unwrap_or(""));
    if let Some(part) = only.filter(|part| !PARTS.contains(part)) {
        eprintln!(
            "ks-bench: --only takes one of {}, not {part:?}",
            PARTS.join(", ")
        );
        return ExitCode::from(2);
    }
    if !testbed::privileged() {
        eprintln!("ks-bench: run as root: the benchmark loads BPF programs in a namespace");
        return ExitCode::from(2);
    }
    match run(&release_bin, options, only) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ks-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(bin: &std::path::Path, options: Options, only: Option<&str>) -> anyhow::Result<()> {
    let started = Instant::now();
    // Everything below runs in this namespace (or in ones of its own it makes).
    let netns = testbed::Netns::entered_with_links("b", &["tun0", "up0"]);
    // A part `--only` leaves out is null in the report.
    let part = |name: &str, measure: &dyn Fn() -> anyhow::Result<serde_json::Value>| match only
        .is_none_or(|only| only == name)
    {
        true => measure(),
        false => Ok(serde_json::Value::Null),
    };
    let per_packet = part("per-packet", &|| {
        on_one_cpu(|| per_packet::run(&netns, options))
    })?;
    let throughput = part("throughput", &|| throughput::run(bin, options))?;
    let control = part("control", &|| control::run(bin, options))?;
    let daemon = part("daemon", &|| daemon::run(bin, options))?;
    let report = json!({
        "machine": machine(),
        "quick": options.quick,
        "per_packet": per_packet,
        "throughput": throughput,
        "control": control,
        "daemon": daemon,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let out = PathBuf::from("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let markdown = report::markdown(&report);
    std::fs::write(out.join("report.md"), &markdown)?;
    plot::svg(&report, &out.join("report.svg"))?;
    println!("{markdown}");
    println!(
        "written: target/bench/report.json, report.md, report.svg ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the numbers were measured on.
fn machine() -> serde_json::Value {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let memory_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": memory_kib / (1024 * 1024),
    })
}

/// The CPUs this process may run on, in order.
pub fn cpus() -> Vec<usize> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// Runs `f` with this thread held on one CPU (the last allowed), then lets it run anywhere it
/// could before. A measurement that moves between CPUs mixes theirs: on a VM's shared cores
/// that made the per-packet rounds bimodal (medians 1.4x apart for the same program).
pub fn on_one_cpu<T>(f: impl FnOnce() -> T) -> T {
    use nix::{sched, unistd::Pid};
    /// Gives the thread back the CPUs it had, however `f` ends.
    struct Restore(Option<sched::CpuSet>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(before) = &self.0 {
                let _ = sched::sched_setaffinity(Pid::from_raw(0), before);
            }
        }
    }
    let _restore = Restore(sched::sched_getaffinity(Pid::from_raw(0)).ok());
    if let Some(&last) = cpus().last() {
        let mut one = sched::CpuSet::new();
        let held = one
            .set(last)
            .and_then(|()| sched::sched_setaffinity(Pid::from_raw(0), &one));
        if let Err(e) = held {
            progress(&format!(
                "cannot hold the measurement on CPU {last} ({e}): it may move"
            ));
        }
    }
    f()
}

/// A progress line on stderr: the run takes minutes.
pub fn progress(what: &str) {
    eprintln!("bench: {what}");
}

/// Median, min and max of some measurements.
pub fn stats(values: &[f64]) -> serde_json::Value {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    json!({
        "median": median(&sorted),
        "min": sorted.first().copied().unwrap_or(f64::NAN),
        "max": sorted.last().copied().unwrap_or(f64::NAN),
        "rounds": values,
    })
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Runs a command to completion; its wall time in ms. Fails (with its error output) when it
/// fails.
pub fn timed(command: &mut std::process::Command) -> anyhow::Result<f64> {
    let started = Instant::now();
    let out = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        anyhow::bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(ms)
}

/// Runs `f` with a private directory for configs (`testbed::private_dir`), removed afterwards.
pub fn in_private_dir<T>(
    prefix: &str,
    f: impl FnOnce(&std::path::Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let dir = testbed::private_dir(prefix);
    let result = f(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Server `i` of a benchmark list: 198.18.0.0/15 (the benchmark range).
pub fn server(i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0xc612_0000u32 + i)
}
