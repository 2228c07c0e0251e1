-- A service linked to a git repository and branch: a signed push webhook
-- for them builds and deploys the pushed commit.
CREATE TABLE git_links (
    service       TEXT PRIMARY KEY,
    url           TEXT NOT NULL,
    branch        TEXT NOT NULL,
    context       TEXT,
    dockerfile    TEXT,
    -- The webhook secret, sealed to the control plane's key.
    secret_sealed TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

-- Webhook deliveries already acted on (a redelivery builds nothing).
CREATE TABLE hook_deliveries (
    delivery    TEXT PRIMARY KEY,
    builds      TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
