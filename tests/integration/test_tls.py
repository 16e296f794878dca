"""TLS to RabbitMQ and PostgreSQL: the relay over real handshakes, and its errors.

The module makes a throwaway CA and certificates, adds TLS listeners to the
local RabbitMQ at runtime (see tls_support.services) and runs the real
``mikkoo`` command against them. The tests of ``tls.client_context`` and
``tls.describe_handshake_failure`` at the end need no servers except one
listener for real handshakes.
"""
from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika.exceptions
import pytest
from pika.adapters.utils.connection_workflow import (
    AMQPConnectionWorkflowFailed, AMQPConnectorStackTimeout,
    AMQPConnectorTransportSetupError)

from mikkoo import config, tls
from tests.integration.conftest import (
    POSTGRES_URL, AMQPHelper, MikkooProcess, MikkooRunner, insert_event,
    mikkoo_config, queue_config, rabbitmq_settings, sql, tick, unique_name)
from tests.integration.tls_support.certs import KEY_PASSWORD, TLSFiles, write_tls_files
from tests.integration.tls_support.services import (
    ListenerSpec, connection_name, hand_over, list_connections, postgres_tls,
    tls_listeners)

# Seconds to wait for the attempt lines of a worker that cannot connect;
# its delays start at 1 s and double.
RETRY_TIMEOUT = 20.0


# -- fixtures ----------------------------------------------------------------

@pytest.fixture(scope='module')
def files() -> Iterator[TLSFiles]:
    """The test CA, certificates and keys, in a directory RabbitMQ and PostgreSQL can read."""
    # pytest's tmp_path sits in a directory only root may enter.
    directory = Path(tempfile.mkdtemp(prefix='mikkoo-tls-'))
    try:
        directory.chmod(0o755)
        yield write_tls_files(directory)
    finally:
        subprocess.run(['rm', '-rf', '--', str(directory)], check=True)


@pytest.fixture(scope='module')
def listeners(files: TLSFiles) -> Iterator[dict[str, int]]:
    """Ports of TLS listeners added to the local RabbitMQ, stopped afterwards.

    - ``server`` has a certificate for 127.0.0.1 and localhost.
    - ``mutual`` has the same certificate and requires a client certificate.
    - ``localhost`` has a certificate for localhost only.
    - ``expired`` has an expired certificate.
    """
    directory = files.directory

    def spec(certificate: Path, key: Path, mutual: bool = False) -> ListenerSpec:
        return ListenerSpec(certificate, hand_over(key, 'rabbitmq', directory), files.ca,
                            require_client_certificate=mutual)

    specs = {
        'server': spec(files.server, files.server_key),
        'mutual': spec(files.server, files.server_key, mutual=True),
        'localhost': spec(files.localhost_server, files.localhost_server_key),
        'expired': spec(files.expired_server, files.expired_server_key),
    }
    with tls_listeners(specs) as ports:
        yield ports


# -- helpers -----------------------------------------------------------------

def tls_config(postgres_url: str, queue: str, port: int, ssl_options: dict[str, Any],
               host: str = '127.0.0.1') -> dict[str, Any]:
    """A configuration with one worker that connects to RabbitMQ with TLS."""
    rabbitmq = {**rabbitmq_settings(), 'host': host, 'port': port,
                'ssl_options': ssl_options}
    # unregister: false keeps the events inserted while a test stops and
    # starts mikkoo.
    return mikkoo_config({queue: queue_config(postgres_url, rabbitmq=rabbitmq,
                                              unregister=False)})


def send_event(postgres_url: str, queue: str, amqp: AMQPHelper) -> tuple[str, str]:
    """Insert an event for a new RabbitMQ queue and tick; return the queue and body."""
    target = amqp.declare_queue()
    body = f'over TLS to {target}'
    insert_event(postgres_url, queue, target, data=body)
    tick(postgres_url, queue)
    return target, body


def assert_relayed(process: MikkooProcess, postgres_url: str, queue: str,
                   amqp: AMQPHelper) -> None:
    target, body = send_event(postgres_url, queue, amqp)
    messages = amqp.get_messages(target, count=1)
    assert len(messages) == 1, process.describe()
    assert messages[0].body == body.encode()


def broker_failures(process: MikkooProcess, queue: str, count: int) -> list[str]:
    """Wait for ``count`` failed RabbitMQ connection attempts; return their lines."""
    pattern = rf'queue {re.escape(queue)}: cannot connect to RabbitMQ \(attempt \d+\)'
    return process.wait_for_log(pattern, timeout=RETRY_TIMEOUT, count=count)


