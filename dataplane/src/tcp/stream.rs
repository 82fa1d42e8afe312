//! One half of a split connection as the stage above it sees it: a byte
//! stream with bounded buffers. Stages (the relay, TLS interception) are
//! written against this trait, never against segments, so they can be
//! driven by in-memory pipes in tests.

use super::conn::{Conn, State};

/// What a stage asks of the session after a pump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pump {
    /// Keep going.
    Go,
    /// Waiting for something outside the connection (an HSM signature):
    /// pump again when the worker is woken, or at [`Stage::deadline`].
    Parked,
    /// Reset these halves (a RST with that half's sequence numbers).
    Abort { client: bool, server: bool },
}

/// A bidirectional byte stream with a bounded send buffer.
pub trait ByteStream {
    /// Bytes received in order and not yet read.
    fn readable(&self) -> usize;
    /// Takes up to `max` received bytes.
    fn read(&mut self, max: usize) -> Vec<u8>;
    /// Takes up to `max` received bytes, handed to `sink` (in place where
    /// the stream can); returns how many.
    fn read_with(&mut self, max: usize, sink: &mut dyn FnMut(&[u8])) -> usize {
        let bytes = self.read(max);
        if !bytes.is_empty() {
            sink(&bytes);
        }
        bytes.len()
    }
    /// Room in the send buffer (0 once closed for sending).
    fn send_space(&self) -> usize;
    /// Queues bytes to send; returns how many fit.
    fn write(&mut self, data: &[u8]) -> usize;
    /// The peer finished sending and every byte before its FIN was read.
    fn peer_finished(&self) -> bool;
    /// Whether data may still be written (not closed for sending).
    fn writable(&self) -> bool;
    /// No more data will be written: a FIN follows what is buffered.
    fn close(&mut self);
    /// Bytes written and not yet acknowledged by the peer.
    fn unsent(&self) -> usize;
}

impl ByteStream for Conn {
    fn readable(&self) -> usize {
        Conn::readable(self)
    }
    fn read(&mut self, max: usize) -> Vec<u8> {
        Conn::read(self, max)
    }
    fn read_with(&mut self, max: usize, sink: &mut dyn FnMut(&[u8])) -> usize {
        Conn::read_with(self, max, sink)
    }
    fn send_space(&self) -> usize {
        Conn::send_space(self)
    }
    fn write(&mut self, data: &[u8]) -> usize {
        Conn::write(self, data)
    }
    fn peer_finished(&self) -> bool {
        Conn::peer_finished(self)
    }
    fn writable(&self) -> bool {
        matches!(self.state(), State::Established | State::CloseWait)
    }
    fn close(&mut self) {
        Conn::close(self)
    }
    fn unsent(&self) -> usize {
        self.send_buffered()
    }
}

/// Reads and drops what the client sends.
pub fn drain(client: &mut dyn ByteStream) {
    let n = client.readable();
    if n > 0 {
        client.read(n);
    }
}
