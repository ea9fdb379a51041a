//! TCP and UDP echo servers running on threads inside a network namespace.

use std::{
    io::{Read, Write},
    net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::Netns;

const POLL: Duration = Duration::from_millis(50);

pub struct EchoServer {
    stop: Arc<AtomicBool>,
    /// UDP datagrams and TCP connections that reached the server: a leak oracle outside the client.
    received: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    /// Serves TCP and UDP echo on every address until dropped.
    pub fn start(netns: &Netns, addrs: &[SocketAddr]) -> EchoServer {
        Self::start_in_groups(netns, addrs, &[])
    }

    /// Like [`EchoServer::start`]; IPv6 UDP sockets also join each (group, interface name).
    pub fn start_in_groups(
        netns: &Netns,
        addrs: &[SocketAddr],
        groups: &[(Ipv6Addr, &str)],
    ) -> EchoServer {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for &addr in addrs {
            for tcp in [true, false] {
                let (ready_tx, ready_rx) = mpsc::channel();
                let stop = stop.clone();
                let received = received.clone();
                let ns_path = netns.path();
                let groups: Vec<(Ipv6Addr, String)> =
                    groups.iter().map(|&(g, i)| (g, i.to_string())).collect();
                threads.push(std::thread::spawn(move || {
                    // setns(CLONE_NEWNET) moves only this thread; its sockets live in the netns.
                    let ns = std::fs::File::open(&ns_path).expect("open netns");
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                    if tcp {
                        serve_tcp(addr, &stop, &received, ready_tx)
                    } else {
                        serve_udp(addr, &groups, &stop, &received, ready_tx)
                    }
                }));
                ready_rx
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_else(|_| panic!("echo server on {addr} did not start"));
            }
        }
        EchoServer {
            stop,
            received,
            threads,
        }
    }

    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

fn serve_tcp(addr: SocketAddr, stop: &AtomicBool, received: &AtomicUsize, ready: mpsc::Sender<()>) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
    listener.set_nonblocking(true).unwrap();
    ready.send(()).unwrap();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                received.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 512];
                if let Ok(n) = stream.read(&mut buf) {
                    let _ = stream.write_all(&buf[..n]);
                }
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn serve_udp(
    addr: SocketAddr,
    groups: &[(Ipv6Addr, String)],
    stop: &AtomicBool,
    received: &AtomicUsize,
    ready: mpsc::Sender<()>,
) {
    let socket = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    if addr.is_ipv6() {
        for (group, interface) in groups {
            let index = nix::net::if_::if_nametoindex(interface.as_str()).expect("interface");
            socket
                .join_multicast_v6(group, index)
                .unwrap_or_else(|e| panic!("join {group} on {interface}: {e}"));
        }
    }
    socket.set_read_timeout(Some(POLL)).unwrap();
    ready.send(()).unwrap();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, peer)) = socket.recv_from(&mut buf) {
            received.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(&buf[..n], peer);
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
