//! Retention: which manifests of the fleet registry may go. Only images
//! some release ran are candidates, so an image pushed and not yet
//! deployed is left alone. Of those, every one is deleted except the
//! images of each service's last `keep` releases and of the releases
//! replicas still run. Deleting a manifest removes the tags that name it;
//! the registry's garbage collection then frees the blobs nothing
//! references.

use crate::store::releases::ReleaseRow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One manifest to delete, with the tags that named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doomed {
    pub repository: String,
    pub digest: String,
    pub tags: Vec<String>,
}

/// Deletes what [`plan`] dooms, then collects garbage. One prune runs at
/// a time.
pub async fn run(
    registry: &super::Registry,
    store: &crate::store::Store,
    keep: usize,
) -> anyhow::Result<berth_protocol::api::PruneReport> {
    let _one = registry.prune_lock.lock().await;
    let mut releases = vec![];
    for svc in store.list_services().await? {
        releases.extend(store.list_releases(&svc.name).await?);
    }
    let in_use = store.releases_in_use().await?;
    let client = &registry.client;
    let stored: BTreeSet<String> = client.repositories(&registry.signer).await?.into_iter().collect();
    let mut tags = HashMap::new();
    for r in &releases {
        let Some((repo, _)) = parse(&registry.host, &r.spec.image) else {
            continue;
        };
        if tags.contains_key(&repo) || !stored.contains(&repo) {
            continue;
        }
        let mut named = vec![];
        for tag in client.tags(&registry.signer, &repo).await? {
            if let Some(d) = client.digest(&registry.signer, &repo, &tag).await? {
                named.push((tag, d));
            }
        }
        tags.insert(repo, named);
    }
    let mut doomed = plan(&registry.host, &releases, &in_use, keep, &tags);
    // A manifest list's platforms (a multi-platform build's parts) are
    // named by nothing a release ran: they go with their list, unless a
    // kept list names them too.
    let mut doomed_platforms = vec![];
    let mut kept_platforms = BTreeSet::new();
    let doomed_keys: BTreeSet<(String, String)> = doomed
        .iter()
        .map(|d| (d.repository.clone(), d.digest.clone()))
        .collect();
    let mut looked = BTreeSet::new();
    for r in &releases {
        let Some((repo, digest)) = pinned(&registry.host, &r.spec.image) else {
            continue;
        };
        if !stored.contains(&repo) || !looked.insert((repo.clone(), digest.clone())) {
            continue;
        }
        // Any other failure stops the prune: a list not read could lose
        // a platform, or leave its platforms behind for good.
        let Some((media_type, body)) = client.manifest_raw(&registry.signer, &repo, &digest).await? else {
            continue; // gone already
        };
        for child in list_entries(&media_type, &body) {
            if doomed_keys.contains(&(repo.clone(), digest.clone())) {
                doomed_platforms.push((repo.clone(), child));
            } else {
                kept_platforms.insert((repo.clone(), child));
            }
        }
    }
    // A kept list's platform stays, even one a doomed release ran itself;
    // so does one a kept release runs itself; and one doomed already is
    // not doomed twice.
    doomed.retain(|d| !kept_platforms.contains(&(d.repository.clone(), d.digest.clone())));
    kept_platforms.extend(looked.difference(&doomed_keys).cloned());
    doomed_platforms.retain(|k| !doomed_keys.contains(k));
    doomed.extend(platforms_of(&doomed_platforms, &kept_platforms, &tags));
    let mut deleted = vec![];
    for d in doomed.into_iter().filter(|d| stored.contains(&d.repository)) {
        client
            .delete_manifest(&registry.signer, &d.repository, &d.digest)
            .await?;
        tracing::info!(repository = %d.repository, digest = %d.digest, "retention deleted an image");
        deleted.push(berth_protocol::api::PrunedImage {
            repository: d.repository,
            digest: d.digest,
            tags: d.tags,
        });
    }
    // An empty registry has no repositories directory yet, and
    // garbage-collect fails on that: there is nothing to collect anyway.
    let garbage_collection = if stored.is_empty() {
        "nothing stored".to_string()
    } else {
        registry.collect_garbage().await?
    };
    Ok(berth_protocol::api::PruneReport {
        keep,
        deleted,
        garbage_collection,
    })
}

/// `(repository, digest)` of an image of the registry at `host` pinned by digest.
fn pinned(host: &str, image: &str) -> Option<(String, String)> {
    match parse(host, image)? {
        (repo, Ref::Digest(d)) => Some((repo, d)),
        _ => None,
    }
}

