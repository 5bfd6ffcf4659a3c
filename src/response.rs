//! Response bodies and builders shared by the proxy, the admin API and the server.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use serde::Serialize;

/// Errors a response body can end with (an upstream that broke off, a timeout).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response the gateway sends has this body type.
pub type ResponseBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> ResponseBody {
    full(Bytes::new())
}

/// A JSON response. Serialising our own types cannot fail; if it ever did, the client gets a 500.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    match serde_json::to_vec(value) {
        Ok(body) => with_content_type(status, body, "application/json"),
        Err(err) => with_content_type(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                r#"{{"error":{{"message":"could not encode response: {err}","type":"server_error","code":"internal_error"}}}}"#
            ),
            "application/json",
        ),
    }
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    with_content_type(status, body, "text/plain; charset=utf-8")
}

pub fn with_content_type(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<ResponseBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
