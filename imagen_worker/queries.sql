-- Every statement the code runs, in one file, loaded by queries.py; each block starts with
-- "-- name: <name>". The job state machine comes first: transitions out of 'running' are
-- fenced on (id, worker_id, attempts, status), and zero rows means the lease was lost. The
-- worker id (with backend_ref, error_detail and the upload record) lives in the worker-only
-- imagen.job_runs, so every fenced statement reads it. Statements over a list of jobs read it
-- per job by key, `(SELECT w.worker_id FROM imagen.job_runs w WHERE w.job_id = j.id)`: as a
-- join, a plan cached while the table was small scans every run record, and keeps doing so
-- as it grows until the table is analyzed again.

-- name: enqueue
-- Idempotent on (owner, dedupe_key) among live jobs: a conflict inserts nothing.
INSERT INTO imagen.jobs (owner_user_id, prompt, negative_prompt, backend, style, width, height,
                         steps, seed, params, priority, run_at, max_attempts, dedupe_key, workflow,
                         n, format, quality)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, coalesce($12, now()), $13, $14, $15, $16,
        $17, $18)
ON CONFLICT (owner_user_id, dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN ('pending', 'running')
DO NOTHING
RETURNING id;

-- name: find_live_dedupe
SELECT id FROM imagen.jobs
WHERE owner_user_id = $1 AND dedupe_key = $2 AND status IN ('pending', 'running');

-- name: claim
-- One statement, planner-fenced. $2 is the backend this claim serves; $3 true when it is the
-- worker's default (a NULL backend means "the default"); $4 lists backends no worker has served
-- for worker.orphan_after ($7 seconds), whose jobs are claimed only so they fail with a clear
-- error, and only once they have waited that long themselves. $8 lists the jobs this worker
-- still holds (running or stopping here): the expired-lease branch never re-takes those, so
-- one worker never runs one job twice. Each branch is an ordered index scan
-- (jobs_claim_named, jobs_claim_default), so other backends' backlogs are never read. Running
-- rows whose lease expired are re-taken first: a dead worker's jobs come back without a
-- sweeper. A claim clears the row's progress (a waiting reason, or an expired attempt's).
-- Pending rows go by priority, then turn (owners take turns, see jobs_take_turn in 0005),
-- then age. $9 is worker.max_running_per_owner (NULL: no limit): owners at the limit are
-- skipped in the scan, and one claim never takes an owner past it (written as "the full
-- owners do not contain this one": the planner estimates `owner <> ALL (...)` from the
-- owners' statistics and, when one owner has the whole backlog, takes it to reject every
-- row and reads the table in full instead of the index). The claimed rows' run
-- state goes to imagen.job_runs; backend_ref and result come back as earlier attempts left them,
-- and ran_before says whether any earlier attempt was claimed at all (the run record is read as
-- it was before this statement; it is never deleted while its job exists).
WITH running AS MATERIALIZED (
    SELECT owner_user_id, count(*) AS n FROM imagen.jobs
    WHERE $9::int IS NOT NULL AND status = 'running'
    GROUP BY owner_user_id
),
full_owners AS MATERIALIZED (
    SELECT coalesce(array_agg(owner_user_id), '{}') AS owners FROM running WHERE n >= $9::int
),
mine AS MATERIALIZED (
    SELECT id, owner_user_id, priority, turn, run_at FROM imagen.jobs
    WHERE status = 'pending' AND backend IS NOT NULL AND backend = $2 AND run_at <= now()
      AND NOT ((SELECT owners FROM full_owners)::uuid[] @> ARRAY[owner_user_id])
    ORDER BY priority DESC, turn, run_at, id
    LIMIT $5
    FOR UPDATE SKIP LOCKED
),
defaults AS MATERIALIZED (
    SELECT id, owner_user_id, priority, turn, run_at FROM imagen.jobs
    WHERE $3 AND status = 'pending' AND backend IS NULL AND run_at <= now()
      AND NOT ((SELECT owners FROM full_owners)::uuid[] @> ARRAY[owner_user_id])
    ORDER BY priority DESC, turn, run_at, id
    LIMIT $5
    FOR UPDATE SKIP LOCKED
),
orphans AS MATERIALIZED (
    SELECT id, owner_user_id, priority, turn, run_at FROM imagen.jobs
    WHERE status = 'pending' AND backend IS NOT NULL AND backend = ANY ($4::text[])
      AND run_at <= now() - make_interval(secs => $7)
    ORDER BY priority DESC, turn, run_at, id
    LIMIT $5
    FOR UPDATE SKIP LOCKED
),
stale AS MATERIALIZED (
    SELECT id, owner_user_id FROM imagen.jobs j
    WHERE status = 'running' AND lease_expires_at < now()
      AND (backend = $2 OR ($3 AND backend IS NULL) OR backend = ANY ($4::text[]))
      AND NOT (id = ANY ($8::uuid[]) AND EXISTS (
          SELECT 1 FROM imagen.job_runs r WHERE r.job_id = j.id AND r.worker_id = $1))
    ORDER BY lease_expires_at
    LIMIT $5
    FOR UPDATE SKIP LOCKED
),
candidates AS (
    SELECT c.*, row_number() OVER (PARTITION BY c.owner_user_id
                                   ORDER BY c.rank, c.priority DESC, c.turn, c.run_at) AS nth
    FROM (
        SELECT id, owner_user_id, 0 AS rank, 0 AS priority, 0::bigint AS turn,
               NULL::timestamptz AS run_at FROM stale
        UNION ALL SELECT id, owner_user_id, 1, priority, turn, run_at FROM mine
        UNION ALL SELECT id, owner_user_id, 1, priority, turn, run_at FROM defaults
        UNION ALL SELECT id, owner_user_id, 1, priority, turn, run_at FROM orphans
    ) c
),
picked AS (
    SELECT c.id FROM candidates c LEFT JOIN running r ON r.owner_user_id = c.owner_user_id
    WHERE $9::int IS NULL OR c.rank = 0 OR c.nth + coalesce(r.n, 0) <= $9::int
    ORDER BY c.rank, c.priority DESC, c.turn, c.run_at
    LIMIT $5
),
claimed AS (
    UPDATE imagen.jobs j
    SET status = 'running',
        attempts = j.attempts + 1,
        lease_expires_at = now() + make_interval(secs => $6),
        started_at = coalesce(j.started_at, now()),
        progress = NULL,
        updated_at = now()
    FROM picked
    WHERE j.id = picked.id
    RETURNING j.*, extract(epoch FROM (now() - j.run_at))::float8 AS waited_seconds
),
runs AS (
    INSERT INTO imagen.job_runs AS r (job_id, worker_id, attempt)
    SELECT id, $1, attempts FROM claimed
    ON CONFLICT (job_id) DO UPDATE
    SET worker_id = EXCLUDED.worker_id, attempt = EXCLUDED.attempt, updated_at = now()
)
SELECT c.*, r.backend_ref, r.result, r.job_id IS NOT NULL AS ran_before
FROM claimed c LEFT JOIN imagen.job_runs r ON r.job_id = c.id
ORDER BY c.priority DESC, c.turn, c.run_at;

