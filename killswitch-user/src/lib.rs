//! killswitch: a Linux VPN kill switch that fails closed.
//!
//! Data flows one way: configuration file → [`policy::Policy`] → [`ebpf::MapEntries`] → kernel.
//! The command line ([`cli`]) is a thin driver of this library.

pub mod backend;
pub mod cli;
pub mod daemon;
pub mod ebpf;
pub mod error;
pub mod events;
pub mod interfaces;
pub mod model;
pub mod packets;
pub mod policy;
pub mod render;
pub mod run;
pub mod sample;
pub mod scope;
pub mod servers;
pub mod state;
pub mod status;
pub mod trace;
pub mod verify;
pub mod vpn_client;

pub use error::{Error, Result};
