//! An `http::Request` as the core's routing decision sees it.
//!
//! Header lookups go through the request's `HeaderMap` by name (no copy, no
//! allocation); the client address comes from axum's `ConnectInfo<SocketAddr>` or a
//! bare `SocketAddr` in the request's extensions, when the server put one there.

use std::net::{IpAddr, SocketAddr};

use axum::extract::ConnectInfo;
use canary_core::routing::{cookie_value, query_value};
use canary_core::RequestFacts;
use http::Request;

/// The facts of one request, borrowed from it.
pub(crate) struct Facts<'a, B>(pub(crate) &'a Request<B>);

impl<B> RequestFacts for Facts<'_, B> {
    #[inline]
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0.headers().get(name).map(http::HeaderValue::as_bytes)
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        self.0
            .headers()
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| cookie_value(v, name))
    }

    fn query(&self, name: &str) -> Option<&str> {
        query_value(self.0.uri().query()?, name)
    }

    fn source_ip(&self) -> Option<IpAddr> {
        let ext = self.0.extensions();
        ext.get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .or_else(|| ext.get::<SocketAddr>().copied())
            .map(|a| a.ip().to_canonical())
    }
}
