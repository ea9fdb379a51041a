//! A small authoritative DNS server for the tests: A and AAAA answers from a zone file that is
//! read again on every query, so a test changes the answers (or breaks the server) by rewriting
//! or removing the file. Zone lines are `NAME TTL ADDRESS`; a name without a line is NXDOMAIN, a
//! missing file SERVFAIL. Every query is printed as `query NAME TYPE`.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const NXDOMAIN: u8 = 3;
const SERVFAIL: u8 = 2;

/// Answers queries on `addr` for `duration`; prints `ready` once listening.
pub fn serve(addr: SocketAddr, zone: &Path, duration: Duration) {
    let socket = UdpSocket::bind(addr).expect("bind the DNS socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    println!("ready");
    let started = Instant::now();
    let mut buf = [0u8; 1500];
    while started.elapsed() < duration {
        let Ok((len, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = reply(&buf[..len], zone) {
            let _ = socket.send_to(&reply, peer);
        }
        let _ = std::io::stdout().flush();
    }
}

/// The reply to one query, or `None` when it is not a single-question query we can read.
fn reply(query: &[u8], zone: &Path) -> Option<Vec<u8>> {
    let u16_at = |i: usize| Some(u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]));
    if query.len() < 12 || u16_at(4)? != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_lowercase());
        i += len;
    }
    let name = labels.join(".");
    let qtype = u16_at(i)?;
    let question_end = i + 4;
    println!("query {name} {qtype}");

    let (rcode, answers) = match std::fs::read_to_string(zone) {
        Err(_) => (SERVFAIL, Vec::new()),
        Ok(text) => {
            let records: Vec<(u32, IpAddr)> = text
                .lines()
                .filter_map(|line| {
                    let mut fields = line.split_whitespace();
                    let owner = fields.next()?.trim_end_matches('.').to_lowercase();
                    let ttl = fields.next()?.parse().ok()?;
                    let address = fields.next()?.parse().ok()?;
                    (owner == name).then_some((ttl, address))
                })
                .collect();
            if records.is_empty() {
                (NXDOMAIN, Vec::new())
            } else {
                let wanted = records
                    .into_iter()
                    .filter(|(_, a)| match a {
                        IpAddr::V4(_) => qtype == TYPE_A,
                        IpAddr::V6(_) => qtype == TYPE_AAAA,
                    })
                    .collect();
                (0, wanted)
            }
        }
    };

    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&query[0..2]);
    // QR + AA, RD copied from the query; RA + RCODE.
    out.push(0x84 | (query[2] & 0x01));
    out.push(0x80 | rcode);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(query.get(12..question_end)?);
    for (ttl, address) in answers {
        // The owner name is a pointer to the question's name at offset 12.
        out.extend_from_slice(&[0xc0, 0x0c]);
        let (rtype, data) = match address {
            IpAddr::V4(a) => (TYPE_A, a.octets().to_vec()),
            IpAddr::V6(a) => (TYPE_AAAA, a.octets().to_vec()),
        };
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
    }
    Some(out)
}
