-- Releases: every change to a service, numbered per service and immutable
-- apart from its state. A release in state 'rolling' is a rollout; the
-- rollout driver keeps its progress here, so a restarted control plane
-- (or another replica on PostgreSQL, after the lease) carries it on.

CREATE TABLE releases (
    service        TEXT NOT NULL,
    number         BIGINT NOT NULL,
    spec_json      TEXT NOT NULL,
    secrets_sealed TEXT,
    image_digest   TEXT,
    created_at     BIGINT NOT NULL,
    created_by     TEXT NOT NULL,
    state          TEXT NOT NULL,
    reason         TEXT,
    finished_at    BIGINT,
    -- 1 when it needs new containers (0: a scale).
    rollout        BIGINT NOT NULL DEFAULT 0,
    -- The last complete release when it started (rolled back to on failure).
    from_release   BIGINT,
    -- 1 while rolling back to from_release after a failure.
    rolling_back   BIGINT NOT NULL DEFAULT 0,
    -- Serving replicas that must remain during the rollout.
    floor          BIGINT NOT NULL DEFAULT 0,
    -- Slot → stage and stage times, for progress output.
    steps_json     TEXT,
    -- Unix ms until which one control-plane process drives it.
    lease_until    BIGINT NOT NULL DEFAULT 0,
    lease_owner    TEXT,
    PRIMARY KEY (service, number)
);

INSERT INTO releases (service, number, spec_json, secrets_sealed, created_at, created_by, state, finished_at, rollout)
    SELECT name, 1, spec_json, secrets_sealed, created_at, 'admin', 'complete', updated_at, 1 FROM services;

-- The newest release and the last complete one; replica names come from a
-- per-service sequence, so a replacement never reuses a name.
ALTER TABLE services ADD COLUMN latest_release BIGINT NOT NULL DEFAULT 1;
ALTER TABLE services ADD COLUMN current_release BIGINT;
ALTER TABLE services ADD COLUMN next_replica BIGINT NOT NULL DEFAULT 1;
UPDATE services SET current_release = 1;

-- Replicas: a slot may hold an old and a new replica during a rollout.
CREATE TABLE replicas_v2 (
    service          TEXT NOT NULL,
    name             TEXT NOT NULL,
    slot             BIGINT NOT NULL,
    release          BIGINT NOT NULL,
    -- 'active' (in DNS and routes once healthy) or 'draining'.
    phase            TEXT NOT NULL DEFAULT 'active',
    node_id          TEXT NOT NULL,
    ip               TEXT NOT NULL UNIQUE,
    state            TEXT,
    healthy          BIGINT NOT NULL DEFAULT 0,
    restarts         BIGINT NOT NULL DEFAULT 0,
    container_id     TEXT,
    last_error       TEXT,
    created_ms       BIGINT NOT NULL DEFAULT 0,
    -- Unix ms it became healthy, and the revision that told the fleet.
    healthy_since_ms BIGINT,
    healthy_revision BIGINT,
    -- Unix ms and revision of the last phase change.
    phase_ms         BIGINT NOT NULL DEFAULT 0,
    phase_revision   BIGINT,
    -- What the node reports about its trouble (JSON: exit code, health output, log tail).
    trouble_json     TEXT,
    recreates        BIGINT NOT NULL DEFAULT 0,
    gave_up          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (service, name)
);

INSERT INTO replicas_v2 (service, name, slot, release, node_id, ip, state, healthy, restarts, container_id, last_error, healthy_since_ms, healthy_revision)
    SELECT service, service || '-' || CAST(ordinal + 1 AS TEXT), ordinal, 1, node_id, ip, state, healthy, restarts, container_id, last_error,
           CASE WHEN healthy <> 0 THEN 0 ELSE NULL END, CASE WHEN healthy <> 0 THEN 0 ELSE NULL END
    FROM replicas;
UPDATE services SET next_replica = COALESCE((SELECT MAX(slot) FROM replicas_v2 WHERE replicas_v2.service = services.name), -1) + 2;
DROP TABLE replicas;
ALTER TABLE replicas_v2 RENAME TO replicas;
