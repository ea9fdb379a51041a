//! The nftables backend: the rendered script applied with `nft -f -` as one transaction, and
//! read back from the kernel with `nft -j`. Its state is the table itself (one per scope, in the
//! network namespace `nft` runs in); nothing is pinned.

use std::{
    collections::BTreeMap,
    io::Write,
    process::{Command, Stdio},
};

use crate::{
    error::{Error, Result},
    model::{Direction, Reason},
    policy::{Ipv6Mode, Lan, Policy, Protocol, ServerEndpoint},
    render::{self, CgroupMatch, Ruleset},
    scope::Scope,
};

/// The table of the scope and the match that selects its sockets.
fn table_of(scope: &Scope) -> Result<(String, Option<CgroupMatch>)> {
    let mut cgroup = CgroupMatch::new(&scope.relative)?;
    if let Some(c) = cgroup.as_mut() {
        c.id = scope.cgroup_id().ok();
    }
    Ok((render::table_name(cgroup.as_ref()), cgroup))
}

/// What a table's comment says (see `render::nft`): its scope, the cgroup id it was made for,
/// and the lockdown reason if it holds lockdown.
#[derive(Debug, PartialEq, Eq)]
pub struct Comment {
    pub path: String,
    pub id: Option<u64>,
    pub lockdown: Option<String>,
}

impl Comment {
    pub fn parse(text: &str) -> Option<Comment> {
        let (rest, lockdown) = match text.strip_prefix(render::COMMENT_POLICY) {
            Some(rest) => (rest, false),
            None => (text.strip_prefix(render::COMMENT_LOCKDOWN)?, true),
        };
        // A path has no space (the renderer refuses one), so the first ": " starts the reason.
        let (head, reason) = match rest.split_once(": ") {
            Some((head, reason)) => (head, Some(reason)),
            None => (rest, None),
        };
        let (path, id) = match head.split_once(" #") {
            Some((path, id)) => (path, id.parse().ok()),
            None => (head, None),
        };
        Some(Comment {
            path: path.to_owned(),
            id,
            lockdown: lockdown.then(|| reason.unwrap_or_default().to_owned()),
        })
    }
}

/// The name of the scope's table (`inet` family).
pub fn table(scope: &Scope) -> Result<String> {
    Ok(table_of(scope)?.0)
}

/// Where the nftables backend keeps its lock and `down` marks, per table and network namespace.
fn state_dir() -> std::path::PathBuf {
    crate::state::dir().join("nftables")
}

/// A scope's nftables lock: one writer at a time (`up`, `down`, `servers`, the daemon), so
/// that no one writes a table over a newer one, or back after a `down`.
pub struct Lock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

fn state_file(scope: &Scope, extension: &str) -> Result<std::path::PathBuf> {
    let (table, _) = table_of(scope)?;
    let netns = crate::interfaces::netns_cookie()?;
    Ok(state_dir().join(format!("{table}-{netns}.{extension}")))
}

/// Takes the scope's lock (waits for another writer).
pub fn lock(scope: &Scope) -> Result<Lock> {
    crate::state::lock(&state_file(scope, "lock")?).map(Lock)
}

/// Whether the scope's table was taken away with `down` (not by something else, such as a
/// `flush ruleset`).
pub fn taken_down(scope: &Scope) -> bool {
    state_file(scope, "down").is_ok_and(|path| path.exists())
}

/// Replaces the scope's table with the policy's in one transaction (no moment without it),
/// then reads it back. The caller holds [`lock`].
pub fn apply(scope: &Scope, policy: &Policy, servers: &[ServerEndpoint]) -> Result<()> {
    let previous = policy_in_force(scope);
    // No policy recorded while the table changes: one that fails half-way matches no one's.
    record_policy(scope, None)?;
    let committed = apply_unrecorded(scope, policy, servers);
    // A write that fails before nft, or a transaction nft refuses whole, leaves the table
    // before (if any), and so its policy; one committed is the new policy if it is there.
    let there = present(scope);
    let now = match (&committed, &there) {
        (_, Err(_)) => None,
        (Ok(()), Ok(())) => Some(policy.fingerprint()),
        (Err(_), Ok(())) => previous,
    };
    let recorded = record_policy(scope, now);
    committed.and(there).and(recorded)
}

