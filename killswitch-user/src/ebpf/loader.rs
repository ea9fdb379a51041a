//! An aya loader made without reading the kernel's BTF.
//!
//! aya 0.14's `EbpfLoader::new` always reads and parses `/sys/kernel/btf/vmlinux` (5 MB on
//! 6.18; about 20 ms of CPU and 13 MB of memory), which aya uses only for CO-RE relocations;
//! this object has none (a test below holds that). aya offers no way to skip the parse (0.15
//! reads it when needed, but needs a newer Rust), so the loader is made on a thread that looks
//! from an empty directory for the moment: the file is not there, and aya goes without.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
};

use aya::EbpfLoader;
use nix::{
    sched::{unshare, CloneFlags},
    unistd::{chroot, fchdir},
};

use crate::error::{Error, Result};

/// `EbpfLoader::new` without the kernel's BTF, made while the calling thread's root is `empty`
/// (a directory without `sys/kernel/btf/vmlinux`). The thread gets a root and working
/// directory of its own (`unshare(CLONE_FS)`): no other thread of the process sees the change.
/// On an error the thread's root may be left elsewhere: the caller gives up the early load and
/// ends the thread (what it removes on the way is named by an absolute path in `empty`'s
/// parent, which does not resolve from `empty`).
pub fn without_kernel_btf(empty: &Path) -> Result<EbpfLoader<'static>> {
    let failed = |what: &str, e: nix::Error| Error::Runtime(format!("{what}: {e}"));
    // What the caller removes after an error is then named by an absolute path too.
    if !empty.is_absolute() {
        return Err(Error::Runtime(format!(
            "{} is not absolute",
            empty.display()
        )));
    }
    let root = File::open("/").map_err(|e| Error::io("cannot open", Path::new("/"), e))?;
    let cwd = File::open(".").map_err(|e| Error::io("cannot open", Path::new("."), e))?;
    // Without its own fs_struct the thread would move the whole process's root.
    unshare(CloneFlags::CLONE_FS).map_err(|e| failed("unshare(CLONE_FS)", e))?;
    chroot(empty).map_err(|e| failed("chroot", e))?;
    let loader = EbpfLoader::new();
    fchdir(root.as_raw_fd()).map_err(|e| failed("fchdir to the root", e))?;
    chroot(".").map_err(|e| failed("chroot back", e))?;
    fchdir(cwd.as_raw_fd()).map_err(|e| failed("fchdir back", e))?;
    // The thread is back where it was, or it goes no further.
    let back = std::fs::metadata("/").map_err(|e| Error::io("cannot read", Path::new("/"), e))?;
    let was = root
        .metadata()
        .map_err(|e| Error::io("cannot read", Path::new("/"), e))?;
    if (back.dev(), back.ino()) != (was.dev(), was.ino()) {
        return Err(Error::Runtime("the thread's root did not come back".into()));
    }
    Ok(loader)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Skipping the kernel's BTF is sound only while the object has no CO-RE relocation.
    #[test]
    fn the_object_needs_no_kernel_btf() {
        let object = aya_obj::Object::parse(super::super::OBJECT).expect("the object parses");
        assert!(!object.has_btf_relocations());
    }

    #[test]
    fn the_loader_has_no_kernel_btf_and_the_thread_comes_back() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: chroot needs root");
            return;
        }
        let empty = std::env::temp_dir().join(format!("ks-empty-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let before = std::env::current_dir().unwrap();
        let empty_in_thread = empty.clone();
        let (debug, after, root_ok) = std::thread::spawn(move || {
            let loader = without_kernel_btf(&empty_in_thread).unwrap();
            (
                format!("{loader:?}"),
                std::env::current_dir().unwrap(),
                Path::new("/proc/self").exists(),
            )
        })
        .join()
        .unwrap();
        std::fs::remove_dir(&empty).unwrap();
        assert!(
            debug.contains("btf: None"),
            "{}",
            &debug[..debug.len().min(200)]
        );
        assert_eq!(after, before);
        assert!(root_ok);
        // The other threads never moved.
        assert!(Path::new("/proc/self").exists());
        assert_eq!(std::env::current_dir().unwrap(), before);
    }
}
