-- Builds: an image built from an uploaded context on a builder node,
-- pushed to the fleet registry and released by digest. The context and
-- the log are files under DATA_DIR/builds; the row is the build's state.

CREATE TABLE builds (
    id             BIGINT PRIMARY KEY,
    service        TEXT NOT NULL,
    state          TEXT NOT NULL,
    -- The BuildRequest without secrets (spec.secrets emptied).
    request_json   TEXT NOT NULL,
    -- The request's secrets, sealed as a service's are; NULL: none given.
    secrets_sealed TEXT,
    arch           TEXT NOT NULL,
    created_by     TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    started_at     BIGINT,
    finished_at    BIGINT,
    node_id        TEXT,
    context_bytes  BIGINT,
    image          TEXT,
    release_number BIGINT,
    error          TEXT,
    timeout_secs   BIGINT NOT NULL
);

CREATE INDEX builds_by_state ON builds (state, id);
CREATE INDEX builds_by_service ON builds (service, id);
