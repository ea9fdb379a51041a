//! Other kernels in qemu: Debian's kernel packages fetched with apt into a cache directory (the
//! machine's apt state untouched), booted with an initramfs that holds the test binaries and the
//! tools they drive. The guest reports on its serial console: `KS-EXIT STEP CODE` per step.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

/// A kernel release unpacked from its Debian package.
#[derive(Clone, Debug)]
pub struct DebianKernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// Fetches run one at a time: two tests may want the same kernel.
static FETCHING: Mutex<()> = Mutex::new(());

impl DebianKernel {
    /// The newest package of `suite` whose name matches `name_regex` (apt-cache search syntax),
    /// from the mirrors this machine's apt already uses, with `suite` in place of its own
    /// release. Cached in `cache/suite`. `Err` only when the archive cannot be reached (the
    /// caller may skip); anything else that goes wrong panics.
    pub fn fetch(cache: &Path, suite: &str, name_regex: &str) -> Result<DebianKernel, String> {
        let _one_at_a_time = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
        let dir = cache.join(suite);
        let marker = dir.join("release");
        if let Ok(release) = std::fs::read_to_string(&marker) {
            if let Some(kernel) = unpacked(&dir, release.trim()) {
                return Ok(kernel);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["lists/partial", "cache/archives/partial", "deb", "x"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let sources = dir.join("sources.list");
        std::fs::write(&sources, sources_for(suite)?).unwrap();
        let apt_options = [
            format!("Dir::Etc::sourcelist={}", sources.display()),
            "Dir::Etc::sourceparts=-".into(),
            format!("Dir::State::Lists={}", dir.join("lists").display()),
            format!("Dir::Cache={}", dir.join("cache").display()),
            "APT::Get::List-Cleanup=0".into(),
        ];
        let apt = |tool: &str, args: &[&str], cwd: &Path| -> Result<String, String> {
            let mut cmd = Command::new("timeout");
            cmd.args(["300", tool]).current_dir(cwd);
            for option in &apt_options {
                cmd.args(["-o", option]);
            }
            let out = cmd
                .args(args)
                .output()
                .map_err(|e| format!("{tool}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{tool} {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        apt("apt-get", &["update", "-q"], &dir)?;
        // From here on the archive answered: a failure is a broken test, not a missing archive.
        let found = apt("apt-cache", &["search", "--names-only", name_regex], &dir)
            .unwrap_or_else(|e| panic!("{e}"));
        let package = found
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .max_by_key(|name| version_key(name))
            .unwrap_or_else(|| panic!("no package matches {name_regex} in {suite}"))
            .to_owned();
        apt("apt-get", &["download", "-q", &package], &dir.join("deb"))
            .unwrap_or_else(|e| panic!("{e}"));
        for deb in std::fs::read_dir(dir.join("deb")).unwrap() {
            let deb = deb.unwrap().path();
            crate::run(
                "dpkg-deb",
                &["-x", deb.to_str().unwrap(), dir.join("x").to_str().unwrap()],
            );
            let _ = std::fs::remove_file(&deb);
        }
        let release = package
            .trim_start_matches("linux-image-")
            .trim_end_matches("-unsigned")
            .to_owned();
        let kernel = unpacked(&dir, &release)
            .unwrap_or_else(|| panic!("{package} holds no vmlinuz-{release} and modules"));
        std::fs::write(&marker, &release).unwrap();
        Ok(kernel)
    }
}

fn unpacked(dir: &Path, release: &str) -> Option<DebianKernel> {
    let x = dir.join("x");
    let vmlinuz = x.join(format!("boot/vmlinuz-{release}"));
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|m| x.join(m).join(release))
        .find(|m| m.is_dir())?;
    vmlinuz.exists().then(|| DebianKernel {
        release: release.to_owned(),
        vmlinuz,
        modules,
    })
}

/// Orders package names by the numbers in them (6.1.0-57 after 6.1.0-9).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// A one-line sources list for `suite` from the mirrors this machine's apt uses (deb822
/// `.sources` files or `sources.list`), its own release name replaced by `suite`.
fn sources_for(suite: &str) -> Result<String, String> {
    let (own, entries) = apt_entries()?;
    let lines: Vec<String> = entries
        .iter()
        .filter(|(_, s)| s == &own || s == &format!("{own}-security"))
        .map(|(uri, s)| {
            format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {uri} {} main",
                s.replacen(&own, suite, 1)
            )
        })
        .collect();
    if lines.is_empty() {
        return Err("this machine's apt sources name no Debian mirror".into());
    }
    Ok(lines.join("\n") + "\n")
}

/// The mirror this machine's apt uses for its own release (not its security archive), for
/// `debootstrap SUITE ROOT MIRROR`: the same archive serves every suite.
pub fn mirror() -> Result<String, String> {
    let (own, entries) = apt_entries()?;
    entries
        .into_iter()
        .find(|(_, s)| s == &own)
        .map(|(uri, _)| uri)
        .ok_or_else(|| format!("this machine's apt sources name no mirror for {own}"))
}

/// This machine's release name and its apt entries as (URI, suite).
fn apt_entries() -> Result<(String, Vec<(String, String)>), String> {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let own = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_owned())
        .ok_or("this machine names no Debian release in /etc/os-release")?;
    let mut entries: Vec<(String, String)> = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        if file.extension().is_some_and(|e| e == "sources") {
            for stanza in text.split("\n\n") {
                let field = |name: &str| {
                    stanza.lines().find_map(|l| {
                        l.strip_prefix(name)
                            .and_then(|rest| rest.strip_prefix(':'))
                            .map(|v| v.trim().to_owned())
                    })
                };
                let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
                    continue;
                };
                if field("Types").is_some_and(|t| !t.split_whitespace().any(|t| t == "deb")) {
                    continue;
                }
                for uri in uris.split_whitespace() {
                    for s in suites.split_whitespace() {
                        entries.push((uri.to_owned(), s.to_owned()));
                    }
                }
            }
        } else {
            for line in text.lines() {
                let words: Vec<&str> = line
                    .split_whitespace()
                    .filter(|w| !w.starts_with('[') && !w.ends_with(']'))
                    .collect();
                if let ["deb", uri, s, ..] = words.as_slice() {
                    entries.push((uri.to_string(), s.to_string()));
                }
            }
        }
    }
    Ok((own, entries))
}

/// A root file system for the guest, packed as a newc cpio archive; both are removed on drop.
pub struct Initramfs {
    root: PathBuf,
    archive: PathBuf,
}

impl Initramfs {
    pub fn new() -> Initramfs {
        let root = std::env::temp_dir().join(crate::unique_name("ksinitrd"));
        let archive = root.with_extension("cpio");
        for dir in [
            "bin", "sbin", "usr/bin", "proc", "sys", "dev", "run", "tmp", "etc", "ks", "root",
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
        let mut initramfs = Initramfs { root, archive };
        initramfs.add_binary(Path::new("/bin/busybox"), "/bin/busybox");
        initramfs
    }

    /// Copies a program (without its debug info) and every shared library it loads.
    pub fn add_binary(&mut self, source: &Path, at: &str) {
        let target = self.path(at);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        copy_stripped(source, &target);
        let libraries = Command::new("ldd").arg(source).output().unwrap();
        for library in String::from_utf8_lossy(&libraries.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let target = self.path(library);
            if !target.exists() {
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::copy(library, &target).unwrap();
            }
        }
    }

    /// A kernel module from `modules` (decompressed: busybox's insmod reads plain .ko files).
    pub fn add_module(&mut self, modules: &Path, name: &str) {
        assert!(self.add_module_if_built(modules, name), "no {name}.ko");
    }

    /// [`Initramfs::add_module`] for a module this kernel may have built in instead: false
    /// when there is no such module file.
    pub fn add_module_if_built(&mut self, modules: &Path, name: &str) -> bool {
        let out = Command::new("find")
            .arg(modules)
            .args(["-name", &format!("{name}.ko*")])
            .output()
            .unwrap();
        let found = String::from_utf8_lossy(&out.stdout);
        let Some(source) = found.lines().next() else {
            return false;
        };
        let target = self.path(&format!("/ks/{name}.ko"));
        if source.ends_with(".xz") {
            let plain = Command::new("xz").args(["-dc", source]).output().unwrap();
            assert!(plain.status.success(), "xz -d {source}");
            std::fs::write(&target, plain.stdout).unwrap();
        } else {
            std::fs::copy(source, &target).unwrap();
        }
        true
    }

    pub fn add_script(&mut self, at: &str, text: &str) {
        let target = self.path(at);
        std::fs::write(&target, text).unwrap();
        std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }

    fn path(&self, at: &str) -> PathBuf {
        self.root.join(at.trim_start_matches('/'))
    }

    /// Packs the tree and returns the archive's path (valid while `self` lives).
    pub fn pack(&self) -> &Path {
        let script = format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            self.root.display(),
            self.archive.display()
        );
        crate::run("sh", &["-c", &script]);
        &self.archive
    }
}

impl Default for Initramfs {
    fn default() -> Self {
        Initramfs::new()
    }
}

impl Drop for Initramfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_file(&self.archive);
    }
}

