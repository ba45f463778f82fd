-- The boundary between web users and the workers: what users can read, owner-scoped storage
-- keys with the upload recorded in the database, fair turns between owners, live-job quotas.

-- 1. Worker-only run state ---------------------------------------------------------------
-- Who runs a job, the backend's handle on it, the full error record and the upload record
-- live here, keyed by job. anon and authenticated have no grant on it, so the jobs table a
-- web user reads (supabase-js sends select=*) holds nothing internal.
--   attempt      the jobs.attempts value of the claim that wrote worker_id (the fence)
--   backend_ref  e.g. "<prompt id>@<ComfyUI URL>": lets the next attempt find running work
--   error_detail the operator's record of the last error (response bodies, instance URLs)
--   result       set as the upload completes: the images row to write ({storage_path,
--                sha256, bytes, ...}); a retry on any host links it instead of rendering again
CREATE TABLE imagen.job_runs (
    job_id       uuid PRIMARY KEY REFERENCES imagen.jobs (id) ON DELETE CASCADE,
    worker_id    uuid,
    attempt      integer NOT NULL DEFAULT 0,
    backend_ref  text,
    error_detail jsonb,
    result       jsonb,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT job_runs_result_object CHECK (result IS NULL OR jsonb_typeof(result) = 'object')
);

INSERT INTO imagen.job_runs (job_id, worker_id, attempt, backend_ref, error_detail)
SELECT id, worker_id, attempts, backend_ref, error_detail FROM imagen.jobs
WHERE worker_id IS NOT NULL OR backend_ref IS NOT NULL OR error_detail IS NOT NULL;

ALTER TABLE imagen.jobs DROP CONSTRAINT jobs_running_has_lease;
DROP INDEX imagen.jobs_worker;
ALTER TABLE imagen.jobs DROP COLUMN worker_id, DROP COLUMN backend_ref, DROP COLUMN error_detail;
ALTER TABLE imagen.jobs
    ADD CONSTRAINT jobs_running_has_lease CHECK (status <> 'running' OR lease_expires_at IS NOT NULL);

-- An image's host-side facts (the worker's local path, the backend's instance, prompt and
-- client ids) leave the readable sidecar.
CREATE TABLE imagen.image_internals (
    image_id         uuid PRIMARY KEY REFERENCES imagen.images (id) ON DELETE CASCADE,
    local_path       text,
    backend_metadata jsonb NOT NULL DEFAULT '{}'::jsonb
);

INSERT INTO imagen.image_internals (image_id, local_path, backend_metadata)
SELECT id, sidecar ->> 'local_path', coalesce(sidecar -> 'backend_metadata', '{}'::jsonb)
FROM imagen.images
WHERE sidecar ? 'local_path' OR sidecar ? 'backend_metadata';

UPDATE imagen.images SET sidecar = sidecar - 'local_path' - 'backend_metadata'
WHERE sidecar ? 'local_path' OR sidecar ? 'backend_metadata';

-- 2. Fair turns and quotas -----------------------------------------------------------------
-- Operator settings the database itself enforces (the workers' config is not visible here).
-- One row. max_live_jobs_per_owner: pending + running jobs one owner may have when inserting
-- as anon or authenticated (NULL: no limit). Change it with
--   UPDATE imagen.settings SET max_live_jobs_per_owner = 100;
CREATE TABLE imagen.settings (
    singleton               boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    max_live_jobs_per_owner integer CHECK (max_live_jobs_per_owner > 0)
);
INSERT INTO imagen.settings DEFAULT VALUES;

-- A job's turn: its place in the claim order after priority. Owners take turns: an owner with
-- live jobs gets the turn after its own latest one, and at least the turn after the head of
-- its queue (same backend and priority); an owner with nothing live goes just before the next
-- head turn (odd slots, first come first served). So one owner's backlog of 10,000 rows
-- delays another owner's single job by about one job. Written by the insert trigger only;
-- it costs two index probes, however long the owner's backlog.
ALTER TABLE imagen.jobs ADD COLUMN turn bigint NOT NULL DEFAULT 0;

DROP INDEX imagen.jobs_claim_default;
DROP INDEX imagen.jobs_claim_named;
CREATE INDEX jobs_claim_default ON imagen.jobs (priority DESC, turn, run_at, id)
    WHERE status = 'pending' AND backend IS NULL;
CREATE INDEX jobs_claim_named ON imagen.jobs (backend, priority DESC, turn, run_at, id)
    WHERE status = 'pending' AND backend IS NOT NULL;
-- An owner's live jobs: the turn and the quota of its next insert.
CREATE INDEX jobs_owner_live ON imagen.jobs (owner_user_id, turn)
    WHERE status IN ('pending', 'running');

-- Existing live rows: one owner's jobs in age order, interleaved with the other owners'.
WITH ranked AS (
    SELECT id, 2 * row_number() OVER (PARTITION BY owner_user_id, backend, priority
                                      ORDER BY run_at, id) AS turn
    FROM imagen.jobs WHERE status IN ('pending', 'running')
)
UPDATE imagen.jobs j SET turn = ranked.turn FROM ranked WHERE j.id = ranked.id;

-- SECURITY DEFINER: the head of the queue and the owner's live jobs are read past RLS (a
-- user sees only their own rows) and the settings row has no user grant. The caller is told
-- apart by the role its request switched to (PostgREST sets role = authenticated).
CREATE FUNCTION imagen.jobs_take_turn() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    head      bigint;
    last_turn bigint;
    live      bigint;
    lim       integer;
