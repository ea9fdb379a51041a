//! Scopes: a cgroup v2 directory whose sockets the policy governs, and the bpffs directory where
//! its enforcement is pinned (`/sys/fs/bpf/killswitch/<scope>/`).

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirBuilderExt;
use std::{
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};

/// Where scopes are pinned. `KILLSWITCH_PIN_ROOT` moves it (tests use their own directory).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/killswitch";
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// Absolute path of the cgroup directory.
    pub cgroup: PathBuf,
    /// Path relative to the cgroup2 mount; empty for the root (system-wide).
    pub relative: PathBuf,
    /// `systemd-escape --path` of `relative`; `-` for the root.
    pub name: String,
    pub pin_dir: PathBuf,
}

impl Scope {
    /// The scope for `--cgroup` (absolute, or relative to the cgroup2 mount; none = root).
    pub fn from_arg(arg: Option<&Path>) -> Result<Scope> {
        let mount = cgroup2_mount()?;
        let relative = match arg {
            None => PathBuf::new(),
            Some(path) if path.is_absolute() => path
                .strip_prefix(&mount)
                .map_err(|_| {
                    Error::Usage(format!(
                        "--cgroup {}: not under the cgroup2 mount {}",
                        path.display(),
                        mount.display()
                    ))
                })?
                .to_owned(),
            Some(path) => path.to_owned(),
        };
        if relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(Error::Usage(format!(
                "--cgroup {}: use a plain path without `..`",
                relative.display()
            )));
        }
        // One cgroup, one name: `a//b` and `a/./b` are `a/b`.
        let relative: PathBuf = relative.components().collect();
        let name = escape_path(&relative);
        Ok(Scope {
            cgroup: mount.join(&relative),
            pin_dir: pin_root().join(&name),
            relative,
            name,
        })
    }

    /// The whole machine on a system with no cgroup2 mount: only nftables can hold it.
    pub fn without_cgroup2() -> Scope {
        Scope {
            cgroup: PathBuf::from("/"),
            relative: PathBuf::new(),
            name: "-".into(),
            pin_dir: pin_root().join("-"),
        }
    }

    /// The scope pinned under `name` in the pin root.
    pub fn from_name(name: &str) -> Result<Scope> {
        let relative = unescape_path(name);
        Ok(Scope {
            cgroup: cgroup2_mount()?.join(&relative),
            pin_dir: pin_root().join(name),
            relative,
            name: name.to_owned(),
        })
    }

    /// Every scope with a pin directory.
    pub fn all_pinned() -> Result<Vec<Scope>> {
        let root = pin_root();
        let entries = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("cannot list", root, e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            // Refused directories moved aside are no scope.
            .filter(|name| !name.contains('='))
            .collect();
        names.sort();
        names.iter().map(|name| Scope::from_name(name)).collect()
    }

    /// The cgroup's id as BPF sees it (`bpf_skb_cgroup_id`): the directory's inode number.
    pub fn cgroup_id(&self) -> Result<u64> {
        let meta = std::fs::metadata(&self.cgroup)
            .map_err(|e| Error::io("cannot open the cgroup", &self.cgroup, e))?;
        Ok(meta.ino())
    }

    pub fn display_cgroup(&self) -> String {
        if self.relative.as_os_str().is_empty() {
            format!("{} (system-wide)", self.cgroup.display())
        } else {
            self.cgroup.display().to_string()
        }
    }
}

pub fn pin_root() -> PathBuf {
    std::env::var_os("KILLSWITCH_PIN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT))
}

/// The cgroup2 mount point, read from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("cannot read", "/proc/self/mountinfo", e))?;
    mountinfo
        .lines()
        .find_map(|line| {
            // "... mount-point options ... - fstype source super-options"
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .ok_or_else(|| {
            Error::Usage("no cgroup2 file system is mounted; killswitch needs cgroup v2".into())
        })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.by_ref().take(3).collect();
            if let Ok(byte) = u8::from_str_radix(&digits, 8) {
                out.push(byte as char);
                continue;
            }
            out.push('\\');
            out.push_str(&digits);
        } else {
            out.push(c);
        }
    }
    out
}

/// Like `systemd-escape --path` (`/` becomes `-`, anything unusual `\xNN`, the root is `-`), but
/// `.` is escaped too: bpffs refuses names that contain a dot.
pub fn escape_path(relative: &Path) -> String {
    // The raw bytes: a lossy UTF-8 view would give \xff, \xfe and U+FFFD one name.
    let text = relative.as_os_str().as_bytes();
    let start = text.iter().position(|&b| b != b'/').unwrap_or(text.len());
    let end = text
        .iter()
        .rposition(|&b| b != b'/')
        .map_or(start, |i| i + 1);
    let text = &text[start..end.max(start)];
    if text.is_empty() {
        return "-".into();
    }
    let mut out = String::new();
    for &byte in text {
        match byte {
            b'/' => out.push('-'),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b':' | b'_' => out.push(byte as char),
            _ => out.push_str(&format!("\\x{byte:02x}")),
        }
    }
    out
}

pub fn unescape_path(name: &str) -> PathBuf {
    if name == "-" {
        return PathBuf::new();
    }
    let mut bytes = Vec::new();
    let raw = name.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'-' {
            bytes.push(b'/');
        } else if raw[i] == b'\\' && i + 3 < raw.len() && raw[i + 1] == b'x' {
            if let Ok(byte) = u8::from_str_radix(&name[i + 2..i + 4], 16) {
                bytes.push(byte);
                i += 4;
                continue;
            }
            bytes.push(raw[i]);
        } else {
            bytes.push(raw[i]);
        }
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from_vec(bytes))
}

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there yet.
pub fn ensure_bpffs() -> Result<()> {
    let mounted = nix::sys::statfs::statfs(BPFFS_MOUNT)
        .map(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if mounted {
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
        let dir = &scope.pin_dir;
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
    fn one_cgroup_one_name_and_one_name_one_cgroup() {
        use std::ffi::OsStr;
        let names: Vec<String> = [&b"ks\xff"[..], b"ks\xfe", "ks\u{fffd}".as_bytes()]
            .iter()
            .map(|raw| escape_path(Path::new(OsStr::from_bytes(raw))))
            .collect();
        assert_eq!(names, ["ks\\xff", "ks\\xfe", "ks\\xef\\xbf\\xbd"]);
        for name in &names {
            assert_eq!(
                escape_path(&unescape_path(name)),
                *name,
                "round trip of {name}"
            );
        }
        let same: Vec<String> = ["a/b", "a//b", "a/./b", "a/b/"]
            .iter()
            .map(|p| Scope::from_arg(Some(Path::new(p))).unwrap().name)
            .collect();
        assert!(same.iter().all(|n| n == "a-b"), "{same:?}");
    }

    #[test]
    fn escaping_round_trips_like_systemd_escape() {
        for (path, name) in [
            ("", "-"),
            ("system.slice", "system\\x2eslice"),
            (
                "system.slice/openvpn-client@work.service",
                "system\\x2eslice-openvpn\\x2dclient\\x40work\\x2eservice",
            ),
            ("kstest-1/app", "kstest\\x2d1-app"),
            (".hidden", "\\x2ehidden"),
        ] {
            assert_eq!(escape_path(Path::new(path)), name, "escape {path}");
            assert_eq!(unescape_path(name), PathBuf::from(path), "unescape {name}");
        }
    }

    #[test]
    fn mountinfo_octal_escapes_are_decoded() {
        assert_eq!(
            unescape_mountinfo("/sys/fs/cgroup\\040x"),
            "/sys/fs/cgroup x"
        );
    }
}
