//! Where a scope's policy is enforced: the eBPF programs on its cgroup (`crate::ebpf`), or an
//! nftables table in the network namespace ([`nftables`]). `up` picks one; `down` and `status`
//! look at both, so a scope moved from one to the other is never left half-held.

pub mod nftables;

use serde::Serialize;

use crate::{error::Result, scope::Scope};

/// A backend that holds scopes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Ebpf,
    Nftables,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Ebpf, Backend::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Ebpf => "ebpf",
            Backend::Nftables => "nftables",
        }
    }

    /// Whether this backend enforces something on the scope now.
    pub fn holds(self, scope: &Scope) -> bool {
        match self {
            Backend::Ebpf => crate::ebpf::is_pinned(scope),
            Backend::Nftables => nftables::holds(scope),
        }
    }

    /// Removes what this backend enforces on the scope; false when it held nothing.
    pub fn remove(self, scope: &Scope) -> Result<bool> {
        match self {
            Backend::Ebpf => crate::ebpf::remove(scope),
            Backend::Nftables => nftables::remove(scope),
        }
    }

    /// The backends holding the scope now (two while a move between them is under way).
    pub fn holding(scope: &Scope) -> Vec<Backend> {
        Backend::ALL
            .into_iter()
            .filter(|b| b.holds(scope))
            .collect()
    }
}
