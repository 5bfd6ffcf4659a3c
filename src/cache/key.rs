//! Hashing a JSON body for the cache key as it is parsed: no tree is built, and object members
//! are combined so that their order does not matter.
//!
//! Every value hashes to two 64-bit lanes of keyed SipHash. An object's lanes are the wrapping
//! sum of its members' hashes (a member hashes its key's and its value's hashes together), so
//! `{"a":1,"b":2}` and `{"b":2,"a":1}` agree; arrays hash their elements in order. The keys are
//! secret to the process, so nobody can pick two bodies whose sums collide.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The two lanes of a hashed value.
pub type Lanes = [u64; 2];

/// Tags that keep values of different kinds apart (`"1"` vs `1`, `[]` vs `{}`).
const NULL: u8 = 0;
const BOOL: u8 = 1;
const NUMBER: u8 = 2;
const STRING: u8 = 3;
const ARRAY: u8 = 4;
const OBJECT: u8 = 5;
const MEMBER: u8 = 6;

#[derive(Clone, Copy)]
pub struct BodyHasher<'k> {
    keys: &'k (RandomState, RandomState),
}

impl<'k> BodyHasher<'k> {
    pub fn new(keys: &'k (RandomState, RandomState)) -> BodyHasher<'k> {
        BodyHasher { keys }
    }

    fn hash(&self, tag: u8, write: impl Fn(&mut dyn Hasher)) -> Lanes {
        let mut lanes = [self.keys.0.build_hasher(), self.keys.1.build_hasher()];
        for hasher in &mut lanes {
            hasher.write_u8(tag);
            write(hasher);
        }
        [lanes[0].finish(), lanes[1].finish()]
    }

    fn bytes(&self, tag: u8, bytes: &[u8]) -> Lanes {
        self.hash(tag, |h| {
            h.write_usize(bytes.len());
            h.write(bytes);
        })
    }

    fn pair(&self, tag: u8, first: Lanes, second: Lanes) -> Lanes {
        self.hash(tag, |h| {
            first
                .iter()
                .chain(&second)
                .for_each(|lane| h.write_u64(*lane));
        })
    }

    /// The hash of a JSON object body without its members named in `skip`; `None` when the
    /// body is not a JSON object.
    pub fn object(&self, body: &[u8], skip: &[&str]) -> Option<Lanes> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let lanes = TopLevel {
            hasher: *self,
            skip,
        }
        .deserialize(&mut deserializer)
        .ok()?;
        deserializer.end().ok()?;
        Some(lanes)
    }

    /// Folds more parts into a hash (endpoint, provider, credential, ...).
    pub fn extend(&self, lanes: Lanes, part: &[u8]) -> Lanes {
        self.pair(MEMBER, lanes, self.bytes(STRING, part))
    }
}

