//! `killswitch run`: a command in a cgroup of its own, either held to the policy as its own
//! scope (per-app kill switch) or registered as the `[vpn_client]`.
//!
//! The cgroup is `killswitch/NAME` next to the caller's cgroup. Its scope is enforced before
//! the command starts, kept current while anything runs in it (the daemon's code), and removed
//! with the cgroup once the cgroup is empty, so processes the command left behind stay held.
//! A killed `run` leaves the scope enforced: `status` shows it, `down --cgroup` removes it.

use std::{
    future::Future,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    pin::Pin,
    process::ExitStatus,
    rc::Rc,
    time::Duration,
};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    backend::{nftables, Backend, Choice},
    daemon::Daemon,
    ebpf::{self, pins, pins::ScopeLock, PinnedMaps},
    error::{Error, Result},
    scope::{self, Scope},
    vpn_client::{self, ClientCgroup},
};

/// What `run` starts.
pub struct Run<'a> {
    pub config: &'a Path,
    /// The cgroup's name under `killswitch/`; two runs with the same name share it.
    pub name: String,
    /// Register the cgroup as the VPN client instead of holding it to the policy.
    pub vpn_client: bool,
    pub choice: Choice,
    pub command: &'a [String],
}

/// Exit status of a command that could not be found, and of one that could not be executed
/// (what a shell returns).
pub const NOT_FOUND: u8 = 127;
pub const NOT_EXECUTABLE: u8 = 126;

/// Checks a `--name`: what a cgroup directory, a bpffs name and a ruleset can all hold.
pub fn check_name(name: &str) -> Result<()> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.is_empty() || name.len() > 64 || name.starts_with('.') || !name.chars().all(plain) {
        return Err(Error::Usage(format!(
            "--name {name:?}: use 1 to 64 letters, digits, `_`, `-` or `.` (not first)"
        )));
    }
    Ok(())
}

/// The default name: the command's file name and this process's id.
pub fn default_name(command: &str, vpn_client: bool) -> String {
    if vpn_client {
        return "vpn-client".into();
    }
    let base: String = Path::new(command)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("{}-{}", base.trim_start_matches('.'), std::process::id())
}

/// Where the run's cgroup goes, relative to the cgroup2 mount: `killswitch/NAME` beside the
/// caller's cgroup (under the root when the caller is there or one level down).
pub fn cgroup_for(name: &str) -> Result<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| Error::io("cannot read", "/proc/self/cgroup", e))?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| Error::Runtime("this process is in no cgroup v2".into()))?;
    let caller = Path::new(path.trim_start_matches('/'));
    let parent = caller.parent().unwrap_or(Path::new(""));
    Ok(parent.join("killswitch").join(name))
}

/// Runs the command and returns its exit status as a shell would give it (128 + signal).
pub fn run(run: &Run) -> Result<u8> {
    // A config that cannot be used stops the run before anything is made or started.
    crate::policy::Policy::load(run.config)?;
    let relative = cgroup_for(&run.name)?;
    let scope = Scope::from_arg(Some(&relative))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::kernel("cannot start the event loop", e))?;
    runtime.block_on(async {
        let setup = setup(run, &scope).await;
        let (mut held, mut child) = match setup {
            Ok(started) => started,
            Err(e) => {
                tear_down(run, &scope);
                return Err(e);
            }
        };
        let pid = child.id().map(|id| nix::unistd::Pid::from_raw(id as i32));
        let status = Rc::new(std::cell::Cell::new(None::<ExitStatus>));
        // Only while the command has not been waited for: after that its pid may be another's.
        let forward = {
            let status = status.clone();
            move |signal| {
                if let (Some(pid), None) = (pid, status.get()) {
                    let _ = nix::sys::signal::kill(pid, signal);
                }
            }
        };
        let finished = Rc::new(std::cell::Cell::new(false));
        let done = {
            let (status, finished) = (status.clone(), finished.clone());
            let cgroup = scope.cgroup.clone();
            let child = &mut child;
            async move {
                let exited = child.wait().await;
                status.set(exited.ok());
                empty(&cgroup).await;
                finished.set(true);
            }
        };
        let mut done: Pin<Box<dyn Future<Output = ()> + '_>> = Box::pin(done);
        match held.as_mut() {
            Some(daemon) => {
                if let Err(e) = daemon.serve(done.as_mut(), Some(&forward)).await {
                    tracing::error!("{e}; the scope stays as it is");
                }
                // Taken down (or failed): the command may still run, and is waited for.
                if !finished.get() {
                    done.await;
                }
            }
            None => forward_signals(done.as_mut(), &forward).await?,
        }
        tear_down(run, &scope);
        let status = status
            .get()
            .ok_or_else(|| Error::Runtime("cannot wait for the command".into()))?;
        Ok(shell_status(status))
    })
}