-- name: claim_one_at_a_time
-- Under worker.max_running_per_owner, before the claim in the same transaction: claims across
-- the fleet wait for each other here, so none counts an owner's running jobs before another
-- claim's rows are committed. Released at commit.
SELECT pg_advisory_xact_lock(hashtextextended('imagen.claim.capped', 0));

-- name: unserved_backends
-- Pending jobs' backends that no live worker serves, with seconds unserved (NULL = no registry
-- entry left); imagen.unserved_backends() in 0004.
SELECT backend, unserved_seconds FROM imagen.unserved_backends();

-- name: mark_waiting
-- Says in the row why a pending job is not being claimed ($3: {"state": "waiting", ...}), for
-- the web UI and `imagen status`. Bounded ($4 rows of the backend's and, with $2, $4 of the
-- jobs without a backend, which are this worker's default's; each in claim order) and
-- idempotent: rows already saying so are not rewritten. It runs every poll interval while a
-- backend is down or unserved, so each branch walks the claim's own index in its order and
-- stops after $4 rows: a sort of every pending row costs about a second per call at a
-- million rows, just when the backlog grows.
WITH named AS MATERIALIZED (
    SELECT id FROM imagen.jobs
    WHERE status = 'pending' AND backend IS NOT NULL AND backend = $1
      AND progress IS DISTINCT FROM $3::jsonb
    ORDER BY backend, priority DESC, turn, run_at, id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
),
defaults AS MATERIALIZED (
    SELECT id FROM imagen.jobs
    WHERE $2 AND status = 'pending' AND backend IS NULL
      AND progress IS DISTINCT FROM $3::jsonb
    ORDER BY priority DESC, turn, run_at, id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE imagen.jobs j SET progress = $3, updated_at = now()
FROM (SELECT id FROM named UNION ALL SELECT id FROM defaults) target
WHERE j.id = target.id;

-- name: clear_waiting
-- The reason $3 no longer holds (the backend is available again): drop it from pending rows.
WITH target AS (
    SELECT id FROM imagen.jobs
    WHERE status = 'pending' AND (backend = $1 OR ($2 AND backend IS NULL))
      AND progress ->> 'state' = 'waiting' AND progress ->> 'reason' = $3
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE imagen.jobs j SET progress = NULL, updated_at = now()
FROM target WHERE j.id = target.id;

-- name: heartbeat
-- Renews the leases of the (job, attempt) pairs this worker runs. Rows another session holds
-- locked are skipped, not waited for: a lock delays that one job's renewal, never the others'.
-- Per pair: renewed, still ours (a skipped row is still ours as of this snapshot; a row
-- another worker re-took or that ended is not), and cancel_requested, the poll fallback for
-- a lost control message.
WITH held AS (
    SELECT * FROM unnest($3::uuid[], $4::int[]) AS h (id, attempts)
),
locked AS (
    SELECT j.id FROM imagen.jobs j
    JOIN held h ON h.id = j.id AND h.attempts = j.attempts
    WHERE j.status = 'running'
      AND (SELECT w.worker_id FROM imagen.job_runs w WHERE w.job_id = j.id) = $1
    FOR UPDATE OF j SKIP LOCKED
),
renewed AS (
    UPDATE imagen.jobs j
    SET lease_expires_at = now() + make_interval(secs => $2), updated_at = now()
    FROM locked WHERE j.id = locked.id
    RETURNING j.id, j.cancel_requested
)
SELECT h.id, h.attempts,
       r.id IS NOT NULL AS renewed,
       coalesce((SELECT w.worker_id FROM imagen.job_runs w WHERE w.job_id = h.id) = $1
                AND j.attempts = h.attempts AND j.status = 'running', false) AS ours,
       coalesce(r.cancel_requested, j.cancel_requested, false) AS cancel_requested
FROM held h
LEFT JOIN renewed r ON r.id = h.id
LEFT JOIN imagen.jobs j ON j.id = h.id;

-- name: cancel_requested
-- After any imagen_control message (a hint anyone may send): which of the (job, attempt)
-- pairs this worker runs really have a cancel request on their row.
SELECT j.id, j.attempts FROM imagen.jobs j
JOIN unnest($2::uuid[], $3::int[]) AS h (id, attempts) ON h.id = j.id AND h.attempts = j.attempts
WHERE j.status = 'running' AND j.cancel_requested
  AND (SELECT w.worker_id FROM imagen.job_runs w WHERE w.job_id = j.id) = $1;

-- name: set_backend_ref
UPDATE imagen.job_runs w SET backend_ref = $4, updated_at = now()
FROM imagen.jobs j
WHERE w.job_id = $1 AND w.worker_id = $2 AND w.attempt = $3
  AND j.id = w.job_id AND j.attempts = $3 AND j.status = 'running';

-- name: set_progress
UPDATE imagen.jobs j SET progress = $4, updated_at = now()
FROM imagen.job_runs w
WHERE j.id = $1 AND w.job_id = j.id AND w.worker_id = $2 AND j.attempts = $3 AND j.status = 'running';

-- name: record_upload
-- The object is in storage: remember the images row to write ($4), so that any later attempt,
-- on any host, links it instead of rendering again.
UPDATE imagen.job_runs w SET result = $4, updated_at = now()
FROM imagen.jobs j
WHERE w.job_id = $1 AND w.worker_id = $2 AND w.attempt = $3
  AND j.id = w.job_id AND j.attempts = $3 AND j.status = 'running';

-- name: insert_image
-- One image of the job's batch ($19 its index, $20 its thumbnail's key): the images row its
-- owner reads, and the host-side facts ($18: local_path, backend_metadata) in the worker-only
-- imagen.image_internals.
WITH image AS (
    INSERT INTO imagen.images (owner_user_id, job_id, prompt, prompt_hash, backend, model, seed,
                               steps, width, height, latency_ms, cost_usd_estimate, storage_path,
                               mime_type, bytes, sha256, sidecar, index, thumbnail_path)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $19, $20)
    RETURNING id
),
internals AS (
    INSERT INTO imagen.image_internals (image_id, local_path, backend_metadata)
    SELECT id, $18::jsonb ->> 'local_path', coalesce($18::jsonb -> 'backend_metadata', '{}'::jsonb)
    FROM image
)
SELECT id FROM image;

