-- The postgres image runs this file once, when it initializes an empty data
-- directory, in the database named by POSTGRES_DB (default postgres).
-- sql/mikkoo.sql, mounted as 02-mikkoo.sql, runs after it.
CREATE EXTENSION IF NOT EXISTS pgq;
