-- Creates a table, then fails: with transactional DDL the table must not survive.
CREATE TABLE half_done (id INTEGER);
INSERT INTO migration_runs (version) VALUES (2);
INSERT INTO no_such_table (id) VALUES (1);
