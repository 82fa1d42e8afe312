//! One TCP endpoint in a synchronized state, sans I/O: segments in, segments
//! out, timers by deadline. The engine creates one per half of a taken-over
//! connection, continuing the sequence spaces and options the real endpoints
//! negotiated (it never runs a handshake of its own).
//!
//! Implemented, with the RFC text at the code: RFC 9293 segment processing
//! and state changes from ESTABLISHED through half-close, simultaneous close
//! and TIME-WAIT; RFC 6298 retransmission timer with backoff and Karn's
//! rule; RFC 9438 CUBIC or RFC 5681/6582 NewReno (see [`super::cc`]);
//! RFC 7323 window scale, timestamps on every segment and PAWS; RFC 5961
//! RST, SYN and ACK validation with challenge ACKs; the persist timer for
//! zero windows; delayed ACKs; SACK blocks sent when permitted; received
//! ones kept in a scoreboard (RFC 6675) that drives loss recovery: every
//! hole found lost is resent in a round trip, as the pipe allows. Which
//! segments are lost, retransmissions among them, RACK decides by time
//! (RFC 8985 §6, see [`super::rack`]) once a round trip is measured;
//! duplicate ACKs (RFC 6675's IsLost) before that. Send and receive buffers autotune as
//! Linux's do (see [`ConnConfig::send_buffer_max`]), within a
//! [`MemoryBudget`].

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    budget::MemoryBudget,
    cc::{AckAction, Algorithm, Congestion},
    rack::Rack,
    reassembly::{Reassembler, SACK_BLOCKS},
    rtt::{backed_off, RttEstimator},
    scoreboard::{Scoreboard, MAX_RANGES},
};
use crate::wire::{
    options::{TcpOptions, Timestamps},
    segment::{Flags, Segment},
    seq::SeqNum,
};

/// What the real endpoints settled in their handshake, from the side of the
/// endpoint this `Conn` impersonates.
#[derive(Clone, Debug)]
pub struct Handshake {
    /// ISN of the endpoint we impersonate, and of the peer.
    pub local_isn: SeqNum,
    pub remote_isn: SeqNum,
    /// The MSS the peer announced (what we may send).
    pub peer_mss: u16,
    /// Window shifts (peer's, ours) when both sides sent the option
    /// (RFC 7323 §2.2); `None` otherwise.
    pub wscale: Option<(u8, u8)>,
    /// Timestamps when both sides sent them: the peer's last TSval, and the
    /// last TSval the impersonated endpoint sent (ours continue from it).
    pub timestamps: Option<(u32, u32)>,
    pub sack_permitted: bool,
    /// The window the peer advertised last, in bytes (already scaled; a
    /// SYN's window never is).
    pub peer_window: u32,
}

/// A payload left in the send buffer: `len` bytes from sequence number
/// `seq` (kept as a sequence number, not an offset, so that the bytes
/// shown stay these bytes whatever the buffer drops from its front).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Lent {
    seq: SeqNum,
    len: usize,
}

/// Buffer sizes and timers.
#[derive(Clone, Debug)]
pub struct ConnConfig {
    /// Bytes written but not yet acknowledged, at most, to begin with.
    pub send_buffer: usize,
    /// Bytes received but not yet read (the most we advertise), to begin
    /// with.
    pub recv_buffer: usize,
    /// What autotuning may grow the two buffers to (as Linux's
    /// `tcp_wmem`/`tcp_rmem` maximum): the send buffer toward twice the
    /// congestion window, the receive buffer toward twice what the peer
    /// delivers in a round trip. At or below the initial sizes (the
    /// default), nothing grows.
    pub send_buffer_max: usize,
    pub recv_buffer_max: usize,
    /// Where growth beyond the initial sizes is taken from; `None`: no
    /// limit but the maxima.
    pub budget: Option<Arc<MemoryBudget>>,
    /// Report duplicate segments in DSACK blocks (RFC 2883), so that a
    /// sender can undo reductions that proved spurious. On by default.
    /// It was off while the SACK blocks went one per segment in sequence
    /// order: a DSACK then took one of three slots from blocks that
    /// already told the sender too little, and Linux clients sending
    /// 88-byte segments through a split moved a quarter as much; with
    /// whole blocks, newest first, they move as much with it as without,
    /// and under reordering the split is faster with it (perf/README.md).
    pub dsack: bool,
    /// Delivered bytes kept to check retransmissions for conflicts.
    pub history: usize,
    pub delayed_ack: Duration,
    pub time_wait: Duration,
    /// How long FIN-WAIT-2 waits for the peer's FIN before giving up (as
    /// Linux's tcp_fin_timeout): a peer that never closes cannot hold the
    /// connection forever.
    pub fin_wait2: Duration,
    /// Consecutive RTO expirations before the connection is abandoned.
    pub max_retransmits: u32,
    /// How the congestion window grows and shrinks.
    pub congestion: Algorithm,
    /// The largest segment the link to the peer carries (its MTU less the
    /// fixed IP and TCP headers). A peer's MSS option above it is clamped
    /// to it, as Linux clamps to the path MTU: a peer that announces more
    /// than its link carries would otherwise be sent frames the link
    /// drops, again and again.
    pub mss_max: u16,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            send_buffer: 256 << 10,
            recv_buffer: 256 << 10,
            send_buffer_max: 0,
            recv_buffer_max: 0,
            budget: None,
            dsack: true,
            history: 64 << 10,
            delayed_ack: Duration::from_millis(40),
            time_wait: Duration::from_secs(10),
            fin_wait2: Duration::from_secs(60),
            max_retransmits: 15,
            congestion: Algorithm::default(),
            mss_max: u16::MAX,
        }
    }
}

/// RFC 9293 §3.3.2 states reachable from ESTABLISHED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Established,
    FinWait1,
    FinWait2,
    CloseWait,
    Closing,
    LastAck,
    TimeWait,
    Closed,
}

/// Why a connection ended (when it did not end cleanly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// The peer sent an acceptable RST.
    Reset,
    /// Retransmissions went unanswered `max_retransmits` times.
    TimedOut,
    /// This side aborted (and sent a RST).
    Local,
}

/// Counters of one endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub segments_in: u64,
    pub segments_out: u64,
    /// Segments received with data, and segments sent with none (pure
    /// ACKs and window updates): their ratio is the ACKs the half sends
    /// per data segment (Linux sends about one per two).
    pub data_in: u64,
    pub pure_acks_out: u64,
    pub retransmits: u64,
    pub rto_expirations: u64,
    pub fast_retransmits: u64,
    /// Retransmissions found lost (by SACKs of later data) and sent again.
    pub lost_retransmits: u64,
    /// Tail loss probes sent.
    pub tail_probes: u64,
    /// Reductions taken back because every retransmission they caused
    /// was DSACKed (the segments were reordered or delayed, not lost).
    pub spurious_undone: u64,
    /// DSACK blocks received, and sent (for duplicates of data we had).
    pub dsacks_in: u64,
    pub dsacks_out: u64,
    /// Data segments sent with SACK (or DSACK) blocks.
    pub sacks_on_data: u64,
    pub dup_acks: u64,
    pub challenge_acks: u64,
    /// ACKs not sent for refused segments that carried no data (challenge
    /// ACKs, answers to out-of-window or PAWS-failed ones): more than
    /// [`OOW_ACK_BURST`] in [`OOW_ACK_INTERVAL`].
    pub acks_rate_limited: u64,
    pub paws_drops: u64,
    pub out_of_window: u64,
    /// Segments carrying only data already received.
    pub duplicates: u64,
    pub bad_acks: u64,
    pub overlap_conflicts: u64,
    pub zero_window_probes: u64,
    pub urgent: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AckNeed {
    None,
    Delayed(Instant),
    Now,
}

/// One endpoint; see the module note.
pub struct Conn {
    state: State,
    abort: Option<Abort>,
    cfg: ConnConfig,
    epoch: Instant,
    // Send side (RFC 9293 §3.3.1).
    snd_una: SeqNum,
    snd_nxt: SeqNum,
    /// The highest sequence number sent (SND.NXT goes back after an RTO;
    /// ACKs up to this one are still valid).
    snd_max: SeqNum,
    snd_wnd: u32,
    snd_wl1: SeqNum,
    snd_wl2: SeqNum,
    max_snd_wnd: u32,
    /// Bytes from SND.UNA on: sent-unacknowledged, then unsent.
    send_buf: VecDeque<u8>,
    /// The most `send_buf` may hold now (autotuned).
    send_cap: usize,
    /// Bytes of growth taken from the budget for each buffer (send,
    /// receive), given back when it shrinks and on drop.
    granted: [usize; 2],
    /// The relay found the send buffer full since the last growth: the
    /// buffer, not the sender's windows, held the flow back.
    send_limited: bool,
    /// Receive autotuning: bytes delivered since `at`, measured once per
    /// round trip against the most seen in one (`space`).
    rcv_tune: RcvTune,
    /// The round trip as the receiver sees it, from the timestamps the
    /// peer echoes (a half that only receives has no samples of its own).
    rcv_rtt: Option<Duration>,
    /// `close()` was called: a FIN follows the buffered bytes, at this
    /// sequence number.
    fin_seq: Option<SeqNum>,
    /// An ACK arrived while the peer's window was zero: it is alive, so
    /// probes going unanswered by data do not count toward giving up
    /// (RFC 9293 §3.8.6.1).
    zero_window_alive: bool,
    /// Where the probe of a shut window (one byte, or the FIN) went out,
    /// until it is acknowledged or the window opens: its timeouts are
    /// probes, not losses.
    zero_window_probe: Option<SeqNum>,
    mss: u32,
    cc: Congestion,
    rtt: RttEstimator,
    rto_at: Option<Instant>,
    /// Karn: one segment timed at a time, and never a retransmitted one.
    rtt_probe: Option<(SeqNum, Instant)>,
    retransmit_now: bool,
    /// The retransmission `retransmit_now` asks for is a fast one (three
    /// duplicate ACKs, a partial ACK, the reordering window): counted
    /// when it goes out, once however many ACKs asked for it.
    fast_pending: bool,
    persist_at: Option<Instant>,
    persist_backoff: u32,
    // Receive side.
    rcv: Reassembler,
    /// Sequence number of the peer's FIN, once seen.
    fin_at: Option<SeqNum>,
    /// The FIN was consumed (RCV.NXT counts it).
    fin_received: bool,
    ack: AckNeed,
    unacked_segments: u32,
    last_adv: u32,
    // Options.
    peer_shift: u8,
    our_shift: u8,
    ts: Option<TsState>,
    sack_ok: bool,
    /// The peer has SACKed data in flight: permitting SACK is not sending
    /// blocks (some stacks and middleboxes strip them, or leave them
    /// untranslated), and RACK without them sees no delivery to judge
    /// losses by.
    sack_seen: bool,
    /// The highest right edge the peer has SACKed.
    sack_high: SeqNum,
    /// What the peer's SACKs say it holds above SND.UNA (RFC 6675).
    scoreboard: Scoreboard,
    /// RFC 6675 HighRxt: in recovery, the end of the last hole resent.
    high_rxt: SeqNum,
    /// In recovery, when each hole was resent (start, time; at most
    /// [`MAX_RANGES`]): a hole still missing a round trip after its resend
    /// was lost again (found by an ACK, or by the probe timer when no ACK
    /// comes).
    resent_at: VecDeque<(SeqNum, Instant)>,
    /// How often the hole at SND.UNA was found overdue and resent again
    /// since SND.UNA last moved: each such resend doubles the wait for
    /// the next ([`Conn::resend_wait`]), so a peer whose duplicate ACKs
    /// keep coming while the resends are lost is not sent the same
    /// segment every 1.25 SRTT until the retransmission timeout.
    overdue_resends: u32,
    /// When the last acceptable ACK arrived: a hole is found overdue
    /// only by an ACK that came after its resend (the ACK clock), so a
    /// silent peer gets one timer-driven resend at most and then waits
    /// for the retransmission timeout, as Linux's peers do.
    last_ack_at: Option<Instant>,
    /// The ACKs sent for refused segments without data since the instant
    /// (the start of the current [`OOW_ACK_INTERVAL`]).
    oow_acks: Option<(Instant, u32)>,
    /// What was sent and when, to find losses by time (RACK).
    rack: Rack,
    /// The RACK reorder timer (RFC 8985 §6.2 step 5): a segment still
    /// undecided is due then.
    rack_at: Option<Instant>,
    /// SND.MAX at the last retransmission timeout, until SND.UNA passes
    /// it: go-back-N resends everything, RACK judges nothing meanwhile.
    rto_high: Option<SeqNum>,
    /// Newly SACKed ranges of the ACK being processed (kept for its
    /// allocation).
    sack_gaps: Vec<(SeqNum, SeqNum)>,
    /// When to send a tail loss probe (RFC 8985 §7).
    tlp_at: Option<Instant>,
    /// The retransmissions since the last reduction, to be matched
    /// against DSACKs (RFC 3708).
    episode: Option<Episode>,
    /// Where the last tail loss probe sent while the flight filled the
    /// peer's window resent from, until a DSACK shows that copy was a
    /// duplicate (or a timeout).
    full_window_probe: Option<SeqNum>,
    /// Such a probe's copy was DSACKed: this peer holds its ACK while its
    /// window is full (its application has not read), so a flight that
    /// fills the window waits a delayed ACK's time before it is probed.
    /// Forgotten at a retransmission timeout.
    peer_holds_acks: bool,
    /// Duplicate segments received, to report one per ACK as its first
    /// SACK block (RFC 2883); contiguous ones merged, at most
    /// [`DSACK_QUEUE`] kept.
    dsack: VecDeque<(SeqNum, SeqNum)>,
    /// The end of TIME-WAIT, or of FIN-WAIT-2 (waiting for the peer's FIN).
    time_wait_until: Option<Instant>,
    /// A RST to send though the connection is closed (FIN-WAIT-2 gave up).
    pending_rst: Option<Segment>,
    /// Where the payload of the segment [`Conn::poll_transmit_lent`]
    /// last returned lies in the send buffer.
    lent: Lent,
    stats: ConnStats,
}

