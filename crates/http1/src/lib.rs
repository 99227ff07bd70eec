//! HTTP/1.1 on the wire (RFC 9112), for a proxy: a request-head reader for the client
//! side, an upstream client that drives one exchange from the request's own task, the
//! framing of bodies both ways, and idle upstream connections kept per caller.
//!
//! This wing knows nothing of routes, versions, `X-Canary-*` fields or the config.
//! What a caller adds to or leaves out of the messages it passes on comes in as
//! arguments: [`client::Extra`] (fields to write, a [`client::Filter`] of fields to
//! leave out) and the added lines of [`server::write_response`]. What it reads is
//! `httparse`'s work (the parser hyper itself uses); what is hand-written is only
//! the framing (RFC 9112 §6–7), which no maintained crate offers on its own.
//!
//! The IO is generic: a connection is any [`conn::Io`] stream (`TcpStream` here; a TLS
//! stream needs only that trait), and the server side writes to any `AsyncWrite`.
//!
//! # Layout
//! - [`fields`]: where a head's fields are ([`fields::RawHead`], [`fields::RawFields`])
//!   and the name tests every reader here uses (`is_name`, `hop_by_hop`, ...).
//! - [`body`]: body framing both ways: the chunked decoder ([`body::step`]), the one
//!   chunked encoder, the request-body writer, the upstream response body.
//! - [`conn`]: one upstream connection and a list of idle ones.
//! - [`reuse`]: whether an upstream's connections may be reused: held off for a while
//!   after it sent bytes nobody asked for.
//! - [`client`]: one exchange with an upstream: the request head, the response head,
//!   the keep-alive race rules.
//! - [`server`]: the client side: the request-head reader and the response writer.

#![forbid(unsafe_code)]

pub mod body;
pub mod client;
pub mod conn;
pub mod fields;
#[doc(hidden)]
pub mod fuzzing;
pub mod reuse;
pub mod server;

use std::error::Error as StdError;
use std::future::{poll_fn, Future as _};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncRead;
use tokio::time::{Instant, Sleep};

/// An error on its way to the caller (logged, never shown to clients).
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Bytes asked of the kernel per read.
pub const READ_CHUNK: usize = 8 * 1024;
/// The largest upstream response head (status line and header fields, and the same
/// for trailers); a larger one is a protocol error.
pub(crate) const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// The most header fields in a head (hyper's own limit).
pub(crate) const MAX_HEADERS: usize = 100;
/// Where a timer starts: far off, moved nearer by the first deadline it is given.
pub const IDLE_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Reads what `io` has into `buf` (at least [`READ_CHUNK`] of room); `Ok(0)` at the end
/// of the stream.
pub fn fill<R: AsyncRead>(
    io: Pin<&mut R>,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    buf.reserve(READ_CHUNK);
    tokio_util::io::poll_read_buf(io, cx, buf)
}

/// Waits until `deadline` on a connection's timer: [`poll_until`] as a future.
pub(crate) async fn until(timer: &mut Pin<Box<Sleep>>, deadline: Instant) {
    poll_fn(|cx| poll_until(timer, deadline, cx)).await;
}

/// Whether `deadline` has passed, by a connection's timer. The timer is moved only
/// when it would go off too late; one that goes off early (it was set for an earlier
/// request) is moved on then. So on a busy connection the timer is re-armed about
/// once per timeout rather than armed and cancelled once per request (a timer-wheel
/// insert and removal each time; docs/performance.md).
pub fn poll_until(
    timer: &mut Pin<Box<Sleep>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    loop {
        ready!(timer.as_mut().poll(cx));
        if Instant::now() >= deadline {
            return Poll::Ready(());
        }
        timer.as_mut().reset(deadline);
    }
}