-- name: complete
-- The upload record has become the images row: it is cleared with the error record.
WITH done AS (
    UPDATE imagen.jobs j
    SET status = 'done', image_id = $4, finished_at = now(), lease_expires_at = NULL,
        error = NULL, updated_at = now(), seed = coalesce(j.seed, $5)
    FROM imagen.job_runs w
    WHERE j.id = $1 AND w.job_id = j.id AND w.worker_id = $2 AND j.attempts = $3 AND j.status = 'running'
    RETURNING j.id
)
UPDATE imagen.job_runs w SET result = NULL, error_detail = NULL, updated_at = now()
FROM done WHERE w.job_id = done.id;

-- name: complete_batch
-- Many one-image completions, one commit, each job fenced alone, rows locked in id order (see
-- complete_many; a job with several images goes through insert_image + complete).
WITH input AS (
    SELECT * FROM jsonb_to_recordset($2::jsonb) AS x (
        job_id uuid, attempt int, owner_user_id uuid, prompt text, prompt_hash text, backend text,
        model text, seed bigint, steps int, width int, height int, latency_ms int,
        cost_usd_estimate numeric, storage_path text, mime_type text, bytes bigint, sha256 text,
        sidecar jsonb, internals jsonb, index int, thumbnail_path text, position int)
    LIMIT $3  -- the number of jobs, which the planner would take for 100
),
fenced AS MATERIALIZED (
    SELECT j.id FROM imagen.jobs j
    JOIN input i ON i.job_id = j.id AND i.attempt = j.attempts
    WHERE j.status = 'running'
      AND (SELECT w.worker_id FROM imagen.job_runs w WHERE w.job_id = j.id) = $1
    ORDER BY j.id
    FOR UPDATE OF j
),
image AS (
    INSERT INTO imagen.images (owner_user_id, job_id, prompt, prompt_hash, backend, model, seed,
                               steps, width, height, latency_ms, cost_usd_estimate, storage_path,
                               mime_type, bytes, sha256, sidecar, index, thumbnail_path)
    SELECT i.owner_user_id, i.job_id, i.prompt, i.prompt_hash, i.backend, i.model, i.seed, i.steps,
           i.width, i.height, i.latency_ms, i.cost_usd_estimate, i.storage_path, i.mime_type,
           i.bytes, i.sha256, coalesce(i.sidecar, '{}'::jsonb), i.index, i.thumbnail_path
    FROM input i JOIN fenced f ON f.id = i.job_id
    ORDER BY i.position  -- as one after the other: of two on one storage path, the first wins
    ON CONFLICT DO NOTHING
    RETURNING id, job_id
),
internals AS (
    INSERT INTO imagen.image_internals (image_id, local_path, backend_metadata)
    SELECT image.id, i.internals ->> 'local_path', coalesce(i.internals -> 'backend_metadata', '{}'::jsonb)
    FROM image JOIN input i ON i.job_id = image.job_id
),
done AS (
    UPDATE imagen.jobs j
    SET status = 'done', image_id = image.id, finished_at = now(), lease_expires_at = NULL,
        error = NULL, updated_at = now(), seed = coalesce(j.seed, i.seed)
    FROM image JOIN input i ON i.job_id = image.job_id
    WHERE j.id = image.job_id
    RETURNING j.id
),
cleared AS (
    -- A run record with neither, the usual first attempt, is left alone: no row version for nothing.
    UPDATE imagen.job_runs w SET result = NULL, error_detail = NULL, updated_at = now()
    FROM done WHERE w.job_id = done.id AND (w.result IS NOT NULL OR w.error_detail IS NOT NULL)
)
SELECT i.job_id, i.attempt, f.id IS NOT NULL AS fenced, image.id AS image_id
FROM input i LEFT JOIN fenced f ON f.id = i.job_id LEFT JOIN image ON image.job_id = i.job_id;

