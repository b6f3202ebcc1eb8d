-- The group-commit append in one statement (one round trip, see
-- src/store/postgres.rs). Under the append lock it reads the stream heads and
-- the idempotency keys of the whole batch, decides each request in order
-- (expected versions, then key), links the accepted events into their
-- streams' hash chains, inserts them and their idempotency rows with one
-- statement each, and returns one row per request, in order.
--
-- The hash is the one src/store/chain.rs defines (which `verify` checks):
-- SHA-256 over length-prefixed fields: the previous hash, the event's fields
-- (encoded by the service, `e_body`: chain::body) and the time, which is only
-- known here, under the lock.

CREATE FUNCTION wallet_append(
    p_lock_key       bigint,
    p_schema_version integer,
    -- one entry per request (key NULL: no idempotency record)
    r_key_wallet     text[],
    r_key            text[],
    r_fingerprint    text[],
    r_outcome        text[],
    -- one entry per stream append, grouped by request (1-based request index)
    s_request        integer[],
    s_stream         text[],
    s_expected       bigint[],
    s_last           uuid[],   -- the stream's newest event must be this one (NULL: any)
    -- one entry per event, grouped by stream append (1-based index)
    e_segment        integer[],
    e_id             uuid[],
    e_type           text[],
    e_payload        text[],
    e_metadata       text[],
    e_body           bytea[])
