//! Starting processes inside a network namespace (and optionally a cgroup), bounded in time.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::OnceLock,
};

use crate::{Cgroup, Netns};

/// Every command started here is killed after this many seconds (unless started with
/// [`command_in_for`]): 20, or `KILLSWITCH_TEST_TIMEOUT` (the Debian kernels' guests, where
/// an `up` under emulation takes seconds).
pub fn command_timeout() -> &'static str {
    static SECONDS: OnceLock<String> = OnceLock::new();
    SECONDS.get_or_init(|| {
        std::env::var("KILLSWITCH_TEST_TIMEOUT")
            .ok()
            .filter(|s| s.parse::<u32>().is_ok_and(|n| n > 0))
            .unwrap_or_else(|| "20".to_owned())
    })
}

/// A command that joins `cgroup` (before entering the namespace: `ip netns exec` would hide
/// /sys/fs/cgroup), then enters only the network namespace of `netns`.
pub fn command_in(netns: &Netns, cgroup: Option<&Cgroup>, program: &str, args: &[&str]) -> Command {
    command_in_for(netns, cgroup, command_timeout(), program, args)
}

/// [`command_in`], killed after `seconds` instead: for a benchmark's long-lived helper.
pub fn command_in_for(
    netns: &Netns,
    cgroup: Option<&Cgroup>,
    seconds: &str,
    program: &str,
    args: &[&str],
) -> Command {
    let procs = cgroup
        .map(|c| c.procs().display().to_string())
        .unwrap_or_default();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"if [ -n "$1" ]; then echo $$ > "$1" || exit 125; fi; ns=$2; shift 2; exec nsenter --net="$ns" -- timeout -k 1 "$@""#)
        .arg("sh")
        .arg(procs)
        .arg(netns.path())
        .arg(seconds)
        .arg(program)
        .args(args);
    cmd
}

pub fn output_in(netns: &Netns, cgroup: Option<&Cgroup>, program: &str, args: &[&str]) -> Output {
    command_in(netns, cgroup, program, args)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"))
}

/// `nft ARGS` in `netns`, in a mount namespace of its own where the cgroup2 mount is at
/// /sys/fs/cgroup: nft 1.0.6 looks a `socket cgroupv2` path up there, whatever the machine
/// mounts there.
pub fn nft_in(netns: &Netns, args: &[&str]) -> Output {
    let mount = crate::cgroup::killswitch_cgroup2_mount();
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" /sys/fs/cgroup && shift 2 && exec nsenter --net="$0" nft "$@""#)
        .arg(netns.path())
        .arg(mount)
        .arg("--")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot start nft: {e}"))
}

/// The `killswitch` binary under test: `KILLSWITCH_BIN`, or built once through cargo.
pub fn killswitch_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("KILLSWITCH_BIN") {
            return PathBuf::from(path);
        }
        cargo_executables(&["build", "-p", "killswitch-user", "--bin", "killswitch"])
            .pop()
            .expect("cargo reported no killswitch executable")
            .1
    })
    .clone()
}

/// Runs `cargo ARGS` (a build) and returns the executables it reports, as (target name, path).
pub fn cargo_executables(args: &[&str]) -> Vec<(String, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Bounded like every wait here: a first build of everything takes about 3 minutes.
    let out = Command::new("timeout")
        .args(["1200", &cargo])
        .args(args)
        .args(["--quiet", "--message-format=json-render-diagnostics"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cannot run cargo");
    assert!(
        out.status.success(),
        "cargo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|msg| {
            let name = msg["target"]["name"].as_str()?.to_owned();
            Some((name, PathBuf::from(msg.get("executable")?.as_str()?)))
        })
        .collect()
}

/// Runs `killswitch ARGS` in `netns` (outside any test cgroup), pins under `pin_root`.
pub fn killswitch(netns: &Netns, pin_root: &crate::PinRoot, args: &[&str]) -> Output {
    killswitch_command(netns, pin_root, args)
        .output()
        .expect("cannot start killswitch")
}

/// The command [`killswitch`] runs, for callers that start it in the background.
pub fn killswitch_command(netns: &Netns, pin_root: &crate::PinRoot, args: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.path().display()))
        .arg("--")
        .arg("timeout")
        .arg(command_timeout())
        .arg(killswitch_bin())
        .args(args)
        .env("KILLSWITCH_PIN_ROOT", &pin_root.path)
        .env("KILLSWITCH_STATE_DIR", &pin_root.state)
        .env_remove("KILLSWITCH_LOG");
    cmd
}

