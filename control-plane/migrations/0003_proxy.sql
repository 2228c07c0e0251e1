-- Proxy nodes: public domains, TCP routes, certificates and pending ACME
-- challenges. Certificate keys are sealed to the control plane's own key
-- (DATA_DIR/secrets.key), like service secrets, and resealed to each proxy.

CREATE TABLE domains (
    domain          TEXT PRIMARY KEY,
    service         TEXT NOT NULL,
    port            BIGINT NOT NULL,
    passthrough     BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL,
    cert_chain      TEXT,
    cert_key_sealed TEXT,
    cert_not_before BIGINT,
    cert_not_after  BIGINT,
    last_error      TEXT,
    -- The ACME task skips the domain until then; also its lease while an
    -- order is in flight, so replicas sharing PostgreSQL never both order.
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    failures        BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE tcp_routes (
    listen     BIGINT PRIMARY KEY,
    service    TEXT NOT NULL,
    port       BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Challenges every proxy must answer while an order is pending.
CREATE TABLE acme_challenges (
    id                TEXT PRIMARY KEY,
    domain            TEXT NOT NULL,
    kind              TEXT NOT NULL,
    token             TEXT NOT NULL,
    key_authorization TEXT NOT NULL,
    created_at        BIGINT NOT NULL
);
