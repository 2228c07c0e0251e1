//! The store, used directly: migrations, tokens, registration under
//! concurrency, refusals that must change nothing, address pools, removal
//! and nonces. Every test runs on SQLite and on PostgreSQL.

#[macro_use]
mod common;

use berth_control_plane::store::nodes::{Pools, RegisterError};
use berth_control_plane::store::Store;
use berth_protocol::{Role, TokenState};
use common::{default_pools, now, Agent, Db};
use std::collections::HashSet;
use std::sync::Arc;

const CA_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

on_both_stores!(
    migrations_are_idempotent,
    token_lifecycle,
    concurrent_registrations_get_distinct_addresses,
    burst_of_registrations,
    one_token_one_node_under_concurrency,
    refused_registrations_change_nothing,
    exhausted_pools_refuse_and_change_nothing,
    removing_a_node_moves_everyone_else,
    nonces_detect_replays_and_expire,
    replayed_nonces_are_refused_after_a_restart,
    heartbeats_written_behind_never_move_back,
);

/// What a refused registration must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    revision: i64,
    nodes: Vec<(String, String, String, i64)>,
    tokens: Vec<(String, Option<i64>, Option<i64>)>,
}

async fn counts(store: &Store) -> Counts {
    Counts {
        revision: store.revision().await.unwrap(),
        nodes: store
            .list_nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| (n.name, n.mesh_ip.to_string(), n.subnet.to_string(), n.revision))
            .collect(),
        tokens: store
            .list_tokens()
            .await
            .unwrap()
            .into_iter()
            .map(|t| (t.id, t.used_at, t.revoked_at))
            .collect(),
    }
}

async fn token_state(store: &Store, id: &str) -> TokenState {
    let t = store
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.id == id)
        .expect("token is listed");
    t.state(now())
}

async fn migrations_are_idempotent(db: &Db) {
    let store = db.store().await;
    assert_eq!(store.revision().await.unwrap(), 0, "a new store starts at revision 0");
    assert!(store.list_nodes().await.unwrap().is_empty());
    store.setting_insert_if_absent("probe", "kept").await.unwrap();
    drop(store);
    // Reconnecting runs the migrations again: already applied, nothing changes.
    let store = db.store().await;
    let again = db.store().await;
    assert_eq!(store.revision().await.unwrap(), 0);
    assert_eq!(again.setting("probe").await.unwrap().as_deref(), Some("kept"));
    assert_eq!(
        store.setting_insert_if_absent("probe", "other").await.unwrap(),
        "kept",
        "insert-if-absent keeps the first value"
    );
}