fn apply_unrecorded(scope: &Scope, policy: &Policy, servers: &[ServerEndpoint]) -> Result<()> {
    let mut refused = None;
    // A device that goes away between the listing and the load fails the transaction (before
    // Linux 6.16 a chain on a missing device is refused): again with the devices there are.
    for _ in 0..3 {
        let devices = guarded(policy)?;
        match commit(scope, policy, servers, None, &devices) {
            Ok(()) => return Ok(()),
            Err(e) if devices.is_empty() || !matches!(e, Error::Kernel { .. }) => return Err(e),
            Err(e) => refused = Some(e),
        }
    }
    let refused = refused.expect("tried");
    // Only a kernel that has no netdev egress hook (built without CONFIG_NETFILTER_EGRESS)
    // gets the rest of the policy without the guard's chains, and a line that says so.
    if egress_hook() {
        return Err(refused);
    }
    commit(scope, policy, servers, None, &[])?;
    tracing::warn!(
        "this kernel has no netdev egress hook ({refused}): raw-socket frames are not held on \
         the uplinks; what the host forwards still is"
    );
    Ok(())
}

/// Whether nft can hook a netdev chain on egress here, tried in a scratch namespace.
fn egress_hook() -> bool {
    const PROBE: &str = "table netdev killswitch_probe {\n\tchain egress {\n\t\ttype filter hook egress device \"lo\" priority filter; policy accept;\n\t}\n}\n";
    crate::verify::scratch::run(|_| {
        run_nft(&["-f", "-"], Some(PROBE), false).map_err(|e| Error::kernel("probe", e))
    })
    .is_ok()
}

/// Renders the policy and loads it in one nft transaction: on an error, the table is as it was.
fn commit(
    scope: &Scope,
    policy: &Policy,
    servers: &[ServerEndpoint],
    lockdown: Option<String>,
    guarded: &[(crate::interfaces::Interface, u8)],
) -> Result<()> {
    let (_, cgroup) = table_of(scope)?;
    let clients = crate::vpn_client::current(policy);
    let script = render::nft(&Ruleset {
        policy,
        servers,
        cgroup: cgroup.clone(),
        lockdown,
        clients: &clients,
        guarded,
    })?;
    run_nft(
        &["-f", "-"],
        Some(&script),
        cgroup.is_some() || !clients.is_empty(),
    )
    .map_err(|e| Error::kernel("nft refused the ruleset", e))?;
    if let Ok(mark) = state_file(scope, "down") {
        let _ = std::fs::remove_file(mark);
    }
    Ok(())
}

/// The scope's table is there, after nft said it loaded it.
fn present(scope: &Scope) -> Result<()> {
    if holds(scope) {
        return Ok(());
    }
    let (table, _) = table_of(scope)?;
    Err(Error::kernel(
        "nft reported success",
        format!("but table inet {table} is not there"),
    ))
}

/// Records which policy the scope's table now holds (`None`: lockdown, or no table).
fn record_policy(scope: &Scope, fingerprint: Option<u64>) -> Result<()> {
    let path = state_file(scope, "policy")?;
    match fingerprint {
        Some(fingerprint) => std::fs::write(&path, fingerprint.to_string())
            .map_err(|e| Error::io("cannot write", &path, e)),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io("cannot remove", &path, e))
            }
            _ => Ok(()),
        },
    }
}

/// The fingerprint of the policy the scope's table holds ([`Policy::fingerprint`]), as the
/// last write recorded it; `None` when none is recorded.
pub fn policy_in_force(scope: &Scope) -> Option<u64> {
    let text = std::fs::read_to_string(state_file(scope, "policy").ok()?).ok()?;
    text.trim()
        .parse()
        .ok()
        .filter(|fingerprint| *fingerprint != 0)
}

