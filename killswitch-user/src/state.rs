//! Where killswitch keeps its run-time state outside bpffs (the nftables backend's locks and
//! marks, `run`'s lock, the registered VPN clients): `/run/killswitch`, or
//! `KILLSWITCH_STATE_DIR` (tests use their own).

use std::{
    fs::File,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};

pub fn dir() -> PathBuf {
    std::env::var_os("KILLSWITCH_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/killswitch"))
}

/// Makes `dir` (and what is missing above it) readable by root alone.
pub fn make_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("cannot create", dir, e))
}

/// Takes the exclusive lock on the file at `path` (made, with its directory, if missing);
/// waits for another holder.
pub fn lock(path: &Path) -> Result<Flock<File>> {
    if let Some(parent) = path.parent() {
        make_dir(parent)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("cannot open", path, e))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io("cannot lock", path, e.into()))
}
