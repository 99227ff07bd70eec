//! The per-request handler: route, decide, forward, record, answer.
//!
//! Errors become HTTP answers in one place ([`error_response`]); upstream failures
//! are classified by where they came from (connect, timeout, protocol) so ejection,
//! the breaker and the analysis blame the right party, and a client that hangs up is
//! never counted against a version.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use canary_config::Underscores;
use canary_core::Target;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::body::ProxyBody;
use crate::headers::{
    drop_underscored, generate_id, has_underscore, strip_hop_by_hop, AddedField, ProxyFields,
    PROTO_HTTP, PROTO_HTTPS, PROXY_REQUEST_FIELDS, X_CANARY_ROUTE, X_CANARY_VERSION,
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};
use crate::http2::UpstreamBody;
use crate::metrics::UpstreamError;
use crate::pool::{Instance, Pool};
use crate::request::{
    asterisk_form_ok, is_upgrade, request_host, routable_path, target_bytes, unsupported_coding,
    BodyProgress, ClientBody, ConnInfo, Facts, Host, RequestFields,
};
use crate::snapshot::{Proxy, RouteEntry};
use crate::upstream::{self, Outgoing, SendError};
use crate::witness::{LazyClient, Witness};
use crate::worker::now_ms;
use canary_http1::client::Extra;
use canary_http1::fields::RawHead;

