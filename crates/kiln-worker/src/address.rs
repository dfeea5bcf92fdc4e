//! Which IP addresses are not globally reachable, and why: the ranges of IANA's IPv4 and IPv6
//! Special-Purpose Address Registries (RFC 6890) that are not, plus multicast and the
//! deprecated ranges, as tables.
//!
//! Anything the worker connects to on a user's behalf (reference images; webhooks next) is
//! judged here, so a user cannot make it reach the operator's own network. [`non_public`]
//! names the range that refuses an address rather than answering yes or no, so messages can
//! say why and an operator's allow list can be laid over the verdict.
//!
//! An IPv6 address that carries an IPv4 one the network delivers to (IPv4-mapped and
//! -compatible, NAT64's well-known prefix, 6to4) is judged by that IPv4 address. An IPv6
//! address outside 2000::/3 that no entry names is refused: IANA has allocated nothing else
//! for global unicast, so only a local network could route it.
//!
//! Not caught: a network-specific NAT64 prefix (RFC 6052) looks like any global address, so
//! where a DNS64 resolver synthesizes such addresses, a name for an internal IPv4 host passes;
//! a worker on such a network needs a resolver without DNS64.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address block: the network address and the number of leading bits that are fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cidr {
    V4 { network: Ipv4Addr, len: u8 },
    V6 { network: Ipv6Addr, len: u8 },
}

impl Cidr {
    /// Whether `ip` lies in the block (an IPv4 address never lies in an IPv6 block, nor the
    /// other way round).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (*self, ip) {
            (Cidr::V4 { network, len }, IpAddr::V4(ip)) => {
                same_prefix(network.to_bits().into(), ip.to_bits().into(), len, 32)
            }
            (Cidr::V6 { network, len }, IpAddr::V6(ip)) => {
                same_prefix(network.to_bits(), ip.to_bits(), len, 128)
            }
            _ => false,
        }
    }

    /// The number of fixed leading bits: the more, the more specific the block.
    pub fn prefix_len(&self) -> u8 {
        match *self {
            Cidr::V4 { len, .. } | Cidr::V6 { len, .. } => len,
        }
    }
}

/// Whether the first `len` of an address's `bits` bits are the same in `a` and `b`.
fn same_prefix(a: u128, b: u128, len: u8, bits: u8) -> bool {
    // A zero-length prefix shifts by the whole width, which `>>` refuses for IPv6.
    (a ^ b).checked_shr(u32::from(bits - len)).unwrap_or(0) == 0
}

impl FromStr for Cidr {
    type Err = String;

    /// `network/len` with no bits set past the prefix, or one address (`/32`, `/128`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, len) = match text.split_once('/') {
            Some((address, len)) => (address, Some(len)),
            None => (text, None),
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("'{address}' is not an IP address"))?;
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => bits,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= bits)
                .ok_or_else(|| format!("the prefix length '{len}' is not 0 to {bits}"))?,
        };
        let cidr = match address {
            IpAddr::V4(network) => Cidr::V4 { network, len },
            IpAddr::V6(network) => Cidr::V6 { network, len },
        };
        let network = cidr.network_of(address);
        if network != address {
            return Err(format!(
                "bits are set past the prefix; the block is {network}/{len}"
            ));
        }
        Ok(cidr)
    }
}

impl Cidr {
    /// `ip` with the bits past the prefix cleared (`ip` is of the block's family).
    fn network_of(&self, ip: IpAddr) -> IpAddr {
        let keep = |bits: u8| {
            u128::MAX
                .checked_shl(u32::from(bits - self.prefix_len()))
                .unwrap_or(0)
        };
        match ip {
            IpAddr::V4(ip) => IpAddr::V4(Ipv4Addr::from_bits(ip.to_bits() & keep(32) as u32)),
            IpAddr::V6(ip) => IpAddr::V6(Ipv6Addr::from_bits(ip.to_bits() & keep(128))),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cidr::V4 { network, len } => write!(f, "{network}/{len}"),
            Cidr::V6 { network, len } => write!(f, "{network}/{len}"),
        }
    }
}

const fn v4(octets: [u8; 4], len: u8) -> Cidr {
    let [a, b, c, d] = octets;
    Cidr::V4 {
        network: Ipv4Addr::new(a, b, c, d),
        len,
    }
}

const fn v6(segments: [u16; 8], len: u8) -> Cidr {
    let [a, b, c, d, e, f, g, h] = segments;
    Cidr::V6 {
        network: Ipv6Addr::new(a, b, c, d, e, f, g, h),
        len,
    }
}

