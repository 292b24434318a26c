//! Durations in JSON as whole microseconds (`u64`, saturating), for `#[serde(with = ...)]`.
//! Fields that use it carry a `_us` suffix in their serialized name.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

fn micros(d: &Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(micros(d))
}

pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_micros)
}

/// The same for `Option<Duration>` (`null` when absent).
pub(crate) mod option {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&micros(d)),
            None => s.serialize_none(),
        }
    }
}
