//! The gateway's HTTP server: HTTP/1.1 and HTTP/2 (prior knowledge) from clients, a deadline on
//! every wait, a cap on connections, OpenAI-shaped errors even for requests that are not HTTP,
//! and a shutdown that lets requests finish but not forever.
//!
//! - The first bytes of a connection (which say HTTP/1 or HTTP/2) and then each request head must
//!   arrive within `header_read_timeout_secs`; an idle keep-alive connection is closed after the
//!   same time.
//! - A request body must keep arriving (`body_idle_timeout_secs` between frames) and end within
//!   `body_read_timeout_secs`, or the request gets 408.
//! - At `max_connections`, a new connection first closes the oldest connection that has no
//!   request in progress (one still sending its head, or idle between requests), so a flood of
//!   half-open connections cannot lock out clients that send whole requests; with every
//!   connection busy, new ones wait in the listen backlog.
//! - hyper answers a request it cannot parse itself (400, 414, 431) with an empty body; those
//!   answers are rewritten on the way out into OpenAI's JSON error shape.
//! - On shutdown the listener stops, every connection finishes the request it is serving and
//!   closes; after `shutdown_grace_secs` the rest are closed.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use bytes::{Buf, Bytes};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use moat::core::identity::PeerAddr;
use moat::core::reject::Rejection;
use pin_project_lite::pin_project;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use toml::Spanned;
use tower::ServiceExt;

use crate::config::Seconds;
use crate::deadline::DeadlineBody;

/// `[server]`: deadlines and caps for clients.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Seconds for a connection's first bytes and each request head (default 10); also how
    /// long an idle keep-alive connection stays open.
    pub header_read_timeout_secs: Option<Spanned<Seconds>>,
    /// Seconds for a whole request body (default 60).
    pub body_read_timeout_secs: Option<Spanned<Seconds>>,
    /// Seconds a request body may send nothing (default 15).
    pub body_idle_timeout_secs: Option<Spanned<Seconds>>,
    /// Seconds in-flight requests get to finish after a shutdown signal (default 30).
    pub shutdown_grace_secs: Option<Spanned<Seconds>>,
    /// Connections open at once (default 4096).
    pub max_connections: Option<Spanned<usize>>,
    /// The largest request head in bytes, request line and headers (default 65536; 431 past it).
    pub max_header_bytes: Option<Spanned<usize>>,
}

/// [`ServerConfig`] with defaults filled in and values checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerLimits {
    /// See [`ServerConfig::header_read_timeout_secs`].
    pub header_read_timeout: Duration,
    /// See [`ServerConfig::body_read_timeout_secs`].
    pub body_read_timeout: Duration,
    /// See [`ServerConfig::body_idle_timeout_secs`].
    pub body_idle_timeout: Duration,
    /// See [`ServerConfig::shutdown_grace_secs`].
    pub shutdown_grace: Duration,
    /// See [`ServerConfig::max_connections`].
    pub max_connections: usize,
    /// See [`ServerConfig::max_header_bytes`].
    pub max_header_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            body_idle_timeout: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(30),
            max_connections: 4096,
            max_header_bytes: 64 * 1024,
        }
    }
}

/// hyper's smallest read buffer; a head limit below it cannot be enforced.
const MIN_HEADER_BYTES: usize = 8192;

impl ServerConfig {
    /// The limits, or the first bad value with its span.
    pub fn limits(&self) -> Result<ServerLimits, (std::ops::Range<usize>, String)> {
        let defaults = ServerLimits::default();
        let secs = |value: &Option<Spanned<Seconds>>, key: &str, default: Duration| {
            value.as_ref().map_or(Ok(default), |v| {
                v.get_ref()
                    .duration()
                    .ok_or_else(|| (v.span(), format!("server.{key}: {}", Seconds::RULE)))
            })
        };
        let count = |value: &Option<Spanned<usize>>, key: &str, min: usize, default: usize| {
            value.as_ref().map_or(Ok(default), |v| {
                if *v.get_ref() >= min {
                    Ok(*v.get_ref())
                } else {
                    Err((v.span(), format!("server.{key}: must be at least {min}")))
                }
            })
        };
        Ok(ServerLimits {
            header_read_timeout: secs(
                &self.header_read_timeout_secs,
                "header_read_timeout_secs",
                defaults.header_read_timeout,
            )?,
            body_read_timeout: secs(
                &self.body_read_timeout_secs,
                "body_read_timeout_secs",
                defaults.body_read_timeout,
            )?,
            body_idle_timeout: secs(
                &self.body_idle_timeout_secs,
                "body_idle_timeout_secs",
                defaults.body_idle_timeout,
            )?,
            shutdown_grace: secs(
                &self.shutdown_grace_secs,
                "shutdown_grace_secs",
                defaults.shutdown_grace,
            )?,
            max_connections: count(
                &self.max_connections,
                "max_connections",
                1,
                defaults.max_connections,
            )?,
            max_header_bytes: count(
                &self.max_header_bytes,
                "max_header_bytes",
                MIN_HEADER_BYTES,
                defaults.max_header_bytes,
            )?,
        })
    }
}

