-- `berth service restart`: a release of the same spec whose replicas are
-- all replaced (a same-spec release otherwise keeps them, as a scale does).
ALTER TABLE releases ADD COLUMN restart BIGINT NOT NULL DEFAULT 0;
