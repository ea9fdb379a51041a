//! The nftables backend's kernel state: the scope's table, as the kernel lists it, against the
//! table `up` would write now, loaded into a scratch namespace and listed the same way.

use serde_json::Value;

use super::{count, decisions, scratch, servers_check, wire, with_servers, Check, State};
use crate::{
    backend::nftables,
    error::Result,
    model::{Filter, Packet},
    policy::{InterfacePattern, Policy},
    scope::Scope,
};

pub(super) fn checks(scope: &Scope, policy: &Policy, answers: &super::Answers) -> Result<State> {
    // The planned table is rendered before the lock (it takes a scratch namespace), for the
    // servers held now; again below if they changed meanwhile.
    let early = nftables::read(scope)?;
    let early_servers = (early.servers(), early.servers_set_by_command());
    let mut planned = Some(planned(scope, policy, &early_servers.0, early_servers.1));
    // Read under the scope's lock, so that a write in progress is not caught half done.
    let lock = nftables::lock(scope)?;
    let table = nftables::read(scope)?;
    let name = nftables::table(scope)?;
    let comment = nftables::Comment::parse(&table.comment);
    let mut checks = Vec::new();
    let hooks = ["output", "input"]
        .iter()
        .all(|h| table.hooks.iter().any(|t| t == h));
    let same_cgroup = match comment.as_ref().and_then(|c| c.id) {
        Some(id) => scope.cgroup_id().is_ok_and(|now| now == id),
        None => true,
    };
    let lockdown = comment.as_ref().and_then(|c| c.lockdown.clone());
    let attached = if !hooks {
        Check::fail(
            "attached",
            format!("table inet {name} lacks its output or input hook"),
            "run `killswitch up --backend nftables`",
        )
    } else if !same_cgroup {
        Check::fail(
            "attached",
            format!(
                "table inet {name} matches an earlier cgroup of that path (it was removed and made again)"
            ),
            "run `killswitch up --backend nftables` to match the cgroup that exists now",
        )
    } else if let Some(why) = &lockdown {
        Check::fail(
            "attached",
            format!("table inet {name} holds lockdown (loopback and DHCP only): {why}"),
            "fix what the lockdown reason says, then run `killswitch up --backend nftables`",
        )
    } else {
        Check::pass(
            "attached",
            format!("table inet {name} hooks output and input, as the kernel lists it"),
        )
    };
    let enforced = attached.result == super::Outcome::Pass;
    checks.push(attached);
    let servers = table.servers();
    let set_by_command = table.servers_set_by_command();
    if (servers.clone(), set_by_command) != early_servers {
        planned = None;
    }
    let planned = planned.unwrap_or_else(|| self::planned(scope, policy, &servers, set_by_command));
    let live = nftables::listing(scope).map(|l| items(&l));
    checks.push(table_check(&name, &live, planned));
    checks.push(guard_check(scope, policy));
    checks.push(servers_check(
        policy,
        &servers,
        None,
        set_by_command,
        answers,
    ));
    let judged_by = with_servers(policy, &servers);
    drop(lock);
    let decisions = decide(&judged_by, &servers, set_by_command);
    let seen = live.ok();
    Ok(State {
        enforced,
        checks,
        decisions,
        policy: judged_by,
        unchanged: Box::new(move |scope| {
            let lock = nftables::lock(scope)?;
            let now = nftables::listing(scope).map(|l| items(&l)).ok();
            Ok((seen.is_some() && now == seen).then(|| super::Held::new(lock)))
        }),
    })
}

/// `decisions`: generated packets through the same ruleset in a scratch namespace, each batch
/// sent twice, without the table and with it: a packet the kernel does not deliver even
/// unfiltered says nothing about the ruleset and is not compared. The table is the system-wide
/// one (no `socket cgroupv2` gate): for a cgroup scope, the rules behind its gate, which the
/// `table` check proved equal to the live ones.
fn decide(
    policy: &Policy,
    servers: &[crate::policy::ServerEndpoint],
    set_by_command: bool,
) -> Check {
    // The ruleset names interfaces: in the scratch namespace the tunnel and the uplink are its
    // own (`tun0`, `up0`), as the generated packets' interfaces are.
    let mut scratch_policy = policy.clone();
    scratch_policy.tunnels = vec![InterfacePattern::exact(scratch::TUNNEL)];
    if scratch_policy.uplinks.is_some() {
        scratch_policy.uplinks = Some(vec![InterfacePattern::exact(scratch::UPLINK)]);
    }
    let policy = &scratch_policy;
    let result = scratch::run(|net| {
        let root = Scope::from_arg(None)?;
        let mut wire = wire::Wire::new(net)?;
        let mut loaded = false;
        let mut judge = |batch: &[Packet]| -> Result<Vec<Option<decisions::Judged>>> {
            if loaded {
                nftables::delete_table(&root)?;
            }
            let unfiltered = wire.deliver(batch)?;
            // The packets leave by sockets: the inet table judges them (the netdev chains
            // apply the same steps, `table` proves them equal to the plan).
            nftables::write_planned(&root, policy, servers, set_by_command, &[])?;
            loaded = true;
            let filtered = wire.deliver(batch)?;
            Ok(unfiltered
                .into_iter()
                .zip(filtered)
                .map(|(unfiltered, filtered)| match (unfiltered, filtered) {
                    (Some(true), Some(arrived)) => Some((arrived, decisions::Counted::Unknown)),
                    _ => None,
                })
                .collect())
        };
        Ok(decisions::compare(
            policy,
            Filter::Netfilter,
            "the same ruleset in a scratch namespace",
            false,
            &mut judge,
        ))
    });
    result.unwrap_or_else(|e| {
        Check::fail(
            "decisions",
            format!("the packets could not be run: {e}"),
            "run with -v",
        )
    })
}

