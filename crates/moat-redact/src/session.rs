//! [`Sessions`]: one vault per conversation, so placeholders stay the same across turns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::HeaderName;
use moat_core::clock::{self, SharedClock};
use moat_core::identity::Caller;

use crate::redactor::Vault;

/// The header that names a conversation by default.
pub const CONVERSATION_HEADER: &str = "x-moat-conversation";

/// The longest conversation id accepted, in bytes.
pub const MAX_CONVERSATION_ID: usize = 128;

/// A vault shared by the requests of one conversation.
pub type SharedVault = Arc<Mutex<Vault>>;

/// Locks a vault; a panic elsewhere while it was held leaves it usable (its maps stay
/// consistent: every change is a single insert).
pub(crate) fn lock(vault: &SharedVault) -> MutexGuard<'_, Vault> {
    vault.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Who is calling (tenant, caller id or API key) and the conversation id.
type SessionKey = (Arc<str>, Box<str>);

struct Session {
    vault: SharedVault,
    last_used: Duration,
}

/// Vaults kept per conversation: a tenant plus a conversation id header.
///
/// The key always includes who is calling (the [`Caller`]'s tenant, else its id, else its API
/// key fingerprint), so two tenants using the same conversation id never share a vault; a
/// request without a known caller gets a vault of its own. Both the number of sessions and the
/// values per session are bounded, and a session unused for its time to live is forgotten.
///
/// ```
/// use std::time::Duration;
/// use moat_redact::Sessions;
///
/// let sessions = Sessions::new()
///     .with_ttl(Duration::from_secs(3600))
///     .with_max_sessions(10_000)
///     .with_max_values(500);
/// assert_eq!(sessions.len(), 0);
/// ```
#[derive(Clone)]
pub struct Sessions {
    header: HeaderName,
    ttl: Duration,
    max_sessions: usize,
    max_values: usize,
    clock: SharedClock,
    map: Arc<Mutex<HashMap<SessionKey, Session>>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("header", &self.header)
            .field("ttl", &self.ttl)
            .field("max_sessions", &self.max_sessions)
            .field("max_values", &self.max_values)
            .field("len", &self.len())
            .finish()
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new()
    }
}

/// A conversation id that is too long or not visible ASCII.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadConversationId;

impl Sessions {
    /// Sessions named by `x-moat-conversation`, kept 1 hour after their last use, at most 1,024
    /// of them with 1,024 values each.
    pub fn new() -> Self {
        Self {
            header: HeaderName::from_static(CONVERSATION_HEADER),
            ttl: Duration::from_secs(3600),
            max_sessions: 1024,
            max_values: 1024,
            clock: clock::system(),
            map: Arc::default(),
        }
    }

    /// The header that names the conversation.
    #[must_use]
    pub fn with_header(mut self, header: HeaderName) -> Self {
        self.header = header;
        self
    }

