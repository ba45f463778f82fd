-- imagen-worker schema: the job queue and the images it produces.
-- Column names of imagen.jobs up to finished_at are the ones the web UI already writes.

CREATE SCHEMA IF NOT EXISTS imagen;

CREATE TABLE imagen.images (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_user_id     uuid NOT NULL,
    job_id            uuid UNIQUE,
    prompt            text NOT NULL,
    prompt_hash       text NOT NULL,
    backend           text NOT NULL,
    model             text,
    seed              bigint,
    steps             integer,
    width             integer,
    height            integer,
    latency_ms        integer CHECK (latency_ms >= 0),
    cost_usd_estimate numeric(12, 6),
    storage_path      text NOT NULL UNIQUE,
    mime_type         text NOT NULL,
    bytes             bigint NOT NULL CHECK (bytes >= 0),
    sha256            text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    sidecar           jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE imagen.jobs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_user_id    uuid NOT NULL,
    status           text NOT NULL DEFAULT 'pending',
    prompt           text NOT NULL,
    negative_prompt  text,
    backend          text,
    style            text,
    width            integer NOT NULL DEFAULT 1024,
    height           integer NOT NULL DEFAULT 1024,
    steps            integer,
    seed             bigint,
    params           jsonb NOT NULL DEFAULT '{}'::jsonb,
    image_id         uuid REFERENCES imagen.images (id),
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    -- queue columns
    priority         smallint NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 3,
    worker_id        uuid,
    lease_expires_at timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    progress         jsonb,
    error_detail     jsonb,
    backend_ref      text,
    dedupe_key       text,
    updated_at       timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT jobs_status_valid CHECK (status IN ('pending', 'running', 'done', 'failed', 'cancelled')),
    -- Not btrim(prompt) <> '': btrim strips spaces only, so a prompt of tabs, newlines or
    -- no-break spaces would pass. \s plus the Unicode spaces, independent of the locale.
    CONSTRAINT jobs_prompt_not_blank CHECK (
        prompt ~ '[^\s\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]'),
    CONSTRAINT jobs_prompt_length CHECK (char_length(prompt) <= 8000),
    CONSTRAINT jobs_negative_prompt_length CHECK (char_length(negative_prompt) <= 8000),
    CONSTRAINT jobs_width_valid CHECK (width BETWEEN 64 AND 4096 AND width % 8 = 0),
    CONSTRAINT jobs_height_valid CHECK (height BETWEEN 64 AND 4096 AND height % 8 = 0),
    CONSTRAINT jobs_steps_valid CHECK (steps BETWEEN 1 AND 200),
    CONSTRAINT jobs_seed_valid CHECK (seed BETWEEN 0 AND 9007199254740991),
    CONSTRAINT jobs_params_object CHECK (jsonb_typeof(params) = 'object'),
    CONSTRAINT jobs_params_size CHECK (pg_column_size(params) <= 65536),
    CONSTRAINT jobs_backend_name CHECK (char_length(backend) BETWEEN 1 AND 64),
    CONSTRAINT jobs_style_name CHECK (char_length(style) BETWEEN 1 AND 64),
    CONSTRAINT jobs_priority_range CHECK (priority BETWEEN -100 AND 100),
    CONSTRAINT jobs_attempts_valid CHECK (attempts >= 0),
    CONSTRAINT jobs_max_attempts_valid CHECK (max_attempts BETWEEN 1 AND 50),
    CONSTRAINT jobs_dedupe_key_length CHECK (char_length(dedupe_key) BETWEEN 1 AND 200),
    CONSTRAINT jobs_running_has_lease CHECK (
        status <> 'running' OR (worker_id IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT jobs_done_has_image CHECK (status <> 'done' OR image_id IS NOT NULL)
);

ALTER TABLE imagen.images
    ADD CONSTRAINT images_job_fk FOREIGN KEY (job_id) REFERENCES imagen.jobs (id) ON DELETE SET NULL;

-- The claim: runnable pending rows in priority order, then age, one backend at a time, so
-- another backend's backlog is never scanned. Jobs without a backend (the workers' default)
-- get their own index: `backend IS NULL` is no equality, so it could not use the ordering of
-- an index that leads with backend. The named index also serves the orphan check's loose scan
-- over distinct pending backends.
CREATE INDEX jobs_claim_default ON imagen.jobs (priority DESC, run_at, id)
    WHERE status = 'pending' AND backend IS NULL;
CREATE INDEX jobs_claim_named ON imagen.jobs (backend, priority DESC, run_at, id)
    WHERE status = 'pending' AND backend IS NOT NULL;
-- The safety poll: when does the next delayed job become runnable?
CREATE INDEX jobs_pending_run_at ON imagen.jobs (run_at) WHERE status = 'pending';
-- Lease recovery: the claim re-takes running rows whose lease expired.
CREATE INDEX jobs_claim_expired ON imagen.jobs (lease_expires_at) WHERE status = 'running';
-- Heartbeats and graceful release: one worker's running rows.
CREATE INDEX jobs_worker ON imagen.jobs (worker_id) WHERE status = 'running';
-- The web UI: a user's jobs, newest first.
CREATE INDEX jobs_owner_created ON imagen.jobs (owner_user_id, created_at DESC);
CREATE INDEX images_owner_created ON imagen.images (owner_user_id, created_at DESC);
-- Idempotent enqueue: one live job per key and owner (per owner, so one user cannot probe
-- another user's keys through unique violations).
CREATE UNIQUE INDEX jobs_dedupe_live ON imagen.jobs (owner_user_id, dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status IN ('pending', 'running');

-- Fleet registry: which backends each live worker serves, so a job naming a backend no
-- live worker serves is failed with a clear error instead of waiting forever.
CREATE TABLE imagen.workers (
    id           uuid PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    backends     text[] NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);

-- Backends named by pending jobs that no live worker serves: a loose index scan over distinct
-- backends (one probe of jobs_claim_named per backend, however long the backlog), minus the
-- live ones. JIT is off because the recursive query's inflated cost estimate would otherwise
-- spend milliseconds compiling a sub-millisecond query.
CREATE FUNCTION imagen.orphan_backends() RETURNS text[]
LANGUAGE sql STABLE SET jit = off AS $$
    WITH RECURSIVE pending_backends AS (
        (SELECT backend FROM imagen.jobs
         WHERE status = 'pending' AND backend IS NOT NULL ORDER BY backend LIMIT 1)
        UNION ALL
        SELECT (SELECT j.backend FROM imagen.jobs j
                WHERE j.status = 'pending' AND j.backend IS NOT NULL AND j.backend > p.backend
                ORDER BY j.backend LIMIT 1)
        FROM pending_backends p
        WHERE p.backend IS NOT NULL
    )
    SELECT coalesce(array_agg(backend), '{}') FROM pending_backends p
    WHERE backend IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM imagen.workers w
                      WHERE w.expires_at > now() AND p.backend = ANY (w.backends))
$$;

-- Wake-ups: NOTIFY imagen_jobs for runnable pending inserts only. The payload is the backend
-- name (empty = default); identical payloads in one transaction collapse, which is fine
-- because listeners treat a notification as a hint and drain the queue.
CREATE FUNCTION imagen.notify_job_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('imagen_jobs', coalesce(NEW.backend, ''));
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_notify_inserted
    AFTER INSERT ON imagen.jobs
    FOR EACH ROW WHEN (NEW.status = 'pending' AND NEW.run_at <= now())
    EXECUTE FUNCTION imagen.notify_job_inserted();

-- Job events for watchers (imagen submit --wait, the web UI): id and status only; clients
-- re-read the row. Deliberately not `UPDATE OF status, progress`: a column list fires only
-- for columns named in the UPDATE's SET list, and the cancel trigger below changes status
-- from a BEFORE trigger while the SET list names only cancel_requested.
CREATE FUNCTION imagen.notify_job_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('imagen_job_events',
                      json_build_object('id', NEW.id, 'status', NEW.status)::text);
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_notify_event
    AFTER UPDATE ON imagen.jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.progress IS DISTINCT FROM NEW.progress)
    EXECUTE FUNCTION imagen.notify_job_event();

-- Cancel is requested by flipping cancel_requested (the web UI can do that under RLS). A
-- pending job is cancelled on the spot; a running one stays running and its worker is told
-- on imagen_control, then ends it 'cancelled' itself.
CREATE FUNCTION imagen.on_cancel_requested() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A cancel cannot be taken back while the job is live: the worker may already be stopping it.
    IF OLD.cancel_requested AND NOT NEW.cancel_requested AND NEW.status = OLD.status
       AND OLD.status IN ('pending', 'running') THEN
        NEW.cancel_requested := true;
    END IF;
    IF NEW.cancel_requested AND NOT OLD.cancel_requested THEN
        IF OLD.status = 'pending' THEN
            NEW.status := 'cancelled';
            NEW.finished_at := now();
            NEW.error := 'cancelled by its owner before it started';
        ELSIF OLD.status = 'running' THEN
            PERFORM pg_notify('imagen_control', json_build_object('cancel', NEW.id)::text);
        ELSE
            NEW.cancel_requested := false;
        END IF;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TRIGGER jobs_cancel_requested
    BEFORE UPDATE OF cancel_requested ON imagen.jobs
    FOR EACH ROW EXECUTE FUNCTION imagen.on_cancel_requested();

-- Keep the hot table vacuumed: it is updated on every claim, heartbeat and progress tick.
ALTER TABLE imagen.jobs SET (autovacuum_vacuum_scale_factor = 0.01, fillfactor = 80);