-- name: fail
-- $4 is the sentence the owner reads, $5 the operator's full record (worker-only).
WITH ended AS (
    UPDATE imagen.jobs j
    SET status = 'failed', error = $4, finished_at = now(), lease_expires_at = NULL, updated_at = now()
    FROM imagen.job_runs w
    WHERE j.id = $1 AND w.job_id = j.id AND w.worker_id = $2 AND j.attempts = $3 AND j.status = 'running'
    RETURNING j.id
)
UPDATE imagen.job_runs w SET error_detail = $5, updated_at = now()
FROM ended WHERE w.job_id = ended.id;

-- name: retry_later
-- Back to pending with a delay; job_runs keeps the worker id as a record of who tried last.
-- Like every way back to pending, it drops the attempt's progress: a pending row's progress
-- is its waiting reason or nothing, never "step 3 of 4" of a render that stopped.
WITH retried AS (
    UPDATE imagen.jobs j
    SET status = 'pending', error = $4, run_at = now() + make_interval(secs => $6),
        lease_expires_at = NULL, progress = NULL, updated_at = now()
    FROM imagen.job_runs w
    WHERE j.id = $1 AND w.job_id = j.id AND w.worker_id = $2 AND j.attempts = $3 AND j.status = 'running'
    RETURNING j.id
)
UPDATE imagen.job_runs w SET error_detail = $5, updated_at = now()
FROM retried WHERE w.job_id = retried.id;

