"""Turn TLS on at runtime in the local RabbitMQ and PostgreSQL, and off again.

Other test runs share both servers, so neither is restarted and their
existing listeners stay as they are:

* RabbitMQ gets extra TLS listeners on free loopback ports, started and
  stopped with ``rabbitmqctl eval`` and the functions of RabbitMQ 3.10's
  ``rabbit_networking`` module (``start_ssl_listener/3`` and
  ``stop_tcp_listener/1``, which stops a listener of either kind).
* PostgreSQL gets ``ssl = on`` and its certificate files through ALTER
  SYSTEM and a configuration reload; the previous values come back the
  same way. Clients that did not ask for TLS keep working, because the
  server still accepts connections without it.

Both must run as root: rabbitmqctl needs the Erlang cookie, and the
server keys are handed to the rabbitmq and postgres users with chown.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2

# Seconds to wait for a listener or a configuration reload to take effect.
TIMEOUT = 30.0


def wait_for(predicate: Callable[[], bool], condition: str,
             timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` until it returns true; raise AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f'timed out after {timeout:g} s waiting until {condition}')
        time.sleep(0.1)


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=1):
            return True
    except OSError:
        return False


def hand_over(path: Path, user: str, directory: Path) -> Path:
    """Copy the key at ``path`` into ``directory`` for ``user``, mode 0600."""
    copy = directory / f'{path.stem}-{user}{path.suffix}'
    shutil.copyfile(path, copy)
    copy.chmod(0o600)
    shutil.chown(copy, user)
    return copy


# -- RabbitMQ ------------------------------------------------------------------

def rabbitmqctl(*arguments: str, timeout: float = 60.0) -> str:
    """Run rabbitmqctl and return its standard output; raise AssertionError on failure."""
    result = subprocess.run(['rabbitmqctl', *arguments], capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f'rabbitmqctl {" ".join(arguments)} failed with status '
                             f'{result.returncode}:\n{result.stdout}{result.stderr}')
    return result.stdout


def _erlang_string(text: str) -> str:
    # JSON's escaping of a string is also valid Erlang for the ASCII paths
    # the tests use.
    return json.dumps(text)


@dataclasses.dataclass(frozen=True)
class ListenerSpec:
    """The TLS options of one RabbitMQ listener."""

    certfile: Path
    keyfile: Path
    cacertfile: Path
    require_client_certificate: bool = False

    def erlang_options(self) -> str:
        verify = 'verify_peer' if self.require_client_certificate else 'verify_none'
        fail = 'true' if self.require_client_certificate else 'false'
        return (f'[{{cacertfile, {_erlang_string(str(self.cacertfile))}}}, '
                f'{{certfile, {_erlang_string(str(self.certfile))}}}, '
                f'{{keyfile, {_erlang_string(str(self.keyfile))}}}, '
                f'{{verify, {verify}}}, {{fail_if_no_peer_cert, {fail}}}]')


def _listener_address(port: int) -> str:
    return f'{{"127.0.0.1", {port}}}'


def start_tls_listener(spec: ListenerSpec) -> int:
    """Start a RabbitMQ TLS listener on a free loopback port; return the port."""
    port = free_port()
    output = rabbitmqctl('eval', f'rabbit_networking:start_ssl_listener('
                                 f'{_listener_address(port)}, {spec.erlang_options()}, 1).')
    if output.strip() != 'ok':
        raise AssertionError(f'RabbitMQ did not start a TLS listener on port {port}: '
                             f'{output}')
    wait_for(lambda: port_open(port), f'RabbitMQ accepts connections on port {port}')
    return port


def stop_listener(port: int) -> None:
    """Stop the RabbitMQ listener on loopback ``port`` and wait until it is gone."""
    rabbitmqctl('eval', f'rabbit_networking:stop_tcp_listener({_listener_address(port)}).')
    wait_for(lambda: not port_open(port), f'RabbitMQ stops listening on port {port}')


@contextlib.contextmanager
def tls_listeners(specs: dict[str, ListenerSpec]) -> Iterator[dict[str, int]]:
    """Start one TLS listener per spec; yield their ports by name; stop them all."""
    ports: dict[str, int] = {}
    try:
        for name, spec in specs.items():
            ports[name] = start_tls_listener(spec)
        yield ports
    finally:
        errors = []
        for port in ports.values():
            try:
                stop_listener(port)
            except AssertionError as error:
                errors.append(str(error))
        if errors:
            raise AssertionError('\n'.join(errors))


def list_connections() -> list[dict[str, Any]]:
    """Return RabbitMQ's connections with their TLS details and client properties."""
    output = rabbitmqctl('list_connections', 'name', 'ssl', 'ssl_protocol', 'port',
                         'peer_cert_subject', 'client_properties', '--formatter', 'json',
                         '--silent')
    connections: list[dict[str, Any]] = json.loads(output)
    return connections


