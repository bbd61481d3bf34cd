CREATE TABLE migration_runs (version INTEGER NOT NULL);
CREATE TABLE things (id INTEGER PRIMARY KEY);
INSERT INTO migration_runs (version) VALUES (1);
