-- Completion webhooks: an outbox filled by the database itself.
--
-- When a job's status becomes done, failed or cancelled, a trigger inserts one delivery row
-- in the same transaction as that transition, so a crash between the commit and the HTTP
-- POST loses nothing: a worker with a `webhooks:` block claims pending rows and posts them.
-- The trigger covers every way a job ends, including a pending job cancelled by its owner
-- through the web app, and keeps the job state machine's statements untouched.
--
-- Whether rows are inserted at all is decided by imagen.webhook_settings, one row that every
-- worker writes when it starts: the events of its `webhooks:` block, or none when it has no
-- such block. Without webhooks configured, nothing is queued and nothing grows.

CREATE TABLE imagen.webhook_settings (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    events     text[] NOT NULL DEFAULT '{}'
        CHECK (events <@ ARRAY['done', 'failed', 'cancelled']::text[]),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per (job, terminal transition). No foreign key to imagen.jobs: deleting old jobs
-- must not wait on their delivery history, and a delivery whose job is gone fails with a
-- sentence instead. A job retried after failing gets a new row when it ends again.
-- next_attempt_at doubles as the claim's lease: a claimed row is pushed past the time its
-- attempt can take, so a worker that dies mid-delivery leaves it to the next claim.
CREATE TABLE imagen.webhook_deliveries (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id          uuid NOT NULL,
    event           text NOT NULL,
    status          text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_by      uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,

    CONSTRAINT webhook_deliveries_event_valid CHECK (event IN ('done', 'failed', 'cancelled')),
    CONSTRAINT webhook_deliveries_status_valid CHECK (status IN ('pending', 'delivered', 'failed')),
    CONSTRAINT webhook_deliveries_attempts_valid CHECK (attempts >= 0),
    CONSTRAINT webhook_deliveries_delivered_at CHECK ((status = 'delivered') = (delivered_at IS NOT NULL))
);

-- The outbox claim: due pending rows, oldest first.
CREATE INDEX webhook_deliveries_due ON imagen.webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_job ON imagen.webhook_deliveries (job_id);

-- SECURITY DEFINER: a web user cancelling a pending job fires this trigger as `authenticated`,
-- which has no privilege on the outbox (and must not have any).
CREATE FUNCTION imagen.queue_webhook() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO imagen.webhook_deliveries (job_id, event)
    SELECT NEW.id, NEW.status
    FROM imagen.webhook_settings s
    WHERE NEW.status = ANY (s.events);
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_queue_webhook
    AFTER UPDATE ON imagen.jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       AND NEW.status IN ('done', 'failed', 'cancelled'))
    EXECUTE FUNCTION imagen.queue_webhook();

-- Worker-only: the web app's roles see neither table (RLS on, no policies, no grants).
ALTER TABLE imagen.webhook_settings ENABLE ROW LEVEL SECURITY;
ALTER TABLE imagen.webhook_deliveries ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON imagen.webhook_settings, imagen.webhook_deliveries FROM PUBLIC, anon, authenticated;
GRANT ALL ON imagen.webhook_settings, imagen.webhook_deliveries TO service_role;
REVOKE ALL ON FUNCTION imagen.queue_webhook() FROM PUBLIC;