async fn token_lifecycle(db: &Db) {
    let store = db.store().await;
    let t = store.create_token(Role::Worker, 3600, CA_HASH).await.unwrap();
    assert_eq!(t.role, Role::Worker);
    assert!((t.expires_at - now() - 3600).abs() <= 2);
    assert_eq!(token_state(&store, &t.id).await, TokenState::Valid);
    let listed = store.list_tokens().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].info(now()).state, TokenState::Valid);
    assert_ne!(listed[0].secret_hash, "", "the secret's hash is stored");
    assert!(
        !t.token.contains(&listed[0].secret_hash),
        "only the hash is stored, not the secret"
    );

    // Revoke: valid → revoked; a second revoke reports it already was.
    assert_eq!(store.revoke_token(&t.id).await.unwrap(), Some(TokenState::Valid));
    assert_eq!(token_state(&store, &t.id).await, TokenState::Revoked);
    assert_eq!(store.revoke_token(&t.id).await.unwrap(), Some(TokenState::Revoked));
    assert_eq!(store.revoke_token("nosuchid").await.unwrap(), None);
    let err = store
        .register_node(&Agent::new("a").new_node(&t.token), default_pools())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegisterError::TokenNotUsable(TokenState::Revoked)),
        "{err:?}"
    );

    // A used token cannot be revoked and stays used.
    let used = store.create_token(Role::Worker, 3600, CA_HASH).await.unwrap();
    store
        .register_node(&Agent::new("b").new_node(&used.token), default_pools())
        .await
        .unwrap();
    assert_eq!(token_state(&store, &used.id).await, TokenState::Used);
    assert_eq!(store.revoke_token(&used.id).await.unwrap(), Some(TokenState::Used));
    let row = store
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == used.id)
        .unwrap();
    assert_eq!(row.state(now()), TokenState::Used);
    assert_eq!(row.revoked_at, None, "a used token is not marked revoked");
    assert_eq!(row.used_by.as_deref(), Some("b"));

    // Expiry: past its lifetime a token reads expired and cannot be used.
    let short = store.create_token(Role::Proxy, 60, CA_HASH).await.unwrap();
    let row = store
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == short.id)
        .unwrap();
    assert_eq!(row.state(now()), TokenState::Valid);
    assert_eq!(row.state(now() + 61), TokenState::Expired);
    sqlx::query("UPDATE tokens SET expires_at = $1 WHERE id = $2")
        .bind(now() - 1)
        .bind(&short.id)
        .execute(&store.pool)
        .await
        .unwrap();
    assert_eq!(token_state(&store, &short.id).await, TokenState::Expired);
    let mut node = Agent::new("c").new_node(&short.token);
    node.proxy = true;
    let before = counts(&store).await;
    let err = store.register_node(&node, default_pools()).await.unwrap_err();
    assert!(
        matches!(err, RegisterError::TokenNotUsable(TokenState::Expired)),
        "{err:?}"
    );
    assert_eq!(counts(&store).await, before);
    // An expired token may still be revoked (cleanup), and then reads revoked.
    assert_eq!(store.revoke_token(&short.id).await.unwrap(), Some(TokenState::Expired));
    assert_eq!(token_state(&store, &short.id).await, TokenState::Revoked);

    // A wrong secret for a known id is an unknown token, and uses nothing.
    let t2 = store.create_token(Role::Worker, 3600, CA_HASH).await.unwrap();
    let mut forged = Agent::new("d").new_node(&t2.token);
    forged.token_secret_hash = "f".repeat(64);
    let err = store.register_node(&forged, default_pools()).await.unwrap_err();
    assert!(matches!(err, RegisterError::UnknownToken), "{err:?}");
    assert_eq!(token_state(&store, &t2.id).await, TokenState::Valid);
}

async fn concurrent_registrations_get_distinct_addresses(db: &Db) {
    register_concurrently(db, 40).await;
}

/// A burst of joins (a fleet booting at once). Before registrations were
/// serialized on the revision counter, concurrent PostgreSQL transactions
/// all picked the same lowest free address and some ran out of retries
/// (a unique violation on `nodes.mesh_ip`) at this size.
async fn burst_of_registrations(db: &Db) {
    register_concurrently(db, 150).await;
}

/// `count` concurrent registrations, each with its own token and keys.
async fn register_concurrently(db: &Db, count: usize) {
    let store = db.store().await;
    let mut tokens = vec![];
    for _ in 0..count {
        tokens.push(store.create_token(Role::Worker, 3600, CA_HASH).await.unwrap());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, t) in tokens.iter().enumerate() {
        let store = store.clone();
        let new = Agent::new(&format!("node-{i}")).new_node(&t.token);
        tasks.spawn(async move { store.register_node(&new, default_pools()).await });
    }
    let mut revs = HashSet::new();
    let mut registered = vec![];
    while let Some(res) = tasks.join_next().await {
        let (node, rev) = res
            .unwrap()
            .unwrap_or_else(|e| panic!("a concurrent registration failed: {e:?}"));
        assert!(revs.insert(rev), "two registrations got revision {rev}");
        registered.push(node);
    }
    assert_eq!(registered.len(), count);
    let final_rev = store.revision().await.unwrap();
    assert_eq!(final_rev, count as i64, "each registration takes exactly one revision");
    assert_eq!(revs, (1..=count as i64).collect::<HashSet<_>>());

    let nodes = store.list_nodes().await.unwrap();
    assert_eq!(nodes.len(), count);
    let pools = default_pools();
    let ips: HashSet<_> = nodes.iter().map(|n| n.mesh_ip).collect();
    let subnets: HashSet<_> = nodes.iter().map(|n| n.subnet).collect();
    assert_eq!(ips.len(), count, "mesh IPs are distinct");
    assert_eq!(subnets.len(), count, "subnets are distinct");
    for n in &nodes {
        assert!(pools.mesh.contains(&n.mesh_ip), "{} outside the mesh pool", n.mesh_ip);
        assert!(
            pools.subnets.contains(&n.subnet) && n.subnet.prefix_len() == 24,
            "{}",
            n.subnet
        );
        assert_eq!(
            n.revision, final_rev,
            "{} was not stamped with the final revision",
            n.name
        );
    }
    // Lowest-first allocation with no gaps: exactly the lowest `count` addresses.
    let want_ips: HashSet<_> = pools.mesh.hosts().take(count).collect();
    assert_eq!(ips, want_ips);
    let listed = store.list_tokens().await.unwrap();
    assert_eq!(listed.len(), count);
    assert!(listed.iter().all(|t| t.state(now()) == TokenState::Used));
}

