//! A private bpffs pin root (`KILLSWITCH_PIN_ROOT`) and a private state directory for the
//! nftables backend (`KILLSWITCH_STATE_DIR`), removed with everything in them on drop.

use std::path::{Path, PathBuf};

pub struct PinRoot {
    pub path: PathBuf,
    /// For the nftables backend's locks and marks; killswitch creates it when it needs it.
    pub state: PathBuf,
}

impl PinRoot {
    pub fn new() -> PinRoot {
        ensure_bpffs();
        let path = Path::new("/sys/fs/bpf").join(crate::unique_name("kstest"));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let state = Path::new("/run").join(crate::unique_name("ksstate"));
        PinRoot { path, state }
    }
}

impl Default for PinRoot {
    fn default() -> Self {
        PinRoot::new()
    }
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs() {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
    if !mounted {
        crate::run("mount", &["-t", "bpf", "bpffs", "/sys/fs/bpf"]);
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        // Unpinning a link detaches it (nothing else holds it once our processes are gone).
        let _ = remove_tree(&self.path);
        let _ = remove_tree(&self.state);
    }
}

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        // Never through a symlink: it may point anywhere.
        if std::fs::symlink_metadata(&path)?.is_dir() {
            remove_tree(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    std::fs::remove_dir(dir)
}
