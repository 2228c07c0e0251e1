-- A multi-platform build's parts are looked up by it on every upload,
-- failure and cancel.
CREATE INDEX builds_parent_id ON builds (parent_id);
