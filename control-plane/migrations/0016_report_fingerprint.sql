-- What the node's last fully recorded status report said (a hash, see
-- heartbeats.rs): a report kept in memory is written behind only where
-- the store still holds that, so control planes sharing a store never
-- write a stale report's time over another one's newer record.
ALTER TABLE nodes ADD COLUMN report_fingerprint BIGINT;
