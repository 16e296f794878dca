-- Helper functions that insert PgQ events in the layout mikkoo relays to
-- RabbitMQ, and an optional audit table of inserted messages.
--
-- Event layout (all PgQ event columns are text):
--   ev_type   AMQP routing key
--   ev_data   message body
--   ev_extra1 exchange
--   ev_extra2 content type
--   ev_extra3 JSON object of AMQP properties
--   ev_extra4 JSON object of AMQP headers
--
-- Install with a superuser, because CREATE EXTENSION pgq requires one:
--   psql -v ON_ERROR_STOP=1 --single-transaction -d DBNAME -f sql/mikkoo.sql
-- Running the file again replaces the functions and keeps the audit rows.
-- It needs PostgreSQL 13 or later for the core gen_random_uuid().
--
-- Privileges: every role may use the schema. The two insert_event functions
-- run as their caller (SECURITY INVOKER), so the caller needs the rights of
-- PgQ's pgq_writer role, as with pgq.insert_event. The audit functions run as
-- their owner (SECURITY DEFINER) so that callers need no rights on
-- mikkoo.audit. PUBLIC cannot execute them: insert_audited_event is granted
-- to pgq_writer, and new_audit_record and delete_audit_record must be granted
-- by hand, for example:
--   GRANT EXECUTE ON FUNCTION mikkoo.delete_audit_record(uuid) TO receiver;

CREATE EXTENSION IF NOT EXISTS pgq;

CREATE SCHEMA IF NOT EXISTS mikkoo;

COMMENT ON SCHEMA mikkoo IS
  'Helpers that insert PgQ events for the mikkoo PgQ to RabbitMQ relay';

GRANT USAGE ON SCHEMA mikkoo TO PUBLIC;