/// A special-purpose block and what it is for.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SpecialRange {
    pub cidr: Cidr,
    /// Its purpose, after the registry's name for it.
    pub name: &'static str,
    /// Where it is defined.
    pub rfc: &'static str,
}

impl fmt::Display for SpecialRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.cidr)
    }
}

const fn block(cidr: Cidr, name: &'static str, rfc: &'static str) -> SpecialRange {
    SpecialRange { cidr, name, rfc }
}

/// IPv4 blocks that are not globally reachable. The most specific block containing an address
/// names it, so a block may lie inside another (255.255.255.255 inside 240.0.0.0/4).
#[rustfmt::skip] // One block a line.
static V4_RANGES: &[SpecialRange] = &[
    block(v4([0, 0, 0, 0], 8), "\"this network\"", "RFC 791"),
    block(v4([10, 0, 0, 0], 8), "private use", "RFC 1918"),
    // Carrier-grade NAT.
    block(v4([100, 64, 0, 0], 10), "shared address space", "RFC 6598"),
    block(v4([127, 0, 0, 0], 8), "loopback", "RFC 1122"),
    // Cloud providers' metadata services answer on 169.254.169.254.
    block(v4([169, 254, 0, 0], 16), "link-local", "RFC 3927"),
    block(v4([172, 16, 0, 0], 12), "private use", "RFC 1918"),
    // The registry marks two anycast /32s in it (PCP, TURN) globally reachable; no image or
    // webhook server answers there, so the whole block is refused.
    block(v4([192, 0, 0, 0], 24), "IETF protocol assignments", "RFC 6890"),
    block(v4([192, 0, 2, 0], 24), "documentation", "RFC 5737"),
    block(v4([192, 88, 99, 0], 24), "6to4 relay anycast (deprecated)", "RFC 7526"),
    block(v4([192, 168, 0, 0], 16), "private use", "RFC 1918"),
    block(v4([198, 18, 0, 0], 15), "benchmarking", "RFC 2544"),
    block(v4([198, 51, 100, 0], 24), "documentation", "RFC 5737"),
    block(v4([203, 0, 113, 0], 24), "documentation", "RFC 5737"),
    block(v4([224, 0, 0, 0], 4), "multicast", "RFC 5771"),
    block(v4([240, 0, 0, 0], 4), "reserved", "RFC 1112"),
    block(v4([255, 255, 255, 255], 32), "limited broadcast", "RFC 919"),
];

/// What an IPv6 block means for an address in it.
#[derive(Debug)]
enum Verdict {
    /// Not globally reachable.
    Refuse,
    /// The network delivers it to the IPv4 address this takes out of it, which is judged.
    CarriesIpv4(fn(Ipv6Addr) -> Ipv4Addr),
}

/// The last 32 bits: IPv4-mapped and -compatible addresses, NAT64's well-known prefix.
fn low_32_bits(ip: Ipv6Addr) -> Ipv4Addr {
    Ipv4Addr::from_bits(ip.to_bits() as u32)
}

/// Bits 16 to 47: the IPv4 address of a 6to4 site's router (RFC 3056).
fn bits_16_to_47(ip: Ipv6Addr) -> Ipv4Addr {
    Ipv4Addr::from_bits((ip.to_bits() >> 80) as u32)
}

const fn refuse(cidr: Cidr, name: &'static str, rfc: &'static str) -> (SpecialRange, Verdict) {
    (block(cidr, name, rfc), Verdict::Refuse)
}

const fn carries(
    cidr: Cidr,
    name: &'static str,
    rfc: &'static str,
    ipv4: fn(Ipv6Addr) -> Ipv4Addr,
) -> (SpecialRange, Verdict) {
    (block(cidr, name, rfc), Verdict::CarriesIpv4(ipv4))
}

