//! `[audit]`: the audit log, the gateway's outermost layer (outside authentication, so refused
//! keys are recorded too).
//!
//! ```toml
//! [audit]
//! level = "metadata"          # metadata | request | request_response
//! file = "audit/moat-audit.jsonl"
//! rotate = "100MB"
//! fsync = "batch"             # always | batch | never
//! on_full = "backpressure"    # backpressure | drop_with_gap | fail_closed
//! checkpoint_every = "10s"
//! checkpoint_key_env = "MOAT_AUDIT_KEY"
//! # webhook = { url = "http://127.0.0.1:9200/audit", batch = 400 }
//! # [[audit.rules]]  routes / tenants / models, and the level they get
//! ```
//!
//! The log is started once and outlives reloads: a reload changes levels and rules; a change to
//! where records go (file, rotation, fsync, webhook, checkpoints) takes effect at the next start.
//! Bodies, at the `request` levels, are scrubbed with moat-redact's detector (every entity:
//! keys, tokens and personal data) and every secret the configuration holds (client keys, the
//! provider keys).

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use moat::audit::{
    AuditLayer, AuditLog, FileSink, Fsync, Level, LevelRule, Literals, OnFull, Policy, Scrubber,
    Signer, TracingSink, WebhookSink,
};
use moat::core::identity::CallerResolver;
use moat::redact::{Detector, Entity};
use serde::Deserialize;

/// The `[audit]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// How much of a request is logged unless a rule says otherwise.
    #[serde(default)]
    pub level: Level,
    /// Levels for some routes, tenants or models; the first match wins.
    #[serde(default)]
    pub rules: Vec<LevelRuleConfig>,
    /// The JSON Lines file (default `audit/moat-audit.jsonl`).
    pub file: Option<String>,
    /// Start a new file past this size, e.g. `100MB`.
    pub rotate: Option<String>,
    /// Start a new file this often, e.g. `1d`.
    #[serde(default, with = "humantime_serde")]
    pub rotate_every: Option<Duration>,
    /// When the file is made durable.
    #[serde(default)]
    pub fsync: Fsync,
    /// What happens when the sinks fall behind.
    #[serde(default)]
    pub on_full: OnFull,
    /// Events that may wait for the writer (default 8192).
    pub queue: Option<usize>,
    /// How often a signed checkpoint is written (default 10s, with a key).
    #[serde(default, with = "humantime_serde")]
    pub checkpoint_every: Option<Duration>,
    /// The environment variable holding the checkpoint signing key
    /// (`PRIVATE+KEY+...`, from `moat-audit keygen`).
    pub checkpoint_key_env: Option<String>,
    /// Where checkpoints go (default: the file's name with `.checkpoint`).
    pub checkpoint_file: Option<String>,
    /// The log's name in checkpoints (default `moat-audit/gateway`).
    pub origin: Option<String>,
    /// Bytes of each body logged at the `request` levels (default 64 KiB; the hash covers all).
    pub max_body_bytes: Option<usize>,
    /// Also emit each record as a `tracing` event (target `moat::audit`).
    #[serde(default)]
    pub tracing: bool,
    /// Also POST records in batches.
    pub webhook: Option<WebhookConfig>,
}

/// `[[audit.rules]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelRuleConfig {
    /// Paths (a prefix as `/v1/*`).
    #[serde(default)]
    pub routes: Vec<String>,
    /// Tenants.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Models (a prefix as `gpt-4*`).
    #[serde(default)]
    pub models: Vec<String>,
    /// The level.
    pub level: Level,
}

/// `webhook = { url = ..., batch = ..., queue = ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where batches are POSTed (`http://` only).
    pub url: String,
    /// Records per batch (default 400).
    pub batch: Option<usize>,
    /// Records that may wait for the webhook (default 10000).
    pub queue: Option<usize>,
}

const DEFAULT_FILE: &str = "audit/moat-audit.jsonl";