-- name: mark_cancelled
-- Only a row whose owner asked (cancel_requested): a control message alone never cancels. The
-- render's progress goes with it: a cancelled row does not say "running node 10".
UPDATE imagen.jobs j
SET status = 'cancelled', error = $4, finished_at = now(), lease_expires_at = NULL, progress = NULL,
    updated_at = now()
FROM imagen.job_runs w
WHERE j.id = $1 AND w.job_id = j.id AND w.worker_id = $2 AND j.attempts = $3 AND j.status = 'running' AND j.cancel_requested;

-- name: requeue_outage
-- The backend's infrastructure failed, not the job: back to pending with the attempt given
-- back, counted in outage_requeues (the caller enforces worker.max_outage_requeues).
WITH requeued AS (
    UPDATE imagen.jobs j
    SET status = 'pending', attempts = greatest(j.attempts - 1, 0),
        outage_requeues = j.outage_requeues + 1, error = $4,
        run_at = now() + make_interval(secs => $6), lease_expires_at = NULL, progress = NULL,
        updated_at = now()
    FROM imagen.job_runs w
    WHERE j.id = $1 AND w.job_id = j.id AND w.worker_id = $2 AND j.attempts = $3 AND j.status = 'running'
    RETURNING j.id
)
UPDATE imagen.job_runs w SET error_detail = $5, updated_at = now()
FROM requeued WHERE w.job_id = requeued.id;

-- name: release
-- Graceful shutdown: unfinished work goes back to pending without costing an attempt, and
-- other workers are woken at once. Fenced per (job, attempt) like every transition.
WITH released AS (
    UPDATE imagen.jobs j
    SET status = 'pending', attempts = greatest(j.attempts - 1, 0), run_at = now(),
        lease_expires_at = NULL, progress = NULL, updated_at = now()
    FROM unnest($2::uuid[], $3::int[]) AS h (id, attempts)
    WHERE j.id = h.id AND j.attempts = h.attempts AND j.status = 'running'
      AND (SELECT w.worker_id FROM imagen.job_runs w WHERE w.job_id = j.id) = $1
    RETURNING j.id, j.backend
)
SELECT count(*) AS released,
       (SELECT count(pg_notify('imagen_jobs', coalesce(backend, ''))) FROM released) AS notified
FROM released;

-- name: requeue_expired
-- Boot-time recovery: running rows whose lease expired (their worker is gone) go back to
-- pending. A live worker's rows have unexpired leases and are never touched. Rows another
-- session holds (a worker booting at the same moment) are skipped, not waited for.
WITH expired AS (
    SELECT id FROM imagen.jobs
    WHERE status = 'running' AND lease_expires_at < now()
    FOR UPDATE SKIP LOCKED
),
requeued AS (
    UPDATE imagen.jobs j
    SET status = 'pending', run_at = now(), lease_expires_at = NULL, progress = NULL, updated_at = now()
    FROM expired WHERE j.id = expired.id
    RETURNING j.id
)
SELECT count(*) FROM requeued;

