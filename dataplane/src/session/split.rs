//! A split connection: the two TCP halves (client-facing, server-facing)
//! and the stage between them. FIN and RST cross over here; what crosses
//! in between is the stage's business.

use std::time::Instant;

use crate::{
    stage::{Pump, Stage},
    tcp::{
        conn::{Abort, Conn, State},
        split::Dir,
    },
    wire::segment::Segment,
};

/// A split connection: the two halves and the stage between them.
pub struct Split {
    pub client: Conn,
    pub server: Conn,
    stage: Stage,
    /// Bytes read from the client half and from the server half.
    relayed: [u64; 2],
    /// Resets to send before anything else.
    resets: Vec<(Dir, Segment)>,
    /// The stage waits for something outside the connection.
    parked: bool,
    /// Reset because the engine stopped.
    stopped: bool,
    /// The most [`Split::buffered`] has been.
    buffered_peak: u64,
    /// The half whose send buffer holds the payload of the segment
    /// [`Split::poll_transmit_lent`] last returned.
    lent: Option<Dir>,
}

impl Split {
    pub fn new(halves: (Conn, Conn), stage: Stage) -> Split {
        Split {
            client: halves.0,
            server: halves.1,
            stage,
            relayed: [0; 2],
            resets: Vec::new(),
            parked: false,
            stopped: false,
            buffered_peak: 0,
            lent: None,
        }
    }

    /// Refuses the connection: the server's half is reset at once (it never
    /// saw a byte of the client's); the client's half sends `farewell` (a
    /// TLS alert) and closes, or is reset too when there is none.
    pub fn refuse(&mut self, farewell: Option<&[u8]>) {
        self.stage = Stage::Refuse;
        self.resets
            .extend(self.server.abort().map(|r| (Dir::Server, r)));
        match farewell {
            Some(bytes) => {
                self.client.write(bytes);
                self.client.close();
            }
            None => self
                .resets
                .extend(self.client.abort().map(|r| (Dir::Client, r))),
        }
        self.pump(Instant::now());
    }

    /// The engine is stopping: both halves are reset now (RFC 9293
    /// §3.10.5, ABORT: a RST at SND.NXT, behind the segments already
    /// sent, or at the edge of a shut window, see [`Conn::abort`]; bytes
    /// not sent yet are dropped), whatever the stage was doing.
    pub fn stop(&mut self) {
        self.stopped = true;
        self.parked = false;
        self.resets
            .extend(self.client.abort().map(|r| (Dir::Client, r)));
        self.resets
            .extend(self.server.abort().map(|r| (Dir::Server, r)));
    }

    /// Whether it was reset because the engine stopped.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// What the stage's inspectors found since the last call.
    pub fn take_findings(&mut self) -> Vec<crate::inspect::Finding> {
        match &mut self.stage {
            Stage::Intercept(i) => i.take_findings(),
            _ => Vec::new(),
        }
    }

    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// Bytes relayed client → server and server → client (for TLS
    /// interception: the TLS bytes each side sent).
    pub fn relayed(&self) -> (u64, u64) {
        (self.relayed[0], self.relayed[1])
    }

    /// Bytes the two halves hold: received and not yet relayed (in order
    /// or not), and sent and not yet acknowledged. At most their four
    /// buffers.
    pub fn buffered(&self) -> u64 {
        [&self.client, &self.server]
            .iter()
            .map(|c| (c.readable() + c.reorder_held() + c.send_buffered()) as u64)
            .sum()
    }

    /// The most the halves have held at once (after each segment, timer
    /// and pump: the relay moves bytes between them, it adds none).
    pub fn buffered_peak(&self) -> u64 {
        self.buffered_peak
    }

    /// Whether the stage is waiting (for the HSM): the session pumps it
    /// again when the worker is woken.
    pub fn parked(&self) -> bool {
        self.parked
    }

