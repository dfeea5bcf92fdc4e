//! The operator's exceptions to [`crate::address`]'s verdict: address blocks and host names
//! the worker may reach although they are not public (images on the deployment's own network;
//! tests on loopback).
//!
//! An address the classifier refuses is allowed when a listed block contains it, or when it is
//! reached through a listed host name. A listed name does not open link-local addresses or the
//! cloud metadata services ([`EXPLICIT_ONLY`]): a name is the operator's word about a server,
//! and an internal DNS answer pointing it at 169.254.169.254 is an attack, not a deployment.
//! Those need a listed block that covers them.

use crate::address::{non_public, Cidr, NonPublic};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Blocks a listed host name does not open; only a listed block covering them does.
#[rustfmt::skip] // One block a line.
const EXPLICIT_ONLY: &[Cidr] = &[
    // Link-local: the metadata services of AWS, GCP, Azure, OpenStack and most others
    // (169.254.169.254), and whatever else answers on the host's own link.
    Cidr::V4 { network: Ipv4Addr::new(169, 254, 0, 0), len: 16 },
    Cidr::V6 { network: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), len: 10 },
    // AWS's metadata service over IPv6 (inside the unique local block fc00::/7).
    Cidr::V6 { network: Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254), len: 128 },
    // Alibaba Cloud's metadata service (inside the shared address space 100.64.0.0/10).
    Cidr::V4 { network: Ipv4Addr::new(100, 100, 100, 200), len: 32 },
];

/// Address blocks and host names that may be reached although not public. Empty (the
/// default): public addresses only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    cidrs: Vec<Cidr>,
    /// Lowercase, without a trailing dot.
    hosts: Vec<String>,
}

/// An entry that is neither an address, a CIDR block nor a host name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{entry}' is not an IP address, a CIDR block or a host name: {problem}")]
pub struct AllowListError {
    pub entry: String,
    pub problem: String,
}

impl AllowList {
    /// The list from entries such as `10.0.0.0/8`, `192.168.1.5`, `fd12::/16` or
    /// `images.internal` (a name matches exactly, not its subdomains).
    pub fn parse<S: AsRef<str>>(
        entries: impl IntoIterator<Item = S>,
    ) -> Result<Self, AllowListError> {
        let mut list = AllowList::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            let error = |problem: String| AllowListError {
                entry: entry.to_string(),
                problem,
            };
            if entry.contains('/') || entry.parse::<IpAddr>().is_ok() {
                list.cidrs.push(entry.parse().map_err(error)?);
            } else {
                list.hosts.push(host_name(entry).map_err(error)?);
            }
        }
        Ok(list)
    }

    pub fn is_empty(&self) -> bool {
        self.cidrs.is_empty() && self.hosts.is_empty()
    }

    /// Why `ip`, reached through `host` (`None` for a URL that names the address itself), may
    /// not be connected to; `None` when it may: public, or allowed by the list.
    pub fn refusal(&self, host: Option<&str>, ip: IpAddr) -> Option<NonPublic> {
        let why = non_public(ip)?;
        if self.cidrs.iter().any(|c| c.contains(ip)) {
            return None;
        }
        let host_listed = host.is_some_and(|h| {
            let h = h.trim_end_matches('.');
            self.hosts
                .iter()
                .any(|listed| listed.eq_ignore_ascii_case(h))
        });
        if host_listed && !explicit_only(ip, why) {
            return None;
        }
        Some(why)
    }
}

/// Whether `ip` (or the IPv4 address it carries) lies in a block only a listed block opens.
fn explicit_only(ip: IpAddr, why: NonPublic) -> bool {
    let carried = match why {
        NonPublic::Carries { ipv4, .. } => Some(IpAddr::V4(ipv4)),
        _ => None,
    };
    EXPLICIT_ONLY
        .iter()
        .any(|c| c.contains(ip) || carried.is_some_and(|v4| c.contains(v4)))
}