async fn one_token_one_node_under_concurrency(db: &Db) {
    let store = db.store().await;
    for round in 0..5 {
        let t = store.create_token(Role::Worker, 3600, CA_HASH).await.unwrap();
        let a = Agent::new(&format!("a{round}")).new_node(&t.token);
        let b = Agent::new(&format!("b{round}")).new_node(&t.token);
        let pools = default_pools();
        let (s1, s2) = (store.clone(), store.clone());
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let (b1, b2) = (barrier.clone(), barrier.clone());
        let ta = tokio::spawn(async move {
            b1.wait().await;
            s1.register_node(&a, pools).await
        });
        let tb = tokio::spawn(async move {
            b2.wait().await;
            s2.register_node(&b, pools).await
        });
        let results = [ta.await.unwrap(), tb.await.unwrap()];
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "exactly one registration may use a token: {results:?}");
        let err = results.into_iter().find_map(|r| r.err()).unwrap();
        assert!(
            matches!(err, RegisterError::TokenNotUsable(TokenState::Used)),
            "{err:?}"
        );
    }
    assert_eq!(store.list_nodes().await.unwrap().len(), 5);
    assert_eq!(store.revision().await.unwrap(), 5);
}

async fn refused_registrations_change_nothing(db: &Db) {
    let store = db.store().await;
    let t1 = store.create_token(Role::Worker, 3600, CA_HASH).await.unwrap();
    let first = Agent::new("first");
    store
        .register_node(&first.new_node(&t1.token), default_pools())
        .await
        .unwrap();

    let t2 = store.create_token(Role::Worker, 3600, CA_HASH).await.unwrap();
    let before = counts(&store).await;
    assert_eq!(before.revision, 1);

    // Same name, new keys.
    let err = store
        .register_node(&Agent::new("first").new_node(&t2.token), default_pools())
        .await
        .unwrap_err();
    assert!(matches!(&err, RegisterError::NameTaken(n) if n == "first"), "{err:?}");
    assert!(err.to_string().starts_with("name: "), "{err}");
    assert_eq!(counts(&store).await, before);
    assert_eq!(token_state(&store, &t2.id).await, TokenState::Valid);

    // Same WireGuard key under another name.
    let mut dup_wg = Agent::new("second").new_node(&t2.token);
    dup_wg.wg_public_key = first.wg_public.clone();
    let err = store.register_node(&dup_wg, default_pools()).await.unwrap_err();
    assert!(matches!(err, RegisterError::KeyTaken("wg_public_key")), "{err:?}");
    assert!(err.to_string().starts_with("wg_public_key: "), "{err}");
    assert_eq!(counts(&store).await, before);
    assert_eq!(token_state(&store, &t2.id).await, TokenState::Valid);

    // Same signing key under another name.
    let mut dup_sign = Agent::new("second").new_node(&t2.token);
    dup_sign.signing_key = first.signing_key_b64();
    let err = store.register_node(&dup_sign, default_pools()).await.unwrap_err();
    assert!(matches!(err, RegisterError::KeyTaken("signing_key")), "{err:?}");
    assert_eq!(counts(&store).await, before);

    // Proxy flag against a worker token.
    let mut proxy = Agent::new("second").new_node(&t2.token);
    proxy.proxy = true;
    let err = store.register_node(&proxy, default_pools()).await.unwrap_err();
    assert!(
        matches!(err, RegisterError::RoleMismatch { token: "worker", .. }),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("proxy: "), "{err}");
    assert_eq!(counts(&store).await, before);

    // Unknown token id.
    let mut unknown = Agent::new("second").new_node(&t2.token);
    unknown.token_id = "zzzzzzzz".into();
    let err = store.register_node(&unknown, default_pools()).await.unwrap_err();
    assert!(matches!(err, RegisterError::UnknownToken), "{err:?}");
    assert_eq!(counts(&store).await, before);

    // After all that the token still works, exactly once.
    let (node, rev) = store
        .register_node(&Agent::new("second").new_node(&t2.token), default_pools())
        .await
        .unwrap();
    assert_eq!(rev, 2);
    assert_eq!(node.revision, 2);
    assert_eq!(token_state(&store, &t2.id).await, TokenState::Used);
}

