-- params that every reader can hold: at most 32 levels of arrays, objects and values, and no
-- number of 1e64 or more in magnitude (PostgreSQL stores 1e5000 as its 5,001 digits). JSON
-- itself sets neither limit and PostgreSQL takes far more, but Python refuses integers of more
-- than 4,300 digits and nesting past its recursion limit, and so may any other client of the
-- table (JavaScript reads 1e400 as Infinity). Both path expressions run in C: a few
-- microseconds for params of usual size.
--
-- A trigger, not a CHECK constraint: a CHECK is evaluated at every UPDATE of a row too, so a
-- row from before this migration would make the claim that takes it fail, with every other
-- job in that claim. params is written only at INSERT (no role may update it), so checking
-- there is enough; the error is the one a CHECK constraint named jobs_params_plain raises.
-- Rows already in the table stay: the worker fails such a job on its own ("params cannot be
-- read: ...") when it claims it.

CREATE FUNCTION imagen.jobs_params_plain() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF jsonb_path_exists(NEW.params, 'strict $.**{32 to last}')
       OR jsonb_path_exists(NEW.params, 'strict $.** ? (@.type() == "number" && (@ >= 1e64 || @ <= -1e64))')
    THEN
        RAISE EXCEPTION 'new row for relation "jobs" violates check constraint "jobs_params_plain"'
            USING ERRCODE = 'check_violation', SCHEMA = 'imagen', TABLE = 'jobs',
                  CONSTRAINT = 'jobs_params_plain',
                  DETAIL = 'params may nest at most 32 levels and hold no number of 1e64 or more in magnitude';
    END IF;
    RETURN NEW;
END $$;

REVOKE ALL ON FUNCTION imagen.jobs_params_plain() FROM PUBLIC;

CREATE TRIGGER jobs_params_plain
    BEFORE INSERT ON imagen.jobs
    FOR EACH ROW EXECUTE FUNCTION imagen.jobs_params_plain();