-- name: request_cancel
-- The trigger imagen.on_cancel_requested does the transition (so the web UI's plain UPDATE
-- and this command behave the same).
UPDATE imagen.jobs SET cancel_requested = true
WHERE id = $1 AND status IN ('pending', 'running')
RETURNING status;

-- name: retry_job
-- An operator's retry of a failed or cancelled job: a fresh set of attempts, now, and a fresh
-- run record (an earlier upload is rendered again). The backend ref becomes a note that names
-- no submission: an adapter that finds an earlier attempt's work by the job id alone (ComfyUI's
-- first prompt) must not adopt it either, since the retry is there to render again.
WITH retried AS (
    UPDATE imagen.jobs
    SET status = 'pending', attempts = 0, run_at = now(), error = NULL,
        cancel_requested = false, finished_at = NULL, progress = NULL, updated_at = now()
    WHERE id = $1 AND status IN ('failed', 'cancelled')
    RETURNING id, backend
),
reset AS (
    UPDATE imagen.job_runs w
    SET worker_id = NULL, attempt = 0, backend_ref = 'retried by an operator', error_detail = NULL,
        result = NULL,
        updated_at = now()
    FROM retried WHERE w.job_id = retried.id
)
SELECT id, pg_notify('imagen_jobs', coalesce(backend, '')) FROM retried;

-- name: get_job
-- The operator's view: the row, its worker-only run record, and where that worker runs (while
-- the registry remembers it).
SELECT j.*, w.worker_id, w.backend_ref, w.error_detail, w.result,
       r.hostname AS worker_host, r.pid AS worker_pid
FROM imagen.jobs j LEFT JOIN imagen.job_runs w ON w.job_id = j.id
LEFT JOIN imagen.workers r ON r.id = w.worker_id
WHERE j.id = $1;

-- name: list_jobs
SELECT * FROM imagen.jobs
WHERE ($1::text IS NULL OR status = $1)
ORDER BY created_at DESC
LIMIT $2;

-- name: get_image
-- The operator's view: the row and its host-side internals (the worker's local path).
SELECT i.*, n.local_path, n.backend_metadata
FROM imagen.images i LEFT JOIN imagen.image_internals n ON n.image_id = i.id
WHERE i.id = $1;

-- name: job_images
-- `imagen status` and `submit --wait`: every image of a job's batch, main image first.
SELECT i.*, n.local_path
FROM imagen.images i LEFT JOIN imagen.image_internals n ON n.image_id = i.id
WHERE i.job_id = $1
ORDER BY i.index;

-- name: storage_path_of
-- `imagen sign`: an image id, or a job id (with the job's status when it has no image yet).
SELECT i.storage_path, NULL::text AS job_status FROM imagen.images i WHERE i.id = $1
UNION ALL
SELECT i.storage_path, j.status FROM imagen.jobs j LEFT JOIN imagen.images i ON i.id = j.image_id
WHERE j.id = $1
LIMIT 1;

-- name: next_run_at
-- How long the safety poll may sleep: until the next delayed job becomes runnable.
SELECT extract(epoch FROM (min(run_at) - now()))::float8
FROM imagen.jobs WHERE status = 'pending' AND run_at > now();

-- name: register_worker
-- At start and with every heartbeat; $7 is the version it runs, $8 whether it is draining (a
-- stop signal came), $9 the backends it takes no work for, each with why.
INSERT INTO imagen.workers (id, hostname, pid, backends, default_backend, expires_at, version,
                            draining_since, unavailable)
VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6), $7,
        CASE WHEN $8 THEN now() END, $9)
ON CONFLICT (id) DO UPDATE
SET backends = EXCLUDED.backends, default_backend = EXCLUDED.default_backend,
    heartbeat_at = now(), expires_at = EXCLUDED.expires_at, version = EXCLUDED.version,
    draining_since = CASE WHEN $8 THEN coalesce(imagen.workers.draining_since, now()) END,
    unavailable = EXCLUDED.unavailable;