/// Retransmissions of one loss episode, at most [`EPISODE_RANGES`] kept.
#[derive(Clone, Debug, Default)]
struct Episode {
    /// Ranges retransmitted and not yet DSACKed.
    pending: Vec<(SeqNum, SeqNum)>,
    /// More were retransmitted than could be kept: never undone.
    overflowed: bool,
}

const EPISODE_RANGES: usize = 32;
/// Refused segments without data are answered with at most this many
/// ACKs per [`OOW_ACK_INTERVAL`] (RFC 5961 §10, "ACK throttling"; Linux
/// allows one per 500 ms per socket, `tcp_invalid_ratelimit`). A small
/// burst keeps a peer that sends a RST and a SYN at once answered twice.
pub const OOW_ACK_BURST: u32 = 4;
pub const OOW_ACK_INTERVAL: Duration = Duration::from_millis(500);
const DSACK_QUEUE: usize = 8;
/// The most an overdue resend's wait is doubled: 2^10 times 1.25 SRTT
/// (at least 1 ms) is past the retransmission timeout, which then takes
/// over.
const MAX_OVERDUE_BACKOFF: u32 = 10;

#[derive(Clone, Copy, Debug, Default)]
struct RcvTune {
    at: Option<Instant>,
    start: u64,
    space: usize,
}

#[derive(Clone, Copy, Debug)]
struct TsState {
    /// TS.Recent (RFC 7323 §4.3).
    recent: u32,
    /// Added to milliseconds since `epoch` to continue the impersonated
    /// endpoint's clock.
    offset: u32,
}

