//! A brand-new machine has only a stock Rust toolchain. `cargo xtask setup` is what installs the
//! eBPF toolchain, so xtask itself must build and start without Debian's `rustc-web` and without
//! `bpf-linker` (it once depended on the library, whose build script needs both).

use std::{path::Path, process::Command};

use testbed::require_root;

#[test]
fn xtask_builds_and_starts_without_the_ebpf_toolchain() {
    require_root!();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::temp_dir().join(testbed::unique_name("ksxtask"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // In a private mount namespace, hide Debian's compiler and cargo and bpf-linker behind
    // /dev/null (the host's files are untouched), prove they are gone, then build and start xtask.
    let script = r#"
        set -e
        for f in /usr/bin/rustc /usr/bin/cargo /usr/bin/rustdoc "$(command -v bpf-linker || true)"; do
            if [ -n "$f" ] && [ -e "$f" ] && [ "$f" != "$CARGO_UNDER_TEST" ]; then mount --bind /dev/null "$f"; fi
        done
        if /usr/bin/rustc --version >/dev/null 2>&1; then echo "rustc-web still usable" >&2; exit 90; fi
        if bpf-linker --version >/dev/null 2>&1; then echo "bpf-linker still usable" >&2; exit 90; fi
        timeout 600 "$CARGO_UNDER_TEST" build --quiet --locked -p xtask --target-dir "$TARGET"
        "$TARGET/debug/xtask" --help
    "#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .current_dir(&workspace)
        .env("CARGO_UNDER_TEST", &cargo)
        .env("TARGET", &target)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .output()
        .expect("cannot run unshare");
    let _ = std::fs::remove_dir_all(&target);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "xtask does not build without the eBPF toolchain:\n{stdout}{stderr}"
    );
    for task in ["setup", "demo", "test", "bench"] {
        assert!(stdout.contains(task), "xtask --help lacks {task}: {stdout}");
    }
}
