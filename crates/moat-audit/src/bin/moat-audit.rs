//! `moat-audit`: verify an audit log, or make a checkpoint signing key.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use moat_audit::verify::{expand, read_checkpoints};
use moat_audit::{Signer, VerifierKey};

#[derive(Parser)]
#[command(
    name = "moat-audit",
    about = "Verify moat audit logs and manage checkpoint keys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checks every record's hash, link and sequence number, across rotated files, and the
    /// chain against signed checkpoints. Exits 1 when the log does not verify.
    Verify {
        /// Log files, or directories of `.jsonl` files, in any order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A signed checkpoint note (repeatable); checked against the log.
        #[arg(long = "checkpoint")]
        checkpoints: Vec<PathBuf>,
        /// A key that verifies checkpoints, `<name>+<hash>+<base64>` (repeatable).
        #[arg(long = "key")]
        keys: Vec<String>,
        /// Fail also when events were dropped or requests refused (gap records).
        #[arg(long)]
        strict: bool,
    },
    /// Makes an Ed25519 checkpoint key: prints the signing key (keep it secret, e.g. in
    /// MOAT_AUDIT_KEY) and the verifier key.
    Keygen {
        /// The key's name, usually the log's origin, e.g. `moat-audit/prod`.
        name: String,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Keygen { name } => match Signer::generate(&name) {
            Ok((signer, private)) => {
                println!("signing key:  {private}");
                println!("verifier key: {}", signer.verifier_key());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("moat-audit: {error}");
                ExitCode::from(2)
            }
        },
        Command::Verify {
            files,
            checkpoints,
            keys,
            strict,
        } => verify(&files, &checkpoints, &keys, strict),
    }
}

fn verify(files: &[PathBuf], checkpoints: &[PathBuf], keys: &[String], strict: bool) -> ExitCode {
    let keys: Result<Vec<VerifierKey>, _> = keys.iter().map(|k| k.parse()).collect();
    let keys = match keys {
        Ok(keys) => keys,
        Err(error) => {
            eprintln!("moat-audit: {error}");
            return ExitCode::from(2);
        }
    };
    if !checkpoints.is_empty() && keys.is_empty() {
        eprintln!("moat-audit: a checkpoint needs a --key to verify it");
        return ExitCode::from(2);
    }
    let report = expand(files)
        .and_then(|files| Ok((files, read_checkpoints(checkpoints)?)))
        .and_then(|(files, notes)| moat_audit::verify(&files, &notes, &keys));
    let report = match report {
        Ok(report) => report,
        Err(error) => {
            eprintln!("moat-audit: {error}");
            return ExitCode::from(2);
        }
    };
    for notice in &report.notices {
        println!("note: {notice}");
    }
    for problem in &report.problems {
        println!("FAIL: {problem}");
    }
    let gaps = report.notices.iter().any(|n| {
        matches!(
            n,
            moat_audit::Notice::Dropped { .. } | moat_audit::Notice::Refused { .. }
        )
    });
    let checkpoint = report
        .checkpoint
        .as_ref()
        .map(|c| format!(", signed checkpoint at {} records", c.size))
        .unwrap_or_default();
    if report.is_ok() && !(strict && gaps) {
        println!(
            "ok: {} records, {} bytes{checkpoint}",
            report.records, report.bytes
        );
        ExitCode::SUCCESS
    } else {
        println!(
            "the log does not verify: {} problems in {} records",
            report.problems.len(),
            report.records
        );
        ExitCode::FAILURE
    }
}