/// Waits for `done`, passing SIGTERM and SIGHUP on to the command (SIGINT from a terminal
/// reaches it directly).
async fn forward_signals(
    done: Pin<&mut (dyn Future<Output = ()> + '_)>,
    forward: &dyn Fn(nix::sys::signal::Signal),
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let failed = |e| Error::kernel("cannot install the signal handlers", e);
    let mut terminate = signal(SignalKind::terminate()).map_err(failed)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(failed)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(failed)?;
    let mut done = done;
    loop {
        tokio::select! {
            _ = &mut done => return Ok(()),
            _ = terminate.recv() => forward(nix::sys::signal::Signal::SIGTERM),
            _ = hangup.recv() => forward(nix::sys::signal::Signal::SIGHUP),
            _ = interrupt.recv() => {}
        }
    }
}

/// Makes the cgroup, puts it in force (its own scope, or as the VPN client), then starts the
/// command in it: all under the run lock, so a run ending now cannot remove the cgroup
/// between the two.
async fn setup(run: &Run<'_>, scope: &Scope) -> Result<(Option<Daemon>, tokio::process::Child)> {
    let _lock = run_lock()?;
    make_cgroup(&scope.cgroup)?;
    let held = if run.vpn_client {
        register(scope)?;
        None
    } else {
        Some(Daemon::start_for(run.config.to_path_buf(), scope.clone(), run.choice).await?)
    };
    let child = spawn(run.command, &scope.cgroup)?;
    Ok((held, child))
}

/// The lock every `run` holds while it sets up or tears down a cgroup.
fn run_lock() -> Result<Flock<std::fs::File>> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = crate::state_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| Error::io("cannot create", &dir, e))?;
    let path = dir.join("run.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("cannot open", &path, e))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io("cannot lock", &path, e.into()))
}

fn make_cgroup(cgroup: &Path) -> Result<()> {
    match std::fs::create_dir_all(cgroup) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(Error::Runtime(format!(
            "cannot create the cgroup {}: permission denied; run killswitch as root",
            cgroup.display()
        ))),
        Err(e) => Err(Error::io("cannot create the cgroup", cgroup, e)),
    }
}

/// Starts the command inside `cgroup`: the child moves itself there before it executes it,
/// so not one packet of the command is sent from anywhere else.
fn spawn(command: &[String], cgroup: &Path) -> Result<tokio::process::Child> {
    let procs_path = cgroup.join("cgroup.procs");
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map_err(|e| Error::io("cannot open", &procs_path, e))?;
    let fd = procs.as_raw_fd();
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    // SAFETY: only write(2) runs between fork and exec, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::Command {
            message: format!("{}: command not found", command[0]),
            code: NOT_FOUND,
        },
        _ => Error::Command {
            message: format!("{}: cannot run it: {e}", command[0]),
            code: NOT_EXECUTABLE,
        },
    })
}

