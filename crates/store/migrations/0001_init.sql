-- tsunagu-store schema, version 1 (SQLite dialect).
--
-- Portability rules (so a PostgreSQL migration set can mirror this one):
--   * timestamps are BIGINT milliseconds since the Unix epoch, UTC;
--   * lists and JSON documents are TEXT holding JSON;
--   * booleans are BOOLEAN (SQLite stores 0/1);
--   * only the id columns are dialect-specific (INTEGER PRIMARY KEY AUTOINCREMENT here,
--     BIGINT GENERATED ALWAYS AS IDENTITY there). AUTOINCREMENT: a deleted row's id is
--     never handed out again (node ids are stable identities for peers).

CREATE TABLE users (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL UNIQUE,
    created_at  BIGINT  NOT NULL
);

CREATE TABLE pre_auth_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    -- public part of the key: tskey-auth-<key_id>-<secret>
    key_id      TEXT    NOT NULL UNIQUE,
    -- hex SHA-256 of the whole key string; the key itself is never stored
    key_hash    TEXT    NOT NULL,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    reusable    BOOLEAN NOT NULL,
    ephemeral   BOOLEAN NOT NULL,
    used_count  BIGINT  NOT NULL DEFAULT 0,
    expires_at  BIGINT,
    tags        TEXT    NOT NULL DEFAULT '[]',
    created_at  BIGINT  NOT NULL
);
CREATE INDEX pre_auth_keys_user ON pre_auth_keys(user_id);

CREATE TABLE nodes (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_key        TEXT    NOT NULL UNIQUE,
    node_key           TEXT    NOT NULL UNIQUE,
    disco_key          TEXT    NOT NULL DEFAULT '',
    -- NULL when the node is owned by its tags
    user_id            INTEGER REFERENCES users(id) ON DELETE RESTRICT,
    tags               TEXT    NOT NULL DEFAULT '[]',
    hostname           TEXT    NOT NULL,
    given_name         TEXT    NOT NULL UNIQUE,
    -- host index inside 100.64.0.0/10; ipv4 and ipv6 are derived from it
    addr_index         BIGINT  NOT NULL UNIQUE,
    ipv4               TEXT    NOT NULL UNIQUE,
    ipv6               TEXT    NOT NULL UNIQUE,
    hostinfo           TEXT    NOT NULL DEFAULT '{}',
    endpoints          TEXT    NOT NULL DEFAULT '[]',
    advertised_routes  TEXT    NOT NULL DEFAULT '[]',
    approved_routes    TEXT    NOT NULL DEFAULT '[]',
    ephemeral          BOOLEAN NOT NULL DEFAULT FALSE,
    auth_key_id        INTEGER REFERENCES pre_auth_keys(id) ON DELETE SET NULL,
    expiry             BIGINT,
    created_at         BIGINT  NOT NULL,
    last_seen          BIGINT,
    authorized         BOOLEAN NOT NULL DEFAULT TRUE,
    CHECK (user_id IS NOT NULL OR tags <> '[]'),
    CHECK (addr_index > 0 AND addr_index < 4194303)
);
CREATE INDEX nodes_user ON nodes(user_id);

CREATE TABLE pending_registrations (
    token             TEXT    PRIMARY KEY,
    machine_key       TEXT    NOT NULL,
    node_key          TEXT    NOT NULL,
    hostinfo          TEXT    NOT NULL DEFAULT '{}',
    created_at        BIGINT  NOT NULL,
    expires_at        BIGINT  NOT NULL,
    approved_node_id  INTEGER REFERENCES nodes(id) ON DELETE SET NULL
);
CREATE INDEX pending_registrations_machine ON pending_registrations(machine_key);

-- One row at most (id = 1): the current ACL policy document, verbatim.
CREATE TABLE policy (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    body        TEXT    NOT NULL,
    updated_at  BIGINT  NOT NULL
);
