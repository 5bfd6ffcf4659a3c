//! OpenAI ⇄ Anthropic translation, table-driven from the fixtures in `tests/fixtures/anthropic/`
//! (shapes from both public API references): requests one way, answers, streams and errors the
//! other.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use flowgate::providers::anthropic::{error, request, response, stream};
use http::StatusCode;
use serde_json::Value;

const CREATED: u64 = 1_700_000_000;

fn fixtures(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/anthropic")
        .join(dir)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `*.json` files of a fixture directory, sorted, so a new fixture is a new case.
fn cases(dir: &str) -> Vec<(String, Value)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixtures(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {dir}");
    paths
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                read_json(&p),
            )
        })
        .collect()
}

#[test]
fn requests_translate_to_anthropic() {
    for (name, case) in cases("requests") {
        let model = case["anthropic"]["model"].as_str().unwrap();
        let body = case["openai"].to_string();
        let translated =
            request::translate(body.as_bytes(), model).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            translated.body, case["anthropic"],
            "{name}: {}",
            case["description"]
        );
        let asked_usage = case["openai"]
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        assert_eq!(translated.include_usage, asked_usage, "{name}");
        assert_eq!(
            translated.stream,
            case["openai"]["stream"] == Value::Bool(true),
            "{name}"
        );
    }
}

#[test]
fn requests_anthropic_cannot_express_are_refused_naming_the_parameter() {
    let table = read_json(&fixtures("rejected_requests.json"));
    for case in table.as_array().unwrap() {
        let body = case["openai"].to_string();
        let Err(rejection) = request::translate(body.as_bytes(), "claude-haiku-4-5") else {
            panic!("accepted: {body}")
        };
        assert_eq!(rejection.code(), case["code"], "{body}: {rejection}");
        assert_eq!(
            rejection.param().map(str::to_owned),
            case["param"].as_str().map(str::to_owned),
            "{body}: {rejection}"
        );
        let named = case["param"]
            .as_str()
            .or_else(|| {
                case["openai"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .find(|k| *k == "made_up_option")
                    .map(String::as_str)
            })
            .unwrap();
        assert!(
            rejection.to_string().contains(named),
            "the message must name {named}: {rejection}"
        );
    }
}

#[test]
fn responses_translate_to_chat_completions() {
    for (name, case) in cases("responses") {
        let body = case["anthropic"].to_string();
        let translated = response::to_chat_completion(body.as_bytes(), CREATED)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            translated, case["openai"],
            "{name}: {}",
            case["description"]
        );
    }
}

#[test]
fn errors_keep_their_meaning_and_status() {
    let table = read_json(&fixtures("errors.json"));
    for case in table.as_array().unwrap() {
        let body = match &case["anthropic"] {
            Value::String(raw) => raw.clone(),
            json => json.to_string(),
        };
        let status = StatusCode::from_u16(case["status"].as_u64().unwrap() as u16).unwrap();
        let (client_status, client_body) = error::to_openai(status, body.as_bytes());
        assert_eq!(
            client_status.as_u16() as u64,
            case["openai_status"],
            "{body}"
        );
        assert_eq!(client_body, case["openai"], "{body}");
    }
}

/// The `data:` payloads of an SSE text: JSON events parsed, others (`[DONE]`) as strings.
fn payloads(sse: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(sse)
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|event| {
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or_else(|| panic!("no data in {event:?}"));
            serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.to_owned()))
        })
        .collect()
}

/// Runs a stream through the translator, cut into pieces at `cuts` (byte offsets).
fn translate_stream(input: &[u8], include_usage: bool, cuts: &[usize]) -> (Vec<u8>, bool) {
    let mut translator = stream::Translator::new(include_usage, CREATED);
    let mut splitter = flowgate::sse::EventSplitter::default();
    let mut out = BytesMut::new();
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&input.len())) {
        splitter.push(&input[from..to]);
        from = to;
        while let Some(event) = splitter.next_event() {
            translator.event(&event, &mut out).unwrap();
        }
    }
    (out.to_vec(), translator.ended())
}

const STREAMS: [(&str, bool, &str); 4] = [
    ("text", false, "text.openai.sse"),
    ("text", true, "text.usage.openai.sse"),
    ("tool_use", true, "tool_use.usage.openai.sse"),
    ("error", false, "error.openai.sse"),
];

#[test]
fn streams_translate_event_by_event() {
    for (input, include_usage, expected) in STREAMS {
        let anthropic =
            std::fs::read(fixtures("streams").join(format!("{input}.anthropic.sse"))).unwrap();
        let openai = std::fs::read(fixtures("streams").join(expected)).unwrap();
        let (out, ended) = translate_stream(&anthropic, include_usage, &[]);
        assert_eq!(payloads(&out), payloads(&openai), "{input} → {expected}");
        assert!(ended, "{input}: message_stop or error ends the stream");
    }
}

#[test]
fn streams_translate_the_same_however_the_bytes_are_cut() {
    let anthropic = std::fs::read(fixtures("streams/tool_use.anthropic.sse")).unwrap();
    let expected = payloads(&std::fs::read(fixtures("streams/tool_use.usage.openai.sse")).unwrap());
    for cut in (1..anthropic.len()).step_by(7) {
        let (out, _) = translate_stream(&anthropic, true, &[cut / 2, cut]);
        assert_eq!(payloads(&out), expected, "cut at {} and {cut}", cut / 2);
    }
}

#[test]
fn each_event_is_translated_as_it_arrives() {
    // The first text delta must come out before anything after it has arrived.
    let anthropic = std::fs::read_to_string(fixtures("streams/text.anthropic.sse")).unwrap();
    let hello = anthropic.find("\"Hello\"").unwrap();
    let end_of_hello_event = hello + anthropic[hello..].find("\n\n").unwrap() + 2;
    let (out, ended) = translate_stream(&anthropic.as_bytes()[..end_of_hello_event], false, &[]);
    let events = payloads(&out);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1]["choices"][0]["delta"]["content"], "Hello");
    assert!(!ended);
}

#[test]
fn a_stream_that_is_not_json_is_an_error() {
    let mut translator = stream::Translator::new(false, CREATED);
    let mut out = BytesMut::new();
    assert!(translator
        .event(b"event: message_start\ndata: {not json\n\n", &mut out)
        .is_err());
}
