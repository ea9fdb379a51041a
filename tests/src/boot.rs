//! A real systemd boot: a minimal Debian root made once with debootstrap (from the mirror this
//! machine's apt uses, cached beside the build), booted with `systemd-nspawn` inside a network
//! namespace and a child cgroup of the test. Each boot runs on an overlay of its own, so the
//! cached root never changes, and a router-side capture is the oracle for what left the machine.
//!
//! The container's cgroup root is `CHILD/payload` on the host: nspawn takes its own cgroup from
//! the `name=systemd` hierarchy where one exists (hybrid setups, as here), so the boot joins a
//! child of the same name there too, and refuses to start unless both say `CHILD`.

use std::{
    os::unix::{
        fs::{DirBuilderExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{Cgroup, Netns};

/// The release booted: the one this machine kind runs.
pub const SUITE: &str = "bookworm";
/// What debootstrap adds to `minbase`: an init that boots, and `ip` to look around with.
const PACKAGES: &str = "systemd,systemd-sysv,dbus,iproute2";
/// A marker written last: a root without it is half-built and made again.
const COMPLETE: &str = "complete";

/// Roots are built one at a time: both boot tests want the same one.
static BUILDING: Mutex<()> = Mutex::new(());

/// Where roots and the boots' scratch directories live: beside the build, like the kernels.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("boot-root")
}

/// The first tool a boot needs that is missing (`cargo xtask setup` installs them).
pub fn missing_tool() -> Option<&'static str> {
    [
        "debootstrap",
        "systemd-nspawn",
        "systemctl",
        "unshare",
        "tcpdump",
    ]
    .into_iter()
    .find(|tool| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A `minbase` root of `suite` with systemd, in `cache_dir()/suite/root`, built once (about a
/// minute, 250 MB). `Err` only when debootstrap cannot get the archive (the caller may skip);
/// anything else that goes wrong panics.
pub fn debian_root(suite: &str) -> Result<PathBuf, String> {
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).unwrap();
    // Another test process may be building it too.
    let lock = std::fs::File::create(cache.join(format!("{suite}.lock"))).unwrap();
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock");
    let dir = cache.join(suite);
    let root = dir.join("root");
    if dir.join(COMPLETE).exists() && root.join("lib/systemd/systemd").exists() {
        return Ok(root);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mirror = crate::vm::mirror()?;
    let started = Instant::now();
    let out = Command::new("timeout")
        .args(["900", "debootstrap", "--variant=minbase"])
        .arg(format!("--include={PACKAGES}"))
        .arg(suite)
        .arg(&root)
        .arg(&mirror)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run debootstrap");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        // Its first step fetches the suite's Release file; then every package is a download.
        if log.contains("release file") || log.to_lowercase().contains("download") {
            return Err(format!("debootstrap {suite} from {mirror}: {last}"));
        }
        panic!(
            "debootstrap {suite} from {mirror} failed ({}): {last}\n{log}",
            out.status
        );
    }
    std::fs::write(dir.join(COMPLETE), format!("{mirror}\n")).unwrap();
    eprintln!(
        "built the Debian {suite} root in {:.0} s ({})",
        started.elapsed().as_secs_f64(),
        root.display()
    );
    Ok(root)
}

/// One boot of a cached root: files of its own in an overlay's upper directory, its own child
/// cgroup (in both hierarchies where `name=systemd` exists). On drop every process in the cgroup
/// is killed and the cgroups and the scratch directory are removed.
pub struct Container {
    pub name: String,
    lower: PathBuf,
    dir: PathBuf,
    enabled: Vec<String>,
    /// The `name=systemd` child (cgroup v1), where the host has that hierarchy.
    legacy: Option<PathBuf>,
    child: Option<Child>,
    /// Declared last: removed after everything inside it.
    cgroup: Cgroup,
}

/// What a boot left behind.
pub struct Booted {
    /// nspawn's exit status: 0 when the container powered itself off.
    pub status: ExitStatus,
    /// Everything nspawn and the container's console printed.
    pub console: String,
    pub took: Duration,
}

impl Container {
    pub fn new(root: &Path) -> Container {
        let cgroup = Cgroup::new();
        let name = cgroup.relative.replace("kstest", "ksboot");
        let dir = cache_dir().join("cases").join(&name);
        for sub in ["upper", "work", &name] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // The upper directory's root is the container's `/`.
        std::fs::set_permissions(dir.join("upper"), PermissionsExt::from_mode(0o755)).unwrap();
        let legacy = legacy_systemd_mount().map(|mount| {
            let path = mount.join(&cgroup.relative);
            std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
            path
        });
        Container {
            name,
            lower: root.to_owned(),
            dir,
            enabled: Vec::new(),
            legacy,
            child: None,
            cgroup,
        }
    }

    /// The host's cgroup that is the container's cgroup root (valid until drop).
    pub fn payload_cgroup(&self) -> PathBuf {
        self.cgroup.path.join("payload")
    }

    /// The scratch directory, removed on drop (for the capture file, say).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a file into the container (its upper layer), parents made with the modes the
    /// root has for them.
    pub fn add_file(&self, at: &str, mode: u32, contents: impl AsRef<[u8]>) {
        let target = self.upper(at);
        self.make_parents(at);
        std::fs::write(&target, contents).unwrap_or_else(|e| panic!("{}: {e}", target.display()));
        std::fs::set_permissions(&target, PermissionsExt::from_mode(mode)).unwrap();
    }

    /// Installs a program (without its debug info when `strip` can do that).
    pub fn add_binary(&self, source: &Path, at: &str) {
        let target = self.upper(at);
        self.make_parents(at);
        crate::vm::copy_stripped(source, &target);
        std::fs::set_permissions(&target, PermissionsExt::from_mode(0o755)).unwrap();
    }

    /// A unit to enable at boot (`systemctl --root=… enable`, from its `[Install]` section).
    pub fn enable(&mut self, unit: &str) {
        self.enabled.push(unit.to_owned());
    }

    /// A file the boot left in the container, if any.
    pub fn read(&self, at: &str) -> Option<String> {
        std::fs::read_to_string(self.upper(at)).ok()
    }

    /// Boots the container in `netns` until it powers off; nspawn is stopped after `limit`.
    pub fn boot(&mut self, netns: &Netns, limit: Duration) -> Booted {
        assert!(self.child.is_none(), "booted already");
        let console = self.dir.join("console.log");
        let log = std::fs::File::create(&console).unwrap();
        let relative = format!("/{}", self.cgroup.relative);
        let legacy_procs = self
            .legacy
            .as_ref()
            .map(|l| l.join("cgroup.procs").display().to_string())
            .unwrap_or_default();
        let started = Instant::now();
        let child = Command::new("sh")
            .args(["-c", JOIN, "sh"])
            .arg(self.cgroup.procs())
            .arg(legacy_procs)
            .arg(&relative)
            .arg(INSIDE)
            .arg(&self.lower)
            .arg(self.dir.join("upper"))
            .arg(self.dir.join("work"))
            .arg(self.dir.join(&self.name))
            .arg(&self.name)
            .arg(netns.path())
            .arg(limit.as_secs().to_string())
            .args(&self.enabled)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start systemd-nspawn");
        let child = self.child.insert(child);
        // nspawn's own timeout ends it; this bounds the wait if even that hangs.
        let deadline = limit + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for nspawn") {
                break status;
            }
            if started.elapsed() > deadline {
                kill_group(child);
                break child.wait().expect("wait for nspawn");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.child = None;
        Booted {
            status,
            console: std::fs::read_to_string(&console).unwrap_or_default(),
            took: started.elapsed(),
        }
    }

    fn upper(&self, at: &str) -> PathBuf {
        self.dir.join("upper").join(at.trim_start_matches('/'))
    }

    /// Creates `at`'s missing parents in the upper layer with the lower layer's modes (a
    /// directory in both takes the upper one's mode: a 0700 /etc would break the boot).
    fn make_parents(&self, at: &str) {
        let mut relative = PathBuf::new();
        let parent = Path::new(at.trim_start_matches('/'))
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        for part in parent.components() {
            relative.push(part);
            let upper = self.dir.join("upper").join(&relative);
            if upper.is_dir() {
                continue;
            }
            let mode = std::fs::metadata(self.lower.join(&relative))
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o755);
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(&upper)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", upper.display()));
            std::fs::set_permissions(&upper, PermissionsExt::from_mode(mode)).unwrap();
        }
    }
}

/// Joins the child cgroup (both hierarchies), checks that nspawn will see exactly that
/// cgroup as its own, then enters a private mount namespace for the rest. Arguments: v2
/// `cgroup.procs`, `name=systemd` `cgroup.procs` or empty, the cgroup's path, then [`INSIDE`] and
/// its arguments.
const JOIN: &str = r#"
echo $$ > "$1" || exit 125
if [ -n "$2" ]; then echo $$ > "$2" || exit 125; fi
grep -qx "0::$3" /proc/self/cgroup || { echo "not in $3" >&2; exit 125; }
if grep -q ':name=systemd:' /proc/self/cgroup; then
    grep -qx "[0-9]*:name=systemd:$3" /proc/self/cgroup || { echo "not in name=systemd:$3" >&2; exit 125; }
fi
script=$4
shift 4
exec unshare --mount --propagation private -- sh -c "$script" sh "$@"
"#;

/// In the private mount namespace: nspawn's runtime files on a tmpfs of their own, the
/// overlay, the units enabled, then the boot, under `timeout`. Arguments: lower, upper, work,
/// mount point, machine name, network namespace, limit in seconds, units to enable.
const INSIDE: &str = r#"
lower=$1 upper=$2 work=$3 top=$4 name=$5 netns=$6 limit=$7
shift 7
if [ -d /run/systemd ]; then mount -t tmpfs -o mode=0755 tmpfs /run/systemd || exit 125; fi
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$top" || exit 125
if [ $# -gt 0 ]; then systemctl --root="$top" enable "$@" || exit 125; fi
exec timeout -k 5 "$limit" systemd-nspawn --register=no --keep-unit --machine="$name" \
    -D "$top" --network-namespace-path="$netns" --capability=all --system-call-filter=bpf \
    --setenv=SYSTEMD_COLORS=0 -b
"#;

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
            let _ = child.wait();
        }
        // Everything the boot started is in the cgroup: end it all, then remove what nspawn
        // and the container's systemd made inside it, bottom up.
        let _ = std::fs::write(self.cgroup.path.join("cgroup.kill"), "1");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            let events =
                std::fs::read_to_string(self.cgroup.path.join("cgroup.events")).unwrap_or_default();
            if !events.lines().any(|l| l == "populated 1") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        remove_cgroups_below(&self.cgroup.path);
        if let Some(legacy) = &self.legacy {
            remove_cgroups_below(legacy);
            remove_cgroup(legacy);
        }
        // The overlay was mounted only in the boot's own mount namespace, gone with it.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn kill_group(child: &mut Child) {
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
}

/// Removes every cgroup below `dir` (not `dir` itself), deepest first.
fn remove_cgroups_below(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroups_below(&path);
            remove_cgroup(&path);
        }
    }
}

fn remove_cgroup(dir: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("warning: could not remove cgroup {}", dir.display());
}

/// The `name=systemd` (cgroup v1) mount, when this process is in that hierarchy.
fn legacy_systemd_mount() -> Option<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if !own.lines().any(|l| l.contains(":name=systemd:")) {
        return None;
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut fields = right.split_whitespace();
        let fstype = fields.next()?;
        let options = fields.nth(1)?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup" && options.split(',').any(|o| o == "name=systemd"))
            .then(|| PathBuf::from(mount_point))
    })
}
