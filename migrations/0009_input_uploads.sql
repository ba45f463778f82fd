-- Input images: a signed-in user may upload, replace and delete objects only under their own
-- <owner id>/uploads/ folder of the imagen-generated bucket (reading their own folder is
-- 0005's imagen_generated_select_own). A job names its input images by these keys
-- (params.images); the worker reads them with the service key and refuses any key outside
-- the job owner's folder, so a user can neither write into nor read from anyone else's.
--
-- Plain PostgreSQL has no storage schema: there this migration does nothing (it is still
-- recorded as applied).

DO $migration$
BEGIN
    IF to_regclass('storage.objects') IS NULL THEN
        RAISE NOTICE 'no storage.objects (not Supabase): skipping the upload policies';
        RETURN;
    END IF;

    DROP POLICY IF EXISTS imagen_uploads_insert_own ON storage.objects;
    CREATE POLICY imagen_uploads_insert_own ON storage.objects
        FOR INSERT TO authenticated
        WITH CHECK (
            bucket_id = 'imagen-generated'
            AND starts_with(name, imagen.uid()::text || '/uploads/')
        );

    -- An upsert (x-upsert: true) updates the existing row: same folder before and after.
    DROP POLICY IF EXISTS imagen_uploads_update_own ON storage.objects;
    CREATE POLICY imagen_uploads_update_own ON storage.objects
        FOR UPDATE TO authenticated
        USING (bucket_id = 'imagen-generated' AND starts_with(name, imagen.uid()::text || '/uploads/'))
        WITH CHECK (bucket_id = 'imagen-generated' AND starts_with(name, imagen.uid()::text || '/uploads/'));

    DROP POLICY IF EXISTS imagen_uploads_delete_own ON storage.objects;
    CREATE POLICY imagen_uploads_delete_own ON storage.objects
        FOR DELETE TO authenticated
        USING (bucket_id = 'imagen-generated' AND starts_with(name, imagen.uid()::text || '/uploads/'));
END
$migration$;
