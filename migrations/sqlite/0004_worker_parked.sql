-- Events the broker worker could not apply, per projection and wallet
-- stream. While a stream has a row here, the worker parks its later events
-- behind it (they go to the dead-letter queue too), so a wallet's read
-- models only ever see its events in order. `dlq replay` puts them back;
-- applying the oldest parked event deletes its row. A rebuild deletes the
-- rows it covered.
CREATE TABLE worker_parked (
    projection TEXT   NOT NULL,
    stream_id  TEXT   NOT NULL,
    position   BIGINT NOT NULL,
    reason     TEXT   NOT NULL,
    parked_at  TEXT   NOT NULL,
    PRIMARY KEY (projection, stream_id, position)
);
