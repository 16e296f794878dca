"""Unit tests for mikkoo.config: loading, validation and masking secrets."""
from __future__ import annotations

import copy
import logging
import pwd
from pathlib import Path
from typing import Any

import pytest
import yaml

from mikkoo import config
from mikkoo.config import (ConfigError, QueueSettings, RabbitMQSettings, Settings,
                           load, mask_url, masked, parse_amqp_url)

EXAMPLE_FILE = Path(__file__).resolve().parents[2] / 'example.yml'
POSTGRES_URL = 'postgresql://mikkoo@db.example.com:5432/orders'
MISSING_USER = 'mikkoo-test-no-such-user'
# Marks a key that set_key deletes.
DELETE = object()


def minimal_document() -> dict[str, Any]:
    return {'Application': {'workers': {'orders': {'postgres_url': POSTGRES_URL}}}}


def full_document() -> dict[str, Any]:
    return {
        'Application': {
            'poll_interval': 15,
            'shutdown_timeout': 20.5,
            'sentry_dsn': 'https://key@sentry.example.com/1',
            'statsd': {'enabled': True, 'host': 'stats.example.com', 'port': 8126,
                       'prefix': 'relay'},
            'workers': {
                'orders': {
                    'postgres_url': POSTGRES_URL,
                    'rabbitmq': {'host': 'mq.example.com', 'port': 5673,
                                 'vhost': 'shop', 'username': 'relay',
                                 'password': 'mq-password', 'heartbeat_interval': 30},
                    'confirm': False,
                    'consumer_name': 'relay',
                    'max_failures': 3,
                    'retry_delay': 2,
                    'unregister': False,
                    'wait_duration': 0.5,
                    'dead_letter_exchange': 'dead',
                    'ticker_warning': 120,
                    'max_unconfirmed': 100,
                    'fetch_size': 50,
                },
                'refunds': {'postgres_url': POSTGRES_URL,
                            'rabbitmq_url': 'amqp://relay:pw@mq.example.com/%2F'},
            },
        },
        'Daemon': {'user': pwd.getpwuid(0).pw_name, 'group': 'daemon',
                   'pidfile': '/run/mikkoo.pid', 'prevent_core': False},
        'Logging': {'version': 1, 'root': {'level': 'INFO'}},
    }