CREATE TABLE IF NOT EXISTS mikkoo.audit (
  message_id   UUID        NOT NULL PRIMARY KEY,
  event_id     BIGINT,
  queue        TEXT,
  exchange     TEXT,
  routing_key  TEXT,
  payload      TEXT,
  content_type TEXT,
  properties   JSONB,
  headers      JSONB,
  published_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

COMMENT ON TABLE mikkoo.audit IS
  'Messages inserted with mikkoo.insert_audited_event. A receiver that got '
  'a message is expected to delete its row with mikkoo.delete_audit_record, '
  'so the rows left over are messages not confirmed as received.';

COMMENT ON COLUMN mikkoo.audit.published_at IS
  'Start time of the transaction that inserted the event (now()), not the '
  'time mikkoo sent the message to RabbitMQ';

-- Queries for old unconfirmed messages and purges of old rows filter on
-- published_at.
CREATE INDEX IF NOT EXISTS audit_published_at_idx
  ON mikkoo.audit (published_at);


CREATE OR REPLACE FUNCTION mikkoo.insert_event(
  queue        TEXT,
  exchange     TEXT,
  routing_key  TEXT,
  payload      TEXT,
  content_type TEXT,
  properties   JSONB,
  headers      JSONB)
RETURNS BIGINT
LANGUAGE plpgsql
SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  -- mikkoo reads both columns as JSON objects, so reject any other JSON
  -- value here, inside the caller's transaction, rather than in the relay.
  IF properties IS NOT NULL
     AND pg_catalog.jsonb_typeof(properties) <> 'object' THEN
    RAISE EXCEPTION
      'invalid AMQP properties: expected a JSON object or NULL, got a JSON %',
      pg_catalog.jsonb_typeof(properties)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF headers IS NOT NULL
     AND pg_catalog.jsonb_typeof(headers) <> 'object' THEN
    RAISE EXCEPTION
      'invalid AMQP headers: expected a JSON object or NULL, got a JSON %',
      pg_catalog.jsonb_typeof(headers)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  RETURN pgq.insert_event(
    queue, routing_key, payload, exchange, content_type,
    properties::TEXT, headers::TEXT);
END;
$$;

COMMENT ON FUNCTION mikkoo.insert_event(
  TEXT, TEXT, TEXT, TEXT, TEXT, JSONB, JSONB) IS
  'Insert a PgQ event for mikkoo with the given AMQP properties and headers '
  '(JSON objects or NULL) and return the event id. Raises '
  'invalid_parameter_value when properties or headers is not a JSON object.';


CREATE OR REPLACE FUNCTION mikkoo.insert_event(
  queue        TEXT,
  exchange     TEXT,
  routing_key  TEXT,
  payload      TEXT,
  content_type TEXT)
RETURNS BIGINT
LANGUAGE plpgsql
SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  RETURN mikkoo.insert_event(
    queue, exchange, routing_key, payload, content_type,
    pg_catalog.jsonb_build_object('message_id', pg_catalog.gen_random_uuid()),
    pg_catalog.jsonb_build_object('pgq_queue', queue));
END;
$$;

COMMENT ON FUNCTION mikkoo.insert_event(TEXT, TEXT, TEXT, TEXT, TEXT) IS
  'Insert a PgQ event for mikkoo with a new random message_id property and '
  'a pgq_queue header naming the queue, and return the event id.';


CREATE OR REPLACE FUNCTION mikkoo.new_audit_record(
  message_id   UUID,
  event_id     BIGINT,
  queue        TEXT,
  exchange     TEXT,
  routing_key  TEXT,
  payload      TEXT,
  content_type TEXT,
  properties   JSONB,
  headers      JSONB)
RETURNS VOID
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  INSERT INTO mikkoo.audit (
    message_id, event_id, queue, exchange, routing_key, payload,
    content_type, properties, headers)
  VALUES (
    message_id, event_id, queue, exchange, routing_key, payload,
    content_type, properties, headers);
END;
$$;

COMMENT ON FUNCTION mikkoo.new_audit_record(
  UUID, BIGINT, TEXT, TEXT, TEXT, TEXT, TEXT, JSONB, JSONB) IS
  'Insert a row into mikkoo.audit. Raises unique_violation when the '
  'message_id is already recorded.';


CREATE OR REPLACE FUNCTION mikkoo.delete_audit_record(message_id UUID)
RETURNS BOOLEAN
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  DELETE FROM mikkoo.audit AS a
    WHERE a.message_id = delete_audit_record.message_id;
  RETURN FOUND;
END;
$$;

COMMENT ON FUNCTION mikkoo.delete_audit_record(UUID) IS
  'Delete the mikkoo.audit row of a message. Returns true when a row was '
  'deleted and false when none had that message_id.';


CREATE OR REPLACE FUNCTION mikkoo.insert_audited_event(
  queue        TEXT,
  exchange     TEXT,
  routing_key  TEXT,
  payload      TEXT,
  content_type TEXT)
RETURNS BIGINT
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  message_id UUID := pg_catalog.gen_random_uuid();
  properties JSONB := pg_catalog.jsonb_build_object('message_id', message_id);
  headers    JSONB := pg_catalog.jsonb_build_object('pgq_queue', queue);
  event_id   BIGINT;
BEGIN
  event_id := mikkoo.insert_event(
    queue, exchange, routing_key, payload, content_type, properties, headers);
  PERFORM mikkoo.new_audit_record(
    message_id, event_id, queue, exchange, routing_key, payload,
    content_type, properties, headers);
  RETURN event_id;
END;
$$;

COMMENT ON FUNCTION mikkoo.insert_audited_event(
  TEXT, TEXT, TEXT, TEXT, TEXT) IS
  'Insert a PgQ event as mikkoo.insert_event(5 arguments) does, record it in '
  'mikkoo.audit under the same message_id, and return the event id.';


-- CREATE FUNCTION grants EXECUTE to PUBLIC, which would let any role write
-- and delete audit rows through the SECURITY DEFINER functions.
REVOKE ALL ON FUNCTION
  mikkoo.new_audit_record(
    UUID, BIGINT, TEXT, TEXT, TEXT, TEXT, TEXT, JSONB, JSONB),
  mikkoo.delete_audit_record(UUID),
  mikkoo.insert_audited_event(TEXT, TEXT, TEXT, TEXT, TEXT)
  FROM PUBLIC;

-- CREATE EXTENSION pgq creates the pgq_writer role when it is missing.
GRANT EXECUTE ON FUNCTION
  mikkoo.insert_audited_event(TEXT, TEXT, TEXT, TEXT, TEXT)
  TO pgq_writer;
