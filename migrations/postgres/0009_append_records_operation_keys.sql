-- An atomic batch records its operations' keys with its own, all under the
-- append lock and in the same transaction as its events: a request now
-- takes any number of keys (k_request: the 1-based request of each key,
-- ascending), and is a duplicate if any of them is recorded already (by an
-- earlier request or an earlier request of this batch). The rows it returns
-- are built in one grouped query instead of slicing the batch's arrays once
-- per request (each slice copied the whole array: quadratic in the batch's
-- size). Otherwise the function is 0008's.

DROP FUNCTION wallet_append(bigint, integer, text[], text[], text[], text[], integer[], text[], bigint[], text[],
                            boolean[], integer[], uuid[], text[], text[], text[], bytea[]);

CREATE FUNCTION wallet_append(
    p_lock_key       bigint,
    p_schema_version integer,
    p_requests       integer,
    -- one entry per key recorded, grouped by request (1-based request index)
    k_request        integer[],
    k_wallet         text[],
    k_key            text[],
    k_fingerprint    text[],
    k_outcome        text[],
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
    n_req integer := p_requests;
    n_key integer := coalesce(array_length(k_key, 1), 0);
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
    -- The request of each appended row.
    a_req integer[] := '{}';
    positions bigint[] := '{}';
    seg integer := 1; ev integer := 1; first_seg integer; idx integer; n_rows integer := 0;
    kc integer := 1; first_key integer;
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
      FROM unnest(k_wallet, k_key) AS q(w, k)
     WHERE EXISTS (SELECT 1 FROM idempotency i WHERE i.wallet_id = q.w AND i.key = q.k);

    FOR r IN 1 .. n_req LOOP
        verdict := 'ok';
        first_seg := seg;
        WHILE seg <= n_seg AND s_request[seg] = r LOOP
            seg := seg + 1;
        END LOOP;
        first_key := kc;
        WHILE kc <= n_key AND k_request[kc] = r LOOP
            IF k_wallet[kc] || chr(31) || k_key[kc] = ANY (taken) THEN
                verdict := 'duplicate';
            END IF;
            kc := kc + 1;
        END LOOP;
        IF verdict <> 'duplicate' THEN
            FOR s IN first_seg .. seg - 1 LOOP
                idx := s_head[s];
                IF h_version[idx] <> s_version[s] OR h_balance[idx] <> s_balance[s]::numeric
                   OR (s_on_batch[s] AND NOT h_moved[idx]) THEN
                    verdict := 'conflict';
                END IF;
            END LOOP;
        END IF;
        IF verdict = 'ok' THEN
            FOR k IN first_key .. kc - 1 LOOP
                taken := taken || (k_wallet[k] || chr(31) || k_key[k]);
            END LOOP;
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
                    a_meta := a_meta || e_metadata[ev]; a_hash := a_hash || prev; a_req := a_req || r;
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
    SELECT k_wallet[g.k], k_key[g.k], k_fingerprint[g.k], k_outcome[g.k]::jsonb,
           CASE WHEN row_count[g.r] > 0 THEN positions[row_first[g.r] + row_count[g.r] - 1] END
      FROM (SELECT g0.k, k_request[g0.k] AS r FROM generate_series(1, n_key) AS g0(k)) AS g
     WHERE status[g.r] = 'ok';

    -- Positions are drawn in row order, so the i-th position is the i-th row's.
    RETURN QUERY
    WITH appended AS (
        SELECT u.req, array_agg(u.pos ORDER BY u.n) AS pos, array_agg(u.link ORDER BY u.n) AS link
          FROM unnest(a_req, positions, a_hash) WITH ORDINALITY AS u(req, pos, link, n)
         GROUP BY u.req)
    SELECT status[g.req], a.pos, a.link,
           CASE WHEN status[g.req] = 'conflict'
                THEN c_versions[c_first[g.req] : c_first[g.req] + c_count[g.req] - 1] END,
           CASE WHEN status[g.req] = 'conflict'
                THEN c_balances[c_first[g.req] : c_first[g.req] + c_count[g.req] - 1] END,
           at
      FROM generate_series(1, n_req) AS g(req)
      LEFT JOIN appended AS a ON a.req = g.req
     ORDER BY g.req;
END;
$$;
