//! The controller's egress policy and dialer: which `host:port` targets an agent's tunnel may
//! reach, decided on the resolved address, and the outbound TCP connection itself.
//!
//! The policy is an allowlist of `host:port` patterns (an exact host or a `*.suffix`
//! wildcard; a port or `*`) plus optional `cidr:` entries. A target must match a host
//! pattern, and then every candidate address is classified: loopback, private, link-local,
//! unspecified, multicast and broadcast addresses are refused unless a `cidr:` entry lists
//! them. The decision is made on the address that will be dialled, never on the name, so a
//! name that resolves to 127.0.0.1 is refused unless `cidr:127.0.0.0/8` is configured.
//!
//! [`decide`] is pure; [`dial`] is the thin edge that resolves, decides and connects. This
//! module must not know about tunnels, frames or agents: the gateway calls it per stream.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The prefix that marks an entry as an address range rather than a host pattern.
const CIDR_PREFIX: &str = "cidr:";

/// An entry of the egress allowlist that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressRuleError {
    /// The entry has no `:port` part.
    #[error("egress rule {entry:?} has no port: write host:port or host:*")]
    MissingPort { entry: String },
    /// The port part is neither a number in 1..=65535 nor `*`.
    #[error("egress rule {entry:?} has port {port:?}, which is not 1-65535 or *")]
    BadPort { entry: String, port: String },
    /// The host part is empty or has characters no host name or IP literal has.
    #[error(
        "egress rule {entry:?} has host {host:?}, which is not a host name, IP address or *.suffix"
    )]
    BadHost { entry: String, host: String },
    /// A `cidr:` entry whose address or prefix length does not parse.
    #[error("egress rule {entry:?} is not a valid cidr: {why}")]
    BadCidr { entry: String, why: String },
}

/// Why an egress target was refused, or why dialling an allowed target failed.
#[derive(Debug, thiserror::Error)]
pub enum EgressRefusal {
    /// No host pattern of the allowlist matches the target.
    #[error("egress to {target} refused: no rule matched {target}")]
    NoRule { target: String },
    /// The target asked for port 0, which no TCP server listens on.
    #[error("egress to {target} refused: port 0 is not a valid destination")]
    PortZero { target: String },
    /// Every address the target resolved to is in a forbidden class; this names the first.
    #[error("egress to {target} refused: address {addr} is {class} and no cidr rule allows it")]
    Forbidden {
        target: String,
        addr: IpAddr,
        class: AddressClass,
    },
    /// The name resolved to no address at all.
    #[error("egress to {target} refused: the name resolved to no address")]
    NoAddress { target: String },
    /// Resolving the name failed.
    #[error("egress to {target} failed: could not resolve the name")]
    Resolve {
        target: String,
        #[source]
        source: io::Error,
    },
    /// Resolving and connecting did not finish within the dial timeout.
    #[error("egress to {target} failed: no connection within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
    /// Every allowed address refused or failed the connection; this names the last tried.
    #[error("egress to {target} failed: could not connect to {addr}")]
    Connect {
        target: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl EgressRefusal {
    /// True when the policy refused the target, false when an allowed target could not be
    /// reached (resolution, timeout or connection failure).
    pub fn is_policy(&self) -> bool {
        matches!(
            self,
            Self::NoRule { .. }
                | Self::PortZero { .. }
                | Self::Forbidden { .. }
                | Self::NoAddress { .. }
        )
    }
}

/// A class of addresses refused unless a `cidr:` entry lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// 127.0.0.0/8 and ::1.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10 (carrier-grade NAT), fc00::/7 and the
    /// deprecated site-local fec0::/10.
    Private,
    /// 169.254/16 and fe80::/10.
    LinkLocal,
    /// 0.0.0.0/8 and ::, which the kernel routes to this host.
    Unspecified,
    /// 224.0.0.0/4 and ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link-local",
            Self::Unspecified => "unspecified",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
        })
    }
}

