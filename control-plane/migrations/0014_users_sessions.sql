-- Dashboard users (`berth users add`) and browser sessions (`POST
-- /v1/session`). A password is kept only as its Argon2id PHC string; a
-- session only as the SHA-256 (hex) of its cookie's secret, so a copy of
-- the store lets no one in. `user_name` is a user's name, or `admin` for
-- a sign-in with the admin token (no user may be called that).

CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

CREATE TABLE sessions (
    id         TEXT PRIMARY KEY,
    user_name  TEXT NOT NULL,
    csrf       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE INDEX sessions_by_user ON sessions (user_name);
CREATE INDEX sessions_by_expiry ON sessions (expires_at);