/// The manifests a manifest list (OCI index, Docker list) names; none for
/// an image manifest.
fn list_entries(media_type: &str, body: &[u8]) -> Vec<String> {
    if !(media_type.contains("index") || media_type.contains("manifest.list")) {
        return vec![];
    }
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["digest"].as_str().map(String::from))
        .collect()
}

/// The platforms' manifests of doomed lists, as doomed too: each unless a
/// kept list names it, once, with the tags naming it now.
pub fn platforms_of(
    doomed_platforms: &[(String, String)],
    kept_platforms: &BTreeSet<(String, String)>,
    tags: &HashMap<String, Vec<(String, String)>>,
) -> Vec<Doomed> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for key in doomed_platforms.iter().filter(|k| !kept_platforms.contains(*k)) {
        let (repo, digest) = key;
        out.entry(key.clone()).or_insert_with(|| {
            let mut named: Vec<String> = tags
                .get(repo)
                .into_iter()
                .flatten()
                .filter(|(_, d)| d == digest)
                .map(|(t, _)| t.clone())
                .collect();
            named.sort();
            named
        });
    }
    out.into_iter()
        .map(|((repository, digest), tags)| Doomed {
            repository,
            digest,
            tags,
        })
        .collect()
}

/// A reference in the registry at `host`: `(repository, Tag|Digest)`.
enum Ref {
    Tag(String),
    Digest(String),
}

fn parse(host: &str, image: &str) -> Option<(String, Ref)> {
    let rest = image.strip_prefix(host)?.strip_prefix('/')?;
    if let Some((name, digest)) = rest.split_once('@') {
        // `REPO:TAG@DIGEST`: the digest is what runs.
        let name_start = name.rfind('/').map_or(0, |i| i + 1);
        let repo = match name[name_start..].rfind(':') {
            Some(i) => &name[..name_start + i],
            None => name,
        };
        return Some((repo.to_string(), Ref::Digest(digest.to_string())));
    }
    let name_start = rest.rfind('/').map_or(0, |i| i + 1);
    Some(match rest[name_start..].rfind(':') {
        Some(i) => (
            rest[..name_start + i].to_string(),
            Ref::Tag(rest[name_start + i + 1..].to_string()),
        ),
        None => (rest.to_string(), Ref::Tag("latest".into())),
    })
}