/// The forbidden class of `addr`, or `None` for an ordinary public address.
///
/// An IPv6 address that carries an IPv4 address is classified as that IPv4 address, so no
/// encoding can smuggle a loopback or private target past the policy: IPv4-mapped
/// (`::ffff:127.0.0.1`), IPv4-compatible (`::127.0.0.1`, deprecated), NAT64
/// (`64:ff9b::/96`, which a NAT64 gateway turns into the IPv4 address) and 6to4
/// (`2002:AABB:CCDD::/48`). A forbidden IPv6 class wins over the carried address.
pub fn classify(addr: IpAddr) -> Option<AddressClass> {
    match addr {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6).or_else(|| embedded_v4(v6).and_then(classify_v4)),
    }
}

/// The IPv4 address an IPv6 address carries, if it is one of the forms that reach it.
fn embedded_v4(addr: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(addr);
    let low32 = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    if let Some(v4) = addr.to_ipv4_mapped() {
        Some(v4)
    } else if bits >> 32 == 0 {
        // IPv4-compatible `::a.b.c.d` (`::` and `::1` are classified before this).
        Some(low32)
    } else if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
        // The NAT64 well-known prefix 64:ff9b::/96 (RFC 6052).
        Some(low32)
    } else if bits >> 112 == 0x2002 {
        // 6to4: 2002:AABB:CCDD::/48 carries AA.BB.CC.DD (RFC 3056).
        Some(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32))
    } else {
        None
    }
}

fn classify_v4(addr: Ipv4Addr) -> Option<AddressClass> {
    let [first, ..] = addr.octets();
    if addr.is_loopback() {
        Some(AddressClass::Loopback)
    } else if addr.is_private() || is_shared_v4(addr) {
        Some(AddressClass::Private)
    } else if addr.is_link_local() {
        Some(AddressClass::LinkLocal)
    } else if first == 0 {
        Some(AddressClass::Unspecified)
    } else if addr.is_multicast() {
        Some(AddressClass::Multicast)
    } else if addr.is_broadcast() {
        Some(AddressClass::Broadcast)
    } else {
        None
    }
}

/// 100.64.0.0/10, the carrier-grade NAT range (RFC 6598): never a public destination, and
/// the range overlay networks (Tailscale) give to the nodes themselves.
fn is_shared_v4(addr: Ipv4Addr) -> bool {
    let [a, b, ..] = addr.octets();
    a == 100 && b & 0xc0 == 64
}

fn classify_v6(addr: Ipv6Addr) -> Option<AddressClass> {
    let [first, ..] = addr.segments();
    if addr.is_loopback() {
        Some(AddressClass::Loopback)
    } else if addr.is_unspecified() {
        Some(AddressClass::Unspecified)
    } else if first & 0xfe00 == 0xfc00 || first & 0xffc0 == 0xfec0 {
        // Unique local fc00::/7, and the deprecated site-local fec0::/10.
        Some(AddressClass::Private)
    } else if first & 0xffc0 == 0xfe80 {
        Some(AddressClass::LinkLocal)
    } else if addr.is_multicast() {
        Some(AddressClass::Multicast)
    } else {
        None
    }
}

/// The host half of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// This host exactly (lower case, no trailing dot; an IP literal without brackets).
    Exact(String),
    /// Any host strictly below this suffix: `*.debian.org` matches `deb.debian.org` and
    /// `a.b.debian.org` but not `debian.org`. Stored with its leading dot.
    Suffix(String),
}

/// The port half of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPattern {
    Exact(u16),
    Any,
}

/// One `host:port` allowlist pattern: `github.com:443`, `*.debian.org:80`, `127.0.0.1:*`,
/// `[::1]:8080`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    host: HostPattern,
    port: PortPattern,
}

impl EgressRule {
    /// True when this rule allows `host:port`; `host` is compared case-insensitively and
    /// without a trailing dot.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let port_ok = match self.port {
            PortPattern::Any => true,
            PortPattern::Exact(p) => p == port,
        };
        if !port_ok {
            return false;
        }
        let host = normalize_host(host);
        match &self.host {
            HostPattern::Exact(h) => *h == host,
            HostPattern::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }
}

