-- Tamper evidence: each event stores the SHA-256 of (the previous event's
-- hash in its stream, this event's canonical encoding). See src/store/chain.rs.
ALTER TABLE events ADD COLUMN hash TEXT;

-- Snapshots: a wallet's folded state at some stream version, postcard-encoded.
-- A snapshot whose schema_version is not the current one is ignored.
CREATE TABLE snapshots (
    stream_id      TEXT    NOT NULL,
    version        BIGINT  NOT NULL,
    position       BIGINT  NOT NULL,
    schema_version INTEGER NOT NULL,
    state          BLOB   NOT NULL,
    created_at     TEXT    NOT NULL,
    PRIMARY KEY (stream_id, version)
);