/// The devices whose frames the guard's netdev chains hold: the ones the eBPF guard would
/// watch, now. None before Linux 5.16, which has no netdev egress hook (docs/guard.md).
pub fn guarded(policy: &Policy) -> Result<Vec<(crate::interfaces::Interface, u8)>> {
    if !policy.guarded() {
        return Ok(Vec::new());
    }
    if !aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 16, 0))
    {
        tracing::warn!(
            "this kernel has no netdev egress hook (Linux 5.16): the nftables guard holds what the \
             host forwards, not raw-socket frames"
        );
        return Ok(Vec::new());
    }
    Ok(crate::interfaces::guarded(
        &crate::interfaces::list()?,
        policy,
    ))
}

/// The devices the scope's netdev chains hook now, each with what its chain says of it (as
/// [`crate::interfaces::guarded`] does), sorted; none without the table. Read from nft's text
/// listing: its JSON (1.0.6) leaves a chain's devices out.
pub fn frame_devices(scope: &Scope) -> Result<Vec<(String, u8)>> {
    let (table, _) = table_of(scope)?;
    let Ok(text) = run_nft(&["list", "chains", "netdev"], None, false) else {
        return Ok(Vec::new());
    };
    let mut ours = false;
    let mut kind = None;
    let mut devices = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("table netdev ") {
            ours = name.trim_end_matches('{').trim() == table;
            continue;
        }
        if let Some(chain) = line.strip_prefix("chain ") {
            let chain = chain.trim_end_matches('{').trim();
            kind = render::FRAME_CHAINS
                .iter()
                .find(|(_, name)| *name == chain)
                .map(|(header, _)| *header);
            continue;
        }
        let (Some((_, hooked)), Some(header), true) = (line.split_once("hook egress "), kind, ours)
        else {
            continue;
        };
        // `device "c0" priority ...` or `devices = { c0, e0 } priority ...`
        let names = match hooked.strip_prefix("devices = {") {
            Some(list) => list.split('}').next().unwrap_or_default(),
            None => hooked
                .strip_prefix("device ")
                .and_then(|d| d.split_whitespace().next())
                .unwrap_or_default(),
        };
        devices.extend(
            names
                .split(',')
                .map(|n| n.trim().trim_matches('"').to_owned())
                .filter(|n| !n.is_empty())
                .map(|n| (n, header)),
        );
    }
    devices.sort();
    Ok(devices)
}

/// The guard's netdev table's counters, every direction and reason (zero where it has none);
/// `None` without the table.
pub fn frame_counters(scope: &Scope) -> Result<Option<Vec<(Direction, Reason, u64)>>> {
    let (table, _) = table_of(scope)?;
    if !holds_frames(&table) {
        return Ok(None);
    }
    let json = run_nft(
        &["-j", "list", "counters", "table", "netdev", &table],
        None,
        false,
    )
    .map_err(|e| Error::kernel("nft could not list the guard's counters", e))?;
    let value: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| Error::kernel("nft printed unreadable JSON", e))?;
    let mut counters = Table::default();
    for counter in value["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("counter"))
    {
        if let (Some(name), Some(packets)) = (counter["name"].as_str(), counter["packets"].as_u64())
        {
            counters.counters.insert(name.to_owned(), packets);
        }
    }
    Ok(Some(counters.counters()))
}

/// Whether the guard's netdev table of this name has `chain`.
fn frames_chain(table: &str, chain: &str) -> bool {
    run_nft(&["list", "chain", "netdev", table, chain], None, false).is_ok()
}

/// Whether the guard's netdev table of this name is there (it holds copies of the server sets).
/// When the kernel cannot say, it is taken to be there: the caller's nft command then fails
/// with its own error rather than leave the guard's copy of a list unchanged.
fn holds_frames(table: &str) -> bool {
    super::nft_tables::exists(super::nft_tables::Family::Netdev, table).unwrap_or(true)
}