/// IPv6 blocks that are special. As for IPv4, the most specific block containing an address
/// judges it (::1 lies in ::/96 too, Teredo in 2001::/23).
#[rustfmt::skip] // One block a line.
static V6_RANGES: &[(SpecialRange, Verdict)] = &[
    refuse(v6([0; 8], 128), "unspecified", "RFC 4291"),
    refuse(v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback", "RFC 4291"),
    carries(v6([0; 8], 96), "IPv4-compatible (deprecated)", "RFC 4291", low_32_bits),
    carries(v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96), "IPv4-mapped", "RFC 4291", low_32_bits),
    // A translator on the way may not refuse internal IPv4 addresses, as RFC 6052 asks.
    carries(v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96), "NAT64", "RFC 6052", low_32_bits),
    // For translators inside one network: what is to be kept out, whatever IPv4 it carries.
    refuse(v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "NAT64 local use", "RFC 8215"),
    refuse(v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only", "RFC 6666"),
    refuse(v6([0x100, 0, 0, 1, 0, 0, 0, 0], 64), "dummy prefix", "RFC 9780"),
    // The registry marks a few blocks in it globally reachable (anycast /128s, AMT, AS112,
    // ORCHIDv2, drone remote ID); no image or webhook server answers there.
    refuse(v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), "IETF protocol assignments", "RFC 2928"),
    // Refused outright rather than judged by the server IPv4 (bits 32-63) or the client IPv4
    // (the last 32 bits, inverted): the client address is its NAT's public side, not where the
    // packet ends, which is whatever relay this network routes 2001::/32 to. The registry does
    // not call Teredo globally reachable, and Teredo is all but retired, so no real server is
    // refused.
    refuse(v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32), "Teredo", "RFC 4380"),
    refuse(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation", "RFC 3849"),
    carries(v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16), "6to4", "RFC 3056", bits_16_to_47),
    refuse(v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation", "RFC 9637"),
    refuse(v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16), "SRv6 SIDs", "RFC 9602"),
    refuse(v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique local", "RFC 4193"),
    refuse(v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local", "RFC 4291"),
    refuse(v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local (deprecated)", "RFC 3879"),
    refuse(v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast", "RFC 4291"),
];

/// IANA's global unicast space (RFC 4291): an IPv6 address outside it and every special block
/// is reserved or unallocated.
const GLOBAL_UNICAST: Cidr = v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3);

/// Why an address is not public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonPublic {
    /// It lies in this block.
    In(&'static SpecialRange),
    /// It lies in `via`, which carries `ipv4`, which lies in `range`.
    Carries {
        via: &'static SpecialRange,
        ipv4: Ipv4Addr,
        range: &'static SpecialRange,
    },
    /// An IPv6 address outside 2000::/3 and every special block.
    OutsideGlobalUnicast,
}

impl fmt::Display for NonPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NonPublic::In(range) => write!(f, "{range}"),
            NonPublic::Carries { via, ipv4, range } => write!(f, "{via}, carrying {ipv4}: {range}"),
            NonPublic::OutsideGlobalUnicast => {
                write!(f, "outside the global unicast space {GLOBAL_UNICAST}")
            }
        }
    }
}