/// Like [`killswitch_command`], but the command runs inside `cgroup`, under the policy it
/// enforces as a system-wide daemon is, and sees `resolv_conf` as /etc/resolv.conf (in a mount
/// namespace of its own, as `ip netns exec` does it). Killed after 90 s.
pub fn killswitch_in_cgroup(
    netns: &Netns,
    pin_root: &crate::PinRoot,
    cgroup: &Cgroup,
    resolv_conf: &std::path::Path,
    args: &[&str],
) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$1" || exit 125; shift; exec unshare --mount --propagation private -- "$@""#)
        .arg("sh")
        .arg(cgroup.procs())
        .arg("sh")
        .arg("-c")
        .arg(r#"mount --bind "$1" /etc/resolv.conf || exit 125; ns=$2; shift 2; exec nsenter --net="$ns" -- timeout "$@""#)
        .arg("sh")
        .arg(resolv_conf)
        .arg(netns.path())
        .arg("90")
        .arg(killswitch_bin())
        .args(args)
        .env("KILLSWITCH_PIN_ROOT", &pin_root.path)
        .env("KILLSWITCH_STATE_DIR", &pin_root.state)
        .env_remove("KILLSWITCH_LOG");
    cmd
}

/// Like [`killswitch`], panicking with the output unless it exits 0.
pub fn killswitch_ok(netns: &Netns, pin_root: &crate::PinRoot, args: &[&str]) -> String {
    let out = killswitch(netns, pin_root, args);
    assert!(
        out.status.success(),
        "killswitch {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A long-running command in its own process group whose stdout is read line by line; the whole
/// group is killed on drop (`timeout` forks, so killing one pid would leave the command running).
pub struct Background {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Only for [`Background::start_spoken`].
    stdin: Option<std::process::ChildStdin>,
}

impl Background {
    pub fn start(cmd: Command) -> Background {
        Background::started(cmd, false)
    }

    /// [`Background::start`], with a pipe to the command's stdin for [`Background::say`].
    pub fn start_spoken(cmd: Command) -> Background {
        Background::started(cmd, true)
    }

    fn started(mut cmd: Command, spoken: bool) -> Background {
        use std::{io::BufRead, os::unix::process::CommandExt};
        if spoken {
            cmd.stdin(std::process::Stdio::piped());
        }
        let mut child = cmd
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cannot start a background command");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Background {
            child,
            lines,
            stdin,
        }
    }

    /// Writes `line` to the command's stdin (started with [`Background::start_spoken`]).
    pub fn say(&mut self, line: &str) -> std::io::Result<()> {
        use std::io::Write;
        let stdin = self.stdin.as_mut().ok_or(std::io::ErrorKind::BrokenPipe)?;
        writeln!(stdin, "{line}")?;
        stdin.flush()
    }

    /// Closes the command's stdin: end of input.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next line of output, or `None` after `timeout`.
    pub fn line(&self, timeout: std::time::Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Every line that arrives until `quiet` passes without one (bounded by `limit` lines).
    pub fn lines_until_quiet(&self, quiet: std::time::Duration, limit: usize) -> Vec<String> {
        let mut lines = Vec::new();
        while lines.len() < limit {
            match self.line(quiet) {
                Some(line) => lines.push(line),
                None => break,
            }
        }
        lines
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the command has ended; `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Makes `command` (and everything it executes) get EPERM from the `bpf` system call: a kernel
/// that refuses eBPF, for the fallback tests. A seccomp filter, inherited across exec.
pub fn without_bpf(command: &mut Command) {
    const LOAD_NR: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JUMP_IF_EQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RETURN: u16 = 0x06; // BPF_RET | BPF_K
    const ERRNO_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32; // SECCOMP_RET_ERRNO
    const ALLOW: u32 = 0x7fff_0000; // SECCOMP_RET_ALLOW
    let filter = [
        libc::sock_filter {
            code: LOAD_NR,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: JUMP_IF_EQ,
            jt: 0,
            jf: 1,
            k: libc::SYS_bpf as u32,
        },
        libc::sock_filter {
            code: RETURN,
            jt: 0,
            jf: 0,
            k: ERRNO_EPERM,
        },
        libc::sock_filter {
            code: RETURN,
            jt: 0,
            jf: 0,
            k: ALLOW,
        },
    ];
    // SAFETY: only prctl between fork and exec; the filter outlives the calls (moved in).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, move || {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
