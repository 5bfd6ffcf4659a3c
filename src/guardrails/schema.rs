//! A JSON Schema validator for the subset structured outputs use: `type`, `enum`, `const`,
//! `properties`, `required`, `additionalProperties`, `items`, `prefixItems`, `minItems` /
//! `maxItems`, `minLength` / `maxLength`, `minimum` / `maximum` (and exclusive), `multipleOf`,
//! `anyOf` / `oneOf` / `allOf` / `not`, and local `$ref`s (`#`, `#/$defs/...`,
//! `#/definitions/...`). Other keywords (`format`, `pattern`, `description`, ...) are not
//! checked.
//!
//! Why not the `jsonschema` crate: it brings a large dependency tree (an HTTP client for remote
//! references, its own regex engines) for a schema that arrives with every request and is
//! interpreted once; OpenAI's strict mode accepts only this subset anyway.

use serde_json::{Map, Value};

/// Where the answer breaks the schema: a JSON pointer into the answer and what was expected.
/// Never the offending value itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    pub path: String,
    pub expected: String,
}

/// `$ref` chains and nesting deeper than this are refused (a schema `{"$ref": "#"}` would loop).
const MAX_DEPTH: usize = 64;

pub(crate) fn validate(schema: &Value, instance: &Value) -> Result<(), Violation> {
    Validator { root: schema }.check(schema, instance, &mut String::new(), 0)
}

struct Validator<'s> {
    root: &'s Value,
}

