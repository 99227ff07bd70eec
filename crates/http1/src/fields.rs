//! Where a head's fields are, and the tests on field names and values that every
//! reader here uses.
//!
//! A head's fields are kept as places in the head's own bytes ([`RawHead`],
//! [`RawFields`]): they are written out again far more often than looked up, and a
//! `HeaderMap` costs a hash, a lowercased copy and two allocations per field.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// A `Content-Length` value: digits only, at most 19 of them (fits a `u64`).
pub(crate) fn content_length(v: &[u8]) -> Option<u64> {
    (!v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit))
        .then(|| v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// An upstream response's fields as they are passed on: in the upstream's order and
/// letter case, sharing the head's memory, without the hop-by-hop and framing ones —
/// `Connection` and the fields it names, `Keep-Alive`, `Proxy-Connection`,
/// `Proxy-Authorization`, `TE`, `Upgrade` (all kept on a `101`), `Transfer-Encoding`
/// and `Content-Length` — and without those the caller's
/// [`Filter`](crate::client::Filter) leaves out. The caller frames the answer itself,
/// from the body and [`length`](Self::length).
///
/// Why not a `HeaderMap`: building one (names looked up and lowercased, values
/// checked again, two allocations) and dropping it was ~2.6 k of ~21 k instructions
/// per request, for fields that are only ever written out again. Where a map is
/// needed (hyper's side of the client connection: h2c clients, requests with a body),
/// [`to_map`](Self::to_map) makes one.
#[derive(Debug)]
pub struct RawFields {
    pub(crate) raw: RawHead,
    /// The upstream's `Content-Length`, when the body is framed by it (for a `HEAD` or
    /// `304` answer: the length the body would have had).
    pub length: Option<u64>,
    /// A `Date` field is among them.
    pub has_date: bool,
}

impl RawFields {
    /// No fields.
    pub const EMPTY: RawFields = RawFields {
        raw: RawHead::EMPTY,
        length: None,
        has_date: false,
    };

    /// The upstream's fields, `(name, value)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.raw.iter()
    }

    /// Writes the upstream's fields, as [`RawHead::write_fields`] does.
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        self.raw.write_fields(out, |_, _| true);
    }

    /// Whether there are none (and no length).
    pub fn is_empty(&self) -> bool {
        self.raw.fields.places().is_empty() && self.length.is_none()
    }

    /// The fields as a map (names lowercased), with `Content-Length` when there is one.
    /// `httparse` checked them with the rules `http` has; one `http` refused anyway
    /// would be left out.
    pub fn to_map(&self) -> HeaderMap {
        self.to_map_with_room(0)
    }

    /// [`to_map`](Self::to_map), with room for `more` fields the caller adds after
    /// (a map that grows moves every entry: ~1.2 k instructions of an HTTP/2 answer).
    pub fn to_map_with_room(&self, more: usize) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(
            self.raw.fields.places().len() + usize::from(self.length.is_some()) + more,
        );
        self.raw.append_to(&mut map);
        if let Some(n) = self.length {
            map.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        map
    }

    /// The fields of a response head as the client passes them on, with no
    /// [`Filter`](crate::client::Filter) (for tests, and for callers that hold a head
    /// of their own); `None` for a head the client would refuse or that is not whole.
    pub fn of(head: &[u8]) -> Option<RawFields> {
        let mut buf = BytesMut::from(head);
        crate::client::parse_head(&mut buf, &())
            .ok()?
            .map(|h| *h.fields)
    }
}

/// A request head read by [`server::parse`](crate::server::parse): its fields as places
/// in it, in the client's order and letter case, `Connection` left out (the reader
/// takes no request whose `Connection` names anything). Lookups scan the few fields
/// (cheaper than building and hashing a map), and the upstream exchange writes them
/// less what the caller sets or removes ([`Extra`](crate::client::Extra)).
#[derive(Debug)]
pub struct RawHead {
    pub(crate) head: Bytes,
    pub(crate) fields: Fields,
}