-- name: worker_unavailable
-- The moment a backend stops or starts taking work again, not only at the next heartbeat.
UPDATE imagen.workers SET unavailable = $2 WHERE id = $1;

-- name: fleet_workers
-- imagen workers: every registry entry (live ones first), with the jobs it holds running and
-- how many of those wait for Storage to take their images (running rows are few: at most the
-- fleet's concurrency, plus expired leases not yet taken).
WITH holding AS (
    SELECT r.worker_id, count(*)::int AS running,
           count(*) FILTER (WHERE j.progress ->> 'stage' = 'waiting_for_storage')::int AS storage_waits
    FROM imagen.jobs j JOIN imagen.job_runs r ON r.job_id = j.id
    WHERE j.status = 'running'
    GROUP BY r.worker_id
)
SELECT w.id, w.hostname, w.pid, w.backends, w.default_backend, w.version, w.unavailable,
       w.expires_at > now() AS live, w.stopped_at IS NOT NULL AS stopped,
       w.draining_since IS NOT NULL AS draining,
       extract(epoch FROM now() - w.started_at)::float8 AS up_seconds,
       extract(epoch FROM now() - w.heartbeat_at)::float8 AS heartbeat_seconds,
       extract(epoch FROM w.expires_at - w.heartbeat_at)::float8 AS ttl_seconds,
       extract(epoch FROM now() - least(w.expires_at, now()))::float8 AS gone_seconds,
       coalesce(h.running, 0) AS running, coalesce(h.storage_waits, 0) AS storage_waits
FROM imagen.workers w LEFT JOIN holding h ON h.worker_id = w.id
ORDER BY w.expires_at > now() DESC, w.hostname, w.started_at DESC;

-- name: unregister_worker
-- A clean stop keeps the row, ended now: its backends were served until this moment, so the
-- orphan check (worker.orphan_after) sees a restart as a short gap, not an abandoned backend.
-- Entries stopped or expired for a day are removed.
WITH stopped AS (
    UPDATE imagen.workers SET expires_at = least(expires_at, now()), stopped_at = now()
    WHERE id = $1
)
DELETE FROM imagen.workers WHERE expires_at < now() - interval '1 day';

-- name: live_default_backends
-- imagen-worker check: the default backend of each live worker, to warn when they disagree.
SELECT coalesce(default_backend, '(not recorded)') AS default_backend, count(*)::int AS workers
FROM imagen.workers WHERE expires_at > now()
GROUP BY 1 ORDER BY 1;

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

-- name: live_backends
-- imagen submit --wait, when no live worker serves a job's backend: what the live ones serve.
SELECT coalesce(array_agg(DISTINCT b ORDER BY b), '{}') FROM imagen.workers, unnest(backends) AS b
WHERE expires_at > now();

-- name: server_version
-- imagen-worker check: the server's own version string ("15.20"), not the driver's parse of it.
SELECT current_setting('server_version');

-- Completion webhooks: the outbox rows the jobs_queue_webhook trigger (0008) inserts when a
-- job ends. A claimed row's next_attempt_at is its lease; every write is fenced on
-- claimed_by, so a worker that lost a row to another never overwrites the other's outcome.

-- name: webhook_settings
-- Which job endings the trigger queues ($1; empty = webhooks off); each worker writes its own
-- webhooks block's events when it starts. Returns the events it replaced (no row when nothing
-- changed; NULL when there was no setting yet), so a worker that changes the fleet's setting
-- can say so.
WITH previous AS (SELECT events FROM imagen.webhook_settings WHERE singleton)
INSERT INTO imagen.webhook_settings (singleton, events) VALUES (true, $1)
ON CONFLICT (singleton) DO UPDATE SET events = EXCLUDED.events, updated_at = now()
WHERE imagen.webhook_settings.events IS DISTINCT FROM EXCLUDED.events
RETURNING (SELECT events FROM previous) AS previous;

