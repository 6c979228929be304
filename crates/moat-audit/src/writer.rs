//! The log: a bounded queue on the request path, one writer thread that chains, writes and
//! checkpoints.
//!
//! The request path only builds an event and sends it down a channel (a few hundred
//! nanoseconds, no I/O, no lock held across anything slow). The queue's bound is checked when a
//! request is admitted, where [`OnFull`] can make it wait or refuse it; the event of a request
//! already admitted is always taken, so memory stays bounded by the queue plus the requests in
//! flight. Lost events are never silent: the writer chains a `gap` record that counts them (and
//! a `refused` record for requests refused while the queue was full).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::{oneshot, Notify};

use crate::chain::{Chain, Head, Record};
use crate::checkpoint::{Checkpoint, Signer};
use crate::event::{self, RequestEvent};
use crate::scrub::{NoScrub, Scrubber};
use crate::sink::{Sink, IDLE_FLUSH};

/// What happens when the queue is full (the sinks are behind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum OnFull {
    /// New requests wait until there is room (backpressure).
    #[default]
    Backpressure,
    /// Requests go on; their events are dropped and a `gap` record counts them.
    DropWithGap,
    /// New requests are refused with 503 `audit_unavailable`; a `refused` record counts them.
    FailClosed,
}

enum Msg {
    Event(Box<RequestEvent>),
    Custom(Box<(String, Map<String, Value>)>),
    Flush(oneshot::Sender<io::Result<Head>>),
    Shutdown(oneshot::Sender<io::Result<Head>>),
}

/// Counters shared by the handles and the writer (not the channel: the writer must see it
/// close when the last handle goes).
struct Counters {
    queued: AtomicUsize,
    dropped: AtomicU64,
    refused: AtomicU64,
    space: Notify,
}

struct Shared {
    tx: Sender<Msg>,
    counters: Arc<Counters>,
    capacity: usize,
    on_full: OnFull,
    origin: String,
}

/// A handle to the audit log: cheap to clone, every clone writes to one chain.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("origin", &self.shared.origin)
            .field(
                "queued",
                &self.shared.counters.queued.load(Ordering::Relaxed),
            )
            .field("capacity", &self.shared.capacity)
            .field("on_full", &self.shared.on_full)
            .finish()
    }
}

/// Whether a new request may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Go,
    Wait,
    Refuse,
}

impl AuditLog {
    /// A log writing to `sink`; add more sinks, checkpoints and policies on the builder.
    pub fn builder(origin: impl Into<String>) -> AuditLogBuilder {
        AuditLogBuilder {
            origin: origin.into(),
            sinks: Vec::new(),
            capacity: 8192,
            batch: 512,
            on_full: OnFull::default(),
            scrubber: Box::new(NoScrub),
            checkpoints: None,
        }
    }

    /// Whether a new request may go on now, or must wait or be refused ([`OnFull`]).
    pub(crate) fn admit(&self) -> Admission {
        let shared = &self.shared;
        if shared.counters.queued.load(Ordering::Relaxed) < shared.capacity {
            return Admission::Go;
        }
        match shared.on_full {
            OnFull::Backpressure => Admission::Wait,
            OnFull::DropWithGap => Admission::Go,
            OnFull::FailClosed => {
                shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("moat_audit_refused_total").increment(1);
                Admission::Refuse
            }
        }
    }

    /// Resolves once the queue has room.
    pub(crate) async fn room(self) {
        let counters = &self.shared.counters;
        loop {
            let notified = counters.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if counters.queued.load(Ordering::Relaxed) < self.shared.capacity {
                return;
            }
            notified.await;
        }
    }

    /// Queues one request's event. Never blocks.
    pub(crate) fn record(&self, event: Box<RequestEvent>) {
        self.send(Msg::Event(event));
    }

    /// Records an event of your own in the same chain (an operator's action, a key rotated, a
    /// budget changed): `kind` becomes its `type`, `fields` the rest, with control characters
    /// escaped as in every record (`type`, `seq`, `prev` and `hash` are the log's). Never
    /// blocks; when the queue is full it is dropped and counted under `drop_with_gap`, and
    /// taken otherwise.
    pub fn record_event(&self, kind: &str, fields: Map<String, Value>) {
        self.send(Msg::Custom(Box::new((kind.to_owned(), fields))));
    }

