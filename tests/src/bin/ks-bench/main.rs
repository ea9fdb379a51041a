//! `ks-bench RELEASE_KILLSWITCH`: the measurements behind `cargo xtask bench`. Per-packet cost of
//! each verdict path as the lists grow, then the daemon's and live server changes' timings with
//! the release binary. Writes `target/bench/` under the current directory.

mod backends;
mod control;
mod daemon;
mod per_packet;

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let Some(release_bin) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: ks-bench RELEASE_KILLSWITCH (run by `cargo xtask bench`)");
        return ExitCode::from(2);
    };
    if !testbed::privileged() {
        eprintln!("ks-bench: run as root: the benchmark loads BPF programs in a namespace");
        return ExitCode::from(2);
    }
    // `ks-bench BIN backends`: only the backends side by side (the whole run takes minutes).
    if std::env::args().nth(2).as_deref() == Some("backends") {
        return match backends::run(&release_bin).and_then(|report| {
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ks-bench: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    match per_packet::run(&release_bin) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ks-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command to completion; its wall time in ms. Fails (with its error output) when it
/// fails.
fn timed(command: &mut std::process::Command) -> anyhow::Result<f64> {
    let started = std::time::Instant::now();
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
fn in_private_dir<T>(
    prefix: &str,
    f: impl FnOnce(&std::path::Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let dir = testbed::private_dir(prefix);
    let result = f(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}
