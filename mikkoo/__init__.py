"""mikkoo: relay PgQ events from PostgreSQL to RabbitMQ."""

__version__ = '1.0.0'
