-- Supabase Realtime: a web page follows its job row live instead of polling.
--
-- Supabase creates a publication named supabase_realtime; Realtime streams the changes of the
-- tables in it (postgres_changes), each one filtered through the table's RLS SELECT policy, so
-- a user hears only about their own rows. imagen.jobs carries status, progress (percent, ETA,
-- the preview's Storage key) and image_id; imagen.images the finished images. The preview,
-- <owner>/<job id>/preview.jpg, is in the owner's folder, which 0005's storage policy lets the
-- owner read and sign. On plain PostgreSQL there is no such publication and this migration
-- changes nothing.
--
-- imagen.publish_realtime() does the work and is safe to run again: after Supabase (re)created
-- the publication, `SELECT imagen.publish_realtime();` adds the tables again. A publication
-- FOR ALL TABLES already streams them and is left alone.

CREATE OR REPLACE FUNCTION imagen.publish_realtime() RETURNS text[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tables constant text[] := ARRAY['jobs', 'images'];
    added text[] := ARRAY[]::text[];
    t text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime') THEN
        RETURN added;
    END IF;
    IF (SELECT puballtables FROM pg_publication WHERE pubname = 'supabase_realtime') THEN
        RETURN added;
    END IF;
    FOREACH t IN ARRAY tables LOOP
        IF NOT EXISTS (
            SELECT 1 FROM pg_publication_tables
            WHERE pubname = 'supabase_realtime' AND schemaname = 'imagen' AND tablename = t
        ) THEN
            EXECUTE format('ALTER PUBLICATION supabase_realtime ADD TABLE imagen.%I', t);
            added := added || t;
        END IF;
    END LOOP;
    RETURN added;
END
$$;

REVOKE ALL ON FUNCTION imagen.publish_realtime() FROM PUBLIC;

SELECT imagen.publish_realtime();