/// Any JSON value.
struct Node<'k>(BodyHasher<'k>);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Lanes;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Lanes, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Lanes;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Lanes, E> {
        Ok(self.0.bytes(NULL, &[]))
    }

    fn visit_bool<E>(self, value: bool) -> Result<Lanes, E> {
        Ok(self.0.bytes(BOOL, &[u8::from(value)]))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Lanes, E> {
        Ok(self.0.bytes(NUMBER, &i128::from(value).to_le_bytes()))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Lanes, E> {
        Ok(self.0.bytes(NUMBER, &i128::from(value).to_le_bytes()))
    }

    /// `1.0` is `1`, as a provider reads it.
    fn visit_f64<E>(self, value: f64) -> Result<Lanes, E> {
        if value.fract() == 0.0 && value.abs() < 9.0e15 {
            return Ok(self
                .0
                .bytes(NUMBER, &i128::from(value as i64).to_le_bytes()));
        }
        Ok(self.0.bytes(NUMBER, &value.to_bits().to_le_bytes()))
    }

    fn visit_str<E>(self, value: &str) -> Result<Lanes, E> {
        Ok(self.0.bytes(STRING, value.as_bytes()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Lanes, A::Error> {
        let mut lanes = self.0.bytes(ARRAY, &[]);
        while let Some(item) = seq.next_element_seed(Node(self.0))? {
            lanes = self.0.pair(ARRAY, lanes, item);
        }
        Ok(lanes)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Lanes, A::Error> {
        let mut members = Members::default();
        while let Some(name) = map.next_key_seed(Node(self.0))? {
            let value = map.next_value_seed(Node(self.0))?;
            members.add(self.0.pair(MEMBER, name, value));
        }
        Ok(members.finish(self.0))
    }
}

/// The members of an object, summed: the order they came in does not count.
#[derive(Default)]
struct Members {
    sum: Lanes,
    count: u64,
}

impl Members {
    fn add(&mut self, member: Lanes) {
        self.sum[0] = self.sum[0].wrapping_add(member[0]);
        self.sum[1] = self.sum[1].wrapping_add(member[1]);
        self.count += 1;
    }

    fn finish(self, hasher: BodyHasher<'_>) -> Lanes {
        hasher.pair(OBJECT, self.sum, [self.count, 0])
    }
}

/// The body's object, with the members that only say how to deliver the answer left out.
struct TopLevel<'k, 's> {
    hasher: BodyHasher<'k>,
    skip: &'s [&'s str],
}

impl<'de> DeserializeSeed<'de> for TopLevel<'_, '_> {
    type Value = Lanes;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Lanes, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_, '_> {
    type Value = Lanes;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Lanes, A::Error> {
        let mut members = Members::default();
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if self.skip.contains(&name.as_ref()) {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let value = map.next_value_seed(Node(self.hasher))?;
            let name = self.hasher.bytes(STRING, name.as_bytes());
            members.add(self.hasher.pair(MEMBER, name, value));
        }
        Ok(members.finish(self.hasher))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_of_members_does_not_count_but_everything_else_does() {
        let keys = (RandomState::new(), RandomState::new());
        let hasher = BodyHasher::new(&keys);
        let hash = |body: &str| hasher.object(body.as_bytes(), &["stream"]);
        let base = hash(r#"{"a":1,"b":{"x":[1,2],"y":"s"}}"#);
        assert!(base.is_some());
        let same = [
            r#"{"b":{"y":"s","x":[1,2]},"a":1}"#,
            r#" { "a" : 1 , "b" : { "x" : [ 1 , 2 ] , "y" : "s" } , "stream" : true } "#,
            r#"{"a":1,"b":{"x":[1,2],"y":"\u0073"}}"#,
            r#"{"a":1.0,"b":{"x":[1,2.0],"y":"s"}}"#,
        ];
        for body in same {
            assert_eq!(hash(body), base, "{body}");
        }
        let different = [
            r#"{"a":1,"b":{"x":[2,1],"y":"s"}}"#,
            r#"{"a":"1","b":{"x":[1,2],"y":"s"}}"#,
            r#"{"a":1,"b":{"x":[1,2],"y":"s"},"c":null}"#,
            r#"{"a":1,"b":{"x":[1,2]},"y":"s"}"#,
            r#"{"a":1,"b":{"x":[[1],2],"y":"s"}}"#,
            r#"{"a":1,"b":{"x":[1,2],"y":"s","y2":"s"}}"#,
            r#"{"a":true,"b":{"x":[1,2],"y":"s"}}"#,
            r#"{"a":1.5,"b":{"x":[1,2],"y":"s"}}"#,
        ];
        for body in different {
            assert_ne!(hash(body), base, "{body}");
        }
        // Two members swapping values is a different object.
        assert_ne!(hash(r#"{"a":1,"b":2}"#), hash(r#"{"a":2,"b":1}"#));
        for bad in ["[1]", "1", "\"s\"", "{", "{} {}", ""] {
            assert_eq!(hash(bad), None, "{bad}");
        }
    }
}
