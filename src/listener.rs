//! The listener: herald's own accept loop, so that every connection is
//! bounded and can be closed from the request side.
//!
//! - `TCP_NODELAY` on every accepted socket: herald's messages are small and
//!   wait for nothing (Nagle's algorithm plus the peer's delayed ACK held a
//!   small ack back 40 ms).
//! - A request head must be complete within the header timeout. That bounds a
//!   connection that sends nothing, or half a request line, and a kept-alive
//!   connection idle between two requests (hyper's header-read timer; it needs
//!   the timer configured here to take effect).
//! - An accept that fails (the process is at its file descriptor limit) is
//!   logged at most once a second and retried after a short pause: the
//!   listener never stops, and the pending connections wait in the kernel's
//!   queue until a descriptor is free. The binary raises its soft limit on
//!   open files to the hard limit at start ([`raise_open_file_limit`]).
//! - A request body must be complete within the body timeout, counted from
//!   the end of its head: a body sent a byte at a time cannot hold a
//!   connection (and its descriptor) for longer. Past it the request fails
//!   and the connection is closed.
//! - A WebSocket peer's control frames (pings) oblige replies (pongs) that
//!   tungstenite queues without bound, outside the socket's packet buffer.
//!   Bytes of those replies the peer leaves unread are counted (each ping
//!   adds its pong, each write takes away what it wrote), and past a bound
//!   the connection is reset.
//! - Each request carries its connection's [`Connection`] in its extensions.
//!   Closing it ends what the connection reads at once, and fails its writes
//!   after a grace period (a peer that reads nothing cannot hold it open).
//!   On a WebSocket, the end of what it reads is an Engine.IO `close` packet,
//!   handed to engineioxide as if the client had sent it, between two of the
//!   client's frames: engineioxide closes the session, writes what was queued
//!   and a close frame, and drops the connection. (Ending the stream instead
//!   would make tungstenite refuse every later write, the close frame too.)
//!
//! HTTP/1.1 only: browsers speak it to a plaintext origin, proxies speak it to
//! their upstreams, and WebSocket upgrades need it.
//!
//! (Just over 500 lines: the last 75 are its unit tests.)

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::telemetry::Metrics;

/// How long an accept waits after the process ran out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);
/// Accept failures are logged at most this often.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);

/// The connection states.
const OPEN: u8 = 0;
/// What it reads ends (with a `close` packet on a WebSocket); writes still go out.
const CLOSING: u8 = 1;
/// Reads and writes fail; the socket is reset when it is closed.
const RESET: u8 = 2;

/// An Engine.IO `close` packet in a masked WebSocket text frame, as a client
/// sends it (the mask is zero, so the payload reads as is).
const CLOSE_PACKET_FRAME: [u8; 7] = [0x81, 0x81, 0, 0, 0, 0, b'1'];

struct ConnectionState {
    /// The peer's address.
    peer: IpAddr,
    state: AtomicU8,
    /// Set when the connection becomes a WebSocket (the upgrade request arrived).
    websocket: AtomicBool,
    read: AtomicWaker,
    write: AtomicWaker,
    /// Run once, when the connection's stream is dropped.
    on_close: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
}

/// One accepted TCP connection, as the requests it carries see it.
#[derive(Clone)]
pub struct Connection(Arc<ConnectionState>);

impl Connection {
    fn new(peer: IpAddr) -> Connection {
        Connection(Arc::new(ConnectionState {
            peer,
            state: AtomicU8::new(OPEN),
            websocket: AtomicBool::new(false),
            read: AtomicWaker::new(),
            write: AtomicWaker::new(),
            on_close: Mutex::new(Vec::new()),
        }))
    }

    /// Marks the connection as a WebSocket: from the next byte on, what it
    /// reads is WebSocket frames (the client sends none before the upgrade's
    /// answer).
    pub fn upgrading_to_websocket(&self) {
        self.0.websocket.store(true, Ordering::SeqCst);
    }

    /// Ends the connection: what it reads ends now (after the frame being
    /// read, on a WebSocket), and its writes fail after `grace` (what was
    /// queued and a close frame get that long to go out); then it is reset.
    pub fn close(&self, grace: Duration) {
        if self.0.state.compare_exchange(OPEN, CLOSING, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return;
        }
        self.0.read.wake();
        let state = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(state) = state.upgrade() {
                Connection(state).reset();
            }
        });
    }

    /// Ends the connection at once: reads and writes fail, and it is reset.
    fn reset(&self) {
        self.0.state.store(RESET, Ordering::SeqCst);
        self.0.read.wake();
        self.0.write.wake();
    }

    /// The peer's address.
    pub fn peer(&self) -> IpAddr {
        self.0.peer
    }

    /// Runs `f` when the connection's stream is dropped.
    pub fn on_close(&self, f: impl FnOnce() + Send + 'static) {
        self.0.on_close.lock().push(Box::new(f));
    }

    /// Whether both are the same connection.
    pub fn same(&self, other: &Connection) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Where the client's WebSocket frames begin and end, in what the