    fn send(&self, msg: Msg) {
        let shared = &self.shared;
        let counters = &shared.counters;
        if shared.on_full == OnFull::DropWithGap
            && counters.queued.load(Ordering::Relaxed) >= shared.capacity
        {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("moat_audit_dropped_total", "sink" => "queue").increment(1);
            return;
        }
        counters.queued.fetch_add(1, Ordering::Relaxed);
        if shared.tx.send(msg).is_err() {
            counters.queued.fetch_sub(1, Ordering::Relaxed);
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(target: "moat::audit", "the audit writer has stopped: an event was lost");
        }
    }

    /// Waits until every event queued before the call is written, made durable and covered
    /// by a checkpoint (when configured); returns where the chain stands.
    pub async fn flush(&self) -> io::Result<Head> {
        self.ask(Msg::Flush).await
    }

    /// Flushes as [`flush`](Self::flush) does, lets sinks with queues of their own deliver
    /// them (a webhook gets its last batches), and stops the writer. Call it at shutdown,
    /// after the server has drained; an event recorded later is lost, and logged as lost.
    pub async fn shutdown(&self) -> io::Result<Head> {
        self.ask(Msg::Shutdown).await
    }

    async fn ask(&self, msg: fn(oneshot::Sender<io::Result<Head>>) -> Msg) -> io::Result<Head> {
        let stopped = || io::Error::other("the audit writer has stopped");
        let (tx, rx) = oneshot::channel();
        self.shared.tx.send(msg(tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Events queued and not yet written.
    pub fn queued(&self) -> usize {
        self.shared.counters.queued.load(Ordering::Relaxed)
    }
}

/// Configures an [`AuditLog`].
pub struct AuditLogBuilder {
    origin: String,
    sinks: Vec<Box<dyn Sink>>,
    capacity: usize,
    batch: usize,
    on_full: OnFull,
    scrubber: Box<dyn Scrubber>,
    checkpoints: Option<Checkpoints>,
}

impl fmt::Debug for AuditLogBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLogBuilder")
            .field("origin", &self.origin)
            .field("sinks", &self.sinks.len())
            .field("capacity", &self.capacity)
            .field("on_full", &self.on_full)
            .finish_non_exhaustive()
    }
}

struct Checkpoints {
    signer: Signer,
    path: PathBuf,
    every: Duration,
}

impl AuditLogBuilder {
    /// Adds a sink. The first sink that can ([`Sink::resume`]) says where the chain goes on.
    #[must_use]
    pub fn sink(mut self, sink: impl Sink) -> Self {
        self.sinks.push(Box::new(sink));
        self
    }

    /// How many events may wait for the writer (default 8192).
    #[must_use]
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// What happens when the queue is full (default: backpressure).
    #[must_use]
    pub fn on_full(mut self, on_full: OnFull) -> Self {
        self.on_full = on_full;
        self
    }

    /// How bodies are scrubbed before they are written (default: only the presented key).
    #[must_use]
    pub fn scrubber(mut self, scrubber: impl Scrubber) -> Self {
        self.scrubber = Box::new(scrubber);
        self
    }

    /// Writes a signed checkpoint to `path` every `every` (when records were added), and at
    /// every [`AuditLog::flush`].
    #[must_use]
    pub fn checkpoints(
        mut self,
        signer: Signer,
        path: impl Into<PathBuf>,
        every: Duration,
    ) -> Self {
        self.checkpoints = Some(Checkpoints {
            signer,
            path: path.into(),
            every: every.max(Duration::from_millis(10)),
        });
        self
    }

