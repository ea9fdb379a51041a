//! Scopes: a cgroup v2 directory whose sockets the policy governs. Where a backend keeps a
//! scope's state is the backend's business (eBPF: `ebpf::pins`).

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::{
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// Absolute path of the cgroup directory.
    pub cgroup: PathBuf,
    /// Path relative to the cgroup2 mount; empty for the root (system-wide).
    pub relative: PathBuf,
    /// `systemd-escape --path` of `relative`; `-` for the root.
    pub name: String,
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
        }
    }

    /// The scope whose name (`systemd-escape --path` of its cgroup) is `name`.
    pub fn from_name(name: &str) -> Result<Scope> {
        let relative = unescape_path(name);
        Ok(Scope {
            cgroup: cgroup2_mount()?.join(&relative),
            relative,
            name: name.to_owned(),
        })
    }

    /// The cgroup's id as BPF sees it (`bpf_skb_cgroup_id`): the directory's inode number.
    pub fn cgroup_id(&self) -> Result<u64> {
        let meta = std::fs::metadata(&self.cgroup)
            .map_err(|e| Error::io("cannot open the cgroup", &self.cgroup, e))?;
        Ok(meta.ino())
    }

    /// The cgroup2 root: the whole machine.
    pub fn is_system_wide(&self) -> bool {
        self.relative.as_os_str().is_empty()
    }

    pub fn display_cgroup(&self) -> String {
        if self.relative.as_os_str().is_empty() {
            format!("{} (system-wide)", self.cgroup.display())
        } else {
            self.cgroup.display().to_string()
        }
    }
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
            let hex = name.get(i + 2..i + 4).unwrap_or_default();
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
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
