-- Standby hosts of an exit node (same portability rules as 0001_init.sql).
--
-- An exit node (a node: one node key, tailnet addresses and name) may be held by further
-- hosts, each with its own machine key and control session. The node's own row keeps the
-- machine key of the host it was registered from; the others are listed here.

-- Single-use keys that let a host join a node as standby (`nodes standby add`). Only a
-- SHA-256 of each key is stored.
CREATE TABLE standby_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    -- public part: tskey-standby-<key_id>-<secret>
    key_id      TEXT    NOT NULL UNIQUE,
    key_hash    TEXT    NOT NULL,
    node_id     INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    expires_at  BIGINT  NOT NULL,
    -- the machine key of the host that redeemed it; NULL while unused
    used_by     TEXT,
    used_at     BIGINT,
    created_at  BIGINT  NOT NULL
);
CREATE INDEX standby_keys_node ON standby_keys(node_id);

CREATE TABLE standby_hosts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id      INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    machine_key  TEXT    NOT NULL UNIQUE,
    hostname     TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL
);
CREATE INDEX standby_hosts_node ON standby_hosts(node_id);

-- Which host serves a node that has standby hosts, and the last switch (no row: the
-- node's own host).
CREATE TABLE standby_active (
    node_id           INTEGER PRIMARY KEY REFERENCES nodes(id) ON DELETE CASCADE,
    machine_key       TEXT    NOT NULL,
    switched_at       BIGINT  NOT NULL,
    reason            TEXT    NOT NULL,
    from_machine_key  TEXT    NOT NULL DEFAULT ''
);
