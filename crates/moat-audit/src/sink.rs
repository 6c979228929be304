//! Where records go: a JSON Lines file, `tracing`, a webhook, or a [`Sink`] of your own.
//!
//! Sinks run on the log's writer thread, in batches: [`Sink::write`] for each record, then
//! [`Sink::flush`] once per batch. Nothing here runs on the request path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::chain::{links, Head, Record};
use crate::writer::OnFull;

/// A destination for records.
pub trait Sink: Send + 'static {
    /// Where a chain this sink holds left off, to continue it after a restart. Only the first
    /// sink that answers is asked.
    fn resume(&mut self) -> io::Result<Option<Head>> {
        Ok(None)
    }

    /// Takes one record (it may be held until [`flush`](Sink::flush)).
    fn write(&mut self, record: &Record) -> io::Result<()>;

    /// The end of a batch: hand held records on; with `durable`, to stable storage (before a
    /// checkpoint that commits to them, and at shutdown). Also called, not durable, when the
    /// writer has been idle for [`IDLE_FLUSH`] after a batch, so a sink that groups its syncs
    /// can finish one.
    fn flush(&mut self, durable: bool) -> io::Result<()>;

    /// A signed checkpoint (a C2SP note) was written, committing to every record taken so
    /// far. A sink that delivers elsewhere (a webhook) should pass it on, so a copy lives where
    /// whoever can write the log cannot replace it. Default: nothing.
    fn checkpoint(&mut self, note: &str) -> io::Result<()> {
        let _ = note;
        Ok(())
    }

    /// The log is shutting down: deliver everything taken (a sink with its own queue drains
    /// it). Called once, after a durable flush.
    fn close(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How long an idle writer waits after a batch before flushing the sinks again.
pub const IDLE_FLUSH: Duration = Duration::from_millis(20);

/// When the file sink makes written records durable with `fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Fsync {
    /// After every record: slowest; a power cut loses nothing written.
    Always,
    /// After a batch, at most once per [`FileSink::with_fsync_interval`] (20 ms by default: a
    /// group commit, so a busy log does not sync per request), and before every checkpoint.
    #[default]
    Batch,
    /// Left to the operating system (still before every checkpoint and at shutdown).
    Never,
}

/// Records as JSON Lines in a file, rotated by size and age.
///
/// The current file keeps its name (`audit/moat-audit.jsonl`); a rotated one is renamed after
/// its first record, `audit/moat-audit.000000001042.jsonl`, so the files sort in chain order.
/// A batch is written with one `write`; if that fails the file is cut back to its last whole
/// record. After a crash mid-write, the next start moves the file with the partial line aside
/// (the verifier names the line) and continues the chain from the last whole record.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: Option<File>,
    len: u64,
    opened: SystemTime,
    first_seq: Option<u64>,
    rotate_bytes: Option<u64>,
    rotate_age: Option<Duration>,
    fsync: Fsync,
    pending: Vec<u8>,
    pending_first: Option<u64>,
    /// The last record taken (so a retry does not take it twice).
    accepted: Option<u64>,
    /// Bytes written since the last sync.
    unsynced: bool,
    last_sync: Instant,
    sync_interval: Duration,
}

