//! Loading the programs survives signals. The verifier gives up with EAGAIN when a signal is
//! pending for the loading thread; `up`, the daemon, the tests and the bench all load through
//! `Programs::load`, which holds signals during the load and tries again on EAGAIN.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use killswitch::ebpf::{Programs, LOAD_RETRIES};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use testbed::{require_root, PinRoot};

const LOADS: usize = 200;

extern "C" fn handled(_: libc::c_int) {}

#[test]
fn every_load_succeeds_while_signals_keep_arriving() {
    require_root!();
    let action = SigAction::new(
        SigHandler::Handler(handled),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    unsafe { sigaction(Signal::SIGUSR1, &action) }.expect("sigaction");

    let pins = PinRoot::new();
    // SAFETY: gettid has no preconditions.
    let loader = unsafe { libc::gettid() };
    let pid = std::process::id() as libc::pid_t;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && sent < 10_000_000 {
                // SAFETY: tgkill to a thread of this process with a handled signal.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, loader, libc::SIGUSR1) };
                sent += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            sent
        }
    });
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    for i in 0..LOADS {
        if let Err(e) = Programs::load(&pins.path) {
            failures.push(format!("load {i}: {e}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    eprintln!(
        "{LOADS} loads of both programs in {:.1} s with {sent} signals; EAGAIN retries: {}",
        started.elapsed().as_secs_f64(),
        LOAD_RETRIES.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} of {LOADS} loads failed: {}",
        failures.len(),
        failures.first().unwrap()
    );
    assert!(
        sent > LOADS as u64,
        "the signals must keep arriving during the loads"
    );
}

/// A boot that has reached its task limit must still end enforced (or in lockdown), never with
/// a crashed `up` and nothing attached: the load's threads (verifier per program, map fill,
/// BTF warm-up) fall back to running inline when no thread can be had. `up` runs alone in a
/// pids cgroup limited to one task.
#[test]
fn up_enforces_when_no_thread_can_be_started() {
    require_root!();
    let Some(pids) = pids_hierarchy() else {
        eprintln!("SKIPPED: no pids cgroup controller to limit the tasks of `up`");
        return;
    };
    let limited = pids.join(testbed::unique_name("kspids"));
    std::fs::create_dir(&limited).unwrap();
    let _remove = RemoveDir(limited.clone());
    std::fs::write(limited.join("pids.max"), "1").unwrap();

    let netns = testbed::Netns::new("t");
    netns.ip(&[
        "link", "add", "tun0", "type", "veth", "peer", "name", "tun0p",
    ]);
    let scope = testbed::Cgroup::new();
    let pins = PinRoot::new();
    let dir = testbed::private_dir("kspids");
    let _remove_dir = RemoveDir(dir.clone());
    let config = dir.join("killswitch.toml");
    testbed::write_config(&config, "tunnels = [\"tun0\"]\n");
    let args = |action: &str| {
        vec![
            "--config".to_owned(),
            config.display().to_string(),
            action.to_owned(),
            "--cgroup".to_owned(),
            scope.relative.clone(),
        ]
    };
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1" || exit 125; shift; exec "$@""#)
        .arg("sh")
        .arg(limited.join("cgroup.procs"))
        .arg("nsenter")
        .arg(format!("--net={}", netns.path().display()))
        .arg("--")
        .arg(testbed::process::killswitch_bin())
        .args(args("up"))
        .env("KILLSWITCH_PIN_ROOT", &pins.path)
        .env("KILLSWITCH_STATE_DIR", &pins.state)
        .output()
        .unwrap();
    let refused: u64 = std::fs::read_to_string(limited.join("pids.events"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        refused > 0,
        "the limit never refused a thread: the test proves nothing"
    );
    let status = testbed::process::killswitch(
        &netns,
        &pins,
        &args("status")[..]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("egress attached"),
        "{text}"
    );
    eprintln!("{refused} thread starts refused; `up` enforced the scope anyway");
    let down = args("down");
    testbed::process::killswitch(
        &netns,
        &pins,
        &down.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

/// A pids controller directory where a child can be made: cgroup2 with pids enabled for
/// children of its root, or the v1 pids hierarchy.
fn pids_hierarchy() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (path, fstype, options) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
        let v1 = *fstype == "cgroup" && options.split(',').any(|o| o == "pids");
        let v2 = *fstype == "cgroup2"
            && std::fs::read_to_string(format!("{path}/cgroup.subtree_control"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "pids"));
        (v1 || v2).then(|| std::path::PathBuf::from(path))
    })
}

struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        // A cgroup directory goes with rmdir once its processes are gone.
        if std::fs::remove_dir(&self.0).is_err() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
