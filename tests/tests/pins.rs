//! bpffs: a pin directory or pinned object that someone else made or can change is refused,
//! with the fix in the message, and a scope is never enforced through it.

use std::os::unix::fs::PermissionsExt;

use testbed::{process::killswitch, require_root, Cgroup, Netns, PinRoot};

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("killswitch.toml");
    testbed::write_config(&path, "tunnels = [\"tun0\"]\n");
    path
}

#[test]
fn pin_directories_and_objects_others_could_have_made_are_refused() {
    require_root!();
    let netns = Netns::new("p");
    netns.ip(&[
        "link", "add", "tun0", "type", "veth", "peer", "name", "tun0p",
    ]);
    let pins = PinRoot::new();
    let cgroup = Cgroup::new();
    let dir = testbed::private_dir("kspins");
    let config = config(&dir);
    let up = || {
        killswitch(
            &netns,
            &pins,
            &[
                "--config",
                config.to_str().unwrap(),
                "up",
                "--cgroup",
                &cgroup.relative,
            ],
        )
    };
    let scope_dir = pins.path.join(cgroup.relative.replace('/', "-"));

    // A scope directory writable by others.
    std::fs::create_dir(&scope_dir).unwrap();
    std::fs::set_permissions(&scope_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = up();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("writable by group or others") && stderr.contains("rm -r"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // Owned by another user.
    std::fs::set_permissions(&scope_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&scope_dir, Some(65534), Some(65534)).unwrap();
    let stderr = String::from_utf8_lossy(&up().stderr).into_owned();
    assert!(stderr.contains("owned by uid 65534"), "{stderr}");

    // A symlink in place of the directory.
    std::fs::remove_dir(&scope_dir).unwrap();
    std::os::unix::fs::symlink(&dir, &scope_dir).unwrap();
    let stderr = String::from_utf8_lossy(&up().stderr).into_owned();
    assert!(stderr.contains("is a symlink"), "{stderr}");
    std::fs::remove_file(&scope_dir).unwrap();

    // A clean directory works, and its pins are root's only.
    let out = up();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&scope_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let _ = std::fs::remove_dir_all(&dir);
}
