//! A boxed response future, for layers that must await before they decide (read a body, ask a
//! shared store).
//!
//! ```
//! use moat_core::future::BoxResponseFuture;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let future: BoxResponseFuture<Result<u8, ()>> = BoxResponseFuture::new(async { Ok(7) });
//! assert_eq!(future.await, Ok(7));
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A `Send` future boxed behind a named type.
pub struct BoxResponseFuture<T> {
    inner: Pin<Box<dyn Future<Output = T> + Send>>,
}

impl<T> BoxResponseFuture<T> {
    /// Boxes `future`.
    pub fn new(future: impl Future<Output = T> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(future),
        }
    }
}

impl<T> Future for BoxResponseFuture<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        self.inner.as_mut().poll(cx)
    }
}

impl<T> fmt::Debug for BoxResponseFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxResponseFuture { .. }")
    }
}