def line_pids(lines: list[str], queue: str) -> set[int]:
    """The pids of the worker processes that logged ``lines``."""
    pattern = re.compile(rf'worker\[{re.escape(queue)}\]\[(\d+)\]')
    return {int(match[1]) for line in lines if (match := pattern.search(line))}


def mikkoo_connection(queue: str) -> dict[str, Any]:
    """The RabbitMQ connection of the worker of ``queue``, as rabbitmqctl lists it."""
    found = [connection for connection in list_connections()
             if connection_name(connection) == f'mikkoo {queue}']
    assert len(found) == 1, f'{len(found)} connections named "mikkoo {queue}"'
    return found[0]


# -- relaying over TLS ---------------------------------------------------------

def test_relays_with_ca_verification(pg_database: str, amqp: AMQPHelper,
                                     run_mikkoo: MikkooRunner, files: TLSFiles,
                                     listeners: dict[str, int]) -> None:
    queue = unique_name('tls')
    process = run_mikkoo(tls_config(pg_database, queue, listeners['server'],
                                    {'ca_certs': str(files.ca)}))
    process.wait_registered(pg_database, queue)

    assert_relayed(process, pg_database, queue, amqp)

    connection = mikkoo_connection(queue)
    assert connection['ssl'] is True
    assert connection['port'] == listeners['server']
    assert connection['ssl_protocol'] in ('tlsv1.2', 'tlsv1.3')


def test_relays_with_client_certificate(pg_database: str, amqp: AMQPHelper,
                                        run_mikkoo: MikkooRunner, files: TLSFiles,
                                        listeners: dict[str, int]) -> None:
    queue = unique_name('tls_client')
    process = run_mikkoo(tls_config(pg_database, queue, listeners['mutual'], {
        'ca_certs': str(files.ca), 'certfile': str(files.client),
        'keyfile': str(files.client_key)}))
    process.wait_registered(pg_database, queue)

    assert_relayed(process, pg_database, queue, amqp)

    connection = mikkoo_connection(queue)
    assert connection['ssl'] is True
    assert 'CN=mikkoo client' in connection['peer_cert_subject']


def test_relays_with_encrypted_key(pg_database: str, amqp: AMQPHelper,
                                   run_mikkoo: MikkooRunner, files: TLSFiles,
                                   listeners: dict[str, int]) -> None:
    queue = unique_name('tls_encrypted')
    process = run_mikkoo(tls_config(pg_database, queue, listeners['mutual'], {
        'ca_certs': str(files.ca), 'certfile': str(files.encrypted_client),
        'keyfile': str(files.encrypted_client_key), 'password': KEY_PASSWORD}))
    process.wait_registered(pg_database, queue)

    assert_relayed(process, pg_database, queue, amqp)

    assert 'CN=mikkoo encrypted client' in mikkoo_connection(queue)['peer_cert_subject']
    assert KEY_PASSWORD not in process.log()


def test_relays_with_verify_hostname_off(pg_database: str, amqp: AMQPHelper,
                                         run_mikkoo: MikkooRunner, files: TLSFiles,
                                         listeners: dict[str, int]) -> None:
    # The certificate names localhost only; the chain is still verified.
    queue = unique_name('tls_no_hostname')
    process = run_mikkoo(tls_config(pg_database, queue, listeners['localhost'], {
        'ca_certs': str(files.ca), 'verify_hostname': False}))
    process.wait_registered(pg_database, queue)

    assert_relayed(process, pg_database, queue, amqp)


def test_relays_to_host_in_certificate(pg_database: str, amqp: AMQPHelper,
                                       run_mikkoo: MikkooRunner, files: TLSFiles,
                                       listeners: dict[str, int]) -> None:
    queue = unique_name('tls_localhost')
    process = run_mikkoo(tls_config(pg_database, queue, listeners['localhost'],
                                    {'ca_certs': str(files.ca)}, host='localhost'))
    process.wait_registered(pg_database, queue)

    assert_relayed(process, pg_database, queue, amqp)


