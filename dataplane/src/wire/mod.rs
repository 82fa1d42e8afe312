//! Packet parsing and building: raw Ethernet frames in, the facts the engine
//! needs out. This layer knows nothing of flows, workers or sockets.

pub mod frame;

pub use frame::{parse_tcp, FrameError, TcpFrame};
