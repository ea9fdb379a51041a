//! bpffs: a pin directory that someone else could have made or can change (a symlink, another
//! owner, writable by others) is never used. At `up` it is moved aside and made anew, so such a
//! plant cannot keep the scope from being enforced; pinned objects are checked the same way.

use std::os::unix::fs::PermissionsExt;

use testbed::{process::killswitch, require_root, Cgroup, Netns, PinRoot};

#[test]
fn planted_pin_directories_are_moved_aside_and_the_scope_is_enforced() {
    require_root!();
    let bed = Bed::new("tunnels = [\"tun0\"]\n");
    let (pins, dir, run) = (&bed.pins, &bed.dir, |args: &[&str]| bed.run(args));
    let scope_dir = bed.scope_dir();
    let plants: [(&str, &dyn Fn()); 3] = [
        ("writable by group or others", &|| {
            std::fs::create_dir(&scope_dir).unwrap();
            std::fs::set_permissions(&scope_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        }),
        ("owned by uid 65534", &|| {
            std::fs::create_dir(&scope_dir).unwrap();
            std::os::unix::fs::chown(&scope_dir, Some(65534), Some(65534)).unwrap();
        }),
        ("is a symlink", &|| {
            std::os::unix::fs::symlink(&dir.0, &scope_dir).unwrap();
        }),
    ];
    for (problem, plant) in plants {
        plant();
        let out = run(&["up"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{problem}: {stderr}");
        assert!(
            stderr.contains(problem) && stderr.contains("moved it to"),
            "{stderr}"
        );
        let meta = std::fs::symlink_metadata(&scope_dir).unwrap();
        assert!(meta.is_dir() && meta.permissions().mode() & 0o777 == 0o700);
        assert!(run(&["status"]).status.success(), "{problem}: not enforced");
        let status = run(&["status", "--json"]);
        let scopes: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(scopes["scopes"].as_array().unwrap().len(), 1, "{scopes:#}");
        assert!(run(&["down"]).status.success());
    }
    // What was moved aside stays for inspection (and goes with the pin root).
    let aside = std::fs::read_dir(&pins.path)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("=refused=")
        })
        .count();
    assert_eq!(aside, 3);
}

/// A namespace with a tunnel, a scope, a pin root and a private config directory.
struct Bed {
    netns: Netns,
    pins: PinRoot,
    cgroup: Cgroup,
    dir: Removed,
    config: std::path::PathBuf,
}

impl Bed {
    fn new(config_text: &str) -> Bed {
        let netns = Netns::new("p");
        netns.ip(&[
            "link", "add", "tun0", "type", "veth", "peer", "name", "tun0p",
        ]);
        let dir = Removed(testbed::private_dir("kspins"));
        let config = dir.0.join("killswitch.toml");
        testbed::write_config(&config, config_text);
        Bed {
            netns,
            pins: PinRoot::new(),
            cgroup: Cgroup::new(),
            dir,
            config,
        }
    }

    /// `killswitch --config C ARGS --cgroup G` in the namespace.
    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["--config", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        all.extend(["--cgroup", &self.cgroup.relative]);
        killswitch(&self.netns, &self.pins, &all)
    }

    fn scope_dir(&self) -> std::path::PathBuf {
        self.pins.path.join(self.cgroup.relative.replace('/', "-"))
    }
}

/// A re-`up` of the same build in the same boot keeps the programs attached (only the maps
/// change, and the new policy is what `status` and the maps hold); once something else replaced
/// them, the next `up` loads this build's again.
#[test]
fn a_re_up_writes_the_maps_and_keeps_the_programs_unless_they_were_replaced() {
    require_root!();
    let bed = Bed::new("tunnels = [\"tun0\"]\n");
    let programs = || -> Vec<u64> {
        let status = bed.run(&["status", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        json["scopes"][0]["links"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["program_id"].as_u64().unwrap())
            .collect()
    };
    assert!(bed.run(&["up"]).status.success());
    let first = programs();
    assert_eq!(first.len(), 2);
    testbed::write_config(
        &bed.config,
        "tunnels = [\"tun0\"]\n[[server]]\naddress = \"198.51.100.3\"\nport = 51820\n",
    );
    assert!(bed.run(&["up"]).status.success());
    assert_eq!(programs(), first, "the same programs stay attached");
    let list = bed.run(&["servers", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&list.stdout),
        "198.51.100.3:51820\n"
    );

    // The ICMP-error slot emptied behind its back: the next `up` loads afresh and fills it.
    let slots = bed.scope_dir().join("ICMP_ERRORS");
    for slot in ["0", "1"] {
        let _ = std::process::Command::new("bpftool")
            .args(["map", "delete", "pinned", slots.to_str().unwrap()])
            .args(["key", slot, "0", "0", "0"])
            .output();
    }
    assert!(bed.run(&["up"]).status.success());
    let refilled = programs();
    assert!(
        refilled.iter().all(|id| !first.contains(id)),
        "new programs after the slot was emptied: {first:?} then {refilled:?}"
    );
    let first = refilled;

    // Replaced behind its back (as another version or a lockdown would): loaded afresh.
    let status = bed.run(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let link = json["scopes"][0]["links"][0]["link_id"].as_u64().unwrap();
    testbed::run("bpftool", &["link", "detach", "id", &link.to_string()]);
    assert!(bed.run(&["up"]).status.success());
    let again = programs();
    assert_eq!(again.len(), 2);
    assert!(
        again.iter().all(|id| !first.contains(id)),
        "new programs after a detach: {first:?} then {again:?}"
    );
    assert!(bed.run(&["down"]).status.success());
}

/// A re-`up` that changes long lists leaves exactly the new ones in the maps. It reads the old
/// entries back (in chunks of 4,096) to know what to remove: an entry the read missed would stay,
/// and keep a server reachable that the config no longer names. Half of each list is replaced.
#[test]
fn a_re_up_of_long_lists_leaves_exactly_the_new_ones() {
    require_root!();
    let server = |i: u32| std::net::Ipv4Addr::from(0xc612_0000u32 + i);
    let lan = |i: u32| format!("2001:db8:{i:x}::/48");
    let config = |servers: std::ops::Range<u32>, prefixes: std::ops::Range<u32>| {
        let mut text = String::from("tunnels = [\"tun0\"]\n[lan]\nnetworks = [");
        let quoted: Vec<String> = prefixes.map(|i| format!("\"{}\"", lan(i))).collect();
        text += &quoted.join(", ");
        text += "]\n";
        for i in servers {
            text += &format!(
                "[[server]]\naddress = \"{}\"\nport = 1194\nprotocol = \"udp\"\n",
                server(i)
            );
        }
        text
    };
    // 5,000 servers take two chunks; 4,096 prefixes fill one, and the end comes in a second.
    let bed = Bed::new(&config(0..5_000, 0..4_096));
    assert!(bed.run(&["up"]).status.success());
    testbed::write_config(&bed.config, &config(2_500..7_500, 2_048..6_144));
    let up = bed.run(&["up"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );

    let list = bed.run(&["servers", "list"]);
    let held: std::collections::BTreeSet<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let wanted: std::collections::BTreeSet<String> = (2_500..7_500)
        .map(|i| format!("{}:1194/udp", server(i)))
        .collect();
    assert_eq!(held.len(), wanted.len(), "servers held after the re-up");
    assert_eq!(held, wanted);
    // Counted by another reader too: `servers list` reads the map the same way `up` does.
    let dump = testbed::run(
        "bpftool",
        &[
            "-j",
            "map",
            "dump",
            "pinned",
            bed.scope_dir().join("SERVERS").to_str().unwrap(),
        ],
    );
    let entries: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(
        entries.as_array().map(Vec::len),
        Some(5_000),
        "SERVERS entries"
    );

    let status = bed.run(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let held: std::collections::BTreeSet<String> = json["scopes"][0]["exceptions"]["lan"]
        .as_array()
        .unwrap_or_else(|| panic!("no LAN list in {json}"))
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    let wanted: std::collections::BTreeSet<String> = (2_048..6_144).map(lan).collect();
    assert_eq!(held, wanted, "LAN prefixes held after the re-up");
    assert!(bed.run(&["down"]).status.success());
}

/// A cold `up` loads and verifies the programs while it reads the config, on maps in a private
/// directory of the pin root (`load=<pid>-<ns>`, locked while in use), and moves those maps
/// into the scope's directory once it holds the scope's lock. Nothing of it stays: not after an
/// `up`, not after a config that fails (lockdown), not from a process that died (its directory,
/// whose lock is free, goes at the next `up`); and a scope whose maps are pinned already keeps
/// them (the maps made ahead are dropped).
#[test]
fn a_cold_up_verifies_ahead_and_leaves_no_private_directory() {
    require_root!();
    let bed = Bed::new("tunnels = [\"tun0\"]\n");
    let private = || -> Vec<String> {
        std::fs::read_dir(&bed.pins.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("load="))
            .collect()
    };
    // Left by a process that died: nobody holds its lock.
    std::fs::create_dir_all(bed.pins.path.join("load=1-2")).unwrap();
    assert_eq!(private().len(), 1);

    let out = bed.run(&["up"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(private(), Vec::<String>::new(), "nothing private left");
    let status = bed.run(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["scopes"].as_array().unwrap().len(), 1, "{json:#}");
    let links = json["scopes"][0]["links"].as_array().unwrap().clone();
    assert_eq!(links.len(), 2, "{json:#}");
    // The programs in force read the maps pinned in the scope's directory.
    let servers = map_id(&bed.scope_dir().join("SERVERS"));
    for link in &links {
        let program = link["program_id"].as_u64().unwrap();
        assert!(program_maps(program).contains(&servers), "{link}");
    }

    // The links go, the maps stay: the next `up` is cold, but keeps the pinned maps.
    for link in ["egress_link", "ingress_link"] {
        std::fs::remove_file(bed.scope_dir().join(link)).unwrap();
    }
    let out = bed.run(&["up"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(private(), Vec::<String>::new());
    assert_eq!(
        map_id(&bed.scope_dir().join("SERVERS")),
        servers,
        "the maps were kept"
    );
    assert!(bed.run(&["down"]).status.success());

    // Two cold `up`s at once: one adopts its maps, the other finds them pinned and drops its
    // own; both end enforced, with one set of maps and nothing private left.
    let config = bed.config.to_str().unwrap();
    let args = ["--config", config, "up", "--cgroup", &bed.cgroup.relative];
    let racing: Vec<_> = (0..2)
        .map(|_| {
            testbed::process::killswitch_command(&bed.netns, &bed.pins, &args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for up in racing {
        let out = up.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(private(), Vec::<String>::new());
    let status = bed.run(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let servers = map_id(&bed.scope_dir().join("SERVERS"));
    for link in json["scopes"][0]["links"].as_array().unwrap() {
        let program = link["program_id"].as_u64().unwrap();
        assert!(program_maps(program).contains(&servers), "{link}");
    }
    assert!(bed.run(&["down"]).status.success());

    // A config that fails at a cold `up`: lockdown, and no private directory either.
    testbed::write_config(&bed.config, "tunnels = [\"tun0\"\n");
    let out = bed.run(&["up"]);
    assert!(!out.status.success());
    assert_eq!(private(), Vec::<String>::new());
    assert!(bed.run(&["down"]).status.success());
}

/// The id of the map pinned at `path`.
fn map_id(path: &std::path::Path) -> u64 {
    let out = testbed::run(
        "bpftool",
        &["-j", "map", "show", "pinned", path.to_str().unwrap()],
    );
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json["id"].as_u64().unwrap()
}

/// The ids of the maps program `id` uses.
fn program_maps(id: u64) -> Vec<u64> {
    let out = testbed::run("bpftool", &["-j", "prog", "show", "id", &id.to_string()]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json["map_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap())
        .collect()
}

/// Removes the directory on drop, also when the test fails.
struct Removed(std::path::PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Issue 11 item 18: a pinned map of another shape (an older build's, or a plant) is never
/// written into. `up` loads the programs against new maps in a staging directory, attaches
/// them, and only then moves the new maps over the old pins: the programs in force use
/// exactly the maps that are pinned, and the policy is whole.
#[test]
fn pinned_maps_of_another_shape_are_replaced_and_the_programs_use_the_new_ones() {
    require_root!();
    let bed =
        Bed::new("tunnels = [\"tun0\"]\n[[server]]\naddress = \"198.51.100.3\"\nport = 51820\n");
    let run = |args: &[&str]| bed.run(args);
    let scope_dir = bed.scope_dir();
    assert!(run(&["up"]).status.success());

    // An older layout of the settings and a smaller server map, pinned where ours were.
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&testbed::run("bpftool", &[&["-j"], args].concat())).unwrap()
    };
    let plant = |name: &str, spec: &[&str]| {
        let path = scope_dir.join(name);
        std::fs::remove_file(&path).unwrap();
        let path = path.to_str().unwrap().to_owned();
        testbed::run(
            "bpftool",
            &[&["map", "create", &path], spec, &["name", name]].concat(),
        );
    };
    plant(
        "SETTINGS",
        &["type", "array", "key", "4", "value", "32", "entries", "1"],
    );
    plant(
        "SERVERS",
        &[
            "type", "hash", "key", "20", "value", "1", "entries", "16", "flags", "1",
        ],
    );

    let out = run(&["up"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!scope_dir.join("upgrade").exists(), "staging left behind");
    let pinned = |name: &str| {
        json(&[
            "map",
            "show",
            "pinned",
            scope_dir.join(name).to_str().unwrap(),
        ])
    };
    assert_eq!(
        pinned("SETTINGS")["bytes_value"],
        std::mem::size_of::<killswitch_common::Settings>()
    );
    assert_eq!(pinned("SERVERS")["max_entries"], 262_144);
    let link = json(&[
        "link",
        "show",
        "pinned",
        scope_dir.join("egress_link").to_str().unwrap(),
    ]);
    let program = json(&["prog", "show", "id", &link["prog_id"].to_string()]);
    let used: Vec<u64> = program["map_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap())
        .collect();
    for name in ["SETTINGS", "SERVERS", "TUNNELS"] {
        let id = pinned(name)["id"].as_u64().unwrap();
        assert!(
            used.contains(&id),
            "{name} (id {id}) is not used by {used:?}"
        );
    }
    let servers = run(&["servers", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&servers.stdout),
        "198.51.100.3:51820\n"
    );
    assert!(run(&["status"]).status.success());
    assert!(run(&["down"]).status.success());
}
