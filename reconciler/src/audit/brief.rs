//! Audit entries in brief: what `cairn status` and `/api/v1/status` show of the
//! newest entries. An entry's detail can be large (an `apply` entry lists every
//! step of its plan: 200,000 at 100,000 VMs), and a status shows five entries
//! for what happened lately, not the whole record. A list of more than
//! [`LIST_LIMIT`] items at the top of a detail is left out, its length named
//! under `abbreviated` (`{"steps": 200000}`); the audit log keeps the entry
//! whole (`cairn audit verify` checks it; the console's `/audit/N` shows it).
//!
//! [`decode`] reads stored bytes this way without building what it leaves out
//! (the long lists are skipped while parsing, item by item); [`abbreviate`] does
//! the same to an entry already in memory. Both give the same entry.

use super::AuditEntry;
use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// The scalar visits of a visitor whose value is `$wrap(Value)` (or `Kept`).
macro_rules! forward_scalars {
    ($out:ident) => {
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<$out, E> {
            Ok(forward_scalars!(@wrap $out, Value::Bool(v)))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<$out, E> {
            Ok(forward_scalars!(@wrap $out, Value::from(v)))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<$out, E> {
            Ok(forward_scalars!(@wrap $out, Value::from(v)))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<$out, E> {
            Ok(forward_scalars!(@wrap $out, Value::from(v)))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<$out, E> {
            Ok(forward_scalars!(@wrap $out, Value::from(v)))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<$out, E> {
            Ok(forward_scalars!(@wrap $out, Value::String(v)))
        }
        fn visit_unit<E: de::Error>(self) -> Result<$out, E> {
            Ok(forward_scalars!(@wrap $out, Value::Null))
        }
        fn visit_none<E: de::Error>(self) -> Result<$out, E> {
            Ok(forward_scalars!(@wrap $out, Value::Null))
        }
    };
    (@wrap Brief, $v:expr) => { Brief($v) };
    (@wrap Item, $v:expr) => { Item::Kept($v) };
}

/// The longest list a brief entry keeps.
pub const LIST_LIMIT: usize = 50;

/// The key naming the lists left out, each with its length.
pub const ABBREVIATED: &str = "abbreviated";

/// `entry` in brief (see the module documentation).
pub fn abbreviate(mut entry: AuditEntry) -> AuditEntry {
    let mut left_out = Map::new();
    match &mut entry.detail {
        Value::Object(fields) => {
            fields.retain(|key, value| match value {
                Value::Array(items) if items.len() > LIST_LIMIT => {
                    left_out.insert(key.clone(), Value::from(items.len()));
                    false
                }
                _ => true,
            });
            if !left_out.is_empty() {
                fields.insert(ABBREVIATED.to_owned(), Value::Object(left_out));
            }
        }
        Value::Array(items) if items.len() > LIST_LIMIT => {
            entry.detail = brief_list(items.len());
        }
        _ => {}
    }
    entry
}

/// A whole detail that is a long list, in brief.
fn brief_list(len: usize) -> Value {
    let mut left_out = Map::new();
    left_out.insert("items".to_owned(), Value::from(len));
    let mut out = Map::new();
    out.insert(ABBREVIATED.to_owned(), Value::Object(left_out));
    Value::Object(out)
}

/// Stored bytes (a sealed or an unchained entry) decoded in brief; `None` when
/// they are neither (as [`super::Record::decode`] gives `Corrupt`).
pub fn decode(bytes: &[u8]) -> Option<AuditEntry> {
    #[derive(Deserialize)]
    #[allow(dead_code)] // Read for their types: a sealed record has them all.
    struct Sealed {
        seq: u64,
        prev: String,
        content_hash: String,
        hash: String,
        key: String,
        signature: String,
        entry: Entry,
    }
    #[derive(Deserialize)]
    struct Entry {
        at_unix_ms: u64,
        user: String,
        event: String,
        detail: Brief,
    }
    let entry = match serde_json::from_slice::<Sealed>(bytes) {
        Ok(s) => s.entry,
        Err(_) => serde_json::from_slice::<Entry>(bytes).ok()?,
    };
    Some(AuditEntry {
        at_unix_ms: entry.at_unix_ms,
        user: entry.user,
        event: entry.event,
        detail: entry.detail.0,
    })
}

/// A detail read in brief.
struct Brief(Value);

impl<'de> Deserialize<'de> for Brief {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Top;
        impl<'de> Visitor<'de> for Top {
            type Value = Brief;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an audit entry's detail")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Brief, A::Error> {
                let mut fields = Map::new();
                let mut left_out = Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    match map.next_value::<Item>()? {
                        Item::Kept(value) => {
                            fields.insert(key, value);
                        }
                        Item::Long(len) => {
                            left_out.insert(key, Value::from(len));
                        }
                    }
                }
                if !left_out.is_empty() {
                    fields.insert(ABBREVIATED.to_owned(), Value::Object(left_out));
                }
                Ok(Brief(Value::Object(fields)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Brief, A::Error> {
                Ok(Brief(match ItemVisitor.visit_seq(seq)? {
                    Item::Kept(value) => value,
                    Item::Long(len) => brief_list(len),
                }))
            }
            forward_scalars!(Brief);
        }
        d.deserialize_any(Top)
    }
}

/// One value at the top of a detail: kept, or a long list's length.
enum Item {
    Kept(Value),
    Long(usize),
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ItemVisitor)
    }
}

struct ItemVisitor;

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Item, A::Error> {
        Value::deserialize(de::value::MapAccessDeserializer::new(map)).map(Item::Kept)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
        let mut items = Vec::new();
        while items.len() <= LIST_LIMIT {
            match seq.next_element::<Value>()? {
                Some(item) => items.push(item),
                None => return Ok(Item::Kept(Value::Array(items))),
            }
        }
        let mut len = items.len();
        drop(items);
        while seq.next_element::<IgnoredAny>()?.is_some() {
            len += 1;
        }
        Ok(Item::Long(len))
    }
    forward_scalars!(Item);
}

/// Whether `bytes` decode as an entry at all (sealed or unchained), as
/// [`super::Record::decode`] judges: [`decode`] gives an entry exactly then.
#[cfg(test)]
fn decodes(bytes: &[u8]) -> bool {
    super::Record::decode(bytes).entry().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(detail: Value) -> AuditEntry {
        AuditEntry {
            at_unix_ms: 7,
            user: "ops".to_owned(),
            event: "apply".to_owned(),
            detail,
        }
    }

    fn sealed_bytes(e: &AuditEntry) -> Vec<u8> {
        let identity = proto::auth::Identity::from_seed([7; 32]);
        serde_json::to_vec(&super::super::seal(&identity, 3, [0; 32], e.clone())).unwrap()
    }

    #[test]
    fn long_top_level_lists_are_counted_and_everything_else_is_kept() {
        let steps: Vec<Value> = (0..200)
            .map(|i| json!({"step": format!("s{i}"), "status": "succeeded"}))
            .collect();
        let short: Vec<Value> = (0..LIST_LIMIT).map(Value::from).collect();
        let whole = entry(json!({
            "plan_id": "p1",
            "millis": 12,
            "steps": steps,
            "short": short,
            "nested": {"deep": (0..100).collect::<Vec<_>>()},
        }));
        let want = json!({
            "plan_id": "p1",
            "millis": 12,
            "short": short,
            "nested": {"deep": (0..100).collect::<Vec<_>>()},
            "abbreviated": {"steps": 200},
        });
        assert_eq!(abbreviate(whole.clone()).detail, want);
        assert_eq!(
            decode(&sealed_bytes(&whole)).unwrap(),
            abbreviate(whole.clone())
        );
        // Unchained (plain) entries the same.
        let plain = serde_json::to_vec(&whole).unwrap();
        assert_eq!(decode(&plain).unwrap(), abbreviate(whole));
    }

    #[test]
    fn a_short_entry_is_unchanged_and_what_does_not_decode_is_left_out_alike() {
        for detail in [
            json!({"plan_id": "p", "steps": [1, 2, 3]}),
            json!("text"),
            json!(null),
            json!(1.5),
            json!(-3),
            json!([1, 2]),
            json!({}),
        ] {
            let e = entry(detail);
            assert_eq!(abbreviate(e.clone()), e);
            assert_eq!(decode(&sealed_bytes(&e)).unwrap(), e);
        }
        let long_list = entry(Value::Array((0..60).map(Value::from).collect()));
        assert_eq!(
            abbreviate(long_list.clone()).detail,
            json!({"abbreviated": {"items": 60}})
        );
        assert_eq!(
            decode(&sealed_bytes(&long_list)).unwrap(),
            abbreviate(long_list)
        );
        for bytes in [&b"not json"[..], b"{\"entry\": 3}", b"{}", b""] {
            assert_eq!(decode(bytes).is_some(), decodes(bytes), "{bytes:?}");
            assert!(decode(bytes).is_none());
        }
    }
}
