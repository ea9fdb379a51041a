//! `killswitch trace`

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use clap::Args;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

use crate::{
    ebpf::{pins, trace::Tracing},
    error::{Error, Result},
    events::Resolver,
    scope::Scope,
    trace::VerdictLog,
};

#[derive(Debug, Args)]
pub(super) struct TraceArgs {
    /// The scope to trace (absolute, or relative to the cgroup2 mount). Default: the only
    /// scope enforced by eBPF
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,

    /// One JSON object per verdict on stdout instead of log lines (fields: docs/trace.md)
    #[arg(long)]
    json: bool,
}

pub(super) fn run(args: &TraceArgs) -> Result<ExitCode> {
    super::require_privileges()?;
    let scope = match &args.cgroup {
        Some(path) => Scope::from_arg(Some(path))?,
        None => {
            let mut scopes = pins::scopes()?;
            match scopes.len() {
                0 => return Err(Error::Runtime("no scope is enforced by eBPF; run `killswitch up` (an nftables table logs its drops to the kernel log)".into())),
                1 => scopes.remove(0),
                _ => return Err(Error::Usage("several scopes are enforced; choose one with --cgroup".into())),
            }
        }
    };
    let resolver = Resolver::new(&crate::scope::cgroup2_mount()?)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Runtime(format!("cannot start the event loop: {e}")))?;
    runtime.block_on(async {
        // Before anything changes: a signal from here on ends the trace, it does not kill it.
        let signals = Signals::new()?;
        let mut tracing = Tracing::start(&scope)?;
        let log = VerdictLog::new(args.json, resolver);
        let reader_gone = log.reader_gone();
        let logger = tracing.logger(log)?;
        eprintln!(
            "tracing every verdict of {} (Ctrl-C to stop; the untraced programs return then)",
            scope.display_cgroup()
        );
        let ended = follow(logger, &tracing, &reader_gone, signals).await;
        // Restored on every way out but SIGKILL (then the next `up` loads the untraced copy).
        tracing.stop()?;
        ended
    })?;
    Ok(ExitCode::SUCCESS)
}

/// SIGINT, SIGTERM and SIGHUP, each of which ends tracing.
struct Signals([tokio::signal::unix::Signal; 3]);

impl Signals {
    fn new() -> Result<Signals> {
        let listen =
            |kind| signal(kind).map_err(|e| Error::Runtime(format!("cannot handle signals: {e}")));
        Ok(Signals([
            listen(SignalKind::interrupt())?,
            listen(SignalKind::terminate())?,
            listen(SignalKind::hangup())?,
        ]))
    }
}

/// Prints records until a signal, or until the scope stops running the traced copy.
async fn follow(
    logger: aya_log::EbpfLogger<VerdictLog>,
    tracing: &Tracing,
    reader_gone: &AtomicBool,
    signals: Signals,
) -> Result<()> {
    let failed = |e: std::io::Error| Error::Runtime(format!("cannot wait for records: {e}"));
    // SAFETY: the logger owns its ring buffer's fd, and the AsyncFd owns the logger until
    // dropped.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| failed(e.into_parts().1))?;
    let [mut interrupt, mut terminate, mut hangup] = signals.0;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ready = logger.readable_mut() => {
                let mut guard = ready.map_err(failed)?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
                if reader_gone.load(Ordering::Relaxed) {
                    break;
                }
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = hangup.recv() => break,
            _ = check.tick() => {
                if !tracing.still_attached() {
                    tracing::warn!("the scope no longer runs the traced programs (`up` loaded new ones, or `down`); tracing ends");
                    break;
                }
            }
        }
    }
    logger.get_mut().flush();
    Ok(())
}
