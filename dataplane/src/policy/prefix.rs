//! Address prefixes, IPv4 or IPv6, as rules and steering name them. The
//! maps store IPv4 as IPv4-mapped IPv6, so one key type and one trie serve
//! both families.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use loupe_common::{v4_mapped, Addr, V4_MAPPED_PREFIX_BITS};
use thiserror::Error;

/// A prefix that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad prefix '{input}': {reason} (expected e.g. 198.18.0.0/15 or 2001:2::/48)")]
pub struct BadPrefix {
    pub input: String,
    pub reason: String,
}

/// An IPv4 or IPv6 prefix; host bits are cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// Address as stored in the maps (IPv4 as IPv4-mapped IPv6).
    pub addr: Addr,
    /// Prefix length in the address family's own terms (0-32 or 0-128).
    pub len: u8,
    pub v4: bool,
}

impl Prefix {
    /// Prefix length in the IPv4-mapped IPv6 space the maps use.
    pub fn mapped_len(&self) -> u32 {
        if self.v4 {
            V4_MAPPED_PREFIX_BITS + self.len as u32
        } else {
            self.len as u32
        }
    }
}

impl FromStr for Prefix {
    type Err = BadPrefix;

    fn from_str(s: &str) -> Result<Self, BadPrefix> {
        let err = |reason: &str| BadPrefix {
            input: s.into(),
            reason: reason.into(),
        };
        let (addr, len) = match s.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s.trim(), None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| err("not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len {
            Some(l) => l
                .parse()
                .map_err(|_| err("prefix length is not a number"))?,
            None => max,
        };
        if len > max {
            return Err(err(&format!("prefix length {len} exceeds {max}")));
        }
        Ok(match ip {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4) & mask32(len);
                Prefix {
                    addr: v4_mapped(Ipv4Addr::from(bits).octets()),
                    len,
                    v4: true,
                }
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & mask128(len);
                Prefix {
                    addr: Ipv6Addr::from(bits).octets(),
                    len,
                    v4: false,
                }
            }
        })
    }
}

fn mask32(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len as u32)
    }
}

fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - len as u32)
    }
}

impl Prefix {
    /// Whether `addr` (as stored in the maps) lies in this prefix. An IPv6
    /// prefix shorter than the IPv4-mapped block (`::/0`, `2000::/3`) never
    /// contains IPv4 addresses: a rule's `::/0` means every IPv6 address.
    pub fn contains(&self, addr: &Addr) -> bool {
        if !self.v4 && self.len < 96 && addr[..12] == v4_mapped([0; 4])[..12] {
            return false;
        }
        let bits = self.mapped_len() as usize;
        let (whole, rest) = (bits / 8, bits % 8);
        if self.addr[..whole] != addr[..whole] {
            return false;
        }
        rest == 0 || {
            let mask = 0xffu8 << (8 - rest);
            self.addr[whole] & mask == addr[whole] & mask
        }
    }

    /// Whether every address of `other` lies in this prefix.
    pub fn covers(&self, other: &Prefix) -> bool {
        self.mapped_len() <= other.mapped_len() && self.contains(&other.addr)
    }

    /// This prefix as a lookup key: family, length in the mapped space,
    /// address (host bits clear).
    pub fn key(&self) -> PrefixKey {
        (self.v4, self.mapped_len(), self.addr)
    }

    /// The keys of every prefix of the same family that may cover this
    /// one: its address cut at each length up to its own. A prefix of
    /// that family that [`covers`](Prefix::covers) this one has its
    /// [`key`](Prefix::key) among them, so a map of prefixes by key finds
    /// the covering ones in at most 129 lookups instead of a scan.
    pub fn covering_keys(&self) -> impl Iterator<Item = PrefixKey> + '_ {
        let shortest = if self.v4 { V4_MAPPED_PREFIX_BITS } else { 0 };
        (shortest..=self.mapped_len()).map(move |bits| (self.v4, bits, masked(&self.addr, bits)))
    }
}

/// A prefix as a map key (see [`Prefix::key`]).
pub type PrefixKey = (bool, u32, Addr);

/// `addr` with every bit after the first `bits` cleared.
fn masked(addr: &Addr, bits: u32) -> Addr {
    let mut out = [0u8; 16];
    let (whole, rest) = ((bits / 8) as usize, bits % 8);
    out[..whole].copy_from_slice(&addr[..whole]);
    if rest != 0 {
        out[whole] = addr[whole] & (0xffu8 << (8 - rest));
    }
    out
}

