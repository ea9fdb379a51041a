//! The test bed: network namespaces, child cgroups and bpffs pin directories owned by Drop
//! guards, processes started inside a cgroup + namespace, echo servers, and the OpenVPN lab used
//! by the end-to-end tests and by `cargo xtask demo`, other kernels booted in qemu, and a Debian
//! root booted with systemd-nspawn.
//!
//! Safety rules (shared/TESTBED.md): nothing here touches the root network namespace, the host's
//! cgroup2 root or its firewall; every wait is bounded; only our own processes are killed.

pub mod boot;
pub mod capture;
pub mod cgroup;
pub mod demo;
pub mod dns;
pub mod echo;
pub mod lab;
pub mod net;
pub mod netns;
pub mod packets;
pub mod pins;
pub mod process;
pub mod random;
pub mod story;
pub mod vm;
pub mod wire;

use std::sync::atomic::{AtomicU32, Ordering};

pub use cgroup::Cgroup;
pub use netns::Netns;
pub use pins::PinRoot;

/// A name unique to this process and call, for namespaces, cgroups and pin directories.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command to completion; panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether this process can do what the tests need (root: namespaces, cgroups, BPF).
pub fn privileged() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Skips a test with a printed reason when it cannot run here.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::privileged() {
            eprintln!("SKIPPED: needs root (namespaces, cgroups, BPF)");
            return;
        }
    };
}

/// A new private directory for config files: root's, mode 0700, under /run, whose ancestors
/// only root can write. killswitch refuses a config anywhere else (/tmp is 1777). The caller
/// removes it.
pub fn private_dir(prefix: &str) -> std::path::PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let path = std::path::Path::new("/run").join(unique_name(prefix));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    path
}

/// Writes a config file the way killswitch accepts it: mode 0600 (owned by root, as we are).
/// Written beside `path` and renamed over it, so a reader never sees half a file.
pub fn write_config(path: &std::path::Path, text: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).unwrap();
    std::fs::set_permissions(
        &temporary,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::rename(&temporary, path).unwrap();
}
