"""Helpers for the TLS tests: throwaway certificates, and TLS turned on at
runtime in the local RabbitMQ and PostgreSQL without restarting either."""
