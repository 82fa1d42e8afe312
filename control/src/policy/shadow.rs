//! Shadowed rules: a rule whose every connection an earlier rule matches
//! is never reached. [`covers`] judges one pair of rules; [`find`] finds,
//! for each rule, the first earlier rule that covers it without comparing
//! every pair: earlier rules are filed in indexes by one condition they
//! have (a glob's suffix, a prefix, a category, ...), and a rule is only
//! compared with the rules filed where it could be covered. A budget of
//! comparisons bounds the rest (rules that are many and alike).

use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasherDefault, Hash, Hasher},
};

use loupe_dataplane::{
    config::Prefix,
    policy::{CoverKey, HostGlob, Match, Policy, PortRange},
};

/// Whether every connection `b` matches is matched by `a` (a sound
/// under-approximation: `false` when unsure).
pub fn covers(policy: &Policy, a: &Match, b: &Match) -> bool {
    fn list<T>(a: &[T], b: &[T], covers: impl Fn(&T, &T) -> bool) -> bool {
        a.is_empty() || (!b.is_empty() && b.iter().all(|y| a.iter().any(|x| covers(x, y))))
    }
    // A's exclusions remove nothing B matches when B excludes them too.
    fn excluded<T>(a: &[T], b: &[T], covers: impl Fn(&T, &T) -> bool) -> bool {
        a.iter().all(|x| b.iter().any(|y| covers(y, x)))
    }
    let prefix = |x: &Prefix, y: &Prefix| x.v4 == y.v4 && x.covers(y);
    let (pa, pb) = (ports(policy, a), ports(policy, b));
    list(&a.src, &b.src, prefix)
        && excluded(&a.not_src, &b.not_src, prefix)
        && list(&a.dst, &b.dst, prefix)
        && excluded(&a.not_dst, &b.not_dst, prefix)
        && pb.iter().all(|y| pa.iter().any(|x| x.covers(y)))
        && excluded(&a.not_ports, &b.not_ports, |x, y| x.covers(y))
        && list(&a.sni, &b.sni, |x, y| x.covers(y))
        && excluded(&a.not_sni, &b.not_sni, |x, y| x.covers(y))
        && list(&a.categories, &b.categories, |x, y| x == y)
        && excluded(&a.not_categories, &b.not_categories, |x, y| x == y)
}

/// The ports a rule examines before its exclusions: its own, or the TLS
/// ports.
fn ports<'a>(policy: &Policy, m: &'a Match) -> std::borrow::Cow<'a, [PortRange]> {
    if m.ports.is_empty() {
        policy
            .tls_ports
            .iter()
            .map(|&p| PortRange { first: p, last: p })
            .collect::<Vec<_>>()
            .into()
    } else {
        (&m.ports[..]).into()
    }
}

/// What [`find`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Shadowing {
    /// For each rule, the first earlier rule that covers it.
    pub by: Vec<Option<usize>>,
    /// The rule at which the budget ran out: it and the rules after it
    /// were not looked at (`by` is `None` for them).
    pub stopped_at: Option<usize>,
}

/// Comparisons [`find`] may make (a unit is one pair of conditions, e.g.
/// two globs): about a second on these machines. Policies of distinct
/// rules at the limits take a small part of it.
pub const BUDGET: u64 = 200_000_000;

/// For each rule of `policy`, the first earlier rule that covers it, as
/// comparing every earlier rule with [`covers`] would find, spending at
/// most about `budget` comparisons.
pub fn find(policy: &Policy, budget: u64) -> Shadowing {
    let mut index = Index::default();
    let mut by = Vec::with_capacity(policy.rules.len());
    let mut spent = 0u64;
    let mut candidates = Vec::new();
    for (j, rule) in policy.rules.iter().enumerate() {
        let b = &rule.matcher;
        candidates.clear();
        index.candidates(policy, b, &mut candidates);
        candidates.sort_unstable();
        candidates.dedup();
        spent += candidates.len() as u64;
        if spent > budget {
            return Shadowing {
                by,
                stopped_at: Some(j),
            };
        }
        let mut found = None;
        for &i in &candidates {
            let a = &policy.rules[i].matcher;
            spent += cost(a, b);
            if spent > budget {
                return Shadowing {
                    by,
                    stopped_at: Some(j),
                };
            }
            if covers(policy, a, b) {
                found = Some(i);
                break;
            }
        }
        // A rule that is covered need not be filed: whatever it covers,
        // the rule covering it covers too, and that one comes first.
        if found.is_none() {
            index.insert(j, b);
        }
        by.push(found);
    }
    Shadowing {
        by,
        stopped_at: None,
    }
}

