//! `ks-probe tcp|udp ADDR:PORT [TIMEOUT_MS] [LOCAL_PORT]`: sends "ping" and expects it echoed
//! (UDP with the skb mark in `KS_PROBE_MARK`, when set).
//! Exit 0 when the echo came back, 1 otherwise (the reason on stderr). UDP may go to a broadcast
//! address or to a link-scope multicast group written `[ff02::1:2%IFNAME]:547`.
//! `ks-probe serve PORT MILLIS`: TCP echo on every address for MILLIS; prints "ready" first.
//! `ks-probe dns ADDR:PORT ZONE_FILE MILLIS`: the test DNS server of `testbed::dns`.
//! `ks-probe flood ADDR:PORT MILLIS`: one UDP datagram per millisecond for MILLIS, errors ignored
//! (a cgroup egress drop makes sendto fail with EPERM); prints how many were sent and how many of
//! those the kernel refused.
//! `ks-probe blast ADDR:PORT COUNT`: COUNT UDP datagrams back to back; prints ns per send and
//! how many were refused.
//! `ks-probe raw IFNAME SRC:PORT DST:PORT`: one IPv4 UDP datagram in an Ethernet frame (to the
//! broadcast address) sent on IFNAME through an `AF_PACKET` socket, past the IP stack, as a DHCP
//! client sends its discovery. Exit 0 when the device took it.
//! `ks-probe stream ADDR:PORT MILLIS`: like flood, on a flow answered once first (conntrack holds
//! it as established); prints "established" when the answer came.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(kind), Some(addr)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: ks-probe tcp|udp ADDR:PORT [TIMEOUT_MS]");
        return ExitCode::from(2);
    };
    if kind == "dns" {
        let (Some(zone), Some(millis)) = (args.get(3), args.get(4)) else {
            eprintln!("usage: ks-probe dns ADDR:PORT ZONE_FILE MILLIS");
            return ExitCode::from(2);
        };
        let millis = millis.parse().expect("MILLIS");
        testbed::dns::serve(
            parse_addr(addr),
            std::path::Path::new(zone),
            Duration::from_millis(millis),
        );
        return ExitCode::SUCCESS;
    }
    if kind == "raw" {
        let (Some(source), Some(destination)) = (args.get(3), args.get(4)) else {
            eprintln!("usage: ks-probe raw IFNAME SRC:PORT DST:PORT");
            return ExitCode::from(2);
        };
        return match raw(addr, parse_addr(source), parse_addr(destination)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(reason) => {
                eprintln!("raw on {addr}: {reason}");
                ExitCode::FAILURE
            }
        };
    }
    if kind == "serve" {
        let port = addr.parse().expect("PORT");
        let millis = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1000);
        serve(port, Duration::from_millis(millis));
        return ExitCode::SUCCESS;
    }
    let addr = parse_addr(addr);
    let timeout = Duration::from_millis(args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1000));
    let local_port = args.get(4).and_then(|p| p.parse().ok()).unwrap_or(0);
    let result = match kind.as_str() {
        "tcp" => tcp(addr, timeout),
        "udp" => udp(addr, timeout, local_port),
        "flood" => flood(addr, timeout),
        "stream" => stream(addr, timeout),
        "blast" => blast(
            addr,
            args.get(3).and_then(|c| c.parse().ok()).unwrap_or(100_000),
        ),
        _ => Err("unknown probe kind".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("{kind} {addr}: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn raw(interface: &str, source: SocketAddr, destination: SocketAddr) -> Result<(), String> {
    use killswitch::packets::{ethernet, ipv4, transport, ETH_P_IP};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (SocketAddr::V4(source), SocketAddr::V4(destination)) = (source, destination) else {
        return Err("IPv4 only".into());
    };
    let mut udp = transport(17, source.port(), destination.port());
    udp.extend_from_slice(b"ping");
    let mut frame = ethernet(
        ETH_P_IP,
        &ipv4(17, *source.ip(), *destination.ip(), 0, &udp),
    );
    frame[..6].copy_from_slice(&[0xff; 6]);
    let name = std::ffi::CString::new(interface).map_err(|e| e.to_string())?;
    // SAFETY: a plain C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(format!("no interface {interface}"));
    }
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: a fresh fd nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zero is a valid sockaddr_ll to start from.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: the frame and the address are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

fn tcp(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream.write_all(b"ping").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).map_err(|e| e.to_string())?;
    (&buf == b"ping")
        .then_some(())
        .ok_or_else(|| "wrong echo".into())
}

/// `ADDR:PORT`, where an IPv6 address may carry `%IFNAME` as its scope.
fn parse_addr(text: &str) -> SocketAddr {
    if let Some((head, tail)) = text.split_once('%') {
        let (name, port) = tail.split_once("]:").expect("[ADDR%IFNAME]:PORT");
        let ip: std::net::Ipv6Addr = head.trim_start_matches('[').parse().expect("IPv6 address");
        let scope = nix::net::if_::if_nametoindex(name).expect("interface");
        return SocketAddr::V6(std::net::SocketAddrV6::new(
            ip,
            port.parse().expect("port"),
            0,
            scope,
        ));
    }
    text.parse().expect("ADDR:PORT")
}

fn udp(addr: SocketAddr, timeout: Duration, local_port: u16) -> Result<(), String> {
    let local: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], local_port))
    } else {
        SocketAddr::from(([0u16; 8], local_port))
    };
    let socket = UdpSocket::bind(local).map_err(|e| e.to_string())?;
    socket.set_broadcast(true).map_err(|e| e.to_string())?;
    set_mark(&socket)?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    socket.send_to(b"ping", addr).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 16];
    let (n, _) = socket.recv_from(&mut buf).map_err(|e| e.to_string())?;
    (&buf[..n] == b"ping")
        .then_some(())
        .ok_or_else(|| "wrong echo".into())
}

