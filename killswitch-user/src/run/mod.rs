//! `killswitch run`: a command in a cgroup of its own, either held to the policy as its own
//! scope (per-app kill switch) or registered as the `[vpn_client]`.
//!
//! The cgroup is `killswitch/NAME` next to the caller's cgroup. Its scope is enforced before
//! the command starts, kept current while anything runs in it (the daemon's code), and removed
//! with the cgroup once the cgroup is empty, so processes the command left behind stay held.
//! A killed `run` leaves the scope enforced: `status` shows it, `down --cgroup` removes it.

mod client;
mod place;
mod user;

use std::{
    future::Future, os::fd::AsRawFd, path::Path, pin::Pin, process::ExitStatus, rc::Rc,
    time::Duration,
};

use nix::fcntl::Flock;

use self::{place::Kind, user::Invoker};
use crate::{
    backend::{Backend, Choice},
    daemon::Daemon,
    error::{Error, Result},
    scope::{self, Scope},
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

/// The default name: the command's file name and this process's id (the VPN client's: its
/// file name alone, so a restarted client takes the same place, as a unit does).
pub fn default_name(command: &str, vpn_client: bool) -> String {
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
    let base = base.trim_start_matches('.');
    if vpn_client {
        base.to_owned()
    } else {
        format!("{base}-{}", std::process::id())
    }
}

/// Every scope in force now, by either backend.
fn enforced() -> Vec<Scope> {
    crate::backend::scopes().unwrap_or_default()
}

/// Runs the command and returns its exit status as a shell would give it (128 + signal).
pub fn run(run: &Run) -> Result<u8> {
    // A config that cannot be used stops the run before anything is made or started.
    crate::policy::Policy::load(run.config)?;
    let kind = if run.vpn_client {
        Kind::VpnClient
    } else {
        Kind::App
    };
    let mount = scope::cgroup2_mount()?;
    let relative = place::cgroup_for(&mount, &run.name, kind, &enforced())?;
    let scope = Scope::from_arg(Some(&relative))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::kernel("cannot start the event loop", e))?;
    runtime.block_on(async {
        let setup = setup(run, &scope).await;
        let (mut held, mut child) = match setup {
            Ok(started) => started,
            Err(Failed::Before(e)) => return Err(e),
            Err(Failed::After(e)) => {
                tear_down(run, &scope);
                return Err(e);
            }
        };
        let pid = child.id().map(|id| nix::unistd::Pid::from_raw(id as i32));
        let status = Rc::new(std::cell::Cell::new(None::<ExitStatus>));
        // To the command while it has not been waited for (after that its pid may be
        // another's), then to what it left in the cgroup.
        let forward = {
            let status = status.clone();
            let cgroup = scope.cgroup.clone();
            move |signal| match (pid, status.get()) {
                (Some(pid), None) => {
                    let _ = nix::sys::signal::kill(pid, signal);
                }
                _ => signal_cgroup(&cgroup, signal),
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
async fn setup(
    run: &Run<'_>,
    scope: &Scope,
) -> Result<(Option<Daemon>, tokio::process::Child), Failed> {
    let _lock = run_lock().map_err(Failed::Before)?;
    collect_released();
    // Not made (someone else's cgroup is there): nothing of it is ours to take down.
    // An earlier run of this name whose cgroup is still closing connections: its scope holds
    // them, and applying this run's would let them go.
    if !scope.cgroup.exists() && !Backend::holding(scope).is_empty() {
        return Err(Failed::Before(Error::Runtime(format!(
            "{} is still closing the connections of an earlier run; try again in a moment or \
             use another --name",
            scope.display_cgroup()
        ))));
    }
    let mount = scope::cgroup2_mount().map_err(Failed::Before)?;
    place::make(&mount, &scope.cgroup).map_err(Failed::Before)?;
    let held = if run.vpn_client {
        client::register(&mount, scope, &enforced()).map_err(Failed::After)?;
        None
    } else {
        let daemon = Daemon::start_for(run.config.to_path_buf(), scope.clone(), run.choice).await;
        Some(daemon.map_err(Failed::After)?)
    };
    // The VPN client needs root (it makes the tunnel); an app runs as the user behind sudo.
    let invoker = if run.vpn_client {
        None
    } else {
        Invoker::from_sudo().map_err(Failed::After)?
    };
    let child = spawn(run.command, &scope.cgroup, invoker).map_err(Failed::After)?;
    Ok((held, child))
}

/// A setup that failed before or after it made the cgroup.
enum Failed {
    Before(Error),
    After(Error),
}

/// Removes the scopes of earlier runs whose cgroup is gone and released (see [`tear_down`]).
fn collect_released() {
    for scope in enforced() {
        if place::made_by_run(&scope) && !scope.cgroup.exists() && place::released(&scope) {
            for backend in Backend::holding(&scope) {
                if backend.remove(&scope).is_ok() {
                    tracing::info!(
                        "removed {} (its sockets are closed)",
                        scope.display_cgroup()
                    );
                }
            }
        }
    }
}

/// The lock every `run` holds while it sets up or tears down a cgroup (and `verify` while its
/// probe cgroup is inside a scope, so that a run's teardown never finds it there). Taken before
/// any scope's lock.
pub(crate) fn run_lock() -> Result<Flock<std::fs::File>> {
    crate::state::lock(&crate::state::dir().join("run.lock"))
}

/// Starts the command inside `cgroup`: the child moves itself there before it executes it,
/// so not one packet of the command is sent from anywhere else.
fn spawn(
    command: &[String],
    cgroup: &Path,
    invoker: Option<Invoker>,
) -> Result<tokio::process::Child> {
    let procs_path = cgroup.join("cgroup.procs");
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map_err(|e| Error::io("cannot open", &procs_path, e))?;
    let fd = procs.as_raw_fd();
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    if let Some(user) = &invoker {
        cmd.env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    // SAFETY: only system calls run between fork and exec (write(2), then set*id), on values
    // made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            match &invoker {
                Some(user) => user.become_it(),
                None => Ok(()),
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
    while place::populated(cgroup) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `signal` to every process in the cgroup (what the command left there).
fn signal_cgroup(cgroup: &Path, signal: nix::sys::signal::Signal) {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.parse().ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Removes the run's cgroup once no process is left in it, and then its scope (or its VPN
/// client registration). The cgroup goes first: a socket made in it (a closed connection still
/// sending its last data) keeps it alive, and its scope must hold those packets until the
/// kernel releases it. A scope still needed is left; a later run removes it.
fn tear_down(run: &Run, scope: &Scope) {
    let Ok(_lock) = run_lock() else { return };
    if place::populated(&scope.cgroup) {
        return;
    }
    if run.vpn_client {
        client::unregister(scope, &enforced());
    }
    if let Err(e) = std::fs::remove_dir(&scope.cgroup) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", scope.cgroup.display());
            return;
        }
    }
    let parent = scope.cgroup.parent().unwrap_or(&scope.cgroup).to_path_buf();
    if run.vpn_client {
        // No scope of its own to keep.
        let _ = std::fs::remove_dir(&parent);
        return;
    }
    let started = std::time::Instant::now();
    // A cgroup a process ran in takes about 1.3 s to be released on the test VM.
    while !place::released(scope) && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !place::released(scope) {
        tracing::info!(
            "{} keeps its scope while sockets made in it are open; a later run removes it",
            scope.display_cgroup()
        );
        return;
    }
    for backend in Backend::holding(scope) {
        if let Err(e) = backend.remove(scope) {
            tracing::error!("cannot remove the scope {}: {e}", scope.display_cgroup());
        }
    }
    // The parent goes with its last child.
    let _ = std::fs::remove_dir(&parent);
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
