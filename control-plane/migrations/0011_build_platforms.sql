-- One platform of a multi-platform build: the build it is part of. The
-- parent (arch 'multi') is never claimed; its parts are, one per
-- platform, and it is released as their manifest list.
ALTER TABLE builds ADD COLUMN parent_id BIGINT;
