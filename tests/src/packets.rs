//! The wire form of packets lives in the library (`killswitch::packets`), shared with
//! `killswitch verify`.

pub use killswitch::packets::*;