/// Adds a VPN client's cgroup to the scope's table, if the table holds the servers to its VPN
/// client (it has the `vpn_client` chain); false otherwise. The next apply renders the same.
/// One nft run, as the client may be starting right now; the caller holds the scope's lock.
pub fn add_vpn_client(
    scope: &Scope,
    client: &crate::vpn_client::ClientCgroup,
    _lock: &Lock,
) -> Result<bool> {
    let (table, _) = table_of(scope)?;
    let Some((path, level)) = render::client_rule(client) else {
        return Ok(false);
    };
    let mut script = format!(
        "add rule inet {table} vpn_client socket cgroupv2 level {level} \"{path}\" counter name \"{}\" accept comment \"{}\"\n",
        render::counter_name(Direction::Egress, Reason::Server),
        render::step(Reason::Server)
    );
    // The guard's netdev chain cannot ask a cgroup: a client known by its mark alone there
    // until now, from here on no longer held to it (the next render says the same).
    if frames_chain(&table, render::FRAMES_VPN_CLIENT) {
        script.push_str(&format!(
            "add rule netdev {table} {} counter name \"{}\" accept\n",
            render::FRAMES_VPN_CLIENT,
            render::counter_name(Direction::Egress, Reason::Server),
        ));
    }
    match run_nft(&["-f", "-"], Some(&script), true) {
        Ok(_) => Ok(true),
        // No such table or chain: the scope does not hold the servers to its VPN client.
        Err(e) if e.contains("No such file or directory") && !e.contains("cgroupv2") => Ok(false),
        Err(e) => Err(Error::kernel("nft refused the VPN client", e)),
    }
}

/// What lockdown is in this backend: the policy with no tunnel, server, LAN or other
/// exception, and DHCP (requests to the broadcast address only, as there is no LAN).
pub fn lockdown_policy() -> Policy {
    Policy {
        tunnels: Vec::new(),
        uplinks: None,
        servers: Vec::new(),
        lan: Lan::default(),
        dhcp: true,
        ntp_servers: Vec::new(),
        dns_servers: Vec::new(),
        ipv6: Ipv6Mode::Tunnel,
        inbound: Vec::new(),
        vpn_client: None,
        guard: Some(false),
    }
}

/// Holds a scope that has no table yet in lockdown; see [`crate::ebpf::lock_down`]. The caller
/// holds [`lock`].
pub fn lock_down(scope: &Scope, cause: Error) -> Error {
    if holds(scope) {
        return cause;
    }
    if let Err(e) = record_policy(scope, None) {
        tracing::warn!("{e}: a daemon may take an older record for the policy in force");
    }
    match commit(scope, &lockdown_policy(), &[], Some(cause.to_string()), &[])
        .and_then(|()| present(scope))
    {
        Ok(()) => Error::Lockdown(Box::new(cause)),
        Err(also) => Error::kernel(
            cause.to_string(),
            format!(
                "lockdown failed too ({also}); {} may be NOT ENFORCED",
                scope.display_cgroup()
            ),
        ),
    }
}

/// Whether the scope's table exists in this network namespace (false when nf_tables cannot
/// say, as when there is none).
pub fn holds(scope: &Scope) -> bool {
    table_of(scope).is_ok_and(|(table, _)| {
        super::nft_tables::exists(super::nft_tables::Family::Inet, &table).unwrap_or_else(|e| {
            tracing::warn!("cannot tell whether nftables holds {table}: {e}");
            false
        })
    })
}

/// Whether the server list in the scope's table was set with `killswitch servers` (one object
/// listed, not the table).
pub fn servers_set_by_command(scope: &Scope) -> bool {
    let Ok((table, _)) = table_of(scope) else {
        return false;
    };
    run_nft(
        &["list", "counter", "inet", &table, render::SET_BY_COMMAND],
        None,
        false,
    )
    .is_ok()
}

/// Removes the scope's table, and marks it taken down (so a daemon stops instead of putting it
/// back). Returns false when there was none.
pub fn remove(scope: &Scope) -> Result<bool> {
    // The guard's table too, when it outlived the inet one (deleted by hand).
    if !holds(scope) && !holds_frames(&table_of(scope)?.0) {
        return Ok(false);
    }
    let _lock = lock(scope)?;
    let (table, _) = table_of(scope)?;
    let mark = state_file(scope, "down")?;
    std::fs::write(&mark, "").map_err(|e| Error::io("cannot write", &mark, e))?;
    record_policy(scope, None)?;
    run_nft(&["-f", "-"], Some(&render::delete_script(&table)), false)
        .map_err(|e| Error::kernel("nft could not delete the table", e))?;
    Ok(true)
}