/// What to delete. `releases` is every release of every service (any
/// order), `in_use` the releases some replica runs, `tags` each pruned
/// candidate repository's tags with the digest each names now.
pub fn plan(
    host: &str,
    releases: &[ReleaseRow],
    in_use: &[ReleaseRow],
    keep: usize,
    tags: &HashMap<String, Vec<(String, String)>>,
) -> Vec<Doomed> {
    let digest_of = |repo: &str, r: &Ref| -> Option<String> {
        match r {
            Ref::Digest(d) => Some(d.clone()),
            Ref::Tag(t) => tags.get(repo)?.iter().find(|(tag, _)| tag == t).map(|(_, d)| d.clone()),
        }
    };
    // The newest `keep` releases of each service, and those in use.
    let mut by_service: BTreeMap<&str, Vec<&ReleaseRow>> = BTreeMap::new();
    for r in releases {
        by_service.entry(&r.service).or_default().push(r);
    }
    let mut kept: BTreeSet<(String, String)> = BTreeSet::new();
    let mut keep_release = |r: &ReleaseRow| {
        if let Some((repo, reference)) = parse(host, &r.spec.image) {
            if let Some(d) = digest_of(&repo, &reference) {
                kept.insert((repo, d));
            }
        }
    };
    for list in by_service.values_mut() {
        list.sort_by_key(|r| std::cmp::Reverse(r.number));
        list.iter().take(keep).for_each(|r| keep_release(r));
    }
    in_use.iter().for_each(&mut keep_release);
    // Candidates: what the tags name now, and every digest a release
    // pinned (a tag moved on leaves its old manifest untagged, which the
    // registry cannot list).
    let mut candidates: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for r in releases {
        if let Some((repo, reference)) = parse(host, &r.spec.image) {
            if let Some(d) = digest_of(&repo, &reference) {
                candidates.entry((repo, d)).or_default();
            }
        }
    }
    for ((repo, digest), named) in candidates.iter_mut() {
        for (tag, d) in tags.get(repo).into_iter().flatten() {
            if d == digest {
                named.push(tag.clone());
            }
        }
    }
    candidates
        .into_iter()
        .filter(|(k, _)| !kept.contains(k))
        .map(|((repository, digest), mut tags)| {
            tags.sort();
            Doomed {
                repository,
                digest,
                tags,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::release::ReleaseState;

    fn release(service: &str, number: u64, image: &str) -> ReleaseRow {
        let spec: berth_protocol::service::ServiceSpec =
            serde_json::from_value(serde_json::json!({"name": service, "image": image})).unwrap();
        ReleaseRow {
            service: service.into(),
            number,
            spec,
            secrets_sealed: None,
            image_digest: None,
            created_at: 0,
            created_by: "admin".into(),
            state: ReleaseState::Complete,
            reason: None,
            finished_at: None,
            rollout: true,
            from_release: None,
            rolling_back: false,
            floor: 0,
            steps: vec![],
            restart: false,
        }
    }

    const H: &str = "cp:5000";

    #[test]
    fn a_doomed_lists_platforms_go_unless_a_kept_list_names_them() {
        let k = |r: &str, d: &str| (r.to_string(), d.to_string());
        let doomed = [k("web", "sha256:a1"), k("web", "sha256:shared"), k("web", "sha256:a1")];
        let kept = BTreeSet::from([k("web", "sha256:shared")]);
        let tags = HashMap::from([(
            "web".to_string(),
            vec![k("build-3", "sha256:a1"), k("build-9", "sha256:shared")],
        )]);
        assert_eq!(
            platforms_of(&doomed, &kept, &tags),
            [Doomed {
                repository: "web".into(),
                digest: "sha256:a1".into(),
                tags: vec!["build-3".into()],
            }]
        );
        let index = br#"{"manifests":[{"digest":"sha256:a1"},{"digest":"sha256:b2"}]}"#;
        assert_eq!(
            list_entries("application/vnd.oci.image.index.v1+json", index),
            ["sha256:a1", "sha256:b2"]
        );
        assert_eq!(
            list_entries("application/vnd.docker.distribution.manifest.list.v2+json", index).len(),
            2
        );
        assert!(list_entries("application/vnd.oci.image.manifest.v1+json", index).is_empty());
    }

    #[test]
    fn keeps_the_last_releases_and_those_running() {
        let releases: Vec<ReleaseRow> = (1..=4)
            .map(|n| release("web", n, &format!("cp:5000/web@sha256:{n}")))
            .collect();
        let in_use = vec![releases[0].clone()];
        let tags = HashMap::from([(
            "web".to_string(),
            vec![
                ("v4".to_string(), "sha256:4".to_string()),
                ("v2".into(), "sha256:2".into()),
            ],
        )]);
        let doomed = plan(H, &releases, &in_use, 2, &tags);
        assert_eq!(
            doomed,
            vec![Doomed {
                repository: "web".into(),
                digest: "sha256:2".into(),
                tags: vec!["v2".into()],
            }]
        );
    }

    #[test]
    fn leaves_other_repositories_and_registries_alone() {
        let releases = vec![
            release("web", 1, "cp:5000/web:old"),
            release("web", 2, "cp:5000/web@sha256:b"),
            release("db", 1, "docker.io/library/postgres:16"),
        ];
        let tags = HashMap::from([
            (
                "web".to_string(),
                vec![
                    ("old".to_string(), "sha256:a".to_string()),
                    ("new".into(), "sha256:c".into()),
                ],
            ),
            (
                "pushed-not-deployed".to_string(),
                vec![("1".to_string(), "sha256:z".to_string())],
            ),
        ]);
        // web:old (release 1, by tag) goes; web:new, never deployed, and
        // the other repository stay, as does the kept release's digest.
        let doomed = plan(H, &releases, &[], 1, &tags);
        assert_eq!(
            doomed,
            vec![Doomed {
                repository: "web".into(),
                digest: "sha256:a".into(),
                tags: vec!["old".into()],
            }]
        );
        assert_eq!(plan(H, &releases, &[], 10, &tags), vec![]);
    }

    #[test]
    fn parses_references() {
        let digest = |image: &str| match parse(H, image) {
            Some((repo, Ref::Digest(d))) => Some((repo, d)),
            _ => None,
        };
        assert_eq!(
            digest("cp:5000/a/web:v1@sha256:x"),
            Some(("a/web".into(), "sha256:x".into()))
        );
        assert_eq!(digest("cp:5000/web@sha256:x"), Some(("web".into(), "sha256:x".into())));
        assert!(parse(H, "other:5000/web:v1").is_none());
        assert!(matches!(parse(H, "cp:5000/web"), Some((_, Ref::Tag(t))) if t == "latest"));
    }
}
