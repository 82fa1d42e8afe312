//! Loupe's XDP classifier, attached to both engine interfaces.
//!
//! It owns the first decision for every frame, in this order:
//! 1. flow map hit (verdict installed by userspace): bypass (DEVMAP to the
//!    peer interface), drop, or steer (AF_XDP socket of the receiving queue);
//! 2. TCP to a steered port whose server address is in a steered prefix and
//!    neither address is exempt: steer;
//! 3. QUIC (UDP to port 443) to a destination whose decryption profile
//!    blocks QUIC (so browsers fall back to TLS over TCP, which is
//!    decrypted), neither address exempt: drop;
//! 4. everything else, including every frame it cannot parse, goes to the
//!    peer interface through the DEVMAP: the in-kernel fast path.
//!
//! In step 2, a connection's opening takes the fast path too (when
//! `SETTINGS` allows): its SYN, the SYN-ACK and the client's pure ACKs
//! are recorded whole in `HANDSHAKES` and forwarded in the kernel; at the
//! client's ACK the record moves to `OPENED`, where a flood of SYNs
//! cannot push it out. The connection's first other frame (its first data, a FIN, a
//! RST, anything unexpected) is steered, and so is every frame of it from
//! then on; the worker that gets it takes the connection up from the
//! record, as if it had seen the handshake. A worker asleep then wakes
//! once per new connection, not three times.
//!
//! Malformed or truncated headers are never steered and never dropped: they
//! take the default path and are counted (`Counter::Malformed`).
//!
//! It is multi-buffer aware (`xdp.frags`): a frame longer than a page
//! (jumbo MTUs) arrives as a linear head plus fragments. The fixed headers
//! (Ethernet, VLAN tags, IP) are read from the head; IPv6 extension headers
//! and the transport header always through `bpf_xdp_load_bytes`, which
//! reads across the fragments (a long extension chain can reach past the
//! head). Lengths are checked against the whole frame
//! (`bpf_xdp_get_buff_len`), so a jumbo segment is classified like any
//! other, and AF_XDP sockets bound with `XDP_USE_SG` take it whole.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    },
    macros::{map, xdp},
    maps::{lpm_trie::Key, Array, DevMap, HashMap, LpmTrie, LruHashMap, PerCpuArray, XskMap},
    programs::XdpContext,
};
use loupe_common::{
    setting, v4_mapped, verdict, Addr, Counter, CounterValue, FlowKey, Handshake, IfaceInfo,
    COUNTER_COUNT, HANDSHAKE_FRAME_MAX, MAX_FLOWS, MAX_HANDSHAKES, MAX_IFACES, MAX_PREFIXES,
    MAX_QUEUES, MAX_STEER_PORTS,
};

#[map]
static IFACES: HashMap<u32, IfaceInfo> = HashMap::with_max_entries(MAX_IFACES, 0);
#[map]
static PEERS: DevMap = DevMap::with_max_entries(MAX_IFACES, 0);
#[map]
static XSKS: XskMap = XskMap::with_max_entries(MAX_IFACES * MAX_QUEUES, 0);
#[map]
static FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static STEER_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_STEER_PORTS, 0);
#[map]
static STEER_PREFIXES: LpmTrie<Addr, u8> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map]
static EXEMPT_PREFIXES: LpmTrie<Addr, u8> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map]
static QUIC_BLOCK: LpmTrie<Addr, u8> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
/// Connections between their SYN and the client's ACK (a SYN flood churns
/// these), and between that ACK and their first steered frame (these only
/// connections that completed a handshake can fill).
#[map]
static HANDSHAKES: LruHashMap<FlowKey, Handshake> = LruHashMap::with_max_entries(MAX_HANDSHAKES, 0);
#[map]
static OPENED: LruHashMap<FlowKey, Handshake> = LruHashMap::with_max_entries(MAX_HANDSHAKES, 0);
/// Where a new [`Handshake`] is put together (too large for the stack).
#[map]
static SCRATCH: PerCpuArray<Handshake> = PerCpuArray::with_max_entries(1, 0);
/// One value per CPU to pass a length through: see [`opaque`].
#[map]
static OPAQUE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
#[map]
static SETTINGS: Array<u32> = Array::with_max_entries(setting::COUNT, 0);
#[map]
static COUNTERS: PerCpuArray<CounterValue> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// IPv6 extension headers walked before giving up (RFC 8200 section 4.1
/// recommends an order with at most one of each, plus destination options
/// twice).
const MAX_IPV6_EXT: usize = 6;
/// Where the transport header may start, at most: a guard above the
/// longest chain walked (two VLAN tags, IPv6, six extension headers of up
/// to 2 KB: 12,350 bytes), never reached by one. Lower, a valid chain would
/// be passed as malformed, past inspection.
const MAX_L4_OFFSET: usize = 16384;

