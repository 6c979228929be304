//! Who is calling.
//!
//! A [`KeyExtractor`] turns a request into a [`Key`]: a fixed-size, `Copy` value that limiters
//! and budgets index by. Built-ins:
//!
//! | extractor | key |
//! |---|---|
//! | [`ApiKey`] | `Authorization: Bearer …` or `x-api-key`, kept only as a keyed-hash [`Fingerprint`] |
//! | [`PeerIp`] | the TCP peer address (IPv6 grouped by /64) |
//! | [`ClientIp`] | the client address from `X-Forwarded-For` or `Forwarded`, read from the right, skipping only trusted proxies |
//! | [`HeaderKey`] | any header's value, hashed |
//! | [`ExtensionKey`] | a value your own auth put in the request extensions |
//! | [`Tenant`] | the tenant of the [`Caller`] |
//! | [`Model`] | the request's `model` (needs the parsed body) |
//! | [`Global`] | one key for everyone |
//! | `(A, B)` | both, combined |
//!
//! The first layer that identifies a request stores a [`Caller`] in its extensions
//! ([`CallerResolver::resolve`]); later layers and the audit log reuse it, so all agree on who
//! called. An authenticating layer (like the gateway's virtual keys) may insert a richer `Caller`
//! first.
//!
//! ```
//! use moat_core::identity::{ApiKey, ClientIp, KeyExtractor, PeerAddr};
//! use std::net::SocketAddr;
//!
//! let mut req = http::Request::builder()
//!     .header("authorization", "Bearer sk-live-123")
//!     .header("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.2")
//!     .body(())
//!     .unwrap();
//! req.extensions_mut().insert(PeerAddr("10.0.0.1:5000".parse::<SocketAddr>().unwrap()));
//!
//! let key = ApiKey::default().extract_from(&req).unwrap();
//! assert!(!key.to_string().contains("sk-live"));
//!
//! // Trust only our own proxies: the spoofed left-most entry is never the key.
//! let ip = ClientIp::new(["10.0.0.0/8".parse().unwrap()]);
//! assert_eq!(ip.client_ip(&req), Some("203.0.113.9".parse().unwrap()));
//! ```

use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use hmac::{Hmac, Mac};
use http::header::{HeaderName, AUTHORIZATION};
use http::Request;
use ipnet::IpNet;
use sha2::Sha256;

use crate::hex::Hex;

/// What kind of identity a [`Key`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum KeyKind {
    /// An API key fingerprint.
    ApiKey,
    /// An IP address or IPv6 /64.
    Ip,
    /// A hashed header value.
    Header,
    /// A hashed request extension.
    Extension,
    /// A hashed tenant name.
    Tenant,
    /// Everyone.
    Global,
    /// Two keys combined.
    Composite,
    /// A hashed model name.
    Model,
}

/// A rate-limit or budget key: fixed-size and `Copy`, never holding a raw secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    kind: KeyKind,
    id: [u8; 16],
}

impl Key {
    /// A key from its parts.
    pub const fn new(kind: KeyKind, id: [u8; 16]) -> Self {
        Self { kind, id }
    }

    /// The key for everyone.
    pub const GLOBAL: Key = Key::new(KeyKind::Global, [0; 16]);