/// About how many comparisons `covers(a, b)` makes at most.
fn cost(a: &Match, b: &Match) -> u64 {
    let pair = |x: usize, y: usize| (x * y) as u64;
    1 + pair(a.src.len(), b.src.len())
        + pair(a.not_src.len(), b.not_src.len())
        + pair(a.dst.len(), b.dst.len())
        + pair(a.not_dst.len(), b.not_dst.len())
        + pair(a.ports.len().max(1), b.ports.len().max(1))
        + pair(a.not_ports.len(), b.not_ports.len())
        + pair(a.sni.len(), b.sni.len())
        + pair(a.not_sni.len(), b.not_sni.len())
        + pair(a.categories.len(), b.categories.len())
        + pair(a.not_categories.len(), b.not_categories.len())
}

/// Earlier rules, each filed under one condition it has: a rule `a` can
/// cover `b` only if `b` has what that condition asks (for `sni`, a glob
/// one of `a`'s covers; for `not_sni`, a glob covering `a`'s first one;
/// and so on), so looking `b` up where it could be found yields every rule
/// that may cover it, and few others.
#[derive(Default)]
struct Index {
    /// By each of their globs' [`HostGlob::cover_key`].
    sni: Multi,
    categories: Multi,
    /// By each of their prefixes' [`Prefix::key`].
    dst: Multi,
    src: Multi,
    /// By their first excluded glob's [`HostGlob::covered_by_keys`] (but
    /// [`CoverKey::ALL`]: `*` in `b` finds them all, in `not_sni_all`).
    not_sni: Multi,
    not_sni_all: Vec<usize>,
    not_categories: Multi,
    /// By their first excluded prefix's [`Prefix::covering_keys`].
    not_dst: Multi,
    not_src: Multi,
    /// By the first port of each of their ranges.
    ports: BTreeMap<u16, Vec<(u16, usize)>>,
    /// By the first port of their first excluded range.
    not_ports: BTreeMap<u16, Vec<(u16, usize)>>,
    /// Rules with no condition but the TLS ports.
    any: Vec<usize>,
}

/// Rules by a 64-bit key (a hash: two keys may meet, which only adds a
/// candidate), compactly: a policy at the limits files a million globs.
#[derive(Default)]
struct Multi {
    /// A key's newest entry and how many it has.
    heads: HashMap<u64, (u32, u32), BuildHasherDefault<Premixed>>,
    /// (rule, the key's entry before, or `u32::MAX`).
    entries: Vec<(u32, u32)>,
}

impl Multi {
    fn insert(&mut self, key: u64, rule: usize) {
        let (head, count) = self.heads.get(&key).copied().unwrap_or((u32::MAX, 0));
        if head != u32::MAX && self.entries[head as usize].0 as usize == rule {
            return;
        }
        self.entries.push((rule as u32, head));
        self.heads
            .insert(key, (self.entries.len() as u32 - 1, count + 1));
    }

    fn count(&self, key: u64) -> usize {
        self.heads.get(&key).map_or(0, |&(_, n)| n as usize)
    }

    fn get(&self, key: u64, out: &mut Vec<usize>) {
        let mut at = self.heads.get(&key).map_or(u32::MAX, |&(h, _)| h);
        while at != u32::MAX {
            let (rule, next) = self.entries[at as usize];
            out.push(rule as usize);
            at = next;
        }
    }
}

/// The keys are hashes already: a hasher that takes them as they are.
#[derive(Default)]
struct Premixed(u64);

impl Hasher for Premixed {
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; anything else is folded in.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A key for what is not a glob (a category, a prefix).
fn key(v: &impl Hash) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// A list of globs that does not match every name.
fn selective_globs(globs: &[HostGlob]) -> bool {
    !globs.is_empty() && !globs.iter().any(|g| g.cover_key() == CoverKey::ALL)
}

/// A list of prefixes that does not hold a whole family.
fn selective_prefixes(prefixes: &[Prefix]) -> bool {
    !prefixes.is_empty() && !prefixes.iter().any(|p| p.len == 0)
}

impl Index {
    fn insert(&mut self, i: usize, a: &Match) {
        if selective_globs(&a.sni) || (!a.sni.is_empty() && !other_anchor(a)) {
            for g in &a.sni {
                self.sni.insert(g.cover_key().0, i);
            }
        } else if !a.categories.is_empty() {
            for c in &a.categories {
                self.categories.insert(key(c), i);
            }
        } else if selective_prefixes(&a.dst)
            || !(a.dst.is_empty() || selective_prefixes(&a.src) || exclusion(a))
        {
            for p in &a.dst {
                self.dst.insert(key(&p.key()), i);
            }
        } else if !a.src.is_empty() && (selective_prefixes(&a.src) || !exclusion(a)) {
            for p in &a.src {
                self.src.insert(key(&p.key()), i);
            }
        } else if let Some(x) = a.not_sni.first() {
            for k in x.covered_by_keys() {
                if k != CoverKey::ALL {
                    self.not_sni.insert(k.0, i);
                }
            }
            self.not_sni_all.push(i);
        } else if let Some(c) = a.not_categories.first() {
            self.not_categories.insert(key(c), i);
        } else if let Some(p) = a.not_dst.first() {
            for k in p.covering_keys() {
                self.not_dst.insert(key(&k), i);
            }
        } else if let Some(p) = a.not_src.first() {
            for k in p.covering_keys() {
                self.not_src.insert(key(&k), i);
            }
        } else if !a.ports.is_empty() {
            for r in &a.ports {
                self.ports.entry(r.first).or_default().push((r.last, i));
            }
        } else if let Some(r) = a.not_ports.first() {
            self.not_ports.entry(r.first).or_default().push((r.last, i));
        } else {
            self.any.push(i);
        }
    }