def set_key(document: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    """Set the value at a path of keys, creating sections on the way."""
    *sections, last = keys
    for key in sections:
        document = document.setdefault(key, {})
    if value is DELETE:
        del document[last]
    else:
        document[last] = value


def write_config(tmp_path: Path, document: Any) -> str:
    path = tmp_path / 'mikkoo.yml'
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    path.write_text(text, encoding='utf-8')
    return str(path)


def load_document(tmp_path: Path, document: Any) -> Settings:
    return load(write_config(tmp_path, document))


def problems_of(tmp_path: Path, document: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_document(tmp_path, document)
    return caught.value.problems


def config_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == config.LOGGER.name and record.levelno == logging.WARNING]


# -- valid files ------------------------------------------------------------

def test_minimal_file_uses_defaults(tmp_path: Path) -> None:
    settings = load_document(tmp_path, minimal_document())

    assert settings.poll_interval == 60.0
    assert settings.shutdown_timeout == 60.0
    assert settings.sentry_dsn is None
    assert settings.statsd == config.StatsdSettings()
    assert settings.daemon == config.DaemonSettings()
    assert settings.logging is None


def test_minimal_queue_uses_defaults(tmp_path: Path) -> None:
    settings = load_document(tmp_path, minimal_document())

    assert list(settings.workers) == ['orders']
    assert settings.workers['orders'] == QueueSettings(
        queue='orders', postgres_url=POSTGRES_URL, rabbitmq=RabbitMQSettings(),
        confirm=True, consumer_name='mikkoo', max_failures=10, retry_delay=10.0,
        unregister=True, wait_duration=10.0, dead_letter_exchange=None,
        ticker_warning=300.0, max_unconfirmed=5000, fetch_size=5000)


def test_default_rabbitmq_settings(tmp_path: Path) -> None:
    rabbitmq = load_document(tmp_path, minimal_document()).workers['orders'].rabbitmq

    assert rabbitmq.host == 'localhost'
    assert rabbitmq.port == 5672
    assert rabbitmq.vhost == '/'
    assert rabbitmq.username == 'guest'
    assert rabbitmq.password == 'guest'
    assert rabbitmq.ssl_options is None
    assert rabbitmq.heartbeat_interval == 300


def test_full_file_application(tmp_path: Path) -> None:
    settings = load_document(tmp_path, full_document())

    assert settings.path == str(tmp_path / 'mikkoo.yml')
    assert settings.poll_interval == 15.0
    assert settings.shutdown_timeout == 20.5
    assert settings.sentry_dsn == 'https://key@sentry.example.com/1'
    assert settings.statsd == config.StatsdSettings(
        enabled=True, host='stats.example.com', port=8126, prefix='relay')
    assert settings.daemon == config.DaemonSettings(
        user=pwd.getpwuid(0).pw_name, group='daemon', pidfile='/run/mikkoo.pid')
    assert settings.logging == {'version': 1, 'root': {'level': 'INFO'}}


def test_full_file_queue(tmp_path: Path) -> None:
    orders = load_document(tmp_path, full_document()).workers['orders']

    assert orders == QueueSettings(
        queue='orders', postgres_url=POSTGRES_URL,
        rabbitmq=RabbitMQSettings(host='mq.example.com', port=5673, vhost='shop',
                                  username='relay', password='mq-password',
                                  heartbeat_interval=30),
        confirm=False, consumer_name='relay', max_failures=3, retry_delay=2.0,
        unregister=False, wait_duration=0.5, dead_letter_exchange='dead',
        ticker_warning=120.0, max_unconfirmed=100, fetch_size=50)


def test_full_file_logs_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    load_document(tmp_path, full_document())

    assert config_warnings(caplog) == []


def test_seconds_become_floats(tmp_path: Path) -> None:
    orders = load_document(tmp_path, full_document()).workers['orders']

    assert isinstance(orders.retry_delay, float)
    assert isinstance(orders.ticker_warning, float)


def test_libpq_keyword_postgres_url(tmp_path: Path) -> None:
    document = minimal_document()
    set_key(document, ('Application', 'workers', 'orders', 'postgres_url'),
            'host=db.example.com dbname=orders')

    settings = load_document(tmp_path, document)

    assert settings.workers['orders'].postgres_url == 'host=db.example.com dbname=orders'


def test_example_file_loads() -> None:
    settings = load(str(EXAMPLE_FILE))

    assert len(settings.workers) > 0


# -- aliases and unknown keys -----------------------------------------------

def test_postgresql_url_alias(tmp_path: Path) -> None:
    document = {'Application': {'workers': {'orders': {'postgresql_url': POSTGRES_URL}}}}

    settings = load_document(tmp_path, document)

    assert settings.workers['orders'].postgres_url == POSTGRES_URL


def test_retry_interval_alias(tmp_path: Path) -> None:
    document = minimal_document()
    set_key(document, ('Application', 'workers', 'orders', 'retry_interval'), 7)

    settings = load_document(tmp_path, document)

    assert settings.workers['orders'].retry_delay == 7.0


@pytest.mark.parametrize(('key', 'alias', 'value'), [
    pytest.param('postgres_url', 'postgresql_url', POSTGRES_URL, id='postgres-url'),
    pytest.param('retry_delay', 'retry_interval', 5, id='retry-delay'),
])
def test_key_and_alias_rejected(tmp_path: Path, key: str, alias: str, value: Any) -> None:
    document = minimal_document()
    worker = document['Application']['workers']['orders']
    worker[key] = value
    worker[alias] = value

    problems = problems_of(tmp_path, document)

    assert len(problems) == 1
    assert key in problems[0]
    assert alias in problems[0]
    assert 'Application.workers.orders' in problems[0]


@pytest.mark.parametrize(('keys', 'name'), [
    pytest.param(('Application', 'colour'), 'Application.colour', id='application'),
    pytest.param(('Application', 'statsd', 'colour'), 'Application.statsd.colour',
                 id='statsd'),
    pytest.param(('Application', 'workers', 'orders', 'colour'),
                 'Application.workers.orders.colour', id='queue'),
    pytest.param(('Application', 'workers', 'orders', 'rabbitmq', 'colour'),
                 'Application.workers.orders.rabbitmq.colour', id='rabbitmq'),
    pytest.param(('Daemon', 'colour'), 'Daemon.colour', id='daemon'),
])
def test_unknown_key_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                           keys: tuple[str, ...], name: str) -> None:
    document = minimal_document()
    set_key(document, keys, 'blue')

    settings = load_document(tmp_path, document)
    warnings = config_warnings(caplog)

    assert 'orders' in settings.workers
    assert len(warnings) == 1
    assert name in warnings[0]


