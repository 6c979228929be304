//! The verifier against every way a log can be tampered with, on logs the real writer made.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use moat_audit::verify::{expand, read_checkpoints};
use moat_audit::{verify, AuditLayer, AuditLog, FileSink, Notice, Problem, Signer, VerifierKey};
use moat_core::hex::Hex;
use tower::{service_fn, Layer, ServiceExt};

struct Log {
    _dir: tempfile::TempDir,
    path: PathBuf,
    checkpoint: PathBuf,
    key: VerifierKey,
    private: String,
}

impl Log {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (signer, private) = Signer::generate("moat-audit/test").unwrap();
        Self {
            path: dir.path().join("moat-audit.jsonl"),
            checkpoint: dir.path().join("moat-audit.checkpoint"),
            key: signer.verifier_key().parse().unwrap(),
            private,
            _dir: dir,
        }
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap()
    }

    /// Starts a writer on the log, sends `n` requests through the layer, shuts down.
    async fn write(&self, n: usize, sink: FileSink) {
        let log = AuditLog::builder("moat-audit/test")
            .sink(sink)
            .checkpoints(
                self.private.parse().unwrap(),
                &self.checkpoint,
                Duration::from_secs(3600),
            )
            .start()
            .unwrap();
        let service = AuditLayer::new(log.clone()).layer(service_fn(|_req: Request<_>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
        }));
        for i in 0..n {
            let request = Request::post(format!("/v1/chat/completions?n={i}"))
                .header("x-request-id", format!("req-{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = service.clone().oneshot(request).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
        log.shutdown().await.unwrap();
    }

    fn verify(&self) -> moat_audit::Verification {
        let files = expand(&[self.dir().to_path_buf()]).unwrap();
        let notes = read_checkpoints(std::slice::from_ref(&self.checkpoint)).unwrap();
        verify(&files, &notes, std::slice::from_ref(&self.key)).unwrap()
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn set_lines(&self, lines: &[String]) {
        std::fs::write(&self.path, lines.join("\n") + "\n").unwrap();
    }
}

async fn log_of(n: usize) -> Log {
    let log = Log::new();
    log.write(n, FileSink::new(&log.path)).await;
    log
}

#[tokio::test]
async fn an_untouched_log_verifies_with_its_checkpoint() {
    let log = log_of(5).await;
    let report = log.verify();
    assert!(report.is_ok(), "{:?}", report.problems);
    // The start record and five requests, all covered by the last checkpoint.
    assert_eq!(report.records, 6);
    assert_eq!(report.checkpoint.as_ref().unwrap().size, 6);
    assert!(report.notices.is_empty(), "{:?}", report.notices);
}

#[tokio::test]
async fn an_edited_record_is_named() {
    let log = log_of(5).await;
    let mut lines = log.lines();
    lines[3] = lines[3].replace(
        "\"http.response.status_code\":200",
        "\"http.response.status_code\":403",
    );
    log.set_lines(&lines);
    let report = log.verify();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(matches!(&report.problems[0], Problem::Modified { seq: 3, at } if at.line == 4));
}

#[tokio::test]
async fn a_deleted_record_is_named() {
    let log = log_of(5).await;
    let mut lines = log.lines();
    lines.remove(2);
    log.set_lines(&lines);
    let report = log.verify();
    assert_eq!(report.problems, [Problem::Deleted { from: 2, to: 2 }]);
}

#[tokio::test]
async fn an_inserted_record_is_named() {
    let log = log_of(5).await;
    let mut lines = log.lines();
    let copy = lines[1].clone();
    lines.insert(4, copy);
    log.set_lines(&lines);
    let report = log.verify();
    assert!(
        report
            .problems
            .iter()
            .any(|p| matches!(p, Problem::Inserted { seq: 1, at } if at.line == 5)),
        "{:?}",
        report.problems
    );
    // And a line of text that is not a record.
    let mut lines = log.lines();
    lines.insert(2, "{\"type\":\"request\",\"note\":\"forged\"}".into());
    log.set_lines(&lines);
    assert!(log
        .verify()
        .problems
        .iter()
        .any(|p| matches!(p, Problem::NotARecord { at, .. } if at.line == 3)));
}

#[tokio::test]
async fn swapped_records_are_named() {
    let log = log_of(5).await;
    let mut lines = log.lines();
    lines.swap(2, 3);
    log.set_lines(&lines);
    let report = log.verify();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(matches!(
        report.problems[0],
        Problem::Reordered {
            seq: 2,
            after: 3,
            ..
        }
    ));
}

#[tokio::test]
async fn a_cut_tail_is_caught_against_the_checkpoint() {
    let log = log_of(5).await;
    let mut lines = log.lines();
    lines.truncate(4);
    log.set_lines(&lines);
    let report = log.verify();
    assert_eq!(
        report.problems,
        [Problem::Truncated {
            checkpoint: 6,
            present: 4
        }]
    );
}

#[tokio::test]
async fn a_rewritten_tail_with_fresh_hashes_does_not_match_the_checkpoint() {
    // Someone without the signing key rewrites the last record and recomputes its hash: the
    // chain is self-consistent again, the signed head is not.
    let log = log_of(3).await;
    let mut lines = log.lines();
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let mut forged = last.as_object().unwrap().clone();
    forged.remove("hash");
    forged.insert("http.response.status_code".into(), 500.into());
    // Recompute the hash as the writer does (canonical form: sorted keys, compact).
    let sorted: std::collections::BTreeMap<_, _> = forged.clone().into_iter().collect();
    let canonical = serde_json::to_vec(&sorted).unwrap();
    let hash: [u8; 32] = sha2_digest(&canonical);
    forged.insert("hash".into(), Hex(&hash).to_string().into());
    *lines.last_mut().unwrap() = serde_json::Value::Object(forged).to_string();
    log.set_lines(&lines);
    let report = log.verify();
    assert!(
        !report
            .problems
            .iter()
            .any(|p| matches!(p, Problem::Modified { .. })),
        "the forged record hashes correctly: {:?}",
        report.problems
    );
    assert_eq!(report.problems, [Problem::CheckpointMismatch { size: 4 }]);
}

fn sha2_digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

#[tokio::test]
async fn a_forged_checkpoint_is_refused() {
    let log = log_of(2).await;
    let (other, _) = Signer::generate("moat-audit/test").unwrap();
    let note = std::fs::read_to_string(&log.checkpoint).unwrap();
    let text = &note[..note.find("\n\n").unwrap() + 1];
    let forged = text.replacen("\n3\n", "\n2\n", 1);
    let forged = other.sign(&moat_audit::Checkpoint {
        origin: "moat-audit/test".into(),
        size: forged.lines().nth(1).unwrap().parse().unwrap(),
        hash: [0; 32],
    });
    std::fs::write(&log.checkpoint, forged).unwrap();
    let report = log.verify();
    assert!(matches!(
        &report.problems[..],
        [Problem::Checkpoint {
            error: moat_audit::CheckpointError::Unverified,
            ..
        }]
    ));
}

#[tokio::test]
async fn rotated_files_verify_together_and_a_missing_one_is_a_deletion() {
    let log = Log::new();
    log.write(30, FileSink::new(&log.path).with_rotate_bytes(2_000))
        .await;
    let files = expand(&[log.dir().to_path_buf()]).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    let report = log.verify();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.records, 31);

    // Remove a rotated file from the middle of the chain.
    let mut rotated: Vec<_> = files.into_iter().filter(|f| *f != log.path).collect();
    rotated.sort();
    std::fs::remove_file(&rotated[1]).unwrap();
    let report = log.verify();
    assert!(
        matches!(&report.problems[..], [Problem::Deleted { .. }]),
        "{:?}",
        report.problems
    );
}

#[tokio::test]
async fn a_partial_last_line_is_named_and_the_next_start_continues_the_chain() {
    let log = log_of(3).await;
    // A process killed mid-write leaves half a record.
    let mut text = std::fs::read_to_string(&log.path).unwrap();
    let last = log.lines().pop().unwrap();
    text.push_str(&last[..last.len() / 2]);
    std::fs::write(&log.path, text).unwrap();

    log.write(2, FileSink::new(&log.path)).await;
    let report = log.verify();
    assert!(report.is_ok(), "{:?}", report.problems);
    // 4 records before, a new start record and two requests.
    assert_eq!(report.records, 7);
    let partial: Vec<_> = report
        .notices
        .iter()
        .filter_map(|n| match n {
            Notice::PartialLine { at } => Some(at.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(partial.len(), 1, "{:?}", report.notices);
    assert_eq!(partial[0].line, 5);
    assert_ne!(
        partial[0].file, log.path,
        "moved aside, with the line at its end"
    );
}

#[tokio::test]
async fn a_log_in_a_directory_that_does_not_exist_yet_starts_there() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not/yet/moat-audit.jsonl");
    let log = AuditLog::builder("t")
        .sink(FileSink::new(&path))
        .start()
        .unwrap();
    log.shutdown().await.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
}

#[tokio::test]
async fn a_member_given_twice_is_not_a_record() {
    // A reader that takes the first copy would see 500; the hash covers the last: refused.
    let log = log_of(2).await;
    let mut lines = log.lines();
    lines[1] = lines[1].replacen('{', "{\"http.response.status_code\":500,", 1);
    log.set_lines(&lines);
    let report = log.verify();
    assert!(
        report
            .problems
            .iter()
            .any(|p| matches!(p, Problem::NotARecord { at, .. } if at.line == 2)),
        "{:?}",
        report.problems
    );
}