/// What the classifier decided, and which outcome counter records it.
enum Class {
    Pass(Counter),
    Steer(Counter),
    Drop(Counter),
}

#[xdp(frags)]
pub fn loupe_xdp(ctx: XdpContext) -> u32 {
    let len = frame_len(&ctx) as u64;
    count(Counter::Rx, len);
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: IFACES is written only by userspace at start-up; a racing
    // update would at worst give a stale slot for one frame.
    let Some(iface) = (unsafe { IFACES.get(ifindex) }) else {
        count(Counter::UnknownIface, len);
        return xdp_action::XDP_PASS;
    };
    let slot = iface.slot;
    match classify(&ctx, len, slot) {
        Class::Pass(c) => forward(slot, c, len),
        Class::Drop(c) => {
            count(c, len);
            xdp_action::XDP_DROP
        }
        Class::Steer(c) => {
            let queue = ctx.rx_queue_index();
            if queue < MAX_QUEUES {
                if let Ok(action) = XSKS.redirect(slot * MAX_QUEUES + queue, 0) {
                    count(c, len);
                    return action;
                }
            }
            forward(slot, Counter::SteerNoSocket, len)
        }
    }
}

/// The default path: DEVMAP redirect to the peer of the ingress interface.
#[inline(always)]
fn forward(slot: u32, outcome: Counter, len: u64) -> u32 {
    match PEERS.redirect(slot, 0) {
        Ok(action) => {
            count(outcome, len);
            action
        }
        Err(_) => {
            count(Counter::NoPeer, len);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn count(c: Counter, len: u64) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, this program is its only writer on this CPU.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += len;
        }
    }
}

/// The whole frame's length: the linear head and any fragments.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    // SAFETY: `ctx.ctx` is the program's own context pointer.
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) as usize }
}

/// `N` bytes of the frame's linear head at `off`, or `None` when the head
/// is shorter: for the fixed headers at the front of every frame.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, off: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    if start + off + N > ctx.data_end() {
        return None;
    }
    // SAFETY: the range [start+off, start+off+N) was just checked to lie
    // inside the packet; [u8; N] has no alignment requirement.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const [u8; N]) })
}

/// `N` bytes of the frame at `off` wherever they lie, the fragments of a
/// multi-buffer frame included, or `None` when the frame is shorter: for
/// the headers after a variable-length chain (IPv6 extension headers can
/// reach past the linear head). One path for the verifier, not two.
#[inline(always)]
fn bytes_anywhere<const N: usize>(ctx: &XdpContext, off: usize) -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    // SAFETY: the helper writes at most N bytes into `buf`, which holds N.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            off as u32,
            buf.as_mut_ptr() as *mut aya_ebpf::cty::c_void,
            N as u32,
        )
    };
    (rc == 0).then_some(buf)
}

#[inline(always)]
fn in_prefixes(trie: &LpmTrie<Addr, u8>, addr: Addr) -> bool {
    trie.get(Key::new(128, addr)).is_some()
}

