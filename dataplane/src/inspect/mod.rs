//! Plaintext inspection: the seam every decrypted byte passes through, in
//! both directions, between the two TLS legs and before re-encryption.
//! Inspectors see byte streams in order (never records, segments or
//! packets); they may look, count and report, and they run on the packet
//! worker, so they must be quick and bounded.
//!
//! Today the pipeline counts bytes; protocol inspectors (HTTP/1, HTTP/2,
//! signatures, export) plug in as further [`Inspector`]s.

/// Which way plaintext flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client toward the server.
    ClientToServer,
    /// From the server toward the client.
    ServerToClient,
}

/// Looks at one connection's plaintext.
pub trait Inspector: Send {
    /// The next bytes of one direction's stream, in order.
    fn on_data(&mut self, dir: Direction, data: &[u8]);
    /// That direction's stream ended (close_notify or end of TCP stream).
    fn on_end(&mut self, _dir: Direction) {}
}

/// The inspectors of one connection, and its plaintext byte counters.
#[derive(Default)]
pub struct Pipeline {
    inspectors: Vec<Box<dyn Inspector>>,
    /// Plaintext bytes seen client → server and server → client.
    pub bytes: [u64; 2],
}

impl Pipeline {
    pub fn new(inspectors: Vec<Box<dyn Inspector>>) -> Pipeline {
        Pipeline {
            inspectors,
            bytes: [0; 2],
        }
    }

    /// Hands `data` to every inspector.
    pub fn data(&mut self, dir: Direction, data: &[u8]) {
        self.bytes[dir as usize] += data.len() as u64;
        for i in &mut self.inspectors {
            i.on_data(dir, data);
        }
    }

    pub fn end(&mut self, dir: Direction) {
        for i in &mut self.inspectors {
            i.on_end(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    type Seen = Arc<Mutex<Vec<(Direction, Vec<u8>)>>>;

    struct Recorder(Seen);

    impl Inspector for Recorder {
        fn on_data(&mut self, dir: Direction, data: &[u8]) {
            self.0.lock().unwrap().push((dir, data.to_vec()));
        }
    }

    #[test]
    fn every_inspector_sees_the_bytes_in_order_and_they_are_counted() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut p = Pipeline::new(vec![Box::new(Recorder(seen.clone()))]);
        p.data(Direction::ClientToServer, b"GET / ");
        p.data(Direction::ServerToClient, b"HTTP/1.1 200");
        p.data(Direction::ClientToServer, b"HTTP/1.1");
        assert_eq!(p.bytes, [14, 12]);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[2], (Direction::ClientToServer, b"HTTP/1.1".to_vec()));
    }
}
