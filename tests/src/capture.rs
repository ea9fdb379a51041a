//! The leak oracle: tcpdump on the far side of a cable, where the firewall of the machine under
//! test cannot hide anything it sends.

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::Netns;

/// tcpdump on one interface of a namespace, inbound only: the leak oracle outside the machine,
/// where its own firewall cannot hide anything (as in the OpenVPN lab).
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    pub fn start(netns: &Netns, dev: &str, file: PathBuf) -> Capture {
        let _ = std::fs::remove_file(&file);
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .args(["--", "timeout", "600", "tcpdump", "-i", dev, "-Q", "in"])
            .args(["-nn", "-U", "--immediate-mode", "-Z", "root", "-w"])
            .arg(&file)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start tcpdump");
        let capture = Capture {
            child: Some(child),
            file,
        };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if capture.file.exists() {
                std::thread::sleep(Duration::from_millis(200));
                return capture;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tcpdump did not start");
    }

    /// Ends the capture (tcpdump flushes what it has on SIGINT).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            std::thread::sleep(Duration::from_millis(200));
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT);
            let _ = child.wait();
        }
    }

    /// The captured packets matching a tcpdump `filter` (empty: all), one line each. A filter
    /// tcpdump cannot use, or a capture it cannot read, panics: an oracle that reads nothing
    /// must not say "no leak".
    pub fn packets(&self, filter: &str) -> Vec<String> {
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .arg(filter)
            .stderr(Stdio::piped())
            .output()
            .expect("tcpdump -r");
        assert!(
            out.status.success(),
            "tcpdump -r {} '{filter}' failed: {}",
            self.file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}
