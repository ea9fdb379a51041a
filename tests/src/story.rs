//! The kill-switch story over a real OpenVPN tunnel, told once: `cargo xtask demo` narrates it,
//! the end-to-end test asserts on what it observed.

use std::{
    net::SocketAddr,
    process::Output,
    time::{Duration, Instant},
};

use crate::{
    lab::{Lab, VPN_PORT, VPN_SERVER, WEB_HOST},
    process::{killswitch, killswitch_command, output_in, Background},
    Cgroup, PinRoot,
};

/// Port the scoped app uses; the unscoped contrast uses the next one.
pub const APP_PORT: u16 = 80;
pub const OUTSIDE_PORT: u16 = 81;

/// What the story observed.
#[derive(Debug, Default)]
pub struct Observed {
    pub connect_ms: u128,
    pub up_ms: u128,
    pub through_tunnel: bool,
    pub after_kill_reached: bool,
    /// Packets to the web host the router saw from the client while the tunnel was dead.
    pub leaked: Vec<String>,
    /// The same for a process outside the scope: proves the oracle sees clear traffic.
    pub outside_clear: Vec<String>,
    pub dropped_while_down: u64,
    pub old_ifindex: u32,
    pub new_ifindex: u32,
    pub new_tunnel_before_up: bool,
    pub new_tunnel_after_up: bool,
    pub status_table: String,
    /// `killswitch verify` at the end passed (exit 0); its lines.
    pub verified: bool,
    pub verify_lines: Vec<String>,
}

pub struct Story {
    pub lab: Lab,
    pub cgroup: Cgroup,
    pub pins: PinRoot,
    config: std::path::PathBuf,
    /// `up --backend` when set (the default is `auto`).
    backend: Option<&'static str>,
}

impl Story {
    pub fn new() -> Story {
        let lab = Lab::new(&[APP_PORT, OUTSIDE_PORT]);
        let config = lab.dir().join("killswitch.toml");
        crate::write_config(&config, &Story::valid_config());
        Story {
            lab,
            cgroup: Cgroup::new(),
            pins: PinRoot::new(),
            config,
            backend: None,
        }
    }

    /// The story with `up --backend BACKEND`.
    pub fn with_backend(backend: &'static str) -> Story {
        let mut story = Story::new();
        story.backend = Some(backend);
        story
    }

    pub fn killswitch(&self, args: &[&str]) -> Output {
        killswitch(&self.lab.client, &self.pins, &self.args(args))
    }

    /// Replaces the story's config (the OpenVPN server stays the one server).
    pub fn write_config(&self, text: &str) {
        crate::write_config(&self.config, text);
    }

    /// The story's valid config: the tunnel and the OpenVPN server.
    pub fn valid_config() -> String {
        format!(
            "tunnels = [\"tun0\"]\n\n[[server]]\naddress = \"{VPN_SERVER}\"\nport = {VPN_PORT}\nprotocol = \"udp\"\n"
        )
    }

    /// `--config C ARGS --cgroup G`.
    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["--config", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--cgroup", &self.cgroup.relative]);
        all
    }

