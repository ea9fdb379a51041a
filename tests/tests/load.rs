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