/// Why `ip` is not a globally reachable address, or `None` when it is.
pub fn non_public(ip: IpAddr) -> Option<NonPublic> {
    match ip {
        IpAddr::V4(ip) => non_public_v4(ip).map(NonPublic::In),
        IpAddr::V6(ip) => non_public_v6(ip),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static SpecialRange> {
    V4_RANGES
        .iter()
        .filter(|r| r.cidr.contains(IpAddr::V4(ip)))
        .max_by_key(|r| r.cidr.prefix_len())
}

fn non_public_v6(ip: Ipv6Addr) -> Option<NonPublic> {
    let found = V6_RANGES
        .iter()
        .filter(|(r, _)| r.cidr.contains(IpAddr::V6(ip)))
        .max_by_key(|(r, _)| r.cidr.prefix_len());
    match found {
        Some((range, Verdict::Refuse)) => Some(NonPublic::In(range)),
        Some((via, Verdict::CarriesIpv4(extract))) => {
            let ipv4 = extract(ip);
            non_public_v4(ipv4).map(|range| NonPublic::Carries { via, ipv4, range })
        }
        None if GLOBAL_UNICAST.contains(IpAddr::V6(ip)) => None,
        None => Some(NonPublic::OutsideGlobalUnicast),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block that names `ip` itself (for an address carrying IPv4, the carrying block).
    fn named_by(ip: &str) -> Option<String> {
        non_public(ip.parse().unwrap()).map(|n| match n {
            NonPublic::In(range) | NonPublic::Carries { via: range, .. } => range.cidr.to_string(),
            NonPublic::OutsideGlobalUnicast => "outside 2000::/3".to_string(),
        })
    }

    /// The name of "outside the global unicast space" in [`named_by`].
    const OUTSIDE: Option<&str> = Some("outside 2000::/3");
    /// What [`named_by`] says of a public address.
    const PUBLIC: Option<&str> = None;

    /// A block, an address inside it, and maybe an address just outside with what names it.
    type Case = (
        &'static str,
        &'static str,
        Option<(&'static str, Option<&'static str>)>,
    );

    /// One case per block of the tables.
    #[rustfmt::skip] // One block a line.
    const CASES: &[Case] = &[
        ("0.0.0.0/8", "0.1.2.3", Some(("1.0.0.1", PUBLIC))),
        ("10.0.0.0/8", "10.1.2.3", Some(("11.0.0.1", PUBLIC))),
        ("100.64.0.0/10", "100.127.255.254", Some(("100.128.0.1", PUBLIC))),
        ("127.0.0.0/8", "127.0.0.1", Some(("128.0.0.1", PUBLIC))),
        ("169.254.0.0/16", "169.254.169.254", Some(("169.255.0.1", PUBLIC))),
        ("172.16.0.0/12", "172.31.255.254", Some(("172.32.0.1", PUBLIC))),
        ("192.0.0.0/24", "192.0.0.170", Some(("192.0.1.1", PUBLIC))),
        ("192.0.2.0/24", "192.0.2.1", Some(("192.0.3.1", PUBLIC))),
        ("192.88.99.0/24", "192.88.99.1", Some(("192.88.98.1", PUBLIC))),
        ("192.168.0.0/16", "192.168.1.1", Some(("192.169.0.1", PUBLIC))),
        ("198.18.0.0/15", "198.19.255.254", Some(("198.20.0.1", PUBLIC))),
        ("198.51.100.0/24", "198.51.100.7", Some(("198.51.101.1", PUBLIC))),
        ("203.0.113.0/24", "203.0.113.9", Some(("203.0.114.1", PUBLIC))),
        ("224.0.0.0/4", "239.255.255.250", Some(("223.255.255.254", PUBLIC))),
        ("240.0.0.0/4", "240.0.0.1", Some(("239.255.255.255", Some("224.0.0.0/4")))),
        ("255.255.255.255/32", "255.255.255.255", Some(("255.255.255.254", Some("240.0.0.0/4")))),
        ("::/128", "::", Some(("::2", Some("::/96")))),
        ("::1/128", "::1", Some(("::2", Some("::/96")))),
        ("::/96", "::127.0.0.1", Some(("::1:0:0", OUTSIDE))),
        ("::ffff:0.0.0.0/96", "::ffff:192.168.1.1", Some(("::fffe:c0a8:101", OUTSIDE))),
        ("64:ff9b::/96", "64:ff9b::10.0.0.1", Some(("64:ff9b::1:a00:1", OUTSIDE))),
        ("64:ff9b:1::/48", "64:ff9b:1::8.8.8.8", Some(("64:ff9b:2::808:808", OUTSIDE))),
        ("100::/64", "100::1", Some(("100:0:0:1::1", Some("100:0:0:1::/64")))),
        ("100:0:0:1::/64", "100:0:0:1::1", Some(("100:0:0:2::1", OUTSIDE))),
        ("2001::/23", "2001:2::1", Some(("2001:200::1", PUBLIC))),
        ("2001::/32", "2001:0:4136:e378::1", Some(("2001:1::", Some("2001::/23")))),
        ("2001:db8::/32", "2001:db8::1", Some(("2001:db9::1", PUBLIC))),
        ("2002::/16", "2002:c0a8:101::1", Some(("2003::1", PUBLIC))),
        ("3fff::/20", "3fff:fff::1", Some(("3fff:1000::1", PUBLIC))),
        ("5f00::/16", "5f00::1", Some(("5f01::1", OUTSIDE))),
        ("fc00::/7", "fd12:3456::1", Some(("fe00::1", OUTSIDE))),
        ("fe80::/10", "fe80::1", Some(("fec0::1", Some("fec0::/10")))),
        ("fec0::/10", "feff::1", Some(("ff00::1", Some("ff00::/8")))),
        ("ff00::/8", "ff02::1", Some(("feff::1", Some("fec0::/10")))),
    ];

    #[test]
    fn each_block_names_its_addresses_and_not_its_neighbours() {
        for &(block, inside, outside) in CASES {
            assert_eq!(
                named_by(inside).as_deref(),
                Some(block),
                "{inside} in {block}"
            );
            if let Some((outside, named)) = outside {
                assert_eq!(
                    named_by(outside).as_deref(),
                    named,
                    "{outside} outside {block}"
                );
            }
        }
    }

    #[test]
    fn every_block_of_the_tables_has_a_case() {
        let blocks = V4_RANGES.iter().chain(V6_RANGES.iter().map(|(r, _)| r));
        for range in blocks {
            let cidr = range.cidr.to_string();
            assert!(CASES.iter().any(|c| c.0 == cidr), "{range} has no case");
        }
        assert_eq!(CASES.len(), V4_RANGES.len() + V6_RANGES.len());
    }

    #[test]
    fn network_addresses_have_no_bits_past_the_prefix() {
        let blocks = V4_RANGES.iter().chain(V6_RANGES.iter().map(|(r, _)| r));
        for range in blocks {
            let (network, len) = match range.cidr {
                Cidr::V4 { network, len } => (u128::from(network.to_bits()) << 96, len),
                Cidr::V6 { network, len } => (network.to_bits(), len),
            };
            assert_eq!(
                network.checked_shl(u32::from(len)).unwrap_or(0),
                0,
                "{range}"
            );
        }
    }

    #[test]
    fn blocks_parse_from_text() {
        let parse = |t: &str| t.parse::<Cidr>();
        assert_eq!(parse("10.0.0.0/8"), Ok(v4([10, 0, 0, 0], 8)));
        assert_eq!(parse("127.0.0.1"), Ok(v4([127, 0, 0, 1], 32)));
        assert_eq!(parse("0.0.0.0/0"), Ok(v4([0; 4], 0)));
        assert_eq!(
            parse("fe80::/10"),
            Ok(v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10))
        );
        assert_eq!(parse("::1"), Ok(v6([0, 0, 0, 0, 0, 0, 0, 1], 128)));
        assert_eq!(parse("::/0"), Ok(v6([0; 8], 0)));
        assert!(parse("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(parse("fe80::1/10").unwrap_err().contains("fe80::/10"));
        assert!(parse("10.0.0.0/33").is_err());
        assert!(parse("10.0.0.0/x").is_err());
        assert!(parse("images.internal/8").is_err());
        for cidr in CASES.iter().map(|c| c.0) {
            assert_eq!(parse(cidr).unwrap().to_string(), cidr);
        }
    }

    #[test]
    fn public_addresses_pass() {
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            // 6to4, NAT64, IPv4-mapped and -compatible forms of 8.8.8.8.
            "2002:808:808::1",
            "64:ff9b::8.8.8.8",
            "::ffff:8.8.8.8",
            "::8.8.8.8",
        ] {
            assert_eq!(non_public(public.parse().unwrap()), None, "{public}");
        }
    }

    #[test]
    fn addresses_carrying_ipv4_are_judged_by_it() {
        for (ip, via, ipv4, block) in [
            (
                "::ffff:127.0.0.1",
                "::ffff:0.0.0.0/96",
                "127.0.0.1",
                "127.0.0.0/8",
            ),
            ("::10.0.0.1", "::/96", "10.0.0.1", "10.0.0.0/8"),
            (
                "64:ff9b::169.254.169.254",
                "64:ff9b::/96",
                "169.254.169.254",
                "169.254.0.0/16",
            ),
            (
                "2002:a9fe:a9fe::1",
                "2002::/16",
                "169.254.169.254",
                "169.254.0.0/16",
            ),
            (
                "2002:c058:6301::1",
                "2002::/16",
                "192.88.99.1",
                "192.88.99.0/24",
            ),
            ("2002:e000:1::", "2002::/16", "224.0.0.1", "224.0.0.0/4"),
        ] {
            match non_public(ip.parse().unwrap()) {
                Some(NonPublic::Carries {
                    via: v,
                    ipv4: i,
                    range,
                }) => {
                    assert_eq!(v.cidr.to_string(), via, "{ip}");
                    assert_eq!(i.to_string(), ipv4, "{ip}");
                    assert_eq!(range.cidr.to_string(), block, "{ip}");
                }
                other => panic!("{ip}: {other:?}"),
            }
        }
    }

    #[test]
    fn teredo_and_nat64_local_use_are_refused_whatever_they_carry() {
        // Teredo server 8.8.8.8, client 1.1.1.1 (inverted: fefe:fefe).
        for ip in ["2001:0:808:808::fefe:fefe", "64:ff9b:1::1.1.1.1"] {
            assert!(
                matches!(non_public(ip.parse().unwrap()), Some(NonPublic::In(_))),
                "{ip}"
            );
        }
    }

    #[test]
    fn the_reason_names_the_block() {
        let reason = |ip: &str| non_public(ip.parse().unwrap()).unwrap().to_string();
        assert_eq!(reason("10.1.2.3"), "private use 10.0.0.0/8");
        assert_eq!(
            reason("2002:a00:1::1"),
            "6to4 2002::/16, carrying 10.0.0.1: private use 10.0.0.0/8"
        );
        assert_eq!(
            reason("4000::1"),
            "outside the global unicast space 2000::/3"
        );
    }
}