async fn exhausted_pools_refuse_and_change_nothing(db: &Db) {
    let store = db.store().await;
    // Two mesh addresses (a /30) and two /24 subnets (a /23).
    let tight = Pools {
        mesh: "10.9.0.0/30".parse().unwrap(),
        subnets: "10.10.0.0/23".parse().unwrap(),
        subnet_prefix: 24,
    };
    let mut got = vec![];
    for name in ["one", "two"] {
        let t = store.create_token(Role::Worker, 3600, CA_HASH).await.unwrap();
        let (node, _) = store
            .register_node(&Agent::new(name).new_node(&t.token), tight)
            .await
            .unwrap();
        got.push((node.mesh_ip.to_string(), node.subnet.to_string()));
    }
    assert_eq!(
        got,
        [
            ("10.9.0.1".to_string(), "10.10.0.0/24".to_string()),
            ("10.9.0.2".to_string(), "10.10.1.0/24".to_string())
        ]
    );
    let t = store.create_token(Role::Worker, 3600, CA_HASH).await.unwrap();
    let before = counts(&store).await;
    let err = store
        .register_node(&Agent::new("three").new_node(&t.token), tight)
        .await
        .unwrap_err();
    assert!(matches!(err, RegisterError::PoolExhausted("mesh")), "{err:?}");
    assert_eq!(counts(&store).await, before);
    assert_eq!(token_state(&store, &t.id).await, TokenState::Valid);

    // Room for mesh IPs but not for subnets.
    let wide_mesh = Pools {
        mesh: "10.9.0.0/24".parse().unwrap(),
        ..tight
    };
    let err = store
        .register_node(&Agent::new("three").new_node(&t.token), wide_mesh)
        .await
        .unwrap_err();
    assert!(matches!(err, RegisterError::PoolExhausted("subnet")), "{err:?}");
    assert_eq!(counts(&store).await, before);
    assert_eq!(token_state(&store, &t.id).await, TokenState::Valid);

    // Freeing a node frees its addresses for the next one.
    store.remove_node("one", 30).await.unwrap().unwrap();
    let (node, _) = store
        .register_node(&Agent::new("three").new_node(&t.token), tight)
        .await
        .unwrap();
    assert_eq!(node.mesh_ip.to_string(), "10.9.0.1");
    assert_eq!(node.subnet.to_string(), "10.10.0.0/24");
}

