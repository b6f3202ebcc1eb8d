-- The fence a lost batch's resolution commits after reading the batch back
-- (src/store/postgres.rs, PgWriter::find). Under synchronous replication a
-- commit is visible on the primary before a standby has it, and stays
-- visible when the waiting session is ended; a write that commits after the
-- read, and is acknowledged by the quorum, proves that everything before it
-- in the WAL (the batch among it) is on the quorum too. One row, updated in
-- place: the table never grows.
CREATE TABLE quorum_fence (
    id        INT PRIMARY KEY CHECK (id = 1),
    fenced_at TIMESTAMPTZ NOT NULL
);
INSERT INTO quorum_fence (id, fenced_at) VALUES (1, now());