def test_unknown_section_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    document = minimal_document()
    document['Deamon'] = {'pidfile': '/run/mikkoo.pid'}

    load_document(tmp_path, document)
    warnings = config_warnings(caplog)

    assert len(warnings) == 1
    assert 'Deamon' in warnings[0]


# -- invalid files ----------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / 'absent.yml')

    with pytest.raises(ConfigError) as caught:
        load(path)

    assert caught.value.path == path
    assert len(caught.value.problems) == 1
    assert 'not found' in caught.value.problems[0]


def test_directory_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(str(tmp_path))

    assert len(caught.value.problems) == 1
    assert 'is a directory' in caught.value.problems[0]


def test_duplicate_key_rejected(tmp_path: Path) -> None:
    path = tmp_path / 'mikkoo.yml'
    path.write_text('Application:\n  poll_interval: 1\nApplication:\n  poll_interval: 2\n')

    with pytest.raises(ConfigError) as caught:
        load(str(path))

    assert 'duplicate key' in caught.value.problems[0]


def test_alias_bomb_rejected(tmp_path: Path) -> None:
    lines = ['a: &a [' + ', '.join(['x'] * 9) + ']']
    for previous, name in zip('abcdef', 'bcdefg'):
        lines.append(f'{name}: &{name} [' + ', '.join([f'*{previous}'] * 9) + ']')
    path = tmp_path / 'mikkoo.yml'
    path.write_text('\n'.join(lines) + '\nLogging: {x: *g}\n')

    with pytest.raises(ConfigError) as caught:
        load(str(path))

    assert 'expands to more than' in caught.value.problems[0]


@pytest.mark.parametrize(('key', 'value'), [
    ('poll_interval', 10 ** 400),
    ('poll_interval', 1.0e300),
    ('shutdown_timeout', 10 ** 400),
])
def test_huge_seconds_rejected(tmp_path: Path, key: str, value: object) -> None:
    document = minimal_document()
    document['Application'][key] = value

    with pytest.raises(ConfigError) as caught:
        load_document(tmp_path, document)

    assert f'Application.{key}' in caught.value.problems[0]


def test_password_with_hash_masked() -> None:
    url = 'postgresql://postgres:Sec#ret1@127.0.0.1:5432/db'

    assert 'Sec#ret1' not in config.mask_url(url)


def test_secrets_in_collects_passwords(tmp_path: Path) -> None:
    document = minimal_document()
    set_key(document, ('Application', 'workers', 'orders', 'postgres_url'),
            'postgresql://relay:Pg%23Secret@db/app')
    set_key(document, (*RABBITMQ, 'password'), 'Rabbit-Secret')

    secrets = config.secrets_in(load_document(tmp_path, document))

    assert {'Pg%23Secret', 'Pg#Secret', 'Rabbit-Secret'} <= secrets


def test_invalid_yaml(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, 'Application: {workers: [\n')

    assert len(problems) == 1
    assert 'invalid YAML' in problems[0]
    assert '\n' not in problems[0]


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / 'mikkoo.yml'
    path.write_bytes(b'Application: \xff\xfe\n')

    with pytest.raises(ConfigError) as caught:
        load(str(path))

    assert len(caught.value.problems) == 1


@pytest.mark.parametrize('text', [
    pytest.param('- Application\n', id='list'),
    pytest.param('just text\n', id='string'),
    pytest.param('42\n', id='number'),
])
def test_top_level_not_mapping(tmp_path: Path, text: str) -> None:
    problems = problems_of(tmp_path, text)

    assert any(problem.startswith('top level:') for problem in problems)


def test_application_not_mapping(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, {'Application': 'yes'})

    assert problems == ['Application: must be a mapping of keys to values',
                        'Application.workers: missing, it is required']


def test_empty_file_needs_workers(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '')

    assert problems == ['Application.workers: missing, it is required']


def test_error_message_names_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, {'Application': {'workers': {}}})

    with pytest.raises(ConfigError) as caught:
        load(path)

    assert str(caught.value).startswith(f'{path}: ')