/// Network layer facts needed to classify the transport header.
struct L3 {
    src: Addr,
    dst: Addr,
    /// TCP or UDP.
    proto: u8,
    /// Offset of the transport header.
    l4: usize,
    /// End of the IP payload (frames may carry Ethernet padding after it).
    l4_end: usize,
    /// The first fragment of a datagram (more follow): its transport
    /// header is there, the rest of the segment is not.
    first_fragment: bool,
}

#[inline(always)]
fn classify(ctx: &XdpContext, len: u64, slot: u32) -> Class {
    let Some(eth) = bytes::<ETH_HLEN>(ctx, 0) else {
        return Class::Pass(Counter::Malformed);
    };
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let mut off = ETH_HLEN;
    let mut vlan = false;
    // 802.1Q, or 802.1ad outer + 802.1Q inner (QinQ).
    for _ in 0..2 {
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let Some(tag) = bytes::<4>(ctx, off) else {
                return Class::Pass(Counter::Malformed);
            };
            ethertype = u16::from_be_bytes([tag[2], tag[3]]);
            off += 4;
            vlan = true;
        }
    }
    if vlan {
        count(Counter::Vlan, len);
    }
    // A third tag: not walked, and a receiver that strips three may find
    // a steered connection's segment under it.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Class::Drop(Counter::Unclassifiable);
    }
    let l3 = match ethertype {
        ETH_P_IPV4 => ipv4(ctx, off, len),
        ETH_P_IPV6 => ipv6(ctx, off, len),
        _ => return Class::Pass(Counter::PassNonIp),
    };
    match l3 {
        Ok(l3) if l3.proto == IPPROTO_UDP => udp(ctx, l3),
        Ok(l3) => tcp(ctx, l3, slot),
        Err(class) => class,
    }
}

/// RFC 791 section 3.1 header checks.
#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize, len: u64) -> Result<L3, Class> {
    let whole = len as usize;
    let h = bytes::<20>(ctx, off).ok_or(Class::Pass(Counter::Malformed))?;
    if h[0] >> 4 != 4 {
        return Err(Class::Pass(Counter::Malformed));
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    if ihl < 20 || total < ihl || off + total > whole {
        return Err(Class::Pass(Counter::Malformed));
    }
    // More-fragments flag or a non-zero fragment offset. A later
    // fragment cannot complete its datagram without the first, which is
    // judged by its ports (TCP only: the rest cannot reach a split).
    let frag = u16::from_be_bytes([h[6], h[7]]) & 0x3fff;
    let first_fragment = frag == 0x2000 && h[9] == IPPROTO_TCP;
    if frag != 0 && !first_fragment {
        return Err(Class::Pass(Counter::Fragment));
    }
    if h[9] != IPPROTO_TCP && h[9] != IPPROTO_UDP {
        return Err(Class::Pass(Counter::PassNonTcp));
    }
    Ok(L3 {
        src: v4_mapped([h[12], h[13], h[14], h[15]]),
        dst: v4_mapped([h[16], h[17], h[18], h[19]]),
        proto: h[9],
        l4: off + ihl,
        l4_end: off + total,
        first_fragment,
    })
}

