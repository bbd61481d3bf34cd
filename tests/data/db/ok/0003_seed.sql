INSERT INTO items (id, name, qty) VALUES (1, 'seed', 7);
INSERT INTO migration_runs (version) VALUES (3);