impl FromStr for EgressRule {
    type Err = EgressRuleError;

    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        let entry = entry.trim();
        let (host, port) = split_host_port(entry).ok_or_else(|| EgressRuleError::MissingPort {
            entry: entry.to_owned(),
        })?;
        let port = match port {
            "*" => PortPattern::Any,
            p => match p.parse::<u16>() {
                Ok(n) if n != 0 => PortPattern::Exact(n),
                _ => {
                    return Err(EgressRuleError::BadPort {
                        entry: entry.to_owned(),
                        port: p.to_owned(),
                    });
                }
            },
        };
        let bad_host = || EgressRuleError::BadHost {
            entry: entry.to_owned(),
            host: host.to_owned(),
        };
        let host = normalize_host(host);
        let host = if let Some(suffix) = host.strip_prefix("*.") {
            if !is_host_name(suffix) {
                return Err(bad_host());
            }
            HostPattern::Suffix(format!(".{suffix}"))
        } else if host.parse::<IpAddr>().is_ok() || is_host_name(&host) {
            HostPattern::Exact(host)
        } else {
            return Err(bad_host());
        };
        Ok(Self { host, port })
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostPattern::Exact(h) if h.contains(':') => write!(f, "[{h}]")?,
            HostPattern::Exact(h) => f.write_str(h)?,
            HostPattern::Suffix(s) => write!(f, "*{s}")?,
        }
        match self.port {
            PortPattern::Any => f.write_str(":*"),
            PortPattern::Exact(p) => write!(f, ":{p}"),
        }
    }
}

/// An address range (`cidr:127.0.0.0/8`, `cidr:::1/128`, `cidr:10.1.2.3`) whose addresses are
/// allowed even though their class is otherwise refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrRule {
    network: IpAddr,
    prefix: u8,
}

impl CidrRule {
    /// True when `addr` is inside this range. An IPv4-mapped IPv6 address is compared as
    /// its IPv4 address.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = mask_v4(self.prefix);
                u32::from(a) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = mask_v6(self.prefix);
                u128::from(a) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for CidrRule {
    type Err = EgressRuleError;

    /// Parses the part after `cidr:`, or a whole entry that still has the prefix.
    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        let entry = entry.trim();
        let body = entry.strip_prefix(CIDR_PREFIX).unwrap_or(entry);
        let bad = |why: String| EgressRuleError::BadCidr {
            entry: entry.to_owned(),
            why,
        };
        let (addr, prefix) = match body.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (body, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| bad(format!("{addr:?} is not an IP address")))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(bad(format!("prefix length {p:?} is not 0-{max}"))),
            },
        };
        let host_bits_set = match network {
            IpAddr::V4(a) => u32::from(a) & !mask_v4(prefix) != 0,
            IpAddr::V6(a) => u128::from(a) & !mask_v6(prefix) != 0,
        };
        if host_bits_set {
            return Err(bad(format!(
                "{network} has bits set beyond the /{prefix} prefix"
            )));
        }
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for CidrRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{CIDR_PREFIX}{}/{}", self.network, self.prefix)
    }
}

/// The whole egress allowlist: host patterns and the address ranges exempt from the
/// forbidden classes. The default policy allows nothing.
///
/// In configuration it is a list of strings, each a rule (`github.com:443`) or a range
/// (`cidr:127.0.0.0/8`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct EgressPolicy {
    rules: Vec<EgressRule>,
    cidrs: Vec<CidrRule>,
}

impl EgressPolicy {
    /// Parses allowlist entries; the first bad entry is the error.
    pub fn parse<I, S>(entries: I) -> Result<Self, EgressRuleError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut policy = Self::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            if entry.starts_with(CIDR_PREFIX) {
                policy.cidrs.push(entry.parse()?);
            } else {
                policy.rules.push(entry.parse()?);
            }
        }
        Ok(policy)
    }

    /// The host patterns, in configuration order.
    pub fn rules(&self) -> &[EgressRule] {
        &self.rules
    }

    /// The exempt address ranges, in configuration order.
    pub fn cidrs(&self) -> &[CidrRule] {
        &self.cidrs
    }

    /// The first host pattern allowing `host:port`, if any. This looks at the name only;
    /// [`decide`] still has to accept the resolved address.
    pub fn matching_rule(&self, host: &str, port: u16) -> Option<&EgressRule> {
        self.rules.iter().find(|r| r.matches(host, port))
    }

    fn exempt(&self, addr: IpAddr) -> bool {
        self.cidrs.iter().any(|c| c.contains(addr))
    }
}

