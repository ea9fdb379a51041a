//! A client namespace with an uplink and a stand-in tunnel to an "internet" namespace that hosts
//! a VPN server address, an ordinary web address and a host behind the tunnel.
//!
//! ```text
//!  client                                  internet
//!   up0 192.0.2.2  2001:db8:2::2   ─────   up0 192.0.2.1  2001:db8:2::1
//!   tun0 198.18.0.2 2001:db8:18::2 ─────   tun0 198.18.0.1 2001:db8:18::1   (behind the "tunnel")
//!                                          lo: SERVER 198.51.100.1, 2001:db8:100::1
//!                                              OTHER  203.0.113.9,  2001:db8:203::9
//! ```

use std::net::IpAddr;

use crate::Netns;

pub const SERVER_V4: &str = "198.51.100.1";
pub const SERVER_V6: &str = "2001:db8:100::1";
pub const OTHER_V4: &str = "203.0.113.9";
pub const OTHER_V6: &str = "2001:db8:203::9";
pub const TUNNEL_PEER_V4: &str = "198.18.0.1";
pub const TUNNEL_PEER_V6: &str = "2001:db8:18::1";

pub struct TestNet {
    pub client: Netns,
    pub internet: Netns,
}

impl TestNet {
    pub fn new() -> TestNet {
        let client = Netns::new("c");
        let internet = Netns::new("i");
        client.veth("up0", &internet, "up0");
        client.addr("up0", "192.0.2.2/24");
        client.addr("up0", "2001:db8:2::2/64");
        internet.addr("up0", "192.0.2.1/24");
        internet.addr("up0", "2001:db8:2::1/64");
        client.ip(&["route", "add", "default", "via", "192.0.2.1"]);
        client.ip(&["-6", "route", "add", "default", "via", "2001:db8:2::1"]);
        for addr in [SERVER_V4, OTHER_V4] {
            internet.addr("lo", &format!("{addr}/32"));
        }
        for addr in [SERVER_V6, OTHER_V6] {
            internet.addr("lo", &format!("{addr}/128"));
        }
        let net = TestNet { client, internet };
        net.add_tunnel();
        net
    }

    /// (Re)creates the stand-in tunnel; it gets a new ifindex each time, like OpenVPN's tun0.
    pub fn add_tunnel(&self) {
        self.client.veth("tun0", &self.internet, "tun0");
        self.client.addr("tun0", "198.18.0.2/24");
        self.client.addr("tun0", "2001:db8:18::2/64");
        self.internet.addr("tun0", &format!("{TUNNEL_PEER_V4}/24"));
        self.internet.addr("tun0", &format!("{TUNNEL_PEER_V6}/64"));
    }

    pub fn remove_tunnel(&self) {
        self.client.ip(&["link", "del", "tun0"]);
    }

    pub fn addrs(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }
}

impl Default for TestNet {
    fn default() -> Self {
        TestNet::new()
    }
}