impl Conn {
    /// An ESTABLISHED endpoint continuing `hs` at `now`.
    pub fn new(hs: &Handshake, cfg: ConnConfig, now: Instant) -> Conn {
        let (peer_shift, our_shift) = hs.wscale.unwrap_or((0, 0));
        let (peer_shift, our_shift) = (peer_shift.min(14), our_shift.min(14));
        //= https://www.rfc-editor.org/rfc/rfc6691#section-2
        //# When calculating the value to put in the TCP MSS option, the MTU
        //# value SHOULD be decreased by only the size of the fixed IP and
        //# TCP headers and SHOULD NOT be decreased to account for any
        //# possible IP or TCP options; conversely, the sender MUST reduce
        //# the TCP data length to account for any IP or TCP options that it
        //# is including in the packets that it sends.
        let ts_len = if hs.timestamps.is_some() { 12 } else { 0 };
        let peer_mss = hs.peer_mss.min(cfg.mss_max);
        let mss = u32::from(peer_mss.max(64 + ts_len) - ts_len);
        let snd = hs.local_isn + 1;
        let rcv_nxt = hs.remote_isn + 1;
        Conn {
            state: State::Established,
            abort: None,
            epoch: now,
            snd_una: snd,
            snd_nxt: snd,
            snd_max: snd,
            snd_wnd: hs.peer_window,
            snd_wl1: hs.remote_isn,
            snd_wl2: snd,
            max_snd_wnd: hs.peer_window,
            send_buf: VecDeque::new(),
            send_cap: cfg.send_buffer,
            granted: [0; 2],
            send_limited: false,
            rcv_tune: RcvTune {
                space: cfg.recv_buffer / 2,
                ..RcvTune::default()
            },
            rcv_rtt: None,
            fin_seq: None,
            zero_window_alive: false,
            zero_window_probe: None,
            mss,
            cc: Congestion::new(mss, cfg.congestion),
            rtt: RttEstimator::default(),
            rto_at: None,
            rtt_probe: None,
            retransmit_now: false,
            fast_pending: false,
            persist_at: None,
            persist_backoff: 0,
            rcv: Reassembler::new(rcv_nxt, cfg.recv_buffer, cfg.history),
            fin_at: None,
            fin_received: false,
            ack: AckNeed::None,
            unacked_segments: 0,
            last_adv: 0,
            peer_shift,
            our_shift,
            ts: hs.timestamps.map(|(recent, last_sent)| TsState {
                recent,
                offset: last_sent.wrapping_add(1),
            }),
            sack_ok: hs.sack_permitted,
            sack_seen: false,
            sack_high: snd,
            scoreboard: Scoreboard::default(),
            high_rxt: snd,
            resent_at: VecDeque::new(),
            overdue_resends: 0,
            last_ack_at: None,
            oow_acks: None,
            rack: Rack::new(snd),
            rack_at: None,
            rto_high: None,
            sack_gaps: Vec::new(),
            tlp_at: None,
            episode: None,
            full_window_probe: None,
            peer_holds_acks: false,
            dsack: VecDeque::new(),
            time_wait_until: None,
            pending_rst: None,
            lent: Lent::default(),
            stats: ConnStats::default(),
            cfg,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn aborted(&self) -> Option<Abort> {
        self.abort
    }

    pub fn stats(&self) -> ConnStats {
        self.stats
    }

    /// RCV.NXT, counting a consumed FIN.
    pub fn rcv_nxt(&self) -> SeqNum {
        self.rcv.next() + u32::from(self.fin_received)
    }

    pub fn snd_una(&self) -> SeqNum {
        self.snd_una
    }

    #[cfg(test)]
    pub(crate) fn cc_in_recovery_for_tests(&self) -> bool {
        self.cc.in_recovery()
    }

    #[cfg(test)]
    pub(crate) fn cc_cwnd_for_tests(&self) -> u32 {
        self.cc.cwnd()
    }

    #[cfg(test)]
    pub(crate) fn snd_max_for_tests(&self) -> SeqNum {
        self.snd_max
    }

    #[cfg(test)]
    pub(crate) fn srtt_for_tests(&self) -> Option<Duration> {
        self.rtt.srtt()
    }

    #[cfg(test)]
    pub(crate) fn cwnd_for_tests(&self) -> u32 {
        self.cc.cwnd()
    }

    /// Room in the send buffer.
    pub fn send_space(&self) -> usize {
        if self.fin_seq.is_some() || !self.can_send_data() {
            return 0;
        }
        self.send_cap.saturating_sub(self.send_buf.len())
    }

    /// Duplicate ACKs that start fast retransmit now (raised by
    /// reordering that DSACKs revealed).
    pub fn dupthresh(&self) -> u32 {
        self.cc.dupthresh()
    }

    /// The send and receive buffer sizes now (autotuned).
    pub fn buffer_sizes(&self) -> (usize, usize) {
        (self.send_cap, self.rcv.capacity())
    }

    /// An idle connection gives back the memory its buffers hold but do
    /// not use, and its send buffer's growth (what is buffered stays).
    /// Under `pressure` (the budget nearly spent) the receive buffer
    /// shrinks back too, down to its unread bytes: the window it
    /// advertises shrinks with it, which RFC 9293 §3.8.6 discourages but
    /// has every peer cope with, as Linux does under memory pressure with
    /// `tcp_shrink_window`.
    pub fn trim(&mut self, pressure: bool) {
        self.rcv.trim();
        self.rack.shrink();
        if self.sack_gaps.is_empty() {
            self.sack_gaps = Vec::new();
        }
        if self.send_buf.is_empty() {
            self.send_buf = VecDeque::new();
        } else {
            self.send_buf.shrink_to_fit();
        }
        let send = self
            .cfg
            .send_buffer
            .max(self.send_buf.len())
            .min(self.send_cap);
        self.give_memory(0, self.send_cap - send);
        self.send_cap = send;
        if pressure {
            let cap = self.rcv.capacity();
            self.rcv.shrink(self.cfg.recv_buffer.min(cap));
            let recv = self.rcv.capacity();
            self.give_memory(1, cap - recv);
            self.rcv_tune.space = recv / 2;
        }
    }

    /// Takes `n` bytes of growth for buffer `which` from the budget.
    fn take_memory(&mut self, which: usize, n: usize) -> bool {
        let ok = self.cfg.budget.as_ref().is_none_or(|b| b.take(n));
        if ok {
            self.granted[which] += n;
        }
        ok
    }

    /// Gives back up to `n` bytes of buffer `which`'s growth.
    fn give_memory(&mut self, which: usize, n: usize) {
        let n = n.min(self.granted[which]);
        self.granted[which] -= n;
        if let Some(b) = &self.cfg.budget {
            b.give(n);
        }
    }

    /// Send-buffer autotuning (Linux `tcp_sndbuf_expand`): room for twice
    /// what the congestion and peer windows let fly, so the relay can keep
    /// the window full while the last flight is being acknowledged. Only
    /// when the buffer held the relay back, and never from a window
    /// inflated by duplicate ACKs in recovery (a peer could otherwise grow
    /// it without taking a byte).
    fn tune_send(&mut self) {
        if !self.send_limited || self.cc.in_recovery() {
            return;
        }
        let wnd = self.cc.cwnd().min(self.max_snd_wnd.max(self.mss)) as usize;
        let target = (2 * wnd).min(self.cfg.send_buffer_max);
        // In steps of at least an eighth, not a budget update per ACK.
        if target > self.send_cap + self.send_cap / 8 && self.take_memory(0, target - self.send_cap)
        {
            self.send_cap = target;
            self.send_limited = false;
        }
    }

    /// Receive-window autotuning (Linux `tcp_rcv_space_adjust`, "dynamic
    /// right-sizing"): once per round trip, if the reader took more than
    /// ever in one, the buffer grows to twice that, so the window it
    /// advertises stays ahead of the sender's. What is counted is what was
    /// read, as Linux counts bytes copied to the application: a reader
    /// that stops (a far side that does not drain) grows nothing.
    fn tune_receive(&mut self, now: Instant) {
        let delivered = self.rcv.delivered() - self.rcv.readable() as u64;
        let rtt = self
            .rtt
            .srtt()
            .or(self.rcv_rtt)
            .unwrap_or(Duration::from_millis(1))
            .max(Duration::from_millis(1));
        let since = self.rcv_tune.at.map(|at| now.saturating_duration_since(at));
        if since.is_some_and(|s| s < rtt) {
            return;
        }
        let copied = (delivered - self.rcv_tune.start) as usize;
        self.rcv_tune.at = Some(now);
        self.rcv_tune.start = delivered;
        // The first measurement only starts one; one over many round trips
        // (a quiet spell, a round trip not known) says nothing about one.
        if since.is_none_or(|s| s > 4 * rtt) || copied <= self.rcv_tune.space {
            return;
        }
        self.rcv_tune.space = copied;
        let cap = self.rcv.capacity();
        // Never more than the window field can say.
        let most = (usize::from(u16::MAX) << self.our_shift).min(self.cfg.recv_buffer_max);
        let target = (2 * copied + 16 * self.mss as usize).min(most);
        if target > cap && self.take_memory(1, target - cap) {
            self.rcv.grow(target);
        }
    }

    /// Bytes buffered for sending (unacknowledged or unsent).
    pub fn send_buffered(&self) -> usize {
        self.send_buf.len()
    }

    /// Bytes received in order and not yet read.
    pub fn readable(&self) -> usize {
        self.rcv.readable()
    }

    /// Bytes held in the out-of-order queue.
    pub fn reorder_held(&self) -> usize {
        self.rcv.held()
    }

    /// The peer has finished sending and everything before its FIN has been
    /// read.
    pub fn peer_finished(&self) -> bool {
        self.fin_received && self.rcv.readable() == 0
    }

    fn can_send_data(&self) -> bool {
        matches!(self.state, State::Established | State::CloseWait)
    }

    /// Queues bytes to send; returns how many fit.
    pub fn write(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.send_space());
        self.send_buf.extend(&data[..n]);
        // Full: the writer (the relay sizes its writes to the room left)
        // is held back by this buffer.
        if n < data.len() || self.send_space() == 0 {
            self.send_limited = true;
        }
        n
    }

    /// Acknowledge what has arrived with the next segment, not after the
    /// delayed-ACK timer (a takeover acknowledges held bytes at once).
    pub fn ack_now(&mut self) {
        if self.state != State::Closed {
            self.ack = AckNeed::Now;
        }
    }

    /// Takes up to `max` received bytes, in order. Reading opens the
    /// window; a large enough opening is announced at once.
    pub fn read(&mut self, max: usize) -> Vec<u8> {
        let out = self.rcv.read(max);
        self.after_read(out.len());
        out
    }

    /// [`Conn::read`] with the bytes handed to `sink` in place (the relay
    /// writes them straight into the other half's send buffer); returns
    /// how many.
    pub fn read_with(&mut self, max: usize, sink: &mut dyn FnMut(&[u8])) -> usize {
        let n = self.rcv.read_with(max, sink);
        self.after_read(n);
        n
    }

    /// `n` bytes were read: the window they open is announced at once if
    /// large enough.
    fn after_read(&mut self, n: usize) {
        // After the peer's FIN no more data comes: a window update would
        // only reach a socket that may be gone (and draw a RST).
        if n > 0 && !self.fin_received {
            let wnd = self.rcv.window();
            //= https://www.rfc-editor.org/rfc/rfc9293#section-3.8.6.2.2
            //# ... the data receiver ... send a window update when the
            //# window has increased by min(RCV.BUFF/2, Eff.snd.MSS)
            let step = (self.rcv.capacity() as u32 / 2).min(self.mss);
            if wnd >= self.last_adv.saturating_add(step) {
                self.ack = AckNeed::Now;
            }
        }
    }

    /// No more data will be written: a FIN follows what is buffered.
    pub fn close(&mut self) {
        match self.state {
            State::Established => self.state = State::FinWait1,
            State::CloseWait => self.state = State::LastAck,
            _ => return,
        }
        self.fin_seq = Some(self.snd_una + self.send_buf.len() as u32);
    }

    /// Aborts: the RST to send (RFC 9293 §3.10.5, ABORT call).
    pub fn abort(&mut self) -> Option<Segment> {
        if self.state == State::Closed {
            return None;
        }
        self.state = State::Closed;
        self.abort = Some(Abort::Local);
        self.lent = Lent::default();
        Some(Segment {
            seq: self.reset_seq(),
            flags: Flags {
                rst: true,
                ..Flags::default()
            },
            ..Segment::default()
        })
    }

    /// Where our RST goes: SND.NXT, unless that lies past the right edge
    /// of the peer's window (the byte of a zero-window probe, a window
    /// the peer took back), where a receiver drops a RST unseen (RFC 9293
    /// §3.10.7.4 checks a RST's sequence number like any segment's; RFC
    /// 5961 §3.2). The edge then, as Linux does (`tcp_acceptable_seq`):
    /// after a refused zero-window probe it is exactly what the peer
    /// expects, so a peer that reads nothing still learns of the reset.
    fn reset_seq(&self) -> SeqNum {
        let edge = self.snd_una + self.snd_wnd;
        if self.snd_nxt.le(edge) {
            self.snd_nxt
        } else {
            edge
        }
    }

    fn ts_now(&self, now: Instant) -> u32 {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u32;
        self.ts.map_or(0, |t| ms.wrapping_add(t.offset))
    }

    /// The window we advertise, scaled down for the wire.
    fn adv_window(&self) -> (u16, u32) {
        let wnd = self.rcv.window();
        let raw = (wnd >> self.our_shift).min(u32::from(u16::MAX));
        (raw as u16, raw << self.our_shift)
    }

    /// Processes a segment from the peer (RFC 9293 §3.10.7.4).
    pub fn on_segment(&mut self, seg: &Segment, now: Instant) {
        self.on_segment_with(seg, &seg.payload, now);
    }

    /// As [`Conn::on_segment`], with the payload given apart (`seg`'s own
    /// is not read): taken straight from the frame it came in, without a
    /// copy of its own.
    pub fn on_segment_with(&mut self, seg: &Segment, payload: &[u8], now: Instant) {
        let before = self.rcv_nxt();
        self.segment_in(seg, payload, now);
        // FIN-WAIT-2 counts from the peer's last new byte: a half-closed
        // peer that is still sending is not cut off.
        if self.state == State::FinWait2 && self.rcv_nxt() != before {
            self.time_wait_until = Some(now + self.cfg.fin_wait2);
        }
    }

    fn segment_in(&mut self, seg: &Segment, payload: &[u8], now: Instant) {
        self.stats.segments_in += 1;
        self.stats.data_in += u64::from(!payload.is_empty());
        if matches!(self.state, State::Closed) {
            return;
        }
        let rcv_nxt = self.rcv_nxt();
        // What we advertise is this, rounded down to the window shift.
        let rcv_wnd = self.rcv.window();

        //= https://www.rfc-editor.org/rfc/rfc7323#section-5.3
        //# If there is a Timestamps option in the arriving segment, SEG.TSval
        //# < TS.Recent, TS.Recent is valid ... and the RST bit is off, then
        //# treat the arriving segment as not acceptable
        if let (Some(ts), Some(seg_ts)) = (self.ts, seg.options.timestamps) {
            if !seg.flags.rst
                && SeqNum(seg_ts.val).lt(SeqNum(ts.recent))
                && !self.disordered_ack(seg, payload, ts.recent.wrapping_sub(seg_ts.val))
            {
                self.stats.paws_drops += 1;
                self.answer_refused(seg, payload, now);
                return;
            }
        }

        // First: sequence acceptability (RFC 9293 §3.10.7.4, the table).
        let len = seg.seg_len(payload);
        let acceptable = match (len, rcv_wnd) {
            (0, 0) => seg.seq == rcv_nxt,
            (0, _) => seg.seq.in_window(rcv_nxt, rcv_wnd),
            (_, 0) => false,
            (_, _) => {
                seg.seq.in_window(rcv_nxt, rcv_wnd)
                    || (seg.seq + (len - 1)).in_window(rcv_nxt, rcv_wnd)
            }
        };
        // A retransmission of data we already have is "not acceptable" by
        // the table but is still checked against history for conflicts.
        if !acceptable {
            let mut repeated = 0;
            let next = self.rcv.next();
            if !payload.is_empty() && seg.seq.lt(next) {
                // Only the bytes already received: a segment refused by
                // the table hands over nothing new, and nothing in the
                // place of (or past) a FIN received.
                let old = usize::try_from(next.since(seg.seq)).map_or(0, |n| n.min(payload.len()));
                let ins = self.rcv.insert(seg.seq, &payload[..old]);
                self.stats.overlap_conflicts += ins.conflict as u64;
                repeated = ins.duplicate;
            }
            if len > 0 && (seg.seq + len).le(rcv_nxt) {
                // Entirely old: a retransmission of what we have, reported
                // so the sender can tell its retransmission was spurious.
                self.stats.duplicates += 1;
                // Only bytes this side did receive (in the history, or
                // among the bytes delivered so far): a segment far below
                // RCV.NXT (no timestamps to refuse it) would have us
                // report bytes that were never sent. The history is only
                // the last 64 KiB, a millisecond at a few Gbit/s, less
                // than a round trip's worth.
                let delivered = self.rcv.delivered().min(1 << 30) + u64::from(self.fin_received);
                let received = u64::try_from(rcv_nxt.since(seg.seq)).is_ok_and(|d| d <= delivered);
                if (repeated > 0 || received) && !seg.flags.syn {
                    // The whole sequence space it takes, its FIN included
                    // (a FIN alone is a block of one, never an empty one,
                    // which RFC 2018 §3 has no place for).
                    self.report_duplicate(seg.seq, seg.seq + len);
                }
            } else {
                self.stats.out_of_window += 1;
            }
            //# If an incoming segment is not acceptable, an acknowledgment
            //# should be sent in reply (unless the RST bit is set
            if !seg.flags.rst {
                self.answer_refused(seg, payload, now);
            }
            //# If the RCV.WND is zero, no segments will be acceptable, but
            //# special allowance should be made to accept valid ACKs, URGs,
            //# and RSTs.
            // A peer that probed the closed window with a byte of new data
            // (RFC 9293 §3.8.6.1), and maybe its FIN, sends from one or two
            // past RCV.NXT: its acknowledgments still count (checked as any
            // ACK is), its bytes do not.
            let near = seg.seq.ge(rcv_nxt) && seg.seq.since(rcv_nxt) <= 2;
            if rcv_wnd == 0 && near && seg.flags.ack && !seg.flags.rst && !seg.flags.syn {
                self.process_ack(seg, payload, now);
            }
            return;
        }

        // Second: RST (RFC 5961 §3.2).
        if seg.flags.rst && self.state == State::TimeWait {
            //= https://www.rfc-editor.org/rfc/rfc1337#section-3
            //# ... ignore RST segments in TIME-WAIT state.
            return;
        }
        if seg.flags.rst {
            //= https://www.rfc-editor.org/rfc/rfc5961#section-3.2
            //# 1) If the RST bit is set and the sequence number is outside the
            //# current receive window, silently drop the segment.
            //# 2) If the RST bit is set and the sequence number exactly matches
            //# the next expected sequence number (RCV.NXT), then TCP MUST reset
            //# the connection.
            //# 3) If the RST bit is set and the sequence number does not
            //# exactly match ... TCP MUST send an ACK (challenge ACK)
            if seg.seq == rcv_nxt {
                self.state = State::Closed;
                self.abort = Some(Abort::Reset);
            } else {
                self.challenge_ack(seg, payload, now);
            }
            return;
        }

        // Fourth: SYN (RFC 5961 §4.2): in a synchronized state, challenge.
        if seg.flags.syn {
            //= https://www.rfc-editor.org/rfc/rfc5961#section-4.2
            //# ... if the SYN bit is set, irrespective of the sequence number,
            //# TCP MUST send an ACK (also referred to as challenge ACK) to the
            //# remote peer
            self.challenge_ack(seg, payload, now);
            return;
        }

        // Fifth: ACK.
        if !seg.flags.ack {
            //= https://www.rfc-editor.org/rfc/rfc9293#section-3.10.7.4
            //# if the ACK bit is off, drop the segment and return
            return;
        }
        if !self.process_ack(seg, payload, now) {
            return;
        }

        // The receiver's round trip (Linux `tcp_rcv_rtt_measure_ts`): our
        // clock now less the TSval the peer echoes, from segments with data
        // (a pure ACK may echo a value held back by the peer's delayed ACK).
        if let (Some(_), Some(seg_ts)) = (self.ts, seg.options.timestamps) {
            let ms = self.ts_now(now).wrapping_sub(seg_ts.ecr);
            if !payload.is_empty() && seg_ts.ecr != 0 && ms < 60_000 {
                let sample = Duration::from_millis(u64::from(ms));
                self.rcv_rtt = Some(match self.rcv_rtt {
                    Some(r) if sample < r => sample,
                    Some(r) => r * 7 / 8 + sample / 8,
                    None => sample,
                });
            }
        }

        // TS.Recent (RFC 7323 §4.3): from segments at or before RCV.NXT.
        if let (Some(ts), Some(seg_ts)) = (self.ts.as_mut(), seg.options.timestamps) {
            // Never backwards (echoing an old clock would inflate the
            // peer's RTT samples).
            if seg.seq.le(rcv_nxt) && !SeqNum(seg_ts.val).lt(SeqNum(ts.recent)) {
                ts.recent = seg_ts.val;
            }
        }

        if seg.flags.urg {
            // Urgent data is relayed in-band, like the bytes it is; the
            // pointer itself is not carried over (counted: the worker
            // releases such flows before takeover).
            self.stats.urgent += 1;
        }

        // Seventh: segment text.
        let receiving = matches!(
            self.state,
            State::Established | State::FinWait1 | State::FinWait2
        );
        // The stream ends at the FIN: with one known (come out of order),
        // nothing at or past it is data.
        let payload = match self.fin_at {
            Some(fin) => {
                let room = usize::try_from(fin.since(seg.seq)).unwrap_or(0);
                &payload[..room.min(payload.len())]
            }
            None => payload,
        };
        if receiving && !payload.is_empty() {
            let before = self.rcv.next();
            let had = self.rcv.delivered().min(1 << 30);
            let ins = self.rcv.insert(seg.seq, payload);
            self.stats.overlap_conflicts += ins.conflict as u64;
            if ins.new == 0 && ins.duplicate == payload.len() {
                // A copy of bytes held out of order: reported as the
                // one below RCV.NXT is, so that a sender whose
                // retransmission this was can tell it was spurious.
                self.stats.duplicates += 1;
                self.report_duplicate(seg.seq, seg.seq + payload.len() as u32);
            } else if ins.new > 0 && seg.seq.lt(before) {
                // New bytes behind a head this side already has (a resend
                // that repacketized the flight): the head is reported, as
                // Linux does (RFC 2883 §4), so the sender can count that
                // much of its resend spurious. Only bytes this side did
                // receive: a head reaching below the stream's start (a
                // broken or forged peer) is not reported.
                if u64::try_from(before.since(seg.seq)).is_ok_and(|d| d <= had) {
                    self.report_duplicate(seg.seq, before);
                }
            }
            let in_order = self.rcv.next() != before;
            // It delivered bytes held beyond it: it filled the last hole.
            let filled = self.rcv.next().since(before) > payload.len() as i32;
            if self.cfg.recv_buffer_max > self.rcv.capacity() {
                self.tune_receive(now);
            }
            //= https://www.rfc-editor.org/rfc/rfc5681#section-4.2
            //# Out-of-order data segments SHOULD be acknowledged immediately
            //# ... an immediate ACK SHOULD be generated when an incoming
            //# segment fills in all or part of a gap in the sequence space.
            if !in_order || filled || ins.duplicate > 0 || ins.conflict > 0 || self.rcv.held() > 0 {
                // Out of order, or filling a hole: ACK at once.
                self.ack = AckNeed::Now;
            } else {
                self.unacked_segments += 1;
                //= https://www.rfc-editor.org/rfc/rfc9293#section-3.8.6.3
                //# an ACK SHOULD be generated for at least every second
                //# full-sized segment
                if self.unacked_segments >= 2 {
                    self.ack = AckNeed::Now;
                } else if self.ack == AckNeed::None {
                    self.ack = AckNeed::Delayed(now + self.cfg.delayed_ack);
                }
            }
        }

        // Eighth: FIN. The first one places the end for good (a second
        // elsewhere, or one before bytes already taken, is a liar's); its
        // repeats match it. One with bytes held past it is refused too:
        // filling the gap would carry RCV.NXT over it, and it would never
        // be taken.
        if seg.flags.fin && self.fin_at.is_none() {
            let at = seg.seq + payload.len() as u32;
            if at.ge(self.rcv.next()) && !self.rcv.holds_from(at) {
                self.fin_at = Some(at);
            }
        }
        self.consume_fin(now);
    }

    /// Takes the peer's FIN once every byte before it has arrived.
    fn consume_fin(&mut self, now: Instant) {
        let Some(fin) = self.fin_at else { return };
        if self.fin_received || self.rcv.next() != fin {
            return;
        }
        self.fin_received = true;
        self.ack = AckNeed::Now;
        self.state = match self.state {
            State::Established => State::CloseWait,
            //= https://www.rfc-editor.org/rfc/rfc9293#section-3.10.7.4
            //# FIN-WAIT-1 STATE: If our FIN has been ACKed (perhaps in this
            //# segment), then enter TIME-WAIT ... otherwise, enter the
            //# CLOSING state.
            State::FinWait1 if self.fin_acked() => self.enter_time_wait(now),
            State::FinWait1 => State::Closing,
            State::FinWait2 => self.enter_time_wait(now),
            s => s,
        };
    }

    fn enter_time_wait(&mut self, now: Instant) -> State {
        self.time_wait_until = Some(now + self.cfg.time_wait);
        self.rto_at = None;
        State::TimeWait
    }

    /// A pure duplicate ACK that arrived out of order (its TSval a little
    /// behind TS.Recent): taken despite PAWS, as Linux does
    /// (`tcp_disordered_ack`), for the SACK and DSACK blocks it carries.
    /// It cannot move anything: it acknowledges nothing new, carries no
    /// data and leaves the window as it is.
    fn disordered_ack(&self, seg: &Segment, payload: &[u8], behind_ms: u32) -> bool {
        seg.flags.ack
            && !seg.flags.syn
            && !seg.flags.fin
            && payload.is_empty()
            && seg.seq == self.rcv_nxt()
            && seg.ack == self.snd_una
            && self.same_window(seg)
            && u128::from(behind_ms) <= self.rtt.rto().as_millis()
    }

    /// `seg` advertises the send window we have now.
    fn same_window(&self, seg: &Segment) -> bool {
        (u32::from(seg.window) << self.peer_shift) == self.snd_wnd
    }

    /// Our FIN has been sent (and not taken back by an RTO).
    fn fin_sent(&self) -> bool {
        self.fin_seq.is_some_and(|f| self.snd_nxt.gt(f))
    }

    fn fin_acked(&self) -> bool {
        self.fin_seq.is_some_and(|f| self.snd_una.gt(f))
    }

    fn challenge_ack(&mut self, seg: &Segment, payload: &[u8], now: Instant) {
        if self.answer_refused(seg, payload, now) {
            self.stats.challenge_acks += 1;
        }
    }

    /// An ACK in answer to a refused segment, unless it carried no data
    /// (or a SYN) and [`OOW_ACK_BURST`] such answers went out in this
    /// [`OOW_ACK_INTERVAL`]: a flood of forged RSTs, SYNs or stray ACKs
    /// draws a few ACKs, not one each, and two ends that disagree on the
    /// sequence space cannot ping-pong ACKs at line rate. A data segment
    /// is always answered (its ACK may carry a DSACK; data is no loop,
    /// as Linux's `tcp_oow_rate_limited` reasons). Returns whether it is.
    fn answer_refused(&mut self, seg: &Segment, payload: &[u8], now: Instant) -> bool {
        if payload.is_empty() || seg.flags.syn {
            let (since, sent) = self.oow_acks.get_or_insert((now, 0));
            if now.saturating_duration_since(*since) >= OOW_ACK_INTERVAL {
                (*since, *sent) = (now, 0);
            }
            if *sent >= OOW_ACK_BURST {
                self.stats.acks_rate_limited += 1;
                return false;
            }
            *sent += 1;
        }
        self.ack = AckNeed::Now;
        true
    }

    /// Bytes (and FIN) sent and not acknowledged, as the sender counts
    /// them now (after an RTO, what it is sending again).
    fn flight(&self) -> u32 {
        self.snd_nxt.since(self.snd_una).max(0) as u32
    }

    /// Anything sent and not acknowledged at all.
    fn outstanding(&self) -> bool {
        self.snd_max.gt(self.snd_una)
    }

    /// SND.NXT up to `upto` went out at `now`, logged for RACK (bytes
    /// below SND.MAX were sent before: after a timeout, go-back-N).
    fn sent(&mut self, upto: SeqNum, now: Instant) {
        if self.sack_ok {
            self.rack
                .on_send(self.snd_nxt, upto, now, self.snd_nxt.lt(self.snd_max));
        }
        self.snd_nxt = upto;
        self.snd_max = self.snd_max.max(upto);
    }

    /// The ACK field and the window (RFC 9293 §3.10.7.4, fifth check, with
    /// RFC 5961 §5). Returns false when the segment must be dropped.
    fn process_ack(&mut self, seg: &Segment, payload: &[u8], now: Instant) -> bool {
        let ack = seg.ack;
        //= https://www.rfc-editor.org/rfc/rfc5961#section-5.2
        //# ... the ACK value is considered acceptable only if it is in the
        //# range of ((SND.UNA - MAX.SND.WND) =< SEG.ACK =< SND.NXT).
        let lower = SeqNum(self.snd_una.0.wrapping_sub(self.max_snd_wnd));
        if ack.gt(self.snd_max) {
            //= https://www.rfc-editor.org/rfc/rfc9293#section-3.10.7.4
            //# If the ACK acks something not yet sent (SEG.ACK > SND.NXT),
            //# then send an ACK, drop the segment, and return.
            self.stats.bad_acks += 1;
            self.answer_refused(seg, payload, now);
            return false;
        }
        if ack.lt(lower) {
            //# All incoming segments whose ACK value doesn't satisfy the
            //# above condition MUST be discarded and an ACK sent back.
            self.stats.bad_acks += 1;
            self.challenge_ack(seg, payload, now);
            return false;
        }
        self.last_ack_at = Some(now);
        let dsack = self.take_dsack(seg, ack);
        if self.sack_ok {
            if ack.gt(self.snd_una) {
                self.rack.on_cum_ack(ack, now);
            }
            // A DSACK block reports a duplicate, not data held.
            let una = self.snd_una.max(ack);
            // Against SND.UNA after this ACK (RFC 8985 §6.2 step 4): one
            // that ends the DSACK round may start the next.
            if dsack {
                self.rack.on_dsack(una, self.snd_nxt);
            }
            let gaps = &mut self.sack_gaps;
            gaps.clear();
            for &(l, r) in seg.options.sack.iter().skip(usize::from(dsack)) {
                self.scoreboard
                    .add_with(l, r, una, self.snd_max, |l, r| gaps.push((l, r)));
            }
            // In sequence order: RACK sees reordering in a segment
            // delivered below the highest delivered (RFC 8985 §6.2 step
            // 3), not in the order the peer listed its blocks.
            self.sack_gaps.sort_unstable_by_key(|&(l, _)| l.since(una));
            // Only a block that holds data sent and not yet acknowledged:
            // one a middlebox left untranslated (it randomised the
            // sequence numbers) must not switch RACK on.
            self.sack_seen |= !self.sack_gaps.is_empty();
            for &(l, r) in &self.sack_gaps {
                let board = &self.scoreboard;
                self.rack.on_sacked(l, r, now, |a, b| board.covers(a, b));
            }
            self.rack.end_ack(now);
        }
        let flight = self.flight();
        let duplicate = ack == self.snd_una && payload.is_empty() && !seg.flags.fin && flight > 0;
        let advanced = ack.gt(self.snd_una);
        if advanced {
            if self.rto_high.is_some_and(|h| ack.ge(h)) {
                self.rto_high = None;
            }
            // Never behind SND.UNA (else, 2 GiB later, modular comparison
            // would put it ahead of everything).
            if ack.gt(self.sack_high) {
                self.sack_high = ack;
            }
            let acked = ack.since(self.snd_una) as u32;
            // Bytes of data acknowledged (the FIN takes a number, not a byte).
            let data = (acked as usize).min(self.send_buf.len());
            self.send_buf.drain(..data);
            self.snd_una = ack;
            self.overdue_resends = 0;
            self.zero_window_probe = None;
            self.scoreboard.advance(ack);
            if self.snd_nxt.lt(self.snd_una) {
                self.snd_nxt = self.snd_una;
            }
            self.take_rtt_sample(seg, ack, now);
            self.rtt.progress();
            // A partial ACK in SACK recovery that lands on a hole already
            // resent does not resend it (the scoreboard picks the holes).
            // With RACK on, a partial ACK resends nothing by itself: RACK
            // says what is lost.
            let on_resent_hole = self.sack_recovery() && self.high_rxt.gt(ack);
            let srtt = self.rtt.srtt().unwrap_or_default();
            let recovering = self.cc.in_recovery();
            if self.cc.on_ack(acked, ack, flight, now, srtt) == AckAction::Retransmit
                && !on_resent_hole
                && !self.rack_on()
            {
                self.retransmit_now = true;
                self.fast_pending = true;
            }
            if recovering && !self.cc.in_recovery() {
                self.rack.on_recovery_exit();
            }
            if self.cfg.send_buffer_max > self.send_cap {
                self.tune_send();
            }
            //= https://www.rfc-editor.org/rfc/rfc6298#section-5
            //# (5.2) When all outstanding data has been acknowledged, turn off
            //# the retransmission timer.
            //# (5.3) When an ACK is received that acknowledges new data,
            //# restart the retransmission timer
            self.rto_at = self.outstanding().then(|| now + self.rtt.rto());
            // Armed below, against the window this ACK announces.
            self.tlp_at = None;
        } else if duplicate {
            let new_sack = self.sacks_new(seg);
            // An ACK that reports a duplicate (DSACK) says nothing was
            // lost: only SACKs of new data in it make it a duplicate ACK.
            // Nor does one that refuses the probe of a shut window: three
            // refused probes are no loss to recover from.
            let refused_probe = seg.window == 0 && self.zero_window_probe.is_some();
            if ((self.same_window(seg) && !dsack) || new_sack) && !refused_probe {
                self.on_dup_ack(flight);
            }
        }
        //# If SND.UNA =< SEG.ACK =< SND.NXT, the send window should be
        //# updated. If (SND.WL1 < SEG.SEQ or (SND.WL1 = SEG.SEQ and
        //# SND.WL2 =< SEG.ACK)), set SND.WND <- SEG.WND, set SND.WL1 <-
        //# SEG.SEQ, and set SND.WL2 <- SEG.ACK.
        if self.snd_wl1.lt(seg.seq) || (self.snd_wl1 == seg.seq && self.snd_wl2.le(ack)) {
            self.snd_wnd = u32::from(seg.window) << self.peer_shift;
            self.snd_wl1 = seg.seq;
            self.snd_wl2 = ack;
            self.max_snd_wnd = self.max_snd_wnd.max(self.snd_wnd);
            if self.snd_wnd > 0 {
                self.persist_at = None;
                self.persist_backoff = 0;
            }
        }
        if self.snd_wnd == 0 {
            self.zero_window_alive = true;
        } else if self.zero_window_probe.take() == Some(self.snd_una) {
            // The window opened and the probe's byte was refused: it goes
            // again as data, at once, with what else the window takes
            // (left in flight it made every later segment short of a full
            // one, which sender SWS avoidance holds back until the next
            // probe: seconds). The peer is alive: the backoff ends, as
            // Linux's does when a probe is answered with an open window.
            self.snd_nxt = self.snd_una;
            self.rtt.progress();
            self.rto_at = Some(now + self.rtt.rto());
        }
        // The probe and RACK's timers are armed against the window this
        // ACK announces (after `on_dup_ack`, which compares the old one).
        if advanced {
            self.arm_tail_probe(now);
        }
        self.rack_detect(now);
        // A resend that nothing sent after it came back to show lost (the
        // sender had no new data): its time may have. After RACK, which
        // would otherwise find and count the same one again.
        if duplicate && !self.retransmit_now {
            self.resend_if_overdue(now);
        }
        // Our FIN acknowledged.
        if self.fin_acked()
            && matches!(
                self.state,
                State::FinWait1 | State::Closing | State::LastAck
            )
        {
            self.state = match self.state {
                State::FinWait1 => {
                    self.time_wait_until = Some(now + self.cfg.fin_wait2);
                    State::FinWait2
                }
                State::Closing => self.enter_time_wait(now),
                State::LastAck => {
                    self.rto_at = None;
                    State::Closed
                }
                s => s,
            };
        }
        true
    }

    /// Queues a duplicate `[l, r)` for the next ACK's first SACK block
    /// (RFC 2883), joined to the last one where it continues it.
    fn report_duplicate(&mut self, l: SeqNum, r: SeqNum) {
        if !self.cfg.dsack || !self.sack_ok {
            return;
        }
        let queued = self.dsack.len();
        match self.dsack.back_mut() {
            Some(last) if last.1 == l => last.1 = r,
            _ if queued < DSACK_QUEUE => self.dsack.push_back((l, r)),
            _ => {}
        }
    }

    /// A DSACK (RFC 2883 §4: a first SACK block below the cumulative ACK,
    /// or inside the second block) for a range this episode retransmitted:
    /// that retransmission was spurious. Once every one is, the reduction
    /// is undone (RFC 3708 §3.2) and the duplicate-ACK threshold rises to
    /// the reordering seen: how far past the reported segment the peer
    /// had already SACKed.
    fn take_dsack(&mut self, seg: &Segment, ack: SeqNum) -> bool {
        let Some(&(l, r)) = seg.options.sack.first() else {
            return false;
        };
        let inside_second = seg
            .options
            .sack
            .get(1)
            .is_some_and(|&(l2, r2)| l.ge(l2) && r.le(r2));
        if !(r.le(ack) || inside_second) || !r.gt(l) {
            return false;
        }
        self.stats.dsacks_in += 1;
        // The copy a probe at a full window sent was a duplicate: the
        // peer had the bytes and sat on its ACK.
        if self.full_window_probe.is_some_and(|p| l.le(p) && p.lt(r)) {
            self.full_window_probe = None;
            self.peer_holds_acks = true;
        }
        let Some(ep) = self.episode.as_mut() else {
            return true;
        };
        // One DSACK proves one retransmission of each range it covers
        // spurious (RFC 3708 counts them): a range sent twice needs two.
        // A receiver merges the duplicates of neighbouring segments into
        // one block, so a block may cover several retransmissions.
        let mut proved: Vec<(SeqNum, SeqNum)> = Vec::new();
        ep.pending.retain(|&(pl, pr)| {
            let spurious = l.le(pl) && pr.le(r) && !proved.contains(&(pl, pr));
            if spurious {
                proved.push((pl, pr));
            }
            !spurious
        });
        if proved.is_empty() {
            return true;
        }
        // A retransmission proved spurious: the segment was reordered by
        // as many as the peer had SACKed past it.
        let reordering = self.sack_high.max(ack).since(l).max(0) as u32 / self.mss.max(1);
        self.cc.reordered(reordering);
        self.rack.saw_reordering();
        if !ep.pending.is_empty() || ep.overflowed {
            return true;
        }
        self.episode = None;
        if self.cc.undo() {
            self.stats.spurious_undone += 1;
            self.retransmit_now = false;
            self.fast_pending = false;
            self.rack.unmark_lost();
        }
        true
    }

    /// A duplicate ACK.
    fn on_dup_ack(&mut self, flight: u32) {
        //= https://www.rfc-editor.org/rfc/rfc5681#section-2
        //# DUPLICATE ACKNOWLEDGMENT: ... (a) the receiver of the ACK has
        //# outstanding data, (b) the incoming acknowledgment carries no
        //# data, (c) the SYN and FIN bits are both off, (d) the
        //# acknowledgment number is equal to the greatest acknowledgment
        //# received on the given connection (TCP.UNA ...) and (e) the
        //# advertised window in the incoming acknowledgment equals the
        //# advertised window in the last incoming acknowledgment.
        // Or, with SACK, in place of (e) (a receiver that reads opens
        // its window on every ACK):
        //= https://www.rfc-editor.org/rfc/rfc6675#section-2
        //# a segment that arrives carrying a SACK block that identifies
        //# previously unacknowledged and un-SACKed octets between HighACK
        //# and HighData.
        self.stats.dup_acks += 1;
        if self.rack_on() {
            // RACK, after this ACK's SACKs, decides what is lost.
            self.cc.count_dup_ack();
            return;
        }
        let reduces = !self.cc.in_recovery();
        let mut action = self.cc.on_dup_ack(self.snd_nxt, flight);
        //= https://www.rfc-editor.org/rfc/rfc6675#section-5
        //# Upon the receipt of the first (DupThresh - 1) duplicate ACKs, the
        //# scoreboard is to be updated as normal.
        // ... and recovery starts once IsLost(HighACK + 1) holds: more
        // than DupThresh - 1 segments' worth SACKed above it, however few
        // ACKs carried them (a receiver behind GRO SACKs many at once).
        if action == AckAction::None && reduces && self.first_hole_lost() {
            action = self.cc.on_loss(self.snd_nxt, flight);
        }
        if action == AckAction::Retransmit {
            if reduces {
                self.new_loss_episode();
            }
            self.retransmit_now = true;
            self.fast_pending = true;
        }
    }

    /// In SACK recovery, the first hole was resent longer ago than
    /// [`Conn::resend_wait`] (a round trip and a quarter, RACK's
    /// reordering allowance, RFC 8985 §6.2, at least a millisecond;
    /// doubled for each overdue resend of it before) and is still
    /// missing: it is resent again (a lost retransmission). Its resend
    /// time restarts, so one overdue resend is resent once.
    fn resend_if_overdue(&mut self, now: Instant) {
        if !self.sack_recovery() || self.rto_high.is_some() {
            return;
        }
        // Before any round trip is measured, nothing is overdue (else
        // every duplicate ACK a millisecond apart would resend).
        let Some(wait) = self.resend_wait() else {
            return;
        };
        // Marked lost by RACK: resent (and counted) from its queue.
        if self.rack_on() && self.rack.is_lost(self.snd_una) {
            return;
        }
        if let Some(i) = self.first_hole_resend() {
            let at = &mut self.resent_at[i].1;
            let acked_since = self.last_ack_at.is_some_and(|t| t >= *at);
            if acked_since && now.saturating_duration_since(*at) >= wait {
                *at = now;
                self.retransmit_now = true;
                self.stats.lost_retransmits += 1;
                self.overdue_resends = self.overdue_resends.saturating_add(1);
            }
        }
    }

    /// Where the first hole's (SND.UNA's) resend time is kept in
    /// `resent_at`, if it was resent in this recovery.
    fn first_hole_resend(&self) -> Option<usize> {
        self.resent_at.iter().position(|(s, _)| *s == self.snd_una)
    }

    /// A reduction began: its retransmissions are matched against DSACKs
    /// afresh (RFC 3708), and SACK recovery's HighRxt and resend times
    /// start at SND.UNA.
    fn new_loss_episode(&mut self) {
        self.episode = None;
        self.high_rxt = self.snd_una;
        self.resent_at.clear();
        self.overdue_resends = 0;
    }

    /// How long a resend in recovery may take to be acknowledged: 1.25
    /// SRTT, at least a millisecond, doubled for each time the hole at
    /// SND.UNA was already found overdue (as RFC 6298 §5.5 backs off the
    /// timer); `None` before any RTT sample.
    fn resend_wait(&self) -> Option<Duration> {
        let srtt = self.rtt.srtt()?;
        let base = (srtt * 5 / 4).max(Duration::from_millis(1));
        Some(base * (1 << self.overdue_resends.min(MAX_OVERDUE_BACKOFF)))
    }

    /// Bytes SACKed above a hole that make it lost (RFC 6675 IsLost):
    /// more than DupThresh - 1 segments' worth.
    fn lost_need(&self) -> u32 {
        (self.cc.dupthresh() - 1) * self.mss
    }

    /// The first unacknowledged byte is lost by the scoreboard's count.
    fn first_hole_lost(&self) -> bool {
        self.sack_ok
            && !self.scoreboard.contains(self.snd_una)
            && self
                .scoreboard
                .lost_below(self.lost_need())
                .is_some_and(|b| b.gt(self.snd_una))
    }

    /// RFC 6675 §4 SetPipe: the bytes still in the network as the
    /// scoreboard has it. Sent and not cumulatively acknowledged, less
    /// what the peer SACKed, less the holes deemed lost that have not
    /// been resent yet.
    fn pipe(&self) -> u32 {
        let out = self.snd_max.since(self.snd_una).max(0) as u32;
        if self.rack_on() {
            return out
                .saturating_sub(self.scoreboard.sacked())
                .saturating_sub(self.rack.lost_bytes());
        }
        let lost = self
            .scoreboard
            .lost_below(self.lost_need())
            .map_or(0, |below| {
                self.scoreboard
                    .holes_between(self.high_rxt.max(self.snd_una), below)
            });
        out.saturating_sub(self.scoreboard.sacked())
            .saturating_sub(lost)
    }

    /// RACK decides what is lost: with SACK blocks from the peer, once a
    /// round trip is measured, and not while a timeout's go-back-N resends
    /// everything. Before the first block, duplicate ACKs count.
    fn rack_on(&self) -> bool {
        self.sack_seen && self.rtt.srtt().is_some() && self.rto_high.is_none()
    }

    /// RACK loss detection (RFC 8985 §6.2 step 5) after an ACK or on its
    /// timer. A loss starts recovery (RFC 6675 §5: the first lost
    /// segment goes out at once, whatever the pipe); the holes are then
    /// resent as the pipe allows ([`Conn::next_hole`]).
    fn rack_detect(&mut self, now: Instant) {
        self.rack_at = None;
        if !self.rack_on() || !self.outstanding() {
            return;
        }
        let srtt = self.rtt.srtt().unwrap_or_default();
        let sacked = self.scoreboard.sacked() / self.mss.max(1);
        let reo_wnd = self
            .rack
            .reo_wnd(self.cc.in_recovery(), sacked, self.cc.dupthresh(), srtt);
        let found = self.rack.detect(now, reo_wnd);
        self.stats.lost_retransmits += u64::from(found.lost_again);
        self.rack_at = found.at;
        // Segments still marked lost (also ones a recovery ended with:
        // data sent during it, beyond its end) are resent in recovery.
        if self.rack.lost_bytes() > 0 {
            if !self.cc.in_recovery()
                && self.cc.on_loss(self.snd_nxt, self.flight()) == AckAction::Retransmit
            {
                self.new_loss_episode();
            }
            if found.lost > 0 && self.rack.is_lost(self.snd_una) {
                self.retransmit_now = true;
                self.fast_pending = true;
            }
        }
        //= https://www.rfc-editor.org/rfc/rfc8985#section-8
        //# the RACK reorder timer, the TLP PTO timer, the RTO, and ZWP timer
        //# are mutually exclusive
        if self.rack_at.is_some() {
            self.tlp_at = None;
        } else if self.tlp_at.is_none() {
            // The probe waited on a reorder timer that is now off.
            self.arm_tail_probe(now);
        }
    }

    /// In SACK recovery, the window is ssthresh (RFC 6675 §5: cwnd =
    /// ssthresh on entry; no inflation by duplicate ACKs) against the
    /// pipe rather than everything outstanding.
    fn sack_recovery(&self) -> bool {
        self.sack_ok && self.cc.in_recovery()
    }

    fn take_rtt_sample(&mut self, seg: &Segment, ack: SeqNum, now: Instant) {
        //= https://www.rfc-editor.org/rfc/rfc7323#section-4.1
        //# ... the RTT measurement ... using the TSecr value of the
        //# acknowledgment
        if let (Some(_), Some(ts)) = (self.ts, seg.options.timestamps) {
            let rtt_ms = self.ts_now(now).wrapping_sub(ts.ecr);
            if rtt_ms < 60_000 {
                self.rtt.sample(Duration::from_millis(u64::from(rtt_ms)));
            }
            self.rtt_probe = None;
            return;
        }
        if let Some((probe, sent)) = self.rtt_probe {
            if ack.gt(probe) {
                self.rtt.sample(now.saturating_duration_since(sent));
                self.rtt_probe = None;
            }
        }
    }

    /// The earliest time `on_timer` has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let ack = match self.ack {
            AckNeed::Delayed(t) => Some(t),
            _ => None,
        };
        [
            self.rto_at,
            self.tlp_at,
            self.rack_at,
            self.persist_at,
            ack,
            self.time_wait_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs the timers due at `now`.
    pub fn on_timer(&mut self, now: Instant) {
        if let AckNeed::Delayed(t) = self.ack {
            if now >= t {
                self.ack = AckNeed::Now;
            }
        }
        if self.time_wait_until.is_some_and(|t| now >= t) {
            self.time_wait_until = None;
            if self.state == State::FinWait2 {
                // The peer never sent its FIN: it is told, with a RST.
                self.pending_rst = self.abort();
                self.abort = Some(Abort::TimedOut);
            }
            self.state = State::Closed;
            return;
        }
        if self.rack_at.is_some_and(|t| now >= t) {
            self.rack_detect(now);
            if self.rack_at.is_none() && self.tlp_at.is_none() {
                self.arm_tail_probe(now);
            }
        }
        if self.rto_at.is_some_and(|t| now >= t) {
            self.on_rto(now);
        } else if self.tlp_at.is_some_and(|t| now >= t) {
            self.tlp_at = None;
            self.on_tail_probe(now);
        }
        if self.persist_at.is_some_and(|t| now >= t) {
            self.persist_at = None;
            self.persist_backoff += 1;
            // The probe goes out from poll_transmit (one byte past the
            // window, RFC 9293 §3.8.6.1).
            self.stats.zero_window_probes += 1;
            self.retransmit_now = true;
        }
    }

    fn on_rto(&mut self, now: Instant) {
        if !self.outstanding() {
            self.rto_at = None;
            return;
        }
        self.stats.rto_expirations += 1;
        let probing_live_peer = self.snd_wnd == 0 && std::mem::take(&mut self.zero_window_alive);
        if self.rtt.backoffs() >= self.cfg.max_retransmits && !probing_live_peer {
            self.state = State::Closed;
            self.abort = Some(Abort::TimedOut);
            self.rto_at = None;
            return;
        }
        if self.snd_wnd == 0 && self.zero_window_probe == Some(self.snd_una) {
            // What timed out is the probe of a shut window, refused or
            // lost: no sign of congestion, and no loss state (Linux's
            // probe timer leaves the congestion window alone too). Its
            // byte goes back out of flight; the persist timer sends the
            // next probe, which arms this timer again. Left armed with
            // nothing in flight, this timer fired between probes too, each
            // time without the peer's answer to show it alive, and gave
            // up on a peer that answered every probe after ten minutes.
            self.rtt.back_off();
            self.snd_nxt = self.snd_una;
            self.retransmit_now = false;
            self.fast_pending = false;
            self.tlp_at = None;
            self.rack_at = None;
            self.rtt_probe = None;
            self.rto_at = None;
            return;
        }
        //= https://www.rfc-editor.org/rfc/rfc6298#section-5
        //# (5.4) Retransmit the earliest segment that has not been
        //# acknowledged by the TCP receiver.
        //# (5.5) The host MUST set RTO <- RTO * 2 ("back off the timer").
        //# (5.6) Start the retransmission timer
        self.cc.on_rto(self.flight());
        self.episode = None;
        // Waiting out a delayed ACK may have cost this timeout: probe at
        // two SRTTs again until a probe proves spurious once more.
        self.peer_holds_acks = false;
        self.full_window_probe = None;
        // Go-back-N resends from SND.UNA; SACKs start over (a peer may
        // also have reneged, RFC 2018 §8).
        self.scoreboard.clear();
        self.resent_at.clear();
        self.overdue_resends = 0;
        self.rack.clear(self.snd_una);
        self.rack_at = None;
        self.rto_high = Some(self.snd_max);
        self.rtt.back_off();
        self.tlp_at = None;
        self.rtt_probe = None;
        // Go back: everything after SND.UNA is sent again as the window
        // (now one segment) allows; ACKs up to SND.MAX stay valid.
        self.snd_nxt = self.snd_una;
        self.retransmit_now = false;
        self.fast_pending = false;
        // A shut window takes nothing of the go-back-N: the persist timer
        // probes it (BSD's tcp_output does the same), and the probe arms
        // this timer again.
        self.rto_at = (self.snd_wnd > 0).then(|| now + self.rtt.rto());
    }

    /// The next segment to send, if any. Call until `None` after every
    /// input and timer.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Segment> {
        let mut seg = self.poll_transmit_lent(now)?;
        let (a, b) = self.lent();
        seg.payload = [a, b].concat();
        Some(seg)
    }

