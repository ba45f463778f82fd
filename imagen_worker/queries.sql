-- Every statement the code runs, in one file, loaded by queries.py; each block starts with
-- "-- name: <name>". The job state machine comes first: transitions out of 'running' are
-- fenced on (id, worker_id, attempts, status), and zero rows means the lease was lost.

-- name: enqueue
-- Idempotent on (owner, dedupe_key) among live jobs: a conflict inserts nothing.
INSERT INTO imagen.jobs (owner_user_id, prompt, negative_prompt, backend, style, width, height,
                         steps, seed, params, priority, run_at, max_attempts, dedupe_key, workflow)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, coalesce($12, now()), $13, $14, $15)
ON CONFLICT (owner_user_id, dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN ('pending', 'running')
DO NOTHING
RETURNING id;

-- name: find_live_dedupe
SELECT id FROM imagen.jobs
WHERE owner_user_id = $1 AND dedupe_key = $2 AND status IN ('pending', 'running');

-- name: claim
-- One statement, planner-fenced. $2 is the backend this claim serves; $3 true when it is the
-- worker's default (a NULL backend means "the default"); $4 lists backends no live worker
-- serves (see orphan_backends), claimed only so they fail with a clear error. Each branch is an
-- ordered index scan (jobs_claim_named, jobs_claim_default), so other backends' backlogs are
-- never read. Running rows
-- whose lease expired are re-taken first: a dead worker's jobs come back without a sweeper.
WITH mine AS MATERIALIZED (
    SELECT id, priority, run_at FROM imagen.jobs
    WHERE status = 'pending' AND backend IS NOT NULL AND backend = $2 AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT $5
    FOR UPDATE SKIP LOCKED
),
defaults AS MATERIALIZED (
    SELECT id, priority, run_at FROM imagen.jobs
    WHERE $3 AND status = 'pending' AND backend IS NULL AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT $5
    FOR UPDATE SKIP LOCKED
),
orphans AS MATERIALIZED (
    SELECT id, priority, run_at FROM imagen.jobs
    WHERE status = 'pending' AND backend IS NOT NULL AND backend = ANY ($4::text[]) AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT $5
    FOR UPDATE SKIP LOCKED
),
stale AS MATERIALIZED (
    SELECT id FROM imagen.jobs
    WHERE status = 'running' AND lease_expires_at < now()
      AND (backend = $2 OR ($3 AND backend IS NULL) OR backend = ANY ($4::text[]))
    ORDER BY lease_expires_at
    LIMIT $5
    FOR UPDATE SKIP LOCKED
),
picked AS (
    SELECT id FROM (
        SELECT id, 0 AS rank, 0 AS priority, NULL::timestamptz AS run_at FROM stale
        UNION ALL SELECT id, 1, priority, run_at FROM mine
        UNION ALL SELECT id, 1, priority, run_at FROM defaults
        UNION ALL SELECT id, 1, priority, run_at FROM orphans
    ) candidates
    ORDER BY rank, priority DESC, run_at
    LIMIT $5
)
UPDATE imagen.jobs j
SET status = 'running',
    worker_id = $1,
    attempts = j.attempts + 1,
    lease_expires_at = now() + make_interval(secs => $6),
    started_at = coalesce(j.started_at, now()),
    updated_at = now()
FROM picked
WHERE j.id = picked.id
RETURNING j.*, extract(epoch FROM (now() - j.run_at))::float8 AS waited_seconds;

-- name: orphan_backends
-- Pending jobs' backends that no live worker serves (imagen.orphan_backends() in 0001).
SELECT imagen.orphan_backends();

-- name: heartbeat
-- Renews every lease this worker holds in one statement; also the poll fallback for cancel.
UPDATE imagen.jobs
SET lease_expires_at = now() + make_interval(secs => $2), updated_at = now()
WHERE worker_id = $1 AND status = 'running' AND id = ANY ($3::uuid[])
RETURNING id, cancel_requested;

-- name: set_backend_ref
UPDATE imagen.jobs SET backend_ref = $4, updated_at = now()
WHERE id = $1 AND worker_id = $2 AND attempts = $3 AND status = 'running';

-- name: set_progress
UPDATE imagen.jobs SET progress = $4, updated_at = now()
WHERE id = $1 AND worker_id = $2 AND attempts = $3 AND status = 'running';

-- name: insert_image
INSERT INTO imagen.images (owner_user_id, job_id, prompt, prompt_hash, backend, model, seed, steps,
                           width, height, latency_ms, cost_usd_estimate, storage_path, mime_type,
                           bytes, sha256, sidecar)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
RETURNING id;

-- name: complete
UPDATE imagen.jobs
SET status = 'done', image_id = $4, finished_at = now(), lease_expires_at = NULL,
    error = NULL, error_detail = NULL, updated_at = now(), seed = coalesce(seed, $5)
WHERE id = $1 AND worker_id = $2 AND attempts = $3 AND status = 'running'
RETURNING id;

-- name: fail
UPDATE imagen.jobs
SET status = 'failed', error = $4, error_detail = $5, finished_at = now(),
    lease_expires_at = NULL, updated_at = now()
WHERE id = $1 AND worker_id = $2 AND attempts = $3 AND status = 'running'
RETURNING id;

-- name: retry_later
-- Back to pending with a delay; the worker id is kept as a record of who tried last.
UPDATE imagen.jobs
SET status = 'pending', error = $4, error_detail = $5,
    run_at = now() + make_interval(secs => $6), lease_expires_at = NULL, updated_at = now()
WHERE id = $1 AND worker_id = $2 AND attempts = $3 AND status = 'running'
RETURNING id;

-- name: mark_cancelled
UPDATE imagen.jobs
SET status = 'cancelled', error = $4, finished_at = now(), lease_expires_at = NULL, updated_at = now()
WHERE id = $1 AND worker_id = $2 AND attempts = $3 AND status = 'running'
RETURNING id;

-- name: release
-- Graceful shutdown: unfinished work goes back to pending without costing an attempt, and
-- other workers are woken at once.
WITH released AS (
    UPDATE imagen.jobs
    SET status = 'pending', attempts = greatest(attempts - 1, 0), run_at = now(),
        lease_expires_at = NULL, updated_at = now()
    WHERE id = ANY ($2::uuid[]) AND worker_id = $1 AND status = 'running'
    RETURNING id, backend
)
SELECT count(*) AS released,
       (SELECT count(pg_notify('imagen_jobs', coalesce(backend, ''))) FROM released) AS notified
FROM released;

-- name: requeue_expired
-- Boot-time recovery: running rows whose lease expired (their worker is gone) go back to
-- pending. A live worker's rows have unexpired leases and are never touched.
WITH requeued AS (
    UPDATE imagen.jobs
    SET status = 'pending', run_at = now(), lease_expires_at = NULL, updated_at = now()
    WHERE status = 'running' AND lease_expires_at < now()
    RETURNING id
)
SELECT count(*) FROM requeued;

-- name: request_cancel
-- The trigger imagen.on_cancel_requested does the transition (so the web UI's plain UPDATE
-- and this command behave the same).
UPDATE imagen.jobs SET cancel_requested = true
WHERE id = $1 AND status IN ('pending', 'running')
RETURNING status;

-- name: retry_job
-- An operator's retry of a failed or cancelled job: a fresh set of attempts, now.
WITH retried AS (
    UPDATE imagen.jobs
    SET status = 'pending', attempts = 0, run_at = now(), error = NULL, error_detail = NULL,
        cancel_requested = false, finished_at = NULL, worker_id = NULL, progress = NULL,
        backend_ref = NULL, updated_at = now()
    WHERE id = $1 AND status IN ('failed', 'cancelled')
    RETURNING id, backend
)
SELECT id, pg_notify('imagen_jobs', coalesce(backend, '')) FROM retried;

-- name: get_job
SELECT * FROM imagen.jobs WHERE id = $1;

-- name: list_jobs
SELECT * FROM imagen.jobs
WHERE ($1::text IS NULL OR status = $1)
ORDER BY created_at DESC
LIMIT $2;

-- name: get_image
SELECT * FROM imagen.images WHERE id = $1;

-- name: next_run_at
-- How long the safety poll may sleep: until the next delayed job becomes runnable.
SELECT extract(epoch FROM (min(run_at) - now()))::float8
FROM imagen.jobs WHERE status = 'pending' AND run_at > now();

-- name: queue_depth
SELECT status, count(*)::int AS jobs FROM imagen.jobs GROUP BY status;

-- name: register_worker
INSERT INTO imagen.workers (id, hostname, pid, backends, expires_at)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
ON CONFLICT (id) DO UPDATE
SET backends = EXCLUDED.backends, heartbeat_at = now(), expires_at = EXCLUDED.expires_at;

-- name: unregister_worker
DELETE FROM imagen.workers WHERE id = $1 OR expires_at < now() - interval '1 day';

-- name: ping
SELECT 1;

-- name: worker_alive
SELECT count(*) > 0 FROM imagen.workers WHERE pid = $1 AND expires_at > now();

-- name: live_queue_depth
-- For the imagen_queue_depth gauge: only live statuses, both served by partial indexes.
SELECT status, count(*) AS n FROM imagen.jobs WHERE status = ANY ($1::text[]) GROUP BY status;

-- name: notify_probe
-- imagen-worker check: a NOTIFY that must come back on our own LISTEN (fails on poolers).
SELECT pg_notify($1, 'ping');

-- Schema migrations (db/migrate.py) ------------------------------------------------------

-- name: migrations_table_exists
SELECT to_regclass('imagen.schema_migrations') IS NOT NULL;

-- name: migrations_applied
SELECT version, checksum FROM imagen.schema_migrations;

-- name: migrations_bootstrap
CREATE SCHEMA IF NOT EXISTS imagen;
CREATE TABLE IF NOT EXISTS imagen.schema_migrations (
    version    text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_record
INSERT INTO imagen.schema_migrations (version, checksum) VALUES ($1, $2);

-- name: migrations_lock
SELECT pg_advisory_lock($1);

-- name: migrations_unlock
SELECT pg_advisory_unlock($1);

-- name: live_workers_for_backend
-- imagen submit --wait: live workers that would claim a job for this backend. A job without a
-- backend goes to a worker's default, so any live worker counts for it.
SELECT count(*) FROM imagen.workers
WHERE expires_at > now() AND ($1::text IS NULL OR $1 = ANY (backends));

-- name: server_version
-- imagen-worker check: the server's own version string ("15.20"), not the driver's parse of it.
SELECT current_setting('server_version');
