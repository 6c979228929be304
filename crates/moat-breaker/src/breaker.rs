//! The breaker itself: one state word, a window of outcomes, and a handle for operators.
//!
//! The state, the generation and the half-open trial counters live in one `AtomicU64`, so
//! every transition is one compare-and-swap and exactly one caller wins it. Closed, a call
//! costs a load of that word and a clock read to be admitted, and one or two relaxed writes to
//! the window when it ends; nothing is locked.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use moat_core::clock::{self, SharedClock};

use crate::config::{BreakerConfig, ConfigError};
use crate::sync::{fence, AtomicU32, AtomicU64};
use crate::window::{Counts, Outcomes};

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum State {
    /// Calls go through; outcomes are counted.
    Closed,
    /// Calls are refused until the open period ends.
    Open,
    /// A few trial calls go through; their outcomes close or reopen the breaker.
    HalfOpen,
    /// Set by an operator: calls go through and nothing is counted.
    Disabled,
    /// Set by an operator: every call is refused.
    ForcedOpen,
    /// Set by an operator: calls go through and are counted, the breaker never trips.
    MetricsOnly,
}

impl State {
    const ALL: [State; 6] = [
        State::Closed,
        State::Open,
        State::HalfOpen,
        State::Disabled,
        State::ForcedOpen,
        State::MetricsOnly,
    ];

    /// `closed`, `open`, `half_open`, `disabled`, `forced_open` or `metrics_only`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::Disabled => "disabled",
            State::ForcedOpen => "forced_open",
            State::MetricsOnly => "metrics_only",
        }
    }

    fn code(self) -> u64 {
        self as u64
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state word: `generation:31 | failures:10 | successes:10 | issued:10 | state:3`.
///
/// `issued` counts the half-open trials let through and not given back; `successes` and
/// `failures` those that ended. The generation changes on every transition.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Word(u64);

const GEN_MASK: u32 = (1 << 31) - 1;

impl Word {
    fn new(state: State, generation: u32) -> Self {
        Self(u64::from(generation & GEN_MASK) << 33 | state.code())
    }

    fn state(self) -> State {
        State::ALL[(self.0 & 0b111) as usize]
    }

    fn generation(self) -> u32 {
        (self.0 >> 33) as u32
    }

    fn field(self, shift: u32) -> u32 {
        (self.0 >> shift & 0x3FF) as u32
    }

    fn issued(self) -> u32 {
        self.field(3)
    }

    fn successes(self) -> u32 {
        self.field(13)
    }

    fn failures(self) -> u32 {
        self.field(23)
    }

    fn add(self, shift: u32, by: i64) -> Self {
        Self(self.0.wrapping_add_signed(by << shift))
    }

    /// The same state under the next generation, counters cleared.
    fn next(self, state: State) -> Self {
        Self::new(state, self.generation().wrapping_add(1))
    }
}

/// How a call that was let through ended, as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallOutcome {
    /// It worked.
    Success,
    /// The upstream failed (5xx, 529, connect error, timeout, a stream that broke).
    Failure,
}

/// Why a call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The breaker is open (or forced open, or half-open with every trial slot taken).
    Open {
        /// When it may let calls through again, if known.
        retry_after: Option<Duration>,
    },
    /// The upstream said 429; it is left alone until its `retry-after`.
    RateLimited {
        /// When the upstream said to come back.
        retry_after: Duration,
    },
}

impl Refusal {
    /// How long the caller should wait, when known.
    pub fn retry_after(self) -> Option<Duration> {
        match self {
            Refusal::Open { retry_after } => retry_after,
            Refusal::RateLimited { retry_after } => Some(retry_after),
        }
    }
}

/// Something a breaker did, for subscribers.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum BreakerEvent {
    /// The breaker moved from one state to another.
    Transition {
        /// The breaker's name.
        breaker: Arc<str>,
        /// The state it left.
        from: State,
        /// The state it entered.
        to: State,
    },
    /// A call was refused.
    Refused {
        /// The breaker's name.
        breaker: Arc<str>,
        /// Why.
        refusal: Refusal,
    },
    /// The upstream answered 429 and is left alone until `retry_after` has passed.
    RateLimited {
        /// The breaker's name.
        breaker: Arc<str>,
        /// For how long.
        retry_after: Duration,
    },
}

type Listener = Arc<dyn Fn(&BreakerEvent) + Send + Sync>;

/// Where a breaker stands, for operators and dashboards.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Snapshot {
    /// The breaker's name.
    pub name: String,
    /// Its state.
    pub state: State,
    /// Calls in the window.
    pub calls: u32,
    /// Failed calls in the window.
    pub failures: u32,
    /// Slow calls in the window.
    pub slow_calls: u32,
    /// `failures / calls`, 0 with no calls.
    pub failure_rate: f64,
    /// `slow_calls / calls`, 0 with no calls.
    pub slow_call_rate: f64,
    /// Open: how long until trial calls are let through.
    #[cfg_attr(feature = "serde", serde(serialize_with = "seconds"))]
    pub open_for: Option<Duration>,
    /// After a 429: how long until calls are let through again.
    #[cfg_attr(feature = "serde", serde(serialize_with = "seconds"))]
    pub rate_limited_for: Option<Duration>,
}

