//! The differential proof with real packets: random policies and random packets aimed at their
//! entries go through each backend (the eBPF programs, the nft script, the iptables files) in a
//! namespace of their own, and what arrives (on the far side for egress, at a socket for
//! ingress) must be what the model says, packet by packet.
//!
//! Each batch is also sent through an identical namespace with no filter: a packet the kernel
//! itself does not deliver there (a lone IPv4 fragment inbound, a multicast source, ...) says
//! nothing about the filter and is counted apart.

use std::{path::Path, sync::Mutex, time::Instant};

use killswitch::{
    model::{self, Filter, Interface},
    policy::Policy,
};
use testbed::{
    packets::Rng,
    process::{killswitch, nft_in, output_in},
    random::{aimed, random_policy, seed, steered_packet},
    require_root,
    wire::World,
    Cgroup, PinRoot,
};

/// One backend at a time: they share two cores and the test moves the process between cgroups.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Ebpf,
    Nft,
    Iptables,
}

struct Bed {
    baseline: World,
    filtered: World,
    /// Inside the scope: the `[vpn_client]` cgroup of the policies that have one.
    client: Cgroup,
    cgroup: Cgroup,
    pins: PinRoot,
    dir: std::path::PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bed {
    fn new(backend: Backend) -> Bed {
        let cgroup = Cgroup::new();
        let client = cgroup.child("client");
        let filtered = World::new((backend == Backend::Ebpf).then_some(&cgroup), Some(&client));
        Bed {
            baseline: World::new(None, None),
            filtered,
            client,
            cgroup,
            pins: PinRoot::new(),
            dir: testbed::private_dir("ksdiff"),
        }
    }

    /// Puts `text` in force in the filtered namespace, as a user of the backend would.
    fn apply(&self, backend: Backend, text: &str) {
        let config = self.dir.join("killswitch.toml");
        testbed::write_config(&config, text);
        let config = config.to_str().unwrap();
        let client = &self.filtered.client;
        let ok = |out: std::process::Output, what: &str| {
            assert!(
                out.status.success(),
                "{what} failed: {}{}\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        let render = |format: &str| {
            let out = killswitch(client, &self.pins, &["--config", config, "render", format]);
            let path = self.dir.join(format);
            std::fs::write(&path, ok(out, "render")).unwrap();
            path.to_str().unwrap().to_owned()
        };
        match backend {
            Backend::Ebpf => {
                let cgroup = &self.cgroup.relative;
                let out = killswitch(
                    client,
                    &self.pins,
                    &["--config", config, "up", "--cgroup", cgroup],
                );
                ok(out, "up");
            }
            Backend::Nft => {
                let script = render("nft");
                ok(nft_in(client, &["-f", &script]), "nft -f");
            }
            Backend::Iptables => {
                for (format, tool) in [
                    ("iptables", "iptables-restore"),
                    ("ip6tables", "ip6tables-restore"),
                ] {
                    let file = render(format);
                    ok(output_in(client, None, tool, &[&file]), tool);
                }
            }
        }
    }
}

/// At least 100 random policies x 100 packets (`KILLSWITCH_POLICIES` changes it), half of them
/// steered at the policy's exceptions, through `backend`; every packet the unfiltered namespace
/// delivers must pass or not as the model says.
fn differential(backend: Backend) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let policies: usize = std::env::var("KILLSWITCH_POLICIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let filter = match backend {
        Backend::Ebpf => Filter::Programs,
        Backend::Nft | Backend::Iptables => Filter::Netfilter,
    };
    let started = Instant::now();
    let bed = Bed::new(backend);
    let seed = seed();
    let mut rng = Rng::new(seed);
    let (mut sent, mut compared, mut passed) = (0usize, 0usize, 0usize);
    let mut reasons = std::collections::BTreeMap::new();
    let mut applying = std::time::Duration::ZERO;
    for n in 0..policies {
        let text = random_policy(&mut rng, Some(&bed.client.relative));
        let policy = Policy::from_toml(&text, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("policy {n} refused: {e}\n{text}"));
        let apply_started = Instant::now();
        bed.apply(backend, &text);
        applying += apply_started.elapsed();
        let (v4, v6) = aimed(&policy);
        let client_listed = policy
            .vpn_client
            .as_ref()
            .is_some_and(|c| c.cgroup.is_some());
        // Loopback packets never leave: drawn again.
        let packets: Vec<model::Packet> =
            std::iter::repeat_with(|| steered_packet(&mut rng, &policy, &v4, &v6))
                .filter(|p| p.interface != Interface::Loopback)
                .map(|mut p| {
                    // Only a listed cgroup makes the client's socket the VPN client's.
                    p.vpn_client &= client_listed;
                    p
                })
                .take(100)
                .collect();
        let nonce = n as u16;
        let unfiltered = bed.baseline.deliver(&packets, nonce);
        let arrived = bed.filtered.deliver(&packets, nonce);
        for (i, packet) in packets.iter().enumerate() {
            sent += 1;
            if !unfiltered[i] {
                assert!(!arrived[i], "policy {n}, packet {i}: passed the filter but not the plain kernel\n{packet:#?}");
                continue;
            }
            compared += 1;
            let (verdict, reason) = model::verdict_of(filter, &policy, packet);
            let allowed = verdict == model::Verdict::Allow;
            assert_eq!(
                arrived[i], allowed,
                "{backend:?}, policy {n}, packet {i} (KILLSWITCH_SEED={seed}): arrived {}, model {reason:?}\n{packet:#?}\n{text}",
                arrived[i]
            );
            passed += usize::from(allowed);
            *reasons.entry(reason).or_insert(0usize) += 1;
        }
    }
    eprintln!(
        "{backend:?}: {policies} policies, {sent} packets sent, {compared} delivered without a filter and compared: all agree ({passed} allowed); {:.1} s in all, {:.1} s applying; reasons {reasons:?}",
        started.elapsed().as_secs_f64(),
        applying.as_secs_f64()
    );
    assert!(
        compared * 2 >= sent,
        "too few packets delivered without a filter: {compared} of {sent}"
    );
    assert!(
        reasons.contains_key(&model::Reason::NotVpnClient),
        "no packet from someone else than the VPN client to a server: {reasons:?}"
    );
    assert!(reasons.len() >= 12, "too few reasons reached: {reasons:?}");
}

#[test]
fn the_ebpf_programs_agree_with_the_model_on_real_packets() {
    require_root!();
    differential(Backend::Ebpf);
}

#[test]
fn the_nft_ruleset_agrees_with_the_netfilter_model_on_real_packets() {
    require_root!();
    differential(Backend::Nft);
}

#[test]
fn the_iptables_rulesets_agree_with_the_netfilter_model_on_real_packets() {
    require_root!();
    differential(Backend::Iptables);
}

/// The nft guard's netdev egress chain against the model, frame by frame: random policies
/// with the guard, each with 100 frames written on a packet socket of a guarded device (IP
/// plain, behind a VLAN tag, in PPPoE, both; now and then with a protocol that is not the
/// frame's; link control; other types). The kernel refuses the send exactly when the chain
/// drops the frame, and that must be when the model (as netfilter reads frames) drops it.
#[test]
fn the_nft_guard_agrees_with_the_netfilter_model_on_raw_frames() {
    require_root!();
    use killswitch::{
        interfaces::Interface as Device,
        packets::{carried, Carried},
        policy::resolve_servers,
        render::{self, Ruleset},
    };
    use testbed::random::other_frame;

    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let policies: usize = std::env::var("KILLSWITCH_POLICIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let net = testbed::Netns::new("gf");
    let far = testbed::Netns::new("gp");
    net.veth("up0", &far, "up0p");
    let device = Device {
        index: net.ifindex("up0"),
        name: "up0".into(),
    };
    // Removed on success, failure and panic.
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(testbed::private_dir("ksguard"));
    let dir = &dir.0;
    let socket = testbed::wire::in_netns(&net, || {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: fd is a new descriptor nothing else owns.
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    });
    // Sent with `protocol` 0: the kernel takes the frame's own type.
    let send = |frame: &[u8], protocol: u16, mark: u32| -> bool {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        // SAFETY: SO_MARK takes an int, given by pointer and size.
        let marked = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&raw const mark).cast(),
                std::mem::size_of::<u32>() as u32,
            )
        };
        assert_eq!(marked, 0, "{}", std::io::Error::last_os_error());
        // SAFETY: all-zero is a valid sockaddr_ll; the fields set below address the frame.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = device.index as i32;
        addr.sll_protocol = protocol.to_be();
        // SAFETY: addr is a valid sockaddr_ll, frame is readable.
        let rc = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        rc >= 0
    };
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut reasons = std::collections::BTreeMap::new();
    for n in 0..policies {
        let text = random_policy(&mut rng, None);
        let mut policy = Policy::from_toml(&text, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("policy {n} refused: {e}\n{text}"));
        policy.guard = Some(true);
        let (servers, _) = resolve_servers(&policy.servers);
        let guarded = [(device.clone(), 14)];
        let script = render::nft(&Ruleset {
            policy: &policy,
            servers: &servers,
            cgroup: None,
            lockdown: None,
            clients: &[],
            guarded: &guarded,
        })
        .unwrap();
        let file = dir.join("guard.nft");
        std::fs::write(&file, &script).unwrap();
        let loaded = nft_in(&net, &["-f", file.to_str().unwrap()]);
        assert!(
            loaded.status.success(),
            "nft -f: {}\n{text}",
            String::from_utf8_lossy(&loaded.stderr)
        );
        let (v4, v6) = aimed(&policy);
        for i in 0..100 {
            let (bytes, protocol, mark, expected) = if rng.below(10) == 0 {
                let (bytes, frame) = other_frame(&mut rng);
                let expected = model::guard_verdict_of(Filter::Netfilter, &policy, &frame);
                (bytes, 0, 0, expected)
            } else {
                let mut packet = steered_packet(&mut rng, &policy, &v4, &v6);
                packet.direction = model::Direction::Egress;
                packet.interface = Interface::Uplink;
                // Untagged half the time: the only frames netfilter reads the IP of.
                let how = match rng.below(6) {
                    0..3 => Carried::Plain,
                    k => Carried::ALL[k as usize - 2],
                };
                let mut bytes = carried(&testbed::random::frame(&packet), how);
                // A raw sender may tell the kernel another protocol than the frame's.
                let lie = rng.below(10) == 0;
                if lie && !packet.remote.is_ipv4() && how == Carried::Plain {
                    // An IPv6 header that reads as an allowed IPv4 one (header length 5,
                    // protocol ICMP, destination from its source address) to rules that go by
                    // the protocol the kernel was told.
                    let ip = &mut bytes[14..];
                    ip[0] = 0x65;
                    ip[9] = 1;
                    let lan = policy.lan.networks.iter().map(|p| p.addr);
                    let target = lan.chain(v4.iter().copied()).find_map(|a| match a {
                        std::net::IpAddr::V4(a) => Some(a),
                        std::net::IpAddr::V6(_) => None,
                    });
                    if let Some(target) = target {
                        ip[16..20].copy_from_slice(&target.octets());
                    }
                }
                let protocol = match (lie, packet.remote.is_ipv4()) {
                    (false, _) => 0,
                    (true, true) => 0x86dd,
                    (true, false) => 0x0800,
                };
                let expected = if how == Carried::Plain && !lie {
                    model::guard_verdict_of(Filter::Netfilter, &policy, &model::Frame::Ip(packet))
                } else {
                    (model::Verdict::Drop, model::Reason::NotIp)
                };
                (bytes, protocol, packet.mark, expected)
            };
            let allowed = send(&bytes, protocol, mark);
            assert_eq!(
                allowed,
                expected.0 == model::Verdict::Allow,
                "policy {n}, frame {i} (KILLSWITCH_SEED={seed}): sent {allowed}, model {:?}\n{bytes:02x?}\n{text}",
                expected.1
            );
            *reasons.entry(expected.1).or_insert(0usize) += 1;
        }
    }
    eprintln!("{policies} policies x 100 frames agree; reasons {reasons:?}");
    assert!(reasons.len() >= 12, "too few reasons reached: {reasons:?}");
}
