-- Services and their replicas. Secrets are stored sealed to the control
-- plane's own key (DATA_DIR/secrets.key) and resealed to each node's key.

CREATE TABLE services (
    name           TEXT PRIMARY KEY,
    spec_json      TEXT NOT NULL,
    secrets_sealed TEXT,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

CREATE TABLE replicas (
    service      TEXT NOT NULL,
    ordinal      BIGINT NOT NULL,
    node_id      TEXT NOT NULL,
    ip           TEXT NOT NULL UNIQUE,
    state        TEXT,
    healthy      BIGINT NOT NULL DEFAULT 0,
    restarts     BIGINT NOT NULL DEFAULT 0,
    container_id TEXT,
    last_error   TEXT,
    PRIMARY KEY (service, ordinal)
);

ALTER TABLE nodes ADD COLUMN sealing_key TEXT;