/// A scope's table as the kernel holds it (`nft -j list table`).
#[derive(Debug, Default)]
pub struct Table {
    /// The table's comment (on its output hook's rule): `killswitch policy for PATH` or
    /// `killswitch lockdown for PATH: REASON`.
    pub comment: String,
    /// Hooks of its base chains ("output", "input").
    pub hooks: Vec<String>,
    pub chains: Vec<String>,
    /// Elements of each named set, as nft prints them (`a . udp . 1194` for concatenations).
    pub sets: BTreeMap<String, Vec<String>>,
    pub rules: Vec<Rule>,
    /// Packets per named counter.
    pub counters: BTreeMap<String, u64>,
}

#[derive(Debug)]
pub struct Rule {
    pub chain: String,
    pub comment: String,
    /// Interface names (or `name*` patterns) the rule matches.
    pub interfaces: Vec<String>,
    /// What a `vpn_client` rule knows the client by: `mark 0x...` or `cgroup PATH`.
    pub identifies: Vec<String>,
}

impl Table {
    /// Every counter per direction and reason, zero for the ones the table does not have.
    pub fn counters(&self) -> Vec<(Direction, Reason, u64)> {
        let mut out = Vec::new();
        for direction in Direction::ALL {
            for reason in Reason::ALL {
                let name = render::counter_name(direction, reason);
                out.push((
                    direction,
                    reason,
                    self.counters.get(&name).copied().unwrap_or(0),
                ));
            }
        }
        out
    }

    /// Interfaces matched by the rules of `chain` whose comment is `comment`.
    pub fn interfaces(&self, chain: &str, comment: &str) -> Vec<String> {
        self.rules
            .iter()
            .filter(|r| r.chain == chain && r.comment == comment)
            .flat_map(|r| r.interfaces.clone())
            .collect()
    }
}

/// Reads the scope's table back from the kernel.
pub fn read(scope: &Scope) -> Result<Table> {
    let (table, _) = table_of(scope)?;
    read_table(&table)
}

fn read_table(table: &str) -> Result<Table> {
    // With the cgroup2 mount where nft looks, a `socket cgroupv2` match lists as its path.
    let json = run_nft(&["-j", "list", "table", "inet", table], None, true)
        .map_err(|e| Error::kernel("nft could not list the table", e))?;
    let value: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| Error::kernel("nft printed unreadable JSON", e))?;
    let mut out = Table::default();
    for item in value["nftables"].as_array().into_iter().flatten() {
        if let Some(chain) = item.get("chain") {
            if let Some(hook) = chain["hook"].as_str() {
                out.hooks.push(hook.to_owned());
            }
            out.chains
                .push(chain["name"].as_str().unwrap_or_default().to_owned());
        } else if let Some(set) = item.get("set") {
            let name = set["name"].as_str().unwrap_or_default().to_owned();
            let elements = set["elem"]
                .as_array()
                .into_iter()
                .flatten()
                .map(element)
                .collect();
            out.sets.insert(name, elements);
        } else if let Some(counter) = item.get("counter") {
            if let (Some(name), Some(packets)) =
                (counter["name"].as_str(), counter["packets"].as_u64())
            {
                out.counters.insert(name.to_owned(), packets);
            }
        } else if let Some(rule) = item.get("rule") {
            let interfaces = rule["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    let m = e.get("match")?;
                    let key = m["left"]["meta"]["key"].as_str()?;
                    (matches!(key, "oifname" | "iifname") && m["op"] == "==")
                        .then(|| m["right"].as_str().map(str::to_owned))?
                })
                .collect();
            let identifies = rule["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    let m = e.get("match")?;
                    let right = element(&m["right"]);
                    if m["left"]["meta"]["key"] == "mark" {
                        let mark: u64 = right.parse().ok()?;
                        Some(format!("mark {mark:#x}"))
                    } else if m["left"]["socket"]["key"] == "cgroupv2" {
                        Some(format!("cgroup {right}"))
                    } else {
                        None
                    }
                })
                .collect();
            let comment = rule["comment"].as_str().unwrap_or_default();
            if rule["chain"] == "output" && comment.starts_with("killswitch ") {
                out.comment = comment.to_owned();
            }
            out.rules.push(Rule {
                chain: rule["chain"].as_str().unwrap_or_default().to_owned(),
                comment: rule["comment"].as_str().unwrap_or_default().to_owned(),
                interfaces,
                identifies,
            });
        }
    }
    Ok(out)
}

