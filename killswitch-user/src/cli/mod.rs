//! The command line: parse, call the library, print. No policy logic lives here.

mod check;
mod daemon;
mod down;
mod render;
mod run;
mod servers;
mod status;
mod trace;
mod up;
mod verify;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use crate::{
    error::{Error, Result},
    policy::DEFAULT_CONFIG_PATH,
};

const ABOUT: &str =
    "A VPN kill switch that fails closed: only the tunnel and the VPN servers get through";

const LONG_ABOUT: &str = "\
A VPN kill switch that fails closed.

killswitch attaches eBPF programs to a cgroup v2 scope (the whole machine by default) that let \
packets through only on loopback, on the VPN tunnel, and to the VPN servers listed in the \
configuration. Everything else is dropped, in both directions, IPv4 and IPv6. The enforcement is \
pinned in bpffs, so it stays in force when killswitch exits, crashes or is killed: only \
`killswitch down` removes it. Where eBPF cannot run, the same policy is an nftables table \
(`up --backend nftables`, chosen by itself with `auto`), or a ruleset to load yourself \
(`killswitch render`).";

const AFTER_HELP: &str = "\
Examples:
  killswitch check                       validate the configuration and show the policy
  killswitch up                          enforce it system-wide
  killswitch up --cgroup work.slice      enforce it for one cgroup only
  killswitch up --backend nftables       enforce it with an nftables table instead of eBPF
  killswitch status                      what is enforced, with packet counters
  killswitch status --follow             every dropped packet as it happens
  killswitch daemon                      enforce and keep up with tunnels, names, reloads
  killswitch servers set 198.51.100.7:1194/udp   replace the server list live
  killswitch render nft > killswitch.nft  the same policy as an nftables ruleset
  killswitch run -- firefox              a kill switch for one app (and what it starts)
  killswitch run --vpn-client -- openvpn --config work.conf
                                         only this process may reach the servers
  killswitch verify                      prove that what is enforced is the policy
  killswitch down                        remove the system-wide enforcement

Exit status: 0 success, 1 runtime failure, 2 usage or configuration error.";

// One block of examples per command, shown by `killswitch COMMAND --help` and in its man page.

const UP_EXAMPLES: &str = "\
Examples:
  killswitch up                          enforce the policy system-wide
  killswitch up --cgroup work.slice      only for the processes of one cgroup
  killswitch up --backend nftables       as an nftables table instead of eBPF programs";

const DOWN_EXAMPLES: &str = "\
Examples:
  killswitch down                        remove the system-wide enforcement
  killswitch down --cgroup work.slice    remove one cgroup's";

const STATUS_EXAMPLES: &str = "\
Examples:
  killswitch status                      every scope, its tunnels, servers and counters
  killswitch status --json               the same for programs
  killswitch status --follow             every dropped packet as it happens";

const TRACE_EXAMPLES: &str = "\
Examples:
  killswitch trace                       every verdict of the only eBPF scope, as it happens
  killswitch trace --cgroup work.slice --json | jq 'select(.verdict == \"drop\")'";