def test_amqps_url_uses_system_cas(pg_database: str, amqp: AMQPHelper,
                                   run_mikkoo: MikkooRunner, files: TLSFiles,
                                   listeners: dict[str, int],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # OpenSSL reads the system's CAs from SSL_CERT_FILE when it is set; the
    # mikkoo subprocess inherits it.
    monkeypatch.setenv('SSL_CERT_FILE', str(files.ca))
    queue = unique_name('tls_url')
    url = f'amqps://guest:guest@localhost:{listeners["server"]}/%2F'
    worker = queue_config(pg_database, rabbitmq_url=url)
    del worker['rabbitmq']
    process = run_mikkoo(mikkoo_config({queue: worker}))
    process.wait_registered(pg_database, queue)

    assert_relayed(process, pg_database, queue, amqp)

    assert mikkoo_connection(queue)['ssl'] is True


def test_port_defaults_to_5671(tmp_path: Path) -> None:
    path = tmp_path / 'mikkoo.yml'
    path.write_text('Application:\n  workers:\n    orders:\n'
                    '      postgres_url: postgresql://127.0.0.1/db\n'
                    '      rabbitmq:\n        ssl_options:\n          ca_certs: /ca.pem\n')

    settings = config.load(str(path))

    assert settings.workers['orders'].rabbitmq.port == 5671


# -- refused handshakes ------------------------------------------------------

def test_wrong_ca_retries_then_recovers(pg_database: str, amqp: AMQPHelper,
                                        run_mikkoo: MikkooRunner, files: TLSFiles,
                                        listeners: dict[str, int]) -> None:
    queue = unique_name('tls_wrong_ca')
    port = listeners['server']
    process = run_mikkoo(tls_config(pg_database, queue, port,
                                    {'ca_certs': str(files.other_ca)}))
    process.wait_registered(pg_database, queue)
    target, body = send_event(pg_database, queue, amqp)

    lines = broker_failures(process, queue, count=3)

    assert line_pids(lines, queue) == set(process.worker_pids())
    for line in lines:
        assert f'TLS handshake with 127.0.0.1:{port} failed' in line
        assert "the server's certificate cannot be verified" in line
    assert len(process.log_lines(r'started worker for queue')) == 1
    assert not process.log_lines(r'Traceback|ERROR')
    assert amqp.expect_no_message(target, wait=0.5) == []

    process.send(signal.SIGTERM)
    assert process.wait() == 0
    fixed = run_mikkoo(tls_config(pg_database, queue, port, {'ca_certs': str(files.ca)}))
    messages = amqp.get_messages(target, count=1)
    assert len(messages) == 1, fixed.describe()
    assert messages[0].body == body.encode()


def test_wrong_host_rejected(pg_database: str, amqp: AMQPHelper,
                             run_mikkoo: MikkooRunner, files: TLSFiles,
                             listeners: dict[str, int]) -> None:
    queue = unique_name('tls_wrong_host')
    process = run_mikkoo(tls_config(pg_database, queue, listeners['localhost'],
                                    {'ca_certs': str(files.ca)}))
    process.wait_registered(pg_database, queue)
    target, _body = send_event(pg_database, queue, amqp)

    lines = broker_failures(process, queue, count=2)

    assert "the server's certificate is not valid for 127.0.0.1" in lines[0]
    assert 'verify_hostname' in lines[0]
    assert amqp.expect_no_message(target, wait=0.5) == []


def test_expired_certificate_rejected(pg_database: str, amqp: AMQPHelper,
                                      run_mikkoo: MikkooRunner, files: TLSFiles,
                                      listeners: dict[str, int]) -> None:
    queue = unique_name('tls_expired')
    process = run_mikkoo(tls_config(pg_database, queue, listeners['expired'],
                                    {'ca_certs': str(files.ca)}))
    process.wait_registered(pg_database, queue)
    target, _body = send_event(pg_database, queue, amqp)

    lines = broker_failures(process, queue, count=2)

    assert "the server's certificate has expired" in lines[0]
    assert amqp.expect_no_message(target, wait=0.5) == []


def test_plain_port_fails_handshake(pg_database: str, run_mikkoo: MikkooRunner,
                                    files: TLSFiles) -> None:
    queue = unique_name('tls_plain_port')
    plain_port = rabbitmq_settings()['port']
    process = run_mikkoo(tls_config(pg_database, queue, plain_port,
                                    {'ca_certs': str(files.ca)}))

    lines = broker_failures(process, queue, count=2)

    assert f'TLS handshake with 127.0.0.1:{plain_port} failed' in lines[0]
    assert 'the server did not answer in TLS' in lines[0]


# RabbitMQ resets the connection right after its alert, which the reset
# sometimes discards before mikkoo reads it. The error then reports the
# closed connection, so these tests check only what both texts name.

def test_missing_client_certificate_named(pg_database: str, run_mikkoo: MikkooRunner,
                                          files: TLSFiles,
                                          listeners: dict[str, int]) -> None:
    queue = unique_name('tls_no_client_cert')
    port = listeners['mutual']
    process = run_mikkoo(tls_config(pg_database, queue, port, {'ca_certs': str(files.ca)}))

    lines = broker_failures(process, queue, count=2)

    for line in lines:
        assert f'TLS handshake with 127.0.0.1:{port} failed' in line
        assert 'client certificate' in line


def test_untrusted_client_certificate_named(pg_database: str, run_mikkoo: MikkooRunner,
                                            files: TLSFiles,
                                            listeners: dict[str, int]) -> None:
    queue = unique_name('tls_untrusted_client')
    port = listeners['mutual']
    process = run_mikkoo(tls_config(pg_database, queue, port, {
        'ca_certs': str(files.ca), 'certfile': str(files.untrusted_client),
        'keyfile': str(files.untrusted_client_key)}))

    lines = broker_failures(process, queue, count=2)

    for line in lines:
        assert f'TLS handshake with 127.0.0.1:{port} failed' in line
        assert 'client certificate' in line


# -- unusable ssl_options in a running relay -----------------------------------

def test_missing_ca_file_retried(pg_database: str, run_mikkoo: MikkooRunner,
                                 files: TLSFiles, listeners: dict[str, int]) -> None:
    queue = unique_name('tls_missing_ca')
    missing = files.directory / 'missing-ca.pem'
    process = run_mikkoo(tls_config(pg_database, queue, listeners['server'],
                                    {'ca_certs': str(missing)}))

    lines = broker_failures(process, queue, count=2)

    assert f'ssl_options.ca_certs: file not found: {missing}' in lines[0]
    assert len(line_pids(lines, queue)) == 1


def test_wrong_key_password_masked(pg_database: str, run_mikkoo: MikkooRunner,
                                   files: TLSFiles, listeners: dict[str, int]) -> None:
    queue = unique_name('tls_wrong_password')
    wrong_password = 'wrong-pass-4Kd9'
    process = run_mikkoo(tls_config(pg_database, queue, listeners['mutual'], {
        'ca_certs': str(files.ca), 'certfile': str(files.encrypted_client),
        'keyfile': str(files.encrypted_client_key), 'password': wrong_password}))

    lines = broker_failures(process, queue, count=2)

    assert f'cannot decrypt the private key in {files.encrypted_client_key}' in lines[0]
    assert 'ssl_options.password' in lines[0]
    assert wrong_password not in process.log()
    assert "'password': '****'" in process.log()


# -- PostgreSQL over TLS -----------------------------------------------------

def test_postgres_over_tls(pg_database: str, amqp: AMQPHelper, run_mikkoo: MikkooRunner,
                           files: TLSFiles) -> None:
    postgres_key = hand_over(files.server_key, 'postgres', files.directory)
    queue = unique_name('tls_postgres')
    with postgres_tls(POSTGRES_URL, files.server, postgres_key, files.ca):
        url = f'{pg_database}?sslmode=verify-full&sslrootcert={files.ca}'
        process = run_mikkoo(mikkoo_config({queue: queue_config(url)}))
        process.wait_registered(pg_database, queue)

        assert_relayed(process, pg_database, queue, amqp)

        rows = sql(pg_database, 'SELECT s.ssl, s.version FROM pg_stat_ssl AS s'
                                ' JOIN pg_stat_activity AS a USING (pid)'
                                ' WHERE a.application_name = %s', (f'mikkoo {queue}',))
        assert rows, process.describe()
        for uses_ssl, version in rows:
            assert uses_ssl is True
            assert version in ('TLSv1.2', 'TLSv1.3')
        process.kill()


# -- tls.client_context ------------------------------------------------------

def test_context_verifies_by_default() -> None:
    context = tls.client_context({})

    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.protocol == ssl.PROTOCOL_TLS_CLIENT


def test_verify_hostname_off_keeps_chain_check(files: TLSFiles) -> None:
    context = tls.client_context({'ca_certs': str(files.ca), 'verify_hostname': False})

    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_empty_verify_hostname_keeps_check() -> None:
    context = tls.client_context({'verify_hostname': None})

    assert context.check_hostname is True


def test_verify_hostname_needs_boolean() -> None:
    with pytest.raises(tls.TLSConfigError, match='verify_hostname must be true or false'):
        tls.client_context({'verify_hostname': 'no'})


def test_missing_ca_file_named(files: TLSFiles) -> None:
    missing = files.directory / 'absent.pem'

    with pytest.raises(tls.TLSConfigError) as caught:
        tls.client_context({'ca_certs': str(missing)})

    assert str(caught.value) == f'ssl_options.ca_certs: file not found: {missing}'


def test_ca_file_that_is_directory(files: TLSFiles) -> None:
    with pytest.raises(tls.TLSConfigError, match='is a directory, not a file'):
        tls.client_context({'ca_certs': str(files.directory)})


def test_ca_file_without_certificate(files: TLSFiles) -> None:
    with pytest.raises(tls.TLSConfigError, match='contains no valid PEM certificate'):
        tls.client_context({'ca_certs': str(files.client_key)})


def test_missing_certfile_named(files: TLSFiles) -> None:
    missing = files.directory / 'absent-client.pem'

    with pytest.raises(tls.TLSConfigError) as caught:
        tls.client_context({'certfile': str(missing), 'keyfile': str(files.client_key)})

    assert str(caught.value) == f'ssl_options.certfile: file not found: {missing}'


def test_ca_path_without_hashed_names(files: TLSFiles, tmp_path: Path) -> None:
    (tmp_path / 'ca.pem').write_bytes(files.ca.read_bytes())

    with pytest.raises(tls.TLSConfigError, match='openssl rehash'):
        tls.client_context({'ca_path': str(tmp_path)})


def test_missing_ca_path_named(tmp_path: Path) -> None:
    with pytest.raises(tls.TLSConfigError, match='directory not found: .*absent'):
        tls.client_context({'ca_path': str(tmp_path / 'absent')})


def test_invalid_ca_data() -> None:
    with pytest.raises(tls.TLSConfigError, match='ca_data contains no valid PEM'):
        tls.client_context({'ca_data': 'not a certificate'})


def test_wrong_password_named(files: TLSFiles) -> None:
    with pytest.raises(tls.TLSConfigError) as caught:
        tls.client_context({'certfile': str(files.encrypted_client),
                            'keyfile': str(files.encrypted_client_key),
                            'password': 'wrong-pass-4Kd9'})

    assert 'cannot decrypt the private key' in str(caught.value)
    assert 'wrong-pass-4Kd9' not in str(caught.value)


def test_encrypted_key_needs_password(files: TLSFiles) -> None:
    with pytest.raises(tls.TLSConfigError, match='is encrypted; set ssl_options.password'):
        tls.client_context({'certfile': str(files.encrypted_client),
                            'keyfile': str(files.encrypted_client_key)})


def test_password_must_be_string(files: TLSFiles) -> None:
    with pytest.raises(tls.TLSConfigError) as caught:
        tls.client_context({'certfile': str(files.encrypted_client),
                            'keyfile': str(files.encrypted_client_key), 'password': 73519})

    assert 'must be a string' in str(caught.value)
    assert '73519' not in str(caught.value)


def test_key_of_other_certificate(files: TLSFiles) -> None:
    with pytest.raises(tls.TLSConfigError, match='does not belong to the certificate'):
        tls.client_context({'certfile': str(files.client),
                            'keyfile': str(files.untrusted_client_key)})


def test_keyfile_needs_certfile(files: TLSFiles) -> None:
    with pytest.raises(tls.TLSConfigError, match='keyfile is set but certfile is not'):
        tls.client_context({'keyfile': str(files.client_key)})


def test_server_protocol_rejected() -> None:
    with pytest.raises(tls.TLSConfigError, match='PROTOCOL_TLS_SERVER'):
        tls.client_context({'protocol': int(ssl.PROTOCOL_TLS_SERVER)})


def test_unknown_protocol_rejected() -> None:
    with pytest.raises(tls.TLSConfigError, match='protocol must be an ssl.PROTOCOL_'):
        tls.client_context({'protocol': 99})


def test_protocol_by_name() -> None:
    context = tls.client_context({'protocol': 'PROTOCOL_TLS_CLIENT'})

    assert context.protocol == ssl.PROTOCOL_TLS_CLIENT


def test_check_options_lists_every_problem() -> None:
    problems = tls.check_options({'ca_certs': 5, 'verify_hostname': 'no',
                                  'password': 1234, 'protocol': True})

    assert problems == [
        'ssl_options.ca_certs must be a path, got 5',
        'ssl_options.password must be a string (quote it in YAML), got a value of type int',
        'ssl_options.protocol must be an ssl.PROTOCOL_* number or name such as 16 or '
        'PROTOCOL_TLS_CLIENT, got True',
        "ssl_options.verify_hostname must be true or false, got 'no'",
    ]


def test_check_options_reads_no_file() -> None:
    assert tls.check_options({'ca_certs': '/nonexistent/ca.pem'}) == []


def test_ciphers_applied() -> None:
    context = tls.client_context({'ciphers': 'ECDHE+AESGCM'})

    names = {cipher['name'] for cipher in context.get_ciphers()
             if cipher['protocol'] == 'TLSv1.2'}
    assert names
    assert all('GCM' in name for name in names)


def test_ciphers_that_select_nothing() -> None:
    with pytest.raises(tls.TLSConfigError, match="ciphers 'NO-SUCH-CIPHER' selects no"):
        tls.client_context({'ciphers': 'NO-SUCH-CIPHER'})


def handshake(context: ssl.SSLContext, port: int, host: str = '127.0.0.1') -> str:
    """Complete a TLS handshake with the listener on ``port``; return the version."""
    with socket.create_connection(('127.0.0.1', port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as wrapped:
            return str(wrapped.version())


@pytest.mark.parametrize('source', ['ca_certs', 'ca_path', 'ca_data'])
def test_each_ca_source_verifies(source: str, files: TLSFiles, tmp_path: Path,
                                 listeners: dict[str, int]) -> None:
    if source == 'ca_certs':
        options = {'ca_certs': str(files.ca)}
    elif source == 'ca_path':
        (tmp_path / 'ca.pem').write_bytes(files.ca.read_bytes())
        subprocess.run(['openssl', 'rehash', str(tmp_path)], check=True)
        options = {'ca_path': str(tmp_path)}
    else:
        options = {'ca_data': files.ca.read_text()}

    version = handshake(tls.client_context(options), listeners['server'])

    assert version.startswith('TLSv1.')


def test_other_ca_fails_handshake(files: TLSFiles, listeners: dict[str, int]) -> None:
    context = tls.client_context({'ca_certs': str(files.other_ca)})

    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(context, listeners['server'])


# -- tls.describe_handshake_failure and amqps:// query parameters ------------

def test_transport_timeout_described() -> None:
    error = AMQPConnectionWorkflowFailed([AMQPConnectorTransportSetupError(
        AMQPConnectorStackTimeout('Timeout while setting up transport'))])

    text = tls.describe_handshake_failure(error, 'rabbit.example.com', 5671)

    assert text is not None
    assert text.startswith('TLS handshake with rabbit.example.com:5671 failed: timed out')


def test_lost_alert_described() -> None:
    # pika keeps only the text of an SSL error after the handshake.
    error = pika.exceptions.IncompatibleProtocolError(
        'StreamLostError: ("Stream connection lost: SSLEOFError(8, \'EOF occurred in '
        'violation of protocol (_ssl.c:2427)\')",)')

    text = tls.describe_handshake_failure(error, 'localhost', 5671)

    assert text is not None
    assert text.startswith('TLS handshake with localhost:5671 failed: the server closed '
                           'the connection (EOF occurred in violation of protocol)')


def test_alert_in_text_described() -> None:
    error = pika.exceptions.IncompatibleProtocolError(
        'StreamLostError: ("Stream connection lost: SSLError(1, \'[SSL: '
        'TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)\')",)')

    text = tls.describe_handshake_failure(error, 'localhost', 5671)

    assert text is not None
    assert 'the server rejected the client certificate (tlsv1 alert unknown ca)' in text


def test_plain_error_not_described() -> None:
    error = pika.exceptions.AMQPConnectionError(ConnectionRefusedError(111, 'refused'))

    assert tls.describe_handshake_failure(error, 'localhost', 5671) is None


def test_url_query_options() -> None:
    query = {'cacertfile': ['/etc/ca.pem'], 'certfile': ['/etc/c.pem'],
             'keyfile': ['/etc/c.key'], 'password': ['secret'], 'heartbeat': ['5'],
             'verify': ['verify_peer']}

    options = tls.options_from_url_query(query)

    assert options == {'ca_certs': '/etc/ca.pem', 'certfile': '/etc/c.pem',
                       'keyfile': '/etc/c.key', 'password': 'secret'}


def test_url_verify_none_rejected() -> None:
    with pytest.raises(ValueError, match='verify=verify_none is not supported'):
        tls.options_from_url_query({'verify': ['verify_none']})
