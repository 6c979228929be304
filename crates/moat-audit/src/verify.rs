//! Checking a log: every record's hash, every link, every sequence number, and the chain
//! against signed checkpoints. What `moat-audit verify` runs.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::chain::{links, Links, GENESIS};
use crate::checkpoint::{Checkpoint, CheckpointError, VerifierKey};
use crate::sink::first_line;

/// Where a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The file.
    pub file: PathBuf,
    /// The line, from 1.
    pub line: usize,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Something wrong with the log: the verifier fails.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// A line that is not a record (inserted text, or a record edited past parsing).
    NotARecord {
        /// Where.
        at: Place,
        /// Why.
        why: &'static str,
    },
    /// A record whose content does not match its hash.
    Modified {
        /// Where.
        at: Place,
        /// Its sequence number.
        seq: u64,
    },
    /// Records missing from the sequence.
    Deleted {
        /// The first missing sequence number.
        from: u64,
        /// The last missing sequence number.
        to: u64,
    },
    /// A second record with a sequence number already seen.
    Inserted {
        /// Where.
        at: Place,
        /// The repeated sequence number.
        seq: u64,
    },
    /// A record that comes after one with a higher sequence number.
    Reordered {
        /// Where.
        at: Place,
        /// Its sequence number.
        seq: u64,
        /// The sequence number of the record before it.
        after: u64,
    },
    /// A record whose `prev` is not the hash of the record before it: that one was replaced
    /// (rewritten with a new hash), or this one was.
    BrokenLink {
        /// Where.
        at: Place,
        /// Its sequence number.
        seq: u64,
    },
    /// The log does not start at sequence 0: its first records (or files) are gone.
    MissingStart {
        /// The first sequence number present.
        first: u64,
    },
    /// Fewer records than a signed checkpoint covers: the tail was cut.
    Truncated {
        /// Records the checkpoint covers.
        checkpoint: u64,
        /// Records present.
        present: u64,
    },
    /// A signed checkpoint whose head hash is not the log's at that size.
    CheckpointMismatch {
        /// The checkpoint's size.
        size: u64,
    },
    /// A checkpoint that does not verify.
    Checkpoint {
        /// Its file.
        file: PathBuf,
        /// Why.
        error: CheckpointError,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotARecord { at, why } => {
                write!(f, "{at}: not a record ({why}): inserted or edited")
            }
            Self::Modified { at, seq } => write!(
                f,
                "{at}: record {seq} was modified (its hash does not match its content)"
            ),
            Self::Deleted { from, to } if from == to => write!(f, "record {from} was deleted"),
            Self::Deleted { from, to } => write!(f, "records {from} to {to} were deleted"),
            Self::Inserted { at, seq } => write!(
                f,
                "{at}: inserted record (sequence number {seq} appears twice)"
            ),
            Self::Reordered { at, seq, after } => write!(
                f,
                "{at}: records reordered (record {seq} comes after record {after})"
            ),
            Self::BrokenLink { at, seq } => write!(
                f,
                "{at}: record {seq} does not link to record {} (one of them was replaced)",
                seq.wrapping_sub(1)
            ),
            Self::MissingStart { first } => write!(
                f,
                "the log starts at record {first}: the records before it are missing"
            ),
            Self::Truncated {
                checkpoint,
                present,
            } => write!(
                f,
                "truncated: a signed checkpoint covers {checkpoint} records, the log has {present}"
            ),
            Self::CheckpointMismatch { size } => write!(
                f,
                "the signed checkpoint at size {size} does not match the log's record {}",
                size.wrapping_sub(1)
            ),
            Self::Checkpoint { file, error } => write!(f, "{}: {error}", file.display()),
        }
    }
}

/// Something worth knowing that is not an integrity failure.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// The last line of a file is partial: a process stopped mid-write; the chain went on from
    /// the last whole record.
    PartialLine {
        /// Where.
        at: Place,
    },
    /// The log counted events it had to drop (its queue was full).
    Dropped {
        /// The `gap` record's sequence number.
        seq: u64,
        /// Events dropped.
        count: u64,
    },
    /// The log counted requests it refused (fail-closed, queue full).
    Refused {
        /// The `refused` record's sequence number.
        seq: u64,
        /// Requests refused.
        count: u64,
    },
    /// Records after the last checkpoint: no signature covers them yet, so a cut there cannot
    /// be told from a log that ended.
    Uncovered {
        /// How many.
        records: u64,
    },
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PartialLine { at } => write!(f, "{at}: partial last line (a process stopped mid-write); the chain continues from the record before it"),
            Self::Dropped { seq, count } => write!(f, "record {seq}: {count} events were dropped while the queue was full"),
            Self::Refused { seq, count } => write!(f, "record {seq}: {count} requests were refused while the queue was full"),
            Self::Uncovered { records } => write!(f, "{records} records after the last checkpoint are not covered by a signature"),
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    /// Whole records read.
    pub records: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Integrity failures.
    pub problems: Vec<Problem>,
    /// The rest worth saying.
    pub notices: Vec<Notice>,
    /// The largest checkpoint that verified.
    pub checkpoint: Option<Checkpoint>,
}

impl Verification {
    /// Whether the log verified.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Entry {
    at: Place,
    links: Links,
}

