-- Where each projection (and each rebuild in progress, "<name>#rebuild") has
-- got to in the log. Updated in the same transaction as the read model.
-- The read-model tables themselves (rm_<name>) are created by the service:
-- they are disposable and rebuilt from the log.
CREATE TABLE projection_checkpoints (
    name       TEXT   PRIMARY KEY,
    position   BIGINT NOT NULL,
    updated_at TEXT   NOT NULL
);
