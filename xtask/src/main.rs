//! Developer tasks: `cargo xtask setup|demo|test|e2e|bench|dist`.
//!
//! xtask itself depends on small host crates only, so it builds on a machine that has nothing but
//! a stock Rust toolchain: `setup` installs the eBPF toolchain, and everything that needs the
//! library (the demonstration, the benchmarks) is a binary of `killswitch-tests` that xtask builds
//! and runs with cargo afterwards.

mod setup;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "killswitch developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian packages and bpf-linker 0.13 built against LLVM 22
    Setup,
    /// Set up if needed, build, and run the built-in demonstration (real OpenVPN, namespaces)
    Demo,
    /// Set up if needed and run every test, then the end-to-end suite
    Test {
        /// Extra arguments for `cargo test`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up if needed and run the end-to-end suite: both backends against real OpenVPN, a
    /// capture on the router as the leak oracle, one line per scenario and a table
    E2e,
    /// Measure per-packet cost, throughput and the control plane against no filter and
    /// nftables in one interleaved run; writes target/bench/report.{json,md,svg}
    Bench {
        /// A one-minute smoke run: small sizes, few rounds (what CI runs)
        #[arg(long)]
        quick: bool,
        /// Measure one part only (per-packet, throughput, control or daemon), for working on it
        #[arg(long, value_parser = ["per-packet", "throughput", "control", "daemon"])]
        only: Option<String>,
    },
    /// Build the Debian package (release binary, man pages, completions, systemd units, the
    /// example config as a conffile) into target/dist/
    Dist,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Demo => setup::run().and_then(|()| demo()),
        Task::Test { args } => setup::run().and_then(|()| test(&args)),
        Task::E2e => setup::run().and_then(|()| e2e()),
        Task::Bench { quick, only } => setup::run().and_then(|()| bench(quick, only.as_deref())),
        Task::Dist => setup::run().and_then(|()| dist()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: every task runs there, wherever `cargo xtask` was started.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace());
    cmd
}

/// Builds the workspace's binaries (`--release` or debug) and returns the directory they are in.
fn build(release: bool, packages: &[&str]) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--quiet", "--locked"]);
    if release {
        cmd.arg("--release");
    }
    for package in packages {
        cmd.args(["-p", package]);
    }
    if !cmd.status().context("cannot run cargo build")?.success() {
        bail!("build failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    Ok(target.join(if release { "release" } else { "debug" }))
}

fn run(program: &Path, args: &[&Path]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .current_dir(workspace())
        .status()
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !status.success() {
        bail!("{} failed", program.display());
    }
    Ok(())
}

/// Runs the workspace's tests and ends with one summary line over every test binary.
fn test(args: &[String]) -> Result<()> {
    require_root("the tests create namespaces, cgroups and BPF programs")?;
    let mut child = cargo()
        .args(["test", "--workspace", "--locked"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            passed += count(summary, " passed");
            failed += count(summary, " failed");
        }
    }
    let status = child.wait()?;
    // The end-to-end suite counts as one more test, after the others (never beside them); not
    // when the arguments chose some tests.
    let whole = args.is_empty();
    let e2e = if status.success() && whole {
        e2e()
    } else {
        Ok(())
    };
    match &e2e {
        Ok(()) if status.success() && whole => passed += 1,
        Ok(()) => {}
        Err(error) => {
            eprintln!("xtask: {error:#}");
            failed += 1;
        }
    }
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() || e2e.is_err() {
        bail!("tests failed");
    }
    Ok(())
}

/// The end-to-end suite (`ks-e2e`) with the debug `killswitch`.
fn e2e() -> Result<()> {
    require_root("the end-to-end suite creates namespaces, cgroups and BPF programs")?;
    println!("e2e: building killswitch and the bed's helpers");
    let bin = build(false, &["killswitch-user", "killswitch-tests"])?;
    let status = Command::new(bin.join("ks-e2e"))
        .env("KILLSWITCH_BIN", bin.join("killswitch"))
        .current_dir(workspace())
        .status()
        .context("cannot run ks-e2e")?;
    if !status.success() {
        bail!("the end-to-end suite failed");
    }
    Ok(())
}

/// The number before `label` in a libtest summary ("ok. 4 passed; 0 failed; ...").
fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find(|part| part.ends_with(label))
        .and_then(|part| {
            part.trim_end_matches(label)
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn demo() -> Result<()> {
    require_root("the demonstration creates namespaces, cgroups and BPF programs")?;
    println!("demo: building killswitch and the lab's helpers");
    let bin = build(false, &["killswitch-user", "killswitch-tests"])?;
    run(&bin.join("ks-demo"), &[])
}

/// The package holds the release binary; the man pages and completions come from its clap
/// definitions, through the library.
fn dist() -> Result<()> {
    eprintln!("dist: building the release binary and the packager");
    let release = build(true, &["killswitch-user"])?;
    let debug = build(false, &["killswitch-tests"])?;
    let out = Path::new("target/dist");
    std::fs::create_dir_all(out).context("cannot create target/dist")?;
    run(
        &debug.join("ks-dist"),
        &[release.join("killswitch").as_path(), out],
    )
}

/// The benchmark drives the release `killswitch` for the daemon's timings.
fn bench(quick: bool, only: Option<&str>) -> Result<()> {
    require_root("the benchmark loads BPF programs in a namespace")?;
    eprintln!("bench: building the release binary and the benchmark");
    let release = build(true, &["killswitch-user"])?;
    let debug = build(false, &["killswitch-tests"])?;
    let binary = release.join("killswitch");
    let mut args: Vec<&Path> = vec![&binary];
    if quick {
        args.push(Path::new("--quick"));
    }
    if let Some(part) = only {
        args.extend([Path::new("--only"), Path::new(part)]);
    }
    run(&debug.join("ks-bench"), &args)
}

fn require_root(why: &str) -> Result<()> {
    if !setup::is_root() {
        bail!("run as root: {why}");
    }
    Ok(())
}