async fn removing_a_node_moves_everyone_else(db: &Db) {
    let store = db.store().await;
    for name in ["a", "b", "c"] {
        let t = store.create_token(Role::Worker, 3600, CA_HASH).await.unwrap();
        store
            .register_node(&Agent::new(name).new_node(&t.token), default_pools())
            .await
            .unwrap();
    }
    assert_eq!(store.revision().await.unwrap(), 3);
    let rev = store.remove_node("b", 30).await.unwrap().expect("b existed");
    assert_eq!(rev, 4);
    assert_eq!(store.revision().await.unwrap(), 4);
    let nodes = store.list_nodes().await.unwrap();
    assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["a", "c"]);
    assert!(nodes.iter().all(|n| n.revision == 4), "{nodes:?}");

    let before = counts(&store).await;
    assert_eq!(store.remove_node("b", 30).await.unwrap(), None, "already gone");
    assert_eq!(store.remove_node("nosuch", 30).await.unwrap(), None);
    assert_eq!(counts(&store).await, before, "removing nothing moves nothing");
}

async fn nonces_detect_replays_and_expire(db: &Db) {
    let store = db.store().await;
    let t = now();
    assert!(store.record_nonce("n1", "aaaa", t + 300).await.unwrap());
    assert!(
        !store.record_nonce("n1", "aaaa", t + 300).await.unwrap(),
        "a replayed nonce"
    );
    assert!(
        store.record_nonce("n2", "aaaa", t + 300).await.unwrap(),
        "nonces are per node"
    );
    assert!(store.record_nonce("n1", "old", t - 10).await.unwrap());

    assert_eq!(store.prune_nonces(t).await.unwrap(), 1, "only the expired nonce goes");
    assert!(
        !store.record_nonce("n1", "aaaa", t + 300).await.unwrap(),
        "unexpired nonces stay"
    );
    assert!(
        store.record_nonce("n1", "old", t + 300).await.unwrap(),
        "a pruned nonce is forgotten"
    );
    assert_eq!(store.prune_nonces(t + 1000).await.unwrap(), 3);
    assert_eq!(store.prune_nonces(t + 1000).await.unwrap(), 0);
}

/// `Replay` (memory and write-behind on SQLite, the store on PostgreSQL):
/// a nonce accepted before a restart is refused after it, an expired one
/// is not kept, and a nonce of another node is its own.
async fn replayed_nonces_are_refused_after_a_restart(db: &Db) {
    use berth_control_plane::replay::Replay;
    let store = db.store().await;
    let t = now();
    let replay = Replay::new(store.clone()).await.unwrap();
    assert!(replay.fresh("n1", "aaaa", t + 300).await.unwrap());
    assert!(!replay.fresh("n1", "aaaa", t + 300).await.unwrap(), "a replay");
    assert!(
        replay.fresh("n2", "aaaa", t + 300).await.unwrap(),
        "nonces are per node"
    );
    assert!(replay.fresh("n1", "spent", t - 10).await.unwrap());
    replay.flush(t).await.unwrap();
    assert!(
        !replay.fresh("n1", "aaaa", t + 300).await.unwrap(),
        "still refused after the write"
    );

    let restarted = Replay::new(store.clone()).await.unwrap();
    assert!(
        !restarted.fresh("n1", "aaaa", t + 300).await.unwrap(),
        "refused after a restart"
    );
    assert!(!restarted.fresh("n2", "aaaa", t + 300).await.unwrap());
    assert!(restarted.fresh("n1", "bbbb", t + 300).await.unwrap());
    let live: HashSet<(String, String)> = store
        .live_nonces(t)
        .await
        .unwrap()
        .into_iter()
        .map(|(node, nonce, _)| (node, nonce))
        .collect();
    assert!(live.contains(&("n1".into(), "aaaa".into())));
    assert!(
        !live.contains(&("n1".into(), "spent".into())),
        "an expired nonce is not live"
    );
}

/// Registers nodes `(name, fingerprint)`, each with one report recorded in
/// full (applied revision 1) under that fingerprint; returns their ids.
async fn nodes_reported(store: &Store, nodes: &[(&str, u64)]) -> Vec<String> {
    let mut ids = vec![];
    for &(name, fingerprint) in nodes {
        let t = store.create_token(Role::Worker, 3600, CA_HASH).await.unwrap();
        let (node, _) = store
            .register_node(&Agent::new(name).new_node(&t.token), default_pools())
            .await
            .unwrap();
        let report = berth_protocol::StatusReport {
            applied_revision: 1,
            ..Default::default()
        };
        store.record_status(&node.id, &report, fingerprint).await.unwrap();
        ids.push(node.id);
    }
    ids
}