/// The table `up` would write now with these servers, listed as [`items`]; the guard's netdev
/// chains on the devices it would hook here, made in the scratch namespace by those names.
fn planned(
    scope: &Scope,
    policy: &Policy,
    servers: &[crate::policy::ServerEndpoint],
    set_by_command: bool,
) -> Result<Vec<Value>> {
    let guarded = nftables::guarded(policy)?;
    let names: Vec<String> = guarded.iter().map(|(d, _)| d.name.clone()).collect();
    scratch::run_with_devices(&names, |_| {
        nftables::write_planned(scope, policy, servers, set_by_command, &guarded)?;
        nftables::listing(scope)
    })
    .map(|l| items(&l))
}

/// `guard`: with `[guard]`, the netdev chains hook exactly the devices the guard holds now;
/// without, there is no netdev table.
fn guard_check(scope: &Scope, policy: &Policy) -> Check {
    const CHECK: &str = "guard";
    let (hooked, planned) = match (nftables::frame_devices(scope), nftables::guarded(policy)) {
        (Ok(hooked), Ok(planned)) => (hooked, planned),
        (Err(e), _) | (_, Err(e)) => {
            return Check::fail(
                CHECK,
                format!("cannot list the devices: {e}"),
                "run as root",
            )
        }
    };
    let mut planned: Vec<(String, u8)> = planned.into_iter().map(|(d, h)| (d.name, h)).collect();
    planned.sort();
    let names = |list: &[(String, u8)]| -> Vec<String> {
        list.iter().map(|(name, _)| name.clone()).collect()
    };
    let (hooked_names, planned_names) = (names(&hooked), names(&planned));
    if hooked == planned {
        return Check::pass(
            CHECK,
            if planned.is_empty() {
                "no netdev chain (no guard, or no device to guard)".into()
            } else {
                format!(
                    "netdev egress chains hold the frames of {}",
                    planned_names.join(", ")
                )
            },
        );
    }
    Check::fail(
        CHECK,
        format!(
            "the netdev chains hook [{}]; the guard holds [{}] now{}",
            hooked_names.join(", "),
            planned_names.join(", "),
            if hooked_names == planned_names {
                " (some by another chain: a device joined or left a listed uplink)"
            } else {
                ""
            }
        ),
        "run `killswitch up --backend nftables`; start `killswitch daemon`, which follows devices as they come",
    )
}

/// `table`: the live table equals the one rendered now, item by item.
fn table_check(name: &str, live: &Result<Vec<Value>>, planned: Result<Vec<Value>>) -> Check {
    let live = match live {
        Ok(live) => live,
        Err(e) => return Check::fail("table", format!("cannot list it: {e}"), "run as root"),
    };
    let planned = match planned {
        Ok(planned) => planned,
        Err(e) => {
            return Check::fail(
                "table",
                format!("cannot render the planned table: {e}"),
                "run `killswitch check`",
            )
        }
    };
    let extra: Vec<String> = live
        .iter()
        .filter(|i| !planned.contains(i))
        .map(describe)
        .collect();
    let missing: Vec<String> = planned
        .iter()
        .filter(|i| !live.contains(i))
        .map(describe)
        .collect();
    // Order matters: a rule moved above a drop widens the policy.
    if *live == planned {
        return Check::pass(
            "table",
            format!(
                "table inet {name} equals the rendered policy ({})",
                count(live.len(), "item")
            ),
        );
    }
    let mut problems = Vec::new();
    if !extra.is_empty() {
        problems.push(format!("not planned: {}", extra.join("; ")));
    }
    if !missing.is_empty() {
        problems.push(format!("missing: {}", missing.join("; ")));
    }
    if problems.is_empty() {
        problems.push("the same items in another order (or repeated)".into());
    }
    Check::fail(
        "table",
        format!("table inet {name} differs: {}", problems.join("; ")),
        "run `killswitch up --backend nftables` to write it again (someone edited it)",
    )
}

/// The listing's items without what differs between two loads of the same script: handles,
/// the metainfo line, the order of set elements.
fn items(listing: &Value) -> Vec<Value> {
    listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|item| item.get("metainfo").is_none())
        .map(|item| {
            let mut item = item.clone();
            strip_handles(&mut item);
            // Named counters list their values even when stateless.
            if let Some(counter) = item.get_mut("counter").and_then(Value::as_object_mut) {
                counter.remove("packets");
                counter.remove("bytes");
            }
            if let Some(elements) = item
                .get_mut("set")
                .and_then(|set| set.get_mut("elem"))
                .and_then(Value::as_array_mut)
            {
                elements.sort_by_key(|e| e.to_string());
            }
            item
        })
        .collect()
}

fn strip_handles(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.remove("handle");
            map.values_mut().for_each(strip_handles);
        }
        Value::Array(list) => list.iter_mut().for_each(strip_handles),
        _ => {}
    }
}

/// One line for a listing item: a rule by its chain and comment, anything else by kind and name.
fn describe(item: &Value) -> String {
    if let Some(rule) = item.get("rule") {
        let comment = rule["comment"].as_str().unwrap_or("no comment");
        return format!(
            "a rule in chain {} ({comment})",
            rule["chain"].as_str().unwrap_or("?")
        );
    }
    match item.as_object().and_then(|o| o.iter().next()) {
        Some((kind, body)) => format!("{kind} {}", body["name"].as_str().unwrap_or("?")),
        None => item.to_string(),
    }
}
