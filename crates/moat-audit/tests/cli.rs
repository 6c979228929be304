//! The `moat-audit` binary: `keygen`, and `verify` with its exit codes.

use std::process::Command;

use moat_audit::{AuditLog, FileSink};

fn moat_audit(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moat-audit"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap(), text)
}

#[tokio::test]
async fn keygen_then_verify_passes_a_log_and_fails_a_tampered_one() {
    let (code, keys) = moat_audit(&["keygen", "moat-audit/cli"]);
    assert_eq!(code, 0, "{keys}");
    let private = keys
        .lines()
        .find_map(|l| l.strip_prefix("signing key:"))
        .unwrap()
        .trim()
        .to_owned();
    let verifier = keys
        .lines()
        .find_map(|l| l.strip_prefix("verifier key:"))
        .unwrap()
        .trim()
        .to_owned();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("moat-audit.jsonl");
    let checkpoint = dir.path().join("moat-audit.checkpoint");
    let log = AuditLog::builder("moat-audit/cli")
        .sink(FileSink::new(&file))
        .checkpoints(
            private.parse().unwrap(),
            &checkpoint,
            std::time::Duration::from_secs(60),
        )
        .start()
        .unwrap();
    log.shutdown().await.unwrap();
    let file_arg = file.to_str().unwrap();
    let checkpoint_arg = checkpoint.to_str().unwrap();

    let verify = || {
        moat_audit(&[
            "verify",
            file_arg,
            "--checkpoint",
            checkpoint_arg,
            "--key",
            &verifier,
        ])
    };
    let (code, out) = verify();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 1 records"), "{out}");

    // The log cut to nothing: the signed checkpoint still says one record.
    std::fs::write(&file, "").unwrap();
    let (code, out) = verify();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("truncated"), "{out}");

    // A checkpoint without a key to check it is a usage error.
    let (code, _) = moat_audit(&["verify", file_arg, "--checkpoint", checkpoint_arg]);
    assert_eq!(code, 2);
    let (code, _) = moat_audit(&["verify", "/nonexistent/moat-audit.jsonl"]);
    assert_eq!(code, 2);
}
