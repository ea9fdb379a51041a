//! The whole story `cargo xtask demo` tells, over a real OpenVPN tunnel with the router's
//! capture as the leak oracle: the daemon following a reconnect with no re-run of `up`, a
//! per-app scope next to an unprotected process, the nftables fallback holding too, and
//! `verify` at the end. Each step returns what it saw; anything unexpected is an error.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    lab::WEB_HOST,
    process::killswitch_bin,
    story::{probe_bin, Story, APP_PORT, OUTSIDE_PORT},
    Cgroup,
};

/// "1 packet", "3 packets".
pub fn count(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// Tells the story; `say` gets one line per step. `Err` names the step that went wrong.
pub fn tell(say: &mut dyn FnMut(&str)) -> Result<(), String> {
    let started = Instant::now();
    let mut story = Story::new();
    let connected = story.lab.connect();
    let first = story.lab.tunnel_ifindex().unwrap_or(0);
    say(&format!(
        "OpenVPN connected in {} ms: tun0 has ifindex {first}; the default route still points \
         at the router, as on any DHCP machine",
        connected.as_millis()
    ));

    // 1. The daemon: enforced from the start, and it follows the tunnel.
    let daemon = story.daemon();
    say(&format!(
        "killswitch daemon enforces the scope {} with eBPF",
        story.cgroup.relative
    ));
    expect(
        story.request(Some(&story.cgroup), APP_PORT),
        "an app in the scope reaches the web host through the tunnel",
    )?;
    say(&format!(
        "app in the scope -> {WEB_HOST}:{APP_PORT} through the tunnel: ok"
    ));
    let (app_leaked, outside_clear) = tunnel_dies(&mut story)?;
    say(&format!(
        "VPN client SIGKILLed, tun0 gone: the app is refused and the router saw {} from it; \
         a process outside any scope got through in the clear ({} on the router)",
        count(app_leaked, "packet"),
        count(outside_clear, "packet")
    ));
    expect(app_leaked == 0, "nothing of the app leaves in the clear")?;
    story.lab.connect();
    let second = story.lab.tunnel_ifindex().unwrap_or(0);
    let back = Instant::now();
    let mut through = false;
    while !through && back.elapsed() < Duration::from_secs(5) {
        through = story.request(Some(&story.cgroup), APP_PORT);
    }
    expect(through, "the daemon lets the app through the new tun0")?;
    say(&format!(
        "VPN reconnected: tun0 is back as ifindex {second} (was {first}); the daemon followed \
         and the app is through the tunnel again {} ms after the client connected, with no \
         `killswitch up`",
        back.elapsed().as_millis()
    ));

    // 2. A kill switch for one app: `killswitch run`, next to a process without one.
    story.lab.kill_vpn_client();
    let apps = Cgroup::new();
    story.lab.start_capture();
    let app = run_app(&story, &apps)?;
    let plain = story.request(None, OUTSIDE_PORT);
    let app_clear = story
        .lab
        .stop_capture(&format!("dst host {WEB_HOST} and tcp dst port {APP_PORT}"))
        .len();
    let plain_clear = story
        .lab
        .captured(&format!(
            "dst host {WEB_HOST} and tcp dst port {OUTSIDE_PORT}"
        ))
        .len();
    say(&format!(
        "tunnel down again. `killswitch run -- probe {WEB_HOST}:{APP_PORT}`: {} ({} in the \
         clear); the same request without killswitch: {} ({} in the clear)",
        if app { "REACHED (leak!)" } else { "refused" },
        count(app_clear, "packet"),
        if plain { "reached" } else { "refused" },
        count(plain_clear, "packet"),
    ));
    expect(!app && app_clear == 0, "the app under `run` is held")?;
    expect(plain, "the unprotected process gets out (the contrast)")?;
    drop(daemon);
    expect(
        story.killswitch(&["down"]).status.success(),
        "down after the daemon",
    )?;

    // 3. The nftables fallback: the same policy as a table, the same result.
    story.lab.connect();
    let out = story.killswitch(&["up", "--backend", "nftables"]);
    expect(out.status.success(), "up --backend nftables")?;
    expect(
        story.request(Some(&story.cgroup), APP_PORT),
        "nftables: the app reaches the web host through the tunnel",
    )?;
    let (leaked, _) = tunnel_dies(&mut story)?;
    expect(
        leaked == 0,
        "nftables: nothing of the app leaves in the clear",
    )?;
    story.lab.connect();
    let back = Instant::now();
    let mut through = false;
    while !through && back.elapsed() < Duration::from_secs(5) {
        through = story.request(Some(&story.cgroup), APP_PORT);
    }
    expect(through, "nftables: the app is through the new tun0")?;
    say(&format!(
        "the nftables fallback (`up --backend nftables`, for kernels without eBPF): the app \
         is refused with the tunnel down ({} in the clear) and through the new tun0 by name, \
         with no re-run",
        count(leaked, "packet")
    ));

    // 4. verify: the kernel's state, packets against the model, probes that cannot leak.
    let verify = story.killswitch(&["verify"]);
    say("killswitch verify:");
    for line in String::from_utf8_lossy(&verify.stdout).lines() {
        say(&format!("  {line}"));
    }
    expect(verify.status.success(), "verify passes")?;
    say(&format!(
        "the whole story took {} s",
        started.elapsed().as_secs()
    ));
    Ok(())
}

fn expect(holds: bool, what: &str) -> Result<(), String> {
    if holds {
        Ok(())
    } else {
        Err(format!("expected: {what}"))
    }
}

/// Kills the VPN client, then asks from the story's scope and from outside any scope while the
/// router captures: how many of the app's packets, and of the outsider's, the router saw.
fn tunnel_dies(story: &mut Story) -> Result<(usize, usize), String> {
    story.lab.kill_vpn_client();
    story.lab.start_capture();
    let app = story.request(Some(&story.cgroup), APP_PORT);
    let outside = story.request(None, OUTSIDE_PORT);
    let app_clear = story
        .lab
        .stop_capture(&format!("dst host {WEB_HOST} and tcp dst port {APP_PORT}"))
        .len();
    let outside_clear = story
        .lab
        .captured(&format!(
            "dst host {WEB_HOST} and tcp dst port {OUTSIDE_PORT}"
        ))
        .len();
    expect(!app, "the app in the scope is refused with the tunnel down")?;
    expect(
        outside,
        "a process outside the scope gets out (the contrast)",
    )?;
    Ok((app_clear, outside_clear))
}

/// `killswitch run -- ks-probe tcp WEB:APP_PORT` started from `caller` (so `run` makes its
/// cgroup there, apart from the daemon's scope); whether the probe reached the web host.
fn run_app(story: &Story, caller: &Cgroup) -> Result<bool, String> {
    let target = SocketAddr::new(WEB_HOST.parse().unwrap(), APP_PORT).to_string();
    let config = story.lab.dir().join("killswitch.toml");
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"echo $$ > "$1" || exit 125; ns=$2; shift 2; exec nsenter --net="$ns" -- timeout -k 1 30 "$@""#)
        .arg("sh")
        .arg(caller.procs())
        .arg(story.lab.client.path())
        .arg(killswitch_bin())
        .arg("--config")
        .arg(&config)
        .args(["-q", "run", "--name", "app", "--"])
        .arg(probe_bin())
        .args(["tcp", &target, "1000"])
        .env("KILLSWITCH_PIN_ROOT", &story.pins.path)
        .env("KILLSWITCH_STATE_DIR", &story.pins.state)
        .env_remove("KILLSWITCH_LOG");
    let out = command
        .output()
        .map_err(|e| format!("cannot start killswitch run: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 0: the probe got its echo; 1 with the probe's own line: refused; else `run` failed.
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) if !stderr.contains("killswitch:") => Ok(false),
        other => Err(format!("killswitch run ended with {other:?}: {stderr}")),
    }
}
