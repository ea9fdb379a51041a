//! Developer tasks: `cargo xtask setup|demo|test|bench`.

mod bench;
mod bench_daemon;
mod setup;

use std::{
    io::{BufRead, BufReader},
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
    /// Set up if needed and run every test
    Test {
        /// Extra arguments for `cargo test`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure per-packet cost per verdict path as the lists grow; writes target/bench/
    Bench,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Demo => setup::run().and_then(|()| demo()),
        Task::Test { args } => setup::run().and_then(|()| test(&args)),
        Task::Bench => setup::run()
            .and_then(|()| require_root("the benchmark loads BPF programs in a namespace"))
            .and_then(|()| release_build())
            .and_then(|bin| bench::run(&bin)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("tests failed");
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
    println!("demo: building killswitch and the probe");
    let status = cargo()
        .args([
            "build",
            "--quiet",
            "--locked",
            "-p",
            "killswitch-user",
            "-p",
            "killswitch-tests",
        ])
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("build failed");
    }
    let bin = std::env::current_exe()?.with_file_name("killswitch");
    std::env::set_var("KILLSWITCH_BIN", &bin);

    println!("demo: building the lab: client -> router -> OpenVPN server (NAT) -> web host");
    let mut story = testbed::story::Story::new();
    let seen = story.tell(&mut |line| println!("demo: {line}"));
    println!("demo: `killswitch status` while the tunnel was dead:");
    for line in seen.status_table.lines() {
        println!("      {line}");
    }
    drop(story);
    let verdict = seen.through_tunnel
        && !seen.after_kill_reached
        && seen.leaked.is_empty()
        && seen.new_tunnel_after_up;
    if !verdict {
        bail!("the demonstration did not go as expected: {seen:#?}");
    }
    println!("demo: done; namespaces, cgroup and pins removed");
    Ok(())
}

/// Builds the release `killswitch` for the measurements that run the binary.
fn release_build() -> Result<std::path::PathBuf> {
    eprintln!("bench: building the release binary");
    let status = cargo()
        .args([
            "build",
            "--quiet",
            "--locked",
            "--release",
            "-p",
            "killswitch-user",
        ])
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("release build failed");
    }
    let debug = std::env::current_exe()?;
    let target = debug
        .parent()
        .and_then(|p| p.parent())
        .context("unexpected target directory")?;
    Ok(target.join("release/killswitch"))
}

fn require_root(why: &str) -> Result<()> {
    if !setup::is_root() {
        bail!("run as root: {why}");
    }
    Ok(())
}