#[cfg(feature = "serde")]
fn seconds<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// A circuit breaker: a cheap, cloneable handle; clones share one state.
///
/// [`try_acquire`](Breaker::try_acquire) asks to make a call and returns a [`Permit`] or why
/// not; the permit reports how the call ended, or is dropped to say the outcome does not count
/// (a client that went away, a 4xx that is the client's fault). The
/// [`CircuitBreakerLayer`](crate::CircuitBreakerLayer) does all of this for a Tower service.
///
/// ```
/// use moat_breaker::{Breaker, BreakerConfig, CallOutcome, State};
/// use moat_core::clock::ManualClock;
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let breaker = Breaker::builder("openai")
///     .config(BreakerConfig::default().with_minimum_calls(4).with_jitter(0.0))
///     .clock(Arc::new(clock.clone()))
///     .build()
///     .unwrap();
/// for _ in 0..4 {
///     breaker.try_acquire().unwrap().record(CallOutcome::Failure);
/// }
/// assert_eq!(breaker.state(), State::Open);
/// assert!(breaker.try_acquire().is_err());
///
/// clock.advance(Duration::from_secs(30));
/// let trial = breaker.try_acquire().unwrap();
/// assert_eq!(breaker.state(), State::HalfOpen);
/// trial.record(CallOutcome::Success);
/// ```
#[derive(Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

struct Shared {
    name: Arc<str>,
    config: BreakerConfig,
    clock: SharedClock,
    word: AtomicU64,
    /// Open: `tag << 40 | until_ms`; half-open: `tag << 40 | since_ms`, where `tag` is the low
    /// 24 bits of the generation that wrote it, so a reader never takes a stale deadline for
    /// the current one.
    deadline: AtomicU64,
    /// After a 429: the millisecond until which calls are refused.
    throttled_until: AtomicU64,
    consecutive_failures: AtomicU32,
    /// The count window's position when the breaker last closed: the call that brings the
    /// window to `minimum_calls` is evaluated even if it succeeded.
    window_base: AtomicU32,
    /// Trips since the breaker last closed: open periods grow with it.
    trips: AtomicU32,
    outcomes: Outcomes,
    listeners: Vec<Listener>,
    metrics: crate::metrics::Metrics,
}

const TAG_SHIFT: u32 = 40;
const MS_MASK: u64 = (1 << TAG_SHIFT) - 1;

fn tag(generation: u32) -> u64 {
    u64::from(generation & 0xFF_FFFF)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX) & MS_MASK
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.shared.name)
            .field("state", &self.state())
            .field("config", &self.shared.config)
            .finish()
    }
}

/// Builds a [`Breaker`].
#[must_use]
pub struct BreakerBuilder {
    name: Arc<str>,
    config: BreakerConfig,
    clock: Option<SharedClock>,
    listeners: Vec<Listener>,
}

impl fmt::Debug for BreakerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerBuilder")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("listeners", &self.listeners.len())
            .finish()
    }
}

impl BreakerBuilder {
    /// Sets the configuration (default: [`BreakerConfig::default`]).
    pub fn config(mut self, config: BreakerConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the clock (default: the system clock).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Calls `listener` on every transition, refusal and 429. It runs on the caller's task:
    /// keep it short (send to a channel for anything slow).
    pub fn on_event(mut self, listener: impl Fn(&BreakerEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(Arc::new(listener));
        self
    }

    /// The breaker, closed.
    pub fn build(self) -> Result<Breaker, ConfigError> {
        self.config.check()?;
        let metrics = crate::metrics::Metrics::new(&self.name);
        metrics.state(State::Closed);
        Ok(Breaker {
            shared: Arc::new(Shared {
                outcomes: Outcomes::new(self.config.window),
                name: self.name,
                config: self.config,
                clock: self.clock.unwrap_or_else(clock::system),
                word: AtomicU64::new(Word::new(State::Closed, 0).0),
                deadline: AtomicU64::new(0),
                throttled_until: AtomicU64::new(0),
                consecutive_failures: AtomicU32::new(0),
                window_base: AtomicU32::new(0),
                trips: AtomicU32::new(0),
                listeners: self.listeners,
                metrics,
            }),
        })
    }
}

impl Breaker {
    /// A breaker named `name` (in metrics, events, logs and `x-moat-fallback`), closed, with
    /// the default configuration.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self::builder(name)
            .build()
            .expect("the default configuration is valid")
    }

    /// A builder for a breaker named `name`.
    pub fn builder(name: impl Into<Arc<str>>) -> BreakerBuilder {
        BreakerBuilder {
            name: name.into(),
            config: BreakerConfig::default(),
            clock: None,
            listeners: Vec::new(),
        }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub(crate) fn shared_name(&self) -> &Arc<str> {
        &self.shared.name
    }

    /// Its configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.shared.config
    }

    /// Its current state.
    pub fn state(&self) -> State {
        self.shared.load().state()
    }

    /// Asks to make one call: a [`Permit`] to report its outcome with, or why not.
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit<'_>, Refusal> {
        self.admit().map(|ticket| Permit {
            breaker: self,
            ticket,
        })
    }

