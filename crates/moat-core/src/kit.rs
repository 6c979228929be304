//! The layer kit: what every moat layer's configuration shares.
//!
//! - [`Scope`]: which requests a rule, budget or policy applies to, and whose it is: a name,
//!   a key, routes, methods, models, tiers and a [`Mode`]. Rate-limit rules and budgets hold
//!   one, and so will the policies of the layers to come.
//! - [`LayerOptions`]: the options every layer takes: its clock, its request body limit, how it
//!   identifies callers, and how many keys it keeps per rule.
//! - [`KeySpec`] and [`HttpMethod`]: how a configuration file names whose requests (`api_key`,
//!   `ip`, `tenant`, `model`, `global`, `header:NAME`) and which methods, the same in every
//!   layer's configuration; each layer crate's `spec` module (feature `serde`) builds its rules
//!   from them.
//! - [`Policies`]: a layer's policy per scope (the first scope that admits a request chooses
//!   its policy, the default serves the rest), so one layer can screen, moderate or redact
//!   routes, models and tiers differently.
//! - [`NamedStates`]: a layer's counters, budgets or vaults, by rule name rather than by
//!   position, shared by every layer built from one configuration: a builder call after a
//!   handle was taken does not fork them, and a layer rebuilt from a new configuration (a
//!   reload) takes over those of the rules it keeps.
//!
//! ```
//! use http::Method;
//! use moat_core::identity::{ApiKey, Caller, RequestHead};
//! use moat_core::kit::Scope;
//!
//! let scope = Scope::new("free-chat", ApiKey::default())
//!     .route("/v1/chat/*")
//!     .method(Method::POST)
//!     .tier("free")
//!     .model("gpt-4o*");
//! let free = Caller::new().with_tier("free");
//! assert!(scope.matches_head(&Method::POST, "/v1/chat/completions", &free));
//! assert!(!scope.matches_head(&Method::GET, "/v1/chat/completions", &free));
//! assert!(scope.matches_model(Some("gpt-4o-mini")));
//! assert!(scope.needs_body(), "a model filter reads the body");
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use std::str::FromStr;

use http::{HeaderName, Method};
use serde::de::{self, Deserialize, Deserializer};

use crate::body::DEFAULT_BODY_LIMIT;
use crate::clock::{self, SharedClock};
use crate::decision::Mode;
use crate::identity::{
    ApiKey, Caller, CallerResolver, Global, HeaderKey, KeyExtractor, Model, RequestHead, Tenant,
};
use crate::llm::model_matches;
use crate::Key;

/// Which requests something applies to, and whose they are.
#[derive(Clone)]
pub struct Scope {
    name: Arc<str>,
    key: Arc<dyn KeyExtractor>,
    routes: Vec<String>,
    methods: Vec<Method>,
    models: Vec<String>,
    tiers: Vec<String>,
    mode: Mode,
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("routes", &self.routes)
            .field("methods", &self.methods)
            .field("models", &self.models)
            .field("tiers", &self.tiers)
            .field("mode", &self.mode)
            .finish()
    }
}

impl Scope {
    /// Everything, keyed by `key`, named `name` (for headers, metrics, logs and state).
    pub fn new(name: impl Into<Arc<str>>, key: impl KeyExtractor) -> Self {
        Self::keyed_by(name, Arc::new(key))
    }

    /// As [`new`](Self::new), with a shared key extractor.
    pub fn keyed_by(name: impl Into<Arc<str>>, key: Arc<dyn KeyExtractor>) -> Self {
        Self {
            name: name.into(),
            key,
            routes: Vec::new(),
            methods: Vec::new(),
            models: Vec::new(),
            tiers: Vec::new(),
            mode: Mode::Enforce,
        }
    }

    /// A scope that only says which requests a layer applies to (its key unused): the given
    /// routes, models and tiers (each empty: all). `None` when all three are empty: every
    /// request.
    pub fn filter(
        name: impl Into<Arc<str>>,
        routes: &[String],
        models: &[String],
        tiers: &[String],
    ) -> Option<Self> {
        if routes.is_empty() && models.is_empty() && tiers.is_empty() {
            return None;
        }
        let mut scope = Self::new(name, Global);
        scope.routes = routes.to_vec();
        scope.models = models.to_vec();
        scope.tiers = tiers.to_vec();
        Some(scope)
    }