/// The record files among `paths`: files as given, and the `.jsonl` files in a directory.
pub fn expand(paths: &[PathBuf]) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            for entry in std::fs::read_dir(path)? {
                let p = entry?.path();
                if p.extension().is_some_and(|e| e == "jsonl") {
                    files.push(p);
                }
            }
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Verifies the records in `files` (in any order: they are put in chain order by their first
/// record) against the signed checkpoint notes `checkpoints` (file, text), which must verify
/// with one of `keys`.
pub fn verify(
    files: &[PathBuf],
    checkpoints: &[(PathBuf, String)],
    keys: &[VerifierKey],
) -> io::Result<Verification> {
    let mut report = Verification::default();
    let mut ordered = Vec::with_capacity(files.len());
    for file in files {
        let first = first_line(file)?
            .and_then(|line| links(&line).ok())
            .map_or(u64::MAX, |l| l.seq);
        ordered.push((first, file.clone()));
    }
    ordered.sort();

    let mut entries = Vec::new();
    for (_, file) in &ordered {
        let data = std::fs::read(file)?;
        report.bytes += data.len() as u64;
        let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
        // After the last newline: empty, or a partial line.
        let partial = lines.pop().filter(|rest| !rest.is_empty());
        for (i, line) in lines.into_iter().enumerate() {
            let at = Place {
                file: file.clone(),
                line: i + 1,
            };
            match links(line) {
                Ok(links) => entries.push(Entry { at, links }),
                Err(why) => report.problems.push(Problem::NotARecord { at, why }),
            }
        }
        if partial.is_some() {
            let line = data.iter().filter(|&&b| b == b'\n').count() + 1;
            report.notices.push(Notice::PartialLine {
                at: Place {
                    file: file.clone(),
                    line,
                },
            });
        }
    }
    report.records = entries.len() as u64;
    check_chain(&entries, &mut report);
    check_checkpoints(&entries, checkpoints, keys, &mut report);
    Ok(report)
}

fn check_chain(entries: &[Entry], report: &mut Verification) {
    let mut seen = HashSet::with_capacity(entries.len());
    // The first record of each sequence number, in chain order.
    let mut by_seq: BTreeMap<u64, &Entry> = BTreeMap::new();
    let mut last_seq: Option<u64> = None;
    for e in entries {
        let seq = e.links.seq;
        if e.links.claimed != e.links.actual {
            report.problems.push(Problem::Modified {
                at: e.at.clone(),
                seq,
            });
        }
        if !seen.insert(seq) {
            report.problems.push(Problem::Inserted {
                at: e.at.clone(),
                seq,
            });
            continue;
        }
        if let Some(after) = last_seq.filter(|&last| seq < last) {
            report.problems.push(Problem::Reordered {
                at: e.at.clone(),
                seq,
                after,
            });
        }
        last_seq = Some(last_seq.map_or(seq, |last| last.max(seq)));
        by_seq.insert(seq, e);
        match e.links.kind.as_deref() {
            Some("gap") => report.notices.push(Notice::Dropped {
                seq,
                count: e.links.count.unwrap_or_default(),
            }),
            Some("refused") => report.notices.push(Notice::Refused {
                seq,
                count: e.links.count.unwrap_or_default(),
            }),
            _ => {}
        }
    }
    let Some((&first, _)) = by_seq.first_key_value() else {
        return;
    };
    if first != 0 {
        report.problems.push(Problem::MissingStart { first });
    }
    let mut previous: Option<(u64, &Entry)> = None;
    for (&seq, &e) in &by_seq {
        match previous {
            Some((p, _)) if seq > p + 1 => report.problems.push(Problem::Deleted {
                from: p + 1,
                to: seq - 1,
            }),
            Some((_, before)) if e.links.prev != before.links.claimed => {
                report.problems.push(Problem::BrokenLink {
                    at: e.at.clone(),
                    seq,
                })
            }
            None if seq == 0 && e.links.prev != GENESIS => {
                report.problems.push(Problem::BrokenLink {
                    at: e.at.clone(),
                    seq,
                })
            }
            _ => {}
        }
        previous = Some((seq, e));
    }
}

fn check_checkpoints(
    entries: &[Entry],
    checkpoints: &[(PathBuf, String)],
    keys: &[VerifierKey],
    report: &mut Verification,
) {
    let present = entries
        .iter()
        .map(|e| e.links.seq + 1)
        .max()
        .unwrap_or_default();
    let hash_of = |seq: u64| {
        entries
            .iter()
            .find(|e| e.links.seq == seq)
            .map(|e| e.links.claimed)
    };
    for (file, note) in checkpoints {
        let checkpoint = match Checkpoint::open(note, keys) {
            Ok(c) => c,
            Err(error) => {
                report.problems.push(Problem::Checkpoint {
                    file: file.clone(),
                    error,
                });
                continue;
            }
        };
        if checkpoint.size > present {
            report.problems.push(Problem::Truncated {
                checkpoint: checkpoint.size,
                present,
            });
        } else if checkpoint.size > 0 && hash_of(checkpoint.size - 1) != Some(checkpoint.hash) {
            report.problems.push(Problem::CheckpointMismatch {
                size: checkpoint.size,
            });
        }
        if report
            .checkpoint
            .as_ref()
            .is_none_or(|c| c.size < checkpoint.size)
        {
            report.checkpoint = Some(checkpoint);
        }
    }
    let covered = report.checkpoint.as_ref().map_or(0, |c| c.size);
    if present > covered {
        report.notices.push(Notice::Uncovered {
            records: present - covered,
        });
    }
}

/// Reads checkpoint notes from files.
pub fn read_checkpoints(paths: &[PathBuf]) -> io::Result<Vec<(PathBuf, String)>> {
    paths
        .iter()
        .map(|p| Ok((p.clone(), std::fs::read_to_string(p)?)))
        .collect()
}

/// The default checkpoint file of a log file: `audit/moat-audit.jsonl` → `audit/moat-audit.checkpoint`.
pub fn checkpoint_path(log: &Path) -> PathBuf {
    log.with_extension("checkpoint")
}
