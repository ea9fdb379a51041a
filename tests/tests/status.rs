//! `status` as a person and a program read it, against golden copies in tests/golden/status/
//! (`KILLSWITCH_BLESS=1` rewrites them): a real scope with a tunnel, a server, a LAN and one
//! dropped packet, so the counters, the tunnel line and the recent drops all have something to
//! show. What differs from run to run (times, ids, ports, paths) is replaced by a placeholder.

use std::path::PathBuf;

use serde_json::Value;
use testbed::{
    net::{TestNet, OTHER_V4, SERVER_V4},
    process::{killswitch_ok, output_in},
    require_root, Cgroup, PinRoot,
};

const PROBE: &str = env!("CARGO_BIN_EXE_ks-probe");

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden/status")
        .join(name)
}

/// Compares `text` with the golden file, or rewrites it with `KILLSWITCH_BLESS`.
fn check_golden(name: &str, text: &str) {
    let path = golden(name);
    if std::env::var_os("KILLSWITCH_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        want, text,
        "{name} changed (KILLSWITCH_BLESS=1 rewrites tests/golden/status/)"
    );
}

/// Replaces what changes between runs, word by word, so the layout itself is compared.
fn normalize(text: &str, cgroup: &Cgroup, pins: &PinRoot) -> String {
    let text = paths(text, cgroup, pins);
    let mut out = String::new();
    for line in text.lines() {
        let mut words: Vec<String> = Vec::new();
        let mut previous = String::new();
        for word in line.split(' ') {
            let numbered = ["(prog", "(ifindex", "ifindex"].contains(&previous.as_str());
            let normalized = if numbered {
                format!("N{}", word.trim_start_matches(|c: char| c.is_ascii_digit()))
            } else if previous == "for" && word.chars().all(|c| c.is_ascii_digit()) {
                "<N>".into()
            } else if is_time(word) {
                let (open, close) = (word.starts_with('('), word.ends_with(')'));
                format!(
                    "{}<TIME>{}",
                    if open { "(" } else { "" },
                    if close { ")" } else { "" }
                )
            } else if let Some(port) = ephemeral_port(word) {
                port
            } else {
                word.to_owned()
            };
            previous = word.to_owned();
            words.push(normalized);
        }
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

/// The machine's cgroup2 mount, the test's cgroup and pin directory as placeholders.
fn paths(text: &str, cgroup: &Cgroup, pins: &PinRoot) -> String {
    text.replace(&pins.path.display().to_string(), "<PINS>")
        .replace(&cgroup.path.display().to_string(), "<CGROUP2>/<CGROUP>")
        .replace(&cgroup.relative, "<CGROUP>")
}

/// An RFC 3339 time, bare or in parentheses.
fn is_time(word: &str) -> bool {
    let word = word.trim_start_matches('(').trim_end_matches([')', ',']);
    word.len() >= 20 && word.as_bytes()[4] == b'-' && word.contains('T') && word.ends_with('Z')
}

/// The probe's source `192.0.2.2:PORT`: the port is the kernel's choice.
fn ephemeral_port(word: &str) -> Option<String> {
    let (address, port) = word.rsplit_once(':')?;
    (address == "192.0.2.2" && port.parse::<u16>().is_ok()).then(|| format!("{address}:<PORT>"))
}

/// The same for JSON: the values that change become placeholders, keys stay.
fn normalize_json(value: &mut Value, cgroup: &Cgroup, pins: &PinRoot) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match key.as_str() {
                    "link_id" | "program_id" | "ifindex" | "tunnels_changed_seconds_ago"
                        if !v.is_null() =>
                    {
                        *v = Value::from("<N>")
                    }
                    "time" | "tunnels_changed" if !v.is_null() => *v = Value::from("<TIME>"),
                    "source_port" if !v.is_null() => *v = Value::from("<PORT>"),
                    _ => normalize_json(v, cgroup, pins),
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| normalize_json(v, cgroup, pins)),
        Value::String(s) => *s = paths(s, cgroup, pins),
        _ => {}
    }
}

/// docs/status.schema.json is what the code produces (`KILLSWITCH_BLESS=1` rewrites it).
#[test]
fn the_schema_in_docs_is_the_one_status_json_follows() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/status.schema.json");
    let text = serde_json::to_string_pretty(&killswitch::status::schema()).unwrap() + "\n";
    if std::env::var_os("KILLSWITCH_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        want, text,
        "docs/status.schema.json is stale (KILLSWITCH_BLESS=1 rewrites it)"
    );
}

#[test]
fn status_reads_at_a_glance_and_matches_its_golden_copies() {
    require_root!();
    let net = TestNet::new();
    let cgroup = Cgroup::new();
    let pins = PinRoot::new();
    let dir = testbed::private_dir("kstest");
    let config = dir.join("killswitch.toml");
    testbed::write_config(
        &config,
        &format!(
            "tunnels = [\"tun0\"]\n[[server]]\naddress = \"{SERVER_V4}\"\nport = 1194\nprotocol = \"udp\"\n\
             [lan]\nnetworks = [\"192.168.77.0/24\"]\n"
        ),
    );
    let ks = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--cgroup", &cgroup.relative]);
        killswitch_ok(&net.client, &pins, &all)
    };
    ks(&["--config", config.to_str().unwrap(), "up"]);
    // One packet the policy drops: a TCP connection to an ordinary address, outside the tunnel.
    let probe = output_in(
        &net.client,
        Some(&cgroup),
        PROBE,
        &["tcp", &format!("{OTHER_V4}:8080")],
    );
    assert!(!probe.status.success(), "the probe must be dropped");

    let human = ks(&["status"]);
    assert!(human.contains("tunnels  tun0 (ifindex"), "{human}");
    assert!(human.contains("         up for "), "{human}");
    assert!(
        human.contains("drop egress default-drop tcp 192.0.2.2:"),
        "{human}"
    );
    check_golden("ebpf.txt", &normalize(&human, &cgroup, &pins));

    let mut json: Value = serde_json::from_str(&ks(&["status", "--json"])).unwrap();
    let schema = jsonschema::validator_for(&killswitch::status::schema()).unwrap();
    let errors: Vec<String> = schema.iter_errors(&json).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "status --json breaks its schema: {errors:?}"
    );
    let recent = &json["scopes"][0]["recent_drops"];
    assert_eq!(recent.as_array().map(Vec::len), Some(1), "{json:#}");
    assert_eq!(recent[0]["destination"], OTHER_V4);
    normalize_json(&mut json, &cgroup, &pins);
    check_golden(
        "ebpf.json",
        &(serde_json::to_string_pretty(&json).unwrap() + "\n"),
    );

    // The tunnel goes: the line says so, and since when.
    net.remove_tunnel();
    ks(&["--config", config.to_str().unwrap(), "up"]);
    let human = ks(&["status"]);
    assert!(human.contains("tunnels  none present"), "{human}");
    assert!(human.contains("         down for "), "{human}");

    ks(&["down"]);
    let _ = std::fs::remove_dir_all(&dir);
}