    /// The key of an IP: IPv4 (and IPv4-mapped IPv6) as itself, other IPv6 as its /64.
    pub fn ip(ip: IpAddr) -> Self {
        let id = match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                octets
            }
        };
        Self::new(KeyKind::Ip, id)
    }

    /// What kind of identity this is.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The 16 identifying bytes.
    pub fn id(&self) -> &[u8; 16] {
        &self.id
    }

    /// A stable digest of the key for shared stores (Redis key names): the same in every
    /// process, and an IP is not readable from it.
    pub fn digest(&self) -> [u8; 16] {
        let mut hasher = <Sha256 as sha2::Digest>::new();
        sha2::Digest::update(&mut hasher, b"moat key digest");
        sha2::Digest::update(&mut hasher, [self.kind as u8]);
        sha2::Digest::update(&mut hasher, self.id);
        truncate(&sha2::Digest::finalize(hasher))
    }

    /// The name of this key's state in a shared store: `PREFIX{SCOPE:DIGEST}`. The braces are a
    /// Redis Cluster hash tag, so everything of one scope and key lives in one slot; braces in
    /// `scope` are replaced so they cannot break the tag.
    pub fn hash_tagged(&self, prefix: &str, scope: &str) -> String {
        use std::fmt::Write;
        let mut name = String::with_capacity(prefix.len() + scope.len() + 36);
        name.push_str(prefix);
        name.push('{');
        name.extend(
            scope
                .chars()
                .map(|c| if c == '{' || c == '}' { '_' } else { c }),
        );
        name.push(':');
        let _ = write!(name, "{}", Hex(&self.digest()));
        name.push('}');
        name
    }

    /// Both keys at once, e.g. per key and model.
    pub fn combine(self, other: Key) -> Key {
        let mut hasher = <Sha256 as sha2::Digest>::new();
        sha2::Digest::update(&mut hasher, [self.kind as u8]);
        sha2::Digest::update(&mut hasher, self.id);
        sha2::Digest::update(&mut hasher, [other.kind as u8]);
        sha2::Digest::update(&mut hasher, other.id);
        let digest = sha2::Digest::finalize(hasher);
        Key::new(KeyKind::Composite, truncate(&digest))
    }
}

fn truncate(digest: &[u8]) -> [u8; 16] {
    let mut id = [0; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

impl fmt::Display for Key {
    /// A stable, secret-free rendering: `api_key:3f9a…`, `ip:203.0.113.9`, `ip:2001:db8::/64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.kind {
            KeyKind::ApiKey => "api_key",
            KeyKind::Ip => {
                let v6 = Ipv6Addr::from(self.id);
                return match v6.to_ipv4_mapped() {
                    Some(v4) => write!(f, "ip:{v4}"),
                    None => write!(f, "ip:{v6}/64"),
                };
            }
            KeyKind::Header => "header",
            KeyKind::Extension => "extension",
            KeyKind::Tenant => "tenant",
            KeyKind::Global => return f.write_str("global"),
            KeyKind::Composite => "composite",
            KeyKind::Model => "model",
        };
        write!(f, "{prefix}:")?;
        Hex(&self.id).fmt(f)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

/// A keyed hash of a secret (an API key): equal secrets give equal fingerprints, and the secret
/// cannot be read back. Renders as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 16]);

impl Fingerprint {
    /// The fingerprint's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The rate-limit key of this fingerprint.
    pub fn key(&self) -> Key {
        Key::new(KeyKind::ApiKey, self.0)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Hex(&self.0).fmt(f)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Makes [`Fingerprint`]s with HMAC-SHA256 under a secret.
///
/// Processes that share state (several gateways on one Redis) must use the same secret, or they
/// will not agree on keys. The default secret is a fixed, public value: it still hides the API
/// key (they are long random strings), but set your own so fingerprints in logs cannot be matched
/// against other deployments.
#[derive(Clone)]
pub struct Fingerprinter {
    mac: Hmac<Sha256>,
}

impl Fingerprinter {
    /// A fingerprinter with this secret.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            mac: <Hmac<Sha256> as Mac>::new_from_slice(secret)
                .expect("HMAC takes a key of any length"),
        }
    }

    /// The fingerprint of `value`.
    pub fn fingerprint(&self, value: &[u8]) -> Fingerprint {
        let mut mac = self.mac.clone();
        mac.update(value);
        Fingerprint(truncate(&mac.finalize().into_bytes()))
    }

    fn hash(&self, domain: &[u8], value: &[u8]) -> [u8; 16] {
        let mut mac = self.mac.clone();
        mac.update(domain);
        mac.update(&[0]);
        mac.update(value);
        truncate(&mac.finalize().into_bytes())
    }
}

impl Default for Fingerprinter {
    fn default() -> Self {
        Self::new(b"moat default fingerprint secret: set your own")
    }
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter { .. }")
    }
}

/// Why no key could be extracted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The request does not carry what the extractor reads, e.g. no API key.
    Missing(&'static str),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Missing(what) => write!(f, "request has no {what}"),
        }
    }
}

impl std::error::Error for KeyError {}

/// A borrowed view of a request's head: what extractors read, whatever the body type.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a http::Method,
    /// The URI.
    pub uri: &'a http::Uri,
    /// The headers.
    pub headers: &'a http::HeaderMap,
    /// The extensions.
    pub extensions: &'a http::Extensions,
}