def connection_name(connection: dict[str, Any]) -> str | None:
    """Return the ``connection_name`` client property of a listed connection."""
    for key, _type, value in connection.get('client_properties') or []:
        if key == 'connection_name':
            return str(value)
    return None


# -- PostgreSQL ----------------------------------------------------------------

SSL_SETTINGS = ('ssl_cert_file', 'ssl_key_file', 'ssl_ca_file', 'ssl')
# Advisory lock key that serialises test runs which change the SSL settings,
# so that one run cannot restore them while another still needs TLS.
POSTGRES_TLS_LOCK = 0x6D696B6B6F6F


def _previous_settings(url: str) -> dict[str, str | None]:
    """Return each SSL setting's value in postgresql.auto.conf, or None if unset there."""
    with contextlib.closing(psycopg2.connect(url, connect_timeout=5)) as connection:
        with connection.cursor() as cursor:
            cursor.execute('SELECT name, setting, sourcefile FROM pg_settings'
                           ' WHERE name = ANY(%s)', (list(SSL_SETTINGS),))
            rows = cursor.fetchall()
    return {name: setting if (sourcefile or '').endswith('postgresql.auto.conf') else None
            for name, setting, sourcefile in rows}


def _alter_system(url: str, values: dict[str, str | None]) -> None:
    """Apply ``values`` with ALTER SYSTEM (None resets) and reload the configuration."""
    with contextlib.closing(psycopg2.connect(url, connect_timeout=5)) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            for name in SSL_SETTINGS:
                if name not in values:
                    continue
                if values[name] is None:
                    cursor.execute(f'ALTER SYSTEM RESET {name}')
                else:
                    cursor.execute(f'ALTER SYSTEM SET {name} = %s', (values[name],))
            cursor.execute('SELECT pg_reload_conf()')


def server_ssl(url: str) -> str:
    """Return the ``ssl`` setting as a new session of the server reports it."""
    with contextlib.closing(psycopg2.connect(url, connect_timeout=5,
                                             sslmode='disable')) as connection:
        with connection.cursor() as cursor:
            cursor.execute('SHOW ssl')
            row = cursor.fetchone()
            assert row is not None
            return str(row[0])


def _tls_session_works(url: str, ca_path: Path) -> bool:
    try:
        connection = psycopg2.connect(url, connect_timeout=5, sslmode='verify-full',
                                      sslrootcert=str(ca_path))
    except psycopg2.OperationalError:
        return False
    connection.close()
    return True


@contextlib.contextmanager
def postgres_tls(url: str, certificate: Path, key: Path, ca_path: Path) -> Iterator[None]:
    """Serve TLS with ``certificate`` and ``key`` until the block ends.

    ``key`` must belong to the postgres user with mode 0600, as PostgreSQL
    requires. The SSL settings are restored afterwards, and the block
    waits both times until new sessions see the change.
    """
    with _advisory_lock(url, POSTGRES_TLS_LOCK):
        previous = _previous_settings(url)
        try:
            _alter_system(url, {'ssl_cert_file': str(certificate),
                                'ssl_key_file': str(key), 'ssl_ca_file': str(ca_path),
                                'ssl': 'on'})
            wait_for(lambda: _tls_session_works(url, ca_path),
                     'PostgreSQL accepts TLS sessions with the test certificate')
            yield
        finally:
            _alter_system(url, previous)
            expected = previous['ssl'] or 'off'
            wait_for(lambda: server_ssl(url) == expected,
                     f'PostgreSQL reports ssl = {expected} again')


@contextlib.contextmanager
def _advisory_lock(url: str, key: int) -> Iterator[None]:
    """Hold a session-level advisory lock of the server until the block ends."""
    with contextlib.closing(psycopg2.connect(url, connect_timeout=5)) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute('SET lock_timeout = %s', (f'{int(TIMEOUT * 4)}s',))
            cursor.execute('SELECT pg_advisory_lock(%s)', (key,))
        yield