    /// As [`Conn::poll_transmit`], but the payload stays in the send
    /// buffer (the segment's own is empty): [`Conn::lent`] shows it until
    /// this connection is next called. The frame is built from there,
    /// without a copy of its own for every segment sent.
    pub fn poll_transmit_lent(&mut self, now: Instant) -> Option<Segment> {
        self.lent = Lent::default();
        if let Some(rst) = self.pending_rst.take() {
            return Some(rst);
        }
        if self.state == State::Closed {
            return None;
        }
        let seg = self
            .retransmission(now)
            .or_else(|| self.next_hole(now))
            .or_else(|| self.new_data(now))
            .or_else(|| self.pure_ack(now))?;
        self.stats.segments_out += 1;
        self.stats.pure_acks_out +=
            u64::from(self.lent.len == 0 && !(seg.flags.syn || seg.flags.fin || seg.flags.rst));
        Some(seg)
    }

    /// The payload of the segment [`Conn::poll_transmit_lent`] last
    /// returned, in the send buffer: two slices where it wraps.
    pub fn lent(&self) -> (&[u8], &[u8]) {
        let (a, b) = self.send_buf.as_slices();
        // Bytes acknowledged since are gone from the front (none are, as
        // the frame is built at once).
        let gone = self.snd_una.since(self.lent.seq).max(0) as usize;
        let from = (self.lent.seq.since(self.snd_una).max(0) as usize).min(self.send_buf.len());
        let to = (from + self.lent.len.saturating_sub(gone)).min(self.send_buf.len());
        let first = &a[from.min(a.len())..to.min(a.len())];
        let second =
            &b[from.saturating_sub(a.len()).min(b.len())..to.saturating_sub(a.len()).min(b.len())];
        (first, second)
    }

