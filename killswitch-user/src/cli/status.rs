//! `killswitch status`

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Args;
use killswitch_common::Reason;

use crate::{
    backend::{nftables, Backend},
    ebpf::pins,
    error::{Error, Result},
    events::{EventReader, Resolver},
    scope::Scope,
    status::{self, CounterStatus, ScopeStatus},
    verify::thousands,
};

#[derive(Debug, Args)]
pub(super) struct StatusArgs {
    /// Only this scope (absolute, or relative to the cgroup2 mount). Default: every scope
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,

    /// Print JSON for programs instead of the table (with --follow: one object per line)
    #[arg(long)]
    json: bool,

    /// Print dropped packets as they happen, one line each, until interrupted
    #[arg(long, short)]
    follow: bool,
}

/// Exit status 0 when every scope shown is enforced, 1 otherwise (also when there is none).
pub(super) fn run(args: &StatusArgs) -> Result<ExitCode> {
    super::require_privileges()?;
    if args.follow {
        return follow(args);
    }
    let scopes = match &args.cgroup {
        Some(path) => vec![Scope::from_arg(Some(path))?],
        None => crate::backend::scopes()?,
    };
    let mut shown = Vec::new();
    let mut missing = Vec::new();
    for scope in scopes {
        let holding = Backend::holding(&scope);
        for backend in &holding {
            shown.push(match backend {
                Backend::Ebpf => status::read(&scope)?,
                Backend::Nftables => status::read_nft(&scope)?,
            });
        }
        if holding.is_empty() {
            missing.push(scope.display_cgroup());
        }
    }
    let all_enforced = !shown.is_empty() && missing.is_empty() && shown.iter().all(|s| s.enforced);
    if args.json {
        let report = status::StatusReport {
            scopes: shown,
            not_enforced: missing,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("status serializes")
        );
    } else {
        for status in &shown {
            print_table(status);
        }
        for cgroup in &missing {
            println!("scope    {cgroup}: not enforced");
        }
        if shown.is_empty() && missing.is_empty() {
            println!("no scope is enforced; run `killswitch up`");
        }
    }
    Ok(if all_enforced {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_table(s: &ScopeStatus) {
    println!("scope    {}", s.cgroup.display());
    if let Some(pin_dir) = &s.pin_dir {
        println!("pinned   {}", pin_dir.display());
    }
    if let Some(table) = &s.table {
        println!("table    inet {table} (nftables)");
    }
    let links: Vec<String> = s
        .links
        .iter()
        .map(|l| {
            let state = if l.attached { "attached" } else { "DETACHED" };
            format!("{} {state} (prog {})", l.direction, l.program_id)
        })
        .collect();
    let how = match (s.mode, s.namespace_from) {
        ("lockdown", _) => "LOCKDOWN: loopback and DHCP only".into(),
        (_, Some("socket")) => "namespace from the socket, via BTF".into(),
        (_, Some(from)) => format!("namespace from {from}"),
        (mode, None) => mode.to_string(),
    };
    println!(
        "state    {} via {} ({how}) — {}",
        if s.enforced {
            "enforced"
        } else {
            "NOT ENFORCED"
        },
        s.backend,
        if links.is_empty() {
            "no links".into()
        } else {
            links.join(", ")
        }
    );
    if s.attached_by_up == Some(false) {
        println!(
            "note     these are not the programs `killswitch up` attached: a `killswitch trace` \
             runs (or was killed), or another version attached them; `killswitch up` loads \
             this version's"
        );
    }
    if s.mode == "lockdown" {
        // The maps may still hold an older policy; none of it is in force.
        println!(
            "why      {}",
            s.lockdown_reason
                .as_deref()
                .unwrap_or("not recorded; run `killswitch up` to see it")
        );
        println!("policy   none in force until `killswitch up` succeeds");
        print_counters(s);
        return;
    }
    let list = |items: &[String]| {
        if items.is_empty() {
            "none".to_string()
        } else {
            items.join(", ")
        }
    };
    let interfaces = |list: &[status::InterfaceStatus]| -> String {
        if list.is_empty() {
            return "none present".into();
        }
        list.iter()
            .map(|i| match (&i.name, i.this_netns) {
                (Some(name), _) => format!("{name} (ifindex {})", i.ifindex),
                (None, true) => format!("ifindex {} (gone)", i.ifindex),
                (None, false) => format!("ifindex {} (other netns)", i.ifindex),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match &s.tunnel_names {
        // nftables matches names: a tunnel that comes back with a new ifindex needs nobody.
        Some(names) => println!(
            "tunnels  {} by name; present now: {}",
            list(names),
            interfaces(&s.tunnels)
        ),
        None => println!("tunnels  {}", interfaces(&s.tunnels)),
    }
    if s.backend == "ebpf" {
        let state = if s.tunnels.is_empty() { "down" } else { "up" };
        match (&s.tunnels_changed, s.tunnels_changed_seconds_ago) {
            (Some(at), Some(ago)) => {
                println!("         {state} for {} (since {at})", ago_text(ago))
            }
            _ => println!("         {state} since `up`"),
        }
    }
    match &s.uplinks {
        Some(list) => println!("uplinks  {}", interfaces(list)),
        None => println!("uplinks  any non-tunnel interface"),
    }
    if s.servers.is_empty() {
        println!("servers  none");
    }
    for (i, server) in s.servers.iter().enumerate() {
        println!("{:8} {server}", if i == 0 { "servers" } else { "" });
    }
    if s.servers_set_by_command {
        println!("         (set with `killswitch servers`; the config's list returns at the next up or reload)");
    }
    match &s.vpn_client {
        None => println!("client   any program may reach the servers"),
        Some(who) if who.is_empty() => {
            println!("client   only the VPN client may reach the servers; none is running")
        }
        Some(who) => println!("client   only {} may reach the servers", who.join(" or ")),
    }

    let e = &s.exceptions;
    println!(
        "lan      {}{}",
        list(&e.lan),
        match (e.lan.is_empty(), e.lan_dns) {
            (true, _) => "",
            (false, true) => " (DNS to the LAN allowed)",
            (false, false) => " (DNS to the LAN refused)",
        }
    );
    println!("dhcp     {}", if e.dhcp { "allowed" } else { "refused" });
    println!(
        "ipv6     {}",
        if e.ipv6 == "block" {
            "blocked everywhere"
        } else {
            "through the tunnel only"
        }
    );
    println!("ntp      {}", list(&e.ntp_servers));
    println!("dns      {}", list(&e.dns_servers));
    println!("inbound  {}", list(&e.inbound));
    print_counters(s);
}

fn print_counters(s: &ScopeStatus) {
    // Only the guard reads the link layer.
    let guard_only = [Reason::LinkControl.name(), Reason::NotIp.name()];
    // Another namespace passes only where the guard runs.
    let shown = |c: &&CounterStatus| {
        !guard_only.contains(&c.reason)
            && (s.guard.is_some() || c.reason != Reason::OtherNamespace.name())
    };
    print_counter_table("packets", &s.counters, shown);
    if let Some(guard) = &s.guard {
        let devices: Vec<String> = guard
            .devices
            .iter()
            .map(|d| {
                format!(
                    "{} (ifindex {}){}",
                    d.name.as_deref().unwrap_or("gone"),
                    d.ifindex,
                    if d.attached { "" } else { ", NOT ATTACHED" }
                )
            })
            .collect();
        println!(
            "guard    {}",
            if devices.is_empty() {
                "on; no uplink to watch yet".to_owned()
            } else {
                format!("on {}", devices.join(", "))
            }
        );
        print_counter_table("frames", &guard.counters, |c| {
            Reason::ALL
                .iter()
                .any(|r| r.guard_gives() && r.name() == c.reason)
        });
    }
    if s.backend == "ebpf" {
        println!(
            "events   {} held back by the rate limit",
            plural(s.events_suppressed, "drop event")
        );
        if s.recent_drops.is_empty() {
            println!("recent   no packet dropped since `up`");
        }
        for (i, record) in s.recent_drops.iter().enumerate() {
            println!(
                "{:8} {} {record}",
                if i == 0 { "recent" } else { "" },
                record.time
            );
        }
    } else {
        println!("events   dropped packets are logged by the kernel, prefix \"killswitch drop\"");
    }
}

/// A table of counters per reason, egress and ingress side by side, of the rows `shown` keeps.
fn print_counter_table(
    title: &str,
    counters: &[CounterStatus],
    shown: impl Fn(&&CounterStatus) -> bool,
) {
    println!(
        "{title:<8} {:<8} {:<20} {:>12} {:>12}",
        "verdict", "reason", "egress", "ingress"
    );
    let half = counters.len() / 2;
    for (egress, ingress) in counters[..half]
        .iter()
        .zip(&counters[half..])
        .filter(|(e, _)| shown(e))
    {
        println!(
            "         {:<8} {:<20} {:>12} {:>12}",
            egress.verdict,
            egress.reason,
            thousands(egress.packets),
            thousands(ingress.packets)
        );
    }
}

/// "1 drop event", "1,204 drop events".
fn plural(count: u64, noun: &str) -> String {
    format!(
        "{} {noun}{}",
        thousands(count),
        if count == 1 { "" } else { "s" }
    )
}

/// A duration as a person says it: "42 s", "5 min", "3 h 20 min", "2 days".
fn ago_text(seconds: u64) -> String {
    match seconds {
        0..=119 => format!("{seconds} s"),
        120..=7_199 => format!("{} min", seconds / 60),
        7_200..=172_799 => format!("{} h {} min", seconds / 3_600, seconds / 60 % 60),
        _ => format!("{} days", seconds / 86_400),
    }
}

/// `--follow` reads the eBPF programs' drop events; an nftables table logs its drops itself.
fn held_by_nftables() -> Error {
    Error::Runtime(
        "the scope is held by nftables, whose drops go to the kernel log: \
         `journalctl -k --grep 'killswitch drop'`"
            .into(),
    )
}

/// `status --follow`: drop events of one scope as they happen.
fn follow(args: &StatusArgs) -> Result<ExitCode> {
    let scope = match &args.cgroup {
        Some(path) => Scope::from_arg(Some(path))?,
        None => {
            let mut scopes = pins::scopes()?;
            match scopes.len() {
                0 if !nftables::scopes().is_empty() => return Err(held_by_nftables()),
                0 => {
                    return Err(Error::Runtime(
                        "no scope is enforced; run `killswitch up`".into(),
                    ))
                }
                1 => scopes.remove(0),
                _ => {
                    return Err(Error::Usage(
                        "several scopes are enforced; choose one with --cgroup".into(),
                    ))
                }
            }
        }
    };
    if !crate::ebpf::is_pinned(&scope) && nftables::holds(&scope) {
        return Err(held_by_nftables());
    }
    if !crate::ebpf::is_pinned(&scope) {
        return Err(Error::Runtime(format!(
            "{} is not enforced; run `killswitch up`",
            scope.display_cgroup()
        )));
    }
    let mut reader = EventReader::open(&pins::pin_dir(&scope))?;
    let mut resolver = Resolver::new(&crate::scope::cgroup2_mount()?)?;
    eprintln!(
        "following dropped packets of {} (Ctrl-C to stop)",
        scope.display_cgroup()
    );
    loop {
        for event in reader.wait(Duration::from_secs(1))? {
            let record = resolver.record(&event);
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&record).expect("records serialize")
                );
            } else {
                println!("{} {record}", record.time);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_durations_read_as_a_person_says_them() {
        assert_eq!(plural(1, "drop event"), "1 drop event");
        assert_eq!(plural(0, "drop event"), "0 drop events");
        assert_eq!(plural(12_345, "drop event"), "12,345 drop events");
        assert_eq!(ago_text(59), "59 s");
        assert_eq!(ago_text(600), "10 min");
        assert_eq!(ago_text(3 * 3_600 + 20 * 60 + 5), "3 h 20 min");
        assert_eq!(ago_text(3 * 86_400), "3 days");
    }
}
