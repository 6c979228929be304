//! Criterion benchmarks for moat; see the `benches/` directory.
