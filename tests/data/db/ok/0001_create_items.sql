-- Every migration records itself in migration_runs, so a test can see each ran exactly once.
CREATE TABLE migration_runs (version INTEGER NOT NULL);
CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
INSERT INTO migration_runs (version) VALUES (1);
