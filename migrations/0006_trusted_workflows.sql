-- Per-job workflows only from a trusted path.
--
-- A job may carry its own API-format workflow ({"graph": {...}, "bindings": {...}}) in this
-- column. Only the table owner and service_role can write it: 0002 grants `authenticated`
-- INSERT and UPDATE on named columns only, and this column is not among them, so a web user's
-- supabase-js insert() (which names only the columns it sends) keeps working while a row
-- carrying a workflow is refused with "permission denied". `imagen submit --workflow FILE`
-- sets it for an operator. Params never carry a workflow, except for owners an operator lists
-- in a backend's workflow_owners.

ALTER TABLE imagen.jobs ADD COLUMN workflow jsonb;

ALTER TABLE imagen.jobs
    ADD CONSTRAINT jobs_workflow_object CHECK (jsonb_typeof(workflow) = 'object'),
    ADD CONSTRAINT jobs_workflow_size CHECK (pg_column_size(workflow) <= 1048576);