BEGIN
    IF NEW.status NOT IN ('pending', 'running') THEN
        RETURN NEW;
    END IF;
    IF coalesce(current_setting('role', true), 'none') IN ('anon', 'authenticated') THEN
        SELECT s.max_live_jobs_per_owner INTO lim FROM imagen.settings s;
    END IF;
    IF lim IS NOT NULL THEN
        -- Concurrent inserts of one owner queue here, so two cannot both take the last slot.
        PERFORM pg_advisory_xact_lock(hashtextextended('imagen.owner:' || NEW.owner_user_id, 0));
        SELECT count(*) INTO live FROM (
            SELECT 1 FROM imagen.jobs j
            WHERE j.owner_user_id = NEW.owner_user_id AND j.status IN ('pending', 'running')
            LIMIT lim
        ) counted;
        IF live >= lim THEN
            RAISE EXCEPTION 'too many live jobs: you already have % pending or running, the limit is %',
                            live, lim
                USING ERRCODE = 'check_violation',
                      HINT = 'wait for some to finish or cancel some, then submit again';
        END IF;
    END IF;
    SELECT j.turn INTO last_turn FROM imagen.jobs j
    WHERE j.owner_user_id = NEW.owner_user_id AND j.status IN ('pending', 'running')
    ORDER BY j.turn DESC LIMIT 1;
    IF NEW.backend IS NULL THEN
        SELECT j.turn INTO head FROM imagen.jobs j
        WHERE j.status = 'pending' AND j.backend IS NULL AND j.priority = NEW.priority
        ORDER BY j.priority DESC, j.turn LIMIT 1;
    ELSE
        SELECT j.turn INTO head FROM imagen.jobs j
        WHERE j.status = 'pending' AND j.backend IS NOT NULL AND j.backend = NEW.backend
          AND j.priority = NEW.priority
        ORDER BY j.backend, j.priority DESC, j.turn LIMIT 1;
    END IF;
    IF head IS NULL THEN
        -- Nothing waiting: go on from the turns being worked on, so turns never restart
        -- below an owner's live jobs.
        SELECT max(j.turn) INTO head FROM imagen.jobs j WHERE j.status = 'running';
    END IF;
    head := coalesce(head, 0);
    IF last_turn IS NULL THEN
        NEW.turn := ((head + 1) / 2) * 2 - 1;
    ELSE
        NEW.turn := greatest(head + 2, last_turn + 2);
        NEW.turn := NEW.turn + NEW.turn % 2;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER jobs_take_turn
    BEFORE INSERT ON imagen.jobs
    FOR EACH ROW EXECUTE FUNCTION imagen.jobs_take_turn();

-- 3. Grants ---------------------------------------------------------------------------------
ALTER TABLE imagen.job_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE imagen.image_internals ENABLE ROW LEVEL SECURITY;
ALTER TABLE imagen.settings ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON imagen.job_runs, imagen.image_internals, imagen.settings FROM PUBLIC, anon, authenticated;
GRANT ALL ON imagen.job_runs, imagen.image_internals, imagen.settings TO service_role;
REVOKE ALL ON FUNCTION imagen.jobs_take_turn() FROM PUBLIC;

-- 4. Storage: the key's first folder is its owner ---------------------------------------------
-- Keys are <owner id>/<job id>.<ext>: a signed-in user may read the objects in their own
-- folder. Objects stored before this migration (date-named keys) stay readable to the owner
-- of their imagen.images row.
DO $migration$
BEGIN
    IF to_regclass('storage.objects') IS NULL THEN
        RAISE NOTICE 'no storage.objects (not Supabase): skipping the storage read policy';
        RETURN;
    END IF;
    DROP POLICY IF EXISTS imagen_generated_select_own ON storage.objects;
    CREATE POLICY imagen_generated_select_own ON storage.objects
        FOR SELECT TO authenticated
        USING (
            bucket_id = 'imagen-generated'
            AND (
                split_part(name, '/', 1) = imagen.uid()::text
                OR EXISTS (
                    SELECT 1
                    FROM imagen.images AS i
                    WHERE i.storage_path = storage.objects.name
                      AND i.owner_user_id = imagen.uid()
                )
            )
        );
END
$migration$;