impl FileSink {
    /// Records to `path` (its directory is created), fsync per batch, no rotation.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            file: None,
            len: 0,
            opened: SystemTime::now(),
            first_seq: None,
            rotate_bytes: None,
            rotate_age: None,
            fsync: Fsync::Batch,
            pending: Vec::new(),
            pending_first: None,
            accepted: None,
            unsynced: false,
            last_sync: Instant::now(),
            sync_interval: IDLE_FLUSH,
        }
    }

    /// Starts a new file once the current one holds `bytes`.
    #[must_use]
    pub fn with_rotate_bytes(mut self, bytes: u64) -> Self {
        self.rotate_bytes = Some(bytes.max(1));
        self
    }

    /// Starts a new file once the current one is `age` old.
    #[must_use]
    pub fn with_rotate_age(mut self, age: Duration) -> Self {
        self.rotate_age = Some(age);
        self
    }

    /// When records are made durable.
    #[must_use]
    pub fn with_fsync(mut self, fsync: Fsync) -> Self {
        self.fsync = fsync;
        self
    }

    /// With [`Fsync::Batch`], the most often records are synced (default 20 ms).
    #[must_use]
    pub fn with_fsync_interval(mut self, interval: Duration) -> Self {
        self.sync_interval = interval;
        self
    }

    /// The current file's stem and extension (`moat-audit`, `jsonl`).
    fn name_parts(&self) -> (String, Option<String>) {
        let stem = self
            .path
            .file_stem()
            .map_or_else(|| "moat-audit".into(), |s| s.to_string_lossy().into_owned());
        let ext = self
            .path
            .extension()
            .map(|e| e.to_string_lossy().into_owned());
        (stem, ext)
    }

    /// The name the current file gets when it is rotated: tagged with its first record.
    fn rotated_name(&self, tag: &str) -> PathBuf {
        let name = match self.name_parts() {
            (stem, Some(ext)) => format!("{stem}.{tag}.{ext}"),
            (stem, None) => format!("{stem}.{tag}"),
        };
        self.path.with_file_name(name)
    }

    /// The rotated files beside the current one, by first record.
    fn rotated(&self) -> io::Result<Vec<PathBuf>> {
        let dir = parent(&self.path);
        let (stem, ext) = self.name_parts();
        let prefix = format!("{stem}.");
        let suffix = ext.map(|e| format!(".{e}")).unwrap_or_default();
        let mut found = Vec::new();
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            // No directory yet: no rotated files (it is made with the first record).
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let tag = name
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.strip_suffix(suffix.as_str()));
            if tag.is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())) {
                found.push(dir.join(&name));
            }
        }
        found.sort();
        Ok(found)
    }

    fn open(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            fs::create_dir_all(parent(&self.path))?;
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.len = file.metadata()?.len();
            self.opened = SystemTime::now();
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Whether the current file (with what is held for it) is due for rotation.
    fn due(&self) -> bool {
        let len = self.len + self.pending.len() as u64;
        len > 0
            && (self.rotate_bytes.is_some_and(|max| len >= max)
                || self
                    .rotate_age
                    .is_some_and(|age| self.opened.elapsed().unwrap_or_default() >= age))
    }

    /// Renames the current file after its first record and starts a new one.
    fn rotate(&mut self, tag: &str) -> io::Result<()> {
        if let Some(file) = self.file.take() {
            file.sync_all()?;
            self.unsynced = false;
        }
        fs::rename(&self.path, self.rotated_name(tag))?;
        sync_dir(&self.path);
        self.len = 0;
        self.first_seq = None;
        Ok(())
    }

    fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let len = {
            self.open()?;
            self.len
        };
        let file = self.file.as_mut().expect("opened above");
        if let Err(error) = file.write_all(&self.pending) {
            // Cut back to the last whole record, so a retry cannot leave half a line.
            let _ = file.set_len(len);
            return Err(error);
        }
        self.len += self.pending.len() as u64;
        self.unsynced = true;
        if self.first_seq.is_none() {
            self.first_seq = self.pending_first;
        }
        self.pending.clear();
        self.pending_first = None;
        Ok(())
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes a rename durable (where the platform allows opening a directory).
fn sync_dir(path: &Path) {
    if let Ok(dir) = File::open(parent(path)) {
        let _ = dir.sync_all();
    }
}

/// The last line of a file and whether a partial line (no newline) follows it.
pub(crate) fn tail(path: &Path) -> io::Result<(Option<Vec<u8>>, bool)> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok((None, false));
    }
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        file.read_to_end(&mut buf)?;
        let partial = buf.last() != Some(&b'\n');
        // The bytes up to the last newline (the partial line dropped).
        let whole = match buf.iter().rposition(|&b| b == b'\n') {
            Some(end) => &buf[..end],
            None if start == 0 => return Ok((None, partial)),
            None => {
                window *= 2;
                continue;
            }
        };
        match whole.iter().rposition(|&b| b == b'\n') {
            Some(i) => return Ok((Some(whole[i + 1..].to_vec()), partial)),
            None if start == 0 => return Ok((Some(whole.to_vec()), partial)),
            None => window *= 2,
        }
    }
}

/// The first line of a file, if it is whole.
pub(crate) fn first_line(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut reader = io::BufReader::new(File::open(path)?);
    let mut line = Vec::new();
    io::BufRead::read_until(&mut reader, b'\n', &mut line)?;
    Ok(line.pop().filter(|&b| b == b'\n').map(|_| line))
}

