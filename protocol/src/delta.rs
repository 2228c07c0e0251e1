//! Desired-state deltas: what an agent that asks `delta=true` gets from
//! the long-poll instead of the whole document.
//!
//! Each answer names the control plane's *view* it was built from (the
//! fleet as read at one revision). The agent sends that view back as
//! `base=` on its next poll; the control plane then diffs the node's
//! document in the base view against the current one and sends only the
//! sections that differ, and of the peers only those added, changed or
//! removed. An unknown base (too old, or the control plane restarted) gets
//! the full document, flagged as one. docs/protocol.md has the format.

use crate::api::{DesiredState, DnsService, NodeSelf, Peer, RegistryAccess};
use crate::proxy::ProxyDesired;
use crate::service::ContainerDesired;
use serde::{Deserialize, Deserializer, Serialize};

/// `GET /v1/agent/desired?delta=true`: exactly one of `full` and `delta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredUpdate {
    /// The view this answer brings the agent to: its next poll's `base`.
    pub view: u64,
    /// The whole document: no base given, or one the control plane no
    /// longer holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<DesiredState>,
    /// What changed since the document of view `delta.base`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DesiredDelta>,
}

/// The changes that turn the document of view `base` into the current one.
/// An absent section did not change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredDelta {
    /// The view whose document this applies to.
    pub base: u64,
    /// The node's revision after it.
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeSelf>,
    /// Peers added or changed (whole entries; matched by `node_id`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_set: Vec<Peer>,
    /// Node ids of the peers to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_removed: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<Vec<ContainerDesired>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<DnsService>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyDesired>,
    /// Absent: unchanged; `null`: no upgrade wanted any more.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub upgrade_to: Option<Option<String>>,
    /// Absent: unchanged; `null`: the registry is gone.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<RegistryAccess>))]
    pub registry: Option<Option<RegistryAccess>>,
}

/// A field that is present is `Some`, even when its value is `null`
/// (serde's default reads `null` as an absent `Option<Option<_>>`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl DesiredDelta {
    /// Applies the delta to `doc`, the document of view `self.base`.
    /// Peers stay sorted by name, as full documents list them.
    pub fn apply(self, doc: &mut DesiredState) {
        doc.revision = self.revision;
        if let Some(n) = self.node {
            doc.node = n;
        }
        if !self.peers_set.is_empty() || !self.peers_removed.is_empty() {
            let gone: std::collections::HashSet<&str> = self.peers_removed.iter().map(String::as_str).collect();
            let set: std::collections::HashSet<&str> = self.peers_set.iter().map(|p| p.node_id.as_str()).collect();
            doc.peers
                .retain(|p| !gone.contains(p.node_id.as_str()) && !set.contains(p.node_id.as_str()));
            if !self.peers_set.is_empty() {
                doc.peers.extend(self.peers_set);
                doc.peers.sort_by(|a, b| a.name.cmp(&b.name));
            }
        }
        if let Some(c) = self.containers {
            doc.containers = c;
        }
        if let Some(d) = self.dns {
            doc.dns = d;
        }
        if let Some(p) = self.proxy {
            doc.proxy = Some(p);
        }
        if let Some(u) = self.upgrade_to {
            doc.upgrade_to = u;
        }
        if let Some(r) = self.registry {
            doc.registry = r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_absent_differ_for_clearable_sections() {
        let cleared: DesiredDelta = serde_json::from_str(r#"{"base":1,"revision":2,"upgrade_to":null}"#).unwrap();
        assert_eq!(cleared.upgrade_to, Some(None));
        assert_eq!(cleared.registry, None);
        let back: DesiredDelta = serde_json::from_slice(&serde_json::to_vec(&cleared).unwrap()).unwrap();
        assert_eq!(back, cleared);
    }
}