/// A short plain-text answer the proxy generates itself; never leaks internals.
pub fn error_response(status: StatusCode, msg: &'static str) -> Box<Response<ProxyBody>> {
    let mut r = Box::new(Response::new(ProxyBody::fixed(msg)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// An answer for a request that failed on the client's side, with the version it
/// was meant for; `close`: also `Connection: close` (HTTP/1.x), as the rest of its
/// body will not be read.
fn client_error(
    status: StatusCode,
    msg: &'static str,
    pool: &Pool,
    close: bool,
) -> Box<Response<ProxyBody>> {
    let mut r = error_response(status, msg);
    r.headers_mut()
        .insert(X_CANARY_VERSION.clone(), pool.version_header.clone());
    if close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Records the outcome when dropped, so a request whose client went away (the
/// handler future is dropped mid-flight) is counted as a client abort.
struct Outcome<'a> {
    pool: &'a Pool,
    done: bool,
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.pool.stats.record_client_abort();
        }
    }
}

impl Proxy {
    /// Handles one request end to end. The answer is boxed (from the upstream exchange
    /// on): it is moved out of every async layer on its way to the writer, a `memcpy`
    /// of ~180 bytes each time, where a box is a pointer (docs/performance.md).
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<ClientBody>,
        conn: &ConnInfo,
    ) -> Box<Response<ProxyBody>> {
        let snap = self.load();
        // The request target counts toward the header limit, as nginx's buffers do.
        let max = snap.limits.max_header_bytes;
        let target = target_bytes(req.uri());
        if target > max {
            return error_response(StatusCode::URI_TOO_LONG, "request target too long\n");
        }
        if target + RequestFields::of(&req).size() > max {
            return error_response(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request header fields too large\n",
            );
        }
        let host = match request_host(&req) {
            Ok(h) => h,
            Err(why) => return error_response(StatusCode::BAD_REQUEST, why),
        };
        if !routable_path(req.uri().path()) || !asterisk_form_ok(req.method(), req.uri().path()) {
            return error_response(StatusCode::BAD_REQUEST, "invalid request path\n");
        }
        // Only hyper's requests can have a body, and so a transfer coding; the own
        // reader takes none.
        let mut close = false;
        if let ClientBody::Hyper(_) = req.body() {
            if unsupported_coding(&req) {
                let mut r = error_response(
                    StatusCode::NOT_IMPLEMENTED,
                    "transfer coding not implemented\n",
                );
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
            // After a chunked request the connection is closed: hyper's chunked decoder
            // takes a bare LF ending the trailer section (`0\r\n\n`) for the start of a
            // trailer and reads the next request on the connection as trailers, where
            // a stricter proxy in front reads it as a request: not reading past the
            // body leaves nothing to disagree on.
            close = req.headers().contains_key(header::TRANSFER_ENCODING);
        }
        let filter = ProxyFields::of(&snap.limits);
        if snap.limits.headers_with_underscores == Underscores::Reject
            && RequestFields::of(&req).any_name(has_underscore)
        {
            return error_response(StatusCode::BAD_REQUEST, "invalid header name\n");
        }
        let Some(idx) = snap
            .table
            .find(host.as_ref().map(Host::name), req.uri().path())
        else {
            self.unrouted.fetch_add(1, Relaxed);
            return error_response(StatusCode::NOT_FOUND, "no route for this request\n");
        };
        let route = &snap.table.routes[idx];
        let entry = &snap.entries[idx];
        let facts = Facts {
            fields: RequestFields::of(&req),
            query: req.uri().query(),
            ip: conn.peer.ip(),
        };

        let mut generated = None;
        let key = match route.sticky_key(&facts) {
            Some(k) => Some(k.bytes()),
            None if route.has_canary => {
                generated = Some(generate_id());
                generated.as_ref().map(<[u8; 32]>::as_slice)
            }
            None => None,
        };
        let decision = route.decide(entry.runtime.weight(), &facts, key);
        let (pool, target) = match (decision.target, &entry.canary) {
            (Target::Canary, Some(canary)) if canary.any_available(now_ms()) => {
                (canary, Target::Canary)
            }
            (Target::Canary, Some(_)) => {
                entry.runtime.fallback();
                (&entry.stable, Target::Stable)
            }
            _ => (&entry.stable, Target::Stable),
        };
        // Who sees this request fail, should it: one client alone must not be able to
        // trip the breaker or eject an instance (see `witness`).
        let client = LazyClient::at(conn.client_addr, key);
        let mut resp = forward(
            req,
            conn,
            host.map(|h| h.value),
            (entry, pool, target),
            client,
            filter,
        )
        .await;
        if close {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let (Some(id), Some(prefix)) = (generated, &entry.cookie_prefix) {
            add_field(
                &mut resp,
                AddedField::StickyCookie {
                    prefix: prefix.clone(),
                    id,
                    secure: conn.tls,
                },
            );
        }
        resp
    }
}

async fn forward(
    req: Request<ClientBody>,
    conn: &ConnInfo,
    host: Option<Bytes>,
    (entry, pool, target): (&RouteEntry, &Pool, Target),
    client: LazyClient,
    filter: &'static ProxyFields,
) -> Box<Response<ProxyBody>> {
    let Some(instance) = pool.pick(now_ms()) else {
        pool.stats.record(502, 0);
        let mut r = error_response(StatusCode::BAD_GATEWAY, "no healthy upstream\n");
        r.headers_mut()
            .insert(X_CANARY_VERSION.clone(), pool.version_header.clone());
        return r;
    };
    let upgrade = is_upgrade(&req);
    let (mut parts, mut body) = req.into_parts();
    let client_upgrade = if upgrade {
        parts.extensions.remove::<OnUpgrade>()
    } else {
        None
    };
    let mut raw = body.take_head();
    if pool.via_client() {
        // hyper's client takes a map.
        if let Some(head) = raw.take() {
            parts.headers = head.to_map();
        }
    }
    // Kept to tell, after a failure, whether the client had sent its body whole.
    let progress = body.progress();
    let close_after = parts.version <= Version::HTTP_11;
    let (mut body, body_end) = UpstreamBody::new(body, pool.via_client());
    let mut joined_xff = None;
    let (added, upstream_host) = build_upstream_request(
        &mut parts,
        (conn, host.as_deref(), raw.as_deref()),
        pool,
        instance,
        (upgrade, filter),
        &mut joined_xff,
    );
    let started = Instant::now();
    let mut outcome = Outcome { pool, done: false };
    let timeout = Duration::from_millis(entry.timeouts.request_ms);
    let extra = Extra {
        host: upstream_host,
        raw: raw.as_deref(),
        added: added.varying(),
        fixed: pool.request_lines(conn.tls),
        filter,
    };
    let req = Outgoing {
        parts: &mut parts,
        body: &mut body,
        body_end,
        extra,
    };
    let now = tokio::time::Instant::from_std(started);
    // The instance a request went to after `instance` failed it (`upstream::send`
    // says when), and how `instance` failed.
    let mut second: Option<(&Arc<Instance>, UpstreamError)> = None;
    let retry = |e: &SendError| {
        let next = pool.pick_other(now_ms(), instance)?;
        let kind = match e {
            SendError::Connect(_) => UpstreamError::Connect,
            _ => UpstreamError::Protocol,
        };
        second = Some((next, kind));
        Some(pool.upstream(next, entry.timeouts.connect_ms))
    };
    let result = upstream::send(
        pool.upstream(instance, entry.timeouts.connect_ms),
        retry,
        req,
        (now, timeout),
    )
    .await;
    // The first instance's error is its own failure (ejection), not the request's:
    // the answer is the second instance's.
    let instance = match second {
        Some((next, kind)) => {
            pool.stats.record_retry();
            pool.stats.record_upstream_error(kind);
            // A refused connection is no client's doing; a dropped one may be.
            let witness = match kind {
                UpstreamError::Connect => Witness::Unreachable,
                _ => Witness::Client(client.id()),
            };
            instance.record_failure(&pool.ejection, now_ms(), witness);
            next
        }
        None => instance,
    };
    let elapsed_us = started.elapsed().as_micros() as u64;
    outcome.done = true;
    let mut unreachable = false;
    // The upstream failed while the client's body was still on its way (the upstream
    // gave up on a stalled upload, say): the client's doing, not the version's or the
    // instance's, or one client with a few stalled POSTs could trip the breaker or
    // eject instances (a connect error comes before any body and still counts).
    let body_incomplete = progress.as_ref().is_some_and(|p| !p.complete());
    let (mut resp, failed) = match result {
        Ok(mut resp) => {
            let failed = resp.status().is_server_error();
            resp.body_mut()
                .set_idle_timeout(Duration::from_millis(entry.timeouts.idle_ms));
            (resp, failed)
        }
        Err(e @ (SendError::Protocol(_) | SendError::Timeout)) if body_incomplete => {
            tracing::debug!(upstream = %instance.addr, error = %e, "upstream failed before the client sent its body whole");
            pool.stats.record_client_abort();
            return client_error(
                StatusCode::REQUEST_TIMEOUT,
                "request body incomplete\n",
                pool,
                close_after,
            );
        }
        Err(SendError::ClientBody(e)) => {
            // The client's body ended early, failed or stalled past
            // `limits.body_timeout`: not the upstream's failure, so ejection, the
            // breaker and the analysis never see it.
            tracing::debug!(upstream = %instance.addr, error = %e, "request failed on the client side");
            pool.stats.record_client_abort();
            return if progress.as_ref().is_some_and(BodyProgress::stalled) {
                client_error(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body timed out\n",
                    pool,
                    close_after,
                )
            } else {
                client_error(StatusCode::BAD_REQUEST, "bad request\n", pool, false)
            };
        }
        Err(SendError::Timeout) => {
            pool.stats.record_upstream_error(UpstreamError::Timeout);
            (
                error_response(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n"),
                true,
            )
        }
        Err(e) => {
            let kind = match e {
                SendError::Connect(_) => {
                    unreachable = true;
                    UpstreamError::Connect
                }
                _ => UpstreamError::Protocol,
            };
            tracing::debug!(upstream = %instance.addr, error = %e, "upstream error");
            pool.stats.record_upstream_error(kind);
            (
                error_response(StatusCode::BAD_GATEWAY, "upstream unavailable\n"),
                true,
            )
        }
    };
    pool.stats.record(resp.status().as_u16(), elapsed_us);
    // Who saw it fail, for a failure only (the client's fingerprint is hashed here).
    let witness = match (failed, unreachable) {
        (false, _) => None,
        (true, true) => Some(Witness::Unreachable),
        (true, false) => Some(Witness::Client(client.id())),
    };
    // The breaker first: when the same failures also eject the last canary instance,
    // the trip is already recorded and the abort reports the breaker, not an
    // unhealthy pool.
    if target == Target::Canary {
        match witness {
            Some(w) => entry.runtime.canary_failure(w),
            None => entry.runtime.canary_success(),
        }
    }
    match witness {
        Some(w) => {
            instance.record_failure(&pool.ejection, now_ms(), w);
        }
        None => instance.record_success(),
    }
    match (resp.status(), client_upgrade) {
        (StatusCode::SWITCHING_PROTOCOLS, Some(client_upgrade)) => {
            if let Some(upstream) = resp.body_mut().take_upgrade() {
                tokio::spawn(tunnel(client_upgrade, upstream));
            } else if pool.via_client() {
                // hyper's client (a TLS pool) keeps its side of the upgrade in the
                // response.
                let upstream = hyper::upgrade::on(&mut *resp);
                tokio::spawn(tunnel_upgraded(client_upgrade, upstream));
            }
        }
        _ => strip_hop_by_hop(resp.headers_mut(), false),
    }
    add_field(
        &mut resp,
        AddedField::Value(&X_CANARY_VERSION, pool.version_header.clone()),
    );
    resp
}

/// Adds a field the proxy sets to an answer: after an HTTP/1.1 upstream's own fields
/// (written as they came, with no map to allocate), else into the response's map, where
/// it is appended (`Set-Cookie`) or replaces the upstream's (`X-Canary-Version`).
fn add_field(resp: &mut Response<ProxyBody>, field: AddedField) {
    let Err(field) = resp.body_mut().add_field(field) else {
        return;
    };
    let name = field.name();
    if *name == header::SET_COOKIE {
        resp.headers_mut().append(name.clone(), field.value());
    } else {
        resp.headers_mut().insert(name.clone(), field.value());
    }
}

/// Copies bytes both ways between an upgraded client and upstream connection, after
/// what the upstream sent right behind its `101`.
async fn tunnel(client: OnUpgrade, (mut upstream, early): (TcpStream, Bytes)) {
    let Ok(client) = client.await else {
        return;
    };
    let mut client = TokioIo::new(client);
    if !early.is_empty() && client.write_all(&early).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Copies bytes both ways between an upgraded client and an upgraded connection of
/// hyper's client (to a TLS pool).
async fn tunnel_upgraded(client: OnUpgrade, upstream: OnUpgrade) {
    let (Ok(client), Ok(upstream)) = (client.await, upstream.await) else {
        return;
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// The fields the proxy adds to a request for the upstream (`X-Forwarded-*`,
/// `X-Canary-*`). Into an HTTP/2 request they go through its `HeaderMap`; an
/// HTTP/1.1 exchange writes them after the request's own fields, which saves five map
/// inserts per request (~3% of the instructions): the varying ones one by one, the
/// fixed ones as the pool's [`request_lines`](Pool::request_lines).
///
/// The values are borrowed from the connection and the pool (cloning five
/// `HeaderValue`s per request was an atomic count up and down for each).
struct Added<'a> {
    /// `X-Forwarded-For`, then `X-Forwarded-Host` (the first `varying_len`): the
    /// latter only when the request has a host. Bytes: the host's are not a
    /// `HeaderValue` (see [`Host`]).
    varying: [(&'static HeaderName, &'a [u8]); 2],
    varying_len: usize,
    /// `X-Forwarded-Proto`, `X-Canary-Version`, `X-Canary-Route`: the same for every
    /// request through the pool.
    fixed: [(&'static HeaderName, &'a HeaderValue); 3],
}

impl<'a> Added<'a> {
    fn varying(&self) -> &[(&'static HeaderName, &'a [u8])] {
        &self.varying[..self.varying_len]
    }

    /// The fields to set as values for a map, in order.
    fn values(&self) -> impl Iterator<Item = (&'static HeaderName, HeaderValue)> + '_ {
        let varying = self.varying().iter().filter_map(|(name, value)| {
            // Checked when the request was read: only a broken invariant fails here.
            HeaderValue::from_bytes(value).ok().map(|v| (*name, v))
        });
        varying.chain(
            self.fixed
                .iter()
                .map(|(name, value)| (*name, (*value).clone())),
        )
    }
}

/// Makes the client's request `parts` the upstream request's, in place (a new
/// `Request` was moved three times and dropped with the old parts, ~2% of a request's
/// instructions), and returns the proxy's fields for it and (to an HTTP/1.1 upstream)
/// the `Host` to write. The fields of a request whose head the proxy read (`raw`) are
/// written as they came, less what is removed or set.
///
/// A client's own `X-Forwarded-For` list, with its address appended, is made in
/// `joined_xff` (the one added value not borrowed as it is).
fn build_upstream_request<'a>(
    parts: &mut http::request::Parts,
    (conn, host, raw): (&'a ConnInfo, Option<&'a [u8]>, Option<&RawHead>),
    pool: &'a Pool,
    instance: &'a Instance,
    (upgrade, filter): (bool, &ProxyFields),
    joined_xff: &'a mut Option<HeaderValue>,
) -> (Added<'a>, Option<&'a [u8]>) {
    // What the client's connection attached (hyper's upgrade handle was taken) is not
    // the upstream request's.
    parts.extensions.clear();
    if parts.version == Version::HTTP_2 && !pool.is_http2() {
        // HTTP/2 may split `Cookie` into one field per pair; HTTP/1.1 allows one line
        // only, so they are joined with `; ` before an HTTP/1.1 upstream (RFC 9113
        // §8.2.3).
        join_cookies(&mut parts.headers);
    }
    if pool.via_client() {
        // hyper's client takes the instance from an absolute URI (`:authority`), and
        // TLS from its scheme.
        let mut uri = Uri::from_static("/").into_parts();
        uri.scheme = Some(if pool.is_tls() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        uri.authority = Some(instance.authority.clone());
        uri.path_and_query = parts.uri.path_and_query().cloned();
        if let Ok(uri) = Uri::from_parts(uri) {
            parts.uri = uri;
        }
        parts.version = if pool.is_http2() {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
    } else {
        // The HTTP/1.1 exchange writes the target in origin form (`/path?query`),
        // whatever form the client used (the authority of a `CONNECT`).
        parts.version = Version::HTTP_11;
    }
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, upgrade);
    if filter.drops_underscores() {
        drop_underscored(headers);
    }
    let fields = match raw {
        Some(r) => RequestFields::Raw(r),
        None => RequestFields::Map(headers),
    };
    // Several `X-Forwarded-For` lines are one list (RFC 9110 §5.3): keep them all.
    let xff: &HeaderValue = {
        let mut prev = fields.values("x-forwarded-for").peekable();
        if prev.peek().is_none() {
            &conn.peer_header
        } else {
            let mut v = Vec::with_capacity(64);
            for p in prev {
                v.extend_from_slice(p);
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(conn.peer_header.as_bytes());
            match HeaderValue::from_bytes(&v) {
                Ok(joined) => joined_xff.insert(joined),
                Err(_) => &conn.peer_header,
            }
        }
    };
    // `Host` is written by the HTTP/1.1 exchange, never taken from the client's
    // fields: the request's host (its one `Host` line, or the authority of an
    // absolute-form target, which replaces `Host`: RFC 9112 §3.2.2), or, as HTTP/1.1
    // requires one and an HTTP/1.0 client may send none, the instance's. To HTTP/2,
    // `:authority` names the instance (the client connects by it), and a `Host` that
    // differs from it is malformed (RFC 9113 §8.3.1): the client's host travels in
    // `X-Forwarded-Host`.
    if !headers.is_empty() {
        headers.remove(header::HOST);
    }
    let upstream_host = (!pool.is_http2()).then(|| host.unwrap_or(instance.host_header.as_bytes()));
    // HTTP/1.1 through hyper's client (a TLS pool): `Host` goes in the map.
    if let (true, Some(h)) = (pool.via_client(), upstream_host) {
        let value = HeaderValue::from_bytes(h).unwrap_or_else(|_| instance.host_header.clone());
        headers.insert(header::HOST, value);
    }
    let added = Added {
        varying: [
            (&X_FORWARDED_FOR, xff.as_bytes()),
            (&X_FORWARDED_HOST, host.unwrap_or_default()),
        ],
        varying_len: if host.is_some() { 2 } else { 1 },
        fixed: [
            (
                &X_FORWARDED_PROTO,
                if conn.tls { &PROTO_HTTPS } else { &PROTO_HTTP },
            ),
            (&X_CANARY_VERSION, &pool.version_header),
            (&X_CANARY_ROUTE, &pool.route_header),
        ],
    };
    // The proxy's fields replace any the client sent (one pass over the names finds
    // them; a client rarely sends any).
    if headers.keys().any(|k| PROXY_REQUEST_FIELDS.contains(&k)) {
        for name in PROXY_REQUEST_FIELDS {
            headers.remove(name);
        }
    }
    if pool.via_client() {
        for (name, value) in added.values() {
            headers.insert(name.clone(), value);
        }
    }
    (added, upstream_host)
}

/// Joins several `Cookie` fields into one, `; ` between them.
fn join_cookies(headers: &mut http::HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined = Vec::with_capacity(128);
    for crumb in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    // Made of field values joined with `; `: a valid value.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The read path drops a client's own copies of exactly the fields the proxy sets
    /// (by its own switch, `not_forwarded`), and the added fields are those.
    #[test]
    fn the_fields_the_proxy_sets_are_the_ones_a_client_cannot_pass_on() {
        for name in PROXY_REQUEST_FIELDS {
            assert!(
                canary_http1::client::Filter::drop_request_field(
                    &ProxyFields::default(),
                    name.as_str().as_bytes()
                ),
                "{name} would pass through from a client"
            );
        }
        let conn = ConnInfo::new("127.0.0.1:1".parse().unwrap());
        let pool = Pool::new(
            ("r", "v1"),
            Vec::new(),
            None,
            Arc::new(crate::metrics::VersionStats::new("r", "v1")),
            canary_config::Ejection::default(),
            None,
        );
        let instance = Instance::new("r", "v1", "127.0.0.1:2", 1).unwrap();
        let mut parts = Request::new(()).into_parts().0;
        let mut joined = None;
        let host = Some(&b"h"[..]);
        let (added, _) = build_upstream_request(
            &mut parts,
            (&conn, host, None),
            &pool,
            &instance,
            (false, &ProxyFields::default()),
            &mut joined,
        );
        let set: Vec<&HeaderName> = added
            .varying()
            .iter()
            .map(|(n, _)| *n)
            .chain(added.fixed.iter().map(|(n, _)| *n))
            .collect();
        assert_eq!(set, PROXY_REQUEST_FIELDS);
    }
}
