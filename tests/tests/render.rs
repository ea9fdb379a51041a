//! `killswitch render`: every example config renders to the checked-in texts in tests/golden/
//! (`KILLSWITCH_BLESS=1` writes them anew), and nft and iptables-restore accept every one.

use std::path::{Path, PathBuf};

use killswitch::{
    interfaces::Interface,
    policy::{Policy, ServerAddress, ServerEndpoint},
    render::{self, CgroupMatch, Ruleset},
    vpn_client::ClientCgroup,
};
use testbed::{
    process::{nft_in, output_in},
    require_root, Cgroup, Netns,
};

/// The per-app example is rendered for this cgroup, as its comment shows.
const PER_APP_CGROUP: &str = "torrent";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn examples() -> Vec<(String, Policy)> {
    let mut all: Vec<_> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    all.sort();
    all.into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let policy = Policy::from_toml(&text, &path).unwrap();
            (
                path.file_stem().unwrap().to_str().unwrap().to_owned(),
                policy,
            )
        })
        .collect()
}

/// The servers with addresses; a hostname stands for two documentation addresses (one per
/// family), so the golden texts do not depend on DNS.
fn servers(policy: &Policy) -> Vec<ServerEndpoint> {
    let mut out = Vec::new();
    for (i, rule) in policy.servers.iter().enumerate() {
        let addresses = match &rule.address {
            ServerAddress::Ip(ip) => vec![*ip],
            ServerAddress::Host(_) => vec![
                format!("198.51.100.{}", 100 + i).parse().unwrap(),
                format!("2001:db8:100::{}", 100 + i).parse().unwrap(),
            ],
        };
        out.extend(addresses.into_iter().map(|address| ServerEndpoint {
            address,
            port: rule.port,
            protocol: rule.protocol,
        }));
    }
    out
}

/// The `[vpn_client]` cgroup of a policy as if it existed, at `path` instead when given.
fn clients(policy: &Policy, path: Option<&str>) -> Vec<ClientCgroup> {
    let configured = policy.vpn_client.as_ref().and_then(|c| c.cgroup.as_deref());
    configured
        .map(|c| path.unwrap_or(c))
        .map(|path| ClientCgroup {
            path: path.to_owned(),
            level: path.split('/').count() as u32,
            id: 0,
        })
        .into_iter()
        .collect()
}

/// (file name, text) of every rendering of an example; its `[vpn_client]` cgroup is `client`
/// when given.
fn renderings(
    name: &str,
    policy: &Policy,
    cgroup: Option<&str>,
    client: Option<&str>,
) -> Vec<(String, String)> {
    let servers = servers(policy);
    let clients = clients(policy, client);
    // As `render` and `up` resolve it: the guard on for the whole machine.
    let policy = &policy.clone().for_scope(cgroup.is_none());
    let ruleset = Ruleset {
        policy,
        servers: &servers,
        cgroup: cgroup.map(|c| CgroupMatch::new(Path::new(c)).unwrap().unwrap()),
        lockdown: None,
        clients: &clients,
        // A machine with one NIC, as `up` would list it.
        guarded: &[(
            Interface {
                index: 2,
                name: "eth0".into(),
            },
            14,
        )],
    };
    vec![
        (format!("{name}.nft"), render::nft(&ruleset).unwrap()),
        (
            format!("{name}.iptables"),
            render::iptables(&ruleset, false).unwrap(),
        ),
        (
            format!("{name}.ip6tables"),
            render::iptables(&ruleset, true).unwrap(),
        ),
    ]
}

fn cgroup_of(name: &str) -> Option<&'static str> {
    (name == "per-app-scope").then_some(PER_APP_CGROUP)
}

#[test]
fn every_example_renders_to_its_golden_texts() {
    let golden = root().join("tests/golden");
    let bless = std::env::var_os("KILLSWITCH_BLESS").is_some();
    let mut stale = Vec::new();
    for (name, policy) in examples() {
        for (file, text) in renderings(&name, &policy, cgroup_of(&name), None) {
            let path = golden.join(&file);
            if bless {
                std::fs::create_dir_all(&golden).unwrap();
                std::fs::write(&path, &text).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(file);
            }
        }
    }
    assert!(
        stale.is_empty(),
        "rendered text differs from tests/golden/ for {stale:?}; if the change is meant, run \
         KILLSWITCH_BLESS=1 cargo test --test render and review the diff"
    );
}

