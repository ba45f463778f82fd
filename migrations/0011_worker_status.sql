-- What `imagen workers` shows of each worker beyond its registration, so an operator sees the
-- fleet from one terminal: the version it runs (a rolling deploy shows which hosts are done),
-- when it began to drain after a stop signal, and the backends it takes no work for right now,
-- each with the worker's own reason (an unreachable ComfyUI, a full disk). Reasons may name
-- internal addresses: like the rest of this table they are for the operator only (web users
-- have no grant on it).
ALTER TABLE imagen.workers
    ADD COLUMN version        text,
    ADD COLUMN draining_since timestamptz,
    ADD COLUMN unavailable    jsonb NOT NULL DEFAULT '{}'
        CONSTRAINT workers_unavailable_object CHECK (jsonb_typeof(unavailable) = 'object');
