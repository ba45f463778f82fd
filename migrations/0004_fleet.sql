-- Fleet operations: orphans decided by time, outage requeues counted apart from attempts, and
-- a registry that remembers each worker's default backend and when it stopped.

-- A job that went back to pending because its backend's infrastructure failed (not the job)
-- gets its attempt back; this counter caps how often that may happen, so a job that itself
-- crashes the backend cannot loop forever.
ALTER TABLE imagen.jobs
    ADD COLUMN outage_requeues integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT jobs_outage_requeues_valid CHECK (outage_requeues >= 0);

-- default_backend: what this worker runs a job without a backend with (imagen-worker check
-- warns when live workers disagree). stopped_at: set by a clean shutdown, which keeps the row
-- (expires_at = the moment it stopped) so its backends still count as served for
-- worker.orphan_after: a restart never makes a backend look abandoned.
ALTER TABLE imagen.workers
    ADD COLUMN default_backend text,
    ADD COLUMN stopped_at timestamptz;

-- Backends named by pending jobs that no live worker serves right now, each with how long it
-- has gone unserved: seconds since the last registry entry serving it expired, NULL when no
-- entry is left. A loose index scan over distinct pending backends (one probe of
-- jobs_claim_named per backend, however long the backlog). JIT is off because the recursive
-- query's inflated cost estimate would otherwise spend milliseconds compiling a
-- sub-millisecond query.
CREATE FUNCTION imagen.unserved_backends()
RETURNS TABLE (backend text, unserved_seconds float8)
LANGUAGE sql STABLE SET jit = off AS $$
    WITH RECURSIVE pending_backends AS (
        (SELECT j.backend FROM imagen.jobs j
         WHERE j.status = 'pending' AND j.backend IS NOT NULL ORDER BY j.backend LIMIT 1)
        UNION ALL
        SELECT (SELECT j.backend FROM imagen.jobs j
                WHERE j.status = 'pending' AND j.backend IS NOT NULL AND j.backend > p.backend
                ORDER BY j.backend LIMIT 1)
        FROM pending_backends p
        WHERE p.backend IS NOT NULL
    )
    SELECT p.backend,
           (SELECT extract(epoch FROM now() - max(w.expires_at))::float8
            FROM imagen.workers w WHERE p.backend = ANY (w.backends))
    FROM pending_backends p
    WHERE p.backend IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM imagen.workers w
                      WHERE w.expires_at > now() AND p.backend = ANY (w.backends))
$$;

-- Replaced by imagen.unserved_backends(): "unserved" is now a duration, not a gap.
DROP FUNCTION imagen.orphan_backends();

REVOKE ALL ON FUNCTION imagen.unserved_backends() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION imagen.unserved_backends() TO service_role;
