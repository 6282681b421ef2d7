//! Node enrollment tokens and enrolled node keys in etcd
//! (`reconciler::enroll::EnrollmentStore`), so that every controller replica
//! enrolls against the same tokens.
//!
//! Keys under `PREFIX/`: `enroll/tokens/HASH` (a `TokenRecord`, the token's SHA-256
//! as its name) and `enroll/nodes/NAME` (an `EnrolledNode`). A token is consumed in
//! one transaction that compares its key's `mod_revision` with the one it was read
//! at and writes the used record and the node's key together: of two nodes racing
//! with one token, the second finds the key moved, reads it again and is refused as
//! a reuse. These writes are not fenced by the election: any replica may enroll (the
//! comparison is what makes a token single-use), so a node can enroll through a
//! follower.

use etcd_client::{Compare, CompareOp, TxnOp};
use reconciler::enroll::{EnrolledNode, EnrollmentStore, TokenRecord, consume};
use reconciler::state::StateError;

use crate::store::EtcdStore;

fn token_key(hash: &str) -> String {
    format!("enroll/tokens/{hash}")
}

fn node_key(name: &str) -> String {
    format!("enroll/nodes/{name}")
}

impl EnrollmentStore for EtcdStore {
    fn put_enrollment_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StateError> {
        let store = self.unfenced();
        let key = store.target().key(&token_key(hash));
        let bytes = serde_json::to_vec(record).expect("token records serialize");
        store.commit(
            "record enrollment token",
            vec![],
            vec![TxnOp::put(key, bytes, None)],
        )?;
        Ok(())
    }

    fn consume_enrollment_token(
        &self,
        hash: &str,
        node: &str,
        key_hex: &str,
        now_ms: u64,
    ) -> Result<Result<TokenRecord, String>, StateError> {
        let store = self.unfenced();
        let rest = token_key(hash);
        let key = store.target().key(&rest);
        for _ in 0..10 {
            let (found, revision) = match store.get(&rest)? {
                Some((bytes, revision, _)) => {
                    (Some(store.decode::<TokenRecord>(&rest, &bytes)?), revision)
                }
                None => (None, 0),
            };
            let (used, enrolled) = match consume(hash, found, node, key_hex, now_ms) {
                Ok(consumed) => consumed,
                Err(why) => return Ok(Err(why)),
            };
            let ops = vec![
                TxnOp::put(
                    key.clone(),
                    serde_json::to_vec(&used).expect("serializes"),
                    None,
                ),
                TxnOp::put(
                    store.target().key(&node_key(node)),
                    serde_json::to_vec(&enrolled).expect("serializes"),
                    None,
                ),
            ];
            let compare = Compare::mod_revision(key.clone(), CompareOp::Equal, revision);
            if store.commit("consume enrollment token", vec![compare], ops)? {
                return Ok(Ok(used));
            }
        }
        Err(StateError::Etcd {
            url: store.url().to_owned(),
            operation: "consume enrollment token",
            message: "the token's record changed under every one of 10 attempts".to_owned(),
        })
    }

    fn enrolled_nodes(&self) -> Result<Vec<EnrolledNode>, StateError> {
        self.range("enroll/nodes/", false)?
            .into_iter()
            .map(|(key, bytes)| self.decode(&key, &bytes))
            .collect()
    }

    fn set_enrolled_node(&self, node: &EnrolledNode) -> Result<(), StateError> {
        let store = self.unfenced();
        let key = store.target().key(&node_key(&node.name));
        let bytes = serde_json::to_vec(node).expect("serializes");
        store.commit(
            "record enrolled node",
            vec![],
            vec![TxnOp::put(key, bytes, None)],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_consumed_once_through_any_connection() {
        let Some((etcd, _dir)) = crate::store::tests::etcd_on("127.0.0.37", 23821) else {
            return;
        };
        let url = etcd.url("enroll-test");
        let first = EtcdStore::open(&url).unwrap();
        let second = EtcdStore::open(&url).unwrap();
        let record = TokenRecord {
            node: "lab-4".into(),
            created_at_ms: 1_000,
            expires_at_ms: 901_000,
            created_by: "test".into(),
            used: None,
        };
        first.put_enrollment_token("aa", &record).unwrap();
        let key = "cd".repeat(32);
        second
            .consume_enrollment_token("aa", "lab-4", &key, 2_000)
            .unwrap()
            .unwrap();
        let again = first
            .consume_enrollment_token("aa", "lab-4", &"ef".repeat(32), 2_500)
            .unwrap()
            .unwrap_err();
        assert!(again.contains("was already used"), "{again}");
        let nodes = first.enrolled_nodes().unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].key_hex, key);
    }
}