/// RFC 8200 sections 3 and 4: fixed header, then the extension header chain.
#[inline(always)]
fn ipv6(ctx: &XdpContext, off: usize, len: u64) -> Result<L3, Class> {
    let whole = len as usize;
    let h = bytes::<40>(ctx, off).ok_or(Class::Pass(Counter::Malformed))?;
    if h[0] >> 4 != 6 {
        return Err(Class::Pass(Counter::Malformed));
    }
    let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
    let l4_end = off + 40 + payload;
    if l4_end > whole {
        return Err(Class::Pass(Counter::Malformed));
    }
    // IPv4-mapped addresses never appear in IPv6 packets on the wire (RFC
    // 4291 section 2.5.5.2); here they would alias IPv4 flows and prefixes.
    if is_v4_mapped(&h, 8) || is_v4_mapped(&h, 24) {
        return Err(Class::Pass(Counter::Malformed));
    }
    let mut next = h[6];
    let mut l4 = off + 40;
    let mut ext = false;
    let mut first_fragment = false;
    for i in 0..MAX_IPV6_EXT {
        match next {
            // Hop-by-hop options only directly after the IPv6 header (RFC
            // 8200 section 4.3).
            0 if i > 0 => return Err(odd(first_fragment, Counter::Malformed)),
            // Hop-by-hop, routing, destination options: length in 8-octet
            // units, not counting the first 8.
            0 | 43 | 60 => {
                let e =
                    bytes_anywhere::<2>(ctx, l4).ok_or(odd(first_fragment, Counter::Malformed))?;
                next = e[0];
                l4 += (e[1] as usize + 1) * 8;
            }
            // Fragment header: fixed 8 octets.
            44 => {
                let e =
                    bytes_anywhere::<8>(ctx, l4).ok_or(odd(first_fragment, Counter::Malformed))?;
                // Offset or M flag set: not an atomic fragment. The first
                // (offset 0, more follow) is judged by its ports, as for
                // IPv4; a later one cannot complete without it.
                let frag = u16::from_be_bytes([e[2], e[3]]) & 0xfff9;
                if frag == 1 && !first_fragment {
                    first_fragment = true;
                } else if frag != 0 {
                    return Err(odd(first_fragment, Counter::Fragment));
                }
                next = e[0];
                l4 += 8;
            }
            // Authentication header (RFC 4302): length in 4-octet units minus 2.
            51 => {
                let e =
                    bytes_anywhere::<2>(ctx, l4).ok_or(odd(first_fragment, Counter::Malformed))?;
                next = e[0];
                l4 += (e[1] as usize + 2) * 4;
            }
            _ => break,
        }
        ext = true;
        if l4 > l4_end {
            return Err(odd(first_fragment, Counter::Malformed));
        }
        // Well formed, but further than the transport header is read: the
        // receiver may find a steered connection's segment there.
        if l4 > MAX_L4_OFFSET {
            return Err(Class::Drop(Counter::Unclassifiable));
        }
    }
    if ext {
        count(Counter::Ipv6Ext, len);
    }
    if matches!(next, 0 | 43 | 44 | 51 | 60) {
        // Longer chain than we walk (RFC 8200 §4.1's order has at most
        // six before TCP): the receiver would walk on and may find a
        // steered connection's segment, unseen here. Dropped.
        return Err(Class::Drop(Counter::Unclassifiable));
    }
    if first_fragment && next != IPPROTO_TCP {
        return Err(Class::Pass(Counter::Fragment));
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return Err(Class::Pass(Counter::PassNonTcp));
    }
    Ok(L3 {
        proto: next,
        src: [
            h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15], h[16], h[17], h[18], h[19],
            h[20], h[21], h[22], h[23],
        ],
        dst: [
            h[24], h[25], h[26], h[27], h[28], h[29], h[30], h[31], h[32], h[33], h[34], h[35],
            h[36], h[37], h[38], h[39],
        ],
        l4,
        l4_end,
        first_fragment,
    })
}

/// A frame the program cannot classify: forwarded (counted `why`), unless
/// it is the first fragment of a datagram, whose TCP a receiver might
/// reassemble from later fragments out of sight (RFC 8200 §4.5 asks that
/// the first carry the whole chain; not every stack drops one that does
/// not).
#[inline(always)]
fn odd(first_fragment: bool, why: Counter) -> Class {
    if first_fragment {
        Class::Drop(Counter::Unclassifiable)
    } else {
        Class::Pass(why)
    }
}

/// Whether the 16 bytes at `at` are `::ffff:0:0/96`.
#[inline(always)]
fn is_v4_mapped(h: &[u8; 40], at: usize) -> bool {
    h[at..at + 10].iter().all(|b| *b == 0) && h[at + 10] == 0xff && h[at + 11] == 0xff
}

/// QUIC (RFC 9000) runs over UDP, port 443 for HTTP/3 (RFC 9114 §3.1).
const QUIC_PORT: u16 = 443;

