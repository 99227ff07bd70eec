//! The properties the fuzz targets check (`fuzz/fuzz_targets/*.rs`), here so that a
//! plain `cargo test` replays the committed corpora through exactly the same checks on
//! the stable toolchain (`tests/fuzz_corpora.rs`). Each function panics when a property
//! fails; that is what a fuzzer reports.
//!
//! The inputs carry their own read splits: the first byte picks where the rest is cut
//! into the pieces a socket would deliver, so every target also checks that how bytes
//! arrive never changes what is decided.
//!
//! Not part of the crate's API (hidden from its docs); the fuzz crate and the corpus
//! replay use it.

use bytes::BytesMut;

use crate::body::{step, Chunk, State, Step};
use crate::client::parse_head;
use crate::fields::{is_name, RawHead};
use crate::server::parse;

/// Splits `data` into a split seed and the bytes: the cut points are every
/// `seed`-th byte (at least 1), so seeds 0 and 255 give one piece or near it.
fn pieces(data: &[u8]) -> (usize, &[u8]) {
    match data.split_first() {
        Some((&seed, rest)) => (usize::from(seed).max(1), rest),
        None => (1, data),
    }
}

/// The own request-head reader against `httparse` (hyper's parser) on the same bytes:
/// a head it takes is one `httparse` parses completely to the same length, method,
/// target and version, and has no body framing, `Expect` or `Upgrade` (canary may
/// refuse more, never accept more). Fed in pieces, it decides the same as on the
/// whole: `Ok(None)` before the head's end, the same head after.
pub fn request_head(data: &[u8]) {
    let (step_len, bytes) = pieces(data);
    let mut raw = RawHead::EMPTY;
    let whole = parse(bytes, &mut raw);
    if let Ok(Some(p)) = &whole {
        let mut fields = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut fields);
        let n = match req.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("taken by canary, refused by httparse: {other:?}"),
        };
        assert_eq!(n, p.len, "head length");
        assert_eq!(req.method, Some(p.method.as_str()), "method");
        let (at, len) = p.target;
        assert_eq!(
            req.path.map(str::as_bytes),
            Some(&bytes[at..at + len]),
            "target"
        );
        assert_eq!(
            req.version == Some(0),
            p.version == http::Version::HTTP_10,
            "version"
        );
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            assert!(
                !is_name(name, "transfer-encoding")
                    && !is_name(name, "expect")
                    && !is_name(name, "upgrade"),
                "a head with {} taken",
                h.name
            );
            if is_name(name, "content-length") {
                assert_eq!(h.value.trim_ascii(), b"0", "a body taken");
            }
        }
        assert_ne!(p.method, http::Method::CONNECT);
        // What the proxy keeps of the head is exactly the head's fields, less
        // `Connection` (read, never passed on).
        let kept = raw.fields.places().len();
        let connection = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .count();
        assert_eq!(kept + connection, req.headers.len(), "fields kept");
    }
    // The same decision, whatever the pieces.
    let mut end = 0;
    while end < bytes.len() {
        end = (end + step_len).min(bytes.len());
        let mut raw = RawHead::EMPTY;
        let part = parse(&bytes[..end], &mut raw);
        match (&whole, &part) {
            (Ok(Some(w)), Ok(Some(p))) => {
                assert!(end >= w.len);
                assert_eq!((w.len, &w.method, w.target), (p.len, &p.method, p.target));
            }
            (Ok(Some(w)), Ok(None)) => assert!(end < w.len, "whole head not seen"),
            (Ok(Some(w)), Err(())) => {
                panic!("refused a prefix ({end} of {}) of a head it takes", w.len)
            }
            // A prefix of bytes it refuses or cannot finish may be anything but a head.
            (_, Ok(Some(p))) => panic!("took {} bytes of input it does not take whole", p.len),
            _ => {}
        }
    }
}

/// The upstream response-head parser against `httparse`: a head it accepts is one
/// `httparse` parses completely, with the same status; read in pieces, it gives the
/// same head (or the same refusal) as read whole.
pub fn response_head(data: &[u8]) {
    let (step_len, bytes) = pieces(data);
    let mut buf = BytesMut::from(bytes);
    let whole = parse_head(&mut buf, &());
    if let Ok(Some(h)) = &whole {
        let mut fields = [httparse::EMPTY_HEADER; 100];
        let mut resp = httparse::Response::new(&mut fields);
        match resp.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => assert_eq!(n, bytes.len() - buf.len()),
            other => panic!("accepted by canary, refused by httparse: {other:?}"),
        }
        assert_eq!(resp.code, Some(h.status.as_u16()));
        // A length is passed on only when the head had one, all equal.
        if let Some(n) = h.fields.length {
            assert!(resp
                .headers
                .iter()
                .any(|f| is_name(f.name.as_bytes(), "content-length")));
            let _ = n;
        }
    }
    let mut acc = BytesMut::new();
    let mut fed = 0;
    loop {
        let next = (fed + step_len).min(bytes.len());
        acc.extend_from_slice(&bytes[fed..next]);
        fed = next;
        let r = parse_head(&mut acc, &());
        match (&whole, r) {
            (_, Ok(None)) if fed < bytes.len() => continue,
            (Ok(Some(w)), Ok(Some(p))) => {
                assert_eq!(w.status, p.status);
                assert_eq!(w.fields.length, p.fields.length);
                return;
            }
            (Ok(None), Ok(None)) | (Err(_), Err(_)) => return,
            (w, p) => panic!(
                "whole gave {:?}, in pieces of {step_len} {:?}",
                w.as_ref()
                    .map(|h| h.as_ref().map(|h| h.status))
                    .map_err(|e| e.to_string()),
                p.as_ref()
                    .map(|h| h.as_ref().map(|h| h.status))
                    .map_err(|e| e.to_string()),
            ),
        }
    }
}

/// The chunked decoder, fed in pieces: no panic, never more data out than went in,
/// never a request for more bytes once all are in and the body ended, and the same
/// data (or error) whatever the pieces.
pub fn chunked(data: &[u8]) {
    let (step_len, bytes) = pieces(data);
    let decode = |step_len: usize| -> Result<(Vec<u8>, bool), ()> {
        let mut state = State::Chunked(Chunk::Size);
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut out = Vec::new();
        loop {
            match step(&mut state, &mut buf) {
                Err(_) => return Err(()),
                Ok(Step::Frame(f)) => {
                    if let Ok(d) = f.into_data() {
                        out.extend_from_slice(&d);
                    }
                }
                Ok(Step::End) => return Ok((out, true)),
                Ok(Step::Again) => {}
                Ok(Step::More) => {
                    if fed == bytes.len() {
                        return Ok((out, false));
                    }
                    let next = (fed + step_len).min(bytes.len());
                    buf.extend_from_slice(&bytes[fed..next]);
                    fed = next;
                }
            }
            if state == State::Done {
                return Ok((out, true));
            }
            assert!(out.len() <= fed, "more data out than in");
        }
    };
    let whole = decode(bytes.len().max(1));
    let split = decode(step_len);
    match (&whole, &split) {
        (Ok((w, true)), Ok((s, true))) => assert_eq!(w, s, "data differs with pieces"),
        (Ok((_, true)), _) | (_, Ok((_, true))) => {
            panic!(
                "a body whole, not in pieces of {step_len} (or the other way): {whole:?} {split:?}"
            )
        }
        (Ok((w, false)), Ok((s, false))) => assert_eq!(w, s, "data differs with pieces"),
        // Unfinished one way, refused the other: the bounded chunk-size line and
        // trailer section are judged on what is buffered. Neither is a body.
        _ => {}
    }
}