    /// [`try_acquire`](Self::try_acquire) for a permit that outlives this borrow (held by a
    /// response future or body), at the cost of a reference count.
    #[inline]
    pub fn try_acquire_owned(&self) -> Result<OwnedPermit, Refusal> {
        self.admit().map(|ticket| OwnedPermit {
            breaker: self.clone(),
            ticket,
        })
    }

    #[inline]
    fn admit(&self) -> Result<Ticket, Refusal> {
        let shared = &*self.shared;
        // The clock is read only when something needs the time: a slow-call threshold or the
        // open period (read inside `admit` when open), never for a plain closed count window.
        let started = shared.config.slow_call.map(|_| shared.clock.now());
        match shared.admit(started) {
            Ok((generation, kind)) => Ok(Ticket {
                generation,
                kind,
                started,
            }),
            Err(refusal) => Err(shared.refused(refusal)),
        }
    }

    /// Where the breaker stands.
    pub fn snapshot(&self) -> Snapshot {
        let shared = &self.shared;
        let now = shared.clock.now();
        let word = shared.load();
        let counts = match word.state() {
            State::Closed | State::MetricsOnly => shared.outcomes.counts(word.generation(), now),
            State::HalfOpen => Counts {
                calls: word.successes() + word.failures(),
                failures: word.failures(),
                slow: 0,
            },
            _ => Counts::default(),
        };
        let open_for = match word.state() {
            State::Open => shared.open_remaining(word, now),
            _ => None,
        };
        let throttled = shared.throttled_until.load(Ordering::Relaxed);
        Snapshot {
            name: shared.name.to_string(),
            state: word.state(),
            calls: counts.calls,
            failures: counts.failures,
            slow_calls: counts.slow,
            failure_rate: counts.failure_rate(),
            slow_call_rate: counts.slow_rate(),
            open_for,
            rate_limited_for: (throttled > millis(now))
                .then(|| Duration::from_millis(throttled - millis(now))),
        }
    }

    /// Marks the upstream rate-limited for `retry_after`: calls are refused until then, and
    /// its health is not touched. A [`CircuitBreaker`](crate::CircuitBreaker) does this on a 429.
    pub fn rate_limited(&self, retry_after: Duration) {
        let shared = &self.shared;
        let until = millis(shared.clock.now() + retry_after);
        if shared.throttled_until.fetch_max(until, Ordering::Relaxed) < until {
            shared.metrics.rate_limited();
            shared.emit(|| BreakerEvent::RateLimited {
                breaker: shared.name.clone(),
                retry_after,
            });
        }
    }

    /// Operator: back to closed with an empty window, whatever the state.
    pub fn reset(&self) {
        self.shared.trips.store(0, Ordering::Relaxed);
        self.shared.throttled_until.store(0, Ordering::Relaxed);
        self.shared.force(State::Closed);
    }

    /// Operator: refuse every call until [`reset`](Self::reset).
    pub fn force_open(&self) {
        self.shared.force(State::ForcedOpen);
    }

    /// Operator: let every call through and count nothing until [`reset`](Self::reset).
    pub fn disable(&self) {
        self.shared.force(State::Disabled);
    }

    /// Operator: let every call through and count it, never trip, until
    /// [`reset`](Self::reset).
    pub fn metrics_only(&self) {
        self.shared.force(State::MetricsOnly);
    }
}

/// What a permit was given as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PermitKind {
    /// Closed or metrics-only: counted in the window.
    Counted,
    /// Half-open: one of the trial calls.
    Trial,
    /// Disabled: nothing is counted.
    Uncounted,
}

/// What a permit carries: when and under which state it was given.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    generation: u32,
    kind: PermitKind,
    /// When the call started, if slow calls are measured.
    started: Option<Duration>,
}

impl Ticket {
    #[inline]
    fn elapsed(&self, shared: &Shared) -> Option<Duration> {
        self.started
            .map(|started| shared.clock.now().saturating_sub(started))
    }

    #[inline]
    fn is_slow(&self, shared: &Shared) -> bool {
        match (shared.config.slow_call, self.elapsed(shared)) {
            (Some(threshold), Some(elapsed)) => elapsed > threshold,
            _ => false,
        }
    }