/// The guest's console output and how long the boot took.
pub struct Boot {
    pub console: String,
    pub took: Duration,
}

impl Boot {
    /// The exit code the guest reported for a step, if it got that far.
    pub fn exit(&self, step: &str) -> Option<i32> {
        self.console.lines().find_map(|l| {
            let rest = l.trim().strip_prefix("KS-EXIT ")?;
            let (name, code) = rest.split_once(' ')?;
            (name == step).then(|| code.trim().parse().ok())?
        })
    }
}

/// Boots `kernel` under qemu (software emulation: KVM does not work here) until the guest
/// powers off, or kills it after `limit`.
pub fn boot(kernel: &DebianKernel, initramfs: &Path, append: &str, limit: Duration) -> Boot {
    let started = Instant::now();
    let out = Command::new("timeout")
        .args([
            "-s",
            "KILL",
            &limit.as_secs().to_string(),
            "qemu-system-x86_64",
        ])
        .args([
            "-cpu",
            "max",
            "-m",
            "2048",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", &format!("console=ttyS0 panic=-1 quiet {append}")])
        .output()
        .expect("cannot run qemu-system-x86_64");
    Boot {
        console: String::from_utf8_lossy(&out.stdout).into_owned(),
        took: started.elapsed(),
    }
}

/// Copies a program to `target` without its debug info when `strip` can do that.
pub fn copy_stripped(source: &Path, target: &Path) {
    let stripped = Command::new("strip")
        .args(["--strip-debug", "-o"])
        .arg(target)
        .arg(source)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(source, target).unwrap_or_else(|e| panic!("copy {}: {e}", source.display()));
    }
}
