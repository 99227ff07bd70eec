//! `http_redirect`: a plain-HTTP listener that answers every request with a
//! `308 Permanent Redirect` to the same host and target on the HTTPS listener.
//!
//! 308 rather than 301: a client must repeat the method and body (a POST stays a
//! POST). The host is the request's own (`Host`, or the authority of an absolute
//! target), its port replaced by the HTTPS listener's (left out when 443). A request
//! without a host gets 400: there is nowhere to send it.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves redirects to HTTPS on port `https_port` until `stop` resolves.
pub async fn serve(listener: TcpListener, https_port: u16, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "http_redirect accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => return,
        };
        tokio::spawn(async move {
            let service =
                service_fn(
                    move |req| async move { Ok::<_, Infallible>(redirect(&req, https_port)) },
                );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            let _ = conn.await;
        });
    }
}

/// The answer to one request.
fn redirect(req: &Request<Incoming>, https_port: u16) -> Response<Full<Bytes>> {
    let host = req
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            let h = h.parse::<http::uri::Authority>().ok()?;
            Some(h.host().to_string())
        })
        .filter(|h| !h.is_empty());
    let Some(host) = host else {
        return text(
            StatusCode::BAD_REQUEST,
            "a redirect to HTTPS needs a Host\n",
        );
    };
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let location = if https_port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{https_port}{target}")
    };
    let mut resp = text(StatusCode::PERMANENT_REDIRECT, "redirecting to HTTPS\n");
    match header::HeaderValue::try_from(location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => text(StatusCode::BAD_REQUEST, "bad request\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
