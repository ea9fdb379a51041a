//! Network namespaces removed on drop.

use std::path::PathBuf;

use crate::run;

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A new namespace with `lo` up, IPv6 DAD off (no 2 s delays) and rp_filter off.
    pub fn new(role: &str) -> Netns {
        let ns = Netns {
            name: crate::unique_name(&format!("ks{role}")),
        };
        run("ip", &["netns", "add", &ns.name]);
        ns.ip(&["link", "set", "lo", "up"]);
        for (key, value) in [
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            ns.sysctl(key, value);
        }
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let setting = format!("{key}={value}");
        run(
            "ip",
            &["netns", "exec", &self.name, "sysctl", "-q", "-w", &setting],
        );
    }

    /// Creates a veth pair `here` (in self) <-> `there` (in `peer`).
    pub fn veth(&self, here: &str, peer: &Netns, there: &str) {
        self.ip(&[
            "link", "add", here, "type", "veth", "peer", "name", there, "netns", &peer.name,
        ]);
        self.ip(&["link", "set", here, "up"]);
        peer.ip(&["link", "set", there, "up"]);
    }

    /// Adds an address (`nodad` for IPv6).
    pub fn addr(&self, dev: &str, cidr: &str) {
        if cidr.contains(':') {
            self.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"]);
        } else {
            self.ip(&["addr", "add", cidr, "dev", dev]);
        }
    }

    /// A namespace with one up veth (peer `DEVp`) per name in `devs`, entered by the calling
    /// thread: BPF_PROG_TEST_RUN finds the context's ifindex in the caller's namespace.
    pub fn entered_with_links(role: &str, devs: &[&str]) -> Netns {
        let netns = Netns::new(role);
        for dev in devs {
            let peer = format!("{dev}p");
            netns.ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer]);
            netns.ip(&["link", "set", dev, "up"]);
        }
        let file = std::fs::File::open(netns.path()).expect("open netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        netns
    }

    pub fn ifindex(&self, dev: &str) -> u32 {
        let out = self.ip(&["-o", "link", "show", "dev", dev]);
        out.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .expect("ifindex")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
