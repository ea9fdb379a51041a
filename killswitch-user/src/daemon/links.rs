//! Interface appearance, renaming and removal, from the kernel's rtnetlink link group.

use futures::{channel::mpsc::UnboundedReceiver, StreamExt};
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        link::{LinkAttribute, LinkMessage},
        RouteNetlinkMessage,
    },
    sys::SocketAddr,
    MulticastGroup,
};

use crate::error::{Error, Result};

/// One link notification: the interface now exists under `name`, or is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    /// Created, renamed or changed state; `name` is its current name.
    Present {
        index: u32,
        name: String,
    },
    Removed {
        index: u32,
        name: String,
    },
}

/// The link notifications of the daemon's network namespace.
pub struct LinkWatcher {
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl LinkWatcher {
    /// Subscribes before anything is listed, so no change between the two is missed.
    pub fn subscribe() -> Result<LinkWatcher> {
        let (connection, _handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
                .map_err(|e| Error::kernel("cannot subscribe to interface changes", e))?;
        tokio::spawn(connection);
        Ok(LinkWatcher { messages })
    }

    /// The next change; `None` if the netlink socket closed.
    pub async fn next(&mut self) -> Option<LinkChange> {
        loop {
            let (message, _) = self.messages.next().await?;
            let NetlinkPayload::InnerMessage(inner) = message.payload else {
                continue;
            };
            match inner {
                RouteNetlinkMessage::NewLink(link) => {
                    return Some(LinkChange::Present {
                        index: link.header.index,
                        name: name(&link),
                    })
                }
                RouteNetlinkMessage::DelLink(link) => {
                    return Some(LinkChange::Removed {
                        index: link.header.index,
                        name: name(&link),
                    })
                }
                _ => continue,
            }
        }
    }

    /// Discards the notifications already queued and says how many there were: one re-listing
    /// covers them all (a veth or a tunnel going away sends several at once).
    pub fn skip_queued(&mut self) -> usize {
        let mut skipped = 0;
        while let Ok(_message) = self.messages.try_recv() {
            skipped += 1;
        }
        skipped
    }
}

fn name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_default()
}