WORKER = ('Application', 'workers', 'orders')
RABBITMQ = (*WORKER, 'rabbitmq')

# Each case changes the minimal document at one path and expects exactly one
# problem that names the dotted key.
INVALID_VALUES = [
    pytest.param(('Application', 'workers'), {}, 'Application.workers', id='no-workers'),
    pytest.param(('Application', 'workers'), None, 'Application.workers',
                 id='workers-null'),
    pytest.param(('Application', 'workers'), ['orders'], 'Application.workers',
                 id='workers-list'),
    pytest.param(('Application', 'poll_interval'), 0, 'Application.poll_interval',
                 id='poll-interval-0'),
    pytest.param(('Application', 'shutdown_timeout'), 'soon',
                 'Application.shutdown_timeout', id='shutdown-timeout-string'),
    pytest.param(('Application', 'shutdown_timeout'), float('inf'),
                 'Application.shutdown_timeout', id='shutdown-timeout-infinite'),
    pytest.param(('Application', 'sentry_dsn'), 5, 'Application.sentry_dsn',
                 id='sentry-dsn-int'),
    pytest.param(('Application', 'statsd'), 'on', 'Application.statsd',
                 id='statsd-string'),
    pytest.param(('Application', 'statsd', 'enabled'), 'yes please',
                 'Application.statsd.enabled', id='statsd-enabled'),
    pytest.param(('Application', 'statsd', 'port'), 70000, 'Application.statsd.port',
                 id='statsd-port-70000'),
    pytest.param((*WORKER, 'postgres_url'), DELETE, f'{".".join(WORKER)}.postgres_url',
                 id='missing-postgres-url'),
    pytest.param((*WORKER, 'postgres_url'), 'db.example.com',
                 f'{".".join(WORKER)}.postgres_url', id='postgres-url-not-url'),
    pytest.param((*WORKER, 'confirm'), 'maybe', f'{".".join(WORKER)}.confirm',
                 id='confirm-maybe'),
    pytest.param((*WORKER, 'unregister'), 1, f'{".".join(WORKER)}.unregister',
                 id='unregister-int'),
    pytest.param((*WORKER, 'consumer_name'), '', f'{".".join(WORKER)}.consumer_name',
                 id='consumer-name-empty'),
    pytest.param((*WORKER, 'max_failures'), -3, f'{".".join(WORKER)}.max_failures',
                 id='max-failures-negative'),
    pytest.param((*WORKER, 'max_failures'), True, f'{".".join(WORKER)}.max_failures',
                 id='max-failures-bool'),
    pytest.param((*WORKER, 'wait_duration'), 0, f'{".".join(WORKER)}.wait_duration',
                 id='wait-duration-0'),
    pytest.param((*WORKER, 'retry_delay'), -1, f'{".".join(WORKER)}.retry_delay',
                 id='retry-delay-negative'),
    pytest.param((*WORKER, 'retry_interval'), -1, f'{".".join(WORKER)}.retry_interval',
                 id='retry-interval-negative'),
    pytest.param((*WORKER, 'ticker_warning'), 0, f'{".".join(WORKER)}.ticker_warning',
                 id='ticker-warning-0'),
    pytest.param((*WORKER, 'max_unconfirmed'), 0, f'{".".join(WORKER)}.max_unconfirmed',
                 id='max-unconfirmed-0'),
    pytest.param((*WORKER, 'fetch_size'), 2.5, f'{".".join(WORKER)}.fetch_size',
                 id='fetch-size-float'),
    pytest.param((*WORKER, 'dead_letter_exchange'), 7,
                 f'{".".join(WORKER)}.dead_letter_exchange', id='dead-letter-int'),
    pytest.param(RABBITMQ, 'localhost', f'{".".join(RABBITMQ)}', id='rabbitmq-string'),
    pytest.param((*RABBITMQ, 'port'), 70000, f'{".".join(RABBITMQ)}.port',
                 id='port-70000'),
    pytest.param((*RABBITMQ, 'port'), 0, f'{".".join(RABBITMQ)}.port', id='port-0'),
    pytest.param((*RABBITMQ, 'heartbeat_interval'), -1,
                 f'{".".join(RABBITMQ)}.heartbeat_interval', id='heartbeat-negative'),
    pytest.param((*RABBITMQ, 'ssl_options'), True, f'{".".join(RABBITMQ)}.ssl_options',
                 id='ssl-options-bool'),
    pytest.param((*RABBITMQ, 'ssl_options'), {'cafile': '/etc/ca.pem'},
                 f'{".".join(RABBITMQ)}.ssl_options.cafile', id='ssl-options-unknown'),
    pytest.param((*WORKER, 'rabbitmq_url'), 'http://mq.example.com/',
                 f'{".".join(WORKER)}.rabbitmq_url', id='rabbitmq-url-scheme'),
    pytest.param((*WORKER, 'rabbitmq_url'), 'amqp://mq.example.com:99999/',
                 f'{".".join(WORKER)}.rabbitmq_url', id='rabbitmq-url-port'),
    pytest.param((*WORKER, 'rabbitmq_url'), 'amqp://mq.example.com/?heartbeat=soon',
                 f'{".".join(WORKER)}.rabbitmq_url', id='rabbitmq-url-heartbeat'),
    pytest.param(('Daemon', 'user'), MISSING_USER, 'Daemon.user', id='daemon-user'),
    pytest.param(('Daemon', 'prevent_core'), 'no', 'Daemon.prevent_core',
                 id='daemon-prevent-core'),
    pytest.param(('Daemon',), ['user'], 'Daemon', id='daemon-list'),
    pytest.param(('Logging',), 'verbose', 'Logging', id='logging-string'),
]


