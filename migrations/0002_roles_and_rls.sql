-- Row-level security that works the same on Supabase and on plain PostgreSQL.
--
-- Supabase ships the roles anon, authenticated and service_role; plain PostgreSQL gets them
-- here (NOLOGIN) only where missing. The worker connects as the table owner (or Supabase's
-- postgres / service role), which bypasses RLS; end users reach the tables only through
-- authenticated, with the grants and policies below.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database of this cluster created it concurrently
            END;
        END IF;
    END LOOP;
END $$;

-- The caller's user id, read exactly as Supabase's auth.uid() reads it. Each setting is
-- nullif(..., '')'d on its own: once a connection has set a claim with set_config(..., true),
-- the setting reads '' (not NULL) in later transactions, and a stale empty legacy claim must
-- neither hide the current request.jwt.claims nor feed '' to the jsonb cast.
CREATE FUNCTION imagen.uid() RETURNS uuid
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        nullif(current_setting('request.jwt.claim.sub', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
    )::uuid
$$;

ALTER TABLE imagen.jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE imagen.images ENABLE ROW LEVEL SECURITY;
ALTER TABLE imagen.workers ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON ALL TABLES IN SCHEMA imagen FROM PUBLIC, anon, authenticated;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA imagen FROM PUBLIC;
GRANT USAGE ON SCHEMA imagen TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION imagen.uid() TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION imagen.notify_job_inserted(), imagen.notify_job_event(),
    imagen.on_cancel_requested() TO authenticated, service_role;
GRANT ALL ON ALL TABLES IN SCHEMA imagen TO service_role;
GRANT EXECUTE ON FUNCTION imagen.orphan_backends() TO service_role;

-- Users submit: only the request columns; everything the worker owns keeps its default.
GRANT INSERT (id, owner_user_id, prompt, negative_prompt, backend, style, width, height, steps,
              seed, params, dedupe_key) ON imagen.jobs TO authenticated;
-- Users cancel: the only column they may change.
GRANT UPDATE (cancel_requested) ON imagen.jobs TO authenticated;
GRANT SELECT ON imagen.jobs, imagen.images TO authenticated;

CREATE POLICY jobs_select_own ON imagen.jobs FOR SELECT TO authenticated
    USING (owner_user_id = imagen.uid());
CREATE POLICY jobs_insert_own ON imagen.jobs FOR INSERT TO authenticated
    WITH CHECK (owner_user_id = imagen.uid() AND status = 'pending');
CREATE POLICY jobs_cancel_own ON imagen.jobs FOR UPDATE TO authenticated
    USING (owner_user_id = imagen.uid())
    WITH CHECK (owner_user_id = imagen.uid());
CREATE POLICY images_select_own ON imagen.images FOR SELECT TO authenticated
    USING (owner_user_id = imagen.uid());
