//! Azure OpenAI's URL form: model calls go to a deployment,
//! `{base}/openai/deployments/{deployment}/chat/completions?api-version=...`, where the deployment
//! is the model name the call was routed with. Other paths go to `{base}/openai/...` with the same
//! `api-version`. The `kind = "azure"` provider is the `openai` adapter with this URL and the
//! `api-key` header.

use super::Endpoint;

/// The upstream URL of one call. `base` has no trailing slash; `path_and_query` is the path after
/// `/v1` with the client's query.
pub fn url(
    base: &str,
    endpoint: Endpoint,
    deployment: Option<&str>,
    path_and_query: &str,
    api_version: &str,
) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let deployed = matches!(
        endpoint,
        Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings
    );
    let mut url = match deployment.filter(|d| deployed && !d.is_empty()) {
        Some(deployment) => format!(
            "{base}/openai/deployments/{}{path}",
            encode_segment(deployment)
        ),
        None => format!("{base}/openai{path}"),
    };
    let client_query = query.filter(|q| !q.is_empty());
    let has_version =
        client_query.is_some_and(|q| q.split('&').any(|pair| pair.starts_with("api-version=")));
    url.push('?');
    if let Some(query) = client_query {
        url.push_str(query);
        if !has_version {
            url.push('&');
        }
    }
    if !has_version {
        url.push_str("api-version=");
        url.push_str(&encode_segment(api_version));
    }
    url
}

/// The base URL as configured, without a trailing `/` or `/openai` (both forms are common).
pub fn normalize_base(base: &str) -> String {
    let trimmed = base.trim_end_matches('/');
    trimmed
        .strip_suffix("/openai")
        .unwrap_or(trimmed)
        .to_owned()
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so a model name cannot
/// change the path (`../`) or the query.
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_table() {
        let base = "https://res.openai.azure.com";
        let cases = [
            (
                Endpoint::ChatCompletions,
                Some("gpt-4o-mini"),
                "/chat/completions",
                "https://res.openai.azure.com/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21",
            ),
            (
                Endpoint::Embeddings,
                Some("emb"),
                "/embeddings",
                "https://res.openai.azure.com/openai/deployments/emb/embeddings?api-version=2024-10-21",
            ),
            (
                Endpoint::Responses,
                Some("gpt-4o"),
                "/responses",
                "https://res.openai.azure.com/openai/responses?api-version=2024-10-21",
            ),
            (
                Endpoint::Passthrough,
                None,
                "/files?limit=2",
                "https://res.openai.azure.com/openai/files?limit=2&api-version=2024-10-21",
            ),
            (
                Endpoint::Models,
                None,
                "/models?api-version=2025-01-01",
                "https://res.openai.azure.com/openai/models?api-version=2025-01-01",
            ),
            (
                Endpoint::ChatCompletions,
                Some("../x?y"),
                "/chat/completions",
                "https://res.openai.azure.com/openai/deployments/..%2Fx%3Fy/chat/completions?api-version=2024-10-21",
            ),
        ];
        for (endpoint, deployment, path, expected) in cases {
            assert_eq!(
                url(base, endpoint, deployment, path, "2024-10-21"),
                expected,
                "{path}"
            );
        }
    }

    #[test]
    fn base_forms() {
        for base in [
            "https://r.openai.azure.com",
            "https://r.openai.azure.com/",
            "https://r.openai.azure.com/openai/",
        ] {
            assert_eq!(normalize_base(base), "https://r.openai.azure.com", "{base}");
        }
    }
}