@pytest.mark.parametrize(('keys', 'value', 'name'), INVALID_VALUES)
def test_invalid_value_named(tmp_path: Path, keys: tuple[str, ...], value: Any,
                             name: str) -> None:
    document = minimal_document()
    set_key(document, keys, value)

    problems = problems_of(tmp_path, document)

    assert len(problems) == 1
    assert problems[0].startswith(f'{name}:')


def test_missing_user_does_not_exist() -> None:
    # Guards test_invalid_value_named[daemon-user] against a host that has
    # this user after all.
    with pytest.raises(KeyError):
        pwd.getpwnam(MISSING_USER)


def test_rabbitmq_and_url_rejected(tmp_path: Path) -> None:
    document = minimal_document()
    worker = document['Application']['workers']['orders']
    worker['rabbitmq'] = {'host': 'mq.example.com'}
    worker['rabbitmq_url'] = 'amqp://mq.example.com/'

    problems = problems_of(tmp_path, document)

    assert len(problems) == 1
    assert problems[0].startswith('Application.workers.orders:')
    assert 'rabbitmq_url' in problems[0]


def test_queue_name_not_string(tmp_path: Path) -> None:
    document = {'Application': {'workers': {5: {'postgres_url': POSTGRES_URL}}}}

    problems = problems_of(tmp_path, document)

    assert len(problems) == 1
    assert problems[0].startswith('Application.workers.5:')


def test_problem_shows_bad_value(tmp_path: Path) -> None:
    document = minimal_document()
    set_key(document, (*WORKER, 'confirm'), 'maybe')

    problems = problems_of(tmp_path, document)

    assert "'maybe'" in problems[0]


def test_problems_reported_together(tmp_path: Path) -> None:
    document = minimal_document()
    set_key(document, (*WORKER, 'confirm'), 'maybe')
    set_key(document, (*RABBITMQ, 'port'), 70000)
    set_key(document, ('Application', 'workers', 'refunds'), {'max_failures': -3})
    set_key(document, ('Daemon', 'user'), MISSING_USER)
    set_key(document, ('Application', 'poll_interval'), 0)

    problems = problems_of(tmp_path, document)
    names = [problem.split(':', 1)[0] for problem in problems]

    assert sorted(names) == sorted([
        'Application.workers.orders.confirm',
        'Application.workers.orders.rabbitmq.port',
        'Application.workers.refunds.postgres_url',
        'Application.workers.refunds.max_failures',
        'Daemon.user',
        'Application.poll_interval',
    ])


def test_empty_workers_reported_with_others(tmp_path: Path) -> None:
    document = {'Application': {'poll_interval': 0, 'workers': {}}}

    problems = problems_of(tmp_path, document)
    names = [problem.split(':', 1)[0] for problem in problems]

    assert 'Application.poll_interval' in names
    assert 'Application.workers' in names


# -- RabbitMQ URLs and TLS ports --------------------------------------------