    /// A segment with our ACK, window and options.
    /// The payload is lent from the send buffer ([`Conn::lent`]).
    fn segment(&mut self, seq: SeqNum, payload: Lent, fin: bool, now: Instant) -> Segment {
        self.lent = payload;
        let (raw, wnd) = self.adv_window();
        self.last_adv = wnd;
        self.ack = AckNeed::None;
        self.unacked_segments = 0;
        let mut options = TcpOptions::default();
        //= https://www.rfc-editor.org/rfc/rfc7323#section-3.2
        //# Once TSopt has been successfully negotiated, that is both <SYN>
        //# and <SYN,ACK> contain TSopt, the TSopt MUST be sent in every
        //# non-<RST> segment for the duration of the connection
        if let Some(ts) = self.ts {
            options.timestamps = Some(Timestamps {
                val: self.ts_now(now),
                ecr: ts.recent,
            });
        }
        //= https://www.rfc-editor.org/rfc/rfc2018#section-4
        //# If sent at all, SACK options SHOULD be included in all ACKs which
        //# do not ACK the highest sequence number in the data receiver's
        //# queue.
        // Data segments too: new data is sized to leave the blocks room
        // ([`Conn::data_mss`], RFC 6691); a retransmission keeps the size
        // its bytes went out with (cut to fit, its tail would go out as a
        // second segment of its own) and carries only the blocks that
        // fit beside it, if any.
        let fit = if payload.len == 0 {
            usize::MAX
        } else {
            (self.mss as usize)
                .saturating_sub(payload.len)
                .saturating_sub(4)
                / 8
        };
        let blocks = self.sack_count().min(fit);
        if blocks > 0 {
            // One duplicate per ACK, the rest on the ACKs that follow. No
            // ACK is sent only to carry one: to the peer it would be a
            // duplicate ACK, and three of them a (spurious) fast
            // retransmission, whose duplicate draws more.
            // A duplicate above RCV.NXT is read as a DSACK only with the
            // block it came from beside it: it waits for an ACK with room
            // for both.
            let rcv_nxt = self.rcv_nxt();
            let dsack = self
                .dsack
                .front()
                .is_some_and(|&(l, _)| blocks >= 2 || l.lt(rcv_nxt))
                .then(|| self.dsack.pop_front())
                .flatten();
            //= https://www.rfc-editor.org/rfc/rfc2883#section-4
            //# If the D-SACK block reports a duplicate contiguous sequence
            //# from the receiver's data buffer, then the D-SACK block MUST be
            //# the first block in the SACK option.
            self.stats.dsacks_out += u64::from(dsack.is_some());
            self.stats.sacks_on_data += u64::from(payload.len > 0);
            //= https://www.rfc-editor.org/rfc/rfc2883#section-4
            //# If the D-SACK block reports a duplicate contiguous sequence
            //# from a (possibly larger) block of data in the receiver's data
            //# queue above the cumulative acknowledgement, then the second
            //# SACK block in that SACK option should specify that (possibly
            //# larger) block of data.
            let held = self.rcv.sack_blocks_led_by(dsack.map(|(l, _)| l));
            options.sack = dsack.into_iter().chain(held).collect();
            options.sack.truncate(blocks);
        }
        Segment {
            seq,
            ack: self.rcv_nxt(),
            flags: Flags {
                ack: true,
                fin,
                psh: payload.len > 0,
                ..Flags::default()
            },
            window: raw,
            options,
            payload: Vec::new(),
        }
    }