fn flood(addr: SocketAddr, duration: Duration) -> Result<(), String> {
    let socket = unbound_udp(addr)?;
    let start = std::time::Instant::now();
    let (mut attempts, mut refused) = (0u64, 0u64);
    while start.elapsed() < duration {
        if socket.send_to(b"flood", addr).is_err() {
            refused += 1;
        }
        attempts += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("{attempts} {refused}");
    Ok(())
}

/// A UDP flow that is answered once (so conntrack holds it as established), then one datagram
/// a millisecond on the same socket for `duration`, errors ignored; prints "established" after
/// the answer, then how many were sent and how many the kernel refused.
fn stream(addr: SocketAddr, duration: Duration) -> Result<(), String> {
    let socket = unbound_udp(addr)?;
    socket.connect(addr).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    socket.send(b"ping").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 16];
    socket
        .recv(&mut buf)
        .map_err(|e| format!("no answer: {e}"))?;
    println!("established");
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    let start = std::time::Instant::now();
    let (mut attempts, mut refused) = (0u64, 0u64);
    while start.elapsed() < duration {
        if socket.send(b"more").is_err() {
            refused += 1;
        }
        attempts += 1;
        while socket.recv(&mut buf).is_ok() {}
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("{attempts} {refused}");
    Ok(())
}

/// `count` UDP datagrams as fast as one socket sends them; prints the nanoseconds per send
/// (the output hooks' cost is part of it) and how many the kernel refused.
fn blast(addr: SocketAddr, count: u64) -> Result<(), String> {
    let socket = unbound_udp(addr)?;
    let start = std::time::Instant::now();
    let mut refused = 0u64;
    for _ in 0..count {
        if socket.send_to(b"blast", addr).is_err() {
            refused += 1;
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / count as f64;
    println!("{ns:.0} {refused}");
    Ok(())
}

/// A UDP socket on any address and port of `addr`'s family.
/// `KS_PROBE_MARK=N`: the socket's packets carry skb mark N (SO_MARK), as kernel WireGuard's
/// carry its fwmark.
fn set_mark(socket: &UdpSocket) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let Ok(text) = std::env::var("KS_PROBE_MARK") else {
        return Ok(());
    };
    let mark: u32 = match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|e| format!("KS_PROBE_MARK: {e}"))?;
    // SAFETY: a valid socket and a u32 option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            4,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("SO_MARK: {}", std::io::Error::last_os_error()))
    }
}

fn unbound_udp(addr: SocketAddr) -> Result<UdpSocket, String> {
    let any: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap();
    UdpSocket::bind(any).map_err(|e| e.to_string())
}

/// Accepts TCP connections on `[::]:port` (both families) and echoes one read on each.
fn serve(port: u16, duration: Duration) {
    let listener = TcpListener::bind(SocketAddr::from(([0u16; 8], port))).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    println!("ready");
    let start = std::time::Instant::now();
    while start.elapsed() < duration {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let mut buf = [0u8; 64];
                if let Ok(n) = stream.read(&mut buf) {
                    let _ = stream.write_all(&buf[..n]);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
