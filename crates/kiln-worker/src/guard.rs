//! The guarded HTTP client: what the worker uses to connect anywhere on a user's behalf
//! (reference images, webhooks).
//!
//! The URLs are the users' and the connections start inside the operator's network, so no
//! private, loopback, link-local or otherwise non-public address (as [`crate::address`] judges
//! them) is connected to unless the operator's [`AllowList`] opens it. An address written in
//! the URL is checked before the request ([`check_url`]); a host name is checked where it
//! resolves ([`GuardedResolver`]), every address it resolves to, and so is every redirect hop
//! the client follows. A proxy from the environment is never used (it would connect past the
//! checks), and connections that are not up within [`CONNECT_TIMEOUT`] are given up.

use crate::address::NonPublic;
use crate::allow::AllowList;
use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// A connection that is not up by then will not be.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which redirects a guarded client follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Redirects {
    /// None: a 3xx is handed back as the answer.
    Never,
    /// Up to this many, each hop's URL checked like the first.
    Follow(usize),
}

/// A connection refused because the address is not public and the allow list does not open
/// it; found again in reqwest's error chain ([`refused_by_guard`]) to say "not a public
/// address".
#[derive(Debug)]
pub(crate) struct AddressRefused {
    /// The name that resolved to `ip`; `None` when the URL names the address itself.
    host: Option<String>,
    ip: IpAddr,
    why: NonPublic,
}

impl fmt::Display for AddressRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(host) = &self.host {
            write!(f, "{host} resolves to ")?;
        }
        write!(
            f,
            "{} ({}), which is not public and which the allow list does not open",
            self.ip, self.why
        )
    }
}

impl StdError for AddressRefused {}

/// Why a URL may not be requested: `not_public` when its address is refused (the detail is
/// then an [`AddressRefused`]), else it is no http(s) URL with a host.
#[derive(Debug)]
pub(crate) struct UrlRefused {
    pub not_public: bool,
    pub detail: Box<dyn StdError + Send + Sync>,
}

/// A client that connects only where `allow` lets it, following `redirects`.
pub(crate) fn client(allow: AllowList, redirects: Redirects) -> reqwest::Client {
    let allow = Arc::new(allow);
    let redirect_policy = match redirects {
        Redirects::Never => reqwest::redirect::Policy::none(),
        Redirects::Follow(max_redirects) => {
            let allow = allow.clone();
            reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > max_redirects {
                    return attempt.error(format!("more than {max_redirects} redirects"));
                }
                match check_url(attempt.url(), &allow) {
                    Ok(()) => attempt.follow(),
                    // The detail is kept whole: an AddressRefused in it says why.
                    Err(refused) => attempt.error(refused.detail),
                }
            })
        }
    };
    reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver { allow }))
        .redirect(redirect_policy)
        .connect_timeout(CONNECT_TIMEOUT)
        // A proxy from the environment would connect on the worker's behalf, past the
        // address checks.
        .no_proxy()
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client's settings are valid")
}

/// The scheme is http(s), and a host given as an address is one the allow list lets through
/// (a host name is checked when it resolves, by [`GuardedResolver`]).
pub(crate) fn check_url(url: &reqwest::Url, allow: &AllowList) -> Result<(), UrlRefused> {
    let malformed = |detail: String| UrlRefused {
        not_public: false,
        detail: detail.into(),
    };
    if !matches!(url.scheme(), "http" | "https") {
        let detail = format!("the scheme {} is not http or https", url.scheme());
        return Err(malformed(detail));
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(url::Host::Domain(_)) => return Ok(()),
        None => return Err(malformed("the URL has no host".into())),
    };
    match allow.refusal(None, ip) {
        None => Ok(()),
        Some(why) => Err(UrlRefused {
            not_public: true,
            detail: Box::new(AddressRefused {
                host: None,
                ip,
                why,
            }),
        }),
    }
}

/// Whether the guard refused the address somewhere in `error` (in the resolver or on a
/// redirect hop).
pub(crate) fn refused_by_guard(error: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(c) = cause {
        if c.is::<AddressRefused>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Resolves host names like the system does, then drops every address the allow list refuses;
/// a name with none left fails. Checking the addresses actually connected to (not a name
/// looked up beforehand) leaves no window for a name to change its answer in between.
struct GuardedResolver {
    allow: Arc<AllowList>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let mut allowed: Vec<SocketAddr> = Vec::new();
            let mut first_refused = None;
            for address in tokio::net::lookup_host((host.as_str(), 0)).await? {
                match allow.refusal(Some(&host), address.ip()) {
                    None => allowed.push(address),
                    Some(why) => {
                        first_refused.get_or_insert((address.ip(), why));
                    }
                }
            }
            match (allowed.is_empty(), first_refused) {
                (false, _) => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
                (true, Some((ip, why))) => Err(Box::new(AddressRefused {
                    host: Some(host),
                    ip,
                    why,
                })
                    as Box<dyn StdError + Send + Sync>),
                (true, None) => Err(format!("{host} has no address").into()),
            }
        })
    }
}
