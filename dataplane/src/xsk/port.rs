//! [`QueuePort`]: the UMEM and the two AF_XDP sockets of one queue.
//!
//! The sockets are bound with `XDP_USE_SG` (multi-buffer): a frame longer
//! than one UMEM frame (jumbo MTUs) is a chain of descriptors, all but the
//! last flagged `XDP_PKT_CONTD`, on RX and on TX alike. The port keeps a
//! chain together: it submits whole chains to a TX ring (the kernel would
//! wait for the rest of a partial one, holding a half-built skb).

use std::{collections::VecDeque, num::NonZeroU32, os::fd::AsRawFd};

use thiserror::Error;
use xsk_rs::{
    config::{BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig},
    CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem,
};

use crate::flow::Side;

#[derive(Debug, Error)]
pub enum XskError {
    #[error("bad AF_XDP configuration: {0}")]
    Config(String),
    #[error("cannot create the UMEM for queue {queue} ({mib} MiB of locked memory): {source} ({advice})")]
    Umem {
        queue: u32,
        mib: u64,
        source: xsk_rs::umem::UmemCreateError,
        advice: String,
    },
    #[error(
        "cannot bind an AF_XDP socket to {iface} queue {queue}: {source} \
         (is another AF_XDP program bound there, does the interface have fewer queues, or is \
         the kernel older than 6.6, without AF_XDP multi-buffer?)"
    )]
    Socket {
        iface: String,
        queue: u32,
        source: xsk_rs::socket::SocketCreateError,
    },
    #[error("AF_XDP socket on {iface} queue {queue} came without its own fill/completion rings")]
    NoRings { iface: String, queue: u32 },
}

/// Why a frame could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// Not enough UMEM frames this side may take until transmissions
    /// complete: none free, or the side holds its share for TX (see
    /// [`PortConfig::tx_share`]).
    NoFreeFrame,
    /// Empty, or longer than [`MAX_FRAME_DESCS`] UMEM frames (than one
    /// without multi-buffer): never sendable.
    Unsendable(usize),
}

#[derive(Clone, Copy, Debug)]
pub struct PortConfig {
    /// UMEM frames for this queue (both interfaces together).
    pub frames: u32,
    pub frame_size: u32,
    /// Size of each RX, TX, fill and completion ring.
    pub ring_size: u32,
    /// Bind with `XDP_USE_SG`: frames longer than one UMEM frame arrive
    /// as chains. Without it the kernel drops them (`rx_dropped`).
    pub multi_buffer: bool,
}

/// sendto() calls per side per flush (32 frames each in copy mode).
const MAX_KICKS: usize = 16;

/// Descriptors one frame may span. Copy-mode TX builds an skb's head from
/// the first descriptor and one page fragment from each further one, up to
/// MAX_SKB_FRAGS (17): 18 descriptors; 16 keeps clear of it. A refused
/// chain is consumed and never completed, so its frames would be lost.
pub const MAX_FRAME_DESCS: u32 = 16;

/// `XDP_PKT_CONTD`: more descriptors of this frame follow.
pub const PKT_CONTD: u32 = 1;

/// Whether a side's TX holding `held` frames may take `parts` more within
/// its `share`. A side holding none may always take a frame, however many
/// parts: otherwise a chain longer than the share would never go.
fn may_take(held: usize, parts: usize, share: usize) -> bool {
    held == 0 || held + parts <= share
}

