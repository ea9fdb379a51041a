//! The nftables backend with real traffic on a child cgroup: `--backend auto` falling back when
//! the kernel refuses eBPF, lockdown at a first `up` with a bad config, the hand-over between
//! backends, and a machine where neither works.

use std::{net::SocketAddr, process::Output};

use testbed::{
    echo::EchoServer,
    net::{TestNet, OTHER_V4, SERVER_V4, TUNNEL_PEER_V4},
    process::{killswitch_command, output_in, without_bpf},
    require_root, Cgroup, PinRoot,
};

const PROBE: &str = env!("CARGO_BIN_EXE_ks-probe");
const CONFIG: &str = "tunnels = [\"tun0\"]\n[[server]]\naddress = \"198.51.100.1\"\nport = 1194\nprotocol = \"udp\"\n";

struct Setup {
    net: TestNet,
    cgroup: Cgroup,
    pins: PinRoot,
    dir: std::path::PathBuf,
    _echo: EchoServer,
}

impl Setup {
    fn new(config: &str) -> Setup {
        let net = TestNet::new();
        let addrs: Vec<SocketAddr> = [(SERVER_V4, 1194), (OTHER_V4, 8080), (TUNNEL_PEER_V4, 8080)]
            .iter()
            .map(|(a, p)| SocketAddr::new(a.parse().unwrap(), *p))
            .collect();
        let echo = EchoServer::start(&net.internet, &addrs);
        let dir = testbed::private_dir("ksnft");
        testbed::write_config(&dir.join("killswitch.toml"), config);
        Setup {
            net,
            cgroup: Cgroup::new(),
            pins: PinRoot::new(),
            dir,
            _echo: echo,
        }
    }

    fn config(&self) -> String {
        self.dir.join("killswitch.toml").display().to_string()
    }

    /// `killswitch --config C ARGS --cgroup G` in the client namespace; `refuse_bpf`: with the
    /// `bpf` system call refused, as on a kernel without eBPF.
    fn killswitch(&self, args: &[&str], refuse_bpf: bool) -> Output {
        let mut command = self.command(args);
        if refuse_bpf {
            without_bpf(&mut command);
        }
        command.output().unwrap()
    }

    /// The command [`Setup::killswitch`] runs, for tests that change it further.
    fn command(&self, args: &[&str]) -> std::process::Command {
        let config = self.config();
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--cgroup", &self.cgroup.relative]);
        killswitch_command(&self.net.client, &self.pins, &all)
    }

