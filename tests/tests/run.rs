//! `killswitch run`: a kill switch for one app, and the VPN client in a cgroup of its own.
//!
//! Each `run` starts from a caller cgroup inside the test's cgroup, so the cgroup it makes
//! (`killswitch/NAME` next to the caller's) is inside the test's too, and goes with it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use testbed::{
    lab::{VPN_PORT, VPN_SERVER, WEB_HOST},
    process::{killswitch, killswitch_bin, killswitch_command, killswitch_ok, Background},
    require_root,
    story::{probe_bin, Story, APP_PORT, OUTSIDE_PORT},
    Cgroup, Netns, PinRoot,
};

/// Where `run` is started from, and what it is given (owned, so the lab stays usable).
struct Caller {
    netns: PathBuf,
    pins: PathBuf,
    state: PathBuf,
    /// The test's cgroup; `run` makes `killswitch/NAME` in it.
    cgroup: PathBuf,
    relative: String,
    caller: Cgroup,
    config: PathBuf,
}

impl Caller {
    fn new(netns: &Netns, pins: &PinRoot, cgroup: &Cgroup, config: &Path) -> Caller {
        Caller {
            netns: netns.path().to_owned(),
            pins: pins.path.clone(),
            state: pins.state.clone(),
            cgroup: cgroup.path.clone(),
            relative: cgroup.relative.clone(),
            caller: cgroup.child("caller"),
            config: config.to_owned(),
        }
    }

    /// `killswitch --config C ARGS`, started from the caller cgroup in the namespace.
    fn command(&self, args: &[&str]) -> Command {
        self.command_with(&self.config, args)
    }

    /// [`Caller::command`] with another config file.
    fn command_with(&self, config: &Path, args: &[&str]) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$1" || exit 125; ns=$2; shift 2; exec nsenter --net="$ns" -- timeout -k 1 60 "$@""#)
            .arg("sh")
            .arg(self.caller.procs())
            .arg(&self.netns)
            .arg(killswitch_bin())
            .arg("--config")
            .arg(config)
            .args(args)
            .env("KILLSWITCH_PIN_ROOT", &self.pins)
            .env("KILLSWITCH_STATE_DIR", &self.state)
            .env_remove("KILLSWITCH_LOG");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("killswitch runs")
    }

    /// [`Caller::command`] in the background, its log dropped.
    fn background(&self, args: &[&str]) -> Background {
        quiet_background(self.command(args))
    }

    fn background_with(&self, config: &Path, args: &[&str]) -> Background {
        quiet_background(self.command_with(config, args))
    }

    /// The cgroup `run --name NAME` makes, relative to the cgroup2 mount.
    fn app(&self, name: &str) -> String {
        format!("{}/killswitch/{name}", self.relative)
    }

    fn app_path(&self, name: &str) -> PathBuf {
        self.cgroup.join("killswitch").join(name)
    }

    /// Nothing of any run is left: no cgroup, no pinned scope, no nft table.
    fn assert_nothing_left(&self, what: &str) {
        for parent in ["killswitch", "killswitch-vpn-client"] {
            assert!(
                !self.cgroup.join(parent).exists(),
                "{what}: a cgroup is left in {}",
                self.cgroup.display()
            );
        }
        let pinned: Vec<_> = std::fs::read_dir(&self.pins)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(pinned.is_empty(), "{what}: pins left: {pinned:?}");
        let tables = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .args(["--", "nft", "list", "tables"])
            .output()
            .unwrap();
        let tables = String::from_utf8_lossy(&tables.stdout);
        assert!(
            !tables.contains("killswitch"),
            "{what}: a table is left: {tables}"
        );
    }

    /// The killswitch process started from the caller cgroup, if one runs.
    fn killswitch_pid(&self) -> Option<i32> {
        let procs = std::fs::read_to_string(self.caller.procs()).unwrap_or_default();
        procs
            .lines()
            .filter_map(|l| l.parse().ok())
            .find(|pid: &i32| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "killswitch")
            })
    }
}

