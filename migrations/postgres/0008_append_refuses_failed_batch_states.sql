-- A request decided on the state an earlier request of the same batch left
-- must not be appended if that earlier request did not go through: its
-- state never was. Version and balance cannot always tell (a hold placed by
-- another process moves the version the same way and keeps the balance), so
-- each stream append now says whether it was decided on this batch's state
-- (`s_on_batch`), and such an append needs its stream to have been moved by
-- this batch. Otherwise the function is 0007's.

DROP FUNCTION wallet_append(bigint, integer, text[], text[], text[], text[], integer[], text[], bigint[], text[],
                            integer[], uuid[], text[], text[], text[], bytea[]);

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
    s_version        bigint[],  -- the head the request was decided on: version ...
    s_balance        text[],    -- ... and balance (4-decimal text)
    s_on_batch       boolean[], -- decided on the state an earlier request of this batch left
    -- one entry per event, grouped by stream append (1-based index)
    e_segment        integer[],
    e_id             uuid[],
    e_type           text[],
    e_payload        text[],
    e_metadata       text[],
    e_body           bytea[])
RETURNS TABLE (o_status text, o_positions bigint[], o_hashes text[], o_versions bigint[], o_balances text[],
               o_recorded_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    n_req integer := coalesce(array_length(r_fingerprint, 1), 0);
    n_seg integer := coalesce(array_length(s_stream, 1), 0);
    n_ev  integer := coalesce(array_length(e_id, 1), 0);
    at timestamptz;
    at_field bytea;
    -- Each distinct stream's head (version 0, balance 0 and hash '' if new),
    -- and for each stream append the index of its stream's head.
    h_stream text[]; h_version bigint[]; h_balance numeric[]; h_hash text[]; s_head integer[];
    -- Whether this batch has appended to the stream yet.
    h_moved boolean[];
    -- Keys taken, as wallet || chr(31) || key (wallet ids never hold chr(31)).
    taken text[];
    status text[] := '{}';
    row_first integer[] := '{}'; row_count integer[] := '{}';
    c_first integer[] := '{}'; c_count integer[] := '{}'; c_versions bigint[] := '{}'; c_balances text[] := '{}';
    a_stream text[] := '{}'; a_version bigint[] := '{}'; a_id uuid[] := '{}'; a_type text[] := '{}';
    a_payload text[] := '{}'; a_meta text[] := '{}'; a_hash text[] := '{}';
    positions bigint[] := '{}';
    seg integer := 1; ev integer := 1; first_seg integer; idx integer; n_rows integer := 0;
    v bigint; prev text; last_ev integer; verdict text;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_key);
    -- Taken under the lock: event time never decreases along the log.
    at := clock_timestamp();
    at_field := convert_to(to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), 'UTF8');
    at_field := int8send(length(at_field)::bigint) || at_field;

    -- One backward index probe per stream, however long the stream.
    SELECT coalesce(array_agg(d.id ORDER BY d.id), '{}'),
           coalesce(array_agg(coalesce(h.version, 0) ORDER BY d.id), '{}'),
           coalesce(array_agg(coalesce(h.balance, 0) ORDER BY d.id), '{}'),
           coalesce(array_agg(coalesce(h.hash, '') ORDER BY d.id), '{}')
      INTO h_stream, h_version, h_balance, h_hash
      FROM (SELECT DISTINCT unnest(s_stream) AS id) d
      LEFT JOIN LATERAL (SELECT e.version, coalesce((e.payload ->> 'newBalance')::numeric, 0) AS balance,
                                coalesce(e.hash, '') AS hash
                           FROM events e WHERE e.stream_id = d.id ORDER BY e.version DESC LIMIT 1) h ON true;
    h_moved := array_fill(false, ARRAY[coalesce(array_length(h_stream, 1), 0)]);
    SELECT coalesce(array_agg(h.i ORDER BY u.seg), '{}') INTO s_head
      FROM unnest(s_stream) WITH ORDINALITY AS u(id, seg)
      JOIN unnest(h_stream) WITH ORDINALITY AS h(id, i) ON h.id = u.id;
    -- One primary-key probe per key.
    SELECT coalesce(array_agg(q.w || chr(31) || q.k), '{}') INTO taken
      FROM unnest(r_key_wallet, r_key) AS q(w, k)
     WHERE q.k IS NOT NULL
       AND EXISTS (SELECT 1 FROM idempotency i WHERE i.wallet_id = q.w AND i.key = q.k);

    FOR r IN 1 .. n_req LOOP
        verdict := 'ok';
        first_seg := seg;
        WHILE seg <= n_seg AND s_request[seg] = r LOOP
            seg := seg + 1;
        END LOOP;
        IF r_key[r] IS NOT NULL AND r_key_wallet[r] || chr(31) || r_key[r] = ANY (taken) THEN
            verdict := 'duplicate';
        ELSE
            FOR s IN first_seg .. seg - 1 LOOP
                idx := s_head[s];
                IF h_version[idx] <> s_version[s] OR h_balance[idx] <> s_balance[s]::numeric
                   OR (s_on_batch[s] AND NOT h_moved[idx]) THEN
                    verdict := 'conflict';
                END IF;
            END LOOP;
        END IF;
        IF verdict = 'ok' AND r_key[r] IS NOT NULL THEN
            taken := taken || (r_key_wallet[r] || chr(31) || r_key[r]);
        END IF;
        status := status || verdict;
        row_first := row_first || (n_rows + 1);
        c_first := c_first || (coalesce(array_length(c_versions, 1), 0) + 1);
        c_count := c_count || CASE WHEN verdict = 'conflict' THEN seg - first_seg ELSE 0 END;
        IF verdict = 'conflict' THEN
            FOR s IN first_seg .. seg - 1 LOOP
                c_versions := c_versions || h_version[s_head[s]];
                c_balances := c_balances || h_balance[s_head[s]]::text;
            END LOOP;
        END IF;

        FOR s IN first_seg .. seg - 1 LOOP
            idx := s_head[s];
            prev := h_hash[idx];
            v := s_version[s];
            last_ev := NULL;
            WHILE ev <= n_ev AND e_segment[ev] = s LOOP
                IF verdict = 'ok' THEN
                    v := v + 1;
                    -- The previous hash is hex: its characters are its bytes.
                    prev := encode(sha256(int8send(octet_length(prev)::bigint) || convert_to(prev, 'UTF8') ||
                                          e_body[ev] || at_field), 'hex');
                    a_stream := a_stream || s_stream[s]; a_version := a_version || v; a_id := a_id || e_id[ev];
                    a_type := a_type || e_type[ev]; a_payload := a_payload || e_payload[ev];
                    a_meta := a_meta || e_metadata[ev]; a_hash := a_hash || prev;
                    n_rows := n_rows + 1;
                    last_ev := ev;
                END IF;
                ev := ev + 1;
            END LOOP;
            IF last_ev IS NOT NULL THEN
                h_version[idx] := v; h_hash[idx] := prev; h_moved[idx] := true;
                h_balance[idx] := coalesce((e_payload[last_ev]::jsonb ->> 'newBalance')::numeric, 0);
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
        o_positions := positions[row_first[r] : row_first[r] + row_count[r] - 1];
        o_hashes := a_hash[row_first[r] : row_first[r] + row_count[r] - 1];
        IF status[r] = 'conflict' THEN
            o_versions := c_versions[c_first[r] : c_first[r] + c_count[r] - 1];
            o_balances := c_balances[c_first[r] : c_first[r] + c_count[r] - 1];
        ELSE
            o_versions := NULL; o_balances := NULL;
        END IF;
        o_recorded_at := at;
        RETURN NEXT;
    END LOOP;
END;
$$;