    /// Every earlier rule filed where `b` could be covered (with repeats).
    fn candidates(&self, policy: &Policy, b: &Match, out: &mut Vec<usize>) {
        // Positive conditions: every element of `b` must be covered, so
        // the element with the fewest candidates is enough.
        let glob_keys = |g: &HostGlob| g.covered_by_keys().into_iter().map(|k| k.0).collect();
        let prefix_keys = |p: &Prefix| p.covering_keys().map(|k| key(&k)).collect();
        fewest(&b.sni, glob_keys, &self.sni, out);
        fewest(&b.categories, |c| vec![key(c)], &self.categories, out);
        fewest(&b.dst, prefix_keys, &self.dst, out);
        fewest(&b.src, prefix_keys, &self.src, out);
        // Exclusions: `a`'s first one must be covered by one of `b`'s.
        for y in &b.not_sni {
            match y.cover_key() {
                CoverKey::ALL => out.extend(&self.not_sni_all),
                k => self.not_sni.get(k.0, out),
            }
        }
        for c in &b.not_categories {
            self.not_categories.get(key(c), out);
        }
        for p in &b.not_dst {
            self.not_dst.get(key(&p.key()), out);
        }
        for p in &b.not_src {
            self.not_src.get(key(&p.key()), out);
        }
        // Ports: one of `a`'s ranges must hold `b`'s first one (if `b`
        // examines none, every range holds them all).
        let (first, last) = ports(policy, b)
            .first()
            .map_or((u16::MAX, 0), |y| (y.first, y.last));
        for (_, list) in self.ports.range(..=first) {
            out.extend(list.iter().filter(|(l, _)| *l >= last).map(|(_, i)| i));
        }
        for y in &b.not_ports {
            for (_, list) in self.not_ports.range(y.first..=y.last) {
                out.extend(list.iter().filter(|(l, _)| *l <= y.last).map(|(_, i)| i));
            }
        }
        out.extend(&self.any);
    }
}

/// Whether `a` has a condition other than `sni` to be filed under (when
/// its globs hold `*`, which would make it a candidate for every rule
/// with a name).
fn other_anchor(a: &Match) -> bool {
    !a.categories.is_empty() || !a.dst.is_empty() || !a.src.is_empty() || exclusion(a)
}

/// Whether `a` has an exclusion to be filed under.
fn exclusion(a: &Match) -> bool {
    !(a.not_sni.is_empty()
        && a.not_categories.is_empty()
        && a.not_dst.is_empty()
        && a.not_src.is_empty())
}

/// The rules filed in `map` under the keys of the element of `list` with
/// the fewest (a rule covering `b` covers each of them).
fn fewest<T>(list: &[T], keys: impl Fn(&T) -> Vec<u64>, map: &Multi, out: &mut Vec<usize>) {
    if map.entries.is_empty() {
        return;
    }
    let mut best: Option<(usize, Vec<u64>)> = None;
    for y in list {
        let k = keys(y);
        let n: usize = k.iter().map(|&k| map.count(k)).sum();
        if best.as_ref().is_none_or(|(m, _)| n < *m) {
            best = Some((n, k));
            if n == 0 {
                break;
            }
        }
    }
    for k in best.map(|(_, k)| k).unwrap_or_default() {
        map.get(k, out);
    }
}

#[cfg(test)]
mod tests {
    use loupe_dataplane::policy::{Action, Rule};

    use super::*;

    /// What comparing every earlier rule finds (the checker before the
    /// indexes): the reference [`find`] must agree with.
    fn every_pair(policy: &Policy) -> Vec<Option<usize>> {
        (0..policy.rules.len())
            .map(|j| {
                (0..j).find(|&i| covers(policy, &policy.rules[i].matcher, &policy.rules[j].matcher))
            })
            .collect()
    }