/// The gateway's own probes, not recorded unless a rule says so.
const PROBES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The logs this process started, by file: one writer per file whatever the reloads (two would
/// fork its chain), shut down at exit.
static LOGS: Mutex<Vec<(String, AuditLog)>> = Mutex::new(Vec::new());

/// Every audit log this process started, taken for shutdown.
pub fn take_started() -> Vec<AuditLog> {
    std::mem::take(&mut *LOGS.lock().unwrap_or_else(PoisonError::into_inner))
        .into_iter()
        .map(|(_, log)| log)
        .collect()
}

/// `[audit]`, checked; its log is started on first use and shared by every reload.
#[derive(Clone)]
pub struct ResolvedAudit {
    config: AuditConfig,
    policy: Policy,
    signing_key: Option<Arc<str>>,
    secrets: Arc<Vec<String>>,
    rotate_bytes: Option<u64>,
}

impl std::fmt::Debug for ResolvedAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedAudit")
            .field("config", &self.config)
            .field("signed", &self.signing_key.is_some())
            .finish_non_exhaustive()
    }
}

/// A size such as `100MB`, `512KiB` or `1048576`.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" => 1 << 10,
        "mb" => 1_000_000,
        "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(unit).filter(|&n| n > 0)
}

impl AuditConfig {
    /// Checks the section; `secrets` are the values bodies must never show.
    pub(crate) fn resolve(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        secrets: Vec<String>,
    ) -> Result<ResolvedAudit, String> {
        let rotate_bytes = match &self.rotate {
            Some(text) => Some(parse_size(text).ok_or_else(|| {
                format!("audit.rotate: {text:?} is not a size such as \"100MB\"")
            })?),
            None => None,
        };
        if self.queue == Some(0) {
            return Err("audit.queue: must be at least 1".into());
        }
        if self.checkpoint_every.is_some_and(|d| d.is_zero()) {
            return Err("audit.checkpoint_every: must be more than zero".into());
        }
        if let Some(webhook) = &self.webhook {
            let uri: http::Uri = webhook
                .url
                .parse()
                .map_err(|e| format!("audit.webhook.url: {e}"))?;
            if uri.scheme_str() != Some("http") {
                return Err("audit.webhook.url: only http:// URLs are supported".into());
            }
        }
        let signing_key = match &self.checkpoint_key_env {
            Some(name) => {
                let key = env(name).ok_or_else(|| {
                    format!("audit.checkpoint_key_env: environment variable {name} is not set")
                })?;
                // `--check-config` stands a placeholder in for a variable that is not set.
                if key != crate::config::placeholder(name) {
                    key.parse::<Signer>()
                        .map_err(|e| format!("audit.checkpoint_key_env ({name}): {e}"))?;
                }
                Some(Arc::from(key))
            }
            None => None,
        };
        let mut policy = Policy::new(self.level);
        // Health probes and metric scrapes are not requests worth a record; a rule of the
        // file's own comes first and can say otherwise.
        let probes = LevelRule::new(Level::None).with_routes(PROBES);
        for rule in &self.rules {
            policy = policy.with_rule(
                LevelRule::new(rule.level)
                    .with_routes(rule.routes.iter().cloned())
                    .with_tenants(rule.tenants.iter().cloned())
                    .with_models(rule.models.iter().cloned()),
            );
        }
        policy = policy.with_rule(probes);
        Ok(ResolvedAudit {
            config: self.clone(),
            policy,
            signing_key,
            secrets: Arc::new(secrets),
            rotate_bytes,
        })
    }

    /// What decides where records go: a change needs a restart.
    fn sinks_differ(&self, other: &Self) -> bool {
        let strip = |c: &Self| Self {
            level: Level::Metadata,
            rules: Vec::new(),
            max_body_bytes: None,
            ..c.clone()
        };
        strip(self) != strip(other)
    }
}

impl ResolvedAudit {
    /// The file records go to.
    pub fn file(&self) -> &str {
        self.config.file.as_deref().unwrap_or(DEFAULT_FILE)
    }

