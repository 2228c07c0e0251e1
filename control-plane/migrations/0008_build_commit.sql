-- The commit a git build built (NULL for uploaded contexts).
ALTER TABLE builds ADD COLUMN git_commit TEXT;
