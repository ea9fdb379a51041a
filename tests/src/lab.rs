//! A real VPN between namespaces: a client behind a router, an OpenVPN 2.6 server that NATs the
//! tunnel, and a web host. A tcpdump on the router's client-facing side is the leak oracle: it
//! sees everything the client sends in the clear, whatever the client's own firewall claims.
//!
//! ```text
//!  client ─ c0 192.168.77.2 ── rc 192.168.77.1 ─ router ─ rv 198.51.100.254 ── v0 198.51.100.1 ─ vpn
//!   tun0 198.18.0.x (OpenVPN)                           ─ rw 203.0.113.254 ── w0 203.0.113.80 ─ web
//! ```

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{capture::Capture, echo::EchoServer, run, Netns};

pub const VPN_SERVER: &str = "198.51.100.1";
pub const VPN_PORT: u16 = 1194;
pub const WEB_HOST: &str = "203.0.113.80";
pub const TUNNEL_NET: &str = "198.18.0.0";
/// Dual-stack lab only ([`Lab::dual_stack`]): the client's and the hosts' IPv6 addresses, and
/// the internet's NTP and DNS hosts (addresses of the web host's namespace).
pub const CLIENT_V4: &str = "192.168.77.2";
pub const CLIENT_V6: &str = "2001:db8:77::2";
pub const ROUTER_V4: &str = "192.168.77.1";
pub const WEB_HOST_V6: &str = "2001:db8:203::80";
pub const NTP_HOST: &str = "203.0.113.123";
pub const DNS_HOST: &str = "203.0.113.53";
/// Longest a long-running helper (openvpn, tcpdump) may live.
const HELPER_LIFETIME_SECS: &str = "600";

pub struct Lab {
    pub client: Netns,
    pub router: Netns,
    pub vpn: Netns,
    pub web: Netns,
    dir: PathBuf,
    vpn_server: Option<Child>,
    vpn_client: Option<Child>,
    capture: Option<Capture>,
    _web_server: EchoServer,
}

impl Lab {
    /// Builds the namespaces, certificates and the OpenVPN server; the client is not started.
    pub fn new(web_ports: &[u16]) -> Lab {
        Lab::build(web_ports, false)
    }

    /// [`Lab::new`] with IPv6 everywhere: the client's uplink has a global address and an
    /// ordinary IPv6 default route, the server pushes `redirect-gateway def1 ipv6` and NATs
    /// both families, and the web host also answers on [`WEB_HOST_V6`], as NTP on [`NTP_HOST`]
    /// and as DNS on [`DNS_HOST`] (UDP/TCP echo on every port given). `client4.conf` is a
    /// client that takes IPv4 only from the server (see [`Lab::connect_with`]).
    pub fn dual_stack(web_ports: &[u16]) -> Lab {
        Lab::build(web_ports, true)
    }

    fn build(web_ports: &[u16], ipv6: bool) -> Lab {
        let client = Netns::new("lc");
        let router = Netns::new("lr");
        let vpn = Netns::new("lv");
        let web = Netns::new("lw");
        client.veth("c0", &router, "rc");
        router.veth("rv", &vpn, "v0");
        router.veth("rw", &web, "w0");
        client.addr("c0", "192.168.77.2/24");
        router.addr("rc", "192.168.77.1/24");
        router.addr("rv", "198.51.100.254/24");
        vpn.addr("v0", &format!("{VPN_SERVER}/24"));
        router.addr("rw", "203.0.113.254/24");
        web.addr("w0", &format!("{WEB_HOST}/24"));
        // The client keeps its ordinary default route, so a dead tunnel really falls back to the
        // uplink, as on a DHCP machine; otherwise a leak test could not fail.
        client.ip(&["route", "add", "default", "via", "192.168.77.1"]);
        vpn.ip(&["route", "add", "default", "via", "198.51.100.254"]);
        web.ip(&["route", "add", "default", "via", "203.0.113.254"]);
        router.sysctl("net.ipv4.ip_forward", "1");
        vpn.sysctl("net.ipv4.ip_forward", "1");
        let mut web_hosts = vec![WEB_HOST];
        if ipv6 {
            for (netns, dev, cidr) in [
                (&client, "c0", "2001:db8:77::2/64"),
                (&router, "rc", "2001:db8:77::1/64"),
                (&router, "rv", "2001:db8:100::254/64"),
                (&vpn, "v0", "2001:db8:100::1/64"),
                (&router, "rw", "2001:db8:203::254/64"),
                (&web, "w0", "2001:db8:203::80/64"),
                (&web, "lo", "203.0.113.123/32"),
                (&web, "lo", "203.0.113.53/32"),
            ] {
                netns.addr(dev, cidr);
            }
            client.ip(&["-6", "route", "add", "default", "via", "2001:db8:77::1"]);
            vpn.ip(&["-6", "route", "add", "default", "via", "2001:db8:100::254"]);
            web.ip(&["-6", "route", "add", "default", "via", "2001:db8:203::254"]);
            router.sysctl("net.ipv6.conf.all.forwarding", "1");
            vpn.sysctl("net.ipv6.conf.all.forwarding", "1");
            web_hosts.extend([WEB_HOST_V6, NTP_HOST, DNS_HOST]);
        }
        // The VPN server hides its clients behind its own address (in its own namespace only).
        let nat = "add table inet lab_nat; \
                   add chain inet lab_nat post { type nat hook postrouting priority 100; }; \
                   add rule inet lab_nat post oifname \"v0\" masquerade";
        run("ip", &["netns", "exec", &vpn.name, "nft", nat]);

        let web_addrs: Vec<SocketAddr> = web_hosts
            .iter()
            .flat_map(|host| {
                web_ports
                    .iter()
                    .map(|&p| SocketAddr::new(host.parse().unwrap(), p))
            })
            .collect();
        let web_server = EchoServer::start(&web, &web_addrs);

        let dir = crate::private_dir("kslab");
        make_certificates(&dir);
        write_configs(&dir, ipv6);
        let mut lab = Lab {
            client,
            router,
            vpn,
            web,
            dir,
            vpn_server: None,
            vpn_client: None,
            capture: None,
            _web_server: web_server,
        };
        let server = lab.spawn_openvpn(true);
        lab.vpn_server = Some(server);
        lab
    }