/// A private directory removed however the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn quiet_background(mut command: Command) -> Background {
    command.stderr(std::process::Stdio::null());
    Background::start(command)
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn config_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("killswitch.toml");
    testbed::write_config(&path, text);
    path
}

const CONFIG: &str = "tunnels = [\"tun0\"]\n[[server]]\naddress = \"198.51.100.1\"\nport = 1194\n";

#[test]
fn run_passes_exit_statuses_through_and_leaves_nothing_behind() {
    require_root!();
    let (netns, pins, cgroup) = (Netns::new("run"), PinRoot::new(), Cgroup::new());
    let scratch = Scratch(testbed::private_dir("ksrun"));
    let dir = &scratch.0;
    let config = config_file(dir, CONFIG);
    let caller = Caller::new(&netns, &pins, &cgroup, &config);
    for backend in ["ebpf", "nftables"] {
        for (command, expected) in [
            (vec!["true"], 0),
            (vec!["sh", "-c", "exit 3"], 3),
            (vec!["sh", "-c", "kill -TERM $$"], 128 + 15),
            (vec!["sh", "-c", "kill -KILL $$"], 128 + 9),
        ] {
            let mut args = vec!["run", "--backend", backend, "--"];
            args.extend(&command);
            let out = caller.run(&args);
            assert_eq!(
                out.status.code(),
                Some(expected),
                "{backend} {command:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            caller.assert_nothing_left(&format!("{backend} {command:?}"));
        }
        // The command inside the scope's cgroup, and the scope enforced while it runs.
        let inside = caller.run(&[
            "run",
            "--backend",
            backend,
            "--name",
            "look",
            "--",
            "sh",
            "-c",
            "cat /proc/self/cgroup",
        ]);
        let stdout = String::from_utf8_lossy(&inside.stdout);
        assert!(
            stdout.contains(&format!("0::/{}", caller.app("look"))),
            "{backend}: not in its cgroup: {stdout}"
        );
        // Under sudo the command runs as the user who ran sudo, still in its cgroup.
        let mut as_user = caller.command(&[
            "run",
            "--backend",
            backend,
            "--name",
            "user",
            "--",
            "sh",
            "-c",
            "id -u; echo $HOME; cat /proc/self/cgroup",
        ]);
        as_user.env("SUDO_UID", "65534").env("SUDO_GID", "65534");
        let out = as_user.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && stdout.starts_with("65534\n")
                && stdout.contains(&format!("0::/{}", caller.app("user"))),
            "{backend}: not the sudo user, or not in its cgroup: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        caller.assert_nothing_left(&format!("{backend} as the sudo user"));
        // A child left behind keeps the scope (and the run) until it exits.
        let started = Instant::now();
        let out = caller.run(&[
            "run",
            "--backend",
            backend,
            "--",
            "sh",
            "-c",
            "sleep 1 & exit 0",
        ]);
        assert_eq!(out.status.code(), Some(0));
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{backend}: the run ended before the child it left"
        );
        caller.assert_nothing_left(&format!("{backend} with a child left behind"));
        // Two runs with one name share the cgroup and scope; it goes with the last process.
        let first = caller.background(&[
            "run",
            "--backend",
            backend,
            "--name",
            "shared",
            "--",
            "sleep",
            "1.5",
        ]);
        let started = Instant::now();
        while !caller.app_path("shared").exists() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{backend}: no cgroup"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let second = caller.run(&[
            "run",
            "--backend",
            backend,
            "--name",
            "shared",
            "--",
            "sh",
            "-c",
            "cat /proc/self/cgroup; exit 4",
        ]);
        assert_eq!(second.status.code(), Some(4));
        assert!(
            String::from_utf8_lossy(&second.stdout).contains(&caller.app("shared")),
            "{backend}: the second run is not in the shared cgroup"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(1300),
            "{backend}: the second run removed the scope while the first one's command ran"
        );
        let mut first = first;
        while first.exited().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{backend}: first run"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        caller.assert_nothing_left(&format!("{backend} shared"));
    }
    eprintln!("exit statuses 0, 3, 143, 137 passed through on both backends; nothing left");
}