    /// The SACK blocks the next segment carries (a queued DSACK first,
    /// then the receive queue's): as many as fit beside the timestamps
    /// (three) or alone (four); none without SACK.
    fn sack_count(&self) -> usize {
        if !self.sack_ok {
            return 0;
        }
        let room = if self.ts.is_some() { 3 } else { SACK_BLOCKS };
        (usize::from(!self.dsack.is_empty()) + self.rcv.sack_block_count()).min(room)
    }

    /// The payload a new data segment may carry: the MSS (already less
    /// the timestamps) less the SACK option it will carry, two NOPs, kind,
    /// length and 8 bytes a block.
    //= https://www.rfc-editor.org/rfc/rfc6691#section-2
    //# the sender MUST reduce the TCP data length to account for any IP or
    //# TCP options that it is including in the packets that it sends.
    fn data_mss(&self) -> usize {
        let blocks = self.sack_count();
        let option = if blocks == 0 { 0 } else { 4 + 8 * blocks };
        (self.mss as usize).saturating_sub(option).max(1)
    }

    /// Whether `seg` SACKs bytes above everything SACKed so far (and not
    /// beyond what was sent); remembers the new high edge.
    fn sacks_new(&mut self, seg: &Segment) -> bool {
        if !self.sack_ok {
            return false;
        }
        let high = seg
            .options
            .sack
            .iter()
            .map(|&(_, right)| right)
            .filter(|r| r.gt(self.snd_una) && r.le(self.snd_max))
            .max_by(|a, b| a.cmp_mod(*b));
        match high {
            Some(r) if r.gt(self.sack_high) => {
                self.sack_high = r;
                true
            }
            _ => false,
        }
    }