impl RawHead {
    pub const EMPTY: RawHead = RawHead {
        head: Bytes::new(),
        fields: Fields::EMPTY,
    };

    /// The head's bytes (request line, fields and blank line): values found by
    /// [`get`](Self::get) can be sliced out of it without a copy.
    pub fn bytes(&self) -> &Bytes {
        &self.head
    }

    /// The fields, `(name, value)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .places()
            .iter()
            .map(|p| (&self.head[p.name()], &self.head[p.value()]))
    }

    /// Writes the fields `keep` lets through as `name: value` lines, in order: the same
    /// bytes as [`write_field`] for each, but lines that came in exactly that form and
    /// follow each other in the head are copied as one run (a browser's dozen request
    /// fields are then a few copies instead of four per field).
    pub(crate) fn write_fields(
        &self,
        out: &mut Vec<u8>,
        mut keep: impl FnMut(&[u8], &[u8]) -> bool,
    ) {
        let head = &self.head[..];
        let mut run: Option<(usize, usize)> = None; // a span of `head` to copy as it is
        for p in self.fields.places() {
            let (n, v) = (p.name(), p.value());
            let (name, value) = (&head[n.clone()], &head[v.clone()]);
            if !keep(name, value) {
                continue;
            }
            let end = v.end + 2;
            let as_written = v.start == n.end + 2
                && &head[n.end..v.start] == b": "
                && head.get(v.end..end) == Some(&b"\r\n"[..]);
            match run {
                Some((_, ref mut e)) if as_written && *e == n.start => *e = end,
                _ => {
                    if let Some((s, e)) = run.take() {
                        out.extend_from_slice(&head[s..e]);
                    }
                    if as_written {
                        run = Some((n.start, end));
                    } else {
                        write_field(out, name, value);
                    }
                }
            }
        }
        if let Some((s, e)) = run {
            out.extend_from_slice(&head[s..e]);
        }
    }

    /// The values of the fields named `name` (any letter case), in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The fields as a map (a request's for an HTTP/2 upstream, an answer's for hyper's
    /// side of the client); a field `http` refuses is left out.
    pub fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.fields.places().len());
        self.append_to(&mut map);
        map
    }

    /// Appends the fields to `map`; a field `http` refuses is left out.
    fn append_to(&self, map: &mut HeaderMap) {
        for p in self.fields.places() {
            match (
                HeaderName::from_bytes(&self.head[p.name()]),
                HeaderValue::from_maybe_shared(self.head.slice(p.value())),
            ) {
                (Ok(name), Ok(value)) => {
                    map.append(name, value);
                }
                _ => tracing::debug!("a field the http crate refuses was left out"),
            }
        }
    }
}

/// Whether a field is hop-by-hop (RFC 9110 §7.6.1): for one connection only, never
/// passed on. (So are the fields a `Connection` names; those are found where it is read.)
pub fn hop_by_hop(name: &[u8]) -> bool {
    let is = |n: &str| is_name(name, n);
    match name.len() {
        2 => is("te"),
        7 => is("upgrade"),
        10 => is("connection") || is("keep-alive"),
        // HTTP/2's upgrade token (RFC 7540 §3.2.1): for the connection it was sent on.
        14 => is("http2-settings"),
        16 => is("proxy-connection"),
        17 => is("transfer-encoding"),
        19 => is("proxy-authorization"),
        _ => false,
    }
}

