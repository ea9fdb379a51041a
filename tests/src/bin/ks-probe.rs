//! `ks-probe tcp|udp ADDR:PORT [TIMEOUT_MS]`: sends "ping" and expects it echoed.
//! Exit 0 when the echo came back, 1 otherwise (the reason on stderr).
//! `ks-probe flood ADDR:PORT MILLIS`: one UDP datagram per millisecond for MILLIS, errors ignored
//! (a cgroup egress drop makes sendto fail with EPERM); prints how many were sent.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(kind), Some(addr)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: ks-probe tcp|udp ADDR:PORT [TIMEOUT_MS]");
        return ExitCode::from(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
    let timeout = Duration::from_millis(args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1000));
    let result = match kind.as_str() {
        "tcp" => tcp(addr, timeout),
        "udp" => udp(addr, timeout),
        "flood" => flood(addr, timeout),
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

fn udp(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap();
    let socket = UdpSocket::bind(local).map_err(|e| e.to_string())?;
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
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap();
    let socket = UdpSocket::bind(local).map_err(|e| e.to_string())?;
    let start = std::time::Instant::now();
    let mut attempts = 0u64;
    while start.elapsed() < duration {
        let _ = socket.send_to(b"flood", addr);
        attempts += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("{attempts}");
    Ok(())
}
