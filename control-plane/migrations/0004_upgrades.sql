-- Agent upgrades asked for with `berth nodes upgrade`: the version each node
-- should run, and the rollout waiting for its canary.

ALTER TABLE nodes ADD COLUMN target_version TEXT;

CREATE TABLE rollouts (
    version     TEXT PRIMARY KEY,
    canary_id   TEXT NOT NULL,
    started_at  BIGINT NOT NULL
);
