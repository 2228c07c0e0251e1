-- Proxy nodes: the domains berth-proxy has loaded (an HTTP route with its
-- certificate, or a passthrough route), as a JSON array of names, from the
-- node's last status report. NULL: not reported (workers, older agents).
-- `berth domain list` counts the online proxies serving each domain.

ALTER TABLE nodes ADD COLUMN served_domains TEXT;
