//! Segment processing under arbitrary input: bytes become frames and
//! segments thrown at a tracker and at a split connection's halves, mixed
//! with timer runs. Nothing may panic, hang or grow without bound. The
//! cargo-fuzz target in `fuzz/` calls [`segments`]; a property test here
//! runs it on random input in every test run.

use std::time::{Duration, Instant};

use super::split::Split;
use crate::stage::Stage;
use crate::tcp::{
    conn::ConnConfig,
    split::{Dir, Track, Tracker},
};
use crate::wire::{
    options::TcpOptions,
    segment::{parse_segment, Flags, Segment},
    seq::SeqNum,
};

/// Reads a little-endian value from the input, or zero past its end.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn u32(&mut self) -> u32 {
        let b = self.take(4);
        let mut v = [0u8; 4];
        v[..b.len()].copy_from_slice(b);
        u32::from_le_bytes(v)
    }
}

/// Drives a tracker through a real handshake, then feeds the split
/// connection segments decoded from `data`.
pub fn segments(data: &[u8]) {
    // Whole frames first: the parser must refuse or accept cleanly.
    let _ = parse_segment(data);
    let mut input = Input(data);
    let mut now = Instant::now();
    let cfg = ConnConfig {
        send_buffer: 16 << 10,
        recv_buffer: 16 << 10,
        history: 4 << 10,
        ..ConnConfig::default()
    };
    let mut tracker = Tracker::new(cfg);
    let isn_c = SeqNum(input.u32());
    let isn_s = SeqNum(input.u32());
    let opts = TcpOptions::parse(input.take(12)).unwrap_or_default();
    let mk = |seq: SeqNum, ack: Option<SeqNum>, flags: Flags, options: TcpOptions| Segment {
        seq,
        ack: ack.unwrap_or_default(),
        flags: Flags {
            ack: ack.is_some(),
            ..flags
        },
        window: 1024,
        options,
        payload: Vec::new(),
    };
    let syn = Flags {
        syn: true,
        ..Flags::default()
    };
    let _ = tracker.on_segment(Dir::Client, &mk(isn_c, None, syn, opts.clone()));
    let _ = tracker.on_segment(Dir::Server, &mk(isn_s, Some(isn_c + 1), syn, opts.clone()));
    let ack = mk(isn_c + 1, Some(isn_s + 1), Flags::default(), opts);
    if tracker.on_segment(Dir::Client, &ack) != Track::Forward {
        return;
    }
    let Some(halves) = tracker.split(now, None) else {
        return;
    };
    let mut split = Split::new(halves, Stage::Relay);
    for _ in 0..256 {
        if input.0.is_empty() {
            break;
        }
        let op = input.u8();
        if op & 0x80 != 0 {
            now += Duration::from_millis(u64::from(op & 0x7f) * 10);
            split.on_timer(now);
        } else {
            let dir = if op & 1 == 0 {
                Dir::Client
            } else {
                Dir::Server
            };
            let base = if dir == Dir::Client { isn_c } else { isn_s };
            let f = input.u8();
            let flags = Flags {
                fin: f & 1 != 0,
                syn: f & 2 != 0,
                rst: f & 4 != 0,
                psh: f & 8 != 0,
                ack: f & 16 != 0,
                urg: f & 32 != 0,
            };
            let seq = base + (input.u32() & 0x3ffff);
            let peer = if dir == Dir::Client { isn_s } else { isn_c };
            let ack = peer + (input.u32() & 0x3ffff);
            let len = usize::from(input.u8()) * 8;
            let optlen = usize::from(input.u8() % 41);
            let options = TcpOptions::parse(input.take(optlen)).unwrap_or_default();
            let seg = Segment {
                seq,
                ack,
                flags,
                window: input.u32() as u16,
                options,
                payload: input.take(len).to_vec(),
            };
            split.on_segment(dir, &seg, now);
        }
        let mut out = 0;
        while split.poll_transmit(now).is_some() {
            out += 1;
            assert!(out < 100_000, "poll_transmit never runs dry");
        }
        let (c, s) = (&split.client, &split.server);
        assert!(c.readable() + c.reorder_held() <= 16 << 10);
        assert!(s.readable() + s.reorder_held() <= 16 << 10);
        assert!(c.send_buffered() <= 16 << 10 && s.send_buffered() <= 16 << 10);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn arbitrary_segments_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            super::segments(&data);
        }
    }
}