/// A set element as text: an address, `addr/len`, or `a . b . c`.
fn element(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Object(o) => {
            if let Some(prefix) = o.get("prefix") {
                format!("{}/{}", element(&prefix["addr"]), prefix["len"])
            } else if let Some(parts) = o.get("concat").and_then(|c| c.as_array()) {
                parts.iter().map(element).collect::<Vec<_>>().join(" . ")
            } else if let Some(inner) = o.get("elem") {
                element(&inner["val"])
            } else {
                value.to_string()
            }
        }
        other => other.to_string(),
    }
}

/// Every scope an nftables table of ours holds in this network namespace (none when nft is
/// missing).
pub fn scopes() -> Vec<Scope> {
    let Ok(json) = run_nft(&["-j", "list", "tables", "inet"], None, false) else {
        return Vec::new();
    };
    let value: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    let mut out = Vec::new();
    for item in value["nftables"].as_array().into_iter().flatten() {
        let Some(name) = item["table"]["name"].as_str() else {
            continue;
        };
        if !name.starts_with("killswitch") {
            continue;
        }
        let Ok(table) = read_table(name) else {
            continue;
        };
        let path = Comment::parse(&table.comment).map(|c| c.path);
        let scope = match path.as_deref() {
            Some("/") => Scope::from_arg(None).unwrap_or_else(|_| Scope::without_cgroup2()),
            Some(path) => match Scope::from_arg(Some(std::path::Path::new(path))) {
                Ok(scope) => scope,
                Err(_) => continue,
            },
            None => continue,
        };
        // Only a table whose name is the one this scope would get.
        if table_of(&scope).is_ok_and(|(expected, _)| expected == name) {
            out.push(scope);
        }
    }
    out
}

impl Table {
    /// The server endpoints the table's sets hold (a server for TCP and UDP is two entries).
    pub fn servers(&self) -> Vec<ServerEndpoint> {
        render::SERVER_SETS
            .iter()
            .flat_map(|name| self.sets.get(*name).cloned().unwrap_or_default())
            .filter_map(|element| parse_server(&element))
            .collect()
    }

    /// Whether the server list in force was set with `killswitch servers`.
    pub fn servers_set_by_command(&self) -> bool {
        self.counters.contains_key(render::SET_BY_COMMAND)
    }
}

/// `addr . proto . port` or `addr . proto`, as a server set holds it.
fn parse_server(element: &str) -> Option<ServerEndpoint> {
    let parts: Vec<&str> = element.split(" . ").collect();
    let protocol = match parts.get(1) {
        Some(&"udp") => Some(Protocol::Udp),
        Some(&"tcp") => Some(Protocol::Tcp),
        _ => None,
    };
    Some(ServerEndpoint {
        address: parts.first()?.parse().ok()?,
        port: parts.get(2).and_then(|p| p.parse().ok()),
        protocol,
    })
}

/// Replaces the server list of the scope's table in one transaction (a server in both the old
/// and the new list never misses a packet) and marks it as the command's. The caller holds
/// [`lock`].
pub fn set_servers(scope: &Scope, servers: &[ServerEndpoint]) -> Result<()> {
    let (table, _) = table_of(scope)?;
    run_nft(
        &["-f", "-"],
        Some(&render::servers_script(
            &table,
            servers,
            holds_frames(&table),
        )),
        false,
    )
    .map_err(|e| Error::kernel("nft refused the server list", e))?;
    Ok(())
}