    /// The scope of the `index`th entry of a layer's `policies` in a configuration file: its
    /// routes, models and tiers, of which it must give at least one (an entry for every
    /// request would hide the default). `layer_keys` are the keys that belong to the whole
    /// layer, each with whether the entry sets it: none may be.
    pub fn for_policy(
        name: impl Into<Arc<str>>,
        index: usize,
        [routes, models, tiers]: [&[String]; 3],
        layer_keys: &[(&'static str, bool)],
    ) -> Result<Self, PolicyEntryError> {
        if let Some(&(key, _)) = layer_keys.iter().find(|(_, set)| *set) {
            return Err(PolicyEntryError::LayerKey { index, key });
        }
        Self::filter(name, routes, models, tiers).ok_or(PolicyEntryError::Unscoped { index })
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name, shared.
    pub fn shared_name(&self) -> &Arc<str> {
        &self.name
    }

    /// Whose requests: the key extractor.
    pub fn key(&self) -> &dyn KeyExtractor {
        &*self.key
    }

    /// Enforce or shadow.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The tiers it is limited to (empty: every caller).
    pub fn tiers(&self) -> &[String] {
        &self.tiers
    }

    /// The models it is limited to (empty: every model).
    pub fn models(&self) -> &[String] {
        &self.models
    }

    /// Applies only to this path, or to paths under it if it ends with `/*`. May be repeated.
    #[must_use]
    pub fn route(mut self, route: impl Into<String>) -> Self {
        self.routes.push(route.into());
        self
    }

    /// Applies only to this method. May be repeated.
    #[must_use]
    pub fn method(mut self, method: Method) -> Self {
        self.methods.push(method);
        self
    }

    /// Applies only to requests for this model (the body is parsed); a trailing `*` matches a
    /// family. May be repeated.
    #[must_use]
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.models.push(model.into());
        self
    }

    /// Applies only to callers of this tier (the [`Caller`]'s). May be repeated.
    #[must_use]
    pub fn tier(mut self, tier: impl Into<String>) -> Self {
        self.tiers.push(tier.into());
        self
    }

    /// Decides and records, but lets everything through.
    #[must_use]
    pub fn shadow(self) -> Self {
        self.with_mode(Mode::Shadow)
    }

    /// Sets the mode.
    #[must_use]
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Whether deciding needs the parsed body (a model filter or a key that reads it).
    pub fn needs_body(&self) -> bool {
        !self.models.is_empty() || self.key.needs_body()
    }

    /// Whether it applies, judged on what is known without the body.
    pub fn matches_head(&self, method: &Method, path: &str, caller: &Caller) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.routes.is_empty() || self.routes.iter().any(|r| route_matches(r, path)))
            && caller.in_tiers(&self.tiers)
    }

    /// Whether it applies to `req`, judged on its head: the method, the path and the tier of
    /// the [`Caller`] in its extensions (none: a caller without a tier).
    pub fn matches_request<B>(&self, req: &http::Request<B>) -> bool {
        let anonymous;
        let caller = match req.extensions().get::<Caller>() {
            Some(caller) => caller,
            None => {
                anonymous = Caller::default();
                &anonymous
            }
        };
        self.matches_head(req.method(), req.uri().path(), caller)
    }

    /// Whether its model filter admits `model`.
    pub fn matches_model(&self, model: Option<&str>) -> bool {
        model_matches(&self.models, model)
    }

    /// Whether it applies to a request, the body's model included.
    pub fn applies(&self, head: &RequestHead<'_>, caller: &Caller, model: Option<&str>) -> bool {
        self.matches_head(head.method, head.uri.path(), caller) && self.matches_model(model)
    }

    /// Whether it admits `req` (its head, judged as [`matches_request`](Self::matches_request)
    /// does) for `model`, the model its body asks for.
    pub fn admits<B>(&self, req: &http::Request<B>, model: Option<&str>) -> bool {
        self.matches_model(model) && self.matches_request(req)
    }

    /// Whose request it is: the key, or, for a request without what the key reads (no API key,
    /// say), its client IP, so that leaving something out never escapes a limit; with neither,
    /// everyone's.
    pub fn key_of(&self, head: &RequestHead<'_>, caller: &Caller) -> Key {
        self.key
            .extract(head)
            .ok()
            .or_else(|| caller.ip.map(Key::ip))
            .unwrap_or(Key::GLOBAL)
    }
}