-- name: webhook_claim
-- Up to $2 due pending deliveries for worker $1, leased for $3 seconds; $4 lists the rows it
-- still holds, never re-taken by itself.
WITH due AS (
    SELECT id FROM imagen.webhook_deliveries
    WHERE status = 'pending' AND next_attempt_at <= now() AND NOT (id = ANY ($4::uuid[]))
    ORDER BY next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE imagen.webhook_deliveries d
SET claimed_by = $1, next_attempt_at = now() + make_interval(secs => $3)
FROM due
WHERE d.id = due.id
RETURNING d.id, d.job_id, d.event, d.attempts, d.created_at;

-- name: webhook_renew
-- Before each attempt: extend the lease by $3 seconds; no row means another worker took it.
UPDATE imagen.webhook_deliveries
SET next_attempt_at = now() + make_interval(secs => $3)
WHERE id = $1 AND claimed_by = $2 AND status = 'pending'
RETURNING attempts;

-- name: webhook_job
-- What a delivery tells the receiver: the job's public fields and its images, nothing internal
-- (an image kept only on a worker's disk, storage_path local:…, has no object to announce).
SELECT j.id, j.owner_user_id, j.error, j.created_at, j.started_at, j.finished_at, j.image_id,
       coalesce((SELECT jsonb_agg(jsonb_build_object(
                            'id', i.id, 'mime_type', i.mime_type,
                            'storage_path', CASE WHEN i.storage_path LIKE 'local:%' THEN NULL
                                                 ELSE i.storage_path END,
                            'width', i.width, 'height', i.height, 'bytes', i.bytes,
                            'sha256', i.sha256, 'created_at', i.created_at)
                        ORDER BY i.created_at, i.id)
                 FROM imagen.images i WHERE i.job_id = j.id), '[]'::jsonb) AS images
FROM imagen.jobs j
WHERE j.id = $1;

-- name: webhook_retry_later
-- A retryable attempt failed: count it, say why ($3), and hold the row until the retry
-- (in $4 seconds) plus its lease.
UPDATE imagen.webhook_deliveries
SET attempts = attempts + 1, last_error = $3, next_attempt_at = now() + make_interval(secs => $4)
WHERE id = $1 AND claimed_by = $2 AND status = 'pending';

-- name: webhook_delivered
UPDATE imagen.webhook_deliveries
SET status = 'delivered', attempts = attempts + 1, delivered_at = now(), claimed_by = NULL
WHERE id = $1 AND claimed_by = $2 AND status = 'pending';

-- name: webhook_failed
-- Given up ($3 says why): a rejection or the last attempt; $4 attempts to add (1, or 0 when
-- no request was sent).
UPDATE imagen.webhook_deliveries
SET status = 'failed', attempts = attempts + $4::int, last_error = $3, claimed_by = NULL
WHERE id = $1 AND claimed_by = $2 AND status = 'pending';

-- name: webhook_release
-- A clean stop hands this worker's unfinished deliveries to the next claim at once.
UPDATE imagen.webhook_deliveries
SET claimed_by = NULL, next_attempt_at = now()
WHERE claimed_by = $1 AND status = 'pending';

-- Housekeeping (imagen prune) ----------------------------------------------------------

-- name: prune_jobs
-- Up to $2 jobs that ended (done, failed, cancelled) before $1, counted by status. Their
-- job_runs rows go with them (ON DELETE CASCADE); their images stay, with job_id NULL: they
-- are the owners' gallery, and their objects stay in Storage. Pending and running jobs are
-- never touched.
WITH doomed AS (
    SELECT id FROM imagen.jobs
    WHERE status IN ('done', 'failed', 'cancelled') AND finished_at < $1
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM imagen.jobs j USING doomed d WHERE j.id = d.id
    RETURNING j.status
)
SELECT status, count(*)::int AS n FROM gone GROUP BY status;

-- name: prune_deliveries
-- Up to $2 webhook deliveries made before $1 that are settled (delivered, or failed for
-- good); pending ones are still to be sent.
WITH doomed AS (
    SELECT id FROM imagen.webhook_deliveries
    WHERE status <> 'pending' AND created_at < $1
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM imagen.webhook_deliveries w USING doomed d WHERE w.id = d.id
    RETURNING w.id
)
SELECT count(*)::int FROM gone;

-- name: prunable
-- imagen prune --dry-run: what prune_jobs and prune_deliveries would remove, by kind.
SELECT status AS kind, count(*)::int AS n FROM imagen.jobs
WHERE status IN ('done', 'failed', 'cancelled') AND finished_at < $1
GROUP BY status
UNION ALL
SELECT 'webhook deliveries', count(*)::int FROM imagen.webhook_deliveries
WHERE status <> 'pending' AND created_at < $1;
