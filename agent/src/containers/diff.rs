//! The container diff: desired replicas against what Podman runs, as a list
//! of actions. Pure, so every case is unit-tested.

use berth_protocol::service::ContainerDesired;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Labels Berth puts on the containers it owns.
pub const LABEL_OWNER: &str = "io.berth.owner";
pub const LABEL_REPLICA: &str = "io.berth.replica";
pub const LABEL_SERVICE: &str = "io.berth.service";
pub const LABEL_SPEC: &str = "io.berth.spec";

/// A Berth-owned container as Podman reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actual {
    pub id: String,
    pub replica: String,
    pub spec_hash: String,
    pub running: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create and start the replica.
    Create(String),
    /// Remove container `id`, then create the replica anew (spec changed).
    Replace { id: String, replica: String },
    /// Start a stopped container.
    Start { id: String, replica: String },
    /// Remove a container no longer wanted (or a duplicate).
    Remove { id: String },
}

/// A digest of everything that shapes a container, secrets included (as
/// their digest only), so a change to any of them replaces the container.
pub fn spec_hash(c: &ContainerDesired, secrets: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    let mut without_seal = c.clone();
    without_seal.sealed_secrets = None;
    h.update(serde_json::to_vec(&without_seal).unwrap_or_default());
    h.update(serde_json::to_vec(secrets).unwrap_or_default());
    hex::encode(&h.finalize()[..12])
}

/// Actions that turn `actual` into `desired` (replica → spec hash).
pub fn diff(desired: &BTreeMap<String, String>, actual: &[Actual]) -> Vec<Action> {
    let mut out = vec![];
    let mut seen: BTreeMap<&str, ()> = BTreeMap::new();
    for a in actual {
        match desired.get(&a.replica) {
            None => out.push(Action::Remove { id: a.id.clone() }),
            Some(_) if seen.contains_key(a.replica.as_str()) => out.push(Action::Remove { id: a.id.clone() }),
            Some(hash) if *hash != a.spec_hash => {
                seen.insert(&a.replica, ());
                out.push(Action::Replace {
                    id: a.id.clone(),
                    replica: a.replica.clone(),
                })
            }
            Some(_) => {
                seen.insert(&a.replica, ());
                if !a.running {
                    out.push(Action::Start {
                        id: a.id.clone(),
                        replica: a.replica.clone(),
                    });
                }
            }
        }
    }
    for replica in desired.keys() {
        if !seen.contains_key(replica.as_str()) {
            out.push(Action::Create(replica.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actual(id: &str, replica: &str, hash: &str, running: bool) -> Actual {
        Actual {
            id: id.into(),
            replica: replica.into(),
            spec_hash: hash.into(),
            running,
        }
    }

    #[test]
    fn creates_replaces_starts_and_removes() {
        let desired: BTreeMap<String, String> = [("web-1", "h1"), ("web-2", "h2"), ("web-3", "h3"), ("db-1", "d1")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let actual = vec![
            actual("c1", "web-1", "h1", true),
            actual("c2", "web-2", "old", true),
            actual("c3", "web-3", "h3", false),
            actual("c4", "gone-1", "x", true),
        ];
        assert_eq!(
            diff(&desired, &actual),
            vec![
                Action::Replace {
                    id: "c2".into(),
                    replica: "web-2".into()
                },
                Action::Start {
                    id: "c3".into(),
                    replica: "web-3".into()
                },
                Action::Remove { id: "c4".into() },
                Action::Create("db-1".into()),
            ]
        );
    }

    #[test]
    fn in_sync_means_nothing_to_do() {
        let desired: BTreeMap<String, String> = [("web-1".to_string(), "h".to_string())].into();
        assert!(diff(&desired, &[actual("c1", "web-1", "h", true)]).is_empty());
    }

    #[test]
    fn duplicates_are_removed() {
        let desired: BTreeMap<String, String> = [("web-1".to_string(), "h".to_string())].into();
        let got = diff(
            &desired,
            &[actual("c1", "web-1", "h", true), actual("c2", "web-1", "h", true)],
        );
        assert_eq!(got, vec![Action::Remove { id: "c2".into() }]);
    }

    #[test]
    fn hash_follows_spec_and_secrets() {
        let c: ContainerDesired = serde_json::from_value(serde_json::json!({
            "replica": "web-1", "service": "web", "image": "x", "ip": "10.200.0.2", "port": null,
            "env": {}, "sealed_secrets": "AAA", "command": null, "cpu": null, "memory": null,
            "health_cmd": null, "health_http": null, "volumes": []
        }))
        .unwrap();
        let none = BTreeMap::new();
        let base = spec_hash(&c, &none);
        let mut resealed = c.clone();
        resealed.sealed_secrets = Some("BBB".into());
        assert_eq!(
            spec_hash(&resealed, &none),
            base,
            "a fresh seal of the same secrets changes nothing"
        );
        let mut other = c.clone();
        other.image = "y".into();
        assert_ne!(spec_hash(&other, &none), base);
        let secrets: BTreeMap<String, String> = [("K".to_string(), "v".to_string())].into();
        assert_ne!(spec_hash(&c, &secrets), base);
    }

    #[test]
    fn fields_added_later_leave_old_hashes_alone() {
        // The hash of a replica as the agent encoded it before stop_signal
        // and stop_timeout existed: containers made then are not replaced.
        let c: ContainerDesired = serde_json::from_value(serde_json::json!({
            "replica": "web-1", "service": "web", "image": "x", "ip": "10.200.0.2", "port": 8080,
            "env": {"A": "1"}, "sealed_secrets": null, "command": null, "cpu": null, "memory": null,
            "health_cmd": null, "health_http": null, "volumes": []
        }))
        .unwrap();
        assert_eq!(spec_hash(&c, &BTreeMap::new()), "b4cab98c99ab541f2cb61164");
        let mut with = c.clone();
        with.stop_timeout = Some(10);
        assert_ne!(spec_hash(&with, &BTreeMap::new()), "b4cab98c99ab541f2cb61164");
    }
}