/// A layer's policies: a default, and policies for the requests particular [`Scope`]s admit
/// (their routes, methods, tiers and models; their keys and modes are not used). A request
/// gets the policy of the first scope that admits it, or the default. Clones share the
/// policies; adding one after a clone does not change the clone.
///
/// ```
/// use moat_core::kit::{Policies, Scope};
/// use moat_core::identity::Global;
///
/// let policies = Policies::new("strict")
///     .with(Scope::new("docs", Global).route("/v1/embeddings"), "lenient")
///     .with(Scope::new("mini", Global).model("gpt-4o-mini"), "light");
/// let chat = http::Request::post("/v1/chat/completions").body(()).unwrap();
/// let embed = http::Request::post("/v1/embeddings").body(()).unwrap();
/// assert_eq!(**policies.select(&chat, Some("gpt-4o")), "strict");
/// assert_eq!(**policies.select(&chat, Some("gpt-4o-mini")), "light");
/// assert_eq!(**policies.select(&embed, Some("gpt-4o-mini")), "lenient", "the first scope wins");
/// assert!(policies.needs_model());
/// ```
#[derive(Debug)]
pub struct Policies<P> {
    default: Arc<P>,
    scoped: Arc<Vec<(Scope, Arc<P>)>>,
}

impl<P> Clone for Policies<P> {
    fn clone(&self) -> Self {
        Self {
            default: Arc::clone(&self.default),
            scoped: Arc::clone(&self.scoped),
        }
    }
}

impl<P> Policies<P> {
    /// Only `default`, for every request.
    pub fn new(default: P) -> Self {
        Self {
            default: Arc::new(default),
            scoped: Arc::new(Vec::new()),
        }
    }

    /// Adds `policy` for the requests `scope` admits, after the scopes already added.
    #[must_use]
    pub fn with(mut self, scope: Scope, policy: P) -> Self {
        Arc::make_mut(&mut self.scoped).push((scope, Arc::new(policy)));
        self
    }

    /// The default policy.
    pub fn default_policy(&self) -> &Arc<P> {
        &self.default
    }

    /// The scoped policies, in the order they are tried.
    pub fn scoped(&self) -> impl Iterator<Item = (&Scope, &Arc<P>)> + '_ {
        self.scoped.iter().map(|(scope, policy)| (scope, policy))
    }

    /// Whether choosing needs the request's model (a scope filters by model): the body must
    /// be read first.
    pub fn needs_model(&self) -> bool {
        self.scoped
            .iter()
            .any(|(scope, _)| !scope.models().is_empty())
    }

    /// The policy for `req`, whose body asks for `model`.
    pub fn select<B>(&self, req: &http::Request<B>, model: Option<&str>) -> &Arc<P> {
        self.scoped
            .iter()
            .find(|(scope, _)| scope.admits(req, model))
            .map_or(&self.default, |(_, policy)| policy)
    }
}

/// An entry of a layer's `policies` in a configuration file that cannot be one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyEntryError {
    /// It sets a key that belongs to the whole layer.
    LayerKey {
        /// The entry, counted from 0.
        index: usize,
        /// The key.
        key: &'static str,
    },
    /// It gives no routes, models or tiers.
    Unscoped {
        /// The entry, counted from 0.
        index: usize,
    },
}

impl PolicyEntryError {
    /// The key at fault (`routes` when none is given).
    pub fn key(&self) -> &'static str {
        match self {
            Self::LayerKey { key, .. } => key,
            Self::Unscoped { .. } => "routes",
        }
    }

    /// What is wrong, without where.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::LayerKey { .. } => "set it in the section: it applies to the whole layer",
            Self::Unscoped { .. } => "give `routes`, `models` or `tiers`: which requests it is for",
        }
    }
}

impl fmt::Display for PolicyEntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LayerKey { index, key } => {
                write!(f, "policies[{index}].{key}: {}", self.reason())
            }
            Self::Unscoped { index } => write!(f, "policies[{index}]: {}", self.reason()),
        }
    }
}

impl std::error::Error for PolicyEntryError {}

/// Whether `path` is `route`, or lies under it when `route` ends in `/*` (`/v1/chat/*` matches
/// `/v1/chat` and `/v1/chat/completions`, not `/v1/chatter`).
pub fn route_matches(route: &str, path: &str) -> bool {
    match route.strip_suffix("/*") {
        Some(prefix) => {
            path == prefix || path.starts_with(prefix) && path[prefix.len()..].starts_with('/')
        }
        None => route == path,
    }
}

