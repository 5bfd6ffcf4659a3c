//! The pooled upstream HTTP client: keep-alive, HTTP/2 where the upstream offers it (ALPN),
//! rustls with the `ring` provider, webpki roots plus a provider's own `ca_file`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::config::Config;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What every upstream client shares.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connect_timeout: Duration,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            connect_timeout: Duration::from_millis(config.server.connect_timeout_ms),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read ca_file {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// Builds a client trusting the public web roots and, when given, the CAs in `ca_file`.
pub fn build(
    settings: &Settings,
    ca_file: Option<&std::path::Path>,
) -> Result<HttpClient, ClientError> {
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|err| ClientError::CaFile {
                path: shown.clone(),
                detail: err.to_string(),
            })?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| ClientError::CaFile {
                path: shown.clone(),
                detail: err.to_string(),
            })?;
        if certs.is_empty() {
            return Err(ClientError::CaFile {
                path: shown,
                detail: "no PEM certificate in it".into(),
            });
        }
        for cert in certs {
            roots.add(cert).map_err(|err| ClientError::CaFile {
                path: shown.clone(),
                detail: err.to_string(),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| ClientError::Tls(err.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    // HTTP/2 pings find a half-dead pooled connection before a call waits on it.
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .http2_keep_alive_while_idle(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector))
}

/// Whether a client error came from the TLS layer (an untrusted certificate, say).
pub fn is_tls_error(err: &(dyn std::error::Error + 'static)) -> bool {
    if err.downcast_ref::<rustls::Error>().is_some() {
        return true;
    }
    // `io::Error::source` skips the error it wraps, and the TLS connector wraps twice: look
    // inside io errors explicitly.
    if let Some(inner) = err
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        if is_tls_error(inner) {
            return true;
        }
    }
    err.source().is_some_and(is_tls_error)
}

/// The innermost cause, which is the one worth showing (`connection refused`, `UnknownIssuer`).
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}