impl TryFrom<Vec<String>> for EgressPolicy {
    type Error = EgressRuleError;

    fn try_from(entries: Vec<String>) -> Result<Self, Self::Error> {
        Self::parse(entries)
    }
}

impl From<EgressPolicy> for Vec<String> {
    fn from(policy: EgressPolicy) -> Self {
        let rules = policy.rules.iter().map(ToString::to_string);
        rules
            .chain(policy.cidrs.iter().map(ToString::to_string))
            .collect()
    }
}

/// Decides whether `host:port` may be dialled, given the addresses it resolved to, and
/// returns the address to dial: the first resolved address whose class is allowed.
///
/// Refuses when no host pattern matches, when the port is 0, when nothing resolved, or
/// when every resolved address is loopback, private, link-local, unspecified, multicast
/// or broadcast and not inside a `cidr:` range.
pub fn decide(
    policy: &EgressPolicy,
    host: &str,
    port: u16,
    resolved: &[IpAddr],
) -> Result<SocketAddr, EgressRefusal> {
    let allowed = decide_all(policy, host, port, resolved)?;
    // decide_all never returns an empty list; the fallback keeps this free of indexing.
    allowed
        .first()
        .copied()
        .ok_or_else(|| EgressRefusal::NoAddress {
            target: target(host, port),
        })
}

/// Like [`decide`], but returns every allowed address in resolution order so a dialler can
/// fall back to the next one.
pub fn decide_all(
    policy: &EgressPolicy,
    host: &str,
    port: u16,
    resolved: &[IpAddr],
) -> Result<Vec<SocketAddr>, EgressRefusal> {
    check_name(policy, host, port)?;
    let mut first_refused = None;
    let mut allowed = Vec::new();
    for &addr in resolved {
        match classify(addr) {
            Some(class) if !policy.exempt(addr) => {
                first_refused.get_or_insert((addr, class));
            }
            _ => allowed.push(SocketAddr::new(addr, port)),
        }
    }
    if !allowed.is_empty() {
        return Ok(allowed);
    }
    Err(match first_refused {
        Some((addr, class)) => EgressRefusal::Forbidden {
            target: target(host, port),
            addr,
            class,
        },
        None => EgressRefusal::NoAddress {
            target: target(host, port),
        },
    })
}

/// The name-only half of the decision, run before resolving so that a refused name costs
/// no DNS query.
fn check_name(policy: &EgressPolicy, host: &str, port: u16) -> Result<(), EgressRefusal> {
    if port == 0 {
        return Err(EgressRefusal::PortZero {
            target: target(host, port),
        });
    }
    if policy.matching_rule(host, port).is_none() {
        return Err(EgressRefusal::NoRule {
            target: target(host, port),
        });
    }
    Ok(())
}

/// Resolves `host`, decides with [`decide_all`], and connects to the first allowed address
/// that accepts, all within `timeout`. The stream has `TCP_NODELAY` set, since it carries
/// interactive protocols (TLS handshakes, Git negotiation) through the tunnel.
pub async fn dial(
    policy: &EgressPolicy,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), EgressRefusal> {
    check_name(policy, host, port)?;
    let deadline = Instant::now() + timeout;
    let name = normalize_host(host);
    let timed_out = || EgressRefusal::Timeout {
        target: target(host, port),
        timeout,
    };
    let resolved: Vec<IpAddr> =
        tokio::time::timeout_at(deadline, tokio::net::lookup_host((name.as_str(), port)))
            .await
            .map_err(|_| timed_out())?
            .map_err(|source| EgressRefusal::Resolve {
                target: target(host, port),
                source,
            })?
            .map(|a| a.ip())
            .collect();
    let candidates = decide_all(policy, host, port, &resolved)?;
    let mut last_error = None;
    for addr in candidates {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err(timed_out()),
            Ok(Ok(stream)) => {
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%addr, %error, "could not set TCP_NODELAY on egress stream");
                }
                tracing::debug!(target = %target(host, port), %addr, "egress connected");
                return Ok((stream, addr));
            }
            Ok(Err(source)) => {
                tracing::debug!(%addr, error = %source, "egress connect failed, trying next");
                last_error = Some((addr, source));
            }
        }
    }
    Err(match last_error {
        Some((addr, source)) => EgressRefusal::Connect {
            target: target(host, port),
            addr,
            source,
        },
        None => EgressRefusal::NoAddress {
            target: target(host, port),
        },
    })
}

