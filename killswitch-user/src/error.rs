//! The library's one error type. Every message is a single line a user can act on.

use std::{io, path::PathBuf};

use crate::policy::ConfigError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file is unreadable, unsafe or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A command-line value is wrong (e.g. a `--cgroup` that is not a cgroup).
    #[error("{0}")]
    Usage(String),

    /// Something in the running system prevents the command (e.g. no scope is enforced).
    #[error("{0}")]
    Runtime(String),

    #[error(
        "killswitch needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); run it with sudo"
    )]
    NotPermitted,

    #[error("cannot resolve server {host}: {reason}; check the name or use an address")]
    Resolve { host: String, reason: String },

    /// The kernel refused something (load, verify, attach, pin, map update).
    #[error("{what}: {reason}")]
    Kernel { what: String, reason: String },

    /// The policy could not be enforced on a scope that was not enforced yet: it is held in
    /// lockdown instead.
    #[error(
        "{0}; the scope is held in lockdown (loopback and DHCP only) until `killswitch up` \
         succeeds, or `killswitch down` removes it"
    )]
    Lockdown(Box<Error>),

    /// `run`'s command could not be started; `code` is what a shell would exit with.
    #[error("{message}")]
    Command { message: String, code: u8 },

    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl Error {
    /// Exit status per SPEC: 2 for usage or configuration errors, 1 for runtime failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) => 2,
            Error::Lockdown(cause) => cause.exit_code(),
            Error::Command { code, .. } => *code,
            _ => 1,
        }
    }

    pub(crate) fn kernel(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        // Callers pass aya's nested errors through `chain` so the cause stays on the one line.
        Error::Kernel {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// Formats an error with its `source()` chain on one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