/// Whether a field may not be sent in a trailer section, and so is dropped from one
/// (RFC 9110 §6.5.1): fields that frame the message, route it, authenticate it, modify
/// or control the request or response, or are hop-by-hop. A recipient that merged such
/// a trailer into the head (as CGI-style backends do) would take it for the real one.
/// Everything else passes, gRPC's `grpc-status` and `grpc-message` included.
pub fn forbidden_in_trailers(name: &[u8]) -> bool {
    let is = |n: &str| is_name(name, n);
    hop_by_hop(name)
        || match name.len() {
            3 => is("age"),
            4 => is("host") || is("date") || is("vary"),
            5 => is("range") || is("allow"),
            6 => is("cookie") || is("expect") || is("pragma"),
            7 => is("expires") || is("trailer") || is("warning"),
            8 => is("if-match") || is("location") || is("if-range"),
            10 => is("set-cookie"),
            11 => is("retry-after"),
            12 => is("content-type") || is("max-forwards"),
            13 => {
                is("authorization")
                    || is("cache-control")
                    || is("content-range")
                    || is("if-none-match")
            }
            14 => is("content-length"),
            16 => is("content-encoding") || is("www-authenticate"),
            17 => is("if-modified-since"),
            18 => is("proxy-authenticate"),
            19 => is("if-unmodified-since"),
            _ => false,
        }
}

/// Whether `name`, a field name or value as `httparse` accepted it, is `lower`
/// (lowercase letters, digits and `-`) in any letter case. For the bytes `httparse`
/// lets through (no CR, LF or other control but HTAB), setting bit `0x20` lowercases
/// a letter and turns no other byte into one `lower` may hold, so one branch-free
/// pass decides; `eq_ignore_ascii_case` folds both sides byte by byte, and the field
/// names of every request and response are compared against a dozen names (~2% of a
/// request's instructions).
#[inline]
pub fn is_name(name: &[u8], lower: &str) -> bool {
    debug_assert!(lower
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'));
    name.len() == lower.len()
        && name
            .iter()
            .zip(lower.as_bytes())
            .fold(0, |diff, (&c, &l)| diff | ((c | 0x20) ^ l))
            == 0
}

/// Whether a `TE` value lists `trailers` (the one coding that may pass).
pub fn te_lists_trailers(v: &[u8]) -> bool {
    v.split(|&c| c == b',').any(|t| {
        t.split(|&c| c == b';')
            .next()
            .unwrap_or(b"")
            .trim_ascii()
            .eq_ignore_ascii_case(b"trailers")
    })
}

/// A field's place in its head's buffer: where its name and its value are. Offsets
/// are `u32` (a head is far smaller: `limits.max_header_bytes` is at most 1 GiB, an
/// upstream's head at most 64 KiB); [`Fields::collect`] refuses a larger
/// buffer), which halves what every head's inline places cost to clear and copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Place {
    name: u32,
    name_len: u32,
    value: u32,
    value_len: u32,
}

impl Place {
    const EMPTY: Place = Place {
        name: 0,
        name_len: 0,
        value: 0,
        value_len: 0,
    };

    /// Where the name is.
    pub(crate) fn name(&self) -> std::ops::Range<usize> {
        self.name as usize..(self.name + self.name_len) as usize
    }

    /// Where the value is.
    pub(crate) fn value(&self) -> std::ops::Range<usize> {
        self.value as usize..(self.value + self.value_len) as usize
    }
}

/// Fields a head usually has at most: their places fit inline.
const FEW_FIELDS: usize = 16;

/// Where a parsed head's fields are in its buffer, so that their values can be
/// slices of the head once it is split off (no copy). Most heads have a few fields:
/// their places fit inline, with no allocation of their own (room for all 100 would
/// cost more to clear than the parse).
#[derive(Debug)]
pub(crate) struct Fields {
    few: [Place; FEW_FIELDS],
    n: usize,
    many: Vec<Place>,
}

impl Fields {
    pub(crate) const EMPTY: Fields = Fields {
        few: [Place::EMPTY; FEW_FIELDS],
        n: 0,
        many: Vec::new(),
    };