/// UDP: QUIC to a destination whose decryption profile blocks it is
/// dropped; everything else UDP takes the fast path.
#[inline(always)]
fn udp(ctx: &XdpContext, l3: L3) -> Class {
    if l3.l4 + 8 > l3.l4_end {
        return Class::Pass(Counter::Malformed);
    }
    let Some(u) = bytes_anywhere::<8>(ctx, l3.l4) else {
        return Class::Pass(Counter::Malformed);
    };
    let dst_port = u16::from_be_bytes([u[2], u[3]]);
    if dst_port != QUIC_PORT || !in_prefixes(&QUIC_BLOCK, l3.dst) {
        return Class::Pass(Counter::PassNonTcp);
    }
    if in_prefixes(&EXEMPT_PREFIXES, l3.src) || in_prefixes(&EXEMPT_PREFIXES, l3.dst) {
        return Class::Pass(Counter::PassExempt);
    }
    Class::Drop(Counter::QuicDrop)
}

/// The first fragment of a TCP segment: forwarded unless it belongs to a
/// steered connection (its flow-map verdict, or the steering maps), whose
/// receiver would reassemble bytes the engine never saw. Dropped, its
/// datagram never completes (RFC 8200 §4.5 and RFC 791 need every
/// fragment); so is one too short to show its ports (RFC 1858's tiny
/// fragment).
#[inline(always)]
fn tcp_first_fragment(ctx: &XdpContext, l3: &L3) -> Class {
    if l3.l4 > MAX_L4_OFFSET || l3.l4 + 4 > l3.l4_end {
        return Class::Drop(Counter::Unclassifiable);
    }
    let Some(p) = bytes_anywhere::<4>(ctx, l3.l4) else {
        return Class::Drop(Counter::Unclassifiable);
    };
    let src_port = u16::from_be_bytes([p[0], p[1]]);
    let dst_port = u16::from_be_bytes([p[2], p[3]]);
    let key = FlowKey::new(l3.src, l3.dst, src_port, dst_port, IPPROTO_TCP);
    // A steer or drop verdict: the engine has the connection. A bypass
    // counts for nothing here: the fragment may be a new SYN on its ports
    // (which takes a bypass away, and whose flags this one may not show).
    // SAFETY: the value is copied out at once.
    if let Some(verdict::DROP | verdict::STEER) = unsafe { FLOWS.get(key) }.copied() {
        return Class::Drop(Counter::Unclassifiable);
    }
    match not_steered(l3, src_port, dst_port) {
        None => Class::Drop(Counter::Unclassifiable),
        Some(_) => Class::Pass(Counter::Fragment),
    }
}

/// Why TCP between these ports of `l3`'s addresses is not for the
/// workers (its pass counter), or `None` when it is: a steered port on
/// the server's side, the server's address in the steered prefixes and
/// neither address exempt.
#[inline(always)]
fn not_steered(l3: &L3, src_port: u16, dst_port: u16) -> Option<Counter> {
    // The server's address is the destination of client-to-server frames
    // and the source of the replies: both directions steer alike.
    let to_server = STEER_PORTS.get_ptr(dst_port).is_some();
    let from_server = STEER_PORTS.get_ptr(src_port).is_some();
    if !to_server && !from_server {
        return Some(Counter::PassTcp);
    }
    let server_steered = (to_server && in_prefixes(&STEER_PREFIXES, l3.dst))
        || (from_server && in_prefixes(&STEER_PREFIXES, l3.src));
    if !server_steered {
        return Some(Counter::PassTcp);
    }
    if in_prefixes(&EXEMPT_PREFIXES, l3.src) || in_prefixes(&EXEMPT_PREFIXES, l3.dst) {
        return Some(Counter::PassExempt);
    }
    None
}

