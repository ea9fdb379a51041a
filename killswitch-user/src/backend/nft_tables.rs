//! Whether an nftables table exists, asked of the kernel over netlink: one `NFT_MSG_GETTABLE`
//! for that name. `nft list tables` (1.0.6) fetches the whole ruleset with every set element
//! first, about 10 ms next to a table of 10,000 servers, and `up` asks on every run.

use std::io;

use rtnetlink::{
    packet_core::{
        DefaultNla, Emitable, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
        NetlinkSerializable, NLM_F_ACK, NLM_F_REQUEST,
    },
    sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr},
};

/// The nftables families killswitch makes tables in (`NFPROTO_*`).
#[derive(Clone, Copy, Debug)]
pub enum Family {
    Inet = 1,
    Netdev = 5,
}

/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE`.
const GET_TABLE: u16 = (10 << 8) | 1;
/// `NFTA_TABLE_NAME`.
const TABLE_NAME: u16 = 1;

/// The request: `struct nfgenmsg` and the table's name.
struct GetTable {
    family: Family,
    name: DefaultNla,
}

impl NetlinkSerializable for GetTable {
    fn message_type(&self) -> u16 {
        GET_TABLE
    }
    fn buffer_len(&self) -> usize {
        4 + self.name.buffer_len()
    }
    fn serialize(&self, buffer: &mut [u8]) {
        // nfgen_family, version NFNETLINK_V0, res_id 0.
        buffer[..4].copy_from_slice(&[self.family as u8, 0, 0, 0]);
        self.name.emit(&mut buffer[4..]);
    }
}

/// A reply that is not an error or an acknowledgement: the table, described.
struct Table;

impl NetlinkDeserializable for Table {
    type Error = io::Error;
    fn deserialize(_: &NetlinkHeader, _: &[u8]) -> io::Result<Table> {
        Ok(Table)
    }
}

/// `struct nlmsghdr`: every message starts with one.
const HEADER_LEN: usize = 16;
/// Replies read at most: the table, then the acknowledgement (or one error).
const REPLIES: usize = 8;

/// Whether table `name` of `family` exists in this network namespace; `false` where there is no
/// nf_tables at all (nothing can be held by it), an error when the kernel could not say (no
/// permission, no answer within a second).
pub fn exists(family: Family, name: &str) -> io::Result<bool> {
    let mut socket = match Socket::new(NETLINK_NETFILTER) {
        Ok(socket) => socket,
        Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => return Ok(false),
        Err(e) => return Err(e),
    };
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket2::SockRef::from(&socket).set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    let mut value = name.as_bytes().to_vec();
    value.push(0);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = 1;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(GetTable {
            family,
            name: DefaultNla::new(TABLE_NAME, value),
        }),
    );
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    let mut found = false;
    let mut replies = 0;
    while replies < REPLIES {
        let datagram = match socket.recv_from_full() {
            Ok((datagram, _)) => datagram,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut rest = &datagram[..];
        while rest.len() >= HEADER_LEN {
            replies += 1;
            let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let length = length
                .div_ceil(4)
                .saturating_mul(4)
                .clamp(HEADER_LEN, rest.len());
            let message = NetlinkMessage::<Table>::deserialize(&rest[..length])
                .map_err(|e| io::Error::other(e.to_string()))?;
            rest = &rest[length..];
            match message.payload {
                NetlinkPayload::InnerMessage(Table) => found = true,
                NetlinkPayload::Error(e) => {
                    return match e.code.map(|c| -c.get()) {
                        None => Ok(found),
                        // No such table; no nf_tables in this kernel.
                        Some(libc::ENOENT | libc::EOPNOTSUPP | libc::EAFNOSUPPORT) => Ok(false),
                        Some(code) => Err(io::Error::from_raw_os_error(code)),
                    };
                }
                _ => {}
            }
        }
    }
    Err(io::Error::other("nf_tables did not answer"))
}