fn head_of(line: &[u8], path: &Path) -> io::Result<Head> {
    let l = links(line).map_err(|why| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the last record of {} is unreadable ({why}): verify the log with `moat-audit verify` and move the file aside",
                path.display()
            ),
        )
    })?;
    Ok(Head {
        next_seq: l.seq + 1,
        hash: l.claimed,
    })
}

impl Sink for FileSink {
    fn resume(&mut self) -> io::Result<Option<Head>> {
        if fs::metadata(&self.path).is_ok_and(|m| m.len() > 0) {
            let first = first_line(&self.path)?;
            let first_seq = first.as_deref().and_then(|l| links(l).ok()).map(|l| l.seq);
            let (last, partial) = tail(&self.path)?;
            if partial {
                // A crash mid-write: the partial line stays where the verifier can name it,
                // as the last line of a rotated file; the chain goes on in a new file.
                let tag = match first_seq {
                    Some(seq) => format!("{seq:012}"),
                    None => format!("{:012}", self.rotated()?.len() as u64 + u64::from(u32::MAX)),
                };
                tracing::warn!(target: "moat::audit", file = %self.path.display(), "the audit log ends with a partial record (a crash mid-write): moved aside");
                self.rotate(&tag)?;
                if let Some(line) = last {
                    return head_of(&line, &self.path).map(Some);
                }
            } else if let Some(line) = last {
                self.first_seq = first_seq;
                return head_of(&line, &self.path).map(Some);
            }
        }
        // No current file (or nothing whole in it): the newest rotated one, if any.
        for path in self.rotated()?.iter().rev() {
            if let (Some(line), _) = tail(path)? {
                return head_of(&line, path).map(Some);
            }
        }
        Ok(None)
    }

    fn write(&mut self, record: &Record) -> io::Result<()> {
        // A retry after a failed write or sync hands the same record again: it is held already.
        if self.accepted.is_some_and(|seq| record.seq <= seq) {
            return match self.fsync {
                Fsync::Always => self.flush(true),
                _ => Ok(()),
            };
        }
        if self.due() {
            self.write_pending()?;
            let tag = format!("{:012}", self.first_seq.unwrap_or_default());
            self.rotate(&tag)?;
        }
        if self.pending_first.is_none() {
            self.pending_first = Some(record.seq);
        }
        self.pending.extend_from_slice(&record.line);
        self.pending.push(b'\n');
        self.accepted = Some(record.seq);
        if self.fsync == Fsync::Always {
            self.flush(true)?;
        }
        Ok(())
    }

    fn flush(&mut self, durable: bool) -> io::Result<()> {
        self.write_pending()?;
        let due = match self.fsync {
            Fsync::Always => true,
            Fsync::Batch => self.last_sync.elapsed() >= self.sync_interval,
            Fsync::Never => false,
        };
        if self.unsynced && (durable || due) {
            if let Some(file) = &self.file {
                file.sync_data()?;
            }
            self.unsynced = false;
            self.last_sync = Instant::now();
        }
        Ok(())
    }
}

/// Each record as a `tracing` event (target `moat::audit`, field `record`), at info.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingSink;

impl Sink for TracingSink {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        tracing::info!(target: "moat::audit", seq = record.seq, record = record.as_str());
        Ok(())
    }

    fn checkpoint(&mut self, note: &str) -> io::Result<()> {
        tracing::info!(target: "moat::audit", checkpoint = note);
        Ok(())
    }

    fn flush(&mut self, _durable: bool) -> io::Result<()> {
        Ok(())
    }
}

/// Records POSTed in batches to a URL as JSON Lines (`application/x-ndjson`), from a thread of
/// its own, with retries and backoff while the receiver is down.
///
/// Its queue is bounded. When it is full, [`OnFull`] decides: wait (the writer, and so the
/// request path through the log's own queue, waits for the webhook), or drop records for the
/// webhook only and send a `{"type":"gap","count":N}` line before the next batch (the file and
/// the other sinks still get them). Fail-closed waits too: the log's queue fills and refuses
/// requests.
#[derive(Debug)]
pub struct WebhookSink {
    tx: Option<SyncSender<Vec<u8>>>,
    dropped: Arc<AtomicU64>,
    on_full: OnFull,
    thread: Option<JoinHandle<()>>,
    drain: Duration,
}

