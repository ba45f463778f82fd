-- Supabase Storage: the private bucket for generated images, and who may read its objects.
--
-- Plain PostgreSQL has no storage schema: there this migration does nothing (it is still
-- recorded as applied).
-- On Supabase it creates the private bucket imagen-generated if missing and one read policy:
-- a signed-in user may read (and therefore sign URLs for) only the objects whose key is the
-- storage_path of one of their own imagen.images rows. Writes need no policy: the worker uses
-- the service key, whose service_role bypasses RLS, and users never write to the bucket.
-- RLS on storage.objects is already enabled by Supabase (and only its owner could change it).

DO $migration$
BEGIN
    IF to_regclass('storage.buckets') IS NULL OR to_regclass('storage.objects') IS NULL THEN
        RAISE NOTICE 'no storage.buckets/storage.objects (not Supabase): skipping the storage bucket and policies';
        RETURN;
    END IF;

    INSERT INTO storage.buckets (id, name, public)
    VALUES ('imagen-generated', 'imagen-generated', false)
    ON CONFLICT (id) DO NOTHING;

    IF EXISTS (SELECT 1 FROM storage.buckets WHERE id = 'imagen-generated' AND public) THEN
        RAISE WARNING 'bucket imagen-generated is public: anyone with a key can read every image; '
                      'make it private in the dashboard (Storage > bucket > Edit)';
    END IF;

    IF NOT EXISTS (
        SELECT 1 FROM pg_policies
        WHERE schemaname = 'storage' AND tablename = 'objects' AND policyname = 'imagen_generated_select_own'
    ) THEN
        CREATE POLICY imagen_generated_select_own ON storage.objects
            FOR SELECT TO authenticated
            USING (
                bucket_id = 'imagen-generated'
                AND EXISTS (
                    SELECT 1
                    FROM imagen.images AS i
                    WHERE i.storage_path = storage.objects.name
                      AND i.owner_user_id = imagen.uid()
                )
            );
    END IF;
END
$migration$;