impl<'a> RequestHead<'a> {
    /// The head of `req`.
    pub fn of<B>(req: &'a Request<B>) -> Self {
        Self {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }
}

/// Turns a request into a [`Key`]. Object-safe, so layers can hold `Arc<dyn KeyExtractor>`.
pub trait KeyExtractor: Send + Sync + fmt::Debug + 'static {
    /// The key of this request.
    fn extract(&self, req: &RequestHead<'_>) -> Result<Key, KeyError>;

    /// Whether the extractor reads the parsed body (a [`SharedLlmRequest`] in the extensions), so
    /// a layer must parse the body before extracting.
    ///
    /// [`SharedLlmRequest`]: crate::request::SharedLlmRequest
    fn needs_body(&self) -> bool {
        false
    }

    /// The key of a whole request.
    fn extract_from<B>(&self, req: &Request<B>) -> Result<Key, KeyError>
    where
        Self: Sized,
    {
        self.extract(&RequestHead::of(req))
    }
}

impl<K: KeyExtractor + ?Sized> KeyExtractor for Arc<K> {
    fn extract(&self, req: &RequestHead<'_>) -> Result<Key, KeyError> {
        (**self).extract(req)
    }

    fn needs_body(&self) -> bool {
        (**self).needs_body()
    }
}

impl<A: KeyExtractor, B: KeyExtractor> KeyExtractor for (A, B) {
    fn extract(&self, req: &RequestHead<'_>) -> Result<Key, KeyError> {
        Ok(self.0.extract(req)?.combine(self.1.extract(req)?))
    }

    fn needs_body(&self) -> bool {
        self.0.needs_body() || self.1.needs_body()
    }
}

/// `x-api-key`, pre-parsed: looking a header up by `&str` parses the name every time.
static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The presented API key: `Authorization: Bearer …`, else `x-api-key`.
pub fn presented_api_key(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let value = value.trim();
        if value.len() > 7 && value[..7].eq_ignore_ascii_case("bearer ") {
            let token = value[7..].trim();
            if !token.is_empty() {
                return Some(token);
            }
        }
    }
    headers
        .get(&X_API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Keys by the API key's fingerprint (the [`Caller`]'s, when one is stored).
#[derive(Debug, Clone, Default)]
pub struct ApiKey {
    fingerprinter: Fingerprinter,
}

impl ApiKey {
    /// Fingerprints with this fingerprinter.
    pub fn new(fingerprinter: Fingerprinter) -> Self {
        Self { fingerprinter }
    }
}

impl KeyExtractor for ApiKey {
    fn extract(&self, req: &RequestHead<'_>) -> Result<Key, KeyError> {
        if let Some(fp) = req.extensions.get::<Caller>().and_then(|c| c.api_key) {
            return Ok(fp.key());
        }
        presented_api_key(req.headers)
            .map(|key| self.fingerprinter.fingerprint(key.as_bytes()).key())
            .ok_or(KeyError::Missing("API key"))
    }
}

/// The TCP peer address, for servers that are not axum or tonic (those are read directly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The TCP peer's IP, from [`PeerAddr`], axum's `ConnectInfo<SocketAddr>` (feature `axum`) or
/// tonic's `TcpConnectInfo` (feature `tonic`).
pub fn peer_ip(extensions: &http::Extensions) -> Option<IpAddr> {
    if let Some(PeerAddr(addr)) = extensions.get::<PeerAddr>() {
        return Some(addr.ip());
    }
    #[cfg(feature = "axum")]
    if let Some(info) = extensions.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(info.0.ip());
    }
    #[cfg(feature = "tonic")]
    if let Some(addr) = extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
    {
        return Some(addr.ip());
    }
    None
}

/// Keys by the TCP peer's IP.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerIp;

impl KeyExtractor for PeerIp {
    fn extract(&self, req: &RequestHead<'_>) -> Result<Key, KeyError> {
        peer_ip(req.extensions)
            .map(Key::ip)
            .ok_or(KeyError::Missing("peer address"))
    }
}

/// Which header carries the proxy chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