/// One sendto() on an AF_XDP socket: copy mode transmits up to 32
/// descriptors per call. Whether the kernel left more in the ring
/// (EAGAIN). xsk-rs's `TxQueue::wakeup` cannot tell: it reads EAGAIN as
/// success.
fn kick(fd: std::os::fd::RawFd) -> bool {
    // SAFETY: a zero-length send with no buffer and no address on a
    // socket this port owns; the kernel reads no user memory.
    let rc = unsafe {
        libc::sendto(
            fd,
            std::ptr::null(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null(),
            0,
        )
    };
    rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
}

impl PortConfig {
    /// Frames kept back from the fill rings for frames the worker builds.
    pub fn reserve(&self) -> u32 {
        (self.frames / 8).max(64)
    }

    /// The most frames one side's TX may hold (queued for its ring, in it,
    /// or not yet completed): what is left once both fill rings are full
    /// and the reserve kept, halved. Without a bound, a side whose
    /// receiver drains slowly took every free frame into its TX backlog,
    /// the fill rings ran dry and the kernel dropped frames on both sides
    /// (`rx_fill_ring_empty_descs`): a slow server cost the client's
    /// segments and the server's own ACKs.
    pub fn tx_share(&self) -> u32 {
        self.frames
            .saturating_sub(2 * self.ring_size + self.reserve())
            / 2
    }

    /// Enough frames to fill both fill rings, keep the reserve, and still
    /// have a ring's worth in flight to TX; otherwise one side starves.
    pub fn validate(&self) -> Result<(), XskError> {
        if self.ring_size < MAX_FRAME_DESCS {
            return Err(XskError::Config(format!(
                "rings of {} are too small: a frame may take {MAX_FRAME_DESCS} descriptors",
                self.ring_size
            )));
        }
        let need = 3 * self.ring_size + self.reserve();
        if self.frames < need {
            return Err(XskError::Config(format!(
                "{} UMEM frames per queue are too few for rings of {}: at least {need} are \
                 needed (two fill rings, TX in flight, and a reserve)",
                self.frames, self.ring_size
            )));
        }
        Ok(())
    }

    /// Largest frame one UMEM frame holds (the kernel keeps
    /// XDP_PACKET_HEADROOM, 256 bytes, in front of the data).
    pub fn max_frame_len(&self) -> u32 {
        self.frame_size.saturating_sub(256)
    }

    /// Descriptors one frame may take: [`MAX_FRAME_DESCS`], or one
    /// without multi-buffer.
    fn max_descs(&self) -> u32 {
        if self.multi_buffer {
            MAX_FRAME_DESCS
        } else {
            1
        }
    }

    /// Largest frame the port carries.
    pub fn max_packet_len(&self) -> u32 {
        self.max_frame_len().saturating_mul(self.max_descs())
    }
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            frames: 8192,
            frame_size: 4096,
            ring_size: 2048,
            multi_buffer: true,
        }
    }
}

/// Kernel-side AF_XDP statistics of one socket (XDP_STATISTICS).
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SideStats {
    pub rx_dropped: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    pub rx_ring_full: u64,
    pub rx_fill_ring_empty_descs: u64,
    pub tx_ring_empty_descs: u64,
}

impl SideStats {
    /// Frames the kernel dropped on their way to this socket: with no free
    /// frame to copy into (`rx_dropped`: the fill ring ran dry) and with
    /// the RX ring full (`rx_ring_full`, counted apart: a worker that fell
    /// behind). `rx_fill_ring_empty_descs` counts the same dry fill ring
    /// again, so it is not added.
    pub fn rx_lost(&self) -> u64 {
        self.rx_dropped + self.rx_ring_full
    }
}

struct SidePort {
    tx: TxQueue,
    rx: RxQueue,
    fill: FillQueue,
    comp: CompQueue,
    /// Frames handed to us for TX that the TX ring had no room for yet.
    pending: VecDeque<FrameDesc>,
    /// Frames in the TX ring not yet back on the completion ring. Copy
    /// mode transmits a bounded batch per sendto(), so the ring must be
    /// kicked until this drops to zero, not only when new frames arrive.
    in_flight: usize,
    /// The socket's `tx_invalid_descs` as last read: descriptors the
    /// kernel consumed and will never complete.
    tx_refused: u64,
}

