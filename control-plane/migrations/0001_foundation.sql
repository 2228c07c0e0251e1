-- One schema for SQLite and PostgreSQL: TEXT ids, BIGINT times (unix seconds).

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- The cluster-wide revision sequence. Every change that affects a node's
-- desired state takes the next value and stamps it on the affected nodes.
CREATE TABLE revision_counter (
    id    INTEGER PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO revision_counter (id, value) VALUES (1, 0);

CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    role        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    revoked_at  BIGINT,
    used_at     BIGINT,
    used_by     TEXT
);

CREATE TABLE nodes (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    role             TEXT NOT NULL,
    signing_key      TEXT NOT NULL UNIQUE,
    wg_public_key    TEXT NOT NULL UNIQUE,
    wg_port          BIGINT NOT NULL,
    private_addr     TEXT,
    public_ip        TEXT,
    mesh_ip          TEXT NOT NULL UNIQUE,
    subnet           TEXT NOT NULL UNIQUE,
    revision         BIGINT NOT NULL,
    applied_revision BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    last_seen        BIGINT,
    agent_version    TEXT,
    status_json      TEXT,
    last_error       TEXT
);

-- Nonces of signed requests, kept until their timestamp can no longer pass
-- the freshness check, so a captured request cannot be replayed.
CREATE TABLE nonces (
    node_id    TEXT NOT NULL,
    nonce      TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (node_id, nonce)
);
CREATE INDEX nonces_expiry ON nonces (expires_at);
