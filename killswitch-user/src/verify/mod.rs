//! `killswitch verify`: proof, on the live system, that a scope is enforced as planned. Asks the
//! kernel what is attached and what the maps or the table hold, runs generated packets through
//! the same programs (or ruleset) in a scratch namespace against the model, probes from a child
//! cgroup with packets the policy drops before they leave, and looks for the usual holes around
//! a kill switch. Nothing is sent that the policy would let out, and nothing in force changes.

mod decisions;
mod ebpf;
mod holes;
mod nft;
mod probes;
pub mod scratch;
pub mod wire;

use std::path::Path;

use serde::Serialize;

use crate::{
    backend::Backend,
    error::Result,
    policy::{Policy, ServerAddress, ServerEndpoint},
    scope::Scope,
    servers::name_tag,
};

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    /// Not a failure of the kill switch, but something the user should know and can fix.
    Warn,
    Fail,
    /// Could not be checked here; the evidence says why.
    Skip,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// Short name of what was checked (`attached`, `maps`, `decisions`, ...).
    pub check: &'static str,
    pub result: Outcome,
    /// What was seen: the facts behind the result.
    pub evidence: String,
    /// What to do about a failure or warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(check: &'static str, evidence: impl Into<String>) -> Check {
        Check {
            check,
            result: Outcome::Pass,
            evidence: evidence.into(),
            fix: None,
        }
    }

    pub fn fail(check: &'static str, evidence: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            check,
            result: Outcome::Fail,
            evidence: evidence.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn warn(check: &'static str, evidence: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            check,
            result: Outcome::Warn,
            evidence: evidence.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn skip(check: &'static str, why: impl Into<String>) -> Check {
        Check {
            check,
            result: Outcome::Skip,
            evidence: why.into(),
            fix: None,
        }
    }

    /// `Pass` with `evidence` when `problems` is empty, else `Fail` listing them.
    pub fn from_problems(
        check: &'static str,
        evidence: impl Into<String>,
        problems: Vec<String>,
        fix: impl Into<String>,
    ) -> Check {
        if problems.is_empty() {
            Check::pass(check, evidence)
        } else {
            Check::fail(check, problems.join("; "), fix)
        }
    }
}

/// Everything `verify` found about one scope.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scope: String,
    /// Lossy where the path is not UTF-8, so that JSON can always carry it.
    pub cgroup: String,
    /// "ebpf", "nftables", or "none" when nothing enforces the scope.
    pub backend: &'static str,
    pub checks: Vec<Check>,
    /// No check failed.
    pub passed: bool,
}

/// Verifies the scope against the policy in `config`.
pub fn verify(config: &Path, scope: &Scope) -> Result<Report> {
    let policy = Policy::load(config)?.for_scope(scope.is_system_wide());
    let holding = Backend::holding(scope);
    let mut checks = Vec::new();
    let backend = match holding.as_slice() {
        [] => {
            checks.push(Check::fail(
                "enforced",
                format!("nothing enforces {}", scope.display_cgroup()),
                "run `killswitch up` (with the same --cgroup)",
            ));
            None
        }
        [backend] => Some(*backend),
        _ => {
            checks.push(Check::warn(
                "enforced",
                format!(
                    "both eBPF and nftables hold {}: a move between them did not finish",
                    scope.display_cgroup()
                ),
                "run `killswitch up` again to finish it",
            ));
            Some(Backend::Ebpf)
        }
    };
    if let Some(backend) = backend {
        // Before any lock: a lookup can take long when the resolver is out of reach.
        let answers = current_answers(&policy);
        let state = match backend {
            Backend::Ebpf => ebpf::checks(scope, &policy, &answers)?,
            Backend::Nftables => nft::checks(scope, &policy, &answers)?,
        };
        // Probes only where every check of the kernel's state passed: a probe the live state
        // would let out must never be sent.
        let holds = state.enforced
            && state.checks.iter().all(|c| c.result != Outcome::Fail)
            && state.decisions.result != Outcome::Fail;
        checks.extend(state.checks);
        checks.push(state.decisions);
        checks.extend(probes::checks(
            scope,
            backend,
            &state.policy,
            holds,
            &state.unchanged,
        ));
    }
    checks.extend(holes::checks(scope, &policy));
    let passed = checks.iter().all(|c| c.result != Outcome::Fail);
    Ok(Report {
        scope: scope.name.clone(),
        cgroup: scope.cgroup.to_string_lossy().into_owned(),
        backend: backend.map_or("none", Backend::name),
        checks,
        passed,
    })
}

