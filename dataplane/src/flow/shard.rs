//! Flow ownership. Both directions of a flow must meet in one worker, so the
//! owner is a function of the direction-free [`FlowId`]: the two endpoints
//! in a canonical order. The hash is keyed per process (SipHash with random
//! keys) so a hostile sender cannot aim every flow at one worker.

use std::hash::{BuildHasher, Hash, Hasher, RandomState};

use loupe_common::{Addr, FlowKey};

/// A flow's identity regardless of direction: the lower endpoint first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowId {
    pub lo: (Addr, u16),
    pub hi: (Addr, u16),
    pub proto: u8,
}

/// Hashed as its 37 bytes in one write: every frame hashes its flow's id
/// for the flow and connection tables, and the derived `Hash` made seven
/// writes (the arrays' lengths too), about twice the time in SipHash.
/// Equal ids give equal bytes, so `Eq` and `Hash` agree.
impl Hash for FlowId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 37];
        b[..16].copy_from_slice(&self.lo.0);
        b[16..18].copy_from_slice(&self.lo.1.to_ne_bytes());
        b[18..34].copy_from_slice(&self.hi.0);
        b[34..36].copy_from_slice(&self.hi.1.to_ne_bytes());
        b[36] = self.proto;
        state.write(&b);
    }
}

impl FlowId {
    pub fn of(key: &FlowKey) -> Self {
        let a = (key.src, key.src_port);
        let b = (key.dst, key.dst_port);
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        FlowId {
            lo,
            hi,
            proto: key.proto,
        }
    }
}

/// Maps flows to workers. Cloned into every worker with the same keys.
#[derive(Clone, Debug)]
pub struct Sharder {
    hasher: RandomState,
    workers: usize,
}

impl Sharder {
    pub fn new(workers: usize) -> Self {
        Sharder {
            hasher: RandomState::new(),
            workers: workers.max(1),
        }
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn owner(&self, id: &FlowId) -> usize {
        if self.workers == 1 {
            // One worker (one queue, or one core) owns every flow: no
            // keyed hash per frame.
            return 0;
        }
        (self.hash(id) % self.workers as u64) as usize
    }

    fn hash(&self, id: &impl Hash) -> u64 {
        self.hasher.hash_one(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_common::v4_mapped;
    use proptest::prelude::*;

    fn key(a: [u8; 4], ap: u16, b: [u8; 4], bp: u16) -> FlowKey {
        FlowKey::new(v4_mapped(a), v4_mapped(b), ap, bp, 6)
    }

    proptest! {
        #[test]
        fn both_directions_have_one_owner(a: [u8; 4], ap: u16, b: [u8; 4], bp: u16, workers in 1usize..16) {
            let s = Sharder::new(workers);
            let k = key(a, ap, b, bp);
            prop_assert_eq!(FlowId::of(&k), FlowId::of(&k.reversed()));
            prop_assert_eq!(s.owner(&FlowId::of(&k)), s.owner(&FlowId::of(&k.reversed())));
            prop_assert!(s.owner(&FlowId::of(&k)) < workers);
        }
    }

    #[test]
    fn flows_spread_over_workers() {
        let s = Sharder::new(2);
        let mut per = [0usize; 2];
        for port in 0..1000u16 {
            per[s.owner(&FlowId::of(&key(
                [198, 18, 0, 1],
                30000 + port,
                [198, 18, 0, 2],
                443,
            )))] += 1;
        }
        assert!(per[0] > 350 && per[1] > 350, "{per:?}");
    }

    /// Every field of the id goes into its hash: an id changed in any
    /// one of its bytes hashes elsewhere (a dropped field would put
    /// every flow that differs only there in one bucket chain).
    #[test]
    fn every_byte_of_the_id_is_hashed() {
        let h = RandomState::new();
        let id = FlowId::of(&key([198, 18, 0, 1], 40000, [198, 18, 0, 2], 443));
        let base = h.hash_one(id);
        let mut changed = Vec::new();
        for i in 0..16 {
            let mut a = id;
            a.lo.0[i] ^= 1;
            changed.push(a);
            let mut b = id;
            b.hi.0[i] ^= 1;
            changed.push(b);
        }
        for bit in [1u16, 0x100] {
            let mut a = id;
            a.lo.1 ^= bit;
            changed.push(a);
            let mut b = id;
            b.hi.1 ^= bit;
            changed.push(b);
        }
        let mut p = id;
        p.proto = 17;
        changed.push(p);
        for c in changed {
            assert_ne!(h.hash_one(c), base, "{c:?} hashes as {id:?}");
        }
        assert_eq!(h.hash_one(id), base);
    }

    #[test]
    fn different_endpoints_are_different_flows() {
        let a = FlowId::of(&key([198, 18, 0, 1], 1, [198, 18, 0, 2], 443));
        let b = FlowId::of(&key([198, 18, 0, 1], 2, [198, 18, 0, 2], 443));
        assert_ne!(a, b);
    }
}