    /// Starts `killswitch daemon` for the scope, its log in `daemon.log` of the lab's directory,
    /// and waits (bounded) until the scope is enforced.
    pub fn daemon(&self) -> Background {
        let mut command = killswitch_command(&self.lab.client, &self.pins, &self.args(&["daemon"]));
        let log = std::fs::File::create(self.lab.dir().join("daemon.log")).unwrap();
        command.stderr(log);
        let daemon = Background::start(command);
        let started = Instant::now();
        while !self.killswitch(&["status"]).status.success() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the daemon did not enforce the scope: {}",
                self.lab.log("daemon.log")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// `killswitch up` with the story's backend, asserted to succeed; its duration.
    pub fn up(&self) -> u128 {
        let started = Instant::now();
        let out = match self.backend {
            Some(backend) => self.killswitch(&["up", "--backend", backend]),
            None => self.killswitch(&["up"]),
        };
        assert!(
            out.status.success(),
            "up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed().as_millis()
    }

    /// A TCP request to the web host from inside the scope (or outside with `None`).
    pub fn request(&self, cgroup: Option<&Cgroup>, port: u16) -> bool {
        let target = SocketAddr::new(WEB_HOST.parse().unwrap(), port).to_string();
        let probe = probe_bin();
        output_in(&self.lab.client, cgroup, &probe, &["tcp", &target, "1000"])
            .status
            .success()
    }

    fn dropped(&self) -> u64 {
        let out = self.killswitch(&["status", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        json["scopes"][0]["counters"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter(|c| c["verdict"] == "drop")
                    .filter_map(|c| c["packets"].as_u64())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Tells the story; `say` gets one line per step.
    pub fn tell(&mut self, say: &mut dyn FnMut(&str)) -> Observed {
        let mut seen = Observed {
            connect_ms: self.lab.connect().as_millis(),
            ..Observed::default()
        };
        seen.old_ifindex = self.lab.tunnel_ifindex().unwrap_or(0);
        say(&format!(
            "OpenVPN connected in {} ms: tun0 has ifindex {}; the client's default route still \
             points at the router, as on any DHCP machine",
            seen.connect_ms, seen.old_ifindex
        ));

        seen.up_ms = self.up();
        say(&format!(
            "killswitch up --cgroup {} took {} ms; the loader has exited, the pinned programs enforce",
            self.cgroup.relative, seen.up_ms
        ));

        self.lab.start_capture();
        seen.through_tunnel = self.request(Some(&self.cgroup), APP_PORT);
        say(&format!(
            "app in the scope -> {WEB_HOST}:{APP_PORT} through the tunnel: {}",
            ok(seen.through_tunnel)
        ));

        self.lab.kill_vpn_client();
        let before = self.dropped();
        seen.after_kill_reached = self.request(Some(&self.cgroup), APP_PORT);
        seen.dropped_while_down = self.dropped().saturating_sub(before);
        seen.leaked = self.lab.stop_capture(&format!("dst host {WEB_HOST}"));
        say(&format!(
            "VPN client SIGKILLed, tun0 gone. app -> {WEB_HOST}:{APP_PORT}: {}; {} dropped; \
             the router saw {} to the web host in the clear",
            if seen.after_kill_reached {
                "REACHED (leak!)"
            } else {
                "refused"
            },
            crate::demo::count(seen.dropped_while_down as usize, "packet"),
            crate::demo::count(seen.leaked.len(), "packet")
        ));
        seen.status_table = String::from_utf8_lossy(&self.killswitch(&["status"]).stdout).into();

        self.lab.start_capture();
        let outside = self.request(None, OUTSIDE_PORT);
        seen.outside_clear = self
            .lab
            .stop_capture(&format!("dst host {WEB_HOST} and dst port {OUTSIDE_PORT}"));
        say(&format!(
            "for contrast, a process outside the scope: {} -- the router saw {} in the clear",
            ok(outside),
            crate::demo::count(seen.outside_clear.len(), "packet")
        ));

        self.lab.connect();
        seen.new_ifindex = self.lab.tunnel_ifindex().unwrap_or(0);
        seen.new_tunnel_before_up = self.request(Some(&self.cgroup), APP_PORT);
        say(&format!(
            "VPN reconnected: tun0 is back with ifindex {} (was {}); the app is {} until the \
             policy is re-applied (fail closed)",
            seen.new_ifindex,
            seen.old_ifindex,
            if seen.new_tunnel_before_up {
                "ALREADY THROUGH"
            } else {
                "still blocked"
            }
        ));
        let again_ms = self.up();
        seen.new_tunnel_after_up = self.request(Some(&self.cgroup), APP_PORT);
        say(&format!(
            "killswitch up again ({again_ms} ms, in place, no gap): app -> {WEB_HOST}:{APP_PORT}: {}",
            ok(seen.new_tunnel_after_up)
        ));
        let verify = self.killswitch(&["verify"]);
        seen.verified = verify.status.success();
        seen.verify_lines = String::from_utf8_lossy(&verify.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        say("killswitch verify: the kernel's state, 1,000+ packets against the model, probes that cannot leak:");
        for line in &seen.verify_lines {
            say(&format!("  {line}"));
        }
        seen
    }
}

impl Default for Story {
    fn default() -> Self {
        Story::new()
    }
}

impl Drop for Story {
    fn drop(&mut self) {
        // Remove the enforcement before the cgroup and pins go (their guards also cover panics).
        let _ = self.killswitch(&["down"]);
    }
}

fn ok(reached: bool) -> &'static str {
    if reached {
        "ok"
    } else {
        "FAILED"
    }
}

/// The probe binary next to the running executable (tests and xtask are built into one target).
pub fn probe_bin() -> String {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    for candidate in [dir.join("ks-probe"), dir.join("../ks-probe")] {
        if candidate.exists() {
            return candidate.display().to_string();
        }
    }
    panic!(
        "ks-probe not built next to {}; run cargo build -p killswitch-tests",
        exe.display()
    );
}