fn violation(path: &str, expected: impl Into<String>) -> Violation {
    Violation {
        path: if path.is_empty() {
            "/".into()
        } else {
            path.to_owned()
        },
        expected: expected.into(),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn has_type(value: &Value, wanted: &str) -> bool {
    let actual = type_name(value);
    actual == wanted || (wanted == "number" && actual == "integer")
}

impl<'s> Validator<'s> {
    fn check(
        &self,
        schema: &'s Value,
        value: &Value,
        path: &mut String,
        depth: usize,
    ) -> Result<(), Violation> {
        if depth > MAX_DEPTH {
            return Err(violation(
                path,
                "a schema nested less deeply (too many $ref hops)",
            ));
        }
        let rules = match schema {
            Value::Bool(true) => return Ok(()),
            Value::Bool(false) => return Err(violation(path, "nothing (the schema is false)")),
            Value::Object(rules) => rules,
            _ => return Ok(()),
        };
        if let Some(reference) = rules.get("$ref").and_then(Value::as_str) {
            let target = self.resolve(reference).ok_or_else(|| {
                violation(
                    path,
                    format!("a resolvable $ref (cannot resolve {reference:?})"),
                )
            })?;
            self.check(target, value, path, depth + 1)?;
        }
        self.check_type(rules, value, path)?;
        self.check_values(rules, value, path)?;
        self.check_combinators(rules, value, path, depth)?;
        match value {
            Value::Object(object) => self.check_object(rules, object, path, depth),
            Value::Array(items) => self.check_array(rules, items, path, depth),
            Value::String(text) => check_string(rules, text, path),
            Value::Number(_) => check_number(rules, value, path),
            _ => Ok(()),
        }
    }

    fn resolve(&self, reference: &str) -> Option<&'s Value> {
        let pointer = reference.strip_prefix('#')?;
        self.root.pointer(pointer)
    }

    fn check_type(
        &self,
        rules: &Map<String, Value>,
        value: &Value,
        path: &str,
    ) -> Result<(), Violation> {
        let fits = match rules.get("type") {
            None => true,
            Some(Value::String(wanted)) => has_type(value, wanted),
            Some(Value::Array(options)) => options
                .iter()
                .filter_map(Value::as_str)
                .any(|wanted| has_type(value, wanted)),
            Some(_) => true,
        };
        if fits {
            return Ok(());
        }
        let wanted = rules.get("type").map(Value::to_string).unwrap_or_default();
        Err(violation(
            path,
            format!("type {wanted}, not {}", type_name(value)),
        ))
    }

    fn check_values(
        &self,
        rules: &Map<String, Value>,
        value: &Value,
        path: &str,
    ) -> Result<(), Violation> {
        if let Some(options) = rules.get("enum").and_then(Value::as_array) {
            if !options.iter().any(|option| equal(option, value)) {
                return Err(violation(path, "one of the enum values"));
            }
        }
        if let Some(constant) = rules.get("const") {
            if !equal(constant, value) {
                return Err(violation(path, "the const value"));
            }
        }
        Ok(())
    }

    fn check_combinators(
        &self,
        rules: &'s Map<String, Value>,
        value: &Value,
        path: &mut String,
        depth: usize,
    ) -> Result<(), Violation> {
        let schemas = |key: &str| rules.get(key).and_then(Value::as_array);
        if let Some(all) = schemas("allOf") {
            for schema in all {
                self.check(schema, value, path, depth + 1)?;
            }
        }
        if let Some(any) = schemas("anyOf") {
            if !any
                .iter()
                .any(|s| self.check(s, value, &mut path.clone(), depth + 1).is_ok())
            {
                return Err(violation(path, "a match for one of anyOf"));
            }
        }
        if let Some(one) = schemas("oneOf") {
            let matching = one
                .iter()
                .filter(|s| self.check(s, value, &mut path.clone(), depth + 1).is_ok())
                .count();
            if matching != 1 {
                return Err(violation(
                    path,
                    format!("a match for exactly one of oneOf, not {matching}"),
                ));
            }
        }
        if let Some(not) = rules.get("not") {
            if self.check(not, value, &mut path.clone(), depth + 1).is_ok() {
                return Err(violation(path, "no match for the not schema"));
            }
        }
        Ok(())
    }

    fn check_object(
        &self,
        rules: &'s Map<String, Value>,
        object: &Map<String, Value>,
        path: &mut String,
        depth: usize,
    ) -> Result<(), Violation> {
        if let Some(required) = rules.get("required").and_then(Value::as_array) {
            if let Some(missing) = required
                .iter()
                .filter_map(Value::as_str)
                .find(|key| !object.contains_key(*key))
            {
                return Err(violation(path, format!("required property {missing:?}")));
            }
        }
        let properties = rules.get("properties").and_then(Value::as_object);
        let additional = rules.get("additionalProperties");
        for (key, child) in object {
            let schema = match properties.and_then(|p| p.get(key)) {
                Some(schema) => schema,
                None => match additional {
                    Some(Value::Bool(false)) => {
                        return Err(violation(
                            path,
                            format!("no property {key:?} (additionalProperties is false)"),
                        ));
                    }
                    Some(schema) => schema,
                    None => continue,
                },
            };
            let len = path.len();
            path.push('/');
            path.push_str(&key.replace('~', "~0").replace('/', "~1"));
            self.check(schema, child, path, depth + 1)?;
            path.truncate(len);
        }
        Ok(())
    }

    fn check_array(
        &self,
        rules: &'s Map<String, Value>,
        items: &[Value],
        path: &mut String,
        depth: usize,
    ) -> Result<(), Violation> {
        let bound = |key: &str| rules.get(key).and_then(Value::as_u64);
        if bound("minItems").is_some_and(|min| (items.len() as u64) < min) {
            return Err(violation(
                path,
                format!("at least {} items", bound("minItems").unwrap_or(0)),
            ));
        }
        if bound("maxItems").is_some_and(|max| items.len() as u64 > max) {
            return Err(violation(
                path,
                format!("at most {} items", bound("maxItems").unwrap_or(0)),
            ));
        }
        let prefix = rules.get("prefixItems").and_then(Value::as_array);
        for (index, item) in items.iter().enumerate() {
            let schema = match prefix.and_then(|p| p.get(index)) {
                Some(schema) => schema,
                None => match rules.get("items") {
                    Some(schema) => schema,
                    None => continue,
                },
            };
            let len = path.len();
            path.push('/');
            path.push_str(&index.to_string());
            self.check(schema, item, path, depth + 1)?;
            path.truncate(len);
        }
        Ok(())
    }
}

fn check_string(rules: &Map<String, Value>, text: &str, path: &str) -> Result<(), Violation> {
    let chars = text.chars().count() as u64;
    if let Some(min) = rules
        .get("minLength")
        .and_then(Value::as_u64)
        .filter(|min| chars < *min)
    {
        return Err(violation(path, format!("at least {min} characters")));
    }
    if let Some(max) = rules
        .get("maxLength")
        .and_then(Value::as_u64)
        .filter(|max| chars > *max)
    {
        return Err(violation(path, format!("at most {max} characters")));
    }
    Ok(())
}

fn check_number(rules: &Map<String, Value>, value: &Value, path: &str) -> Result<(), Violation> {
    let Some(n) = value.as_f64() else {
        return Ok(());
    };
    let limit = |key: &str| rules.get(key).and_then(Value::as_f64);
    let failed = [
        ("minimum", limit("minimum").filter(|m| n < *m), ">="),
        ("maximum", limit("maximum").filter(|m| n > *m), "<="),
        (
            "exclusiveMinimum",
            limit("exclusiveMinimum").filter(|m| n <= *m),
            ">",
        ),
        (
            "exclusiveMaximum",
            limit("exclusiveMaximum").filter(|m| n >= *m),
            "<",
        ),
    ]
    .into_iter()
    .find_map(|(_, bound, op)| bound.map(|b| format!("a number {op} {b}")));
    if let Some(expected) = failed {
        return Err(violation(path, expected));
    }
    if let Some(step) = limit("multipleOf").filter(|s| *s > 0.0) {
        let ratio = n / step;
        if (ratio - ratio.round()).abs() > 1e-9 {
            return Err(violation(path, format!("a multiple of {step}")));
        }
    }
    Ok(())
}

/// JSON equality with numbers compared by value (`1` equals `1.0`).
fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| equal(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| equal(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn structured_output_schemas() {
        let schema = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "age": {"type": "integer", "minimum": 0},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 2},
                "kind": {"enum": ["a", "b"]},
                "next": {"anyOf": [{"type": "null"}, {"$ref": "#"}]}
            },
            "required": ["name", "age"],
            "additionalProperties": false,
            "$defs": {"tag": {"type": "string", "maxLength": 3}}
        });
        let cases = [
            (json!({"name": "x", "age": 3}), None),
            (
                json!({"name": "x", "age": 3.0, "tags": ["ab"], "kind": "a", "next": null}),
                None,
            ),
            (
                json!({"name": "x", "age": 1, "next": {"name": "y", "age": 2}}),
                None,
            ),
            (
                json!({"name": "x"}),
                Some(("/", "required property \"age\"")),
            ),
            (
                json!({"name": "x", "age": -1}),
                Some(("/age", "a number >= 0")),
            ),
            (
                json!({"name": "x", "age": 1.5}),
                Some(("/age", "type \"integer\", not number")),
            ),
            (
                json!({"name": "x", "age": 1, "tags": ["abcd"]}),
                Some(("/tags/0", "at most 3 characters")),
            ),
            (
                json!({"name": "x", "age": 1, "extra": 1}),
                Some(("/", "no property \"extra\" (additionalProperties is false)")),
            ),
            (
                json!({"name": "x", "age": 1, "kind": "c"}),
                Some(("/kind", "one of the enum values")),
            ),
            (
                json!({"name": "x", "age": 1, "next": {"name": ""}}),
                Some(("/next", "a match for one of anyOf")),
            ),
            (json!([1]), Some(("/", "type \"object\", not array"))),
        ];
        for (instance, expected) in cases {
            let result = validate(&schema, &instance);
            let got = result
                .as_ref()
                .err()
                .map(|v| (v.path.as_str(), v.expected.as_str()));
            assert_eq!(got, expected, "{instance}");
        }
    }

    #[test]
    fn reference_loops_end() {
        let schema = json!({"$ref": "#"});
        let err = validate(&schema, &json!(1)).unwrap_err();
        assert!(err.expected.contains("$ref"), "{err:?}");
        assert!(validate(&json!({"$ref": "#/nowhere"}), &json!(1)).is_err());
    }
}
