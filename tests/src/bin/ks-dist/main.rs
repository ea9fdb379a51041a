//! `ks-dist KILLSWITCH OUT_DIR`: the Debian package, made by `cargo xtask dist`.
//!
//! Stages the binary in /usr/bin, a man page per command generated from the clap definitions
//! plus killswitch.toml(5), bash/zsh/fish completions generated the same way, the systemd units
//! (installed, not enabled, starting /usr/bin/killswitch) and the commented example config as a
//! conffile (root, 0600), then builds `OUT_DIR/killswitch_VERSION_ARCH.deb` with `dpkg-deb`.
//! No maintainer scripts: installing never enforces anything by itself.

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap_complete::Shell;

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where the units go: Debian 12's systemd path (13 reads it too).
const UNIT_DIR: &str = "lib/systemd/system";
const CONFIG: &str = "etc/killswitch/killswitch.toml";
const EXAMPLE_CONFIG: &str = include_str!("../../../../dist/killswitch.toml");
const CONFIG_PAGE: &str = include_str!("../../../../dist/killswitch.toml.5");
const UNITS: [(&str, &str); 2] = [
    (
        "killswitch.service",
        include_str!("../../../../dist/systemd/killswitch.service"),
    ),
    (
        "killswitch-daemon.service",
        include_str!("../../../../dist/systemd/killswitch-daemon.service"),
    ),
];
/// The path the units name for a build from source (`make install`-style, README).
const SOURCE_INSTALL: &str = "/usr/local/bin/killswitch";

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [bin, out] = args.as_slice() else {
        eprintln!("usage: ks-dist KILLSWITCH OUT_DIR (run by `cargo xtask dist`)");
        return ExitCode::from(2);
    };
    match package(bin, out) {
        Ok(deb) => {
            println!("{}", deb.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("ks-dist: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The staging tree: a new directory of this process's (creating it fails rather than follow
/// anything already there), removed however packaging ends.
struct Stage(PathBuf);

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn package(bin: &Path, out: &Path) -> Result<PathBuf> {
    let stage = out.join(format!("deb-root-{}", std::process::id()));
    std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
        .create(&stage)
        .with_context(|| format!("cannot create {}", stage.display()))?;
    let stage = Stage(stage);
    let stage = stage.0.as_path();
    let binary = stage.join("usr/bin/killswitch");
    put(
        &binary,
        &fs::read(bin).context("the killswitch binary")?,
        0o755,
    )?;
    run(Command::new("strip").arg("--strip-unneeded").arg(&binary))?;

    let man1 = stage.join("usr/share/man/man1");
    fs::create_dir_all(&man1)?;
    // The version on every page's title line, not only the top command's.
    let command = killswitch::cli::command().propagate_version(true);
    clap_mangen::generate_to(command, &man1).context("man pages")?;
    let man5 = stage.join("usr/share/man/man5/killswitch.toml.5");
    put(&man5, CONFIG_PAGE.as_bytes(), 0o644)?;
    for page in fs::read_dir(&man1)?
        .flatten()
        .map(|e| e.path())
        .chain([man5])
    {
        gzip(&page)?;
        // clap_mangen made the page with the umask's mode.
        let mut compressed = page.into_os_string();
        compressed.push(".gz");
        fs::set_permissions(&compressed, fs::Permissions::from_mode(0o644))?;
    }

    let completions = [
        (
            Shell::Bash,
            "usr/share/bash-completion/completions/killswitch",
        ),
        (Shell::Zsh, "usr/share/zsh/vendor-completions/_killswitch"),
        (
            Shell::Fish,
            "usr/share/fish/vendor_completions.d/killswitch.fish",
        ),
    ];
    for (shell, path) in completions {
        let mut script = Vec::new();
        clap_complete::generate(
            shell,
            &mut killswitch::cli::command(),
            "killswitch",
            &mut script,
        );
        put(&stage.join(path), &script, 0o644)?;
    }

    for (name, text) in UNITS {
        if !text.contains(SOURCE_INSTALL) {
            bail!("{name} does not start {SOURCE_INSTALL}: the package path would not match");
        }
        let unit = text.replace(SOURCE_INSTALL, "/usr/bin/killswitch");
        put(&stage.join(UNIT_DIR).join(name), unit.as_bytes(), 0o644)?;
    }
    put(&stage.join(CONFIG), EXAMPLE_CONFIG.as_bytes(), 0o600)?;

    let doc = stage.join("usr/share/doc/killswitch");
    put(&doc.join("copyright"), copyright().as_bytes(), 0o644)?;
    // A native package (no Debian revision): its changelog is changelog.gz.
    put(&doc.join("changelog"), changelog().as_bytes(), 0o644)?;
    gzip(&doc.join("changelog"))?;

    let control = control(stage, &binary)?;
    put(&stage.join("DEBIAN/control"), control.as_bytes(), 0o644)?;
    put(
        &stage.join("DEBIAN/conffiles"),
        format!("/{CONFIG}\n").as_bytes(),
        0o644,
    )?;
    let md5sums = md5sums(stage)?;
    put(&stage.join("DEBIAN/md5sums"), md5sums.as_bytes(), 0o644)?;
    directories_readable(stage)?;

    let deb = out.join(format!("killswitch_{VERSION}_{}.deb", architecture()?));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(stage)
        .arg(&deb))?;
    Ok(deb)
}

/// Writes `data` to `path` (making its directories) with `mode`.
fn put(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Compresses `path` in place into `path.gz`, reproducibly (no name, no time stamp).
fn gzip(path: &Path) -> Result<()> {
    run(Command::new("gzip").args(["-9nf"]).arg(path))
}

fn run(command: &mut Command) -> Result<()> {
    output(command).map(drop)
}

/// What `command` printed, when it succeeded; its error output otherwise.
fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn architecture() -> Result<String> {
    output(Command::new("dpkg").arg("--print-architecture"))
}

/// The highest glibc symbol version the binary needs: its dependency on libc6.
fn glibc_needed(binary: &Path) -> Result<String> {
    let symbols = output(Command::new("objdump").arg("-T").arg(binary))?;
    let mut highest: Option<(Vec<u32>, String)> = None;
    for version in symbols.split_whitespace().filter_map(|w| {
        w.strip_prefix("(GLIBC_")
            .or_else(|| w.strip_prefix("GLIBC_"))
    }) {
        let version = version.trim_end_matches(')');
        let Ok(parts) = version
            .split('.')
            .map(str::parse::<u32>)
            .collect::<std::result::Result<Vec<_>, _>>()
        else {
            continue;
        };
        if highest.as_ref().is_none_or(|(best, _)| parts > *best) {
            highest = Some((parts, version.to_owned()));
        }
    }
    highest
        .map(|(_, version)| version)
        .context("the binary names no glibc version")
}

/// What dpkg-gencontrol counts: each file's size in KiB rounded up, and 1 per directory.
fn installed_kib(dir: &Path) -> Result<u64> {
    let mut kib = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() == "DEBIAN" {
            continue;
        }
        let meta = entry.metadata()?;
        kib += if meta.is_dir() {
            1 + installed_kib(&entry.path())?
        } else {
            meta.len().div_ceil(1024)
        };
    }
    Ok(kib)
}

fn control(stage: &Path, binary: &Path) -> Result<String> {
    let installed_kib = installed_kib(stage)?;
    let mut control = String::new();
    writeln!(control, "Package: killswitch")?;
    writeln!(control, "Version: {VERSION}")?;
    writeln!(control, "Architecture: {}", architecture()?)?;
    writeln!(
        control,
        "Maintainer: killswitch developers <killswitch@example.org>"
    )?;
    writeln!(control, "Installed-Size: {installed_kib}")?;
    // libgcc_s: Rust's unwinder (the binary links it beside libc).
    writeln!(
        control,
        "Depends: libc6 (>= {}), libgcc-s1",
        glibc_needed(binary)?
    )?;
    writeln!(control, "Recommends: nftables")?;
    writeln!(control, "Suggests: openvpn | wireguard-tools")?;
    writeln!(control, "Section: net")?;
    writeln!(control, "Priority: optional")?;
    writeln!(control, "Homepage: https://example.org/killswitch")?;
    writeln!(
        control,
        "Description: VPN kill switch that fails closed\n \
         killswitch lets a machine (or selected apps) reach the network only through the\n \
         VPN tunnel and the VPN servers, plus the LAN, DHCP, NTP and DNS exceptions you\n \
         configure, with eBPF programs on a cgroup v2 scope; the same policy runs as an\n \
         nftables table where eBPF cannot. It keeps up with tunnels that come and go and\n \
         servers that change, and stays in force when its daemon dies.\n \
         .\n \
         Installing enforces nothing: edit /etc/killswitch/killswitch.toml, then run\n \
         `killswitch up` or enable killswitch.service."
    )?;
    Ok(control)
}

fn md5sums(stage: &Path) -> Result<String> {
    let mut files = Vec::new();
    collect_files(stage, &mut files)?;
    files.sort();
    let mut sums = String::new();
    for file in files {
        let relative = file.strip_prefix(stage)?;
        // Conffiles are not listed (dpkg keeps their sums itself).
        if relative.starts_with("DEBIAN") || relative == Path::new(CONFIG) {
            continue;
        }
        let sum = output(Command::new("md5sum").arg(&file))?;
        let sum = sum.split_whitespace().next().unwrap_or_default();
        writeln!(sums, "{sum}  {}", relative.display())?;
    }
    Ok(sums)
}

fn collect_files(dir: &Path, into: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, into)?;
        } else {
            into.push(path);
        }
    }
    Ok(())
}

/// Every directory 0755, whatever the umask made it.
fn directories_readable(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            directories_readable(&path)?;
        }
    }
    Ok(())
}

fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
     Upstream-Name: killswitch\n\
     \n\
     Files: *\n\
     Copyright: 2026 the killswitch developers\n\
     License: GPL-2+\n \
     This program is free software; you can redistribute it and/or modify it under the\n \
     terms of the GNU General Public License as published by the Free Software\n \
     Foundation; either version 2 of the License, or (at your option) any later version.\n \
     .\n \
     On Debian systems, the complete text of the GNU General Public License version 2\n \
     can be found in /usr/share/common-licenses/GPL-2.\n"
        .to_owned()
}

fn changelog() -> String {
    format!(
        "killswitch ({VERSION}) unstable; urgency=medium\n\n  \
         * Built from source by `cargo xtask dist`.\n\n \
         -- killswitch developers <killswitch@example.org>  Tue, 01 Dec 2026 00:00:00 +0000\n"
    )
}
