-- The event stream (`berth events`): what happened, in order. `id` is the
-- time in microseconds, made unique per control-plane process; the stream
-- is read in its order. Old events are pruned (--event-retention).

CREATE TABLE events (
    id      BIGINT NOT NULL,
    at_ms   BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    service TEXT,
    node    TEXT,
    message TEXT NOT NULL
);

CREATE INDEX events_by_id ON events (id);
CREATE INDEX events_by_service ON events (service, id);