    /// The log, started on first use: the chain resumes from the file, a `start` record is
    /// written, the writer thread starts.
    pub fn log(&self) -> io::Result<AuditLog> {
        let mut logs = LOGS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, log)) = logs.iter().find(|(file, _)| file == self.file()) {
            return Ok(log.clone());
        }
        let c = &self.config;
        let mut file = FileSink::new(self.file()).with_fsync(c.fsync);
        if let Some(bytes) = self.rotate_bytes {
            file = file.with_rotate_bytes(bytes);
        }
        if let Some(age) = c.rotate_every {
            file = file.with_rotate_age(age);
        }
        let origin = c
            .origin
            .clone()
            .unwrap_or_else(|| "moat-audit/gateway".into());
        let mut builder = AuditLog::builder(origin)
            .sink(file)
            .on_full(c.on_full)
            .capacity(c.queue.unwrap_or(8192))
            .scrubber(scrubber(&self.secrets));
        if c.tracing {
            builder = builder.sink(TracingSink);
        }
        if let Some(webhook) = &c.webhook {
            let url = webhook.url.parse().map_err(io::Error::other)?;
            builder = builder.sink(WebhookSink::new(
                url,
                webhook.batch.unwrap_or(400),
                webhook.queue.unwrap_or(10_000),
                c.on_full,
            )?);
        }
        if let Some(key) = &self.signing_key {
            let signer: Signer = key.parse().map_err(io::Error::other)?;
            let path = c.checkpoint_file.clone().unwrap_or_else(|| {
                moat::audit::verify::checkpoint_path(std::path::Path::new(self.file()))
                    .to_string_lossy()
                    .into_owned()
            });
            builder = builder.checkpoints(
                signer,
                path,
                c.checkpoint_every.unwrap_or(Duration::from_secs(10)),
            );
        } else {
            tracing::warn!(target: "moat::gateway", "[audit] has no checkpoint_key_env: records are chained, but a cut at the end of the log cannot be detected");
        }
        let log = builder.start()?;
        logs.push((self.file().to_owned(), log.clone()));
        Ok(log)
    }

    /// The log that was started for this file, if any.
    pub fn started(&self) -> Option<AuditLog> {
        LOGS.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(file, _)| file == self.file())
            .map(|(_, log)| log.clone())
    }

    /// The layer, recording to the log (started if it was not).
    pub(crate) fn layer(&self, resolver: CallerResolver) -> io::Result<AuditLayer> {
        let mut layer = AuditLayer::new(self.log()?)
            .with_policy(self.policy.clone())
            .with_caller_resolver(resolver);
        if let Some(bytes) = self.config.max_body_bytes {
            layer = layer.with_max_body_bytes(bytes);
        }
        Ok(layer)
    }

    /// For a reload: say when a sink setting changed, which takes effect at the next start (the
    /// running log keeps its settings; a new file gets a log of its own).
    pub(crate) fn note_changes_from(&self, previous: &ResolvedAudit) {
        if self.config.sinks_differ(&previous.config) {
            tracing::warn!(target: "moat::gateway", "[audit] sink changes (rotation, fsync, queue, webhook, checkpoints) take effect at the next start");
        }
    }
}

/// moat-redact's detector (every entity) and the configuration's secrets, on logged bodies.
fn scrubber(secrets: &[String]) -> impl Scrubber {
    let detector = Detector::new(&Entity::ALL);
    let literals = Literals::new(secrets.iter().cloned());
    move |text: &str| {
        let text = literals.scrub(text);
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for finding in detector.find(&text) {
            if finding.start < at {
                continue;
            }
            out.push_str(&text[at..finding.start]);
            out.push('[');
            out.push_str(finding.entity.label());
            out.push(']');
            at = finding.end;
        }
        out.push_str(&text[at..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("100MB"), Some(100_000_000));
        assert_eq!(parse_size("512KiB"), Some(512 * 1024));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("10 parsecs"), None);
    }

    #[test]
    fn the_scrubber_removes_pii_keys_and_configured_secrets() {
        let scrub = scrubber(&["client-key-0123456789".to_owned()]);
        let out = scrub.scrub(
            "mail jane.doe@example.org, key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD, client-key-0123456789",
        );
        assert!(!out.contains("jane.doe@example.org"), "{out}");
        assert!(!out.contains("sk-proj-abcdefghijklmnopqrstuvwxyz"), "{out}");
        assert!(!out.contains("client-key-0123456789"), "{out}");
    }
}