pub struct QueuePort {
    queue: u32,
    /// Descriptors one frame may take (see [`PortConfig::max_descs`]).
    max_descs: usize,
    umem: Umem,
    free: Vec<FrameDesc>,
    sides: [SidePort; 2],
    scratch: Vec<FrameDesc>,
    /// Bytes of a frame's data per UMEM frame.
    chunk: usize,
    /// Free frames kept back from the fill rings for frames this worker
    /// builds itself (crossover copies, later its own TCP segments).
    reserve: usize,
    /// [`PortConfig::tx_share`].
    tx_share: usize,
    pub tx_ring_full: u64,
    pub fill_starved: u64,
}

impl QueuePort {
    /// Create the UMEM and bind `inside` and `outside` queue `queue` to it.
    /// libxdp's own XDP program is never loaded: the engine's program
    /// redirects into the XSKMAP it manages itself.
    pub fn new(
        inside: &str,
        outside: &str,
        queue: u32,
        cfg: PortConfig,
    ) -> Result<QueuePort, XskError> {
        cfg.validate()?;
        let bad = |e: &dyn std::fmt::Display| XskError::Config(e.to_string());
        let ring = QueueSize::new(cfg.ring_size).map_err(|e| bad(&e))?;
        let umem_cfg = UmemConfig::builder()
            .frame_size(FrameSize::new(cfg.frame_size).map_err(|e| bad(&e))?)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| bad(&e))?;
        let frames = NonZeroU32::new(cfg.frames).ok_or_else(|| bad(&"zero UMEM frames"))?;
        let (umem, free) = Umem::new(umem_cfg, frames, false).map_err(|source| XskError::Umem {
            queue,
            mib: (u64::from(cfg.frames) * u64::from(cfg.frame_size)) >> 20,
            source,
            advice: crate::sys::memlock_advice(),
        })?;
        let sock_cfg = SocketConfig::builder()
            .rx_queue_size(ring)
            .tx_queue_size(ring)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(if cfg.multi_buffer {
                BindFlags::XDP_USE_NEED_WAKEUP | BindFlags::XDP_USE_SG
            } else {
                BindFlags::XDP_USE_NEED_WAKEUP
            })
            .build();
        let bind =
            |name: &str| -> Result<SidePort, XskError> {
                let iface: Interface = name
                    .parse()
                    .map_err(|_| XskError::Config(format!("bad interface name {name:?}")))?;
                // SAFETY: each (interface, queue) pair is bound once, by this
                // port, and XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD is set as
                // Socket::new requires for shared UMEMs.
                let (tx, rx, rings) = unsafe { Socket::new(sock_cfg, &umem, &iface, queue) }
                    .map_err(|source| XskError::Socket {
                        iface: name.into(),
                        queue,
                        source,
                    })?;
                let (fill, comp) = rings.ok_or_else(|| XskError::NoRings {
                    iface: name.into(),
                    queue,
                })?;
                Ok(SidePort {
                    tx,
                    rx,
                    fill,
                    comp,
                    pending: VecDeque::new(),
                    in_flight: 0,
                    tx_refused: 0,
                })
            };
        let sides = [bind(inside)?, bind(outside)?];
        let ring_size = cfg.ring_size as usize;
        let mut port = QueuePort {
            queue,
            max_descs: cfg.max_descs() as usize,
            umem,
            scratch: vec![FrameDesc::default(); ring_size],
            chunk: (cfg.max_frame_len() as usize).max(1),
            reserve: cfg.reserve() as usize,
            tx_share: cfg.tx_share() as usize,
            free,
            sides,
            tx_ring_full: 0,
            fill_starved: 0,
        };
        port.refill();
        Ok(port)
    }

    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// Socket fd of one side, for the XSKMAP.
    pub fn fd(&self, side: Side) -> i32 {
        self.sides[side.index()].rx.fd().as_raw_fd()
    }

    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Return transmitted frames to the free list.
    pub fn reclaim(&mut self) -> usize {
        let mut total = 0;
        for side in &mut self.sides {
            // SAFETY: the completion ring only returns frames of this UMEM.
            let n = unsafe { side.comp.consume(&mut self.scratch) };
            side.in_flight = side.in_flight.saturating_sub(n);
            self.free.extend_from_slice(&self.scratch[..n]);
            total += n;
        }
        total
    }

    /// Top the fill rings up from the free list, keeping the reserve. Each
    /// side may take half of what is spare, so one busy side cannot starve
    /// the other's ring.
    pub fn refill(&mut self) {
        let half = self.free.len().saturating_sub(self.reserve) / 2;
        for side in &mut self.sides {
            let want = (side.fill.nb_free(half as u32) as usize).min(half);
            if want > 0 {
                let start = self.free.len() - want;
                // SAFETY: these frames are free: in no ring and not
                // referenced elsewhere; fill takes all of them or none.
                let n = unsafe { side.fill.produce(&self.free[start..]) };
                self.free.truncate(self.free.len() - n);
            } else if half == 0 {
                self.fill_starved += 1;
            }
            if side.fill.needs_wakeup() {
                // A failed wakeup only delays RX until the next one.
                let _ = side.fill.wakeup(side.rx.fd_mut(), 0);
            }
        }
    }

    /// Receive up to `out.len()` frames from one side.
    pub fn recv(&mut self, side: Side, out: &mut [FrameDesc]) -> usize {
        // SAFETY: the RX ring only returns frames of this UMEM, and `out`
        // descriptors are overwritten, not used as inputs.
        unsafe { self.sides[side.index()].rx.consume(out) }
    }

    /// Bytes of a frame this port owns (received, not yet transmitted).
    pub fn data(&self, desc: &FrameDesc) -> &[u8] {
        // SAFETY: the descriptor came from this UMEM's RX ring or free
        // list, and the frame is in no kernel ring while we hold it.
        unsafe { self.umem.data(desc) }.contents()
    }

    /// Asks the CPU to start loading a received frame into its cache.
    /// The kernel copied it into the UMEM on the CPU the sender ran on,
    /// so the worker's first touch of each frame (its headers, then the
    /// checksum pass over its payload) misses every cache line; loads
    /// started a frame ahead overlap those misses with the work on the
    /// frame before. A hint only: it changes no memory and never faults.
    pub fn prefetch(&self, desc: &FrameDesc) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let data = self.data(desc);
            // By cache line, from the line the frame starts in (it starts
            // after the UMEM headroom, rarely on a line boundary) to the
            // one it ends in.
            let skew = data.as_ptr() as usize % 64;
            let first = data.as_ptr().wrapping_sub(skew);
            for line in 0..(skew + data.len()).div_ceil(64) {
                // SAFETY: SSE, the feature the intrinsic needs, is part of
                // every x86_64 CPU; a prefetch reads nothing into the
                // program and does not fault whatever the address.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(line * 64).cast()) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = desc;
    }

    /// Queue a frame for transmission on `side`; sent by [`flush`].
    pub fn send(&mut self, side: Side, desc: FrameDesc) {
        self.sides[side.index()].pending.push_back(desc);
    }

    /// Queue a received chain (one frame in several descriptors, flags
    /// as received) for transmission on `side`.
    pub fn send_chain(&mut self, side: Side, chain: &[FrameDesc]) {
        self.sides[side.index()]
            .pending
            .extend(chain.iter().copied());
    }

    /// Give a frame back without sending it.
    pub fn release(&mut self, desc: FrameDesc) {
        self.free.push(desc);
    }

    /// Give a chain back without sending it.
    pub fn release_chain(&mut self, chain: &[FrameDesc]) {
        self.free.extend_from_slice(chain);
    }

    /// Copy `bytes` into free frames (as many as it takes, chained) and
    /// queue them for transmission on `side`. Returns how many it took.
    pub fn build_send(&mut self, side: Side, bytes: &[u8]) -> Result<usize, BuildError> {
        let parts = bytes.len().div_ceil(self.chunk);
        // The kernel refuses an empty descriptor (and never completes it).
        if parts == 0 || parts > self.max_descs {
            return Err(BuildError::Unsendable(bytes.len()));
        }
        let held = &self.sides[side.index()];
        if self.free.len() < parts
            || !may_take(held.pending.len() + held.in_flight, parts, self.tx_share)
        {
            return Err(BuildError::NoFreeFrame);
        }
        let mut chain = [FrameDesc::default(); MAX_FRAME_DESCS as usize];
        for (i, piece) in bytes.chunks(self.chunk).enumerate() {
            let Some(mut desc) = self.build(piece) else {
                // Cannot happen (a piece fits a frame, the frames are
                // there); if it did, no part of the chain may go out.
                self.release_chain(&chain[..i]);
                return Err(BuildError::NoFreeFrame);
            };
            if i + 1 < parts {
                desc.set_options(PKT_CONTD);
            }
            chain[i] = desc;
        }
        self.send_chain(side, &chain[..parts]);
        Ok(parts)
    }

    /// Write a frame of `len` bytes with `fill` (given exactly `len`
    /// bytes) straight into a free frame and queue it for transmission on
    /// `side`: [`QueuePort::build_send`] without a buffer to copy from.
    /// Refused as that is (no frame free, the side at its share), and a
    /// frame longer than one UMEM frame as `Unsendable`: such a frame is
    /// for `build_send` to chain.
    pub fn build_send_with(
        &mut self,
        side: Side,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), BuildError> {
        if len == 0 || len > self.chunk {
            return Err(BuildError::Unsendable(len));
        }
        let held = &self.sides[side.index()];
        if self.free.is_empty() || !may_take(held.pending.len() + held.in_flight, 1, self.tx_share)
        {
            return Err(BuildError::NoFreeFrame);
        }
        // Always fits (a chunk fits a frame); were it not, nothing
        // half-written goes out.
        let desc = self
            .fill_free(len, fill)
            .ok_or(BuildError::Unsendable(len))?;
        self.sides[side.index()].pending.push_back(desc);
        Ok(())
    }

    /// Copy `bytes` into one free frame, or `None` when none is free or
    /// the bytes do not fit in one.
    pub fn build(&mut self, bytes: &[u8]) -> Option<FrameDesc> {
        self.fill_free(bytes.len(), &mut |frame| frame.copy_from_slice(bytes))
    }

    /// Write a frame of `len` bytes with `fill` (given exactly `len`
    /// bytes) into a free frame, or `None` when none is free or `len` does
    /// not fit in one (then nothing is written).
    fn fill_free(&mut self, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> Option<FrameDesc> {
        let mut desc = self.free.pop()?;
        // A freed RX frame may still carry its chain flag.
        desc.set_options(0);
        let written = {
            // SAFETY: a free frame is in no ring; we are its only user.
            let mut data = unsafe { self.umem.data_mut(&mut desc) };
            // The frame's length is the cursor's position (at most the
            // frame's room).
            data.cursor().set_pos(len);
            let frame = data.contents_mut();
            let fits = frame.len() == len;
            if fits {
                fill(frame);
            }
            fits
        };
        if !written {
            self.free.push(desc);
            return None;
        }
        Some(desc)
    }

    /// Push pending frames into the TX rings and kick the kernel while any
    /// frame is in flight. Returns (frames, bytes) handed to the kernel per
    /// side.
    pub fn flush(&mut self) -> [(u64, u64); 2] {
        let mut sent = [(0u64, 0u64); 2];
        for (side, sent) in self.sides.iter_mut().zip(sent.iter_mut()) {
            if !side.pending.is_empty() {
                let room = side.tx.nb_free(side.pending.len() as u32) as usize;
                let mut n = room.min(side.pending.len());
                // Whole chains only: a TX ring holding part of a frame
                // would have the kernel build a half skb.
                while n > 0 && side.pending[n - 1].options() & PKT_CONTD != 0 {
                    n -= 1;
                }
                if n < side.pending.len() {
                    self.tx_ring_full += 1;
                }
                if n > 0 {
                    let batch = &side.pending.make_contiguous()[..n];
                    // SAFETY: frames we own, each submitted once; the ring
                    // has room for all of them (checked just above).
                    let produced = unsafe { side.tx.produce(batch) };
                    debug_assert_eq!(produced, n);
                    // Frames (the last descriptor of each) and bytes.
                    for d in batch {
                        sent.0 += u64::from(d.options() & PKT_CONTD == 0);
                        sent.1 += d.lengths().data() as u64;
                    }
                    side.pending.drain(..produced);
                    side.in_flight += produced;
                }
            }
            // Copy mode transmits only from sendto(), and at most 32 frames
            // per call (the kernel's TX_BATCH_SIZE), answering EAGAIN while
            // more wait: kick again, a bounded number of times, so a burst
            // does not sit in the ring holding UMEM frames the fill rings
            // need.
            if side.in_flight > 0 && side.tx.needs_wakeup() {
                let fd = side.tx.fd().as_raw_fd();
                for _ in 0..MAX_KICKS {
                    let before = side.tx.nb_free_exact();
                    // EAGAIN with no descriptor taken is backpressure (a
                    // full device queue or completion ring), not more to
                    // do: kicking again would build and drop skbs.
                    if !kick(fd) || side.tx.nb_free_exact() == before {
                        break;
                    }
                }
            }
        }
        sent
    }

    /// Frames waiting for TX: not yet in a ring, or in a ring and not yet
    /// completed.
    pub fn pending_tx(&self) -> usize {
        self.sides
            .iter()
            .map(|s| s.pending.len() + s.in_flight)
            .sum()
    }

    /// Kernel statistics of both sides' sockets (inside, outside). TX
    /// descriptors the kernel refused (`tx_invalid_descs`: invalid, or a
    /// chain dropped whole) are never completed: they are taken off the
    /// side's count in flight here, or the side would hold them against
    /// its TX share for good.
    pub fn kernel_stats(&mut self) -> [SideStats; 2] {
        let mut out = [SideStats::default(); 2];
        for (side, o) in self.sides.iter_mut().zip(out.iter_mut()) {
            if let Ok(s) = side.rx.fd().xdp_statistics() {
                *o = SideStats {
                    rx_dropped: s.rx_dropped(),
                    rx_invalid_descs: s.rx_invalid_descs(),
                    tx_invalid_descs: s.tx_invalid_descs(),
                    rx_ring_full: s.rx_ring_full(),
                    rx_fill_ring_empty_descs: s.rx_fill_ring_empty_descs(),
                    tx_ring_empty_descs: s.tx_ring_empty_descs(),
                };
                let refused = o.tx_invalid_descs.saturating_sub(side.tx_refused);
                side.tx_refused = side.tx_refused.max(o.tx_invalid_descs);
                side.in_flight = side.in_flight.saturating_sub(refused as usize);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_leaves_the_fill_rings_their_frames() {
        let cfg = PortConfig::default();
        cfg.validate().unwrap();
        let share = cfg.tx_share();
        // Both sides' TX at their share, both fill rings full and the
        // reserve kept: never more than the UMEM.
        assert!(2 * share + 2 * cfg.ring_size + cfg.reserve() <= cfg.frames);
        // The least UMEM `validate` accepts still leaves TX a frame chain.
        let least = PortConfig {
            frames: 3 * cfg.ring_size + cfg.reserve(),
            ..cfg
        };
        least.validate().unwrap();
        assert!(least.tx_share() >= least.ring_size / 2);
        assert!(least.tx_share() >= 1);
    }

    #[test]
    fn a_side_takes_frames_up_to_its_share_and_always_one_frame() {
        assert!(may_take(0, 1, 4));
        assert!(may_take(3, 1, 4));
        assert!(!may_take(4, 1, 4));
        assert!(!may_take(2, 3, 4));
        // A chain longer than the share goes when nothing else is held.
        assert!(may_take(0, 16, 4));
        assert!(!may_take(1, 16, 4));
    }
}