#[inline(always)]
fn tcp(ctx: &XdpContext, l3: L3, slot: u32) -> Class {
    if l3.first_fragment {
        return tcp_first_fragment(ctx, &l3);
    }
    if l3.l4 > MAX_L4_OFFSET {
        return Class::Pass(Counter::Malformed);
    }
    let Some(t) = bytes_anywhere::<20>(ctx, l3.l4) else {
        return Class::Pass(Counter::Malformed);
    };
    // RFC 9293 section 3.1: data offset counts 32-bit words, at least 5.
    let doff = ((t[12] >> 4) as usize) * 4;
    if doff < 20 || l3.l4 + doff > l3.l4_end {
        return Class::Pass(Counter::Malformed);
    }
    let src_port = u16::from_be_bytes([t[0], t[1]]);
    let dst_port = u16::from_be_bytes([t[2], t[3]]);
    let key = FlowKey::new(l3.src, l3.dst, src_port, dst_port, IPPROTO_TCP);
    // A SYN without ACK opens a new connection: an earlier connection's
    // bypass on the same ports must not exempt it from inspection.
    let new_conn = t[13] & 0x12 == 0x02;
    // Whether a verdict for earlier traffic on these ports was found: the
    // worker may still hold state for it, so a new connection here is
    // steered whole (its handshake too) for the worker to start afresh.
    let mut reused = false;
    // SAFETY: the value is copied out at once; a concurrent update from
    // userspace yields either the old or the new verdict.
    if let Some(v) = unsafe { FLOWS.get(key) } {
        match *v {
            verdict::BYPASS if !new_conn => return Class::Pass(Counter::FlowBypass),
            verdict::BYPASS => {
                // A new connection on the ports of a bypassed one: the old
                // verdict goes, both ways, or the new connection's replies
                // would take the fast path before it is decided (a client
                // could get a connection past the policy by reusing the
                // ports of an exempt one). Gone already is fine.
                let _ = FLOWS.remove(key);
                let _ = FLOWS.remove(key.reversed());
                reused = true;
            }
            verdict::DROP => return Class::Drop(Counter::FlowDrop),
            verdict::STEER => return Class::Steer(Counter::FlowSteer),
            _ => {}
        }
    }
    if let Some(c) = not_steered(&l3, src_port, dst_port) {
        return Class::Pass(c);
    }
    if reused {
        return Class::Steer(Counter::Steer);
    }
    handshake(ctx, &l3, &t, doff, key, slot)
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;

/// A steered connection before its first data (see the module note): the
/// SYN is recorded and forwarded; the SYN-ACK that acknowledges it is
/// recorded beside it and forwarded; so are the client's pure ACKs after
/// it (the last one recorded).
/// Anything else, or a frame too long to record, is steered, and marks the
/// record so that the rest of the connection is too.
#[inline(always)]
fn handshake(
    ctx: &XdpContext,
    l3: &L3,
    t: &[u8; 20],
    doff: usize,
    key: FlowKey,
    slot: u32,
) -> Class {
    let on = SETTINGS
        .get(setting::HANDSHAKE_FAST_PATH)
        .is_some_and(|v| *v != 0);
    if !on {
        return Class::Steer(Counter::Steer);
    }
    // ECE, CWR and PSH do not matter here; the rest say what the frame is.
    let control = t[13] & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK | TCP_URG);
    let empty = l3.l4 + doff == l3.l4_end;
    // The record, under the key of this frame (from the client) or the
    // reversed one (from the server); in OPENED once the client's ACK came.
    let mut from_client = true;
    let mut opened = false;
    let mut rec = HANDSHAKES.get_ptr_mut(key);
    if rec.is_none() {
        from_client = false;
        rec = HANDSHAKES.get_ptr_mut(key.reversed());
    }
    if rec.is_none() {
        (from_client, opened) = (true, true);
        rec = OPENED.get_ptr_mut(key);
    }
    if rec.is_none() {
        from_client = false;
        rec = OPENED.get_ptr_mut(key.reversed());
    }
    if empty && control == TCP_SYN && (rec.is_none() || from_client) {
        let isn = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
        // SAFETY: a value of this map, read in place (a racing update of
        // the same connection gives one or the other's fields).
        let known = rec.map(|r| unsafe {
            (
                (*r).steered,
                (*r).isn,
                u32::from((*r).client_slot),
                (*r).synack_len,
            )
        });
        let passed = match (known, rec) {
            // From the server's side: the worker's to judge.
            (Some((_, _, client, _)), _) if client != slot => false,
            // The client resends its SYN: the record stands (its SYN-ACK
            // too, if the server's came), the SYN's copy renewed (the
            // first may have been corrupt).
            (Some((0, recorded, _, _)), Some(r)) if recorded == isn => {
                // SAFETY: as above.
                let r = unsafe { &mut *r };
                if record_frame(ctx, l3.l4_end, &mut r.syn) {
                    r.syn_len = l3.l4_end as u16;
                }
                true
            }
            // Another ISN once the server answered: a synchronized server
            // answers it with a challenge ACK and goes on (RFC 5961
            // §4.2), and so does the record. Steered, the worker would
            // have taken this SYN for the connection's.
            (Some((0, _, _, synack)), _) if synack != 0 => true,
            // A new connection on these ports, or the first.
            (Some((0, _, _, _)), _) | (None, _) => record_syn(ctx, l3.l4_end, isn, &key, slot),
            // The worker has the connection: it gets this SYN too.
            (Some(_), _) => false,
        };
        if passed {
            return Class::Pass(Counter::Handshake);
        }
        return Class::Steer(Counter::Steer);
    }
    let Some(rec) = rec else {
        return Class::Steer(Counter::Steer);
    };
    // SAFETY: as above; the program is the record's only writer once
    // it exists, and userspace only reads it.
    let rec = unsafe { &mut *rec };
    // Each end's frames come in on its own side; one from the other side
    // (spoofed, or looped) is the worker's to judge.
    let right_side = (u32::from(rec.client_slot) == slot) == from_client;
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
    if rec.steered == 0 && empty && right_side {
        if control == TCP_SYN | TCP_ACK && !from_client && rec.synack_len == 0 {
            if ack == rec.isn.wrapping_add(1) && record_frame(ctx, l3.l4_end, &mut rec.synack) {
                // A corrupt SYN-ACK would make the record unusable (and
                // the connection pass uninspected): it goes on without
                // being recorded, the client drops it, and the server's
                // next one is recorded.
                if !tcp_checksum_ok(&rec.synack, l3) {
                    return Class::Pass(Counter::Malformed);
                }
                rec.s_isn = seq;
                rec.synack_len = l3.l4_end as u16;
                return Class::Pass(Counter::Handshake);
            }
        } else if control == TCP_ACK
            && from_client
            && rec.synack_len != 0
            && seq == rec.isn.wrapping_add(1)
            && ack == rec.s_isn.wrapping_add(1)
        {
            // Only the handshake's own ACK (or its repeats and window
            // updates): a keepalive probe or a stray ACK goes to the
            // worker, which would not have taken it as the handshake's.
            // The last one stands: the worker continues from what it said.
            if record_frame(ctx, l3.l4_end, &mut rec.ack) {
                rec.ack_len = l3.l4_end as u16;
                // Opened: out of reach of a SYN flood from here on. The
                // record is copied map to map (by reference: a copy on
                // the stack would not fit the 512 bytes BPF has).
                #[allow(clippy::needless_borrows_for_generic_args)]
                let moved = opened || (OPENED.insert(key, &*rec, 0).is_ok() && remove(key));
                if moved {
                    return Class::Pass(Counter::Handshake);
                }
            }
        }
    }
    // A SYN (the server's own, in a simultaneous open) leaves the record
    // unmarked: the worker then judges it against the recorded opening
    // rather than take it for the connection's first.
    if control != TCP_SYN {
        rec.steered = 1;
    }
    Class::Steer(Counter::Steer)
}