    /// Replaces the places with those of the fields of `parsed` (parsed from `buf`)
    /// that `keep` wants. In place: `Fields` is large, and moving it costs. `false`
    /// (and no places) when `buf` is too large for a [`Place`]'s offsets.
    #[must_use]
    pub(crate) fn collect(
        &mut self,
        buf: &[u8],
        parsed: &[httparse::Header<'_>],
        mut keep: impl FnMut(&httparse::Header<'_>) -> bool,
    ) -> bool {
        self.n = 0;
        self.many.clear();
        if u32::try_from(buf.len()).is_err() {
            return false;
        }
        let base = buf.as_ptr() as usize;
        // Every offset and length is within `buf`, so below `u32::MAX` (checked above).
        let place = |h: &httparse::Header<'_>| Place {
            name: (h.name.as_ptr() as usize - base) as u32,
            name_len: h.name.len() as u32,
            value: (h.value.as_ptr() as usize - base) as u32,
            value_len: h.value.len() as u32,
        };
        if parsed.len() <= FEW_FIELDS {
            for h in parsed.iter().filter(|h| keep(h)) {
                self.few[self.n] = place(h);
                self.n += 1;
            }
        } else {
            self.many
                .extend(parsed.iter().filter(|h| keep(h)).map(place));
        }
        true
    }

    /// The places, in order.
    pub(crate) fn places(&self) -> &[Place] {
        if self.many.is_empty() {
            &self.few[..self.n]
        } else {
            &self.many[..]
        }
    }

    /// Keeps the places `keep` wants.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Place) -> bool) {
        if self.many.is_empty() {
            let mut n = 0;
            for i in 0..self.n {
                if keep(&self.few[i]) {
                    self.few[n] = self.few[i];
                    n += 1;
                }
            }
            self.n = n;
        } else {
            self.many.retain(keep);
        }
    }
}

/// Reads the tokens of a `Connection` value: sets `close` and `keep_alive` when they
/// are listed, and returns whether it lists anything else (`upgrade`, or fields to
/// remove).
pub(crate) fn connection_tokens(value: &[u8], close: &mut bool, keep_alive: &mut bool) -> bool {
    // The usual values first, without splitting.
    if is_name(value, "keep-alive") {
        *keep_alive = true;
        return false;
    }
    if is_name(value, "close") {
        *close = true;
        return false;
    }
    let mut other = false;
    for t in value.split(|&c| c == b',').map(<[u8]>::trim_ascii) {
        if t.eq_ignore_ascii_case(b"close") {
            *close = true;
        } else if t.eq_ignore_ascii_case(b"keep-alive") {
            *keep_alive = true;
        } else {
            other |= !t.is_empty();
        }
    }
    other
}

