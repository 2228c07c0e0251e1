-- A linked private repository: the builder's credential (a token or an
-- ssh deploy key, sealed to the control plane's key) and, for ssh, the
-- host's known_hosts lines.
ALTER TABLE git_links ADD COLUMN credential_sealed TEXT;
ALTER TABLE git_links ADD COLUMN known_hosts TEXT;
