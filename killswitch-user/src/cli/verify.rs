//! `killswitch verify`

use std::{path::Path, process::ExitCode};

use clap::Args;

use crate::{error::Result, scope::Scope, verify};

#[derive(Debug, Args)]
pub(super) struct VerifyArgs {
    /// The scope to verify (absolute, or relative to the cgroup2 mount). Default: the cgroup2
    /// root, i.e. the whole machine
    #[arg(long, value_name = "PATH")]
    cgroup: Option<std::path::PathBuf>,

    /// Print JSON for programs instead of one line per check
    #[arg(long)]
    json: bool,
}

/// Exit status 0 when no check failed (warnings do not fail), 1 otherwise.
pub(super) fn run(config: &Path, args: &VerifyArgs) -> Result<ExitCode> {
    super::require_privileges()?;
    let scope = Scope::from_arg(args.cgroup.as_deref())?;
    let report = verify::verify(config, &scope)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report serializes")
        );
    } else {
        println!("verify   {} ({})", scope.display_cgroup(), report.backend);
        let width = report
            .checks
            .iter()
            .map(|c| c.check.len())
            .max()
            .unwrap_or(0);
        for check in &report.checks {
            println!(
                "{}  {:width$}  {}",
                check.result.label(),
                check.check,
                check.evidence
            );
            if let Some(fix) = &check.fix {
                println!("      {:width$}  fix: {fix}", "");
            }
        }
        let of = |o: verify::Outcome| report.checks.iter().filter(|c| c.result == o).count();
        println!(
            "{}: {} passed, {} failed, {}, {} skipped",
            if report.passed {
                "verified"
            } else {
                "NOT verified"
            },
            of(verify::Outcome::Pass),
            of(verify::Outcome::Fail),
            verify::count(of(verify::Outcome::Warn), "warning"),
            of(verify::Outcome::Skip)
        );
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