/// Writes the fields of a trailer section (between the last chunk and the blank line).
/// Fields [`forbidden_in_trailers`] names are left out.
pub(crate) fn write_trailers(out: &mut Vec<u8>, trailers: &HeaderMap) {
    for (name, value) in trailers {
        if !forbidden_in_trailers(name.as_str().as_bytes()) {
            write_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// Writes one header field line (the request's to the upstream, the answer's to the
/// client).
pub fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Copying fields in runs writes the same bytes as writing each field, whatever
        /// the separators, line ends and gaps (fields left out at parse or by `keep`).
        #[test]
        fn field_runs_write_what_each_field_would(
            fields in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["x-a", "X-Bb", "server", "connection", "content-length", "etag"]),
                    "[!-~]([ -~]{0,6}[!-~])?",
                    proptest::sample::select(vec![": ", ": ", ":", ":  ", ":\t"]),
                    proptest::sample::select(vec!["\r\n", "\n", " \r\n"]),
                ),
                0..10,
            ),
            every_other in proptest::prelude::any::<bool>(),
        ) {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            for (name, value, sep, end) in &fields {
                let value = if *name == "content-length" { "3" } else { value.as_str() };
                head.extend_from_slice(format!("{name}{sep}{value}{end}").as_bytes());
            }
            head.extend_from_slice(b"\r\n");
            let mut buf = BytesMut::from(&head[..]);
            let parsed = match crate::client::parse_head(&mut buf, &()) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Err(proptest::test_runner::TestCaseError::fail("incomplete head")),
                Err(e) => return Err(proptest::test_runner::TestCaseError::fail(format!("refused: {e}"))),
            };
            let raw = &parsed.fields.raw;
            let keep = |i: usize| !every_other || i.is_multiple_of(2);
            let mut runs = Vec::new();
            let mut i = 0;
            raw.write_fields(&mut runs, |_, _| {
                i += 1;
                keep(i)
            });
            let mut each = Vec::new();
            for (i, (name, value)) in raw.iter().enumerate() {
                if keep(i + 1) {
                    write_field(&mut each, name, value);
                }
            }
            proptest::prop_assert_eq!(String::from_utf8_lossy(&runs), String::from_utf8_lossy(&each));
        }
    }

    proptest::proptest! {
        /// `is_name` agrees with `eq_ignore_ascii_case` on every field name `httparse`
        /// accepts (token characters), against the names the proxy looks for and
        /// names one character away from them.
        #[test]
        fn is_name_matches_names_in_any_letter_case(
            lower in proptest::sample::select(vec![
                "te", "host", "date", "expect", "upgrade", "connection", "keep-alive",
                "content-length", "x-canary-route", "x-forwarded-for", "x-canary-version",
                "x-forwarded-host", "proxy-connection", "transfer-encoding",
                "x-forwarded-proto", "proxy-authorization",
            ]),
            flips in proptest::collection::vec(proptest::bool::ANY, 20),
            swap in proptest::option::of((0usize..20, "[!#$%&'*+.^_`|~0-9A-Za-z-]")),
        ) {
            let name = near(lower, &flips, swap.map(|(at, c)| (at, c.as_bytes()[0])));
            proptest::prop_assert_eq!(httparse_field(&name, b"v"), Some((name.clone(), b"v".to_vec())));
            proptest::prop_assert_eq!(is_name(&name, lower), name.eq_ignore_ascii_case(lower.as_bytes()));
        }

        /// The same for field values (`Connection: keep-alive`), whatever byte a value
        /// may hold stands in for one of the name's.
        #[test]
        fn is_name_matches_values_in_any_letter_case(
            lower in proptest::sample::select(vec!["close", "keep-alive", "chunked", "trailers"]),
            flips in proptest::collection::vec(proptest::bool::ANY, 12),
            swap in proptest::option::of((
                0usize..12,
                proptest::strategy::Strategy::prop_filter(proptest::num::u8::ANY, "a value byte", |&b| b == b'\t' || (b >= 0x20 && b != 0x7f)),
            )),
        ) {
            let value = near(lower, &flips, swap);
            // A value `httparse` would trim or refuse is not one `is_name` is given.
            proptest::prop_assume!(httparse_field(b"x", &value) == Some((b"x".to_vec(), value.clone())));
            proptest::prop_assert_eq!(is_name(&value, lower), value.eq_ignore_ascii_case(lower.as_bytes()));
        }
    }

    /// `lower` with the letters `flips` marks in upper case and, with `swap`, the byte
    /// at that place (modulo the length) replaced.
    fn near(lower: &str, flips: &[bool], swap: Option<(usize, u8)>) -> Vec<u8> {
        let mut out: Vec<u8> = lower
            .bytes()
            .zip(flips)
            .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c })
            .collect();
        if let Some((at, b)) = swap {
            let at = at % out.len();
            out[at] = b;
        }
        out
    }

    /// The field `name: value` as `httparse` reads it, if it accepts it.
    fn httparse_field(name: &[u8], value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        let line = [name, b": ", value, b"\r\n\r\n"].concat();
        let mut fields = [httparse::EMPTY_HEADER; 1];
        match httparse::parse_headers(&line, &mut fields) {
            Ok(httparse::Status::Complete(_)) => {
                Some((fields[0].name.as_bytes().to_vec(), fields[0].value.to_vec()))
            }
            _ => None,
        }
    }
}