/// Whose requests, as a configuration file says it: `api_key`, `ip`, `tenant`, `model`,
/// `global` or `header:NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySpec {
    /// The API key's fingerprint.
    ApiKey,
    /// The client IP (behind the trusted proxies).
    Ip,
    /// The caller's tenant.
    Tenant,
    /// Everyone together.
    Global,
    /// The requested model.
    Model,
    /// A header's value.
    Header(HeaderName),
}

/// A key spec that is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseKeySpecError {
    text: String,
}

impl fmt::Display for ParseKeySpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.text.strip_prefix("header:") {
            Some(name) => write!(f, "`{name}` is not a valid header name"),
            None => write!(
                f,
                "unknown key `{}`: expected api_key, ip, tenant, global, model or header:NAME",
                self.text
            ),
        }
    }
}

impl std::error::Error for ParseKeySpecError {}

impl FromStr for KeySpec {
    type Err = ParseKeySpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseKeySpecError { text: s.to_owned() };
        Ok(match s {
            "api_key" => Self::ApiKey,
            "ip" => Self::Ip,
            "tenant" => Self::Tenant,
            "global" => Self::Global,
            "model" => Self::Model,
            other => {
                let name = other.strip_prefix("header:").ok_or_else(err)?;
                Self::Header(HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| err())?)
            }
        })
    }
}

impl<'de> Deserialize<'de> for KeySpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

impl KeySpec {
    /// The extractor, fingerprinting and finding IPs as `resolver` does.
    pub fn extractor(&self, resolver: &CallerResolver) -> Arc<dyn KeyExtractor> {
        match self {
            Self::ApiKey => Arc::new(ApiKey::new(resolver.fingerprinter().clone())),
            Self::Ip => Arc::new(resolver.client_ip().clone()),
            Self::Tenant => Arc::new(Tenant::default()),
            Self::Global => Arc::new(Global),
            Self::Model => Arc::new(Model::default()),
            Self::Header(name) => Arc::new(HeaderKey::new(name.clone())),
        }
    }
}

/// An HTTP method, as a configuration file says it (`"POST"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpMethod(pub Method);

impl<'de> Deserialize<'de> for HttpMethod {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Method::from_bytes(text.as_bytes())
            .map(Self)
            .map_err(|_| de::Error::custom(format!("`{text}` is not an HTTP method")))
    }
}

/// What a configuration file says of a [`Scope`], for a layer's spec to build it.
#[derive(Debug, Clone, Copy)]
pub struct ScopeSpec<'a> {
    /// The name.
    pub name: &'a str,
    /// Whose requests.
    pub key: &'a KeySpec,
    /// Only these paths.
    pub routes: &'a [String],
    /// Only these methods.
    pub methods: &'a [HttpMethod],
    /// Only these models.
    pub models: &'a [String],
    /// Only these tiers.
    pub tiers: &'a [String],
    /// Enforce or shadow.
    pub mode: Mode,
}

impl ScopeSpec<'_> {
    /// The scope, keyed as `resolver` identifies callers.
    pub fn scope(&self, resolver: &CallerResolver) -> Scope {
        Scope {
            name: Arc::from(self.name),
            key: self.key.extractor(resolver),
            routes: self.routes.to_vec(),
            methods: self.methods.iter().map(|m| m.0.clone()).collect(),
            models: self.models.to_vec(),
            tiers: self.tiers.to_vec(),
            mode: self.mode,
        }
    }
}

/// Defines, on a type with a `scope: Scope` field, the builder methods of its [`Scope`]
/// (`route`, `method`, `model`, `tier`, `shadow`, `with_mode`) and `name`, `scope`.
#[macro_export]
#[doc(hidden)]
macro_rules! scoped {
    ($ty:ty) => {
        impl $ty {
            /// Its name.
            pub fn name(&self) -> &str {
                self.scope.name()
            }

            /// Which requests it applies to, and whose they are.
            pub fn scope(&self) -> &$crate::kit::Scope {
                &self.scope
            }

            /// Applies only to this path, or to paths under it if it ends with `/*`. May be
            /// repeated.
            #[must_use]
            pub fn route(mut self, route: impl Into<String>) -> Self {
                self.scope = self.scope.route(route);
                self
            }

            /// Applies only to this method. May be repeated.
            #[must_use]
            pub fn method(mut self, method: $crate::__private::Method) -> Self {
                self.scope = self.scope.method(method);
                self
            }

            /// Applies only to requests for this model (the body is parsed); a trailing `*`
            /// matches a family. May be repeated.
            #[must_use]
            pub fn model(mut self, model: impl Into<String>) -> Self {
                self.scope = self.scope.model(model);
                self
            }

            /// Applies only to callers of this tier. May be repeated.
            #[must_use]
            pub fn tier(mut self, tier: impl Into<String>) -> Self {
                self.scope = self.scope.tier(tier);
                self
            }

            /// Decides and records, but lets everything through.
            #[must_use]
            pub fn shadow(mut self) -> Self {
                self.scope = self.scope.shadow();
                self
            }

            /// Sets the mode.
            #[must_use]
            pub fn with_mode(mut self, mode: $crate::decision::Mode) -> Self {
                self.scope = self.scope.with_mode(mode);
                self
            }
        }
    };
}