    fn spawn_openvpn(&self, server: bool) -> Child {
        self.spawn_openvpn_in(server, None)
    }

    /// Starts openvpn; inside `cgroup` when given (it moves there before it executes).
    fn spawn_openvpn_in(&self, server: bool, cgroup: Option<&crate::Cgroup>) -> Child {
        if server {
            self.spawn_openvpn_at(&self.vpn, "server.conf", "server.log", cgroup)
        } else {
            self.spawn_openvpn_with("client.conf", cgroup)
        }
    }

    fn spawn_openvpn_with(&self, config: &str, cgroup: Option<&crate::Cgroup>) -> Child {
        self.spawn_openvpn_at(&self.client, config, "client.log", cgroup)
    }

    fn spawn_openvpn_at(
        &self,
        netns: &Netns,
        config: &str,
        log: &str,
        cgroup: Option<&crate::Cgroup>,
    ) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(log))
            .unwrap();
        let procs = cgroup
            .map(|c| c.procs().display().to_string())
            .unwrap_or_default();
        Command::new("sh")
            .arg("-c")
            .arg(r#"if [ -n "$1" ]; then echo $$ > "$1" || exit 125; fi; shift; exec "$@""#)
            .arg("sh")
            .arg(procs)
            .arg("nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .args(["--", "timeout", HELPER_LIFETIME_SECS, "openvpn", "--cd"])
            .arg(&self.dir)
            .args(["--config", config])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start openvpn")
    }

    /// Starts the VPN client and waits (bounded) until `tun0` carries traffic.
    pub fn connect(&mut self) -> Duration {
        self.connect_in(None)
    }

    /// [`Lab::connect`] with the client inside `cgroup` (its own, as a systemd unit has).
    pub fn connect_in(&mut self, cgroup: Option<&crate::Cgroup>) -> Duration {
        self.connect_with("client.conf", cgroup)
    }

    /// [`Lab::connect_in`] with the client config `config` (`client4.conf`: IPv4 only).
    pub fn connect_with(&mut self, config: &str, cgroup: Option<&crate::Cgroup>) -> Duration {
        assert!(self.vpn_client.is_none(), "client already running");
        let started = Instant::now();
        self.vpn_client = Some(self.spawn_openvpn_with(config, cgroup));
        self.wait_connected(started)
    }

    /// SIGTERMs the VPN client and waits (bounded) for it to exit: an orderly stop.
    pub fn stop_vpn_client(&mut self) {
        if let Some(mut child) = self.vpn_client.take() {
            signal_group(&child, nix::sys::signal::Signal::SIGTERM);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(5) {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            kill(&mut child);
        }
    }

    /// Whether the VPN client started here has exited (or none runs).
    pub fn vpn_client_exited(&mut self) -> bool {
        self.vpn_client
            .as_mut()
            .is_none_or(|child| child.try_wait().ok().flatten().is_some())
    }

    /// Forgets a VPN client that has exited on its own (its tunnel was deleted).
    pub fn reap_vpn_client(&mut self) {
        if let Some(mut child) = self.vpn_client.take() {
            kill(&mut child);
        }
    }

    /// The command line of the VPN client (run in the client's namespace), for a test that
    /// starts it some other way; its log goes to `client.log`.
    pub fn client_command(&self) -> Vec<String> {
        let dir = self.dir.display().to_string();
        [
            "openvpn",
            "--cd",
            &dir,
            "--config",
            "client.conf",
            "--log-append",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(std::iter::once(format!("{dir}/client.log")))
        .collect()
    }

    /// Waits (bounded) until the tunnel carries the default route; the time since `started`.
    pub fn wait_connected(&self, started: Instant) -> Duration {
        while started.elapsed() < Duration::from_secs(20) {
            let routes = self.client.ip(&["route", "show"]);
            if routes.contains("0.0.0.0/1") && routes.contains("dev tun0") {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the OpenVPN client did not connect within 20 s; log: {}",
            self.log("client.log")
        );
    }

    /// SIGKILLs the VPN client: the tunnel disappears without any orderly teardown.
    pub fn kill_vpn_client(&mut self) {
        if let Some(mut child) = self.vpn_client.take() {
            kill(&mut child);
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if !self.client.ip(&["link", "show"]).contains("tun0") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tun0 did not disappear after the VPN client was killed");
    }

    pub fn tunnel_ifindex(&self) -> Option<u32> {
        let links = self.client.ip(&["-o", "link", "show"]);
        links
            .lines()
            .find(|l| l.contains(" tun0:"))
            .and_then(|l| l.split(':').next()?.trim().parse().ok())
    }

    /// Starts capturing everything the client sends into the router (the leak oracle).
    pub fn start_capture(&mut self) {
        self.capture = Some(Capture::start(
            &self.router,
            "rc",
            self.dir.join("uplink.pcap"),
        ));
    }

    /// Stops the capture and returns the packets matching a tcpdump `filter`, one line each.
    pub fn stop_capture(&mut self, filter: &str) -> Vec<String> {
        let capture = self.capture.as_mut().expect("capture started");
        capture.stop();
        capture.packets(filter)
    }

    /// The packets of the last capture matching a tcpdump `filter`, one line each.
    pub fn captured(&self, filter: &str) -> Vec<String> {
        self.capture
            .as_ref()
            .expect("capture started")
            .packets(filter)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Helpers run as `timeout CMD` in a process group of their own: signal the whole group, so the
/// command `timeout` forked gets it too.
fn signal_group(child: &Child, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), signal);
}

fn kill(child: &mut Child) {
    signal_group(child, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.capture = None;
        for mut child in [self.vpn_client.take(), self.vpn_server.take()]
            .into_iter()
            .flatten()
        {
            kill(&mut child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A small CA, a server and a client certificate (EC P-256, valid for a day).
fn make_certificates(dir: &Path) {
    let ossl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let new_key = |file: &str| {
        ossl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            file,
        ])
    };
    new_key("ca.key");
    ossl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-days",
        "1",
        "-subj",
        "/CN=killswitch lab CA",
        "-out",
        "ca.crt",
    ]);
    for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let crt = format!("{name}.crt");
        let ext = format!("{name}.ext");
        std::fs::write(
            dir.join(&ext),
            format!("extendedKeyUsage={usage}\nkeyUsage=digitalSignature,keyAgreement\n"),
        )
        .unwrap();
        new_key(&key);
        ossl(&[
            "req",
            "-new",
            "-key",
            &key,
            "-subj",
            &format!("/CN={name}"),
            "-out",
            &csr,
        ]);
        ossl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ]);
    }
}

fn write_configs(dir: &Path, ipv6: bool) {
    let common = "dev tun0\ndev-type tun\nproto udp\ndisable-dco\nca ca.crt\n\
                  data-ciphers AES-256-GCM\nverb 3\nmute 20\npersist-key\n";
    let (ipv6_server, gateway) = if ipv6 {
        ("server-ipv6 2001:db8:18::/64\n", "def1 ipv6")
    } else {
        ("", "def1")
    };
    let server = format!(
        "{common}local {VPN_SERVER}\nport {VPN_PORT}\ncert server.crt\nkey server.key\ndh none\n\
         topology subnet\nserver {TUNNEL_NET} 255.255.255.0\n{ipv6_server}\
         push \"redirect-gateway {gateway}\"\nkeepalive 1 10\n"
    );
    let client = format!(
        "{common}client\nremote {VPN_SERVER} {VPN_PORT}\nnobind\ncert client.crt\nkey client.key\n\
         remote-cert-tls server\nconnect-retry 1\nconnect-retry-max 20\n"
    );
    // A client that leaves IPv6 to the uplink's route: what a provider without IPv6 gives
    // (the pushed `redirect-gateway ... ipv6` would route IPv6 into a tunnel that drops it).
    let client4 = format!(
        "{client}pull-filter ignore \"ifconfig-ipv6\"\npull-filter ignore \"route-ipv6\"\n\
         pull-filter ignore \"redirect-gateway\"\nredirect-gateway def1\n"
    );
    std::fs::write(dir.join("server.conf"), server).unwrap();
    std::fs::write(dir.join("client.conf"), client).unwrap();
    std::fs::write(dir.join("client4.conf"), client4).unwrap();
}