/// Forgets the half-open record under `key`; true either way (gone
/// already is fine: the record is in OPENED now).
#[inline(always)]
fn remove(key: FlowKey) -> bool {
    let _ = HANDSHAKES.remove(key);
    true
}

/// `v`, with what the verifier knows of it forgotten: a value read back
/// from a map is any value. A frame's length reaches the handshake code
/// with a different known range down each path through the headers (IPv4
/// options, each IPv6 extension header); as a helper's size it must be
/// tracked precisely, and the verifier would walk the code once per range
/// (past its limit). Forgotten here and bounded again by the caller, the
/// paths meet. `None` when the map gives no slot (never: one per CPU).
#[inline(always)]
fn opaque(v: usize) -> Option<usize> {
    let slot = OPAQUE.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; the program does not nest on a CPU.
    unsafe {
        core::ptr::write_volatile(slot, v as u32);
        Some(core::ptr::read_volatile(slot) as usize)
    }
}

/// Records a SYN of `len` bytes as a new [`Handshake`]: false when it is
/// too long or the map refuses it (then the SYN is steered).
#[inline(always)]
fn record_syn(ctx: &XdpContext, len: usize, isn: u32, key: &FlowKey, slot: u32) -> bool {
    let Some(h) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch slot; the program does not nest on a CPU.
    let h = unsafe { &mut *h };
    if !record_frame(ctx, len, &mut h.syn) {
        return false;
    }
    // SAFETY: a helper without arguments.
    h.syn_ns = unsafe { bpf_ktime_get_ns() };
    h.isn = isn;
    h.s_isn = 0;
    h.client_slot = slot as u8;
    h.syn_len = len as u16;
    h.synack_len = 0;
    h.ack_len = 0;
    h.steered = 0;
    // A record of an earlier connection on these ports goes.
    let _ = OPENED.remove(key);
    HANDSHAKES.insert(key, h, 0).is_ok()
}