/// The options every layer takes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LayerOptions {
    /// Where time comes from (tests drive a [`ManualClock`](crate::clock::ManualClock)).
    pub clock: SharedClock,
    /// The largest request body read (413 past it). Default 4 MiB.
    pub body_limit: usize,
    /// How callers are identified (API key fingerprint secret, trusted proxies).
    pub resolver: CallerResolver,
    /// The most keys kept in memory per rule or budget. Default 1,000,000.
    pub max_keys: usize,
}

impl Default for LayerOptions {
    fn default() -> Self {
        Self {
            clock: clock::system(),
            body_limit: DEFAULT_BODY_LIMIT,
            resolver: CallerResolver::default(),
            max_keys: 1_000_000,
        }
    }
}

/// Defines, on a layer type with a `fn options_mut(&mut self) -> &mut LayerOptions`, the builder
/// methods of its [`LayerOptions`]: `with_clock`, `with_body_limit`, `with_caller_resolver`,
/// `with_max_keys`.
#[macro_export]
#[doc(hidden)]
macro_rules! layer_options {
    ($ty:ty) => {
        impl $ty {
            /// Reads time from `clock` (tests drive a `ManualClock`).
            pub fn with_clock(mut self, clock: $crate::clock::SharedClock) -> Self {
                self.options_mut().clock = clock;
                self
            }

            /// The largest request body read (default 4 MiB; 413 past it).
            pub fn with_body_limit(mut self, bytes: usize) -> Self {
                self.options_mut().body_limit = bytes;
                self
            }

            /// How callers are identified (API key fingerprint secret, trusted proxies).
            pub fn with_caller_resolver(
                mut self,
                resolver: $crate::identity::CallerResolver,
            ) -> Self {
                self.options_mut().resolver = resolver;
                self
            }

            /// Caps the keys each rule or budget keeps in memory (default 1,000,000).
            pub fn with_max_keys(mut self, max_keys: usize) -> Self {
                self.options_mut().max_keys = max_keys.max(1);
                self
            }
        }
    };
}

/// A layer's states by name: made once per name, shared by every layer built from the same
/// configuration and by layers rebuilt from a later one.
pub struct NamedStates<T> {
    states: Arc<Mutex<HashMap<Arc<str>, Arc<T>>>>,
}

impl<T> Clone for NamedStates<T> {
    fn clone(&self) -> Self {
        Self {
            states: self.states.clone(),
        }
    }
}

impl<T> Default for NamedStates<T> {
    fn default() -> Self {
        Self {
            states: Arc::default(),
        }
    }
}

impl<T> fmt::Debug for NamedStates<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_set().entries(states.keys()).finish()
    }
}