/// connection reads (client frames are masked: a header of 6 to 14 bytes).
#[derive(Debug, Default)]
struct Frames {
    header: [u8; 14],
    /// Header bytes read so far.
    read: usize,
    /// Payload bytes still to come of the current frame.
    left: u64,
    /// Inside a message sent in several frames (no other data frame fits in).
    fragmented: bool,
    /// Bytes of the replies that the pings read so far oblige (a pong
    /// echoes its ping's payload), not yet taken by [`Frames::take_owed`].
    owed: u64,
}

impl Frames {
    /// Whether the next byte starts a frame that may come next.
    fn at_boundary(&self) -> bool {
        self.read == 0 && self.left == 0 && !self.fragmented
    }

    /// How many more bytes belong to the current frame (0 between frames,
    /// where only header bytes are counted, one at a time).
    fn left_in_frame(&self) -> u64 {
        if self.read == 0 && self.left == 0 { 0 } else { self.left.max(1) }
    }

    /// Takes the bytes of replies owed since the last call.
    fn take_owed(&mut self) -> u64 {
        std::mem::take(&mut self.owed)
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = (bytes.len() as u64).min(self.left);
                self.left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            self.header[self.read] = bytes[0];
            self.read += 1;
            bytes = &bytes[1..];
            if self.read < 2 {
                continue;
            }
            let (b0, b1) = (self.header[0], self.header[1]);
            let extended = match b1 & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let header_len = 2 + extended + if b1 & 0x80 != 0 { 4 } else { 0 };
            if self.read < header_len {
                continue;
            }
            let len = match extended {
                0 => u64::from(b1 & 0x7f),
                _ => self.header[2..2 + extended].iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)),
            };
            let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
            // Control frames (0x8 and up) may come between the fragments of a message.
            if opcode < 0x8 {
                self.fragmented = !fin;
            }
            if opcode == 0x9 {
                // A pong: a 2-byte header (payloads are at most 125 bytes) and the payload.
                self.owed += 2 + len;
            }
            self.read = 0;
            self.left = len;
        }
    }
}

/// A TCP stream that a [`Connection`] can close.
struct CuttableStream {
    inner: TcpStream,
    connection: Connection,
    lingers: bool,
    /// The client's frames, once the connection is a WebSocket.
    frames: Option<Frames>,
    /// How much of [`CLOSE_PACKET_FRAME`] was read, once closing began it.
    close_sent: Option<usize>,
    /// Bytes of replies to the peer's control frames that may still wait
    /// to be written (each ping adds its pong; each write takes away what
    /// it wrote, whatever it was).
    unread_replies: u64,
    /// The most `unread_replies` may reach.
    max_unread_replies: u64,
    metrics: Arc<Metrics>,
}

impl CuttableStream {
    fn state(&self) -> u8 {
        self.connection.0.state.load(Ordering::SeqCst)
    }

    /// Once reset, the socket is closed with an RST: what the peer did not
    /// read is dropped instead of waiting in the kernel.
    fn reset_error(&mut self) -> io::Error {
        if !self.lingers {
            let _ = self.inner.set_zero_linger();
            self.lingers = true;
        }
        io::Error::new(io::ErrorKind::ConnectionReset, "the connection was closed by herald")
    }

    fn poll_writable<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        self.connection.0.write.register(cx.waker());
        if self.state() == RESET {
            return Poll::Ready(Err(self.reset_error()));
        }
        write(Pin::new(&mut self.inner), cx)
    }

    /// A write took `written` bytes out of what waits to be written.
    fn wrote(&mut self, written: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = written {
            self.unread_replies = self.unread_replies.saturating_sub(*n as u64);
        }
    }

    /// Adds the replies the frames just read oblige; resets a connection
    /// whose peer leaves more of them unread than the bound.
    fn owe(&mut self, replies: u64) {
        self.unread_replies = self.unread_replies.saturating_add(replies);
        if self.unread_replies > self.max_unread_replies && self.state() != RESET {
            self.connection.reset();
            self.metrics.limits_hit.get_or_create(&[("limit", "control_backlog")]).inc();
            tracing::info!(
                unread = self.unread_replies,
                "a WebSocket peer sends control frames without reading the replies; connection reset"
            );
        }
    }
}

