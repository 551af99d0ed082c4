-- tsunagu-store schema, version 14 (SQLite dialect; portable statements only).
--
-- * One interactive registration per machine key: a node that asks again renews its row
--   instead of adding one (so anyone who completes the Noise handshake can hold at most
--   one row per machine key, and rows expire and are purged). Older duplicates go.
-- * Node rows carry a version, bumped by every UPDATE, so that the server's in-memory
--   cache never replaces a newer row with an older one read concurrently.

DELETE FROM pending_registrations
WHERE EXISTS (
    SELECT 1 FROM pending_registrations newer
    WHERE newer.machine_key = pending_registrations.machine_key
      AND (newer.created_at > pending_registrations.created_at
           OR (newer.created_at = pending_registrations.created_at
               AND newer.token > pending_registrations.token))
);
DROP INDEX pending_registrations_machine;
CREATE UNIQUE INDEX pending_registrations_machine_key ON pending_registrations(machine_key);
CREATE INDEX pending_registrations_expiry ON pending_registrations(expires_at);

ALTER TABLE nodes ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