/// Keys by the client IP behind trusted proxies.
///
/// The chain is the forwarded header's entries followed by the TCP peer. It is read from the
/// right: while the current hop is a trusted proxy, step one entry left; the first untrusted hop
/// is the client. So a client can prepend anything it likes to the header and it is never used,
/// and with no trusted proxies this is just the peer address. An unparsable entry stops the walk
/// at the last trusted hop.
#[derive(Debug, Clone, Default)]
pub struct ClientIp {
    trusted: Arc<[IpNet]>,
    header: ForwardedHeader,
}

impl ClientIp {
    /// Trusts these proxy networks.
    pub fn new(trusted: impl IntoIterator<Item = IpNet>) -> Self {
        Self {
            trusted: trusted.into_iter().collect(),
            header: ForwardedHeader::default(),
        }
    }

    /// Reads this header instead of `X-Forwarded-For`.
    #[must_use]
    pub fn with_header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client IP of this request, if the peer address is known.
    pub fn client_ip<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        self.client_ip_of(&RequestHead::of(req))
    }

    /// The client IP of a request head, if the peer address is known.
    pub fn client_ip_of(&self, req: &RequestHead<'_>) -> Option<IpAddr> {
        let peer = peer_ip(req.extensions)?;
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        // Walk from the right without collecting: the last header line's last entry first.
        let name = match self.header {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        };
        let hops = req
            .headers
            .get_all(name)
            .iter()
            .rev()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.rsplit(','));
        Some(match self.header {
            ForwardedHeader::XForwardedFor => self.walk(peer, hops),
            ForwardedHeader::Forwarded => self.walk(peer, hops.map(forwarded_for)),
        })
    }

    /// The first untrusted hop from the right, starting at a trusted `peer`.
    fn walk<'a>(&self, peer: IpAddr, hops: impl Iterator<Item = &'a str>) -> IpAddr {
        let mut current = peer;
        for hop in hops {
            match parse_hop(hop) {
                Some(ip) => {
                    current = ip;
                    if !self.is_trusted(ip) {
                        return ip;
                    }
                }
                None => return current,
            }
        }
        current
    }
}

impl KeyExtractor for ClientIp {
    fn extract(&self, req: &RequestHead<'_>) -> Result<Key, KeyError> {
        if let Some(ip) = req.extensions.get::<Caller>().and_then(|c| c.ip) {
            return Ok(Key::ip(ip));
        }
        self.client_ip_of(req)
            .map(Key::ip)
            .ok_or(KeyError::Missing("peer address"))
    }
}

/// The `for=` parameter of one `Forwarded` element, or `""`.
fn forwarded_for(element: &str) -> &str {
    element
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
        .map_or("", |(_, value)| value.trim())
}

/// One hop: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`, optionally quoted.
fn parse_hop(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim().trim_matches('"');
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    entry
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(ip, _)| ip.parse().ok())
}

/// Keys by a header's value (hashed; a missing header is an error).
#[derive(Debug, Clone)]
pub struct HeaderKey {
    name: HeaderName,
    fingerprinter: Fingerprinter,
}

impl HeaderKey {
    /// Keys by this header.
    pub fn new(name: HeaderName) -> Self {
        Self {
            name,
            fingerprinter: Fingerprinter::default(),
        }
    }
}

impl KeyExtractor for HeaderKey {
    fn extract(&self, req: &RequestHead<'_>) -> Result<Key, KeyError> {
        let value = req
            .headers
            .get(&self.name)
            .ok_or(KeyError::Missing("key header"))?;
        let id = self
            .fingerprinter
            .hash(self.name.as_str().as_bytes(), value.as_bytes());
        Ok(Key::new(KeyKind::Header, id))
    }
}

/// Keys by a value of type `T` that your own middleware put in the request extensions.
pub struct ExtensionKey<T> {
    fingerprinter: Fingerprinter,
    _marker: std::marker::PhantomData<fn() -> T>,
}

impl<T> ExtensionKey<T> {
    /// Keys by the `T` in the extensions.
    pub fn new() -> Self {
        Self {
            fingerprinter: Fingerprinter::default(),
            _marker: std::marker::PhantomData,
        }
    }
}

impl<T> Default for ExtensionKey<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for ExtensionKey<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for ExtensionKey<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExtensionKey<{}>", std::any::type_name::<T>())
    }
}

