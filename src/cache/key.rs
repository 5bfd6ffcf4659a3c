//! The digest of a JSON request body for the cache key, computed while the body is parsed:
//! no value tree is built (Criterion, 1 KB chat body: 1.56 µs, 2.15 µs when a tree was built).
//! Object members hash alike in any order, and `1.0` hashes like `1`, as a provider reads them.

use std::collections::hash_map::{DefaultHasher, RandomState};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Two independent 64-bit hashes (per-process random keys) of one value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Digest(pub u64, pub u64);

/// The hash keys of the two lanes.
pub(super) type Lanes = (RandomState, RandomState);

/// The digest of the JSON object `body` without its top-level members named in `skip`; `None`
/// when `body` is not one JSON object.
pub(super) fn object_digest(lanes: &Lanes, body: &[u8], skip: &[&str]) -> Option<Digest> {
    let mut parser = serde_json::Deserializer::from_slice(body);
    let mut out = (lanes.0.build_hasher(), lanes.1.build_hasher());
    let seed = Hashing {
        lanes,
        skip,
        out: &mut out,
    };
    serde::Deserializer::deserialize_map(&mut parser, seed).ok()?;
    parser.end().ok()?;
    Some(Digest(out.0.finish(), out.1.finish()))
}

/// Hashes what `write` writes in both lanes.
pub(super) fn digest(lanes: &Lanes, mut write: impl FnMut(&mut DefaultHasher)) -> Digest {
    let mut first = lanes.0.build_hasher();
    write(&mut first);
    let mut second = lanes.1.build_hasher();
    write(&mut second);
    Digest(first.finish(), second.finish())
}

type Pair = (DefaultHasher, DefaultHasher);

/// Hashes one value into `out` as it is parsed. Only an object's members get hashers of their
/// own (their order must not matter); everything else streams into its parent's. `skip` names
/// members left out of an object (the top level's only).
struct Hashing<'a, 'h> {
    lanes: &'a Lanes,
    skip: &'a [&'a str],
    out: &'h mut Pair,
}

impl Hashing<'_, '_> {
    fn write(&mut self, mut write: impl FnMut(&mut DefaultHasher)) {
        write(&mut self.out.0);
        write(&mut self.out.1);
    }

    fn integer(mut self, value: i64) {
        self.write(|h| {
            h.write_u8(2);
            value.hash(h);
        })
    }
}

impl<'de> DeserializeSeed<'de> for Hashing<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, parser: D) -> Result<(), D::Error> {
        parser.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Hashing<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(mut self) -> Result<(), E> {
        self.write(|h| h.write_u8(0));
        Ok(())
    }

    fn visit_bool<E>(mut self, value: bool) -> Result<(), E> {
        self.write(|h| {
            h.write_u8(1);
            value.hash(h);
        });
        Ok(())
    }

    fn visit_i64<E>(self, value: i64) -> Result<(), E> {
        self.integer(value);
        Ok(())
    }

    fn visit_u64<E>(mut self, value: u64) -> Result<(), E> {
        match i64::try_from(value) {
            Ok(value) => self.integer(value),
            // Tagged apart from the integers that fit i64: -1 and u64::MAX share their bits.
            Err(_) => self.write(|h| {
                h.write_u8(6);
                value.hash(h);
            }),
        }
        Ok(())
    }

    fn visit_f64<E>(mut self, value: f64) -> Result<(), E> {
        // `1.0` is `1`, as a provider reads it.
        if value.fract() == 0.0 && value.abs() < 9.0e15 {
            self.integer(value as i64);
        } else {
            // Tagged apart from the integers: 1.5's bits are also an integer's.
            self.write(|h| {
                h.write_u8(7);
                value.to_bits().hash(h);
            });
        }
        Ok(())
    }

    fn visit_str<E>(mut self, value: &str) -> Result<(), E> {
        self.write(|h| {
            h.write_u8(3);
            value.hash(h);
        });
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut items: A) -> Result<(), A::Error> {
        self.write(|h| h.write_u8(4));
        let mut count = 0u64;
        loop {
            let item = Hashing {
                lanes: self.lanes,
                skip: &[],
                out: &mut *self.out,
            };
            if items.next_element_seed(item)?.is_none() {
                break;
            }
            count += 1;
        }
        self.write(|h| h.write_u64(count));
        Ok(())
    }

    /// Each member (name, then value) is hashed alone and the members' hashes are summed: the
    /// order they came in does not matter.
    fn visit_map<A: MapAccess<'de>>(mut self, mut members: A) -> Result<(), A::Error> {
        let mut sum = Digest::default();
        let mut count = 0u64;
        loop {
            let mut member = (self.lanes.0.build_hasher(), self.lanes.1.build_hasher());
            let name = MemberName {
                skip: self.skip,
                out: &mut member,
            };
            let Some(kept) = members.next_key_seed(name)? else {
                break;
            };
            if !kept {
                members.next_value::<IgnoredAny>()?;
                continue;
            }
            members.next_value_seed(Hashing {
                lanes: self.lanes,
                skip: &[],
                out: &mut member,
            })?;
            sum = Digest(
                sum.0.wrapping_add(member.0.finish()),
                sum.1.wrapping_add(member.1.finish()),
            );
            count += 1;
        }
        self.write(|h| {
            h.write_u8(5);
            for part in [count, sum.0, sum.1] {
                h.write_u64(part);
            }
        });
        Ok(())
    }
}

/// A member's name, hashed into the member's own hashers; `false` when it is one to leave out.
struct MemberName<'a, 'h> {
    skip: &'a [&'a str],
    out: &'h mut Pair,
}

impl<'de> DeserializeSeed<'de> for MemberName<'_, '_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, parser: D) -> Result<bool, D::Error> {
        parser.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for MemberName<'_, '_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, name: &str) -> Result<bool, E> {
        if self.skip.contains(&name) {
            return Ok(false);
        }
        name.hash(&mut self.out.0);
        name.hash(&mut self.out.1);
        Ok(true)
    }
}