impl Drop for CuttableStream {
    fn drop(&mut self) {
        let on_close = std::mem::take(&mut *self.connection.0.on_close.lock());
        for f in on_close {
            f();
        }
    }
}

impl CuttableStream {
    /// Reads at most `limit` bytes (the rest of a frame) into `buf`.
    fn poll_read_at_most(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>, limit: u64) -> Poll<io::Result<()>> {
        let mut scratch = vec![0; usize::try_from(limit).unwrap_or(usize::MAX).min(buf.remaining())];
        let mut part = ReadBuf::new(&mut scratch);
        std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut part))?;
        buf.put_slice(part.filled());
        Poll::Ready(Ok(()))
    }

    /// Once closing: on a WebSocket, the rest of the frame being read, then
    /// the `close` packet, then the end; otherwise the end at once.
    fn poll_read_closing(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let Some(frames) = self.frames.as_mut() else { return Poll::Ready(Ok(())) };
        if self.close_sent.is_none() {
            if !frames.at_boundary() {
                let before = buf.filled().len();
                let limit = frames.left_in_frame();
                std::task::ready!(self.poll_read_at_most(cx, buf, limit))?;
                if let Some(frames) = self.frames.as_mut() {
                    frames.feed(&buf.filled()[before..]);
                }
                return Poll::Ready(Ok(()));
            }
            self.close_sent = Some(0);
        }
        let sent = self.close_sent.unwrap_or(CLOSE_PACKET_FRAME.len());
        let n = (CLOSE_PACKET_FRAME.len() - sent).min(buf.remaining());
        buf.put_slice(&CLOSE_PACKET_FRAME[sent..sent + n]);
        self.close_sent = Some(sent + n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for CuttableStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.connection.0.read.register(cx.waker());
        if this.frames.is_none() && this.connection.0.websocket.load(Ordering::SeqCst) {
            this.frames = Some(Frames::default());
        }
        match this.state() {
            OPEN => {
                let before = buf.filled().len();
                std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                if let Some(frames) = this.frames.as_mut() {
                    frames.feed(&buf.filled()[before..]);
                    let owed = frames.take_owed();
                    if owed > 0 {
                        this.owe(owed);
                    }
                }
                Poll::Ready(Ok(()))
            }
            CLOSING => this.poll_read_closing(cx, buf),
            _ => Poll::Ready(Err(this.reset_error())),
        }
    }
}