/// Whether the TCP segment of a recorded frame (`l3.l4` to `l3.l4_end`)
/// checks with its pseudo-header (RFC 9293 §3.1, RFC 1071: the 1's
/// complement sum over both, checksum field included, is all ones).
/// IPv4 addresses are summed in their mapped form: its 0xffff words are
/// 1's complement zeros.
#[inline(always)]
fn tcp_checksum_ok(frame: &[u8; HANDSHAKE_FRAME_MAX], l3: &L3) -> bool {
    let (Some(at), Some(end)) = (opaque(l3.l4), opaque(l3.l4_end)) else {
        return false;
    };
    if at >= end || end > HANDSHAKE_FRAME_MAX {
        return false;
    }
    let mut sum: u64 = u64::from(IPPROTO_TCP) + (end - at) as u64;
    let mut i = 0;
    while i < 16 {
        sum += u64::from(u16::from_be_bytes([l3.src[i], l3.src[i + 1]]));
        sum += u64::from(u16::from_be_bytes([l3.dst[i], l3.dst[i + 1]]));
        i += 2;
    }
    let mut off = at;
    for _ in 0..HANDSHAKE_FRAME_MAX / 2 {
        if off >= end {
            break;
        }
        let (Some(&hi), lo) = (frame.get(off), frame.get(off + 1)) else {
            break;
        };
        // An odd last byte is padded with a zero.
        let lo = if off + 1 < end {
            lo.copied().unwrap_or(0)
        } else {
            0
        };
        sum += u64::from(u16::from_be_bytes([hi, lo]));
        off += 2;
    }
    // At most 2 + 80 words of 16 bits: two folds leave 16 bits (a loop
    // until no carry is left would be one the verifier cannot bound).
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// Copies the frame, `len` bytes, into `into`: false when it is longer.
#[inline(always)]
fn record_frame(ctx: &XdpContext, len: usize, into: &mut [u8; HANDSHAKE_FRAME_MAX]) -> bool {
    let Some(len) = opaque(len) else {
        return false;
    };
    if len == 0 || len > HANDSHAKE_FRAME_MAX {
        return false;
    }
    // SAFETY: at most `len` <= HANDSHAKE_FRAME_MAX bytes into `into`.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            0,
            into.as_mut_ptr() as *mut aya_ebpf::cty::c_void,
            len as u32,
        )
    };
    rc == 0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: nothing in this program can panic (no indexing without
    // bounds, no unwrap); the verifier would reject an unreachable loop.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