#[test]
fn run_refuses_bad_input_in_one_line_and_leaves_nothing_behind() {
    require_root!();
    let (netns, pins, cgroup) = (Netns::new("run"), PinRoot::new(), Cgroup::new());
    let scratch = Scratch(testbed::private_dir("ksrun"));
    let dir = &scratch.0;
    let config = config_file(dir, CONFIG);
    let caller = Caller::new(&netns, &pins, &cgroup, &config);
    let missing = dir.join("missing.toml");
    let not_executable = dir.join("app");
    std::fs::write(&not_executable, "echo hi\n").unwrap();
    let not_executable = not_executable.to_str().unwrap();
    let cases: Vec<(&Path, Vec<&str>, i32, &str)> = vec![
        (
            &config,
            vec!["run"],
            2,
            "required arguments were not provided",
        ),
        (
            &config,
            vec!["run", "--name", "a/b", "--", "true"],
            2,
            "--name \"a/b\"",
        ),
        (
            &config,
            vec!["run", "--name", ".x", "--", "true"],
            2,
            "--name \".x\"",
        ),
        (
            &config,
            vec!["run", "--", "/nonexistent/app"],
            127,
            "/nonexistent/app: command not found",
        ),
        (
            &config,
            vec!["run", "--", not_executable],
            126,
            "app: cannot run it",
        ),
        (&missing, vec!["run", "--", "true"], 2, "missing.toml"),
    ];
    for (config, args, code, message) in cases {
        let out = caller.command_with(config, &args).output().unwrap();
        let lines = stderr_lines(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {lines:?}");
        let errors: Vec<&String> = lines.iter().filter(|l| !l.contains(" INFO ")).collect();
        assert!(
            errors.iter().any(|l| l.contains(message)),
            "{args:?}: {lines:?}"
        );
        assert!(
            errors.len() == 1 || args.len() == 1,
            "{args:?}: more than one line: {lines:?}"
        );
        caller.assert_nothing_left(&format!("{args:?}"));
    }
    // A sudo user that does not exist: the app is not run as root instead.
    let mut ghost = caller.command(&["run", "--", "true"]);
    ghost.env("SUDO_UID", "4242424");
    let out = ghost.output().unwrap();
    let lines = stderr_lines(&out);
    let errors: Vec<&String> = lines.iter().filter(|l| !l.contains(" INFO ")).collect();
    assert_eq!(out.status.code(), Some(1), "{lines:?}");
    assert!(
        errors.len() == 1 && errors[0].contains("names no user"),
        "{lines:?}"
    );
    caller.assert_nothing_left("an unknown sudo user");
    // A cgroup of that name that someone else can change is not taken over.
    let theirs = caller.app_path("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let out = caller.run(&["run", "--name", "theirs", "--", "true"]);
    let lines = stderr_lines(&out);
    assert_eq!(out.status.code(), Some(1), "{lines:?}");
    assert!(
        lines.len() == 1 && lines[0].contains("others than root can change it"),
        "{lines:?}"
    );
    std::fs::remove_dir(&theirs).unwrap();
    std::fs::remove_dir(theirs.parent().unwrap()).unwrap();
    caller.assert_nothing_left("someone else's cgroup");
    // Without root's privileges the cgroup cannot be made: one line, nothing made.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(killswitch_bin())
        .args(["--config", config.to_str().unwrap(), "run", "--", "true"])
        .env("KILLSWITCH_PIN_ROOT", &pins.path)
        .env("KILLSWITCH_STATE_DIR", &pins.state)
        .output()
        .unwrap();
    let lines = stderr_lines(&out);
    assert_eq!(out.status.code(), Some(1), "{lines:?}");
    assert!(
        lines.len() == 1 && lines[0].contains("needs root"),
        "{lines:?}"
    );
    caller.assert_nothing_left("unprivileged");
}

#[test]
fn a_killed_run_leaves_the_scope_enforced_until_down() {
    require_root!();
    let (netns, pins, cgroup) = (Netns::new("run"), PinRoot::new(), Cgroup::new());
    let scratch = Scratch(testbed::private_dir("ksrun"));
    let dir = &scratch.0;
    let config = config_file(dir, CONFIG);
    let caller = Caller::new(&netns, &pins, &cgroup, &config);
    for backend in ["ebpf", "nftables"] {
        let run = caller.background(&[
            "run",
            "--backend",
            backend,
            "--name",
            "app",
            "--",
            "sleep",
            "20",
        ]);
        let app = caller.app("app");
        let started = Instant::now();
        // Enforced, and the app started in it (the run spawns it once the scope holds).
        let app_running = || {
            std::fs::read_to_string(caller.app_path("app").join("cgroup.procs"))
                .is_ok_and(|p| !p.trim().is_empty())
        };
        while !killswitch(&netns, &pins, &["status", "--cgroup", &app])
            .status
            .success()
            || !app_running()
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{backend}: never enforced"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = caller.killswitch_pid().expect("the run's process");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        // The app still runs, held: `status` lists the scope among all, `down` removes it.
        let status = killswitch_ok(&netns, &pins, &["status"]);
        assert!(
            status.contains(&app),
            "{backend}: status does not list {app}: {status}"
        );
        assert!(
            std::fs::read_to_string(caller.app_path("app").join("cgroup.procs"))
                .is_ok_and(|p| !p.trim().is_empty()),
            "{backend}: the app was killed with the run"
        );
        killswitch_ok(&netns, &pins, &["down", "--cgroup", &app]);
        assert!(!killswitch(&netns, &pins, &["status", "--cgroup", &app])
            .status
            .success());
        drop(run);
        let _ = std::fs::write(caller.app_path("app").join("cgroup.kill"), "1");
        eprintln!("{backend}: the scope outlived a SIGKILLed run and went with `down`");
    }
}

/// `ks-probe ARGS` in the story's client namespace, from the cgroup at `cgroup`.
fn probe_from(story: &Story, cgroup: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"echo $$ > "$1" || exit 125; ns=$2; shift 2; exec nsenter --net="$ns" -- timeout 5 "$@""#)
        .arg("sh")
        .arg(cgroup.join("cgroup.procs"))
        .arg(story.lab.client.path())
        .arg(probe_bin())
        .args(args);
    command
}

/// A TCP request to the web host from `cgroup` in the story's client namespace.
fn request_from(story: &Story, cgroup: &Path, port: u16) -> bool {
    let target = format!("{WEB_HOST}:{port}");
    probe_from(story, cgroup, &["tcp", &target, "1000"])
        .output()
        .unwrap()
        .status
        .success()
}

/// `killswitch daemon` for the story's scope with `backend`, once it enforces the scope.
fn daemon(story: &Story, backend: &str) -> Background {
    let config = story.lab.dir().join("killswitch.toml");
    let daemon = quiet_background(killswitch_command(
        &story.lab.client,
        &story.pins,
        &[
            "--config",
            config.to_str().unwrap(),
            "daemon",
            "--backend",
            backend,
            "--cgroup",
            &story.cgroup.relative,
        ],
    ));
    wait_enforced(story, &story.cgroup.relative);
    daemon
}

/// The per-app story over real OpenVPN: the app is held when the tunnel dies while a process
/// outside its scope is not, a reconnect is followed with no re-run, and the scope goes when the
/// app exits.
fn per_app(backend: &'static str) {
    let mut story = Story::new();
    let caller = Caller::new(
        &story.lab.client,
        &story.pins,
        &story.cgroup,
        &story.lab.dir().join("killswitch.toml"),
    );
    story.lab.connect();
    let mut run = caller.background(&[
        "run",
        "--backend",
        backend,
        "--name",
        "app",
        "--",
        "sleep",
        "60",
    ]);
    let app = caller.app_path("app");
    let app_relative = caller.app("app");
    let started = Instant::now();
    while !killswitch(
        &story.lab.client,
        &story.pins,
        &["status", "--cgroup", &app_relative],
    )
    .status
    .success()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never enforced"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let outside = story.cgroup.child("outside");
    assert!(
        request_from(&story, &app, APP_PORT),
        "the app cannot reach the web through the tunnel"
    );

    let old = story.lab.tunnel_ifindex();
    story.lab.kill_vpn_client();
    story.lab.start_capture();
    let app_reached = request_from(&story, &app, APP_PORT);
    let outside_reached = request_from(&story, &outside.path, OUTSIDE_PORT);
    let leaked = story
        .lab
        .stop_capture(&format!("dst host {WEB_HOST} and tcp dst port {APP_PORT}"));
    let clear = story.lab.captured(&format!(
        "dst host {WEB_HOST} and tcp dst port {OUTSIDE_PORT}"
    ));
    assert!(
        !app_reached,
        "{backend}: the app reached the web with the tunnel dead"
    );
    assert!(leaked.is_empty(), "{backend}: the app leaked: {leaked:?}");
    assert!(
        outside_reached && !clear.is_empty(),
        "{backend}: the process outside was held too (or the oracle is blind)"
    );

    story.lab.connect();
    let new = story.lab.tunnel_ifindex();
    let started = Instant::now();
    while !request_from(&story, &app, APP_PORT) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{backend}: the reconnect (ifindex {old:?} -> {new:?}) was not followed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The app ends: the scope and its cgroup go, and the run ends with the app's status.
    let _ = std::fs::write(app.join("cgroup.kill"), "1");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = run.exited() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the run did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(128 + 9));
    assert!(!app.exists(), "the app's cgroup is left");
    assert!(!killswitch(
        &story.lab.client,
        &story.pins,
        &["status", "--cgroup", &app_relative]
    )
    .status
    .success());
    eprintln!(
        "{backend}: app held ({} leaked) while the outside process reached the web in the clear \
         ({} packets seen); reconnect {old:?} -> {new:?} followed; scope gone with the app",
        leaked.len(),
        clear.len()
    );
}

#[test]
fn an_app_in_its_scope_is_held_and_the_rest_is_not_ebpf() {
    require_root!();
    per_app("ebpf");
}

#[test]
fn an_app_in_its_scope_is_held_and_the_rest_is_not_nftables() {
    require_root!();
    per_app("nftables");
}

/// `[vpn_client]` over real OpenVPN: the client started with `run --vpn-client` has its tunnel;
/// another process sending to the server's address and port is refused and nothing of it
/// reaches the router; a marked socket is let through; a client restarted in a new cgroup
/// connects again.
fn vpn_client(backend: &'static str) {
    let mut story = Story::new();
    story.write_config(&format!(
        "{}\n[vpn_client]\nmark = 0xca6c\n",
        Story::valid_config()
    ));
    // The daemon trusts the tunnel each time it comes up (and follows the client's cgroup).
    let daemon = daemon(&story, backend);
    let caller = Caller::new(
        &story.lab.client,
        &story.pins,
        &story.cgroup,
        &story.lab.dir().join("killswitch.toml"),
    );
    let mut timings = Vec::new();
    for round in 0..2 {
        let mut args = vec!["run", "--vpn-client", "--"];
        let command = story.lab.client_command();
        args.extend(command.iter().map(String::as_str));
        let started = Instant::now();
        let client = caller.background(&args);
        timings.push(story.lab.wait_connected(started));
        let status = String::from_utf8_lossy(&story.killswitch(&["status"]).stdout).into_owned();
        assert!(
            status.contains(&format!(
                "client   only mark 0xca6c or cgroup {}/killswitch-vpn-client/openvpn may reach the servers",
                caller.relative
            )),
            "{backend}: status does not say who the client is:\n{status}"
        );
        let app = story.cgroup.child(&format!("app{round}"));
        assert!(
            request_from(&story, &app.path, APP_PORT),
            "{backend}: no tunnel for the app"
        );

        story.lab.start_capture();
        let probe = |mark: Option<&str>, port: &str| {
            let server = format!("{VPN_SERVER}:{VPN_PORT}");
            let mut command = probe_from(&story, &app.path, &["udp", &server, "300", port]);
            if let Some(mark) = mark {
                command.env("KS_PROBE_MARK", mark);
            }
            let out = command.output().unwrap();
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        let unmarked = probe(None, "40404");
        let marked = probe(Some("0xca6c"), "40405");
        std::thread::sleep(Duration::from_millis(200));
        let other = story.lab.stop_capture("udp and src port 40404");
        let with_mark = story.lab.captured("udp and src port 40405");
        assert!(
            other.is_empty(),
            "{backend}: another process reached the server: {other:?}"
        );
        assert!(
            unmarked.contains("Operation not permitted"),
            "{backend}: the other process was not refused: {unmarked}"
        );
        assert!(
            !with_mark.is_empty(),
            "{backend}: the marked socket was held ({marked})"
        );

        // The client stops (SIGTERM goes on to it); the next round starts it in a new cgroup.
        let pid = caller.killswitch_pid().expect("the run's process");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let stopped = Instant::now();
        while caller.cgroup.join("killswitch-vpn-client/openvpn").exists() {
            assert!(
                stopped.elapsed() < Duration::from_secs(10),
                "{backend}: the client's cgroup stayed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(client);
    }
    drop(daemon);
    eprintln!(
        "{backend}: the VPN client connected in {:?} and again in a new cgroup in {:?}; another \
         process to {VPN_SERVER}:{VPN_PORT} refused with nothing on the wire; a marked socket let through",
        timings[0], timings[1]
    );
}

#[test]
fn only_the_vpn_client_reaches_the_server_ebpf() {
    require_root!();
    vpn_client("ebpf");
}

#[test]
fn only_the_vpn_client_reaches_the_server_nftables() {
    require_root!();
    vpn_client("nftables");
}

/// Waits (bounded) until `status --cgroup` says the scope is enforced.
fn wait_enforced(story: &Story, relative: &str) {
    let started = Instant::now();
    while !killswitch(
        &story.lab.client,
        &story.pins,
        &["status", "--cgroup", relative],
    )
    .status
    .success()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{relative} never enforced"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two per-app scopes with different policies side by side, both inside the system-wide
/// stand-in with a third: each holds its own sockets to its own rules, and nested scopes
/// compose (a packet must pass every scope above its socket).
fn side_by_side(backend: &'static str) {
    let story = Story::new();
    let dir = story.lab.dir();
    let server = |ports: &[u16]| -> String {
        let mut text = String::from("tunnels = [\"tun0\"]\n");
        for port in ports {
            text.push_str(&format!(
                "[[server]]\naddress = \"{WEB_HOST}\"\nport = {port}\nprotocol = \"tcp\"\n"
            ));
        }
        text
    };
    let system = dir.join("system.toml");
    testbed::write_config(&system, &server(&[APP_PORT, OUTSIDE_PORT]));
    let (only_app, only_outside) = (dir.join("a.toml"), dir.join("b.toml"));
    testbed::write_config(&only_app, &server(&[APP_PORT]));
    testbed::write_config(&only_outside, &server(&[OUTSIDE_PORT]));
    killswitch_ok(
        &story.lab.client,
        &story.pins,
        &[
            "--config",
            system.to_str().unwrap(),
            "up",
            "--backend",
            backend,
            "--cgroup",
            &story.cgroup.relative,
        ],
    );
    let caller = Caller::new(&story.lab.client, &story.pins, &story.cgroup, &system);
    let runs: Vec<Background> = [("a", &only_app), ("b", &only_outside)]
        .into_iter()
        .map(|(name, config)| {
            caller.background_with(
                config,
                &[
                    "run",
                    "--backend",
                    backend,
                    "--name",
                    name,
                    "--",
                    "sleep",
                    "30",
                ],
            )
        })
        .collect();
    wait_enforced(&story, &caller.app("a"));
    wait_enforced(&story, &caller.app("b"));
    let elsewhere = story.cgroup.child("elsewhere");
    let reach = |cgroup: &Path| {
        (
            request_from(&story, cgroup, APP_PORT),
            request_from(&story, cgroup, OUTSIDE_PORT),
        )
    };
    assert_eq!(
        reach(&caller.app_path("a")),
        (true, false),
        "{backend}: scope a"
    );
    assert_eq!(
        reach(&caller.app_path("b")),
        (false, true),
        "{backend}: scope b"
    );
    assert_eq!(
        reach(&elsewhere.path),
        (true, true),
        "{backend}: the system-wide stand-in"
    );
    // Inside scope a, a policy wider than the one above it still gets no more than that one.
    killswitch_ok(
        &story.lab.client,
        &story.pins,
        &[
            "--config",
            system.to_str().unwrap(),
            "up",
            "--backend",
            backend,
            "--cgroup",
            &caller.app("a"),
        ],
    );
    testbed::write_config(&system, &server(&[OUTSIDE_PORT]));
    killswitch_ok(
        &story.lab.client,
        &story.pins,
        &[
            "--config",
            system.to_str().unwrap(),
            "up",
            "--backend",
            backend,
            "--cgroup",
            &story.cgroup.relative,
        ],
    );
    assert_eq!(
        reach(&caller.app_path("a")),
        (false, true),
        "{backend}: nested scopes"
    );
    for name in ["a", "b"] {
        let _ = std::fs::write(caller.app_path(name).join("cgroup.kill"), "1");
    }
    drop(runs);
    eprintln!("{backend}: two per-app scopes and the system-wide one each held to their own policy; nested scopes compose");
}

#[test]
fn scopes_side_by_side_each_enforce_their_own_policy_ebpf() {
    require_root!();
    side_by_side("ebpf");
}

#[test]
fn scopes_side_by_side_each_enforce_their_own_policy_nftables() {
    require_root!();
    side_by_side("nftables");
}

/// `[vpn_client] cgroup` names the client's unit cgroup: the daemon follows it being removed
/// and made again (a restarted systemd service gets a new cgroup id), and nothing else in the
/// scope reaches the server.
fn restarted_client(backend: &'static str) {
    let mut story = Story::new();
    let unit = format!("{}/openvpn", story.cgroup.relative);
    story.write_config(&format!(
        "{}\n[vpn_client]\ncgroup = \"{unit}\"\n",
        Story::valid_config()
    ));
    let daemon = daemon(&story, backend);
    let app = story.cgroup.child("app");
    let mut timings = Vec::new();
    for round in 0..3 {
        // A new cgroup each time, as systemd makes one for each start of a unit.
        let client = story.cgroup.child("openvpn");
        timings.push(story.lab.connect_in(Some(&client)));
        assert!(
            request_from(&story, &app.path, APP_PORT),
            "{backend}, round {round}: no tunnel"
        );
        story.lab.kill_vpn_client();
        drop(client);
    }
    // Another process of the scope, to the server: refused.
    let server = format!("{VPN_SERVER}:{VPN_PORT}");
    let other = probe_from(&story, &app.path, &["udp", &server, "300"])
        .output()
        .unwrap();
    let refused = String::from_utf8_lossy(&other.stderr);
    assert!(
        refused.contains("Operation not permitted"),
        "{backend}: {refused}"
    );
    drop(daemon);
    eprintln!("{backend}: the client connected from 3 cgroups made one after the other in {timings:?}; anyone else refused");
}

#[test]
fn a_vpn_client_restarted_in_a_new_cgroup_is_followed_ebpf() {
    require_root!();
    restarted_client("ebpf");
}

#[test]
fn a_vpn_client_restarted_in_a_new_cgroup_is_followed_nftables() {
    require_root!();
    restarted_client("nftables");
}
