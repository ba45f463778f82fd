-- What a web user may ask for, beyond their own rows: two more operator settings the insert
-- trigger enforces for anon and authenticated, and a quota that no longer tells about others.
--
-- imagen.settings.web_backends: the backends a web insert may name (NULL: any; '{}': none).
--   A job without a backend (the workers' default) is always allowed: make the default one you
--   would give anyone. A name outside the list is refused like one that does not exist, so
--   the error tells a user nothing about which backends the operator runs.
-- imagen.settings.max_jobs_per_owner_per_hour: jobs one owner may insert in any hour, whatever
--   became of them (NULL: no limit). max_live_jobs_per_owner bounds the queue; this bounds the
--   rate, which cancelling jobs as fast as they are inserted would otherwise leave unbounded
--   (each insert and cancel costs a row, and a webhook delivery where cancellations have one).
--   Counted on jobs_owner_created, at most limit rows read.
--
-- The quotas are counted only for the caller's own rows: an insert naming another owner is
-- refused by row-level security, and counting that owner's jobs first told the caller
-- whether that owner was at the limit.

ALTER TABLE imagen.settings
    ADD COLUMN web_backends text[],
    ADD COLUMN max_jobs_per_owner_per_hour integer
        CONSTRAINT settings_max_jobs_per_owner_per_hour_positive CHECK (max_jobs_per_owner_per_hour > 0);

CREATE OR REPLACE FUNCTION imagen.jobs_take_turn() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    head      bigint;
    last_turn bigint;
    live      bigint;
    lim       integer;
    per_hour  integer;
    recent    bigint;
    backends  text[];
BEGIN
    IF NEW.status NOT IN ('pending', 'running') THEN
        RETURN NEW;
    END IF;
    IF coalesce(current_setting('role', true), 'none') IN ('anon', 'authenticated') THEN
        IF NEW.owner_user_id IS DISTINCT FROM imagen.uid() THEN
            RETURN NEW;  -- row-level security refuses the row; nothing here may speak of its owner
        END IF;
        SELECT s.max_live_jobs_per_owner, s.max_jobs_per_owner_per_hour, s.web_backends
        INTO lim, per_hour, backends FROM imagen.settings s;
        IF NEW.backend IS NOT NULL AND backends IS NOT NULL AND NOT NEW.backend = ANY (backends) THEN
            RAISE EXCEPTION 'backend "%" is not available', NEW.backend
                USING ERRCODE = 'check_violation',
                      HINT = 'leave backend empty for the default, or name one the operator opened to web users';
        END IF;
    END IF;
    IF lim IS NOT NULL OR per_hour IS NOT NULL THEN
        -- Concurrent inserts of one owner queue here, so two cannot both take the last slot.
        PERFORM pg_advisory_xact_lock(hashtextextended('imagen.owner:' || NEW.owner_user_id, 0));
    END IF;
    IF lim IS NOT NULL THEN
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
    IF per_hour IS NOT NULL THEN
        SELECT count(*) INTO recent FROM (
            SELECT 1 FROM imagen.jobs j
            WHERE j.owner_user_id = NEW.owner_user_id AND j.created_at > now() - interval '1 hour'
            LIMIT per_hour
        ) counted;
        IF recent >= per_hour THEN
            RAISE EXCEPTION 'too many jobs: you submitted % in the last hour, the limit is %', recent, per_hour
                USING ERRCODE = 'check_violation',
                      HINT = 'submit again later';
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