/// One client connection, as the accept loop and the connection's requests see it.
#[derive(Debug, Default)]
struct Conn {
    /// Requests handed to the app.
    dispatched: AtomicU64,
    /// Requests whose response has not ended yet.
    in_flight: AtomicUsize,
    /// Told to close because the server is full and this connection is idle.
    shed: Notify,
}

impl Conn {
    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }
}

/// A request in progress on a connection, until its response body ends or is dropped.
#[derive(Debug)]
struct InFlight(Arc<Conn>);

impl InFlight {
    fn start(conn: &Arc<Conn>) -> Self {
        conn.dispatched.fetch_add(1, Ordering::AcqRel);
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every open connection, and the slots that cap them.
#[derive(Debug)]
struct Connections {
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl Connections {
    fn new(max: usize) -> Self {
        Self {
            open: Mutex::default(),
            slots: Arc::new(Semaphore::new(max)),
            next_id: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection: at once if one is free, else after the oldest idle
    /// connection was told to close (or, with none idle, when any connection ends).
    async fn admit(&self) -> OwnedSemaphorePermit {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return permit;
        }
        let oldest_idle = self
            .lock()
            .iter()
            .find(|(_, conn)| conn.is_idle())
            .map(|(id, conn)| (*id, conn.clone()));
        match oldest_idle {
            Some((id, conn)) => {
                tracing::debug!(target: "moat::gateway", connection = id, "at the connection cap: closing the oldest idle connection");
                metrics::counter!("moat_gateway_connections_shed_total").increment(1);
                conn.shed.notify_one();
            }
            None => {
                tracing::warn!(target: "moat::gateway", "at the connection cap with every connection busy: new connections wait");
            }
        }
        // The semaphore is never closed.
        self.slots
            .clone()
            .acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable!("the connection semaphore is never closed"))
    }

    fn register(self: &Arc<Self>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::default());
        self.lock().insert(id, conn.clone());
        metrics::gauge!("moat_gateway_connections").increment(1.0);
        Registered {
            connections: self.clone(),
            id,
            conn,
        }
    }
}

/// A connection's entry in [`Connections`], removed when the connection's task ends.
struct Registered {
    connections: Arc<Connections>,
    id: u64,
    conn: Arc<Conn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
        metrics::gauge!("moat_gateway_connections").decrement(1.0);
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets in-flight requests finish
/// for up to the grace period.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let connections = Arc::new(Connections::new(limits.max_connections));
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, most likely: back off instead of spinning.
                tracing::error!(target: "moat::gateway", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = connections.admit() => permit,
        };
        let registered = connections.register();
        let app = app.clone();
        let stopped = stopped.clone();
        tasks.spawn(async move {
            connection(stream, peer, app, limits, &registered.conn, stopped).await;
            drop(registered);
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let open = tasks.len();
    if open > 0 {
        tracing::info!(target: "moat::gateway", connections = open, grace = ?limits.shutdown_grace, "waiting for in-flight requests");
    }
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(target: "moat::gateway", connections = tasks.len(), "grace period over: closing the connections still open");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The HTTP/2 connection preface, which a prior-knowledge client sends first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the bytes are (or cannot be) the HTTP/2 preface: the bytes read, and whether
/// they are.
async fn sniff(stream: &mut TcpStream) -> io::Result<(Bytes, bool)> {
    let mut buf = [0u8; PREFACE.len()];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        len += n;
        if n == 0 || buf[..len] != PREFACE[..len] {
            return Ok((Bytes::copy_from_slice(&buf[..len]), false));
        }
        if len == PREFACE.len() {
            return Ok((Bytes::copy_from_slice(&buf), true));
        }
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: ServerLimits,
    conn: &Arc<Conn>,
    mut stopped: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let sniffed = tokio::select! {
        sniffed = tokio::time::timeout(limits.header_read_timeout, sniff(&mut stream)) => sniffed,
        () = conn.shed.notified() => return,
        _ = stopped.wait_for(|stop| *stop) => return,
    };
    // A client that sends nothing in time, or fails, is closed without a word.
    let Ok(Ok((prefix, http2))) = sniffed else {
        return;
    };
    let io = TokioIo::new(ErrorPages::new(
        Prefixed {
            prefix,
            inner: stream,
        },
        conn.clone(),
        limits.max_header_bytes,
    ));
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let in_flight = InFlight::start(&conn);
            let app = app.clone();
            async move {
                let (mut parts, body) = request.into_parts();
                parts.extensions.insert(ConnectInfo(peer));
                parts.extensions.insert(PeerAddr(peer));
                let body = DeadlineBody::new(
                    body,
                    limits.body_idle_timeout,
                    Some(limits.body_read_timeout),
                    "the request body",
                );
                let request = http::Request::from_parts(parts, axum::body::Body::new(body));
                let response = match app.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(response.map(|body| Tracked {
                    inner: body,
                    in_flight: Some(in_flight),
                }))
            }
        })
    };
    if http2 {
        let max_header = u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX);
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(limits.header_read_timeout))
            .keep_alive_timeout(limits.header_read_timeout)
            .max_header_list_size(max_header)
            .max_concurrent_streams(256)
            .serve_connection(io, service);
        drive(connection, conn, stopped, |c| c.graceful_shutdown()).await;
    } else {
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes)
            .keep_alive(true)
            .serve_connection(io, service);
        drive(connection, conn, stopped, |c| c.graceful_shutdown()).await;
    }
}

