-- The fixed version of the failing migration.
CREATE TABLE half_done (id INTEGER);
INSERT INTO migration_runs (version) VALUES (2);
INSERT INTO half_done (id) VALUES (1);