/// Returns once the cgroup has no process left (or is gone).
async fn empty(cgroup: &Path) {
    let events = cgroup.join("cgroup.events");
    loop {
        match std::fs::read_to_string(&events) {
            Ok(text) if text.lines().any(|l| l == "populated 1") => {}
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes the run's scope (or its VPN client registration) and its cgroup, once no process
/// is left in it; with processes left, everything stays for the run that started them.
fn tear_down(run: &Run, scope: &Scope) {
    let Ok(_lock) = run_lock() else { return };
    if populated(&scope.cgroup) {
        return;
    }
    if run.vpn_client {
        unregister(scope);
    } else {
        for backend in Backend::holding(scope) {
            if let Err(e) = backend.remove(scope) {
                tracing::error!("cannot remove the scope {}: {e}", scope.display_cgroup());
                return;
            }
        }
    }
    let _ = std::fs::remove_dir(&scope.cgroup);
    // The `killswitch` parent goes with its last child.
    if let Some(parent) = scope.cgroup.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

fn populated(cgroup: &Path) -> bool {
    std::fs::read_to_string(cgroup.join("cgroup.events"))
        .is_ok_and(|text| text.lines().any(|l| l == "populated 1"))
}

/// A command's exit status as a shell reports it.
fn shell_status(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.wrapping_add(signal as u8),
        _ => 1,
    }
}

/// The run's cgroup as a VPN client: recorded for every later apply, and added now to each
/// enforced scope above it that holds the servers to its VPN client.
fn register(scope: &Scope) -> Result<()> {
    let path = scope.relative.to_string_lossy().into_owned();
    let mount = scope::cgroup2_mount()?;
    let client = ClientCgroup::find(&mount, &path)
        .ok_or_else(|| Error::Runtime(format!("the cgroup {path} vanished")))?;
    vpn_client::register(&path)?;
    let mut restricting = 0;
    for above in scopes_above(&scope.relative) {
        let added = if ebpf::is_pinned(&above) {
            add_to_maps(&above, &client)?
        } else {
            nftables::add_vpn_client(&above, &client)?
        };
        if added {
            tracing::info!(
                "{} trusts {path} as its VPN client (cgroup id {})",
                above.display_cgroup(),
                client.id
            );
            restricting += 1;
        }
    }
    if restricting == 0 {
        tracing::warn!(
            "no enforced scope above {path} has [vpn_client] in its config: every program \
             there may reach the servers, not just this one"
        );
    }
    Ok(())
}

fn unregister(scope: &Scope) {
    let path = scope.relative.to_string_lossy().into_owned();
    vpn_client::unregister(&path);
    let Some(id) = scope.cgroup_id().ok() else {
        return;
    };
    for above in scopes_above(&scope.relative) {
        if ebpf::is_pinned(&above) {
            let removed = ScopeLock::existing(&above).and_then(|lock| {
                let Some(_lock) = lock else { return Ok(()) };
                let mut maps = PinnedMaps::open(&pins::pin_dir(&above))?;
                let mut entries = maps.entries()?;
                if entries.vpn_clients.remove(&id) {
                    maps.write_vpn_clients(&entries)?;
                }
                Ok(())
            });
            if let Err(e) = removed {
                tracing::warn!(
                    "cannot forget the VPN client in {}: {e}",
                    above.display_cgroup()
                );
            }
        }
        // nftables: the rule names a cgroup that no longer exists; the next apply drops it.
    }
}

/// Adds the client to an eBPF scope that holds the servers to its VPN client.
fn add_to_maps(scope: &Scope, client: &ClientCgroup) -> Result<bool> {
    let Some(_lock) = ScopeLock::existing(scope)? else {
        return Ok(false);
    };
    let mut maps = PinnedMaps::open(&pins::pin_dir(scope))?;
    let mut entries = maps.entries()?;
    if entries.settings.vpn_client == 0 {
        return Ok(false);
    }
    entries.vpn_clients.insert(client.id);
    entries.settings.vpn_client_levels |= 1 << client.level;
    maps.write_vpn_clients(&entries)?;
    Ok(true)
}

/// The enforced scopes whose cgroup is `relative` or one above it: the ones whose programs
/// (or table) judge its sockets.
fn scopes_above(relative: &Path) -> Vec<Scope> {
    let mut all = pins::scopes().unwrap_or_default();
    all.extend(nftables::scopes());
    all.sort_by(|a, b| a.relative.cmp(&b.relative));
    all.dedup_by(|a, b| a.relative == b.relative);
    all.into_iter()
        .filter(|s| relative.starts_with(&s.relative))
        .collect()
}