/// Runs a connection until it ends, is shed while idle, or the server stops (then gracefully;
/// the serve loop cuts it off after the grace period).
async fn drive<C, E>(
    connection: C,
    conn: &Conn,
    mut stopped: watch::Receiver<bool>,
    graceful: impl FnOnce(Pin<&mut C>),
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(connection);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(target: "moat::gateway", %error, "connection ended with an error");
                }
                return;
            }
            () = conn.shed.notified() => {
                // Shed only if still idle: a request may have started since it was chosen.
                if conn.is_idle() {
                    return;
                }
            }
            _ = stopped.wait_for(|stop| *stop) => break,
        }
    }
    graceful(connection.as_mut());
    let _ = connection.await;
}

pin_project! {
    /// A response body that marks its request finished when it ends or is dropped.
    struct Tracked<B> {
        #[pin]
        inner: B,
        in_flight: Option<InFlight>,
    }
}

impl<B: Body<Data = Bytes>> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        if polled.is_none() {
            this.in_flight.take();
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// An IO that first yields bytes already read from it.
    struct Prefixed<T> {
        prefix: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T: AsyncRead> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.is_empty() {
            return this.inner.poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

pin_project! {
    /// Rewrites the responses hyper writes on its own (to a request it could not parse) into
    /// OpenAI-shaped JSON errors.
    ///
    /// hyper writes such a response only when no request is being served on the connection and
    /// every request handed to the app has had its response head written; so a write that starts
    /// a response head (`HTTP/1.x NNN`) with a status of 400 or more at such a moment is hyper's.
    /// The page replaces it, and the connection closes as hyper meant.
    struct ErrorPages<T> {
        #[pin]
        inner: T,
        conn: Arc<Conn>,
        answered: u64,
        page: Option<Bytes>,
        replaced: bool,
        max_header_bytes: usize,
    }
}

impl<T> ErrorPages<T> {
    fn new(inner: T, conn: Arc<Conn>, max_header_bytes: usize) -> Self {
        Self {
            inner,
            conn,
            answered: 0,
            page: None,
            replaced: false,
            max_header_bytes,
        }
    }
}

/// The status of a response head at the start of `bytes`, if they start one.
fn head_status(bytes: &[u8]) -> Option<u16> {
    if bytes.len() < 12 || !bytes.starts_with(b"HTTP/1.") || bytes[8] != b' ' {
        return None;
    }
    std::str::from_utf8(&bytes[9..12]).ok()?.parse().ok()
}

fn error_page(status: u16, max_header_bytes: usize) -> Bytes {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let (message, code) = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            format!("The request head (request line and headers) is larger than the limit of {max_header_bytes} bytes."),
            "request_headers_too_large",
        ),
        StatusCode::URI_TOO_LONG => ("The request URI is too long.".to_owned(), "uri_too_long"),
        _ => (
            "The request is not valid HTTP: its request line or headers could not be parsed.".to_owned(),
            "malformed_request",
        ),
    };
    let body = Rejection::new(status, "invalid_request_error", message)
        .with_code(code)
        .json_body();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let mut page = Vec::with_capacity(head.len() + body.len());
    page.extend_from_slice(head.as_bytes());
    page.extend_from_slice(&body);
    Bytes::from(page)
}

impl<T: AsyncWrite> ErrorPages<T> {
    /// Writes out the page, if one is pending.
    fn poll_page(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        while let Some(page) = this.page.as_mut().filter(|p| !p.is_empty()) {
            let n = ready!(this.inner.as_mut().poll_write(cx, page))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            page.advance(n);
        }
        *this.page = None;
        Poll::Ready(Ok(()))
    }

