//! Packet parsing and building: raw Ethernet frames in, the facts the engine
//! needs out; TCP segments (sequence numbers, options) parsed and built.
//! This layer knows nothing of flows, workers or sockets.

pub mod frame;
pub mod options;
pub mod segment;
pub mod seq;

pub use frame::{slice_tcp, FrameError, SlicedTcp};