impl<T> KeyExtractor for ExtensionKey<T>
where
    T: AsRef<[u8]> + Send + Sync + 'static,
{
    fn extract(&self, req: &RequestHead<'_>) -> Result<Key, KeyError> {
        let value = req
            .extensions
            .get::<T>()
            .ok_or(KeyError::Missing("key extension"))?;
        let id = self
            .fingerprinter
            .hash(std::any::type_name::<T>().as_bytes(), value.as_ref());
        Ok(Key::new(KeyKind::Extension, id))
    }
}

/// Keys by the [`Caller`]'s tenant.
#[derive(Debug, Clone, Default)]
pub struct Tenant {
    fingerprinter: Fingerprinter,
}

impl KeyExtractor for Tenant {
    fn extract(&self, req: &RequestHead<'_>) -> Result<Key, KeyError> {
        let tenant = req
            .extensions
            .get::<Caller>()
            .and_then(|c| c.tenant.as_deref())
            .ok_or(KeyError::Missing("tenant"))?;
        Ok(Key::new(
            KeyKind::Tenant,
            self.fingerprinter.hash(b"tenant", tenant.as_bytes()),
        ))
    }
}

/// Keys by the request's `model` (from the parsed body; see [`KeyExtractor::needs_body`]).
#[derive(Debug, Clone, Default)]
pub struct Model {
    fingerprinter: Fingerprinter,
}

impl KeyExtractor for Model {
    fn extract(&self, req: &RequestHead<'_>) -> Result<Key, KeyError> {
        let llm = req
            .extensions
            .get::<crate::request::SharedLlmRequest>()
            .ok_or(KeyError::Missing("parsed body"))?;
        llm.with(|r| {
            r.model()
                .map(|m| {
                    Key::new(
                        KeyKind::Model,
                        self.fingerprinter.hash(b"model", m.as_bytes()),
                    )
                })
                .ok_or(KeyError::Missing("model"))
        })
    }

    fn needs_body(&self) -> bool {
        true
    }
}

/// One key for every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

impl KeyExtractor for Global {
    fn extract(&self, _req: &RequestHead<'_>) -> Result<Key, KeyError> {
        Ok(Key::GLOBAL)
    }
}

/// Who called, as every layer and the audit log see it.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Caller {
    /// A name given by the authenticating layer, e.g. the gateway's virtual key id.
    pub id: Option<Arc<str>>,
    /// The fingerprint of the presented API key.
    pub api_key: Option<Fingerprint>,
    /// The tenant the caller belongs to.
    pub tenant: Option<Arc<str>>,
    /// The caller's tier, e.g. `free`.
    pub tier: Option<Arc<str>>,
    /// The client IP.
    pub ip: Option<IpAddr>,
    /// Whether a [`CallerResolver`] has looked for the key and found the IP already (the key
    /// may be absent), so later layers only read what is stored.
    resolved: bool,
}

/// Callers are equal when what they say is: whether a resolver has run does not count.
impl PartialEq for Caller {
    fn eq(&self, other: &Self) -> bool {
        let Self {
            id,
            api_key,
            tenant,
            tier,
            ip,
            resolved: _,
        } = self;
        *id == other.id
            && *api_key == other.api_key
            && *tenant == other.tenant
            && *tier == other.tier
            && *ip == other.ip
    }
}

impl Eq for Caller {}

impl Caller {
    /// An empty caller; fill the fields with the `with_*` methods.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the id.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<Arc<str>>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the tenant.
    #[must_use]
    pub fn with_tenant(mut self, tenant: impl Into<Arc<str>>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Sets the tier.
    #[must_use]
    pub fn with_tier(mut self, tier: impl Into<Arc<str>>) -> Self {
        self.tier = Some(tier.into());
        self
    }

    /// Sets the API key fingerprint.
    #[must_use]
    pub fn with_api_key(mut self, fingerprint: Fingerprint) -> Self {
        self.api_key = Some(fingerprint);
        self
    }

    /// Sets the client IP.
    #[must_use]
    pub fn with_ip(mut self, ip: IpAddr) -> Self {
        self.ip = Some(ip);
        self
    }

    /// Whether the caller's tier is one of `tiers`; no tiers admit every caller.
    pub fn in_tiers(&self, tiers: &[String]) -> bool {
        tiers.is_empty()
            || self
                .tier
                .as_deref()
                .is_some_and(|t| tiers.iter().any(|x| x == t))
    }
}

/// Builds the [`Caller`] of a request the first time a layer asks, and stores it.
#[derive(Debug, Clone, Default)]
pub struct CallerResolver {
    fingerprinter: Fingerprinter,
    client_ip: ClientIp,
}

impl CallerResolver {
    /// Fingerprints keys with `fingerprinter` and finds the client IP with `client_ip`.
    pub fn new(fingerprinter: Fingerprinter, client_ip: ClientIp) -> Self {
        Self {
            fingerprinter,
            client_ip,
        }
    }

