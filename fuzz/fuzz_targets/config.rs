//! Config text (the operator's file, so "untrusted" in the sense of typo'd or hostile) must never
//! panic: parse errors and validation errors are fine. Also `${VAR}` expansion on its own.
#![no_main]

use flowgate::config::{expand_env, Config, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(mut config) = Config::from_toml(text, Source::BuiltIn) {
        let valid = config.validate().is_ok();
        if valid {
            // A valid config always has a provider (the mock when none was named) and says
            // where it came from.
            assert!(
                !config.providers.is_empty(),
                "validated config without providers"
            );
            assert_eq!(config.source(), Source::BuiltIn);
            // Validating twice is idempotent.
            assert!(config.validate().is_ok(), "validate() not idempotent");
        }
    }

    // Nothing set: `${VAR}` is an error, `${VAR:-d}` the default.
    let unset = expand_env(text, |_| None);
    // Everything set to a fixed value.
    let set = expand_env(text, |_| Some("value".to_owned()));
    // Set to something that itself looks like a reference: it must not be expanded again.
    let nested = expand_env(text, |_| Some("${X}$$".to_owned()));
    // Set to the empty string: treated as unset.
    let empty = expand_env(text, |_| Some(String::new()));

    if !text.contains('$') {
        for result in [&unset, &set, &nested, &empty] {
            assert_eq!(result.as_deref(), Ok(text), "text without '$' changed");
        }
    }
    // Empty values behave exactly like unset ones.
    assert_eq!(unset, empty, "empty value differs from unset");
    // Whether expansion succeeds never depends on the value (only on syntax and presence), and a
    // syntax error is one whatever the environment.
    assert_eq!(set.is_ok(), nested.is_ok(), "success depends on the value");
    if set.is_err() {
        assert!(unset.is_err(), "syntax error only when variables are set");
    }
});
