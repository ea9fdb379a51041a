//! Where the eBPF backend keeps a scope: its pin directory in bpffs
//! (`/sys/fs/bpf/killswitch/<scope name>/`), made and checked so that no one else can have
//! planted it, and locked for one writer at a time.

use std::{
    fs::File,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    error::{Error, Result},
    scope::Scope,
};

/// Where scopes are pinned. `KILLSWITCH_PIN_ROOT` moves it (tests use their own directory).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/killswitch";
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

pub fn pin_root() -> PathBuf {
    root_from(std::env::var_os("KILLSWITCH_PIN_ROOT"))
}

/// Absolute, so that the early load's thread, which changes its root for a moment, names the
/// same directory as the main thread.
fn root_from(value: Option<std::ffi::OsString>) -> PathBuf {
    let root = value.map_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT), PathBuf::from);
    std::path::absolute(&root).unwrap_or(root)
}

/// The scope's pin directory.
pub fn pin_dir(scope: &Scope) -> PathBuf {
    pin_root().join(&scope.name)
}

/// A directory of the pin root that is this process's alone (never a scope: its name has a
/// `=`), locked while in use and removed on drop. One whose lock is free was left by a process
/// that died (in any pid namespace: the lock, not the pid, says so) and goes when the next one
/// of its kind is made.
pub struct PrivateDir {
    path: PathBuf,
    _in_use: Flock<File>,
}

impl PrivateDir {
    /// A new one named `<kind>=<pid>-<ns>` (the time too: a process in another pid namespace
    /// may have the same pid) in the pin root, which must exist.
    pub fn make(kind: &str) -> Result<PrivateDir> {
        let root = pin_root();
        check_pinned(&root)?;
        let prefix = format!("{kind}=");
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let ours = entry.file_name().to_string_lossy().starts_with(&prefix);
                if ours && lock_free(&entry.path()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = root.join(format!("{prefix}{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| Error::io("cannot make", &path, e))?;
        let locked = File::open(&path).and_then(|file| {
            Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e.into())
        });
        match locked {
            Ok(lock) => Ok(PrivateDir {
                path,
                _in_use: lock,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&path);
                Err(Error::io("cannot lock", &path, e))
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether nobody holds the lock of the directory at `path`.
fn lock_free(path: &Path) -> bool {
    File::open(path).is_ok_and(|file| Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok())
}

/// Every scope with a pin directory.
pub fn scopes() -> Result<Vec<Scope>> {
    let root = pin_root();
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("cannot list", root, e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // Refused directories moved aside and private directories are no scope.
        .filter(|name| !name.contains('='))
        .collect();
    names.sort();
    names.iter().map(|name| Scope::from_name(name)).collect()
}

/// Whether bpffs is mounted on /sys/fs/bpf.
pub fn bpffs_mounted() -> bool {
    nix::sys::statfs::statfs(BPFFS_MOUNT).is_ok_and(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there yet.
pub fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted() {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS_MOUNT).map_err(|e| Error::io("cannot create", BPFFS_MOUNT, e))?;
    // The kernel's default mode is 1777: anyone could create our pin root before we do.
    nix::mount::mount(
        Some("bpffs"),
        BPFFS_MOUNT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|e| Error::io("cannot mount bpffs on", BPFFS_MOUNT, e.into()))
}

/// Refuses a pin directory or pinned object that someone else could have put there or can
/// change: a symlink, not owned by root, or writable by group or others.
pub fn check_pinned(path: &Path) -> Result<()> {
    match pinned_problem(path)? {
        None => Ok(()),
        Some(problem) => Err(Error::Runtime(format!(
            "refusing {}: it {problem}; someone else may have made it. Remove it (`rm -r {}`) \
             and run the command again",
            path.display(),
            path.display()
        ))),
    }
}

fn pinned_problem(path: &Path) -> Result<Option<String>> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("cannot inspect", path, e)),
    };
    Ok(if meta.file_type().is_symlink() {
        Some("is a symlink".to_owned())
    } else if meta.uid() != 0 {
        Some(format!("is owned by uid {}, not root", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    })
}

/// Creates `dir` (and the pin root above it) as root-only directories, or checks them. One
/// that someone else could have made is moved aside (root may, even in a sticky directory) and
/// made anew: refusing it would leave the scope unenforced, which is what such a plant is for.
fn make_pin_dir(dir: &Path) -> Result<()> {
    for path in [pin_root(), dir.to_path_buf()] {
        let mut attempts = 0;
        loop {
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("cannot create", &path, e)),
            }
            let Some(problem) = pinned_problem(&path)? else {
                break;
            };
            attempts += 1;
            if attempts == 3 {
                return check_pinned(&path);
            }
            let aside = aside_name(&path);
            std::fs::rename(&path, &aside).map_err(|e| Error::io("cannot move aside", &path, e))?;
            tracing::warn!(
                "{} {problem}, so someone else may have made it: moved it to {} and made a new one",
                path.display(),
                aside.display()
            );
        }
    }
    Ok(())
}

/// Where a refused pin directory goes: beside it, under a name no scope has (bpffs names have
/// no dots; scope names have no `=`).
fn aside_name(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{name}=refused={}", std::process::id()))
}

/// Holds a scope's lock (`flock` on its pin directory): one `up`, `down`, `servers` or daemon
/// change at a time per scope, so no one sees it half-updated; other scopes are not held up.
pub struct ScopeLock(#[allow(dead_code)] Flock<File>);

/// How often to retry when the directory is removed and re-created while we wait for it.
const LOCK_ATTEMPTS: usize = 100;

impl ScopeLock {
    /// Locks the scope, creating its pin directory (for `up`).
    pub fn acquire(scope: &Scope) -> Result<ScopeLock> {
        ScopeLock::lock(scope, true)?
            .ok_or_else(|| Error::Runtime("the scope's pin directory vanished".into()))
    }

    /// Locks the scope if it has a pin directory; `None` once it is gone (taken `down`).
    pub fn existing(scope: &Scope) -> Result<Option<ScopeLock>> {
        ScopeLock::lock(scope, false)
    }

    fn lock(scope: &Scope, create: bool) -> Result<Option<ScopeLock>> {
        let dir = &pin_dir(scope);
        for _ in 0..LOCK_ATTEMPTS {
            if create {
                make_pin_dir(dir)?;
            } else {
                check_pinned(dir)?;
            }
            let opened = File::open(dir).and_then(|file| {
                let lock = Flock::lock(file, FlockArg::LockExclusive)
                    .map_err(|(_, e)| std::io::Error::from(e))?;
                // `down` removes the directory under the lock: holding a removed one locks nothing.
                let same = lock.metadata()?.ino() == std::fs::metadata(dir)?.ino();
                Ok(same.then_some(lock))
            });
            match opened {
                Ok(Some(lock)) => return Ok(Some(ScopeLock(lock))),
                Ok(None) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("cannot lock", dir, e)),
            }
        }
        Err(Error::Runtime(format!(
            "cannot lock {}: it keeps being removed and re-created",
            dir.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_root_is_absolute() {
        assert_eq!(root_from(None), PathBuf::from(DEFAULT_PIN_ROOT));
        assert_eq!(
            root_from(Some("/sys/fs/bpf/t".into())),
            PathBuf::from("/sys/fs/bpf/t")
        );
        let relative = root_from(Some("pins/t".into()));
        assert!(relative.is_absolute(), "{}", relative.display());
        assert!(relative.ends_with("pins/t"));
    }
}