    /// How long a session lives after its last request.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The most sessions kept; past it the least recently used one is forgotten.
    #[must_use]
    pub fn with_max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = max.max(1);
        self
    }

    /// The most values one session's vault holds; past it values are redacted for good.
    #[must_use]
    pub fn with_max_values(mut self, max: usize) -> Self {
        self.max_values = max;
        self
    }

    /// The clock expiry is measured on (tests drive a manual one).
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// These settings over `previous`'s conversations: a layer rebuilt from a new configuration
    /// (a reload) keeps every vault, so placeholders already handed out still restore.
    pub fn with_state_from(self, previous: &Sessions) -> Self {
        Self {
            map: previous.map.clone(),
            ..self
        }
    }

    /// How many sessions are kept now.
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The vault for a request: its session's, a new session's, or (no conversation header, or
    /// no known caller) a vault of its own.
    pub(crate) fn vault_for(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<SharedVault, BadConversationId> {
        let Some(id) = headers.get(&self.header) else {
            return Ok(SharedVault::default());
        };
        let id = id.to_str().map_err(|_| BadConversationId)?;
        if id.is_empty() || id.len() > MAX_CONVERSATION_ID {
            return Err(BadConversationId);
        }
        let scope: Option<Arc<str>> = extensions.get::<Caller>().and_then(|c| {
            c.tenant
                .clone()
                .map(|t| format!("tenant:{t}").into())
                .or_else(|| c.id.clone().map(|i| format!("caller:{i}").into()))
                .or_else(|| c.api_key.map(|k| format!("key:{k}").into()))
        });
        let Some(scope) = scope else {
            return Ok(SharedVault::default());
        };
        let now = self.clock.now();
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (scope, Box::<str>::from(id));
        if let Some(session) = map.get_mut(&key) {
            if now.saturating_sub(session.last_used) < self.ttl {
                session.last_used = now;
                return Ok(session.vault.clone());
            }
            map.remove(&key);
        }
        if map.len() >= self.max_sessions {
            map.retain(|_, s| now.saturating_sub(s.last_used) < self.ttl);
        }
        if map.len() >= self.max_sessions {
            let oldest = map
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                map.remove(&oldest);
            }
        }
        let vault = Arc::new(Mutex::new(Vault::with_limit(self.max_values)));
        map.insert(
            key,
            Session {
                vault: vault.clone(),
                last_used: now,
            },
        );
        Ok(vault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Entity, Redactor};
    use moat_core::clock::ManualClock;

    fn request(conversation: Option<&str>, caller: Option<Caller>) -> http::Request<()> {
        let mut b = http::Request::builder();
        if let Some(c) = conversation {
            b = b.header(CONVERSATION_HEADER, c);
        }
        let mut req = b.body(()).unwrap();
        if let Some(c) = caller {
            req.extensions_mut().insert(c);
        }
        req
    }

    fn vault(s: &Sessions, conversation: Option<&str>, caller: Option<Caller>) -> SharedVault {
        let req = request(conversation, caller);
        s.vault_for(req.headers(), req.extensions()).unwrap()
    }

    #[test]
    fn a_conversation_keeps_its_placeholders_and_tenants_never_share() {
        let s = Sessions::new();
        let acme = || Some(Caller::new().with_tenant("acme"));
        let globex = || Some(Caller::new().with_tenant("globex"));
        let r = Redactor::new(&Entity::ALL);
        let first = vault(&s, Some("c1"), acme());
        let _ = r.redact_str("jane@example.com", &mut lock(&first));
        let again = vault(&s, Some("c1"), acme());
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(
            r.redact_str("john@example.com and jane@example.com", &mut lock(&again))
                .text,
            "[EMAIL_2] and [EMAIL_1]"
        );
        let other = vault(&s, Some("c1"), globex());
        assert!(!Arc::ptr_eq(&first, &other), "same id, other tenant");
        assert!(lock(&other).is_empty());
        // No header, or nobody known: a vault of its own, kept nowhere.
        assert!(!Arc::ptr_eq(&vault(&s, None, acme()), &first));
        assert!(!Arc::ptr_eq(&vault(&s, Some("c1"), None), &first));
        assert_eq!(s.len(), 2);
        let bad = request(Some(&"x".repeat(MAX_CONVERSATION_ID + 1)), acme());
        assert_eq!(
            s.vault_for(bad.headers(), bad.extensions()).unwrap_err(),
            BadConversationId
        );
    }

    #[test]
    fn sessions_expire_and_are_bounded() {
        let clock = Arc::new(ManualClock::new());
        let s = Sessions::new()
            .with_ttl(Duration::from_secs(60))
            .with_max_sessions(2)
            .with_clock(clock.clone());
        let t = || Some(Caller::new().with_tenant("t"));
        let a = vault(&s, Some("a"), t());
        clock.advance(Duration::from_secs(59));
        assert!(
            Arc::ptr_eq(&a, &vault(&s, Some("a"), t())),
            "used within its ttl"
        );
        clock.advance(Duration::from_secs(60));
        assert!(!Arc::ptr_eq(&a, &vault(&s, Some("a"), t())), "expired");
        clock.advance(Duration::from_secs(1));
        let b = vault(&s, Some("b"), t());
        clock.advance(Duration::from_secs(1));
        let _c = vault(&s, Some("c"), t());
        assert_eq!(s.len(), 2, "the least recently used (a) made room");
        assert!(Arc::ptr_eq(&b, &vault(&s, Some("b"), t())));
    }
}