RETURNS TABLE (o_status text, o_stream text, o_actual bigint, o_positions bigint[], o_hashes text[],
               o_recorded_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    n_req integer := coalesce(array_length(r_fingerprint, 1), 0);
    n_seg integer := coalesce(array_length(s_stream, 1), 0);
    n_ev  integer := coalesce(array_length(e_id, 1), 0);
    at timestamptz;
    at_field bytea;
    -- Each distinct stream's head (version 0, hash '' and no event if new),
    -- and for each stream append the index of its stream's head: no search.
    h_stream text[]; h_version bigint[]; h_hash text[]; h_event uuid[]; s_head integer[];
    -- Keys taken, as wallet || chr(31) || key (wallet ids never hold chr(31)).
    taken text[];
    status text[] := '{}'; c_stream text[] := '{}'; c_actual bigint[] := '{}';
    row_first integer[] := '{}'; row_count integer[] := '{}';
    a_stream text[] := '{}'; a_version bigint[] := '{}'; a_id uuid[] := '{}'; a_type text[] := '{}';
    a_payload text[] := '{}'; a_meta text[] := '{}'; a_hash text[] := '{}';
    positions bigint[] := '{}';
    seg integer := 1; ev integer := 1; first_seg integer; idx integer; n_rows integer := 0;
    cur bigint; v bigint; prev text; last_id uuid; verdict text; bad_stream text; bad_actual bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_key);
    -- Taken under the lock: event time never decreases along the log.
    at := clock_timestamp();
    at_field := convert_to(to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), 'UTF8');
    at_field := int8send(length(at_field)::bigint) || at_field;

    -- One index probe per stream (newest version first), however long the stream.
    SELECT coalesce(array_agg(d.id ORDER BY d.id), '{}'), coalesce(array_agg(coalesce(h.version, 0) ORDER BY d.id), '{}'),
           coalesce(array_agg(coalesce(h.hash, '') ORDER BY d.id), '{}'), coalesce(array_agg(h.event_id ORDER BY d.id), '{}')
      INTO h_stream, h_version, h_hash, h_event
      FROM (SELECT DISTINCT unnest(s_stream) AS id) d
      LEFT JOIN LATERAL (SELECT e.version, coalesce(e.hash, '') AS hash, e.event_id FROM events e
                         WHERE e.stream_id = d.id ORDER BY e.version DESC LIMIT 1) h ON true;
    SELECT coalesce(array_agg(h.i ORDER BY u.seg), '{}') INTO s_head
      FROM unnest(s_stream) WITH ORDINALITY AS u(id, seg)
      JOIN unnest(h_stream) WITH ORDINALITY AS h(id, i) ON h.id = u.id;
    SELECT coalesce(array_agg(i.wallet_id || chr(31) || i.key), '{}') INTO taken
      FROM idempotency i JOIN unnest(r_key_wallet, r_key) AS q(w, k) ON i.wallet_id = q.w AND i.key = q.k;

    FOR r IN 1 .. n_req LOOP
        verdict := 'ok'; bad_stream := NULL; bad_actual := NULL;
        first_seg := seg;
        WHILE seg <= n_seg AND s_request[seg] = r LOOP
            IF verdict = 'ok' THEN
                idx := s_head[seg];
                cur := h_version[idx];
                IF cur <> s_expected[seg] OR (s_last[seg] IS NOT NULL AND h_event[idx] IS DISTINCT FROM s_last[seg]) THEN
                    verdict := 'conflict'; bad_stream := s_stream[seg]; bad_actual := cur;
                END IF;
            END IF;
            seg := seg + 1;
        END LOOP;
        IF verdict = 'ok' AND r_key[r] IS NOT NULL THEN
            IF r_key_wallet[r] || chr(31) || r_key[r] = ANY (taken) THEN
                verdict := 'duplicate';
            ELSE
                taken := taken || (r_key_wallet[r] || chr(31) || r_key[r]);
            END IF;
        END IF;
        status := status || verdict; c_stream := c_stream || bad_stream; c_actual := c_actual || bad_actual;
        row_first := row_first || (n_rows + 1);

        FOR s IN first_seg .. seg - 1 LOOP
            idx := s_head[s];
            prev := h_hash[idx];
            last_id := h_event[idx];
            v := s_expected[s];
            WHILE ev <= n_ev AND e_segment[ev] = s LOOP
                IF verdict = 'ok' THEN
                    v := v + 1;
                    -- The previous hash is hex: its characters are its bytes.
                    prev := encode(sha256(int8send(octet_length(prev)::bigint) || convert_to(prev, 'UTF8') ||
                                          e_body[ev] || at_field), 'hex');
                    a_stream := a_stream || s_stream[s]; a_version := a_version || v; a_id := a_id || e_id[ev];
                    a_type := a_type || e_type[ev]; a_payload := a_payload || e_payload[ev];
                    a_meta := a_meta || e_metadata[ev]; a_hash := a_hash || prev; last_id := e_id[ev];
                    n_rows := n_rows + 1;
                END IF;
                ev := ev + 1;
            END LOOP;
            IF verdict = 'ok' THEN
                h_version[idx] := v; h_hash[idx] := prev; h_event[idx] := last_id;
            END IF;
        END LOOP;
        row_count := row_count || (n_rows + 1 - row_first[r]);
    END LOOP;

    IF n_rows > 0 THEN
        -- Identity values are drawn in row order, which the ORDER BY fixes.
        WITH ins AS (
            INSERT INTO events (stream_id, version, event_id, event_type, schema_version, payload, metadata,
                                recorded_at, hash)
            SELECT u.s, u.v, u.i, u.t, p_schema_version, u.p::jsonb, u.m::jsonb, at, u.h
              FROM unnest(a_stream, a_version, a_id, a_type, a_payload, a_meta, a_hash)
                   WITH ORDINALITY AS u(s, v, i, t, p, m, h, n)
             ORDER BY u.n
            RETURNING events.position)
        SELECT array_agg(ins.position ORDER BY ins.position) INTO positions FROM ins;
    END IF;

    INSERT INTO idempotency (wallet_id, key, fingerprint, outcome, position)
    SELECT r_key_wallet[g.r], r_key[g.r], r_fingerprint[g.r], r_outcome[g.r]::jsonb,
           CASE WHEN row_count[g.r] > 0 THEN positions[row_first[g.r] + row_count[g.r] - 1] END
      FROM generate_series(1, n_req) AS g(r)
     WHERE status[g.r] = 'ok' AND r_key[g.r] IS NOT NULL;

    FOR r IN 1 .. n_req LOOP
        o_status := status[r];
        o_stream := c_stream[r];
        o_actual := c_actual[r];
        o_positions := positions[row_first[r] : row_first[r] + row_count[r] - 1];
        o_hashes := a_hash[row_first[r] : row_first[r] + row_count[r] - 1];
        o_recorded_at := at;
        RETURN NEXT;
    END LOOP;
END;
$$;
