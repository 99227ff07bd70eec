//! The body of every answer the proxy gives, [`ProxyBody`]: an HTTP/1.1 upstream's
//! (whose connection goes back to its idle list at its end), an HTTP/2 upstream's, or a
//! short text of the proxy's own. It also carries what goes into the answer's head
//! besides its `HeaderMap`: the HTTP/1.1 upstream's fields as they came, and the
//! fields the proxy adds after them.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::net::TcpStream;

use crate::headers::{filter_trailers, AddedField};
use crate::timers::{Kind, Stall};
use canary_http1::body::ResponseBody;
use canary_http1::fields::RawFields;
use canary_http1::BoxError;

/// The body the proxy answers with (see the module docs).
pub struct ProxyBody {
    stream: Stream,
    /// The upstream's fields to pass on (HTTP/1.1; an HTTP/2 response has its own in
    /// its `HeaderMap`). Boxed, as a response is moved several times on its way.
    fields: Option<Box<RawFields>>,
    /// Fields the proxy adds after the upstream's (no map to allocate).
    added: [Option<AddedField>; 2],
}

/// The bytes of an answer's body (and its trailers), apart from what goes into its head.
pub struct Stream {
    inner: Inner,
    /// A route's `timeouts.idle`: the longest wait for the upstream's next bytes. Here,
    /// not on `ProxyBody`, because the proxy's own writer polls the `Stream` alone.
    stall: Option<Stall>,
}

enum Inner {
    /// From an HTTP/1.1 upstream (the proxy's own exchange), or the empty body of its
    /// `101 Switching Protocols`.
    Http1(ResponseBody<TcpStream>),
    /// From an HTTP/2 upstream (hyper's client).
    Http2(Incoming),
    /// A short body the proxy wrote itself (an error answer); `None` once sent.
    Fixed(Option<Bytes>),
}

impl From<(ResponseBody<TcpStream>, Box<RawFields>)> for ProxyBody {
    #[inline]
    fn from((body, fields): (ResponseBody<TcpStream>, Box<RawFields>)) -> ProxyBody {
        ProxyBody {
            stream: Stream {
                inner: Inner::Http1(body),
                stall: None,
            },
            fields: Some(fields),
            added: [None, None],
        }
    }
}

impl ProxyBody {
    /// A short body of the proxy's own (an error answer's text).
    pub fn fixed(text: &'static str) -> ProxyBody {
        ProxyBody {
            stream: Stream {
                inner: Inner::Fixed(Some(Bytes::from_static(text.as_bytes()))),
                stall: None,
            },
            fields: None,
            added: [None, None],
        }
    }

    /// A body from an HTTP/2 upstream, whose connections hyper keeps.
    pub fn http2(inner: Incoming) -> ProxyBody {
        ProxyBody {
            stream: Stream {
                inner: Inner::Http2(inner),
                stall: None,
            },
            fields: None,
            added: [None, None],
        }
    }

    /// Cuts the body (an error, so the client sees it end early) when the upstream
    /// sends nothing for `idle` while it is being read; time spent waiting for the
    /// client to take what was read does not count.
    pub fn set_idle_timeout(&mut self, idle: std::time::Duration) {
        if !matches!(self.stream.inner, Inner::Fixed(_)) {
            self.stream.stall = Some(Stall::new(idle, Kind::UpstreamIdle));
        }
    }

    /// The upstream's fields, to be written before the response's `HeaderMap`.
    pub fn take_fields(&mut self) -> Option<Box<RawFields>> {
        self.fields.take()
    }

    /// Adds a field the proxy sets after the upstream's own, when the response has a
    /// head of its own (an HTTP/1.1 upstream's); gives the value back otherwise (an
    /// HTTP/2 response, whose fields are in its map) or when there is no more room.
    pub fn add_field(&mut self, field: AddedField) -> Result<(), AddedField> {
        if self.fields.is_none() {
            return Err(field);
        }
        match self.added.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => {
                *slot = Some(field);
                Ok(())
            }
            None => Err(field),
        }
    }

    /// The fields the proxy added after the upstream's, in order.
    pub fn added(&self) -> impl Iterator<Item = &AddedField> {
        self.added.iter().flatten()
    }

    /// The parts a writer needs at once, borrowed apart (nothing moved): the body to
    /// poll, the upstream's fields, and the fields the proxy added after them.
    pub fn for_writing(&mut self) -> (&mut Stream, Option<&RawFields>, &[Option<AddedField>; 2]) {
        (&mut self.stream, self.fields.as_deref(), &self.added)
    }

    /// After a `101 Switching Protocols`: the upstream connection, and what the
    /// upstream already sent past the response head.
    pub fn take_upgrade(&mut self) -> Option<(TcpStream, Bytes)> {
        match &mut self.stream.inner {
            Inner::Http1(b) => b.take_upgrade(),
            _ => None,
        }
    }
}

impl fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.stream.inner {
            Inner::Http2(_) => "http2",
            Inner::Http1(_) => "http1",
            Inner::Fixed(_) => "fixed",
        };
        f.debug_struct("ProxyBody").field("kind", &kind).finish()
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.stream).poll_frame(cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.stream.size_hint()
    }
}

impl Body for Stream {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = match &mut this.inner {
            Inner::Http1(b) => Pin::new(b).poll_frame(cx),
            Inner::Http2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Fixed(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        };
        if let Some(stall) = &mut this.stall {
            match r {
                Poll::Pending => {
                    if let Err(e) = stall.waiting(cx) {
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                }
                _ => stall.progress(),
            }
        }
        let mut frame = ready!(r);
        // An upstream's trailers pass only what may be a trailer (RFC 9110 §6.5.1).
        filter_trailers(&mut frame);
        Poll::Ready(frame)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Http1(b) => b.is_end_stream(),
            Inner::Http2(b) => b.is_end_stream(),
            Inner::Fixed(b) => b.is_none(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Http1(b) => b.size_hint(),
            Inner::Http2(b) => b.size_hint(),
            Inner::Fixed(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test]
    async fn a_fixed_body_is_its_text_once_with_an_exact_length() {
        let b = ProxyBody::fixed("no route for this request\n");
        assert_eq!(b.size_hint().exact(), Some(26));
        assert!(!b.is_end_stream());
        let mut b = std::pin::pin!(b);
        let frame = poll_fn(|cx| b.as_mut().poll_frame(cx))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), "no route for this request\n");
        assert!(b.is_end_stream());
        assert_eq!(b.size_hint().exact(), Some(0));
        assert!(poll_fn(|cx| b.as_mut().poll_frame(cx)).await.is_none());
    }
}
