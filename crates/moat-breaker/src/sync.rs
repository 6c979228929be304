//! The atomics the breaker's state lives in: loom's when the state machine is model-checked
//! (`RUSTFLAGS="--cfg moat_loom" cargo test -p moat-breaker --test loom`), the standard ones
//! otherwise.

#[cfg(moat_loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64};
#[cfg(not(moat_loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64};