    /// Records the outcome and spends the ticket.
    #[inline]
    fn record(
        &mut self,
        shared: &Shared,
        outcome: CallOutcome,
        slow: bool,
        retry_after: Option<Duration>,
    ) {
        let failure = outcome == CallOutcome::Failure;
        let kind = std::mem::replace(&mut self.kind, PermitKind::Uncounted);
        shared.metrics.call(failure, slow);
        match kind {
            PermitKind::Counted => {
                shared.record_counted(self.generation, failure, slow, retry_after)
            }
            PermitKind::Trial => {
                let bad = failure || slow;
                shared.record_trial(self.generation, bad, retry_after);
            }
            PermitKind::Uncounted => {}
        }
    }

    /// An unspent trial ticket gives its slot back.
    #[inline]
    fn release(&mut self, shared: &Shared) {
        if std::mem::replace(&mut self.kind, PermitKind::Uncounted) == PermitKind::Trial {
            shared.give_back(self.generation);
        }
    }
}

macro_rules! permit_methods {
    () => {
        /// The breaker that gave this permit.
        pub fn breaker(&self) -> &Breaker {
            &self.breaker
        }

        /// Whether this call is one of a half-open breaker's trials.
        pub fn is_trial(&self) -> bool {
            self.ticket.kind == PermitKind::Trial
        }

        /// How long since the permit was given, on the breaker's clock; `None` unless the
        /// breaker measures slow calls (`slow_call` is set).
        pub fn elapsed(&self) -> Option<Duration> {
            self.ticket.elapsed(&self.breaker.shared)
        }

        /// Whether the call has taken longer than `slow_call` so far.
        pub fn is_slow(&self) -> bool {
            self.ticket.is_slow(&self.breaker.shared)
        }

        /// Reports the call's outcome; it is slow when it took longer than `slow_call` since
        /// the permit was given.
        #[inline]
        pub fn record(mut self, outcome: CallOutcome) {
            let shared = &self.breaker.shared;
            let slow = self.ticket.is_slow(shared);
            self.ticket.record(shared, outcome, slow, None);
        }

        /// Reports the call's outcome, saying whether it was slow (time to first token, for
        /// a stream) and how long the upstream asked to be left alone, if it said.
        pub fn record_as(
            mut self,
            outcome: CallOutcome,
            slow: bool,
            retry_after: Option<Duration>,
        ) {
            let shared = &self.breaker.shared;
            self.ticket.record(shared, outcome, slow, retry_after);
        }
    };
}

/// Leave to make one call. Report how it ended with [`record`](Permit::record); dropping it
/// instead says the outcome does not count (and gives a half-open trial slot back).
#[must_use = "a permit reports the call's outcome; dropping it discards the call"]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    ticket: Ticket,
}

/// A [`Permit`] that owns a handle to its breaker, for futures and bodies.
#[must_use = "a permit reports the call's outcome; dropping it discards the call"]
pub struct OwnedPermit {
    breaker: Breaker,
    ticket: Ticket,
}

impl Permit<'_> {
    permit_methods!();
}

impl OwnedPermit {
    permit_methods!();
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        self.ticket.release(&self.breaker.shared);
    }
}

impl Drop for OwnedPermit {
    #[inline]
    fn drop(&mut self) {
        self.ticket.release(&self.breaker.shared);
    }
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("breaker", &self.breaker.shared.name)
            .field("ticket", &self.ticket)
            .finish()
    }
}

impl fmt::Debug for OwnedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedPermit")
            .field("breaker", &self.breaker.shared.name)
            .field("ticket", &self.ticket)
            .finish()
    }
}

impl Shared {
    #[inline]
    fn load(&self) -> Word {
        Word(self.word.load(Ordering::Acquire))
    }

