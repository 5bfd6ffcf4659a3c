//! Header hygiene of a proxy: hop-by-hop headers (RFC 9110 §7.6.1) stay on their hop, tagging
//! headers never reach the provider, and bodies go upstream uncompressed so they can be metered.

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The client's headers made fit for the upstream.
pub fn for_upstream(mut headers: HeaderMap) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    crate::context::strip_tagging_headers(&mut headers);
    // The client's host names the gateway; the client library sets the upstream's from the URL.
    headers.remove(header::HOST);
    // The body may be rewritten; hyper sets the length of what is actually sent.
    headers.remove(header::CONTENT_LENGTH);
    // Compressed answers could not be metered; the gateway asks for identity.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    headers
}

/// The upstream's response headers made fit for the client.
pub fn for_client(mut headers: HeaderMap, body_rewritten: bool) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    if body_rewritten {
        headers.remove(header::CONTENT_LENGTH);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("authorization", "Bearer sk-client"),
            ("x-flowgate-experiment", "e"),
            ("host", "gateway:8080"),
            ("content-length", "12"),
            ("accept-encoding", "gzip"),
            ("openai-organization", "org-1"),
        ] {
            headers.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = for_upstream(headers);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["accept-encoding", "authorization", "openai-organization"]
        );
        assert_eq!(out[header::ACCEPT_ENCODING], "identity");
    }
}
