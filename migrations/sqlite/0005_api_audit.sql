-- One row per mutating API request, written after the answer with the
-- status actually returned. Secrets in headers are redacted and every field
-- is bounded before it gets here (src/api/audit.rs). Events written by the
-- request carry `auditId` in their metadata.
CREATE TABLE api_audit (
    audit_id    TEXT    PRIMARY KEY,
    recorded_at TEXT    NOT NULL,
    method      TEXT    NOT NULL,
    path        TEXT    NOT NULL,
    status      INTEGER NOT NULL,
    wallet_id   TEXT,
    request_id  TEXT,
    client_ip   TEXT,
    headers     TEXT    NOT NULL,
    body        TEXT    NOT NULL,
    duration_ms BIGINT  NOT NULL
);
CREATE INDEX api_audit_wallet ON api_audit (wallet_id, recorded_at);