/// `record_seen`, the heartbeats' batched write: times and applied
/// revisions land in one go, only where the store holds the report they
/// repeat, and an older time never overwrites a newer one.
async fn heartbeats_written_behind_never_move_back(db: &Db) {
    use berth_control_plane::heartbeats::Seen;
    let store = db.store().await;
    // Fingerprints 7 and, for c, one above u64's signed half.
    let ids = nodes_reported(&store, &[("a", 7), ("b", 7), ("c", u64::MAX - 3)]).await;
    let seen = |at, applied_revision, fingerprint| Seen {
        at,
        applied_revision,
        fingerprint,
    };
    let t = now() + 100;
    let batch = [
        (ids[0].clone(), seen(t, 2, 7)),
        (ids[1].clone(), seen(t + 1, 2, 7)),
        (ids[2].clone(), seen(t, 2, u64::MAX - 3)),
    ]
    .into();
    let written = store.record_seen(&batch).await.unwrap().written;
    assert_eq!(written, ids.iter().cloned().collect::<HashSet<_>>());
    let older = [(ids[1].clone(), seen(t - 5, 1, 7))].into();
    assert!(store.record_seen(&older).await.unwrap().written.is_empty());
    // a's store holds another report now (another control plane's).
    let stale = [(ids[0].clone(), seen(t + 10, 3, 8))].into();
    let done = store.record_seen(&stale).await.unwrap();
    assert!(
        done.written.is_empty() && done.busy.is_empty(),
        "a time repeating a report the store no longer holds is refused: {done:?}"
    );
    let nodes = store.list_nodes().await.unwrap();
    let row = |name: &str| nodes.iter().find(|n| n.name == name).unwrap();
    assert_eq!((row("a").last_seen, row("a").applied_revision), (Some(t), 2));
    assert_eq!(
        (row("b").last_seen, row("b").applied_revision),
        (Some(t + 1), 2),
        "the older write changed nothing"
    );
    assert_eq!((row("c").last_seen, row("c").applied_revision), (Some(t), 2));
}

/// PostgreSQL: the heartbeats' batch waits for no row a change holds (a
/// change locks every node's row in an order of its own, and two writers
/// waiting on each other deadlock for a second). It leaves such a row for
/// later, and writes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_skip_rows_a_change_holds() {
    use berth_control_plane::heartbeats::Seen;
    use sqlx::Connection;
    let Some(db) = Db::postgres().await else {
        return;
    };
    let store = db.store().await;
    let ids = nodes_reported(&store, &[("a", 7), ("b", 7)]).await;
    let mut change = sqlx::postgres::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut change).await.unwrap();
    sqlx::query("UPDATE nodes SET revision = revision WHERE id = $1")
        .bind(&ids[0])
        .execute(&mut change)
        .await
        .unwrap();
    let t = now() + 100;
    let seen = Seen {
        at: t,
        applied_revision: 4,
        fingerprint: 7,
    };
    let batch = [(ids[0].clone(), seen), (ids[1].clone(), seen)].into();
    let done = tokio::time::timeout(std::time::Duration::from_secs(10), store.record_seen(&batch))
        .await
        .expect("the batch waited for a locked row")
        .unwrap();
    assert_eq!(done.written, [ids[1].clone()].into());
    assert_eq!(done.busy, [ids[0].clone()].into());
    sqlx::query("ROLLBACK").execute(&mut change).await.unwrap();
    let done = store.record_seen(&batch).await.unwrap();
    assert_eq!(done.written, ids.iter().cloned().collect::<HashSet<_>>());
    assert!(done.busy.is_empty());
    let nodes = store.list_nodes().await.unwrap();
    assert!(
        nodes.iter().all(|n| n.last_seen == Some(t) && n.applied_revision == 4),
        "{nodes:?}"
    );
}