    /// Frees the memory the halves' buffers hold but do not use (see
    /// [`Conn::trim`]).
    pub fn trim(&mut self, pressure: bool) {
        self.client.trim(pressure);
        self.server.trim(pressure);
    }

    /// The halves' buffer sizes now (autotuned), in bytes.
    pub fn buffer_capacity(&self) -> u64 {
        let (a, b) = self.client.buffer_sizes();
        let (c, d) = self.server.buffer_sizes();
        (a + b + c + d) as u64
    }

    /// A segment from `dir`'s endpoint, and the stage run on it.
    pub fn on_segment(&mut self, dir: Dir, seg: &Segment, now: Instant) {
        self.receive(dir, seg, now);
        self.pump(now);
    }

    /// A segment from `dir`'s endpoint, taken in by its half only: the
    /// stage runs (and the halves transmit) once for a whole receive
    /// batch, so a batch of segments draws one ACK, not one per two.
    pub fn receive(&mut self, dir: Dir, seg: &Segment, now: Instant) {
        self.receive_with(dir, seg, &seg.payload, now);
    }

    /// As [`Split::receive`], with the payload given apart
    /// ([`Conn::on_segment_with`]).
    pub fn receive_with(&mut self, dir: Dir, seg: &Segment, payload: &[u8], now: Instant) {
        match dir {
            Dir::Client => self.client.on_segment_with(seg, payload, now),
            Dir::Server => self.server.on_segment_with(seg, payload, now),
        }
        self.buffered_peak = self.buffered_peak.max(self.buffered());
    }

    pub fn on_timer(&mut self, now: Instant) {
        self.client.on_timer(now);
        self.server.on_timer(now);
        self.pump(now);
    }