/// The scope's table as `nft -j -s list table` prints it in this network namespace (stateless:
/// no counter values).
/// The guard's netdev table follows, when there is one.
pub fn listing(scope: &Scope) -> Result<serde_json::Value> {
    let (table, _) = table_of(scope)?;
    let list = |family: &str| -> Result<serde_json::Value> {
        let json = run_nft(&["-j", "-s", "list", "table", family, &table], None, true)
            .map_err(|e| Error::kernel("nft could not list the table", e))?;
        serde_json::from_str(&json).map_err(|e| Error::kernel("nft printed unreadable JSON", e))
    };
    let mut listing = list("inet")?;
    if holds_frames(&table) {
        let frames = list("netdev")?;
        if let (Some(all), Some(more)) = (
            listing["nftables"].as_array_mut(),
            frames["nftables"].as_array(),
        ) {
            all.extend(more.iter().cloned());
        }
    }
    Ok(listing)
}

/// Writes the table `up` would write for `policy` with `servers` into the current network
/// namespace (a scratch one: `verify`), as `servers set` leaves it when `set_by_command`, with
/// the guard on `guarded` (devices of this namespace).
pub fn write_planned(
    scope: &Scope,
    policy: &Policy,
    servers: &[ServerEndpoint],
    set_by_command: bool,
    guarded: &[(crate::interfaces::Interface, u8)],
) -> Result<()> {
    commit(scope, policy, servers, None, guarded)?;
    present(scope)?;
    if set_by_command {
        set_servers(scope, servers)?;
    }
    Ok(())
}

/// Removes the scope's table from the current network namespace (a scratch one: `verify`).
pub fn delete_table(scope: &Scope) -> Result<()> {
    let (table, _) = table_of(scope)?;
    run_nft(&["-f", "-"], Some(&render::delete_script(&table)), false)
        .map(|_| ())
        .map_err(|e| Error::kernel("nft could not delete the table", e))
}

/// Whether this machine has a working `nft` (a missing binary is the usual reason not).
pub fn available() -> Result<()> {
    run_nft(&["--version"], None, false)
        .map(|_| ())
        .map_err(|e| Error::Runtime(format!("nftables is not usable: {e}")))
}

/// Runs `nft ARGS`, with `input` on its stdin; its stdout, or its error output as the error.
/// `cgroup_paths`: the script names cgroups, which nft (1.0.6) looks up under /sys/fs/cgroup;
/// where cgroup2 is mounted elsewhere, nft runs in a mount namespace of its own with the
/// cgroup2 mount bound there.
fn run_nft(args: &[&str], input: Option<&str>, cgroup_paths: bool) -> Result<String, String> {
    let mut command = Command::new("nft");
    command
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if cgroup_paths {
        let cgroup2 = crate::scope::cgroup2_mount().map_err(|e| e.to_string())?;
        if cgroup2 != std::path::Path::new("/sys/fs/cgroup") {
            let source = std::ffi::CString::new(cgroup2.as_os_str().as_encoded_bytes())
                .map_err(|e| e.to_string())?;
            // SAFETY: between fork and exec only async-signal-safe calls (unshare, mount) on
            // strings made before the fork.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                    let failed = libc::unshare(libc::CLONE_NEWNS) != 0
                        || libc::mount(
                            c"none".as_ptr(),
                            c"/".as_ptr(),
                            std::ptr::null(),
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        ) != 0
                        || libc::mount(
                            source.as_ptr(),
                            c"/sys/fs/cgroup".as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) != 0;
                    if failed {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if let Some(text) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("cannot write to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("nft did not finish: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // nft's first line says what is wrong; the rest repeats the script.
        Err(stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("nft failed")
            .trim()
            .to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_comment_reads_back() {
        let c = |text: &str| Comment::parse(text);
        assert_eq!(
            c("killswitch policy for /"),
            Some(Comment {
                path: "/".into(),
                id: None,
                lockdown: None
            })
        );
        assert_eq!(
            c("killswitch policy for a/b:c #42"),
            Some(Comment {
                path: "a/b:c".into(),
                id: Some(42),
                lockdown: None
            })
        );
        assert_eq!(
            c("killswitch lockdown for app #7: /etc/k.toml:1: bad: value"),
            Some(Comment {
                path: "app".into(),
                id: Some(7),
                lockdown: Some("/etc/k.toml:1: bad: value".into())
            })
        );
        assert_eq!(
            c("killswitch lockdown for /: no config"),
            Some(Comment {
                path: "/".into(),
                id: None,
                lockdown: Some("no config".into())
            })
        );
        assert_eq!(c("something else"), None);
    }
}