def test_amqp_url_parsed() -> None:
    rabbitmq = parse_amqp_url('amqp://relay:s%40fe@mq.example.com/%2F?heartbeat=30')

    assert rabbitmq == RabbitMQSettings(
        host='mq.example.com', port=5672, vhost='/', username='relay',
        password='s@fe', ssl_options=None, heartbeat_interval=30)


def test_amqps_url_parsed() -> None:
    rabbitmq = parse_amqp_url('amqps://mq.example.com/shop')

    assert rabbitmq.port == 5671
    assert rabbitmq.ssl_options == {}
    assert rabbitmq.vhost == 'shop'


@pytest.mark.parametrize(('url', 'port'), [
    pytest.param('amqp://mq.example.com:5673/', 5673, id='amqp'),
    pytest.param('amqps://mq.example.com:5673/', 5673, id='amqps'),
])
def test_amqp_url_explicit_port(url: str, port: int) -> None:
    assert parse_amqp_url(url).port == port


@pytest.mark.parametrize(('url', 'vhost'), [
    pytest.param('amqp://mq.example.com', '/', id='no-path'),
    pytest.param('amqp://mq.example.com/', '/', id='slash'),
    pytest.param('amqp://mq.example.com/%2F', '/', id='encoded-slash'),
    pytest.param('amqp://mq.example.com/shop%2Feu', 'shop/eu', id='encoded-inside'),
])
def test_amqp_url_vhost(url: str, vhost: str) -> None:
    assert parse_amqp_url(url).vhost == vhost


def test_amqp_url_defaults() -> None:
    rabbitmq = parse_amqp_url('amqp://mq.example.com')

    assert rabbitmq.username == 'guest'
    assert rabbitmq.password == 'guest'
    assert rabbitmq.heartbeat_interval == 300


def test_amqp_url_heartbeat_interval() -> None:
    rabbitmq = parse_amqp_url('amqp://mq.example.com/?heartbeat_interval=0')

    assert rabbitmq.heartbeat_interval == 0


def test_bad_amqp_url_masks_password() -> None:
    with pytest.raises(ValueError) as caught:
        parse_amqp_url('http://relay:hidden-pw@mq.example.com/')

    assert 'hidden-pw' not in str(caught.value)


def test_rabbitmq_url_in_file(tmp_path: Path) -> None:
    document = minimal_document()
    set_key(document, (*WORKER, 'rabbitmq_url'),
            'amqps://relay:pw@mq.example.com/%2F?heartbeat=15')

    rabbitmq = load_document(tmp_path, document).workers['orders'].rabbitmq

    assert rabbitmq == RabbitMQSettings(
        host='mq.example.com', port=5671, vhost='/', username='relay', password='pw',
        ssl_options={}, heartbeat_interval=15)


def test_ssl_options_default_port(tmp_path: Path) -> None:
    document = minimal_document()
    set_key(document, (*RABBITMQ, 'ssl_options'), {'ca_certs': '/etc/ssl/ca.pem'})

    rabbitmq = load_document(tmp_path, document).workers['orders'].rabbitmq

    assert rabbitmq.port == 5671
    assert rabbitmq.ssl_options == {'ca_certs': '/etc/ssl/ca.pem'}


def test_empty_ssl_options_default_port(tmp_path: Path) -> None:
    document = minimal_document()
    set_key(document, (*RABBITMQ, 'ssl_options'), {})

    assert load_document(tmp_path, document).workers['orders'].rabbitmq.port == 5671


def test_ssl_options_explicit_port(tmp_path: Path) -> None:
    document = minimal_document()
    set_key(document, (*RABBITMQ, 'ssl_options'), {'ca_certs': '/etc/ssl/ca.pem'})
    set_key(document, (*RABBITMQ, 'port'), 5999)

    assert load_document(tmp_path, document).workers['orders'].rabbitmq.port == 5999


def test_every_ssl_option_accepted(tmp_path: Path) -> None:
    document = minimal_document()
    ssl_options = {'ca_certs': '/etc/ca.pem', 'ca_path': '/etc/ca', 'ca_data': 'PEM',
                   'protocol': 'PROTOCOL_TLS_CLIENT', 'certfile': '/etc/c.pem',
                   'keyfile': '/etc/c.key', 'password': 'x', 'ciphers': 'HIGH',
                   'verify_hostname': True}
    assert set(ssl_options) == set(config.SSL_OPTION_KEYS)
    set_key(document, (*RABBITMQ, 'ssl_options'), ssl_options)

    rabbitmq = load_document(tmp_path, document).workers['orders'].rabbitmq

    assert rabbitmq.ssl_options == ssl_options


