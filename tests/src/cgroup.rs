//! Child cgroups (never the root) removed on drop, with every process left in them killed.

use std::{path::PathBuf, time::Duration};

pub struct Cgroup {
    /// Absolute path.
    pub path: PathBuf,
    /// Relative to the cgroup2 mount, as `--cgroup` takes it.
    pub relative: String,
}

impl Cgroup {
    pub fn new() -> Cgroup {
        let mount = killswitch_cgroup2_mount();
        let relative = crate::unique_name("kstest");
        let path = mount.join(&relative);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup { path, relative }
    }

    /// A child cgroup of this one (for nested scopes).
    pub fn child(&self, name: &str) -> Cgroup {
        let path = self.path.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup {
            path,
            relative: format!("{}/{name}", self.relative),
        }
    }

    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Waits (at most `limit`) until no process is left in the cgroup: what other test threads
    /// started while this process was in it ends on its own instead of being killed.
    pub fn wait_empty(&self, limit: Duration) {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            let events =
                std::fs::read_to_string(self.path.join("cgroup.events")).unwrap_or_default();
            if !events.lines().any(|l| l == "populated 1") {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Cgroup::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes in a cgroup we created are ours; cgroup.kill ends them all at once (in
        // the cgroups below too, such as the ones `killswitch run` makes).
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        remove_tree(&self.path);
    }
}

/// Removes a cgroup and the cgroups below it, deepest first.
fn remove_tree(path: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("warning: could not remove cgroup {}", path.display());
}

/// The cgroup2 mount point from /proc/self/mountinfo.
pub fn killswitch_cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .expect("a cgroup2 mount")
}