/// What a backend's own checks found: whether the scope is enforced by the policy (so probes
/// cannot leak), the lines about its kernel state, and the decisions line.
struct State {
    enforced: bool,
    checks: Vec<Check>,
    decisions: Check,
    /// The policy with the servers the scope holds: what the probes' target is chosen by.
    policy: Policy,
    /// Takes the scope's lock and gives it when the scope is still as the checks saw it; `None`
    /// once anything changed (a probe chosen by the old state could then leave).
    unchanged: Unchanged,
}

type Unchanged = Box<dyn Fn(&Scope) -> Result<Option<Held>>>;

impl State {
    /// A scope the checks could not prove enforced: no probes.
    fn not_enforced(checks: Vec<Check>, decisions: Check, policy: &Policy) -> State {
        State {
            enforced: false,
            checks,
            decisions,
            policy: policy.clone(),
            unchanged: Box::new(|_| Ok(None)),
        }
    }
}

/// A scope's lock, held while a probe is out.
pub(crate) struct Held(#[allow(dead_code)] Box<dyn std::any::Any>);

impl Held {
    fn new(lock: impl std::any::Any) -> Held {
        Held(Box::new(lock))
    }
}

/// The policy with the servers the scope holds instead of the configured rules (names resolved,
/// or a list set with `killswitch servers`): what the generated packets are judged by.
fn with_servers(policy: &Policy, servers: &[ServerEndpoint]) -> Policy {
    let mut held = policy.clone();
    held.servers = servers
        .iter()
        .map(|s| crate::policy::ServerRule {
            address: ServerAddress::Ip(s.address),
            port: s.port,
            protocol: s.protocol,
        })
        .collect();
    held
}

/// Checks the servers a scope holds against the config: every literal server is held, and
/// every other held server was resolved from one of the configured names. `named` lists the
/// hostname tag ([`crate::servers::name_tag`]) each held address came from (eBPF records it;
/// nft does not).
fn servers_check(
    policy: &Policy,
    held: &[ServerEndpoint],
    named: Option<&[(u64, ServerEndpoint)]>,
    set_by_command: bool,
    answers: &Answers,
) -> Check {
    const CHECK: &str = "servers";
    if set_by_command {
        return Check::pass(
            CHECK,
            format!(
                "{} set with `killswitch servers` (not compared with the config until the next `up`)",
                count(held.len(), "server")
            ),
        );
    }
    let mut problems = Vec::new();
    let literal: Vec<ServerEndpoint> = policy
        .servers
        .iter()
        .filter_map(|rule| match rule.address {
            ServerAddress::Ip(address) => Some(ServerEndpoint {
                address,
                port: rule.port,
                protocol: rule.protocol,
            }),
            ServerAddress::Host(_) => None,
        })
        .collect();
    let hosts: Vec<&str> = policy
        .servers
        .iter()
        .filter_map(|rule| match &rule.address {
            ServerAddress::Host(host) => Some(host.as_str()),
            ServerAddress::Ip(_) => None,
        })
        .collect();
    for server in &literal {
        if !held.contains(server) {
            problems.push(format!("{server} is configured but not held"));
        }
    }
    let mut unresolved = Vec::new();
    let mut unattributed = Vec::new();
    for server in held.iter().filter(|s| !literal.contains(s)) {
        match named {
            Some(named) => {
                if !named
                    .iter()
                    .any(|(tag, s)| s == server && hosts.iter().any(|h| name_tag(h) == *tag))
                {
                    problems.push(format!("{server} is held but not in the config"));
                }
            }
            // No record of names: an address not in the config cannot be tied to one.
            None if hosts.is_empty() => {
                problems.push(format!("{server} is held but not in the config"))
            }
            None => unattributed.push(server.to_string()),
        }
    }
    if let Some(named) = named {
        for host in &hosts {
            if !named.iter().any(|(tag, _)| *tag == name_tag(host)) {
                unresolved.push(*host);
            }
        }
    }
    if !problems.is_empty() {
        return Check::fail(
            CHECK,
            problems.join("; "),
            "run `killswitch up` to write the config's servers again",
        );
    }
    // The names' current answers: an address held for a name that no longer gives it is stale
    // (the daemon replaces it at the next lookup; without one it stays until `up`).
    let stale: Vec<String> = held
        .iter()
        .filter(|s| !literal.contains(s))
        .filter(|s| !answers.is_empty() && !answers.iter().any(|(_, a)| a.contains(s)))
        .map(ToString::to_string)
        .collect();
    unattributed.retain(|s| {
        !answers
            .iter()
            .any(|(_, a)| a.iter().any(|e| e.to_string() == *s))
    });
    if !stale.is_empty() && answers.len() == hosts.len() {
        return Check::warn(
            CHECK,
            format!(
                "{} held, but not in what {} resolve to now",
                stale.join(", "),
                hosts.join(", ")
            ),
            "start `killswitch daemon`, which follows the names, or run `killswitch up` to resolve them again",
        );
    }
    if !unattributed.is_empty() {
        return Check::warn(
            CHECK,
            format!(
                "{} held besides the literal ones; this backend keeps no record of which hostname gave them, so they are not proven to come from {}",
                unattributed.join(", "),
                hosts.join(", ")
            ),
            "run `killswitch up` to resolve the names again now",
        );
    }
    if !unresolved.is_empty() {
        return Check::warn(
            CHECK,
            format!(
                "no address held for {}: its servers are blocked until it resolves",
                unresolved.join(", ")
            ),
            "check the name, or run `killswitch daemon`, which retries it",
        );
    }
    Check::pass(
        CHECK,
        format!(
            "{} held, as configured{}",
            count(held.len(), "server"),
            if hosts.is_empty() {
                String::new()
            } else {
                format!(" ({} by name)", count(hosts.len(), "hostname"))
            }
        ),
    )
}

/// What each configured hostname resolves to now; names that fail to resolve are left out.
type Answers = Vec<(String, Vec<ServerEndpoint>)>;

/// [`Answers`] for the policy's hostnames, all looked up at once.
fn current_answers(policy: &Policy) -> Answers {
    std::thread::scope(|threads| {
        let lookups: Vec<_> = policy
            .servers
            .iter()
            .filter_map(|rule| match &rule.address {
                ServerAddress::Host(host) => Some(threads.spawn(move || {
                    let (answers, failures) =
                        crate::policy::resolve_servers(std::slice::from_ref(rule));
                    failures.is_empty().then(|| (host.clone(), answers))
                })),
                ServerAddress::Ip(_) => None,
            })
            .collect();
        lookups
            .into_iter()
            .filter_map(|lookup| lookup.join().ok().flatten())
            .collect()
    })
}

/// "1,200": thousands separated by commas.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    grouped
}

/// "1 packet", "2 packets", "1,200 packets".
pub fn count(n: usize, noun: &str) -> String {
    let grouped = thousands(n as u64);
    let plural = if noun.ends_with(['s', 'x']) {
        "es"
    } else {
        "s"
    };
    format!("{grouped} {noun}{}", if n == 1 { "" } else { plural })
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_read_well() {
        assert_eq!(super::count(1, "packet"), "1 packet");
        assert_eq!(super::count(0, "probe"), "0 probes");
        assert_eq!(super::count(1200, "packet"), "1,200 packets");
        assert_eq!(super::count(100_000, "server"), "100,000 servers");
        assert_eq!(super::count(2, "LAN prefix"), "2 LAN prefixes");
    }
}