# -- secrets ----------------------------------------------------------------

@pytest.mark.parametrize(('url', 'kept'), [
    pytest.param('postgresql://relay:pg-secret@db.example.com:5432/orders',
                 'relay:****@db.example.com:5432/orders', id='postgresql'),
    pytest.param('amqp://relay:mq-secret@mq.example.com/%2F', 'relay:****@mq.example.com',
                 id='amqp'),
    pytest.param('postgresql://relay:pg-secret@db.example.com/orders?sslmode=require',
                 'sslmode=require', id='with-query'),
    pytest.param('host=db.example.com password=pg-secret dbname=orders',
                 'host=db.example.com password=**** dbname=orders', id='libpq'),
])
def test_mask_url_hides_password(url: str, kept: str) -> None:
    masked_url = mask_url(url)

    assert 'secret' not in masked_url
    assert kept in masked_url


@pytest.mark.parametrize('url', [
    'postgresql://relay@db.example.com/orders',
    'host=db.example.com dbname=orders',
])
def test_mask_url_keeps_url_without_password(url: str) -> None:
    assert mask_url(url) == url


@pytest.mark.parametrize('url', [
    pytest.param('host=db.example.com password = pg-secret dbname=orders',
                 id='libpq-spaces'),
    pytest.param("host=db.example.com password='pg secret' dbname=orders",
                 id='libpq-quoted'),
    pytest.param('postgresql://relay@db.example.com/orders?password=pg-secret',
                 id='query-only'),
])
def test_mask_url_hides_other_forms(url: str) -> None:
    assert 'secret' not in mask_url(url)


def secret_document() -> dict[str, Any]:
    document = minimal_document()
    worker = document['Application']['workers']['orders']
    worker['postgres_url'] = 'postgresql://relay:pg-secret@db.example.com/orders'
    worker['rabbitmq'] = {'host': 'mq.example.com', 'password': 'mq-secret',
                          'ssl_options': {'certfile': '/etc/cert.pem',
                                          'password': 'tls-secret'}}
    document['Application']['workers']['refunds'] = {
        'postgres_url': 'host=db.example.com password=libpq-secret',
        'rabbitmq_url': 'amqp://relay:url-secret@mq.example.com/%2F'}
    document['Application']['sentry_dsn'] = 'https://dsn-secret@sentry.example.com/1'
    return document


def test_masked_settings_hide_secrets(tmp_path: Path) -> None:
    settings = load_document(tmp_path, secret_document())

    text = repr(masked(settings))

    for secret in ('pg-secret', 'mq-secret', 'tls-secret', 'libpq-secret',
                   'url-secret', 'dsn-secret'):
        assert secret not in text, secret


def test_masked_settings_keep_the_rest(tmp_path: Path) -> None:
    settings = load_document(tmp_path, secret_document())

    safe = masked(settings)
    orders = safe['workers']['orders']

    assert orders['rabbitmq']['host'] == 'mq.example.com'
    assert orders['rabbitmq']['ssl_options']['certfile'] == '/etc/cert.pem'
    assert orders['postgres_url'] == 'postgresql://relay:****@db.example.com/orders'


def test_masked_leaves_input_unchanged() -> None:
    values = {'rabbitmq': {'password': 'mq-secret'}, 'list': [{'password': 'x'}]}
    original = copy.deepcopy(values)

    masked(values)

    assert values == original


def test_masked_hides_passwords_in_lists() -> None:
    assert masked([{'password': 'list-secret'}]) == [{'password': '****'}]


@pytest.mark.parametrize(('keys', 'value'), [
    pytest.param((*WORKER, 'postgres_url'), 'mysql://relay:pg-secret@db.example.com/orders',
                 id='postgres-url'),
    pytest.param((*RABBITMQ, 'password'), 12345, id='rabbitmq-password'),
])
def test_config_error_hides_secret(tmp_path: Path, keys: tuple[str, ...],
                                   value: Any) -> None:
    document = minimal_document()
    set_key(document, keys, value)

    problems = problems_of(tmp_path, document)
    secret = 'pg-secret' if isinstance(value, str) else str(value)

    assert len(problems) == 1
    assert secret not in problems[0]