    fn reaches(&self, kind: &str, addr: &str, port: u16) -> bool {
        let target = SocketAddr::new(addr.parse().unwrap(), port).to_string();
        output_in(
            &self.net.client,
            Some(&self.cgroup),
            PROBE,
            &[kind, &target, "500"],
        )
        .status
        .success()
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.killswitch(&["status", "--json"], false);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The policy's verdicts with real traffic: tunnel and server pass, anything else does not.
    fn enforces_the_policy(&self) -> Vec<String> {
        let mut wrong = Vec::new();
        for (kind, addr, port, expected) in [
            ("tcp", TUNNEL_PEER_V4, 8080, true),
            ("udp", SERVER_V4, 1194, true),
            ("tcp", OTHER_V4, 8080, false),
            ("udp", OTHER_V4, 8080, false),
        ] {
            if self.reaches(kind, addr, port) != expected {
                wrong.push(format!(
                    "{kind} {addr}:{port} should {}",
                    if expected { "pass" } else { "be dropped" }
                ));
            }
        }
        wrong
    }
}

impl Setup {
    /// `out` (of a first `up`) exited 2 saying lockdown, `status` says nftables holds it in
    /// lockdown, and nothing but loopback gets through.
    fn held_in_lockdown_by_nftables(&self, out: &Output) {
        assert_eq!(out.status.code(), Some(2), "{}", text(out));
        assert!(text(out).contains("lockdown"), "{}", text(out));
        let json = self.status_json();
        assert_eq!(json["scopes"][0]["backend"], "nftables", "{json:#}");
        assert_eq!(json["scopes"][0]["mode"], "lockdown", "{json:#}");
        for (kind, addr, port) in [
            ("tcp", TUNNEL_PEER_V4, 8080),
            ("udp", SERVER_V4, 1194),
            ("tcp", OTHER_V4, 8080),
        ] {
            assert!(
                !self.reaches(kind, addr, port),
                "{kind} {addr}:{port} passed the lockdown"
            );
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.killswitch(&["down"], false);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn auto_falls_back_to_nftables_when_the_kernel_refuses_ebpf_and_says_why_once() {
    require_root!();
    let s = Setup::new(CONFIG);
    let out = s.killswitch(&["up"], true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", text(&out));
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "one warning line: {stderr}");
    eprintln!("the fallback says: {}", warnings[0]);
    assert!(
        warnings[0].contains("using nftables instead")
            && warnings[0].contains("Operation not permitted"),
        "{}",
        warnings[0]
    );
    let json = s.status_json();
    assert_eq!(json["scopes"].as_array().unwrap().len(), 1, "{json:#}");
    assert_eq!(json["scopes"][0]["backend"], "nftables", "{json:#}");
    assert_eq!(json["scopes"][0]["mode"], "policy", "{json:#}");
    let wrong = s.enforces_the_policy();
    assert!(wrong.is_empty(), "{wrong:#?}");

    // eBPF works again: `up` moves the scope back and the table goes.
    let out = s.killswitch(&["up"], false);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("moved from nftables to ebpf"),
        "{}",
        text(&out)
    );
    let json = s.status_json();
    assert_eq!(json["scopes"].as_array().unwrap().len(), 1, "{json:#}");
    assert_eq!(json["scopes"][0]["backend"], "ebpf", "{json:#}");
    let wrong = s.enforces_the_policy();
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn neither_backend_working_exits_1_and_names_both() {
    require_root!();
    let s = Setup::new(CONFIG);
    let mut command = s.command(&["up"]);
    // No nft on the PATH (it lives in /usr/sbin), and no bpf().
    command.env("PATH", "/usr/bin:/bin");
    without_bpf(&mut command);
    let out = command.output().unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    eprintln!("with neither: {all}");
    assert!(all.contains("neither backend can enforce"), "{all}");
    assert!(
        all.contains("eBPF:") && all.contains("nftables:") && all.contains("nft"),
        "{all}"
    );
}

#[test]
fn a_bad_config_at_the_first_nftables_up_holds_the_scope_in_lockdown() {
    require_root!();
    let s = Setup::new("tunnels = [\"tun0\"\n");
    let out = s.killswitch(&["up", "--backend", "nftables"], false);
    s.held_in_lockdown_by_nftables(&out);
    // A good config takes over; a bad one later leaves it in force.
    testbed::write_config(&s.dir.join("killswitch.toml"), CONFIG);
    let out = s.killswitch(&["up", "--backend", "nftables"], false);
    assert!(out.status.success(), "{}", text(&out));
    testbed::write_config(&s.dir.join("killswitch.toml"), "tunnels = 3\n");
    let out = s.killswitch(&["up", "--backend", "nftables"], false);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(s.status_json()["scopes"][0]["mode"], "policy");
    let wrong = s.enforces_the_policy();
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// On a machine whose kernel refuses eBPF, a bad config at boot still holds the scope closed:
/// `auto` locks it down with nftables.
#[test]
fn with_ebpf_refused_a_bad_config_at_the_first_up_is_held_in_lockdown_by_nftables() {
    require_root!();
    let s = Setup::new("tunnels = [\"tun0\"\n");
    let out = s.killswitch(&["up"], true);
    s.held_in_lockdown_by_nftables(&out);
}

/// `nft flush ruleset` (a firewall service starting or reloading) removes the table; the
/// daemon puts it back within about a second, and a `down` is not undone.
#[test]
fn the_daemon_puts_back_a_table_flushed_behind_its_back_but_not_one_taken_down() {
    require_root!();
    let s = Setup::new(CONFIG);
    let mut command = s.command(&["daemon", "--backend", "nftables"]);
    command.stderr(std::process::Stdio::piped());
    let daemon = testbed::process::Background::start(command);
    let enforced = || s.killswitch(&["status"], false).status.success();
    let wait = |want: bool| {
        let started = std::time::Instant::now();
        while enforced() != want {
            if started.elapsed() > std::time::Duration::from_secs(5) {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        true
    };
    assert!(wait(true), "the daemon did not enforce the scope");
    let flushed = output_in(&s.net.client, None, "nft", &["flush", "ruleset"]);
    assert!(flushed.status.success());
    let started = std::time::Instant::now();
    assert!(wait(true), "the table did not come back");
    eprintln!("the table was back after {:?}", started.elapsed());
    let wrong = s.enforces_the_policy();
    assert!(wrong.is_empty(), "{wrong:#?}");

    let out = s.killswitch(&["down"], false);
    assert!(out.status.success(), "{}", text(&out));
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(!enforced(), "the daemon undid `down`");
    drop(daemon);
}