    /// Runs the stage (also when the worker was woken for a parked one).
    pub fn pump(&mut self, now: Instant) {
        let outcome = self
            .stage
            .pump(&mut self.client, &mut self.server, &mut self.relayed, now);
        // A stage of its own (TLS) may write more than it read.
        self.buffered_peak = self.buffered_peak.max(self.buffered());
        match outcome {
            Pump::Go => self.parked = false,
            Pump::Parked => self.parked = true,
            Pump::Abort { client, server } => {
                self.parked = false;
                if server {
                    self.resets
                        .extend(self.server.abort().map(|r| (Dir::Server, r)));
                }
                if client {
                    self.resets
                        .extend(self.client.abort().map(|r| (Dir::Client, r)));
                }
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.client.next_deadline(),
            self.server.next_deadline(),
            self.stage.deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next segment to send and its direction, if any. Call until
    /// `None` after every input and timer.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(Dir, Segment)> {
        let (dir, mut seg) = self.poll_transmit_lent(now)?;
        let (a, b) = self.lent(dir);
        seg.payload = [a, b].concat();
        Some((dir, seg))
    }

    /// As [`Split::poll_transmit`], with the payload left in the sending
    /// half's buffer: [`Split::lent`] shows it.
    pub fn poll_transmit_lent(&mut self, now: Instant) -> Option<(Dir, Segment)> {
        self.lent = None;
        if !self.resets.is_empty() {
            return Some(self.resets.remove(0));
        }
        // A reset half resets the other: RST the peer that is still there.
        if self.stage.is_refusal() {
            return self.lend(Dir::Client, now);
        }
        // (A half the stage aborted on purpose, `Abort::Local`, does not
        // take the other down: the stage said what the other gets.)
        let lost = |c: &Conn| matches!(c.aborted(), Some(Abort::Reset | Abort::TimedOut));
        if lost(&self.client) && self.server.state() != State::Closed {
            if let Some(rst) = self.server.abort() {
                return Some((Dir::Server, rst));
            }
        }
        if lost(&self.server) && self.client.state() != State::Closed {
            if let Some(rst) = self.client.abort() {
                return Some((Dir::Client, rst));
            }
        }
        self.lend(Dir::Client, now)
            .or_else(|| self.lend(Dir::Server, now))
    }

    fn lend(&mut self, dir: Dir, now: Instant) -> Option<(Dir, Segment)> {
        let half = match dir {
            Dir::Client => &mut self.client,
            Dir::Server => &mut self.server,
        };
        let seg = half.poll_transmit_lent(now)?;
        self.lent = Some(dir);
        Some((dir, seg))
    }

    /// The payload of the segment [`Split::poll_transmit_lent`] last
    /// returned (toward `dir`): empty for a reset.
    pub fn lent(&self, dir: Dir) -> (&[u8], &[u8]) {
        match (self.lent, dir) {
            (Some(Dir::Client), Dir::Client) => self.client.lent(),
            (Some(Dir::Server), Dir::Server) => self.server.lent(),
            _ => (&[], &[]),
        }
    }

    /// Both halves are through with their bytes: closed, or waiting out
    /// TIME-WAIT.
    pub fn finished(&self) -> bool {
        [&self.client, &self.server]
            .iter()
            .all(|c| matches!(c.state(), State::Closed | State::TimeWait))
    }

    /// Both halves are closed (cleanly or not).
    pub fn done(&self) -> bool {
        self.client.state() == State::Closed && self.server.state() == State::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        tcp::{
            conn::ConnConfig,
            split::{
                tests::{handshake, segment},
                Track, Tracker,
            },
        },
        wire::{options::Timestamps, segment::Flags, seq::SeqNum},
    };

    #[test]
    fn the_halves_continue_both_sequence_spaces() {
        let now = Instant::now();
        let mut t = Tracker::new(ConnConfig::default());
        assert_eq!(handshake(&mut t), Track::Forward);
        let mut split = Split::new(t.split(now, None).expect("established"), Stage::Relay);
        // Client data arrives at the client-facing half...
        let mut data = segment(
            1001,
            Some(9001),
            Flags::default(),
            b"GET / HTTP/1.1\r\n\r\n",
        );
        data.options.timestamps = Some(Timestamps { val: 52, ecr: 70 });
        split.on_segment(Dir::Client, &data, now);
        // ...and leaves the server-facing half as the client would send it.
        let mut out = Vec::new();
        while let Some(s) = split.poll_transmit(now) {
            out.push(s);
        }
        let to_server: Vec<_> = out.iter().filter(|(d, _)| *d == Dir::Server).collect();
        assert_eq!(to_server.len(), 1, "{out:?}");
        let s = &to_server[0].1;
        assert_eq!((s.seq, s.ack), (SeqNum(1001), SeqNum(9001)));
        assert_eq!(s.payload, b"GET / HTTP/1.1\r\n\r\n");
        let ts = s.options.timestamps.unwrap();
        assert!(ts.val > 51 && ts.ecr == 70, "{ts:?}");
        assert_eq!(split.relayed(), (18, 0));
    }

    #[test]
    fn segments_leave_room_for_the_timestamp_option() {
        let now = Instant::now();
        let mut t = Tracker::new(ConnConfig::default());
        assert_eq!(handshake(&mut t), Track::Forward);
        let mut split = Split::new(t.split(now, None).expect("established"), Stage::Relay);
        let mut data = segment(1001, Some(9001), Flags::default(), &[7; 1448]);
        data.options.timestamps = Some(Timestamps { val: 52, ecr: 70 });
        for i in 0..3u32 {
            data.seq = SeqNum(1001 + i * 1448);
            split.on_segment(Dir::Client, &data, now);
        }
        let mut sizes = Vec::new();
        while let Some((dir, s)) = split.poll_transmit(now) {
            if dir == Dir::Server && !s.payload.is_empty() {
                sizes.push(s.payload.len());
            }
        }
        // MSS 1460 minus the 12 bytes of timestamps (RFC 6691): a full
        // segment is 1448 bytes and the frame fits a 1500-byte MTU.
        assert_eq!(sizes, [1448, 1448, 1448]);
    }
}
