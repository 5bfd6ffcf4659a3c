//! Upstreams over HTTPS: a private CA trusted through `ca_file`, HTTP/2 by ALPN, and a clear 502
//! when the certificate is not trusted.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;

struct Pki {
    ca_pem: String,
    acceptor: tokio_rustls::TlsAcceptor,
}

/// A CA made for this test and a `localhost` certificate it signed.
fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "flowgate test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Pki {
        ca_pem: ca.pem(),
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    }
}

fn answer(seen: &Seen) -> Reply {
    if seen.json()["stream"] == true {
        let events = streamed_answer(&["secure", " hello"], asked_for_usage(seen));
        Reply::Sse(events.into_iter().map(|e| (Duration::ZERO, e)).collect())
    } else {
        Reply::Json(200, chat_completion("secure hello", 3, 2))
    }
}

fn provider(name: &str, port: u16, ca_file: Option<&std::path::Path>) -> String {
    let ca = ca_file
        .map(|p| format!("ca_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    format!(
        "[[providers]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"https://localhost:{port}/v1\"\nmodels = [\"{name}-*\"]\n{ca}"
    )
}

#[tokio::test]
async fn an_https_upstream_signed_by_a_private_ca_is_reached_through_ca_file() {
    let pki = pki();
    let upstream = Upstream::start_with_tls(answer, Some(pki.acceptor.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("private-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let port = upstream.addr.port();
    let extra = format!(
        "{}\n{}",
        provider("private", port, Some(&ca_file)),
        provider("untrusted", port, None)
    );
    let gateway = TestGateway::start("http://127.0.0.1:9/v1", "", &extra).await;

    let reply = gateway
        .chat(
            &[],
            json!({"model": "private-llm", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "secure hello"
    );
    assert_eq!(
        upstream.last().version,
        http::Version::HTTP_2,
        "ALPN offered h2: the pooled client must use it"
    );

    let streamed = gateway
        .chat(&[], json!({"model": "private-llm", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(streamed.status, 200);
    let events = sse_data(&streamed.body);
    assert!(
        events[0].contains("secure") && events.last().unwrap() == "[DONE]",
        "{events:?}"
    );
    let trace = gateway.trace(streamed.header("x-flowgate-trace-id")).await;
    assert_eq!(trace["usage"]["source"], "provider");
    assert_eq!(trace["response_body"]["content"], "secure hello");

    let refused = gateway
        .chat(&[], json!({"model": "untrusted-llm", "messages": []}))
        .await;
    refused.assert_error(502, "upstream_tls");
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("untrusted") && message.to_lowercase().contains("certificate"),
        "{message}"
    );
    let trace = gateway.trace(refused.header("x-flowgate-trace-id")).await;
    assert_eq!(trace["error"]["class"], "upstream_tls");
}

/// A client that trusts `ca_pem`, speaking HTTP/2 when `h2` else HTTP/1.1.
fn tls_client(
    ca_pem: &str,
    h2: bool,
) -> hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if h2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

#[tokio::test]
async fn the_listener_speaks_tls_with_alpn_h2_and_http1() {
    let pki = pki_files();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (
        dir.path().join("gateway.pem"),
        dir.path().join("gateway-key.pem"),
    );
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let server = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        cert.display(),
        key.display()
    );
    let upstream = Upstream::start(answer).await;
    let gateway = TestGateway::start(&upstream.base_url(), &server, "").await;
    let port = gateway.url.rsplit(':').next().unwrap().to_owned();
    let url = format!("https://localhost:{port}/v1/chat/completions");
    for h2 in [false, true] {
        let client = tls_client(&pki.ca_pem, h2);
        let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
        let response = client
            .request(request(
                http::Method::POST,
                &url,
                &[("content-type", "application/json")],
                body,
            ))
            .await
            .unwrap_or_else(|e| panic!("h2={h2}: {e:?}"));
        assert_eq!(response.status(), 200);
        let expected = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(response.version(), expected);
    }

    // A certificate whose key does not match fails at start with a message naming both files.
    let other = pki_files();
    std::fs::write(&key, &other.key_pem).unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[storage]\npath = \"{}\"\n",
        dir.path().join("db").display()
    );
    let mut config =
        flowgate::config::Config::from_toml(&text, flowgate::config::Source::BuiltIn).unwrap();
    config.validate().unwrap();
    let Err(err) = flowgate::server::Gateway::start(&config).await else {
        panic!("a mismatched key must not start")
    };
    let message = err.to_string();
    assert!(
        message.contains("gateway.pem") && message.contains("gateway-key.pem"),
        "{message}"
    );
}

struct PkiFiles {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki_files() -> PkiFiles {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "flowgate listener test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    PkiFiles {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}