    /// How API keys are fingerprinted.
    pub fn fingerprinter(&self) -> &Fingerprinter {
        &self.fingerprinter
    }

    /// How the client IP is found.
    pub fn client_ip(&self) -> &ClientIp {
        &self.client_ip
    }

    /// The request's [`Caller`]: the stored one, or a new one (then stored). Missing fields of a
    /// stored caller (API key, IP) are filled in, once: when a resolver has found the client's
    /// IP, later layers read the stored caller as it is (a request without an API key is not
    /// searched for one again), so every layer of a stack should share one resolver, as the
    /// layers' `with_caller_resolver` and the gateway arrange.
    pub fn resolve<B>(&self, req: &mut Request<B>) -> Caller {
        let stored = req.extensions().get::<Caller>();
        if let Some(caller) = stored {
            if caller.resolved || (caller.api_key.is_some() && caller.ip.is_some()) {
                crate::decision::Decisions::identify(req.extensions(), caller);
                return caller.clone();
            }
        }
        let mut caller = stored.cloned().unwrap_or_default();
        if caller.api_key.is_none() {
            caller.api_key = presented_api_key(req.headers())
                .map(|key| self.fingerprinter.fingerprint(key.as_bytes()));
        }
        if caller.ip.is_none() {
            caller.ip = self.client_ip.client_ip(req);
        }
        // Without an IP (no peer address yet), a later layer may still find one.
        caller.resolved = caller.ip.is_some();
        crate::decision::Decisions::identify(req.extensions(), &caller);
        req.extensions_mut().insert(caller.clone());
        caller
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)], peer: &str) -> Request<()> {
        let mut builder = Request::builder();
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut req = builder.body(()).unwrap();
        req.extensions_mut().insert(PeerAddr(peer.parse().unwrap()));
        req
    }

    fn trusting(nets: &[&str]) -> ClientIp {
        ClientIp::new(nets.iter().map(|n| n.parse().unwrap()))
    }

    #[test]
    fn api_key_from_bearer_or_x_api_key_is_fingerprinted() {
        let a = request(&[("authorization", "Bearer sk-abc")], "1.1.1.1:1");
        let b = request(&[("x-api-key", "sk-abc")], "2.2.2.2:2");
        let c = request(&[("authorization", "bearer   sk-other ")], "1.1.1.1:1");
        let ex = ApiKey::default();
        let ka = ex.extract_from(&a).unwrap();
        assert_eq!(ka, ex.extract_from(&b).unwrap());
        assert_ne!(ka, ex.extract_from(&c).unwrap());
        assert_eq!(ka.kind(), KeyKind::ApiKey);
        assert!(!format!("{ka} {ka:?}").contains("abc"));
        let other_secret = ApiKey::new(Fingerprinter::new(b"s2"))
            .extract_from(&a)
            .unwrap();
        assert_ne!(ka, other_secret);
        let none = request(&[("authorization", "Basic Zm9vOmJhcg==")], "1.1.1.1:1");
        assert_eq!(ex.extract_from(&none), Err(KeyError::Missing("API key")));
        assert_eq!(
            ex.extract_from(&request(&[("authorization", "Bearer ")], "1.1.1.1:1")),
            Err(KeyError::Missing("API key"))
        );
    }

    #[test]
    fn ipv6_is_grouped_by_64_and_mapped_v4_is_v4() {
        let a = Key::ip("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = Key::ip("2001:db8:1:2:bbbb::2".parse().unwrap());
        let c = Key::ip("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "ip:2001:db8:1:2::/64");
        let v4 = Key::ip("192.0.2.1".parse().unwrap());
        assert_eq!(v4, Key::ip("::ffff:192.0.2.1".parse().unwrap()));
        assert_eq!(v4.to_string(), "ip:192.0.2.1");
        assert_eq!(v4.digest(), Key::ip("192.0.2.1".parse().unwrap()).digest());
        let name = v4.hash_tagged("moat:rl:", "per{ip}");
        assert!(
            name.starts_with("moat:rl:{per_ip_:") && name.ends_with('}') && !name.contains("192.0"),
            "{name}"
        );
        assert_ne!(v4.digest(), a.digest());
        let ex = PeerIp;
        assert_eq!(
            ex.extract_from(&request(&[], "[2001:db8:1:2::9]:80"))
                .unwrap(),
            a
        );
    }

    #[test]
    fn spoofed_forwarded_for_never_becomes_the_key() {
        let ex = trusting(&["10.0.0.0/8"]);
        // A client at 203.0.113.9 prepends a spoofed entry; our proxy 10.0.0.2 appends the real one.
        let req = request(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9")], "10.0.0.2:1");
        assert_eq!(ex.client_ip(&req), Some("203.0.113.9".parse().unwrap()));
        // The header is ignored when the peer itself is not a trusted proxy.
        let direct = request(&[("x-forwarded-for", "1.2.3.4")], "198.51.100.7:1");
        assert_eq!(ex.client_ip(&direct), Some("198.51.100.7".parse().unwrap()));
        // No trusted proxies at all: always the peer.
        assert_eq!(
            ClientIp::default().client_ip(&req),
            Some("10.0.0.2".parse().unwrap())
        );
        // Several proxy hops and several header lines.
        let chain = request(
            &[
                ("x-forwarded-for", "6.6.6.6, 203.0.113.5"),
                ("x-forwarded-for", "10.1.1.1, 10.2.2.2"),
            ],
            "10.3.3.3:1",
        );
        assert_eq!(ex.client_ip(&chain), Some("203.0.113.5".parse().unwrap()));
        // Garbage stops the walk at the last trusted hop, never skipping past it.
        let garbage = request(
            &[("x-forwarded-for", "6.6.6.6, not-an-ip, 10.2.2.2")],
            "10.3.3.3:1",
        );
        assert_eq!(ex.client_ip(&garbage), Some("10.2.2.2".parse().unwrap()));
        // Everything trusted: the left-most trusted hop.
        let all = request(&[("x-forwarded-for", "10.9.9.9")], "10.3.3.3:1");
        assert_eq!(ex.client_ip(&all), Some("10.9.9.9".parse().unwrap()));
    }

    #[test]
    fn rfc7239_forwarded_with_ports_and_ipv6() {
        let ex = trusting(&["192.0.2.0/24"]).with_header(ForwardedHeader::Forwarded);
        let req = request(
            &[(
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https, for=192.0.2.43:80",
            )],
            "192.0.2.1:443",
        );
        assert_eq!(
            ex.client_ip(&req),
            Some("2001:db8:cafe::17".parse().unwrap())
        );
        let hidden = request(
            &[("forwarded", "for=_hidden, for=192.0.2.43")],
            "192.0.2.1:443",
        );
        assert_eq!(ex.client_ip(&hidden), Some("192.0.2.43".parse().unwrap()));
    }

    #[test]
    fn header_extension_tenant_global_and_composites() {
        let req = request(&[("x-user", "u1")], "1.1.1.1:1");
        let h = HeaderKey::new(HeaderName::from_static("x-user"));
        assert_eq!(h.extract_from(&req).unwrap().kind(), KeyKind::Header);
        assert!(h.extract_from(&request(&[], "1.1.1.1:1")).is_err());

        #[derive(Clone)]
        struct UserId(String);
        impl AsRef<[u8]> for UserId {
            fn as_ref(&self) -> &[u8] {
                self.0.as_bytes()
            }
        }
        let mut with_ext = request(&[], "1.1.1.1:1");
        with_ext.extensions_mut().insert(UserId("u1".into()));
        let e = ExtensionKey::<UserId>::new()
            .extract_from(&with_ext)
            .unwrap();
        assert_eq!(e.kind(), KeyKind::Extension);

        assert!(Tenant::default().extract_from(&req).is_err());
        let mut tenanted = request(&[], "1.1.1.1:1");
        tenanted
            .extensions_mut()
            .insert(Caller::new().with_tenant("acme"));
        let t = Tenant::default().extract_from(&tenanted).unwrap();
        assert_eq!(t.kind(), KeyKind::Tenant);

        assert_eq!(Global.extract_from(&req).unwrap().to_string(), "global");
        let both = (h.clone(), PeerIp).extract_from(&req).unwrap();
        assert_eq!(both.kind(), KeyKind::Composite);
        assert_ne!(both, (h, Global).extract_from(&req).unwrap());
    }

    #[test]
    fn model_key_reads_the_parsed_body() {
        let mut req = request(&[], "1.1.1.1:1");
        assert!(Model::default().needs_body());
        assert!((Global, Model::default()).needs_body());
        assert_eq!(
            Model::default().extract_from(&req),
            Err(KeyError::Missing("parsed body"))
        );
        let parse = |body: &'static str| {
            crate::request::SharedLlmRequest::new(
                crate::llm::LlmRequest::parse(
                    bytes::Bytes::from_static(body.as_bytes()),
                    "/v1/chat/completions",
                )
                .unwrap(),
            )
        };
        req.extensions_mut()
            .insert(parse(r#"{"model":"gpt-4o","messages":[]}"#));
        let a = Model::default().extract_from(&req).unwrap();
        assert_eq!(a.kind(), KeyKind::Model);
        req.extensions_mut()
            .insert(parse(r#"{"model":"gpt-4o-mini","messages":[]}"#));
        assert_ne!(Model::default().extract_from(&req).unwrap(), a);
        req.extensions_mut().insert(parse(r#"{"messages":[]}"#));
        assert_eq!(
            Model::default().extract_from(&req),
            Err(KeyError::Missing("model"))
        );
    }

    #[test]
    fn caller_is_resolved_once_and_reused() {
        let resolver = CallerResolver::new(Fingerprinter::default(), ClientIp::default());
        let mut req = request(&[("x-api-key", "k1")], "203.0.113.1:9");
        let caller = resolver.resolve(&mut req);
        assert_eq!(caller.ip, Some("203.0.113.1".parse().unwrap()));
        assert_eq!(req.extensions().get::<Caller>(), Some(&caller));
        // Extractors reuse the stored caller, even if the headers change later.
        req.headers_mut().remove("x-api-key");
        assert_eq!(
            ApiKey::default().extract_from(&req).unwrap(),
            caller.api_key.unwrap().key()
        );
        // An authenticating layer's caller keeps its id, tier and tenant; the rest is filled in.
        let mut authed = request(&[("x-api-key", "k1")], "203.0.113.1:9");
        authed
            .extensions_mut()
            .insert(Caller::new().with_id("alice").with_tier("free"));
        let caller = resolver.resolve(&mut authed);
        assert!(
            caller.in_tiers(&["free".to_owned()])
                && caller.in_tiers(&[])
                && !caller.in_tiers(&["paid".to_owned()])
        );
        assert_eq!(caller.id.as_deref(), Some("alice"));
        assert_eq!(caller.tier.as_deref(), Some("free"));
        assert!(caller.api_key.is_some() && caller.ip.is_some());
        // Without an API key, a second layer does not look for one again...
        let mut anonymous = request(&[], "203.0.113.1:9");
        let first = resolver.resolve(&mut anonymous);
        anonymous
            .headers_mut()
            .insert("x-api-key", http::HeaderValue::from_static("k2"));
        assert_eq!(resolver.resolve(&mut anonymous), first);
        assert!(first.api_key.is_none());
        // ...but without an IP, it looks again.
        let mut no_peer = Request::builder().body(()).unwrap();
        assert_eq!(resolver.resolve(&mut no_peer).ip, None);
        no_peer
            .extensions_mut()
            .insert(PeerAddr("198.51.100.7:1".parse().unwrap()));
        assert_eq!(
            resolver.resolve(&mut no_peer).ip,
            Some("198.51.100.7".parse().unwrap())
        );
    }
}
