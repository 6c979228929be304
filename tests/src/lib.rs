//! Cross-layer and end-to-end tests for moat; see the `tests/` directory.

pub mod fuzz;