/// `name` lowercased and without a trailing dot, if it is a DNS host name.
fn host_name(name: &str) -> Result<String, String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err("a host name has 1 to 253 characters".into());
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(format!(
                "the label '{label}' is not 1 to 63 letters, digits and inner hyphens"
            ));
        }
    }
    Ok(name)
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = (self.cidrs.iter().map(Cidr::to_string))
            .chain(self.hosts.iter().cloned())
            .collect();
        write!(f, "[{}]", entries.join(", "))
    }
}

impl FromStr for AllowList {
    type Err = AllowListError;

    /// One entry.
    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        AllowList::parse([entry])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(entries).unwrap()
    }

    fn allowed(list: &AllowList, host: Option<&str>, ip: &str) -> bool {
        list.refusal(host, ip.parse().unwrap()).is_none()
    }

    #[test]
    fn an_empty_list_allows_public_addresses_only() {
        let empty = AllowList::default();
        assert!(allowed(&empty, None, "8.8.8.8"));
        assert!(allowed(&empty, Some("example.com"), "2606:4700::1"));
        assert!(!allowed(&empty, None, "127.0.0.1"));
        assert!(!allowed(&empty, Some("localhost"), "::1"));
    }

    #[test]
    fn blocks_allow_the_addresses_inside_them_v4_and_v6() {
        let l = list(&["10.0.0.0/8", "192.168.1.5", "fd12:3456::/32", "::1"]);
        assert!(allowed(&l, None, "10.255.0.1"));
        assert!(allowed(&l, None, "11.0.0.1"), "public anyway");
        assert!(allowed(&l, None, "192.168.1.5"));
        assert!(!allowed(&l, None, "192.168.1.6"));
        assert!(allowed(&l, None, "fd12:3456:ffff::9"));
        assert!(!allowed(&l, None, "fd12:3457::9"));
        assert!(allowed(&l, None, "::1"));
        // A block of one family never covers the other's forms of its addresses.
        assert!(!allowed(&l, None, "::ffff:10.0.0.1"));
        assert!(!allowed(&l, None, "127.0.0.1"));
    }

    #[test]
    fn host_names_allow_what_they_resolve_to_except_link_local_and_metadata() {
        let l = list(&["Images.Internal."]);
        assert!(allowed(&l, Some("images.internal"), "10.1.2.3"));
        assert!(allowed(&l, Some("IMAGES.internal."), "fd00::5"));
        assert!(!allowed(&l, Some("other.internal"), "10.1.2.3"));
        assert!(!allowed(&l, Some("sub.images.internal"), "10.1.2.3"));
        assert!(
            !allowed(&l, None, "10.1.2.3"),
            "an address URL is not the name"
        );
        for metadata in [
            "169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            // Forms of IPv6 carrying a link-local IPv4 address.
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(
                !allowed(&l, Some("images.internal"), metadata),
                "{metadata}"
            );
        }
    }

    #[test]
    fn metadata_addresses_need_a_block_that_covers_them() {
        let l = list(&["169.254.169.254/32", "fe80::/10", "fd00:ec2::254"]);
        assert!(allowed(&l, None, "169.254.169.254"));
        assert!(!allowed(&l, None, "169.254.169.253"));
        assert!(allowed(&l, Some("anything"), "fe80::1"));
        assert!(allowed(&l, None, "fd00:ec2::254"));
    }

    #[test]
    fn bad_entries_are_named() {
        for (entry, problem) in [
            ("10.0.0.0/33", "prefix"),
            ("10.0.0.1/8", "10.0.0.0/8"),
            ("300.1.2.3/8", "address"),
            ("fd00::/129", "prefix"),
            ("images internal", "label"),
            ("-bad.example", "label"),
            ("", "1 to 253"),
        ] {
            let err = AllowList::parse([entry]).unwrap_err();
            assert_eq!(err.entry, entry);
            assert!(err.to_string().contains(problem), "{entry}: {err}");
        }
    }

    #[test]
    fn it_displays_its_entries() {
        let l = list(&["127.0.0.1", "10.0.0.0/8", "images.internal"]);
        assert_eq!(l.to_string(), "[127.0.0.1/32, 10.0.0.0/8, images.internal]");
    }
}