    /// `len` bytes from `from` in the send buffer (as many as it holds).
    fn bytes_at(&self, from: SeqNum, len: usize) -> Lent {
        let off = (from.since(self.snd_una).max(0) as usize).min(self.send_buf.len());
        let end = (off + len).min(self.send_buf.len());
        Lent {
            seq: self.snd_una + off as u32,
            len: end - off,
        }
    }

    /// Fast retransmit, partial ACK or zero-window probe: the first
    /// unacknowledged segment.
    fn retransmission(&mut self, now: Instant) -> Option<Segment> {
        if !std::mem::take(&mut self.retransmit_now) {
            return None;
        }
        let fast = std::mem::take(&mut self.fast_pending);
        if self.snd_wnd == 0 && self.flight() == 0 {
            // Zero-window probe: one new byte (or the FIN).
            return self.probe(now);
        }
        if self.flight() == 0 {
            return None;
        }
        // Only bytes sent before (up to SND.MAX): new data goes out through
        // `new_data`, which moves SND.NXT; a byte sent here first would be
        // acknowledged beyond SND.MAX, and that ACK refused as one for
        // data not yet sent (RFC 9293 §3.10.7.4), for good if the window
        // then stays shut.
        let una = self.snd_una;
        // The segment as it went out (the log has its size), within what
        // was sent.
        let len = self
            .rack
            .segment_from(una)
            .map_or(self.mss as usize, |l| l as usize)
            .min(self.sent_bytes())
            .min(self.mss as usize);
        if self.rtt_probe.is_some_and(|(p, _)| p.ge(una)) {
            self.rtt_probe = None; // Karn: that timing is now ambiguous.
        }
        let seg = self.resend(una, len, fast, now);
        if self.sack_recovery() {
            self.arm_tail_probe(now);
        }
        Some(seg)
    }

    /// Bytes sent and not acknowledged that are still buffered: what a
    /// retransmission may carry, from SND.UNA.
    fn sent_bytes(&self) -> usize {
        (self.snd_max.since(self.snd_una).max(0) as usize).min(self.send_buf.len())
    }

    /// The segment that sends `len` bytes at `seq` again (with the FIN if
    /// they end where it is), counted and remembered.
    fn resend(&mut self, seq: SeqNum, len: usize, fast: bool, now: Instant) -> Segment {
        let payload = self.bytes_at(seq, len);
        let fin = self.fin_sent() && self.fin_seq == Some(seq + len as u32);
        self.stats.retransmits += 1;
        self.stats.fast_retransmits += u64::from(fast);
        if self.sack_ok {
            let end = seq + len as u32 + u32::from(fin);
            self.rack.on_send(seq, end, now, true);
        }
        self.resent(seq, len, now);
        self.rto_at.get_or_insert(now + self.rtt.rto());
        self.segment(seq, payload, fin, now)
    }

