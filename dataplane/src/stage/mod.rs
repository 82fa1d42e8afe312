//! The byte-stream stage a split connection runs between its two TCP
//! halves: the relay (tcp-split), the refusal (an alert or nothing to the
//! client, whose bytes are read and dropped), or TLS interception. A stage
//! sees two [`ByteStream`]s and never segments, interfaces or AF_XDP; the
//! session drives it after every segment and timer of either half.
//!
//! Backpressure is the stage's job: it moves bytes only as far as the
//! receiving half's send buffer allows, so a slow reader fills its half's
//! send buffer, the other half stops being read, and its advertised
//! window closes.

use std::time::Instant;

pub use crate::tcp::stream::Pump;
use crate::{
    tcp::stream::{drain, ByteStream},
    tls::intercept::{Intercept, TlsRecord},
};

/// The stage of one split connection.
pub enum Stage {
    /// tcp-split: bytes relayed unchanged.
    Relay,
    /// Refused: the client's bytes are read and dropped until it closes.
    Refuse,
    /// TLS interception (the `decrypt` action).
    Intercept(Box<Intercept>),
}

impl Stage {
    /// Moves what can be moved. `relayed` counts the bytes read from the
    /// client half and from the server half.
    pub fn pump(
        &mut self,
        client: &mut dyn ByteStream,
        server: &mut dyn ByteStream,
        relayed: &mut [u64; 2],
        now: Instant,
    ) -> Pump {
        match self {
            Stage::Relay => {
                relay(client, server, relayed);
                Pump::Go
            }
            Stage::Refuse => {
                drain(client);
                Pump::Go
            }
            Stage::Intercept(i) => i.pump(client, server, relayed, now),
        }
    }

    /// When the stage must be pumped even if nothing arrives.
    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Stage::Intercept(i) => i.deadline(),
            _ => None,
        }
    }

    /// What the decryption log says of it.
    pub fn tls_record(&self) -> Option<&TlsRecord> {
        match self {
            Stage::Intercept(i) => Some(i.record()),
            _ => None,
        }
    }

    /// What the decryption log keeps of it when the connection is over
    /// (see [`Intercept::final_record`]); once.
    pub fn final_tls_record(&self) -> Option<TlsRecord> {
        match self {
            Stage::Intercept(i) => Some(i.final_record()),
            _ => None,
        }
    }

    pub fn is_refusal(&self) -> bool {
        matches!(self, Stage::Refuse)
    }
}

/// Moves bytes both ways as far as the receiving half's send buffer
/// allows; a FIN crosses once everything before it was passed on.
fn relay(client: &mut dyn ByteStream, server: &mut dyn ByteStream, relayed: &mut [u64; 2]) {
    relayed[0] += relay_one(client, server);
    relayed[1] += relay_one(server, client);
}

/// One direction of [`relay`]; returns the bytes moved.
fn relay_one(src: &mut dyn ByteStream, dst: &mut dyn ByteStream) -> u64 {
    let mut moved = 0;
    let room = dst.send_space();
    if room > 0 && src.readable() > 0 {
        // Straight from one half's receive queue into the other's send
        // buffer: no buffer in between (a large one per pump cost fresh
        // pages from the allocator, zeroed by the kernel).
        let read = src.read_with(room, &mut |chunk| {
            let wrote = dst.write(chunk);
            debug_assert_eq!(wrote, chunk.len());
        });
        moved = read as u64;
    }
    // Half-close: the source finished and everything was passed on.
    if src.peer_finished() && dst.writable() {
        dst.close();
    }
    moved
}
