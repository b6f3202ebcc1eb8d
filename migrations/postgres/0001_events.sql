-- The event log: the only source of truth. Rows are never updated or deleted.
CREATE TABLE events (
    position       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id      TEXT        NOT NULL,
    version        BIGINT      NOT NULL CHECK (version >= 1),
    event_id       UUID        NOT NULL UNIQUE,
    event_type     TEXT        NOT NULL,
    schema_version INTEGER     NOT NULL,
    payload        JSONB       NOT NULL,
    metadata       JSONB       NOT NULL,
    recorded_at    TIMESTAMPTZ NOT NULL,
    CONSTRAINT events_stream_version UNIQUE (stream_id, version)
);

CREATE FUNCTION events_are_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % is not allowed', TG_OP;
END;
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_immutable();

-- Idempotency: one row per (wallet in the path, client key). `outcome` is the
-- decided result (receipt or rejection); `position` is the log position the
-- append reached, NULL for a remembered rejection.
CREATE TABLE idempotency (
    wallet_id   TEXT        NOT NULL,
    key         TEXT        NOT NULL,
    fingerprint TEXT        NOT NULL,
    outcome     JSONB       NOT NULL,
    position    BIGINT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (wallet_id, key)
);