    /// `len` bytes (0: the FIN alone) at `seq` were sent again: kept to
    /// match DSACKs against (RFC 3708), and as HighRxt in recovery.
    fn resent(&mut self, seq: SeqNum, len: usize, now: Instant) {
        if !self.sack_ok {
            return;
        }
        let end = seq + len as u32;
        if self.cc.in_recovery() {
            if end.gt(self.high_rxt) {
                self.high_rxt = end;
            }
            // Below SND.UNA now: done with.
            let una = self.snd_una;
            self.resent_at.retain(|(s, _)| s.ge(una) && *s != seq);
            if self.resent_at.len() < MAX_RANGES {
                self.resent_at.push_back((seq, now));
            }
        }
        let ep = self.episode.get_or_insert_with(Episode::default);
        // A FIN alone is never DSACKed: such an episode is never undone.
        if len == 0 {
            ep.overflowed = true;
        } else if ep.pending.len() < EPISODE_RANGES {
            ep.pending.push((seq, end));
        } else {
            ep.overflowed = true;
        }
    }

    /// SACK recovery (RFC 6675 §5, NextSeg rule 1): the next hole past
    /// HighRxt that the scoreboard deems lost, while the pipe leaves room
    /// in the window. Every hole a round trip's SACKs show is resent in
    /// that round trip.
    fn next_hole(&mut self, now: Instant) -> Option<Segment> {
        if !self.sack_recovery() {
            return None;
        }
        //= https://www.rfc-editor.org/rfc/rfc6675#section-5
        //# (C) If cwnd - pipe >= 1 SMSS, the sender SHOULD transmit one or
        //# more segments
        if self.pipe().saturating_add(self.mss) > self.cc.ssthresh() {
            return None;
        }
        let (start, end) = if self.rack_on() {
            self.rack.next_lost()?
        } else {
            let below = self.scoreboard.lost_below(self.lost_need())?;
            let from = self.high_rxt.max(self.snd_una);
            self.scoreboard.hole_from(from, below)?
        };
        // Only bytes sent before (below SND.MAX, and still buffered), as
        // for any retransmission.
        let sent_end = self.snd_una + self.sent_bytes() as u32;
        if !start.lt(sent_end) {
            // A FIN lost alone (it takes a number, not a byte).
            if self.fin_sent() && self.fin_seq == Some(start) {
                return Some(self.resend(start, 0, true, now));
            }
            return None;
        }
        let end = if end.gt(sent_end) { sent_end } else { end };
        let len = (end.since(start).max(0) as usize).min(self.mss as usize);
        if len == 0 {
            return None;
        }
        if self
            .rtt_probe
            .is_some_and(|(p, _)| p.ge(start) && p.lt(start + len as u32))
        {
            self.rtt_probe = None;
        }
        Some(self.resend(start, len, true, now))
    }

    fn probe(&mut self, now: Instant) -> Option<Segment> {
        let unsent = self.send_buf.len().saturating_sub(self.flight() as usize);
        let (payload, fin) = if unsent > 0 {
            (self.bytes_at(self.snd_nxt, 1), false)
        } else if self.fin_seq.is_some() && !self.fin_sent() {
            (Lent::default(), true)
        } else {
            return None;
        };
        let seq = self.snd_nxt;
        self.sent(seq + payload.len as u32 + u32::from(fin), now);
        self.rto_at.get_or_insert(now + self.rtt.rto());
        self.zero_window_probe = Some(seq);
        Some(self.segment(seq, payload, fin, now))
    }

    /// New data (or the FIN) as the congestion and peer windows allow.
    fn new_data(&mut self, now: Instant) -> Option<Segment> {
        if !matches!(
            self.state,
            State::Established
                | State::CloseWait
                | State::FinWait1
                | State::LastAck
                | State::Closing
        ) {
            return None;
        }
        let flight = self.flight();
        let sent = (flight as usize).min(self.send_buf.len());
        let unsent = self.send_buf.len() - sent;
        let cc_wnd = self.cc.cwnd().saturating_add(self.cc.limited_transmit());
        let room = if self.sack_recovery() {
            // RFC 6675 NextSeg rule 2: new data as the pipe allows, within
            // the peer's window.
            let cc_room = self.cc.ssthresh().saturating_sub(self.pipe());
            cc_room.min(self.snd_wnd.saturating_sub(flight)) as usize
        } else {
            self.snd_wnd.min(cc_wnd).saturating_sub(flight) as usize
        };
        // Whether the congestion window, rather than the peer's window or
        // the data to send, is what stops the sender if it stops here.
        let cwnd_full = cc_wnd <= self.snd_wnd && room < self.mss as usize;
        if unsent > 0 {
            if room == 0 {
                self.cc.set_cwnd_limited(cwnd_full);
                self.arm_persist(now);
                return None;
            }
            // Bytes sent before (after a timeout SND.NXT goes back) keep
            // the full size; only new ones make room for SACK blocks.
            let full = if self.snd_nxt.lt(self.snd_max) {
                self.mss as usize
            } else {
                self.data_mss()
            };
            let len = unsent.min(full).min(room);
            //= https://www.rfc-editor.org/rfc/rfc9293#section-3.8.6.2.1
            //# The sender ... should send data only if ... a maximum-sized
            //# segment can be sent ... or all queued data can be sent ... or
            //# (flight is empty) (sender-side silly window avoidance)
            if len < full && len < unsent && flight > 0 {
                self.cc.set_cwnd_limited(cwnd_full);
                return None;
            }
            let seq = self.snd_nxt;
            let payload = self.bytes_at(seq, len);
            let fin = self.fin_seq == Some(seq + len as u32);
            // Karn: bytes sent before (the go-back-N after a timeout, the
            // rewind to a refused probe's byte) are not timed; their ACK
            // may answer the first sending.
            let fresh = seq.ge(self.snd_max);
            self.sent(seq + len as u32 + u32::from(fin), now);
            if fresh && self.rtt_probe.is_none() {
                self.rtt_probe = Some((seq, now));
            }
            //# (5.1) Every time a packet containing data is sent ... if the
            //# timer is not running, start it running
            self.rto_at.get_or_insert(now + self.rtt.rto());
            self.arm_tail_probe(now);
            return Some(self.segment(seq, payload, fin, now));
        }
        if self.fin_seq == Some(self.snd_nxt) {
            let seq = self.snd_nxt;
            self.sent(seq + 1, now);
            self.rto_at.get_or_insert(now + self.rtt.rto());
            return Some(self.segment(seq, Lent::default(), true, now));
        }
        // Out of data: a window already full still counts as filled.
        self.cc.set_cwnd_limited(cwnd_full);
        None
    }

    /// The flight fills the peer's window: no further full segment fits.
    fn window_full(&self) -> bool {
        self.flight().saturating_add(self.mss) > self.snd_wnd
    }

    /// (Re)starts the tail loss probe timer while data is out and no
    /// recovery runs: two smoothed RTTs (at least 10 ms), plus a delayed
    /// ACK's worth when one segment is out or the flight fills the window
    /// of a peer known to hold its ACKs then, and never later than the
    /// RTO.
    fn arm_tail_probe(&mut self, now: Instant) {
        self.tlp_at = None;
        if self.rack_at.is_some() {
            // The reorder timer runs (RFC 8985 §8: one of them at a time);
            // the probe is armed again when it has fired.
            return;
        }
        let Some(srtt) = self.rtt.srtt() else { return };
        // After a timeout, until its go-back-N is acknowledged (Linux's
        // loss state), the backed-off timer alone paces resends: a probe
        // two SRTTs after each one undid the backoff toward a silent peer.
        if !self.outstanding() || self.rto_high.is_some() {
            return;
        }
        // Nor while a shut window is probed (RFC 8985 §8: not with the
        // persist timer): a refused probe is no tail loss.
        if self.zero_window_probe.is_some() {
            return;
        }
        if self.cc.in_recovery() {
            // In SACK recovery the probe watches the first hole's resend:
            // due back within the resend wait, else lost again (when no
            // ACK at all comes to show it, RACK's reordering timer).
            let due = self.first_hole_resend().map(|i| self.resent_at[i].1);
            if let (true, Some(at), Some(wait)) = (self.sack_recovery(), due, self.resend_wait()) {
                let at = (at + wait).max(now);
                if self.rto_at.is_none_or(|rto| at < rto) {
                    self.tlp_at = Some(at);
                }
            }
            return;
        }
        // RFC 8985 §7.2 adds the worst-case delayed ACK (WCDelAckT) when
        // one segment is out. A slow reader delays its ACK as surely when
        // the flight fills its window: its buffer is then full, and Linux
        // ACKs at once only when its window would not shrink, so the ACK
        // waits for the application to read. Probing at two SRTTs sent
        // such a reader every flight twice (the copy's echoed timestamp
        // kept SRTT short). A reader that keeps up ACKs at once, and its
        // lost tail is the probe's: so the allowance waits until one
        // probe at a full window proved spurious.
        let mut pto = (srtt * 2).max(Duration::from_millis(10));
        if self.flight() <= self.mss || (self.peer_holds_acks && self.window_full()) {
            pto += Duration::from_millis(200);
        }
        let at = now + pto;
        if self.rto_at.is_none_or(|rto| at < rto) {
            self.tlp_at = Some(at);
        }
    }

    /// No ACK for two RTTs with data out: the tail of the flight (or its
    /// ACKs) was lost. Retransmit the first unacknowledged segment, which
    /// is the lost one when the whole tail went, and respond as fast
    /// recovery does; partial ACKs then repair the rest.
    fn on_tail_probe(&mut self, now: Instant) {
        if !self.outstanding() {
            return;
        }
        if self.sack_recovery() {
            self.resend_if_overdue(now);
            return;
        }
        if self.cc.on_loss(self.snd_nxt, self.flight()) == AckAction::Retransmit {
            self.new_loss_episode();
            // The probe resends SND.UNA's segment (`retransmission`).
            self.full_window_probe = self.window_full().then_some(self.snd_una);
            self.stats.tail_probes += 1;
            self.retransmit_now = true;
        }
    }

    /// The persist timer (RFC 9293 §3.8.6.1), doubled for each probe sent
    /// since the window last opened. From the estimate, not the backed-off
    /// timeout: the probe's byte has a timeout too, which backs off the
    /// estimate each time it expires, and the two together quadrupled the
    /// interval at every probe.
    fn arm_persist(&mut self, now: Instant) {
        if self.snd_wnd == 0 && self.flight() == 0 && self.persist_at.is_none() {
            let d = backed_off(self.rtt.base_rto(), self.persist_backoff.min(10));
            self.persist_at = Some(now + d);
        }
    }

    fn pure_ack(&mut self, now: Instant) -> Option<Segment> {
        if self.ack != AckNeed::Now {
            return None;
        }
        Some(self.segment(self.snd_nxt, Lent::default(), false, now))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(b) = &self.cfg.budget {
            b.give(self.granted[0] + self.granted[1]);
        }
    }
}
