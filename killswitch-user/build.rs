//! Builds the kernel programs (`killswitch-ebpf`, its own workspace) for `bpfel-unknown-none` and
//! leaves the object in `OUT_DIR/killswitch.bpf.o` for `include_bytes_aligned!`.

use std::{
    env,
    path::{Path, PathBuf},
    process::{exit, Command},
};

/// Variables cargo hands to build scripts that would override the eBPF crate's own cargo config.
const INHERITED_VARS: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "RUSTC_BOOTSTRAP",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
];

const SETUP_HINT: &str = "run `cargo xtask setup` to install it";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let ebpf_dir = manifest_dir.join("../killswitch-ebpf");
    let common_dir = manifest_dir.join("../killswitch-common");
    for path in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        ebpf_dir.join(".cargo/config.toml"),
        common_dir.join("src"),
        common_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    if let Err(missing) = check_toolchain() {
        // One line the user can act on instead of a wall of linker errors.
        eprintln!("error: the eBPF toolchain is missing ({missing}); {SETUP_HINT}");
        exit(1);
    }

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let target_dir = out_dir.join("ebpf-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(&ebpf_dir)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir);
    for var in INHERITED_VARS {
        build.env_remove(var);
    }
    let status = build.status().unwrap_or_else(|error| {
        eprintln!("error: cannot run cargo for the eBPF crate: {error}");
        exit(1);
    });
    if !status.success() {
        eprintln!("error: building the eBPF programs failed (see above)");
        exit(1);
    }
    let object = target_dir.join("bpfel-unknown-none/release/killswitch");
    let bytes = std::fs::read(&object).unwrap_or_else(|error| {
        eprintln!("error: cannot read {}: {error}", object.display());
        exit(1);
    });
    std::fs::write(out_dir.join("killswitch.bpf.o"), &bytes).unwrap_or_else(|error| {
        eprintln!("error: cannot copy {}: {error}", object.display());
        exit(1);
    });
    // The FNV-1a state of the bytes just written, for `reuse::build`: hashing its 2 MB at
    // every `up` cost milliseconds and a page fault per 4 KiB.
    let fnv = fnv(0xcbf2_9ce4_8422_2325, &bytes);
    std::fs::write(
        out_dir.join("object_fnv.rs"),
        format!(
            "/// FNV-1a of the object's bytes (build.rs).\npub const OBJECT_FNV: u64 = {fnv:#x};\n"
        ),
    )
    .unwrap_or_else(|error| {
        eprintln!("error: cannot write object_fnv.rs: {error}");
        exit(1);
    });
}

/// FNV-1a (64 bits) of `bytes`, continuing from `hash`.
fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Debian's `rustc-web` with the BPF `core`, and `bpf-linker`, as `cargo xtask setup` installs.
fn check_toolchain() -> Result<(), &'static str> {
    let rustc = Path::new("/usr/bin/rustc");
    if !rustc.exists() {
        return Err("/usr/bin/rustc from Debian's rustc-web");
    }
    let libdir = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", "bpfel-unknown-none"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    let has_core = libdir
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .is_some_and(|mut entries| {
            entries.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libcore")))
        });
    if !has_core {
        return Err("the BPF `core` library from libstd-rust-web-dev-bpf");
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|out| out.status.success()) {
        return Err("bpf-linker");
    }
    Ok(())
}