    /// Whether `first` (the start of a write) is hyper's own error response; counts the heads of
    /// the app's responses as it goes.
    fn is_hypers_own(self: Pin<&mut Self>, first: &[u8]) -> bool {
        let this = self.project();
        let Some(status) = head_status(first) else {
            return false;
        };
        if status < 200 {
            return false;
        }
        if this.conn.dispatched.load(Ordering::Acquire) > *this.answered {
            *this.answered += 1;
            return false;
        }
        if status >= 400 && this.conn.is_idle() {
            *this.page = Some(error_page(status, *this.max_header_bytes));
            *this.replaced = true;
            return true;
        }
        false
    }
}

impl<T: AsyncRead> AsyncRead for ErrorPages<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for ErrorPages<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.as_mut().poll_page(cx))?;
        if self.replaced || self.as_mut().is_hypers_own(buf) {
            ready!(self.as_mut().poll_page(cx))?;
            return Poll::Ready(Ok(buf.len()));
        }
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.as_mut().poll_page(cx))?;
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if self.replaced || self.as_mut().is_hypers_own(first) {
            ready!(self.as_mut().poll_page(cx))?;
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_page(cx))?;
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_page(cx))?;
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_status_reads_only_response_heads() {
        assert_eq!(
            head_status(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            Some(431)
        );
        assert_eq!(head_status(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(head_status(b"1a\r\nHTTP/1.1 400 x"), None);
        assert_eq!(head_status(b"HTTP/1.1 4"), None);
    }

    #[test]
    fn error_pages_are_openai_json_with_a_length() {
        let page = error_page(431, 65536);
        let text = std::str::from_utf8(&page).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "request_headers_too_large");
        assert!(json["error"]["message"].as_str().unwrap().contains("65536"));
    }

    #[test]
    fn server_limits_default_and_refuse_zero() {
        let config: ServerConfig = toml::from_str("").unwrap();
        assert_eq!(config.limits().unwrap(), ServerLimits::default());
        let config: ServerConfig =
            toml::from_str("header_read_timeout_secs = 0.5\nmax_connections = 8").unwrap();
        let limits = config.limits().unwrap();
        assert_eq!(limits.header_read_timeout, Duration::from_millis(500));
        assert_eq!(limits.max_connections, 8);
        for bad in [
            "body_read_timeout_secs = 0",
            "max_connections = 0",
            "max_header_bytes = 100",
            "shutdown_grace_secs = -1",
        ] {
            let config: ServerConfig = toml::from_str(bad).unwrap();
            let (_, message) = config.limits().unwrap_err();
            assert!(message.starts_with("server."), "{bad}: {message}");
        }
    }
}