    /// A small deterministic generator (xorshift).
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// Empty half the time, else one to three of `from`.
        fn some<T: Clone>(&mut self, from: &[T]) -> Vec<T> {
            if self.below(2) == 0 {
                return Vec::new();
            }
            (0..1 + self.below(3))
                .map(|_| from[self.below(from.len())].clone())
                .collect()
        }
    }

    /// Rules drawn from small sets of globs, prefixes, ports and
    /// categories that cover one another in many ways.
    fn random_policy(seed: u64, n: usize) -> Policy {
        let globs: Vec<HostGlob> = [
            "*",
            "*.example",
            "*.a.example",
            "www.a.example",
            "a.example",
            "*.b.a.example",
            "x.b.a.example",
            "api-*.example",
            "*.api-*.example",
            "other.test",
        ]
        .iter()
        .map(|g| g.parse().unwrap())
        .collect();
        let prefixes: Vec<Prefix> = [
            "0.0.0.0/0",
            "198.18.0.0/15",
            "198.18.0.0/24",
            "198.18.0.7/32",
            "198.19.0.0/16",
            "::/0",
            "2001:2::/48",
            "2001:2::/64",
            "::ffff:198.18.0.0/120",
        ]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
        let ports: Vec<PortRange> = ["443", "8443", "8000-9000", "1-1024", "444"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let cats: Vec<String> = ["c1", "c2", "c3"].iter().map(|c| c.to_string()).collect();
        let mut g = Gen(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut p = Policy::split_all(&[443, 8443], Vec::new());
        for i in 0..n {
            // Sparse rules: most fields empty, so that rules do cover
            // one another.
            let mut m = Match::default();
            for _ in 0..1 + g.below(3) {
                match g.below(10) {
                    0 => m.sni = g.some(&globs),
                    1 => m.not_sni = g.some(&globs),
                    2 => m.dst = g.some(&prefixes),
                    3 => m.not_dst = g.some(&prefixes),
                    4 => m.src = g.some(&prefixes),
                    5 => m.not_src = g.some(&prefixes),
                    6 => m.ports = g.some(&ports),
                    7 => m.not_ports = g.some(&ports),
                    8 => m.categories = g.some(&cats),
                    _ => m.not_categories = g.some(&cats),
                }
            }
            p.rules.push(Rule {
                name: format!("r{i}"),
                matcher: m,
                action: Action::Block,
                profile: None,
                server_profile: None,
            });
        }
        p
    }

    /// The indexes find, for every rule, the same first covering rule as
    /// comparing every pair: the warnings are the same as before them.
    #[test]
    fn the_indexes_find_what_comparing_every_pair_finds() {
        let mut shadowed = 0;
        for seed in 1..=60 {
            let p = random_policy(seed, 150);
            let want = every_pair(&p);
            let got = find(&p, BUDGET);
            assert_eq!(got.stopped_at, None);
            for (j, (g, w)) in got.by.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "seed {seed}, rule {j}: {:?}", p.rules[j].matcher);
            }
            shadowed += want.iter().filter(|w| w.is_some()).count();
        }
        // Not vacuous: many rules are shadowed, by many kinds of rule.
        assert!(shadowed > 60 * 150 / 4, "{shadowed}");
    }

    /// When the budget runs out, the rules before are as found by every
    /// pair and the rest are not looked at.
    #[test]
    fn the_budget_stops_the_search_where_it_runs_out() {
        let p = random_policy(7, 200);
        let want = every_pair(&p);
        let full = find(&p, BUDGET);
        assert_eq!(full.by, want);
        let cut = find(&p, 300);
        let at = cut.stopped_at.expect("a budget of 300 runs out");
        assert!(at > 0 && at < 200, "{at}");
        assert_eq!(cut.by[..], want[..at]);
    }

    /// Many distinct rules of many globs each: each rule meets only the
    /// few rules its globs could be covered by.
    #[test]
    fn distinct_rules_are_compared_with_few_others() {
        let mut p = Policy::split_all(&[443], Vec::new());
        for r in 0..2_000 {
            let sni = (0..20)
                .map(|g| format!("h{g}.d{r}.example").parse().unwrap())
                .collect();
            p.rules.push(Rule {
                name: format!("r{r}"),
                matcher: Match {
                    sni,
                    ..Match::default()
                },
                action: Action::Block,
                profile: None,
                server_profile: None,
            });
        }
        // Every pair would cost 2000 * 2000 / 2 * 400 comparisons; with the
        // indexes none is needed, so a budget far below that is enough.
        let found = find(&p, 100_000);
        assert_eq!(found.stopped_at, None);
        assert!(found.by.iter().all(Option::is_none));
    }
}
