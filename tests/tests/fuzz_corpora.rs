//! The fuzz targets' corpora (`fuzz/corpus/<target>/`), replayed through the same functions the
//! targets call: whatever the fuzzer found interesting once stays tested on every run.

use std::path::PathBuf;

use moat_tests::fuzz;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target} fails on {}", path.display());
        inputs += 1;
    }
    assert!(
        inputs >= 10,
        "{target}: only {inputs} inputs in {}",
        dir.display()
    );
}

#[test]
fn request_walker_corpus() {
    replay("request_walker", fuzz::request_walker);
}

#[test]
fn sse_decoder_corpus() {
    replay("sse_decoder", fuzz::sse_decoder);
}

#[test]
fn restorer_corpus() {
    replay("restorer", fuzz::restorer);
}

#[test]
fn moderation_scan_corpus() {
    replay("moderation_scan", fuzz::moderation_scan);
}
