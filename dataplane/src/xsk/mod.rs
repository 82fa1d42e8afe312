//! AF_XDP sockets: one UMEM per RX queue, shared by the sockets of both
//! engine interfaces on that queue, so a frame received on one interface is
//! transmitted on the other without a copy. Owns frame accounting: every
//! UMEM frame is at any time in exactly one place (free list, a fill ring,
//! an RX ring, a TX ring or pending list, or a completion ring).

mod port;

pub use port::{
    BuildError, PortConfig, QueuePort, SideStats, XskError, MAX_FRAME_DESCS, PKT_CONTD,
};