/// How the webhook thread retries a failed batch.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

impl WebhookSink {
    /// POSTs to `url` (plain HTTP) in batches of up to `batch` records, with up to `queue`
    /// records waiting.
    pub fn new(url: http::Uri, batch: usize, queue: usize, on_full: OnFull) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(queue.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new()
            .name("moat-audit-webhook".into())
            .spawn({
                let dropped = dropped.clone();
                move || post_batches(url, batch.max(1), rx, dropped)
            })?;
        Ok(Self {
            tx: Some(tx),
            dropped,
            on_full,
            thread: Some(thread),
            drain: Duration::from_secs(10),
        })
    }

    /// Queues one line, as [`OnFull`] says when the queue is full.
    fn send(&mut self, line: Vec<u8>) -> io::Result<()> {
        let Some(tx) = &self.tx else {
            return Err(io::Error::other("the webhook sink is closed"));
        };
        match tx.try_send(line) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(line)) => match self.on_full {
                OnFull::DropWithGap => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("moat_audit_dropped_total", "sink" => "webhook").increment(1);
                    Ok(())
                }
                OnFull::Backpressure | OnFull::FailClosed => tx
                    .send(line)
                    .map_err(|_| io::Error::other("the webhook thread stopped")),
            },
            Err(TrySendError::Disconnected(_)) => {
                Err(io::Error::other("the webhook thread stopped"))
            }
        }
    }

    /// How long shutdown waits for the receiver to take what is queued (default 10 s).
    #[must_use]
    pub fn with_drain_timeout(mut self, drain: Duration) -> Self {
        self.drain = drain;
        self
    }
}

impl Sink for WebhookSink {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        self.send(record.line.clone())
    }

    fn checkpoint(&mut self, note: &str) -> io::Result<()> {
        // A line of its own beside the records: `{"type":"checkpoint","note":"..."}`.
        let line = serde_json::json!({"type": "checkpoint", "note": note}).to_string();
        self.send(line.into_bytes())
    }

    fn flush(&mut self, _durable: bool) -> io::Result<()> {
        Ok(())
    }

    fn close(&mut self) -> io::Result<()> {
        self.tx = None;
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + self.drain;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                tracing::error!(target: "moat::audit", "the webhook did not take every queued record before shutdown; the file sink has them");
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "webhook drain timed out",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = thread.join();
        Ok(())
    }
}

fn post_batches(url: http::Uri, batch: usize, rx: Receiver<Vec<u8>>, dropped: Arc<AtomicU64>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            tracing::error!(target: "moat::audit", %error, "the webhook sink could not start");
            return;
        }
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    while let Ok(first) = rx.recv() {
        let mut body = Vec::with_capacity(first.len() * batch.min(64));
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let gap = serde_json::json!({"type": "gap", "count": lost, "sink": "webhook"});
            body.extend_from_slice(gap.to_string().as_bytes());
            body.push(b'\n');
        }
        body.extend_from_slice(&first);
        body.push(b'\n');
        for line in rx.try_iter().take(batch - 1) {
            body.extend_from_slice(&line);
            body.push(b'\n');
        }
        let body = bytes::Bytes::from(body);
        let mut wait = RETRY_FIRST;
        loop {
            let request = http::Request::post(url.clone())
                .header(http::header::CONTENT_TYPE, "application/x-ndjson")
                .body(http_body_util::Full::new(body.clone()))
                .expect("a valid request");
            let sent = runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), client.request(request)).await
            });
            match sent {
                Ok(Ok(response)) if response.status().is_success() => break,
                Ok(Ok(response)) => {
                    tracing::warn!(target: "moat::audit", status = %response.status(), "the audit webhook refused a batch; retrying");
                }
                Ok(Err(error)) => {
                    tracing::warn!(target: "moat::audit", %error, "the audit webhook is unreachable; retrying");
                }
                Err(_) => {
                    tracing::warn!(target: "moat::audit", "the audit webhook timed out; retrying");
                }
            }
            metrics::counter!("moat_audit_sink_errors_total", "sink" => "webhook").increment(1);
            std::thread::sleep(wait);
            wait = (wait * 2).min(RETRY_MAX);
        }
    }
}
