//! `killswitch trace`'s records. The traced programs (killswitch-ebpf/src/trace.rs) log each
//! verdict through aya-log as a line of numbers; aya-log hands it to [`VerdictLog`], which
//! names the numbers and emits a `tracing` event, or with `--json` prints one object per line.

use std::{
    io::Write,
    net::Ipv6Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use killswitch_common::{DropEvent, Reason};
use nix::time::{clock_gettime, ClockId};
use schemars::JsonSchema;
use serde::Serialize;

use crate::events::{DropRecord, Resolver};

/// One verdict as `trace` shows it.
#[derive(Debug, Serialize, JsonSchema, Clone, PartialEq, Eq)]
pub struct VerdictRecord {
    /// "allow" or "drop".
    pub verdict: &'static str,
    /// The step of the verdict order that decided (1-10, see SPEC's verdict list).
    pub step: u8,
    /// The packet: addresses, ports, interface, cgroup; `reason` names the step's check.
    #[serde(flatten)]
    pub packet: DropRecord,
}

impl std::fmt::Display for VerdictRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} step {} {} {}",
            self.verdict,
            self.packet.direction,
            self.step,
            self.packet.reason,
            self.packet.packet()
        )
    }
}

/// The kernel's record, "verdict KIND SOURCE DESTINATION PORTS IFINDEX NETNS CGROUP" (KIND:
/// direction, reason, family, protocol and whether ports were read, a byte each from the
/// lowest; PORTS: source port << 16 | destination port; addresses as IPv6, IPv4 mapped), as the
/// event it mirrors; `None` for anything else.
pub fn parse(message: &str) -> Option<DropEvent> {
    let mut words = message.split(' ');
    if words.next()? != "verdict" {
        return None;
    }
    let mut next = || words.next();
    let kind: u64 = next()?.parse().ok()?;
    let byte = |n: u32| (kind >> (8 * n)) as u8;
    let source = next()?.parse::<Ipv6Addr>().ok()?.octets();
    let destination = next()?.parse::<Ipv6Addr>().ok()?.octets();
    let ports: u32 = next()?.parse().ok()?;
    let event = DropEvent {
        direction: byte(0),
        reason: byte(1),
        family: byte(2),
        protocol: byte(3),
        ports_known: byte(4),
        source,
        destination,
        source_port: (ports >> 16) as u16,
        destination_port: ports as u16,
        ifindex: next()?.parse().ok()?,
        netns_cookie: next()?.parse().ok()?,
        cgroup_id: next()?.parse().ok()?,
        ..DropEvent::default()
    };
    next().is_none().then_some(event)
}

/// aya-log's logger for the traced programs.
pub struct VerdictLog {
    json: bool,
    resolver: Mutex<Resolver>,
    /// Set once stdout's reader went away: tracing should end.
    reader_gone: Arc<AtomicBool>,
}

impl VerdictLog {
    pub fn new(json: bool, resolver: Resolver) -> VerdictLog {
        VerdictLog {
            json,
            resolver: Mutex::new(resolver),
            reader_gone: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Becomes true when the reader of `--json` output goes away (`trace --json | head`).
    pub fn reader_gone(&self) -> Arc<AtomicBool> {
        self.reader_gone.clone()
    }

    pub fn record(&self, mut event: DropEvent) -> Option<VerdictRecord> {
        let reason = Reason::from_value(u32::from(event.reason))?;
        // Records are read as they come: now is when the packet was judged, to the millisecond.
        event.timestamp_ns = clock_gettime(ClockId::CLOCK_MONOTONIC)
            .map(|t| std::time::Duration::from(t).as_nanos() as u64)
            .unwrap_or(0);
        let packet = self
            .resolver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(&event);
        Some(VerdictRecord {
            verdict: if reason.allows() { "allow" } else { "drop" },
            step: reason.step(),
            packet,
        })
    }
}

impl log::Log for VerdictLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        let Some(verdict) = parse(&message).and_then(|event| self.record(event)) else {
            tracing::debug!("a trace record killswitch does not know: {message}");
            return;
        };
        if self.json {
            let line = serde_json::to_string(&verdict).expect("records serialize");
            if writeln!(std::io::stdout(), "{line}").is_err() {
                self.reader_gone.store(true, Ordering::Relaxed);
            }
        } else {
            tracing::info!(target: "killswitch::trace", "{verdict}");
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_line_reads_back_as_the_packet_it_describes() {
        // egress, default-drop, IPv4, TCP, ports read; 41872 -> 8080.
        let kind: u64 = 4 << 8 | 4 << 16 | 6 << 24 | 1 << 32;
        let ports: u32 = 41872 << 16 | 8080;
        let line = format!("verdict {kind} ::ffff:192.0.2.2 ::ffff:203.0.113.9 {ports} 2 4096 77");
        let event = parse(&line).unwrap();
        assert_eq!(event.direction, 0);
        assert_eq!(event.reason, Reason::Default as u8);
        assert_eq!(event.source[12..], [192, 0, 2, 2]);
        assert_eq!((event.family, event.protocol, event.ports_known), (4, 6, 1));
        assert_eq!((event.source_port, event.destination_port), (41872, 8080));
        assert_eq!(
            (event.ifindex, event.netns_cookie, event.cgroup_id),
            (2, 4096, 77)
        );
        assert!(parse(&format!("{line} extra")).is_none());
        assert!(parse("verdict 0 4").is_none());
        assert!(parse("hello").is_none());
    }
}