impl AsyncWrite for CuttableStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = this.poll_writable(cx, |s, cx| s.poll_write(cx, buf));
        this.wrote(&written);
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = this.poll_writable(cx, |s, cx| s.poll_write_vectored(cx, bufs));
        this.wrote(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_writable(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Raises the soft limit on open files (each connection is one) to the hard
/// limit. Returns the soft limit before and after. Process-wide: the binary
/// calls it once.
pub fn raise_open_file_limit() -> io::Result<(u64, u64)> {
    let (before, _) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let after = rlimit::increase_nofile_limit(u64::MAX)?;
    Ok((before, after))
}

/// How connections are bounded.
#[derive(Clone)]
pub struct ListenerSettings {
    /// Longest a request head may take to arrive (also the longest a
    /// kept-alive connection may sit idle between two requests).
    pub header_timeout: Duration,
    /// Longest a request body may take to arrive, from the end of its head.
    pub body_timeout: Duration,
    /// Most bytes of replies to a WebSocket peer's control frames that may
    /// wait for the peer to read them.
    pub max_control_backlog: u64,
    /// Where the limits hit are counted.
    pub metrics: Arc<Metrics>,
}

/// Inserts the connection into every request, bounds the time its body
/// may take, then calls `S`.
#[derive(Clone)]
struct WithConnection<S> {
    inner: S,
    connection: Connection,
    body_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// A request body that fails once its deadline passes, and then closes its
/// connection (what it still sends is not read).
struct TimedBody {
    inner: axum::body::Body,
    deadline: tokio::time::Instant,
    /// Armed the first time the body has to wait.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    connection: Connection,
    metrics: Arc<Metrics>,
}

/// A request body did not arrive within the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimedOut;

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) if tokio::time::Instant::now() < this.deadline => {
                return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
            }
            Poll::Ready(_) => {}
            Poll::Pending => {
                let deadline = this.deadline;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                std::task::ready!(timer.as_mut().poll(cx));
            }
        }
        this.metrics.limits_hit.get_or_create(&[("limit", "body_timeout")]).inc();
        tracing::info!("a request body did not arrive within the body timeout; closing its connection");
        this.connection.close(Duration::from_secs(2));
        Poll::Ready(Some(Err(Box::new(BodyTimedOut))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B> tower::Service<http::Request<B>> for WithConnection<S>
where
    S: tower::Service<http::Request<axum::body::Body>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut request = request.map(|body| {
            let inner = axum::body::Body::new(body);
            if http_body::Body::is_end_stream(&inner) {
                return inner;
            }
            axum::body::Body::new(TimedBody {
                inner,
                deadline: tokio::time::Instant::now() + self.body_timeout,
                timer: None,
                connection: self.connection.clone(),
                metrics: self.metrics.clone(),
            })
        });
        request.extensions_mut().insert(self.connection.clone());
        self.inner.call(request)
    }
}

/// Accepts connections on `listener` and serves `service` on each until
/// `shutdown` resolves; then stops accepting, asks every connection to finish
/// its current request, and returns once all have (the caller bounds the wait).
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    settings: ListenerSettings,
    shutdown: impl Future<Output = ()> + Send,
) where
    S: tower::Service<http::Request<axum::body::Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(settings.header_timeout);
    tokio::pin!(shutdown);
    let mut last_logged: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                if last_logged.is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY) {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    last_logged = Some(Instant::now());
                }
                // Out of descriptors (or another passing failure): let some close.
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection::new(peer.ip());
        let stream = CuttableStream {
            inner: stream,
            connection: connection.clone(),
            lingers: false,
            frames: None,
            close_sent: None,
            unread_replies: 0,
            max_unread_replies: settings.max_control_backlog,
            metrics: settings.metrics.clone(),
        };
        let io = TokioIo::new(stream);
        let service = TowerToHyperService::new(WithConnection {
            inner: service.clone(),
            connection,
            body_timeout: settings.body_timeout,
            metrics: settings.metrics.clone(),
        });
        let conn = http.serve_connection(io, service).with_upgrades();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = &mut conn => return,
                _ = stop.wait_for(|stopping| *stopping) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    // Every connection task holds a receiver: they are all done when it closes.
    stop_tx.closed().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame: FIN, `opcode`, `payload`.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frame_boundaries_are_found_whatever_the_read_sizes() {
        let mut stream = Vec::new();
        let mut boundaries = vec![0];
        let mut fragmented = false;
        for (fin, opcode, len) in
            [(true, 1, 5), (true, 2, 300), (false, 1, 10), (true, 9, 2), (true, 0, 70_000), (true, 1, 0)]
        {
            stream.extend(frame(fin, opcode, &vec![b'x'; len]));
            if opcode < 8 {
                fragmented = !fin;
            }
            // Between the fragments of a message (a ping included), no data frame may come.
            if !fragmented {
                boundaries.push(stream.len());
            }
        }
        // Byte by byte, every boundary is seen, and nothing else.
        let mut frames = Frames::default();
        let mut found = vec![0];
        for (at, byte) in stream.iter().enumerate() {
            frames.feed(std::slice::from_ref(byte));
            if frames.at_boundary() {
                found.push(at + 1);
            }
        }
        assert_eq!(found, boundaries);
        // In reads of any size, every read that ends on a boundary says so.
        for chunk in [2, 3, 7, 64, 1000, stream.len()] {
            let mut frames = Frames::default();
            for (i, part) in stream.chunks(chunk).enumerate() {
                frames.feed(part);
                let end = (i * chunk + part.len()).min(stream.len());
                assert_eq!(frames.at_boundary(), boundaries.contains(&end), "reads of {chunk}, at {end}");
            }
        }
        // Reading at most what is left of a frame (the closing path) stops on each boundary.
        let (mut frames, mut at, mut found) = (Frames::default(), 0, vec![0]);
        while at < stream.len() {
            let n = (frames.left_in_frame().max(1) as usize).min(stream.len() - at);
            frames.feed(&stream[at..at + n]);
            at += n;
            if frames.at_boundary() {
                found.push(at);
            }
        }
        assert_eq!(found, boundaries);
        assert_eq!(CLOSE_PACKET_FRAME.to_vec(), {
            let mut f = frame(true, 1, b"1");
            f[2..6].copy_from_slice(&[0; 4]);
            f
        });
    }
}