    /// Resumes the chain from the sinks, writes a `start` record and starts the writer
    /// thread. Needs a Tokio runtime only for [`AuditLog::flush`]'s answer, not to run.
    pub fn start(mut self) -> io::Result<AuditLog> {
        if self.origin.is_empty() || self.origin.chars().any(char::is_control) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the log's origin must be a non-empty line without control characters",
            ));
        }
        let mut head = Head::EMPTY;
        for sink in &mut self.sinks {
            if let Some(found) = sink.resume()? {
                head = found;
                break;
            }
        }
        let counters = Arc::new(Counters {
            queued: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            space: Notify::new(),
        });
        let (tx, rx) = mpsc::channel();
        let mut writer = Writer {
            chain: Chain::new(head),
            sinks: self.sinks,
            scrubber: self.scrubber,
            counters: counters.clone(),
            checkpoints: self.checkpoints,
            checkpointed: None,
            origin: self.origin.clone(),
            batch: self.batch,
        };
        // The start record is written before any request's, so a restart is visible in the
        // chain, and a sink that cannot be written fails here rather than later.
        let start = writer.chain.append(event::start(&self.origin));
        writer
            .sinks
            .iter_mut()
            .try_for_each(|sink| sink.write(&start))?;
        writer.flush(true)?;
        std::thread::Builder::new()
            .name("moat-audit".into())
            .spawn(move || writer.run(rx))?;
        Ok(AuditLog {
            shared: Arc::new(Shared {
                tx,
                counters,
                capacity: self.capacity,
                on_full: self.on_full,
                origin: self.origin,
            }),
        })
    }
}

struct Writer {
    chain: Chain,
    sinks: Vec<Box<dyn Sink>>,
    scrubber: Box<dyn Scrubber>,
    counters: Arc<Counters>,
    checkpoints: Option<Checkpoints>,
    checkpointed: Option<(u64, Instant)>,
    origin: String,
    batch: usize,
}

/// How long the writer lets events gather after a batch smaller than the largest: at most this
/// much later on disk, and at most this many wake-ups a second however busy the log.
const COALESCE: Duration = Duration::from_millis(1);