impl serde::Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v6 = Ipv6Addr::from(self.addr);
        match (self.v4, v6.to_ipv4_mapped()) {
            (true, Some(v4)) => write!(f, "{v4}/{}", self.len),
            _ => write!(f, "{v6}/{}", self.len),
        }
    }
}

/// Every address of both families.
pub fn default_steer_prefixes() -> Vec<Prefix> {
    vec![
        Prefix::from_str("0.0.0.0/0").expect("literal"),
        Prefix::from_str("::/0").expect("literal"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_prefix_is_mapped_and_masked() {
        let p: Prefix = "198.19.7.9/15".parse().unwrap();
        assert_eq!(p.to_string(), "198.18.0.0/15");
        assert_eq!(p.mapped_len(), 111);
        assert_eq!(&p.addr[10..], &[0xff, 0xff, 198, 18, 0, 0]);
    }

    #[test]
    fn v6_prefix_and_bare_address() {
        let p: Prefix = "2001:2::1/48".parse().unwrap();
        assert_eq!(p.to_string(), "2001:2::/48");
        let h: Prefix = "2001:2::1".parse().unwrap();
        assert_eq!(h.len, 128);
        let z: Prefix = "0.0.0.0/0".parse().unwrap();
        assert_eq!(z.mapped_len(), 96);
    }

    #[test]
    fn bad_prefixes_say_why() {
        for (input, why) in [
            ("198.18.0.0/33", "exceeds 32"),
            ("2001:2::/129", "exceeds 128"),
            ("bogus/8", "not an IP address"),
            ("10.0.0.0/x", "not a number"),
        ] {
            let e = input.parse::<Prefix>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(input), "{input}: {e}");
        }
    }

    #[test]
    fn containment_v4_and_v6() {
        let p: Prefix = "198.18.0.0/15".parse().unwrap();
        let a = |s: &str| s.parse::<Prefix>().unwrap().addr;
        assert!(p.contains(&a("198.19.255.255")));
        assert!(!p.contains(&a("198.20.0.0")));
        assert!(p.contains(&a("::ffff:c612:1")));
        let all6: Prefix = "::/0".parse().unwrap();
        assert!(all6.contains(&a("2001:2::1")) && !all6.contains(&a("198.18.0.1")));
        let v6: Prefix = "2001:2::/48".parse().unwrap();
        assert!(v6.contains(&a("2001:2::9")));
        assert!(!v6.contains(&a("2001:2:1::9")));
        // IPv4 prefixes never match IPv6 addresses, and ::/0 does not
        // stand for IPv4 by accident of the mapping in /0 only.
        assert!(!p.contains(&a("2001:2::1")));
        let all4: Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all4.contains(&a("198.18.0.1")) && !all4.contains(&a("2001:2::1")));
        assert!(p.covers(&"198.18.5.0/24".parse().unwrap()));
        assert!(!"198.18.5.0/24".parse::<Prefix>().unwrap().covers(&p));
        let a9: Prefix = "198.18.0.9/31".parse().unwrap();
        assert!(a9.contains(&a("198.18.0.8")) && !a9.contains(&a("198.18.0.10")));
    }

    /// Every prefix of a family that covers another has its key among
    /// the other's covering keys; one that does not, not.
    #[test]
    fn covering_keys_find_exactly_the_covering_prefixes() {
        let all: Vec<Prefix> = [
            "0.0.0.0/0",
            "198.18.0.0/15",
            "198.18.0.0/16",
            "198.19.0.0/16",
            "198.18.0.0/23",
            "198.18.1.0/24",
            "198.18.1.7/32",
            "198.18.1.6/31",
            "::/0",
            "::ffff:0:0/96",
            "2001:2::/48",
            "2001:2::/49",
            "2001:2:0:8000::/49",
            "2001:2::1/128",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        for y in &all {
            let keys: Vec<PrefixKey> = y.covering_keys().collect();
            assert_eq!(keys.last(), Some(&y.key()), "{y}");
            for x in &all {
                let covers = x.v4 == y.v4 && x.covers(y);
                let found = keys.contains(&x.key());
                // A key found is a candidate only (the /0 of IPv6 does not
                // cover IPv4-mapped IPv6); a cover is never missed.
                assert!(!covers || found, "{x} covers {y} but is not found");
                if found && x.v4 == y.v4 {
                    assert_eq!(
                        covers,
                        !(x.len < 96 && !x.v4 && y.addr[..12] == v4_mapped([0; 4])[..12]),
                        "{x} {y}"
                    );
                }
            }
        }
    }
}