impl<T> NamedStates<T> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state named `name`: the one there is if `fits` says it can serve, else a new one
    /// made by `make` (which replaces it).
    pub fn get(
        &self,
        name: &Arc<str>,
        fits: impl FnOnce(&T) -> bool,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        match states.get(name) {
            Some(state) if fits(state) => state.clone(),
            _ => {
                let state = Arc::new(make());
                states.insert(name.clone(), state.clone());
                state
            }
        }
    }

    /// Forgets the states not named in `keep` (after a reload removed their rules).
    pub fn retain(&self, keep: &[&str]) {
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|name, _| keep.contains(&&**name));
    }

    /// How many states there are.
    pub fn len(&self) -> usize {
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A score between 0 and 1 in a configuration file (a detection threshold), refused outside
/// that range when deserialized.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Score(f32);

impl Score {
    /// The score, if it is between 0 and 1.
    pub fn new(value: f32) -> Option<Self> {
        (0.0..=1.0).contains(&value).then_some(Self(value))
    }

    /// Its value.
    pub fn get(self) -> f32 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Score {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f32::deserialize(d)?;
        Self::new(value)
            .ok_or_else(|| de::Error::custom(format!("a score is between 0 and 1, not {value}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Global, HeaderKey};

    #[test]
    fn matching_on_route_method_tier_and_model() {
        let scope = Scope::new("r", Global)
            .route("/v1/chat/completions")
            .route("/v1/beta/*")
            .method(Method::POST)
            .tier("free")
            .model("gpt-4o")
            .model("claude-*");
        let free = Caller::new().with_tier("free");
        let paid = Caller::new().with_tier("paid");
        assert!(scope.matches_head(&Method::POST, "/v1/chat/completions", &free));
        assert!(scope.matches_head(&Method::POST, "/v1/beta/x/y", &free));
        assert!(scope.matches_head(&Method::POST, "/v1/beta", &free));
        assert!(!scope.matches_head(&Method::POST, "/v1/betamax", &free));
        assert!(!scope.matches_head(&Method::GET, "/v1/chat/completions", &free));
        assert!(!scope.matches_head(&Method::POST, "/v1/chat/completions", &paid));
        assert!(!scope.matches_head(&Method::POST, "/v1/chat/completions", &Caller::new()));
        assert!(scope.matches_model(Some("gpt-4o")));
        assert!(scope.matches_model(Some("claude-haiku-4-5")));
        assert!(!scope.matches_model(Some("gpt-4o-mini")));
        assert!(!scope.matches_model(None));
        assert!(scope.needs_body());
        assert!(!Scope::new("r", Global).needs_body());
        assert_eq!(Scope::new("r", Global).shadow().mode(), Mode::Shadow);
    }

    #[test]
    fn a_request_without_its_key_is_keyed_by_its_ip() {
        let scope = Scope::new("r", HeaderKey::new(HeaderName::from_static("x-user")));
        let req = http::Request::builder().body(()).unwrap();
        let ip: std::net::IpAddr = "203.0.113.7".parse().unwrap();
        let caller = Caller::new().with_ip(ip);
        assert_eq!(scope.key_of(&RequestHead::of(&req), &caller), Key::ip(ip));
        assert_eq!(
            scope.key_of(&RequestHead::of(&req), &Caller::new()),
            Key::GLOBAL
        );
    }

    #[test]
    fn key_specs_from_configuration_text() {
        for (text, spec) in [
            ("api_key", KeySpec::ApiKey),
            ("ip", KeySpec::Ip),
            ("tenant", KeySpec::Tenant),
            ("global", KeySpec::Global),
            ("model", KeySpec::Model),
            (
                "header:x-user",
                KeySpec::Header(HeaderName::from_static("x-user")),
            ),
        ] {
            assert_eq!(text.parse::<KeySpec>().unwrap(), spec);
        }
        assert!("user"
            .parse::<KeySpec>()
            .unwrap_err()
            .to_string()
            .contains("unknown key `user`"));
        assert!("header:bad name"
            .parse::<KeySpec>()
            .unwrap_err()
            .to_string()
            .contains("not a valid header name"));
        let resolver = CallerResolver::default();
        let spec = ScopeSpec {
            name: "r",
            key: &KeySpec::Tenant,
            routes: &["/v1/*".to_owned()],
            methods: &[HttpMethod(Method::POST)],
            models: &[],
            tiers: &["free".to_owned()],
            mode: Mode::Shadow,
        };
        let scope = spec.scope(&resolver);
        assert_eq!((scope.name(), scope.mode()), ("r", Mode::Shadow));
        let free = Caller::new().with_tier("free");
        assert!(scope.matches_head(&Method::POST, "/v1/chat/completions", &free));
        assert!(!scope.matches_head(&Method::GET, "/v1/chat/completions", &free));
    }

    #[test]
    fn named_states_are_shared_and_replaced_only_when_they_no_longer_fit() {
        let states: NamedStates<u32> = NamedStates::new();
        let name: Arc<str> = Arc::from("a");
        let first = states.get(&name, |_| true, || 1);
        let again = states.clone().get(&name, |_| true, || 2);
        assert!(Arc::ptr_eq(&first, &again));
        let replaced = states.get(&name, |s| *s == 7, || 7);
        assert_eq!(*replaced, 7);
        states.get(&Arc::from("b"), |_| true, || 3);
        states.retain(&["b"]);
        assert_eq!(states.len(), 1);
    }
}

/// What happens when an external checker (a classifier, a moderator) fails or misses its
/// latency budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnError {
    /// Go on with the local verdict alone (logged and recorded).
    #[default]
    Open,
    /// Refuse: 503, with a code the layer names.
    Closed,
}