/// How long the writer waits between retries of a sink that fails.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        // Whether records went out since the sinks were last flushed while idle.
        let mut written = false;
        loop {
            let wait = match written {
                true => IDLE_FLUSH.min(self.until_checkpoint()),
                false => self.until_checkpoint(),
            };
            let first = match rx.recv_timeout(wait) {
                Ok(msg) => Some(msg),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            written = first.is_some();
            let mut acks = Vec::new();
            let mut shutdown = None;
            let mut events = 0;
            for msg in first.into_iter().chain(rx.try_iter().take(self.batch)) {
                match msg {
                    Msg::Event(event) => {
                        self.gaps();
                        self.request(*event);
                        events += 1;
                    }
                    Msg::Custom(custom) => {
                        self.gaps();
                        let record = self.chain.append(event::custom(custom.0, custom.1));
                        self.emit(&record);
                        events += 1;
                    }
                    Msg::Flush(ack) => acks.push(ack),
                    Msg::Shutdown(ack) => {
                        shutdown = Some(ack);
                        break;
                    }
                }
            }
            self.gaps();
            let durable = !acks.is_empty() || shutdown.is_some();
            self.retry(|w| w.flush(durable));
            if events > 0 {
                self.counters.queued.fetch_sub(events, Ordering::Relaxed);
                self.counters.space.notify_waiters();
                metrics::counter!("moat_audit_events_total").increment(events as u64);
            }
            metrics::gauge!("moat_audit_queue_depth")
                .set(self.counters.queued.load(Ordering::Relaxed) as f64);
            if durable || self.checkpoint_due() {
                self.retry(|w| w.checkpoint());
            }
            for ack in acks {
                let _ = ack.send(Ok(self.chain.head()));
            }
            if let Some(ack) = shutdown {
                // What was sent before the channel closes is written too.
                let mut late = Vec::new();
                for msg in rx.try_iter() {
                    match msg {
                        Msg::Event(event) => self.request(*event),
                        Msg::Custom(custom) => {
                            let record = self.chain.append(event::custom(custom.0, custom.1));
                            self.emit(&record);
                        }
                        Msg::Flush(ack) | Msg::Shutdown(ack) => late.push(ack),
                    }
                }
                drop(rx);
                let closed = self.close();
                for ack in late {
                    let _ = ack.send(Ok(self.chain.head()));
                }
                let _ = ack.send(closed);
                return;
            }
            if events > 0 && events < self.batch {
                // Let the next events gather rather than being woken for each: the request
                // path then sends without waking a parked thread (a syscall per request).
                std::thread::sleep(COALESCE);
            }
        }
        // Every handle is gone.
        let _ = self.close();
    }

    /// Writes what is left, a last checkpoint, and closes the sinks.
    fn close(&mut self) -> io::Result<Head> {
        self.gaps();
        self.retry(|w| w.flush(true));
        self.retry(|w| w.checkpoint());
        let mut result = Ok(self.chain.head());
        for sink in &mut self.sinks {
            if let Err(error) = sink.close() {
                result = Err(error);
            }
        }
        result
    }

    /// Chains a record for events lost or requests refused since the last one.
    fn gaps(&mut self) {
        let counters = self.counters.clone();
        for (kind, counter) in [("gap", &counters.dropped), ("refused", &counters.refused)] {
            let count = counter.swap(0, Ordering::Relaxed);
            if count > 0 {
                let record = self.chain.append(event::gap(kind, count));
                self.emit(&record);
            }
        }
    }

    /// Chains a request's event. A scrubber that panics (it reads untrusted bodies) costs the
    /// event, counted in a gap record, not the writer.
    fn request(&mut self, event: RequestEvent) {
        let scrubber = &*self.scrubber;
        let fields =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| event.into_fields(scrubber)));
        match fields {
            Ok(fields) => {
                let record = self.chain.append(fields);
                self.emit(&record);
            }
            Err(_) => {
                tracing::error!(target: "moat::audit", "building a record panicked: the event is counted as dropped");
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Writes a record to every sink, retrying each that fails on its own, so no sink gets a
    /// record twice.
    fn emit(&mut self, record: &Record) {
        for i in 0..self.sinks.len() {
            self.retry(|w| w.sinks[i].write(record));
        }
    }

    fn flush(&mut self, durable: bool) -> io::Result<()> {
        self.sinks
            .iter_mut()
            .try_for_each(|sink| sink.flush(durable))
    }

    /// Runs `step` until it succeeds: a sink that fails holds the writer (and, through the
    /// queue, the request path as [`OnFull`] says) rather than losing records.
    fn retry(&mut self, mut step: impl FnMut(&mut Self) -> io::Result<()>) {
        let mut wait = RETRY_FIRST;
        while let Err(error) = step(self) {
            metrics::counter!("moat_audit_sink_errors_total", "sink" => "writer").increment(1);
            tracing::error!(target: "moat::audit", %error, "an audit sink failed; retrying");
            std::thread::sleep(wait);
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    fn until_checkpoint(&self) -> Duration {
        match (&self.checkpoints, self.checkpointed) {
            (Some(c), Some((_, at))) => c.every.saturating_sub(at.elapsed()),
            (Some(_), None) => Duration::ZERO,
            (None, _) => Duration::from_secs(3600),
        }
    }

    fn checkpoint_due(&self) -> bool {
        self.checkpoints.is_some() && self.until_checkpoint().is_zero()
    }

    /// Writes a signed checkpoint of the chain as it stands, if it grew since the last one.
    fn checkpoint(&mut self) -> io::Result<()> {
        let Some(c) = &self.checkpoints else {
            return Ok(());
        };
        let head = self.chain.head();
        if self
            .checkpointed
            .is_some_and(|(size, _)| size == head.next_seq)
        {
            self.checkpointed = Some((head.next_seq, Instant::now()));
            return Ok(());
        }
        // Only what is durable may be committed to.
        for sink in &mut self.sinks {
            sink.flush(true)?;
        }
        let note = c.signer.sign(&Checkpoint::at(&self.origin, head));
        write_atomically(&c.path, note.as_bytes())?;
        tracing::debug!(target: "moat::audit", size = head.next_seq, "checkpoint written");
        // Also to the sinks that hand checkpoints to someone else (a webhook), so a copy lives
        // where whoever can write the log cannot replace it.
        for sink in &mut self.sinks {
            if let Err(error) = sink.checkpoint(&note) {
                tracing::error!(target: "moat::audit", %error, "a sink did not take a checkpoint");
            }
        }
        self.checkpointed = Some((head.next_seq, Instant::now()));
        Ok(())
    }
}

/// Replaces `path` with `bytes` so a reader sees the old file or the new, never half.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
