-- Batches, formats and thumbnails.
--
-- A job asks for n images (jobs.n, 1..16; the backend's max_batch is checked by the worker,
-- which fails a job over it in one sentence) in a format (jobs.format, NULL = the worker's
-- output.format) with a quality (jobs.quality, 1..100, for webp and jpeg). These are columns,
-- not params: the web app writes them like width and height, and every backend honours them.
--
-- Each image of a job is its own imagen.images row: (job_id, index) is unique instead of
-- job_id, index 0 is the job's main image (jobs.image_id), and thumbnail_path is the Storage
-- key of a small WebP beside it, so a gallery never downloads full images.

ALTER TABLE imagen.jobs
    ADD COLUMN n       integer NOT NULL DEFAULT 1 CONSTRAINT jobs_n_range CHECK (n BETWEEN 1 AND 16),
    ADD COLUMN format  text CONSTRAINT jobs_format_known CHECK (format IN ('png', 'webp', 'jpeg')),
    ADD COLUMN quality integer CONSTRAINT jobs_quality_range CHECK (quality BETWEEN 1 AND 100);

GRANT INSERT (n, format, quality) ON imagen.jobs TO authenticated;

ALTER TABLE imagen.images
    ADD COLUMN index          integer NOT NULL DEFAULT 0 CONSTRAINT images_index_range CHECK (index >= 0),
    ADD COLUMN thumbnail_path text;

ALTER TABLE imagen.images DROP CONSTRAINT images_job_id_key;
ALTER TABLE imagen.images ADD CONSTRAINT images_job_index_key UNIQUE (job_id, index);
-- Unique indexes are checked in creation order: recreating the storage path's after the job's
-- lets a second completion of the same job say "already has an image", not "path taken".
ALTER TABLE imagen.images DROP CONSTRAINT images_storage_path_key;
ALTER TABLE imagen.images ADD CONSTRAINT images_storage_path_key UNIQUE (storage_path);
