//! The Debian package `cargo xtask dist` makes (by `ks-dist`), unpacked into a scratch root:
//! every file where the package says, with its mode and owner; the config a conffile; the units
//! starting the packaged binary; and the installed binary runs `--version` and `check` on the
//! shipped example.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use testbed::process::{cargo_executables, killswitch_bin};

/// A private directory under /run, removed however the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn output(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The package, built from the binary under test.
fn build_package(out: &Path) -> PathBuf {
    let packager = cargo_executables(&["build", "-p", "killswitch-tests", "--bin", "ks-dist"])
        .into_iter()
        .find(|(name, _)| name == "ks-dist")
        .expect("cargo built ks-dist")
        .1;
    let printed = output(Command::new(packager).arg(killswitch_bin()).arg(out));
    PathBuf::from(printed.trim())
}

#[test]
fn the_package_installs_every_file_with_its_mode_and_runs() {
    testbed::require_root!();
    let scratch = Scratch(testbed::private_dir("ksdist"));
    let deb = build_package(&scratch.0);
    let root = scratch.0.join("root");
    output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));

    // The control data: the config is a conffile; no maintainer scripts enforce anything.
    let control = scratch.0.join("control");
    output(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles, "/etc/killswitch/killswitch.toml\n");
    let mut members: Vec<String> = std::fs::read_dir(&control)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    members.sort();
    assert_eq!(
        members,
        ["conffiles", "control", "md5sums"],
        "maintainer scripts or triggers in the package"
    );
    let fields = output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .args(["Package", "Version", "Depends"]),
    );
    assert!(fields.contains("Package: killswitch"), "{fields}");
    assert!(
        fields.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{fields}"
    );
    assert!(fields.contains("Depends: libc6 (>= 2."), "{fields}");

    // Owners and modes as the archive holds them: root's; directories 0755, the binary 0755,
    // the config 0600, everything else 0644.
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for line in listing.lines() {
        assert!(line.contains(" root/root "), "not root's: {line}");
        let mode = line.split_whitespace().next().unwrap();
        let wanted = if line.ends_with('/') {
            "drwxr-xr-x"
        } else if line.ends_with(" ./usr/bin/killswitch") {
            "-rwxr-xr-x"
        } else if line.ends_with(" ./etc/killswitch/killswitch.toml") {
            "-rw-------"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(mode, wanted, "{line}");
    }
    let entry = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" ./{path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(entry("usr/bin/killswitch"), "-rwxr-xr-x");
    assert_eq!(entry("etc/killswitch/killswitch.toml"), "-rw-------");
    assert_eq!(entry("lib/systemd/system/killswitch.service"), "-rw-r--r--");

    // A man page for the command and for every subcommand, and the config's page.
    let man = root.join("usr/share/man");
    let command = killswitch::cli::command();
    let mut pages = vec!["man1/killswitch.1.gz".to_owned()];
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.push(format!("man1/killswitch-{}.1.gz", sub.get_name()));
        for verb in sub.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = format!("{}-{}", sub.get_name(), verb.get_name());
            pages.push(format!("man1/killswitch-{name}.1.gz"));
        }
    }
    pages.push("man5/killswitch.toml.5.gz".to_owned());
    for page in &pages {
        let path = man.join(page);
        assert_eq!(mode(&path), 0o644, "{page}");
        let text = output(Command::new("zcat").arg(&path));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }

    // Completions for three shells, each naming a subcommand.
    for path in [
        "usr/share/bash-completion/completions/killswitch",
        "usr/share/zsh/vendor-completions/_killswitch",
        "usr/share/fish/vendor_completions.d/killswitch.fish",
    ] {
        let text = std::fs::read_to_string(root.join(path)).unwrap();
        assert!(text.contains("verify"), "{path} does not complete `verify`");
    }

    // The units start the packaged binary (not the source install's) and are not enabled.
    for unit in ["killswitch.service", "killswitch-daemon.service"] {
        let text = std::fs::read_to_string(root.join("lib/systemd/system").join(unit)).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/killswitch "), "{unit}");
        assert!(!text.contains("/usr/local/"), "{unit}");
    }
    assert!(!root.join("etc/systemd").exists(), "a unit is enabled");

    // The installed binary runs, and accepts the example it ships.
    let binary = root.join("usr/bin/killswitch");
    let version = output(Command::new(&binary).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("killswitch {}", env!("CARGO_PKG_VERSION"))
    );
    let config = root.join("etc/killswitch/killswitch.toml");
    assert_eq!(mode(&config), 0o600);
    output(
        Command::new(&binary)
            .arg("--config")
            .arg(&config)
            .arg("check"),
    );

    // lintian: no errors. Its warnings are listed in docs/install.md.
    let lintian = Command::new("lintian")
        .args(["--fail-on", "error"])
        .arg(&deb)
        .output()
        .expect("lintian is missing: run `cargo xtask setup`");
    let report = String::from_utf8_lossy(&lintian.stdout);
    assert!(
        lintian.status.success(),
        "lintian failed: {report}{}",
        String::from_utf8_lossy(&lintian.stderr)
    );
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian: {errors:#?}");
    let known = ["non-standard-file-perm 0600 != 0644 [etc/killswitch/killswitch.toml]"];
    for warning in report.lines().filter(|l| l.starts_with("W:")) {
        assert!(
            known.iter().any(|k| warning.ends_with(k)),
            "a lintian warning not listed in docs/install.md: {warning}"
        );
    }
}