/// `host:port` for messages, with an IPv6 literal in brackets.
fn target(host: &str, port: u16) -> String {
    let host = normalize_host(host);
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Lower case, without brackets around an IPv6 literal and without a trailing dot.
fn normalize_host(host: &str) -> String {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// Splits `host:port` or `[v6]:port` at the port separator.
fn split_host_port(entry: &str) -> Option<(&str, &str)> {
    if entry.starts_with('[') {
        let close = entry.find(']')?;
        let (host, rest) = entry.split_at(close + 1);
        Some((host, rest.strip_prefix(':')?))
    } else {
        entry.rsplit_once(':')
    }
}

/// A DNS name: dot-separated labels of letters, digits, `-` and `_`, none empty.
fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> EgressPolicy {
        EgressPolicy::parse(entries).unwrap()
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// What a decision should come to: the dialled address, or a substring of the refusal.
    enum Want {
        Dial(&'static str),
        Refuse(&'static str),
    }

    /// Policy entries, host, port, resolved addresses, expected outcome.
    type Case<'a> = (&'a [&'a str], &'a str, u16, Vec<IpAddr>, Want);

    #[test]
    fn decide_table() {
        use Want::{Dial, Refuse};
        let standard = [
            "github.com:443",
            "*.debian.org:80",
            "127.0.0.1:*",
            "localhost:8080",
            "internal.example:443",
            "[::1]:*",
            "10.1.2.3:22",
        ];
        let with_cidrs = [
            "127.0.0.1:*",
            "localhost:*",
            "internal.example:443",
            "cidr:127.0.0.0/8",
            "cidr:10.0.0.0/8",
            "cidr:fd00::/8",
        ];
        #[rustfmt::skip]
        let cases: Vec<Case<'_>> = vec![
            // A public name on an allowed port.
            (&standard, "github.com", 443, ips(&["140.82.121.4"]), Dial("140.82.121.4:443")),
            // Host names are case-insensitive and may end in a dot.
            (&standard, "GitHub.COM.", 443, ips(&["140.82.121.4"]), Dial("140.82.121.4:443")),
            // Wrong port.
            (&standard, "github.com", 22, ips(&["140.82.121.4"]),
                Refuse("egress to github.com:22 refused: no rule matched github.com:22")),
            // No rule for the name at all.
            (&standard, "evil.example", 443, ips(&["93.184.216.34"]), Refuse("no rule matched")),
            // A wildcard matches subdomains at any depth...
            (&standard, "deb.debian.org", 80, ips(&["151.101.2.132"]), Dial("151.101.2.132:80")),
            (&standard, "a.b.debian.org", 80, ips(&["151.101.2.132"]), Dial("151.101.2.132:80")),
            // ...but not the apex, nor a name that merely ends with the same letters.
            (&standard, "debian.org", 80, ips(&["151.101.2.132"]), Refuse("no rule matched")),
            (&standard, "evildebian.org", 80, ips(&["151.101.2.132"]), Refuse("no rule matched")),
            // A matching IP rule does not exempt the loopback class.
            (&standard, "127.0.0.1", 8080, ips(&["127.0.0.1"]),
                Refuse("egress to 127.0.0.1:8080 refused: address 127.0.0.1 is loopback and no cidr rule allows it")),
            // Decided on the resolved address: an allowed name pointing at loopback is refused.
            (&standard, "localhost", 8080, ips(&["127.0.0.1"]),
                Refuse("egress to localhost:8080 refused: address 127.0.0.1 is loopback")),
            (&standard, "internal.example", 443, ips(&["192.168.1.10"]), Refuse("192.168.1.10 is private")),
            (&standard, "internal.example", 443, ips(&["172.20.0.1"]), Refuse("172.20.0.1 is private")),
            (&standard, "internal.example", 443, ips(&["169.254.169.254"]), Refuse("169.254.169.254 is link-local")),
            (&standard, "internal.example", 443, ips(&["0.0.0.0"]), Refuse("0.0.0.0 is unspecified")),
            (&standard, "internal.example", 443, ips(&["224.0.0.1"]), Refuse("224.0.0.1 is multicast")),
            (&standard, "internal.example", 443, ips(&["255.255.255.255"]), Refuse("255.255.255.255 is broadcast")),
            (&standard, "internal.example", 443, ips(&["fd12::1"]), Refuse("fd12::1 is private")),
            (&standard, "internal.example", 443, ips(&["fe80::1"]), Refuse("fe80::1 is link-local")),
            (&standard, "internal.example", 443, ips(&["::"]), Refuse(":: is unspecified")),
            (&standard, "internal.example", 443, ips(&["ff02::1"]), Refuse("ff02::1 is multicast")),
            (&standard, "::1", 80, ips(&["::1"]), Refuse("egress to [::1]:80 refused: address ::1 is loopback")),
            // An IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
            (&standard, "internal.example", 443, ips(&["::ffff:127.0.0.1"]), Refuse("is loopback")),
            (&standard, "10.1.2.3", 22, ips(&["10.1.2.3"]), Refuse("10.1.2.3 is private")),
            // IPv6 and IPv4-in-IPv6 forms of the same forbidden targets (the name is an
            // allowed IP literal or an allowed name that resolves to the form).
            (&standard, "[::1]", 80, ips(&["::1"]), Refuse("egress to [::1]:80 refused: address ::1 is loopback")),
            (&standard, "internal.example", 443, ips(&["0:0:0:0:0:0:0:1"]), Refuse("::1 is loopback")),
            (&standard, "internal.example", 443, ips(&["::ffff:7f00:1"]), Refuse("::ffff:127.0.0.1 is loopback")),
            (&standard, "internal.example", 443, ips(&["::ffff:169.254.169.254"]), Refuse("is link-local")),
            (&standard, "internal.example", 443, ips(&["::ffff:192.168.1.1"]), Refuse("is private")),
            (&standard, "internal.example", 443, ips(&["::ffff:10.0.0.1"]), Refuse("is private")),
            (&standard, "internal.example", 443, ips(&["::ffff:0.0.0.0"]), Refuse("is unspecified")),
            (&standard, "internal.example", 443, ips(&["::127.0.0.1"]), Refuse("::7f00:1 is loopback")),
            (&standard, "internal.example", 443, ips(&["64:ff9b::7f00:1"]), Refuse("64:ff9b::7f00:1 is loopback")),
            (&standard, "internal.example", 443, ips(&["64:ff9b::a9fe:a9fe"]), Refuse("is link-local")),
            (&standard, "internal.example", 443, ips(&["2002:c0a8:101::1"]), Refuse("2002:c0a8:101::1 is private")),
            (&standard, "internal.example", 443, ips(&["2002:7f00:1::"]), Refuse("is loopback")),
            (&standard, "internal.example", 443, ips(&["fe80::1:2"]), Refuse("is link-local")),
            (&standard, "internal.example", 443, ips(&["febf:ffff::1"]), Refuse("is link-local")),
            (&standard, "internal.example", 443, ips(&["fc00::1"]), Refuse("fc00::1 is private")),
            (&standard, "internal.example", 443, ips(&["fec0::1"]), Refuse("fec0::1 is private")),
            (&standard, "internal.example", 443, ips(&["100.64.0.1"]), Refuse("100.64.0.1 is private")),
            (&standard, "internal.example", 443, ips(&["100.127.255.254"]), Refuse("is private")),
            // Public neighbours of those ranges, and public addresses inside the embeddings.
            (&standard, "internal.example", 443, ips(&["100.128.0.1"]), Dial("100.128.0.1:443")),
            (&standard, "internal.example", 443, ips(&["2606:4700::1111"]), Dial("[2606:4700::1111]:443")),
            (&standard, "internal.example", 443, ips(&["64:ff9b::5db8:d822"]), Dial("[64:ff9b::5db8:d822]:443")),
            (&standard, "internal.example", 443, ips(&["::ffff:93.184.216.34"]), Dial("[::ffff:93.184.216.34]:443")),
            // Every loopback form of the agent's own host is refused, the first one named.
            (&standard, "internal.example", 443, ips(&["::1", "127.0.0.1", "::ffff:127.0.0.1"]), Refuse("address ::1 is loopback")),
            // A public address among forbidden ones is the one dialled.
            (&standard, "internal.example", 443, ips(&["10.0.0.1", "93.184.216.34"]), Dial("93.184.216.34:443")),
            // Nothing resolved.
            (&standard, "github.com", 443, vec![], Refuse("resolved to no address")),
            // Port 0 is never a destination.
            (&standard, "127.0.0.1", 0, ips(&["127.0.0.1"]), Refuse("port 0")),
            // cidr entries exempt exactly their ranges.
            (&with_cidrs, "127.0.0.1", 8080, ips(&["127.0.0.1"]), Dial("127.0.0.1:8080")),
            (&with_cidrs, "localhost", 18080, ips(&["::1", "127.0.0.1"]), Dial("127.0.0.1:18080")),
            (&with_cidrs, "localhost", 18080, ips(&["::1"]), Refuse("address ::1 is loopback")),
            (&with_cidrs, "internal.example", 443, ips(&["10.200.0.5"]), Dial("10.200.0.5:443")),
            (&with_cidrs, "internal.example", 443, ips(&["192.168.0.5"]), Refuse("192.168.0.5 is private")),
            (&with_cidrs, "internal.example", 443, ips(&["fd00::5"]), Dial("[fd00::5]:443")),
            (&with_cidrs, "internal.example", 443, ips(&["::ffff:10.0.0.9"]), Dial("[::ffff:10.0.0.9]:443")),
            (&with_cidrs, "localhost", 80, ips(&["::ffff:127.0.0.1"]), Dial("[::ffff:127.0.0.1]:80")),
            // A cidr entry exempts its own family's form only: NAT64 and 6to4 encodings of
            // 127.0.0.1 stay refused under cidr:127.0.0.0/8.
            (&with_cidrs, "localhost", 80, ips(&["64:ff9b::7f00:1"]), Refuse("is loopback")),
            (&with_cidrs, "localhost", 80, ips(&["2002:7f00:1::"]), Refuse("is loopback")),
            // A cidr entry alone does not allow a name no host rule lists.
            (&with_cidrs, "other.example", 443, ips(&["10.0.0.1"]), Refuse("no rule matched")),
            // The empty policy allows nothing.
            (&[], "github.com", 443, ips(&["140.82.121.4"]), Refuse("no rule matched")),
        ];
        for (entries, host, port, resolved, want) in cases {
            let got = decide(&policy(entries), host, port, &resolved);
            match (want, got) {
                (Dial(addr), Ok(got)) => {
                    assert_eq!(got, addr.parse::<SocketAddr>().unwrap(), "{host}:{port}")
                }
                (Refuse(text), Err(e)) => {
                    assert!(e.is_policy(), "{host}:{port}: {e}");
                    assert!(
                        e.to_string().contains(text),
                        "{host}:{port}: {e:?} lacks {text:?}"
                    );
                }
                (Dial(addr), Err(e)) => panic!("{host}:{port}: wanted {addr}, refused: {e}"),
                (Refuse(text), Ok(got)) => panic!("{host}:{port}: wanted {text:?}, got {got}"),
            }
        }
    }

    #[test]
    fn rule_parse_errors_name_the_entry() {
        let cases = [
            ("github.com", "egress rule \"github.com\" has no port"),
            ("github.com:0", "has port \"0\""),
            ("github.com:https", "has port \"https\""),
            (":443", "has host \"\""),
            ("git hub.com:443", "has host \"git hub.com\""),
            ("*.:80", "has host \"*.\""),
            ("cidr:10.0.0.0/33", "prefix length \"33\" is not 0-32"),
            (
                "cidr:10.0.0.1/8",
                "10.0.0.1 has bits set beyond the /8 prefix",
            ),
            ("cidr:localhost", "\"localhost\" is not an IP address"),
        ];
        for (entry, text) in cases {
            let err = EgressPolicy::parse([entry]).unwrap_err().to_string();
            assert!(err.contains(text), "{entry}: {err:?} lacks {text:?}");
            assert!(!err.ends_with('.'), "{err}");
        }
    }

    #[test]
    fn policy_round_trips_through_strings() {
        let entries = [
            "github.com:443",
            "*.debian.org:80",
            "127.0.0.1:*",
            "[::1]:8080",
            "cidr:127.0.0.0/8",
            "cidr:::1/128",
        ];
        let parsed = policy(&entries);
        let back: Vec<String> = parsed.clone().into();
        assert_eq!(back, entries);
        let json = serde_json::to_string(&parsed).unwrap();
        let again: EgressPolicy = serde_json::from_str(&json).unwrap();
        assert_eq!(again, parsed);
        let bad = serde_json::from_str::<EgressPolicy>(r#"["github.com"]"#).unwrap_err();
        assert!(bad.to_string().contains("has no port"), "{bad}");
    }

    #[tokio::test]
    async fn dial_connects_to_an_allowed_loopback_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let allowed = policy(&["localhost:*", "cidr:127.0.0.0/8"]);
        let (stream, addr) = dial(&allowed, "localhost", port, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));
        assert!(stream.nodelay().unwrap());
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, stream.local_addr().unwrap());
    }

    #[tokio::test]
    async fn dial_refuses_loopback_without_a_cidr_rule() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let err = dial(
            &policy(&["localhost:*"]),
            "localhost",
            port,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(err.is_policy());
        assert!(err.to_string().contains("is loopback"), "{err}");
    }

    /// The resolver turns numeric spellings (`2130706433`, `0x7f000001`, `127.1`,
    /// `017700000001`) and IPv6 literals into loopback addresses; an allowlist entry for the
    /// spelling does not exempt the address, a cidr entry does.
    #[tokio::test]
    async fn dial_judges_numeric_and_ipv6_spellings_by_their_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let names = [
            "2130706433",
            "0x7f000001",
            "127.1",
            "017700000001",
            "localhost",
            "[::1]",
            "[::ffff:127.0.0.1]",
            "[0:0:0:0:0:0:0:1]",
        ];
        let entries: Vec<String> = names.iter().map(|n| format!("{n}:*")).collect();
        let no_cidr = EgressPolicy::parse(&entries).unwrap();
        for name in names {
            let err = dial(&no_cidr, name, port, Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(err.is_policy(), "{name}: {err}");
            assert!(err.to_string().contains("is loopback"), "{name}: {err}");
        }
        let with_cidr = EgressPolicy::parse(
            entries
                .iter()
                .map(String::as_str)
                .chain(["cidr:127.0.0.0/8"]),
        )
        .unwrap();
        for name in ["2130706433", "0x7f000001", "127.1", "[::ffff:127.0.0.1]"] {
            let (_stream, addr) = dial(&with_cidr, name, port, Duration::from_secs(5))
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(addr.port(), port, "{name}");
            assert!(
                classify(addr.ip()) == Some(AddressClass::Loopback),
                "{name}: {addr}"
            );
        }
    }

    #[tokio::test]
    async fn dial_reports_a_closed_port_as_a_connect_failure() {
        // Bind then drop, so the port is very likely closed.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = dial(
            &policy(&["127.0.0.1:*", "cidr:127.0.0.1"]),
            "127.0.0.1",
            port,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(!err.is_policy());
        assert!(matches!(err, EgressRefusal::Connect { .. }), "{err:?}");
    }
}