const CHECK_EXAMPLES: &str = "\
Examples:
  killswitch check                       validate /etc/killswitch/killswitch.toml
  killswitch --config /etc/killswitch/killswitch.toml.new check
                                         validate a new file (root's) before moving it in place";

const DAEMON_EXAMPLES: &str = "\
Examples:
  killswitch daemon                      enforce system-wide and keep it current
  systemctl reload killswitch-daemon     re-read the config (SIGHUP)";

const SERVERS_EXAMPLES: &str = "\
Examples:
  killswitch servers list
  killswitch servers set 198.51.100.7:1194/udp '[2001:db8::7]:443/tcp'
  killswitch servers add 198.51.100.8:1194/udp
  killswitch servers remove 198.51.100.7:1194/udp";

const RENDER_EXAMPLES: &str = "\
Examples:
  killswitch render nft | nft -f -       load the policy as an nftables table
  killswitch render iptables > rules.v4  for iptables-restore (ip6tables for IPv6)";

const RUN_EXAMPLES: &str = "\
Examples:
  killswitch run -- firefox              a kill switch for one app and what it starts
  killswitch run --vpn-client -- openvpn --config work.conf
                                         the only process that may reach the servers";

const VERIFY_EXAMPLES: &str = "\
Examples:
  killswitch verify                      prove the system-wide scope is enforced as planned
  killswitch verify --cgroup work.slice --json";

#[derive(Debug, Parser)]
#[command(name = "killswitch", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    /// Configuration file (TOML); must be owned by root and not writable by others
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,

    /// Log more detail
    #[arg(short, long, global = true, conflicts_with = "quiet")]
    verbose: bool,

    /// Log only warnings and errors
    #[arg(short, long, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the policy to a scope and pin it; re-running updates it in place with no gap
    ///
    /// A server hostname that does not resolve stays blocked, and the exit status is 1
    #[command(after_help = UP_EXAMPLES)]
    Up(UpArgs),
    /// Remove a scope's enforcement and pins
    #[command(after_help = DOWN_EXAMPLES)]
    Down(ScopeArgs),
    /// Show what is enforced: scopes, tunnels, servers and packet counters per reason
    #[command(after_help = STATUS_EXAMPLES)]
    Status(status::StatusArgs),
    /// Show every verdict of a scope as it happens: why a packet was dropped or allowed
    ///
    /// Swaps the scope's programs, without a gap, for a copy that logs each verdict (direction,
    /// step, reason, addresses, ports, interface, cgroup) and swaps them back when it ends.
    /// Both read the same maps: the policy is the same. Untraced, the programs carry no
    /// logging at all. If trace is killed with SIGKILL the traced copy stays until the next
    /// `killswitch up`
    #[command(after_help = TRACE_EXAMPLES)]
    Trace(trace::TraceArgs),
    /// Validate the configuration, resolve names and print the normalized policy
    #[command(after_help = CHECK_EXAMPLES)]
    Check,
    /// Apply the policy like `up`, then keep it current: tunnels that come and go, hostnames,
    /// config reload on SIGHUP, drop events in the log. Stopping it leaves the scope enforced
    #[command(after_help = DAEMON_EXAMPLES)]
    Daemon(UpArgs),
    /// Change the server list of an enforced scope while it runs (list, set, add, remove)
    #[command(after_help = SERVERS_EXAMPLES)]
    Servers(servers::ServersArgs),
    /// Print the policy as an nftables script or iptables-restore files, for machines
    /// without eBPF: `killswitch render nft | nft -f -`
    ///
    /// The ruleset follows the same verdict order with no connection tracking; where netfilter
    /// cannot read a packet the way the eBPF programs do, it is stricter (docs/backends.md)
    #[command(after_help = RENDER_EXAMPLES)]
    Render(render::RenderArgs),
    /// Run a command in a cgroup of its own, held to the policy: a kill switch for one app
    ///
    /// The cgroup is `killswitch/NAME` next to yours (below directories only root can change).
    /// Its scope is enforced before the command starts and kept current like the daemon keeps
    /// one (tunnels that come back, names, SIGHUP reloads). Under sudo the command runs as the
    /// user who ran sudo. When the command and everything it started have exited, the cgroup
    /// and the scope are removed, and killswitch exits with the command's status (128 + N for
    /// a signal, 127 when it is not found). SIGTERM is passed on to the command. If killswitch
    /// itself is killed, the scope stays enforced: `killswitch down --cgroup PATH` removes it.
    ///
    /// With --vpn-client the command is the VPN client instead: its cgroup is the one every
    /// scope with [vpn_client] lets reach the servers, and no scope is made for it.
    #[command(after_help = RUN_EXAMPLES)]
    Run(run::RunArgs),
    /// Prove on this machine that a scope is enforced as planned, without taking the VPN down
    ///
    /// Asks the kernel what is attached to the scope and what its maps (or nftables table) hold,
    /// compares that with the config and the interfaces present now, runs generated packets
    /// through a copy of the attached programs against the policy, probes from a child cgroup
    /// with packets the policy drops before they can leave, and warns about the usual holes
    /// around a kill switch (IPv6, DNS, forwarding, other firewalls). Exit status 0 when no
    /// check failed
    #[command(after_help = VERIFY_EXAMPLES)]
    Verify(verify::VerifyArgs),
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    scope: ScopeArgs,

    /// What enforces it: eBPF programs on the cgroup, or an nftables table. `auto` uses eBPF
    /// and falls back to nftables, with a warning saying why, where eBPF cannot enforce
    #[arg(long, value_enum, default_value_t = crate::backend::Choice::Auto)]
    backend: crate::backend::Choice,
}

#[derive(Debug, Args)]
struct ScopeArgs {
    /// cgroup v2 directory to enforce on: absolute, or relative to the cgroup2 mount.
    /// Default: the cgroup2 root, i.e. the whole machine
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
}

/// The command line's definition, for the man pages and shell completions `cargo xtask dist`
/// generates from it.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Runs the command line and returns the process exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(cli.verbose, cli.quiet);
    // A reader that goes away (`status | head`) ends a command that only reads and prints
    // quietly, as it does other tools. Every other command keeps SIGPIPE ignored: killed half
    // way (a pipe to nft or to a log reader closing), it could leave a scope unenforced.
    if matches!(
        cli.command,
        Command::Status(_) | Command::Check | Command::Render(_)
    ) {
        // SAFETY: restoring a signal's default disposition before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(&cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("killswitch: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

fn run(cli: &Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Up(args) => up::run(&cli.config, args.scope.cgroup.as_deref(), args.backend),
        Command::Down(args) => down::run(args.cgroup.as_deref()),
        Command::Status(args) => status::run(args),
        Command::Trace(args) => trace::run(args),
        Command::Check => check::run(&cli.config),
        Command::Daemon(args) => {
            daemon::run(&cli.config, args.scope.cgroup.as_deref(), args.backend)
        }
        Command::Servers(args) => servers::run(args),
        Command::Render(args) => render::run(&cli.config, args),
        Command::Run(args) => run::run(&cli.config, args),
        Command::Verify(args) => verify::run(&cli.config, args),
    }
}

/// Logs go to stderr through `tracing`; under systemd (JOURNAL_STREAM) without timestamps,
/// which the journal adds itself.
fn init_logging(verbose: bool, quiet: bool) {
    let level = if verbose {
        "debug"
    } else if quiet {
        "warn"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILLSWITCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("killswitch={level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).init();
    } else {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        builder
            .with_ansi(colour(terminal, std::env::var_os("NO_COLOR").as_deref()))
            .init();
    }
}

/// Colours only for a person at a terminal, never in files or pipes, and never when `NO_COLOR`
/// is set to anything but the empty string (no-color.org). clap's help follows the same rule.
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_BPF, read from /proc/self/status.
fn require_privileges() -> Result<()> {
    const NEEDED: u64 = (1 << 12) | (1 << 21) | (1 << 39);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if effective & NEEDED == NEEDED {
        Ok(())
    } else {
        Err(Error::NotPermitted)
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    #[test]
    fn colour_only_at_a_terminal_and_never_with_no_color() {
        assert!(super::colour(true, None));
        assert!(super::colour(true, Some(OsStr::new(""))));
        assert!(!super::colour(true, Some(OsStr::new("1"))));
        assert!(!super::colour(false, None));
    }
}