    fn cas(&self, from: Word, to: Word) -> bool {
        self.word
            .compare_exchange(from.0, to.0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    #[cold]
    fn refused(&self, refusal: Refusal) -> Refusal {
        self.metrics.refused(refusal);
        self.emit(|| BreakerEvent::Refused {
            breaker: self.name.clone(),
            refusal,
        });
        refusal
    }

    fn emit(&self, event: impl FnOnce() -> BreakerEvent) {
        if !self.listeners.is_empty() {
            let event = event();
            for listener in &self.listeners {
                listener(&event);
            }
        }
    }

    fn transitioned(&self, from: State, to: State) {
        self.metrics.transition(to);
        tracing::info!(target: "moat::breaker", breaker = %self.name, %from, %to, "circuit breaker state changed");
        self.emit(|| BreakerEvent::Transition {
            breaker: self.name.clone(),
            from,
            to,
        });
    }

    #[inline]
    fn admit(&self, started: Option<Duration>) -> Result<(u32, PermitKind), Refusal> {
        if self.throttled_until.load(Ordering::Relaxed) == 0 {
            let word = self.load();
            if matches!(word.state(), State::Closed | State::MetricsOnly) {
                return Ok((word.generation(), PermitKind::Counted));
            }
        }
        self.admit_slowly(started)
    }

    /// Everything but a closed breaker with no 429 pending.
    #[cold]
    fn admit_slowly(&self, started: Option<Duration>) -> Result<(u32, PermitKind), Refusal> {
        let now = || started.unwrap_or_else(|| self.clock.now());
        let throttled = self.throttled_until.load(Ordering::Relaxed);
        if throttled != 0 {
            let now_ms = millis(now());
            if throttled > now_ms {
                return Err(Refusal::RateLimited {
                    retry_after: Duration::from_millis(throttled - now_ms),
                });
            }
            // Over: back on the fast path (unless a newer 429 moved the mark meanwhile).
            let _ = self.throttled_until.compare_exchange(
                throttled,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        loop {
            let word = self.load();
            match word.state() {
                State::Closed | State::MetricsOnly => {
                    return Ok((word.generation(), PermitKind::Counted))
                }
                State::Disabled => return Ok((word.generation(), PermitKind::Uncounted)),
                State::ForcedOpen => return Err(Refusal::Open { retry_after: None }),
                State::Open => {
                    let now = now();
                    if let Some(retry_after) = self.open_remaining(word, now) {
                        return Err(Refusal::Open {
                            retry_after: Some(retry_after),
                        });
                    }
                    // The open period is over: this call is the first trial.
                    let next = word.next(State::HalfOpen).add(3, 1);
                    if self.cas(word, next) {
                        self.deadline.store(
                            tag(next.generation()) << TAG_SHIFT | millis(now),
                            Ordering::Release,
                        );
                        self.transitioned(State::Open, State::HalfOpen);
                        return Ok((next.generation(), PermitKind::Trial));
                    }
                }
                State::HalfOpen => {
                    if word.issued() < self.config.half_open_calls {
                        if self.cas(word, word.add(3, 1)) {
                            return Ok((word.generation(), PermitKind::Trial));
                        }
                        continue;
                    }
                    let now = now();
                    let deadline = self.deadline.load(Ordering::Acquire);
                    let waited = (deadline >> TAG_SHIFT == tag(word.generation()))
                        .then(|| millis(now).saturating_sub(deadline & MS_MASK));
                    if waited.is_some_and(|w| w >= millis(self.config.half_open_max_wait)) {
                        // The trials never ended: give up on them and open again.
                        self.trip(word, now, None);
                        continue;
                    }
                    return Err(Refusal::Open {
                        retry_after: Some(Duration::from_secs(1)),
                    });
                }
            }
        }
    }

    /// How long an open breaker stays open, or `None` if its period is over.
    fn open_remaining(&self, word: Word, now: Duration) -> Option<Duration> {
        let deadline = self.deadline.load(Ordering::Acquire);
        if deadline >> TAG_SHIFT != tag(word.generation()) {
            // The tripping call has not written the deadline yet: it is just starting.
            return Some(self.config.open_for);
        }
        let until = deadline & MS_MASK;
        let now = millis(now);
        (until > now).then(|| Duration::from_millis(until - now))
    }

    #[inline]
    fn record_counted(
        &self,
        generation: u32,
        failure: bool,
        slow: bool,
        retry_after: Option<Duration>,
    ) {
        // A healthy upstream's usual call: a success on a window already full of successes
        // changes nothing (and a run of failures has ended, so there is nothing to reset).
        if !failure && !slow && self.outcomes.is_clean() {
            return;
        }
        self.write_outcome(generation, failure, slow, retry_after);
    }

    #[inline(never)]
    fn write_outcome(
        &self,
        generation: u32,
        failure: bool,
        slow: bool,
        retry_after: Option<Duration>,
    ) {
        let word = self.load();
        if word.generation() != generation {
            return;
        }
        let position = self
            .outcomes
            .record(generation, || self.clock.now(), failure, slow);
        let consecutive = if self.config.consecutive_failures.is_none() {
            0
        } else if failure {
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            // Most calls succeed: write only when there is a run to end.
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            0
        };
        let config = &self.config;
        // A success lowers the rates: only the call that reaches the minimum is evaluated.
        // (In a time window, old successes also leave; the next failure sees that.)
        let reached_minimum = position.is_some_and(|p| {
            p.wrapping_sub(self.window_base.load(Ordering::Relaxed)) + 1 == config.minimum_calls
        });
        if word.state() != State::Closed || !(failure || slow || reached_minimum) {
            return;
        }
        let trip = config
            .consecutive_failures
            .is_some_and(|n| consecutive >= n)
            || {
                // Two calls ending at once each wrote their slot, then read the window: with a
                // fence between, at least one of them sees both (found by the loom model), so
                // the call that makes the rate trip is never missed by both.
                fence(Ordering::SeqCst);
                let counts = self.outcomes.counts(generation, self.clock.now());
                counts.calls >= config.minimum_calls
                    && (counts.failure_rate() >= config.failure_rate
                        || counts.slow_rate() >= config.slow_call_rate)
            };
        if trip {
            self.trip(word, self.clock.now(), retry_after);
        }
    }

    fn record_trial(&self, generation: u32, bad: bool, retry_after: Option<Duration>) {
        loop {
            let word = self.load();
            if word.generation() != generation || word.state() != State::HalfOpen {
                return;
            }
            let next = if bad {
                word.add(23, 1)
            } else {
                word.add(13, 1)
            };
            let ended = next.successes() + next.failures();
            if ended < self.config.half_open_calls {
                if self.cas(word, next) {
                    return;
                }
                continue;
            }
            let rate = f64::from(next.failures()) / f64::from(ended);
            if rate >= self.config.failure_rate {
                if self.trip(word, self.clock.now(), retry_after) {
                    return;
                }
            } else if self.cas(word, word.next(State::Closed)) {
                self.window_reset();
                self.trips.store(0, Ordering::Relaxed);
                self.consecutive_failures.store(0, Ordering::Relaxed);
                self.transitioned(State::HalfOpen, State::Closed);
                return;
            }
        }
    }

    /// A trial ended without an outcome: its slot is free again.
    fn give_back(&self, generation: u32) {
        loop {
            let word = self.load();
            if word.generation() != generation
                || word.state() != State::HalfOpen
                || word.issued() == 0
            {
                return;
            }
            if self.cas(word, word.add(3, -1)) {
                return;
            }
        }
    }

    fn window_reset(&self) {
        self.window_base
            .store(self.outcomes.reset(), Ordering::Relaxed);
    }

    /// Opens the breaker if it is still in `word`; whether this call did it.
    fn trip(&self, word: Word, now: Duration, retry_after: Option<Duration>) -> bool {
        let next = word.next(State::Open);
        if !self.cas(word, next) {
            return false;
        }
        let trips = self.trips.fetch_add(1, Ordering::Relaxed);
        let open_for = self
            .open_duration(trips, now)
            .max(retry_after.unwrap_or_default());
        self.deadline.store(
            tag(next.generation()) << TAG_SHIFT | millis(now + open_for),
            Ordering::Release,
        );
        self.transitioned(word.state(), State::Open);
        true
    }

    /// The open period after `trips` earlier trips: grown, capped, jittered.
    fn open_duration(&self, trips: u32, now: Duration) -> Duration {
        let config = &self.config;
        let grown = config.open_for.as_secs_f64()
            * config
                .open_growth
                .powi(i32::try_from(trips.min(64)).unwrap_or(64));
        let capped = grown.min(config.open_max.as_secs_f64());
        // Jitter from the clock's low bits: breakers that trip together spread apart, and a
        // driven clock in tests stays deterministic.
        let unit =
            (splitmix(now.as_nanos() as u64 ^ self.name_hash()) >> 11) as f64 / (1u64 << 53) as f64;
        let factor = 1.0 + config.jitter * (2.0 * unit - 1.0);
        Duration::from_secs_f64((capped * factor).max(0.001))
    }

    fn name_hash(&self) -> u64 {
        self.name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }

    fn force(&self, state: State) {
        loop {
            let word = self.load();
            if self.cas(word, word.next(state)) {
                self.window_reset();
                if word.state() != state {
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                    self.transitioned(word.state(), state);
                }
                return;
            }
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Window;
    use moat_core::clock::ManualClock;
    use std::sync::Mutex;

    fn breaker(config: BreakerConfig) -> (Breaker, ManualClock) {
        let clock = ManualClock::new();
        let breaker = Breaker::builder("test")
            .config(config.with_jitter(0.0))
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        (breaker, clock)
    }

    fn calls(breaker: &Breaker, outcome: CallOutcome, n: usize) {
        for _ in 0..n {
            breaker.try_acquire().unwrap().record(outcome);
        }
    }

    #[test]
    fn the_word_packs_and_unpacks() {
        let w = Word::new(State::HalfOpen, GEN_MASK)
            .add(3, 5)
            .add(13, 1000 - 1)
            .add(23, 7);
        assert_eq!(w.state(), State::HalfOpen);
        assert_eq!(w.generation(), GEN_MASK);
        assert_eq!((w.issued(), w.successes(), w.failures()), (5, 999, 7));
        assert_eq!(w.add(3, -1).issued(), 4);
        assert_eq!(w.next(State::Open).generation(), 0, "generations wrap");
        assert_eq!(w.next(State::Open).issued(), 0);
    }

    #[test]
    fn trips_at_the_failure_rate_once_the_minimum_is_reached() {
        let (b, _) = breaker(
            BreakerConfig::default()
                .with_minimum_calls(10)
                .with_window(Window::Count(10)),
        );
        calls(&b, CallOutcome::Failure, 9);
        assert_eq!(b.state(), State::Closed, "under the minimum");
        calls(&b, CallOutcome::Success, 1);
        assert_eq!(b.state(), State::Open, "9 of 10 failed");
        assert!(
            matches!(b.try_acquire(), Err(Refusal::Open { retry_after: Some(d) }) if d == Duration::from_secs(30))
        );
    }

    #[test]
    fn the_count_window_slides() {
        let (b, _) = breaker(
            BreakerConfig::default()
                .with_minimum_calls(4)
                .with_window(Window::Count(4)),
        );
        // Old failures slide out: 1 failure in the last 4 calls is 25%, under 50%.
        calls(&b, CallOutcome::Failure, 1);
        calls(&b, CallOutcome::Success, 3);
        calls(&b, CallOutcome::Success, 3);
        calls(&b, CallOutcome::Failure, 1);
        assert_eq!(b.state(), State::Closed);
        calls(&b, CallOutcome::Failure, 1);
        assert_eq!(b.state(), State::Open, "2 of the last 4");
    }

    #[test]
    fn the_time_window_forgets_old_failures() {
        let (b, clock) = breaker(
            BreakerConfig::default()
                .with_minimum_calls(4)
                .with_window(Window::Time(Duration::from_secs(10))),
        );
        calls(&b, CallOutcome::Failure, 3);
        clock.advance(Duration::from_secs(11));
        calls(&b, CallOutcome::Success, 3);
        calls(&b, CallOutcome::Failure, 1);
        assert_eq!(
            b.state(),
            State::Closed,
            "the 3 failures left the window: 1 of 4"
        );
        calls(&b, CallOutcome::Failure, 2);
        assert_eq!(b.state(), State::Open, "3 of 6");
    }

    #[test]
    fn slow_calls_trip_at_their_own_rate() {
        let (b, clock) = breaker(
            BreakerConfig::default()
                .with_minimum_calls(2)
                .with_slow_call(Duration::from_secs(5))
                .with_slow_call_rate(0.5),
        );
        let fast = b.try_acquire().unwrap();
        fast.record(CallOutcome::Success);
        let slow = b.try_acquire().unwrap();
        clock.advance(Duration::from_secs(6));
        slow.record(CallOutcome::Success);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn consecutive_failures_trip_without_the_minimum() {
        let (b, _) = breaker(BreakerConfig::default().with_consecutive_failures(3));
        calls(&b, CallOutcome::Failure, 2);
        calls(&b, CallOutcome::Success, 1);
        calls(&b, CallOutcome::Failure, 2);
        assert_eq!(b.state(), State::Closed);
        calls(&b, CallOutcome::Failure, 1);
        assert_eq!(b.state(), State::Open);
    }

    fn open(b: &Breaker) {
        calls(b, CallOutcome::Failure, b.config().minimum_calls as usize);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn half_open_admits_exactly_its_trials_and_closes_on_success() {
        let (b, clock) = breaker(BreakerConfig::default().with_half_open_calls(2));
        open(&b);
        clock.advance(Duration::from_secs(30));
        let t1 = b.try_acquire().unwrap();
        let t2 = b.try_acquire().unwrap();
        assert!(t1.is_trial() && t2.is_trial());
        assert!(b.try_acquire().is_err(), "only two trials");
        t1.record(CallOutcome::Success);
        assert!(
            b.try_acquire().is_err(),
            "a finished trial does not free a slot"
        );
        assert_eq!(b.state(), State::HalfOpen);
        t2.record(CallOutcome::Success);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.snapshot().calls, 0, "closed with an empty window");
    }

    #[test]
    fn a_dropped_trial_frees_its_slot() {
        let (b, clock) = breaker(BreakerConfig::default().with_half_open_calls(1));
        open(&b);
        clock.advance(Duration::from_secs(30));
        let t = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_err());
        drop(t);
        let t = b.try_acquire().expect("the slot came back");
        t.record(CallOutcome::Failure);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn failed_trials_reopen_for_longer_each_time_up_to_the_cap() {
        let (b, clock) = breaker(
            BreakerConfig::default()
                .with_half_open_calls(1)
                .with_open_for(Duration::from_secs(10))
                .with_open_max(Duration::from_secs(25)),
        );
        open(&b);
        let mut expected = [10, 20, 25, 25].into_iter();
        let mut open_for = expected.next().unwrap();
        loop {
            assert_eq!(b.snapshot().open_for, Some(Duration::from_secs(open_for)));
            clock.advance(Duration::from_secs(open_for) - Duration::from_millis(1));
            assert!(b.try_acquire().is_err(), "still open");
            clock.advance(Duration::from_millis(1));
            b.try_acquire().unwrap().record(CallOutcome::Failure);
            let Some(next) = expected.next() else { break };
            open_for = next;
        }
        clock.advance(Duration::from_secs(25));
        b.try_acquire().unwrap().record(CallOutcome::Success);
        assert_eq!(b.state(), State::Closed);
        open(&b);
        assert_eq!(
            b.snapshot().open_for,
            Some(Duration::from_secs(10)),
            "growth starts over"
        );
    }

    #[test]
    fn retry_after_of_the_tripping_failure_extends_the_open_period() {
        let (b, _) = breaker(
            BreakerConfig::default()
                .with_minimum_calls(1)
                .with_window(Window::Count(1)),
        );
        b.try_acquire().unwrap().record_as(
            CallOutcome::Failure,
            false,
            Some(Duration::from_secs(120)),
        );
        assert_eq!(b.snapshot().open_for, Some(Duration::from_secs(120)));
    }

    #[test]
    fn half_open_never_gets_stuck_on_trials_that_never_end() {
        let (b, clock) = breaker(BreakerConfig::default().with_half_open_calls(1));
        open(&b);
        clock.advance(Duration::from_secs(30));
        let stuck = b.try_acquire().unwrap();
        clock.advance(Duration::from_secs(119));
        assert!(b.try_acquire().is_err());
        assert_eq!(b.state(), State::HalfOpen);
        clock.advance(Duration::from_secs(1));
        assert!(b.try_acquire().is_err());
        assert_eq!(b.state(), State::Open, "gave up waiting");
        stuck.record(CallOutcome::Success);
        assert_eq!(
            b.state(),
            State::Open,
            "a trial of an old generation is ignored"
        );
    }

    #[test]
    fn a_429_refuses_calls_until_retry_after_without_touching_health() {
        let (b, clock) = breaker(BreakerConfig::default());
        b.rate_limited(Duration::from_secs(3));
        assert_eq!(
            b.try_acquire().unwrap_err(),
            Refusal::RateLimited {
                retry_after: Duration::from_secs(3)
            }
        );
        assert_eq!(b.state(), State::Closed);
        clock.advance(Duration::from_secs(3));
        assert!(b.try_acquire().is_ok());
    }

    #[test]
    fn operator_states() {
        let (b, _) = breaker(BreakerConfig::default());
        b.force_open();
        assert_eq!(
            b.try_acquire().unwrap_err(),
            Refusal::Open { retry_after: None }
        );
        b.disable();
        calls(&b, CallOutcome::Failure, 50);
        assert_eq!(b.state(), State::Disabled);
        b.metrics_only();
        calls(&b, CallOutcome::Failure, 50);
        assert_eq!(b.state(), State::MetricsOnly, "never trips");
        assert_eq!(b.snapshot().failures, 50, "but counts");
        b.reset();
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.snapshot().calls, 0);
    }

    #[test]
    fn an_outcome_from_before_a_transition_is_not_counted() {
        let (b, clock) = breaker(BreakerConfig::default().with_half_open_calls(1));
        let old = b.try_acquire().unwrap();
        open(&b);
        clock.advance(Duration::from_secs(30));
        b.try_acquire().unwrap().record(CallOutcome::Success);
        assert_eq!(b.state(), State::Closed);
        old.record(CallOutcome::Failure);
        assert_eq!(b.snapshot().calls, 0);
    }

    #[test]
    fn subscribers_see_transitions_and_refusals() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let clock = ManualClock::new();
        let b = Breaker::builder("events")
            .config(
                BreakerConfig::default()
                    .with_minimum_calls(1)
                    .with_window(Window::Count(1)),
            )
            .clock(Arc::new(clock))
            .on_event(move |e| sink.lock().unwrap().push(e.clone()))
            .build()
            .unwrap();
        calls(&b, CallOutcome::Failure, 1);
        let _ = b.try_acquire();
        let seen = seen.lock().unwrap();
        assert!(
            matches!(&seen[0], BreakerEvent::Transition { from: State::Closed, to: State::Open, breaker } if &**breaker == "events")
        );
        assert!(matches!(&seen[1], BreakerEvent::Refused { .. }));
    }

    #[test]
    fn jitter_stays_within_its_share() {
        let clock = ManualClock::new();
        let b = Breaker::builder("j")
            .config(BreakerConfig::default().with_jitter(0.5))
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..200u64 {
            let d = b.shared.open_duration(0, Duration::from_nanos(i * 7919));
            assert!(
                d >= Duration::from_secs(15) && d <= Duration::from_secs(45),
                "{d:?}"
            );
            seen.insert(d.as_millis());
        }
        assert!(seen.len() > 100, "jitter spreads: {}", seen.len());
    }
}