#[test]
fn nft_and_iptables_restore_accept_every_example() {
    require_root!();
    let netns = Netns::new("render");
    let cgroup = Cgroup::new();
    let dir = testbed::private_dir("ksrender");
    let mut checked = 0;
    for (name, policy) in examples() {
        // The per-app example for a cgroup that exists here.
        let scope = cgroup_of(&name).map(|_| cgroup.relative.as_str());
        // nft looks the VPN client's cgroup up too: one that exists here.
        for (file, text) in renderings(&name, &policy, scope, Some(&cgroup.relative)) {
            let path = dir.join(&file);
            std::fs::write(&path, &text).unwrap();
            let out = match file.rsplit_once('.').unwrap().1 {
                "nft" => nft_in(&netns, &["-c", "-f", path.to_str().unwrap()]),
                "iptables" => output_in(
                    &netns,
                    None,
                    "iptables-restore",
                    &["--test", path.to_str().unwrap()],
                ),
                _ => output_in(
                    &netns,
                    None,
                    "ip6tables-restore",
                    &["--test", path.to_str().unwrap()],
                ),
            };
            assert!(
                out.status.success(),
                "{file} refused: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!("{checked} rulesets accepted");
    assert_eq!(checked, 3 * examples().len());
}

/// The classic mistake: the IPv6 file given to iptables-restore (and the other way round) is
/// refused, not half-loaded.
#[test]
fn each_family_file_is_refused_by_the_other_tool() {
    require_root!();
    let netns = Netns::new("render");
    let dir = testbed::private_dir("ksrender");
    let (name, policy) = examples()
        .into_iter()
        .find(|(n, _)| n == "lan-and-ntp")
        .unwrap();
    let files = renderings(&name, &policy, None, None);
    for (file, tool) in [
        (&files[1], "ip6tables-restore"),
        (&files[2], "iptables-restore"),
    ] {
        let path = dir.join(&file.0);
        std::fs::write(&path, &file.1).unwrap();
        let out = output_in(&netns, None, tool, &["--test", path.to_str().unwrap()]);
        assert!(!out.status.success(), "{tool} accepted {}", file.0);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// nft refuses a comment over 128 bytes, and with it the whole script: every comment of every
/// rendering fits, a long lockdown reason is cut, a cgroup path too long for one is refused.
#[test]
fn every_comment_fits_what_nft_keeps() {
    let comments = |text: &str| -> Vec<String> {
        text.split("comment \"")
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap().to_owned())
            .collect()
    };
    let long = "x".repeat(500);
    for (name, policy) in examples() {
        let servers = servers(&policy);
        let clients = clients(&policy, None);
        for lockdown in [None, Some(long.clone())] {
            let ruleset = Ruleset {
                policy: &policy,
                servers: &servers,
                cgroup: Some(CgroupMatch {
                    path: "a/b".into(),
                    level: 2,
                    id: Some(u64::MAX),
                }),
                lockdown,
                clients: &clients,
                guarded: &[],
            };
            for comment in comments(&render::nft(&ruleset).unwrap()) {
                assert!(
                    comment.len() <= 128,
                    "{name}: {} bytes: {comment}",
                    comment.len()
                );
            }
        }
    }
    let (_, policy) = examples().remove(0);
    let ruleset = Ruleset {
        policy: &policy,
        servers: &[],
        cgroup: Some(CgroupMatch {
            path: "a/".repeat(60) + "b",
            level: 61,
            id: None,
        }),
        lockdown: None,
        clients: &[],
        guarded: &[],
    };
    let refused = render::nft(&ruleset).unwrap_err().to_string();
    assert!(refused.contains("too long"), "{refused}");
}

/// The guard's netdev chain holds servers' frames to a VPN client known by its mark alone, and
/// not once a client is known by a cgroup (`run --vpn-client`), which a netdev hook cannot ask
/// for: that client's own packets carry no mark.
#[test]
fn the_netdev_chain_holds_servers_to_a_mark_only_while_no_cgroup_is_the_client() {
    let policy = Policy::from_toml(
        "tunnels = [\"tun0\"]\n\n[[server]]\naddress = \"198.51.100.1\"\nport = 1194\n\
         protocol = \"udp\"\n\n[vpn_client]\nmark = 0xca6c\n\n[guard]\nenabled = true\n",
        Path::new("t.toml"),
    )
    .unwrap();
    let servers = servers(&policy);
    let guarded = [(
        Interface {
            index: 2,
            name: "eth0".into(),
        },
        14,
    )];
    let render = |clients: &[ClientCgroup]| {
        render::nft(&Ruleset {
            policy: &policy,
            servers: &servers,
            cgroup: None,
            lockdown: None,
            clients,
            guarded: &guarded,
        })
        .unwrap()
    };
    let mark_only = render(&[]);
    assert!(
        mark_only.contains("chain frames_vpn_client {") && mark_only.contains("meta mark 0xca6c"),
        "{mark_only}"
    );
    let started = render(&[ClientCgroup {
        path: "killswitch/openvpn".into(),
        level: 2,
        id: 0,
    }]);
    assert!(!started.contains("frames_vpn_client"), "{started}");
}
