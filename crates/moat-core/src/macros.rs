//! Macros that give each layer crate its own opaque response types, as tower-http gives each of
//! its modules one, without each crate repeating the same `Body` and `Future` impls.

/// Defines `pub struct ResponseBody<B>`: a layer's response body, opaque. Inside, the inner
/// service's body under the [response view](crate::response) (or passed through by it), or a
/// rejection of the layer's own.
///
/// The crate gets `ResponseBody::new(view)` (crate-visible) and `Body`, `Debug`.
#[macro_export]
#[doc(hidden)]
macro_rules! layer_response_body {
    ($(#[$doc:meta])*) => {
        $crate::__private::pin_project! {
            $(#[$doc])*
            pub struct ResponseBody<B> {
                #[pin]
                inner: $crate::response::ViewBody<$crate::body::ResponseBody<B>>,
            }
        }

        impl<B> ResponseBody<B> {
            #[allow(dead_code)]
            pub(crate) fn new(inner: $crate::response::ViewBody<$crate::body::ResponseBody<B>>) -> Self {
                Self { inner }
            }

            /// The layer's own response (a rejection), or a body passed through untouched.
            #[allow(dead_code)]
            pub(crate) fn plain(body: $crate::body::ResponseBody<B>) -> Self {
                Self::new($crate::response::ViewBody::plain(body))
            }

            /// The inner service's body, passed through untouched.
            #[allow(dead_code)]
            pub(crate) fn passed(body: B) -> Self {
                Self::plain($crate::body::ResponseBody::inner(body))
            }
        }

        impl<B> ::std::fmt::Debug for ResponseBody<B> {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_struct("ResponseBody").field("inner", &self.inner).finish()
            }
        }

        impl<B> $crate::__private::Body for ResponseBody<B>
        where
            B: $crate::__private::Body<Data = $crate::__private::Bytes>,
        {
            type Data = $crate::__private::Bytes;
            type Error = B::Error;

            fn poll_frame(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<
                ::std::option::Option<
                    ::std::result::Result<$crate::__private::Frame<$crate::__private::Bytes>, B::Error>,
                >,
            > {
                self.project().inner.poll_frame(cx)
            }

            fn is_end_stream(&self) -> bool {
                $crate::__private::Body::is_end_stream(&self.inner)
            }

            fn size_hint(&self) -> $crate::__private::SizeHint {
                $crate::__private::Body::size_hint(&self.inner)
            }
        }
    };
}

/// Defines `pub struct ResponseFuture<B, E>`: a layer's response future, opaque, for layers
/// that await before they decide (read a body, ask a shared store). It resolves to
/// `Result<http::Response<ResponseBody<B>>, E>` (the crate's own [`ResponseBody`], defined with
/// `layer_response_body!`).
///
/// The crate gets `ResponseFuture::new(future)` (crate-visible) and `Future`, `Debug`.
#[macro_export]
#[doc(hidden)]
macro_rules! layer_response_future {
    ($(#[$doc:meta])*) => {
        $(#[$doc])*
        pub struct ResponseFuture<B, E> {
            inner: ::std::pin::Pin<
                ::std::boxed::Box<
                    dyn ::std::future::Future<
                            Output = ::std::result::Result<$crate::__private::Response<ResponseBody<B>>, E>,
                        > + Send,
                >,
            >,
        }

        impl<B, E> ResponseFuture<B, E> {
            pub(crate) fn new(
                future: impl ::std::future::Future<
                        Output = ::std::result::Result<$crate::__private::Response<ResponseBody<B>>, E>,
                    > + Send
                    + 'static,
            ) -> Self {
                Self {
                    inner: ::std::boxed::Box::pin(future),
                }
            }
        }

        impl<B, E> ::std::future::Future for ResponseFuture<B, E> {
            type Output = ::std::result::Result<$crate::__private::Response<ResponseBody<B>>, E>;

            fn poll(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<Self::Output> {
                self.inner.as_mut().poll(cx)
            }
        }

        impl<B, E> ::std::fmt::Debug for ResponseFuture<B, E> {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str("ResponseFuture { .. }")
            }
        }
    };
}
