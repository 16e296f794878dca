"""Load and validate the YAML configuration file.

Every option is declared once in the tables below, with its type, default
and description. :func:`load` checks the whole file and raises
:class:`ConfigError` carrying every problem found, so that a user fixes a
file in one pass and no process starts on a half-valid configuration.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import pwd
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from mikkoo import tls

LOGGER = logging.getLogger(__name__)

AMQP_PORT = 5672
AMQPS_PORT = 5671


class ConfigError(Exception):
    """Raised when the configuration file cannot be used; ``problems`` lists every problem."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__('\n'.join(f'{path}: {problem}' for problem in problems))


@dataclasses.dataclass(frozen=True)
class RabbitMQSettings:
    host: str = 'localhost'
    port: int = AMQP_PORT
    vhost: str = '/'
    username: str = 'guest'
    password: str = 'guest'
    ssl_options: dict[str, Any] | None = None
    heartbeat_interval: int = 300


@dataclasses.dataclass(frozen=True)
class QueueSettings:
    """The options of one PgQ queue, and so of one worker process."""

    queue: str
    postgres_url: str
    rabbitmq: RabbitMQSettings
    confirm: bool = True
    consumer_name: str = 'mikkoo'
    max_failures: int = 10
    retry_delay: float = 10.0
    unregister: bool = True
    wait_duration: float = 10.0
    dead_letter_exchange: str | None = None
    ticker_warning: float = 300.0
    max_unconfirmed: int = 5000
    fetch_size: int = 5000


@dataclasses.dataclass(frozen=True)
class StatsdSettings:
    enabled: bool = False
    host: str = 'localhost'
    port: int = 8125
    prefix: str = 'mikkoo'


@dataclasses.dataclass(frozen=True)
class DaemonSettings:
    user: str | None = None
    group: str | None = None
    pidfile: str | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
    """The whole validated configuration file."""

    path: str
    workers: dict[str, QueueSettings]
    poll_interval: float = 60.0
    shutdown_timeout: float = 60.0
    sentry_dsn: str | None = None
    statsd: StatsdSettings = StatsdSettings()
    daemon: DaemonSettings = DaemonSettings()
    logging: dict[str, Any] | None = None


# A checker takes the raw YAML value and returns the clean value, or raises
# ValueError with the text that follows "must be" in the error message.
Checker = Callable[[Any], Any]


# Upper bounds that keep values within what the clock, PostgreSQL and
# AMQP accept: a year of seconds, AMQP's 16-bit heartbeat, a million rows.
MAX_SECONDS = 365 * 24 * 3600
MAX_HEARTBEAT = 65535
MAX_COUNT = 1_000_000


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError('true or false')
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError('a non-empty string')
    if '\0' in value:
        raise ValueError('a string without NUL characters')
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _integer(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f'an integer from {low} to {high}')
    return value


def _count(value: Any) -> int:
    return _integer(value, 0, MAX_COUNT)


def _positive_count(value: Any) -> int:
    return _integer(value, 1, MAX_COUNT)


def _port(value: Any) -> int:
    return _integer(value, 1, 65535)


def _heartbeat(value: Any) -> int:
    return _integer(value, 0, MAX_HEARTBEAT)


def _number(value: Any, what: str) -> float:
    """Return ``value`` as seconds in [0, MAX_SECONDS], or raise ValueError(what)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(what)
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(what) from None
    if not math.isfinite(number) or not 0 <= number <= MAX_SECONDS:
        raise ValueError(what)
    return number


def _seconds(value: Any) -> float:
    return _number(value, f'a number of seconds from 0 to {MAX_SECONDS}')


def _positive_seconds(value: Any) -> float:
    what = f'a number of seconds greater than 0, at most {MAX_SECONDS}'
    if _number(value, what) == 0:
        raise ValueError(what)
    return float(value)


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError('a mapping of keys to values')
    return dict(value)


def _postgres_url(value: Any) -> str:
    text = _text(value)
    if not (text.startswith(('postgresql://', 'postgres://')) or '=' in text):
        raise ValueError('a libpq URL such as postgresql://user@host:5432/dbname')
    return text


def _user(value: Any) -> str | None:
    if value is None:
        return None
    name = _text(value)
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise ValueError('the name of an existing system user') from None
    return name


@dataclasses.dataclass(frozen=True)
class Option:
    """One configuration key: where it goes, how it is checked, what it means."""

    key: str
    check: Checker
    default: Any
    description: str
    aliases: tuple[str, ...] = ()
    required: bool = False


APPLICATION_OPTIONS = (
    Option('poll_interval', _positive_seconds, 60.0,
           'Seconds between the statistics log lines of the controller.'),
    Option('shutdown_timeout', _positive_seconds, 60.0,
           'Seconds workers get to settle their batch after SIGTERM before '
           'they are killed.'),
    Option('sentry_dsn', _optional_text, None,
           'Sentry DSN; reports exceptions when sentry-sdk or raven is installed.'),
    Option('statsd', _mapping, {}, 'StatsD counters and gauges, see below.'),
    Option('workers', _mapping, None,
           'Mapping of PgQ queue name to the options of its worker.',
           required=True),
)

STATSD_OPTIONS = (
    Option('enabled', _boolean, False, 'Send metrics to StatsD.'),
    Option('host', _text, 'localhost', 'StatsD host.'),
    Option('port', _port, 8125, 'StatsD UDP port.'),
    Option('prefix', _text, 'mikkoo', 'Prefix of every metric name.'),
)

QUEUE_OPTIONS = (
    Option('postgres_url', _postgres_url, None,
           'libpq URL of the database that holds the queue.',
           aliases=('postgresql_url',), required=True),
    Option('rabbitmq', _mapping, None,
           'RabbitMQ connection, see below; or use rabbitmq_url.'),
    Option('rabbitmq_url', _text, None,
           'RabbitMQ as an amqp:// or amqps:// URL, instead of rabbitmq.'),
    Option('confirm', _boolean, True,
           'Wait for RabbitMQ publisher confirmations before finishing a batch.'),
    Option('consumer_name', _text, 'mikkoo', 'PgQ consumer name.'),
    Option('max_failures', _count, 10,
           'Retries of a failed event before it is discarded.'),
    Option('retry_delay', _seconds, 10.0,
           'Seconds until PgQ hands a failed event back.',
           aliases=('retry_interval',)),
    Option('unregister', _boolean, True,
           'Unregister the PgQ consumer on shutdown.'),
    Option('wait_duration', _positive_seconds, 10.0,
           'Seconds to wait after an empty batch.'),
    Option('dead_letter_exchange', _optional_text, None,
           'Exchange that receives events discarded after max_failures; '
           'unset, they are only logged.'),
    Option('ticker_warning', _positive_seconds, 300.0,
           'Seconds without a new tick on the queue before a warning that '
           'the ticker (pgqd) may be down.'),
    Option('max_unconfirmed', _positive_count, 5000,
           'Messages published but not yet confirmed, at most.'),
    Option('fetch_size', _positive_count, 5000,
           'Events read from the batch cursor at a time.'),
)

RABBITMQ_OPTIONS = (
    Option('host', _text, 'localhost', 'RabbitMQ host.'),
    Option('port', _port, None, 'RabbitMQ port; 5672, or 5671 with ssl_options.'),
    Option('vhost', _text, '/', 'Virtual host.'),
    Option('username', _text, 'guest', 'User name.'),
    Option('password', _text, 'guest', 'Password.'),
    Option('ssl_options', _mapping, None, 'TLS settings; presence turns TLS on.'),
    Option('heartbeat_interval', _heartbeat, 300,
           'Seconds between AMQP heartbeats; 0 turns them off.'),
)

SSL_OPTION_KEYS = ('ca_certs', 'ca_path', 'ca_data', 'protocol', 'certfile',
                   'keyfile', 'password', 'ciphers', 'verify_hostname')

DAEMON_OPTIONS = (
    Option('user', _user, None, 'User to run as when daemonised.'),
    Option('group', _optional_text, None, 'Group to run as when daemonised.'),
    Option('pidfile', _optional_text, None, 'Path of the pidfile when daemonised.'),
    Option('prevent_core', _boolean, True, 'Accepted for compatibility; unused.'),
)

# Keys whose values are never logged or shown in an error, wherever they
# appear (ssl_options.password, a logging handler's credentials, ...).
SECRET_KEYS = frozenset({'password', 'sentry_dsn', 'credentials', 'secret', 'token'})
URL_KEYS = frozenset({'postgres_url', 'postgresql_url', 'rabbitmq_url'})


class _Collector:
    """Gathers problems while the sections are checked."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []

    def section(self, values: Any, where: str) -> dict[str, Any]:
        if values is None:
            return {}
        if not isinstance(values, Mapping):
            self.problems.append(f'{where}: must be a mapping of keys to values')
            return {}
        return dict(values)

    def options(self, values: Mapping[str, Any], options: tuple[Option, ...],
                where: str) -> dict[str, Any]:
        """Return every option's checked value or default, recording problems."""
        known = {name for option in options for name in (option.key, *option.aliases)}
        for key in values:
            if key not in known:
                LOGGER.warning('%s: unknown key %s.%s is ignored', self.path, where, key)
        result: dict[str, Any] = {}
        for option in options:
            result[option.key] = self._option(values, option, where)
        return result

    def _option(self, values: Mapping[str, Any], option: Option, where: str) -> Any:
        present = [name for name in (option.key, *option.aliases) if name in values]
        if len(present) > 1:
            self.problems.append(
                f'{where}: {" and ".join(present)} mean the same; keep only one')
        if not present:
            if option.required:
                self.problems.append(f'{where}.{option.key}: missing, it is required')
            return option.default
        raw = values[present[0]]
        try:
            return option.check(raw)
        except ValueError as error:
            self.problems.append(
                f'{where}.{present[0]}: must be {error}, got {_shown(option.key, raw)}')
            return option.default


def _shown(key: str, value: Any) -> str:
    """Return how a rejected value appears in an error, without secrets."""
    if key in SECRET_KEYS:
        return 'a value that is not shown because it is secret'
    if key in URL_KEYS and isinstance(value, str):
        return repr(mask_url(value))
    if isinstance(value, str) and _looks_numeric(value):
        return (f'the text {value!r}; YAML reads it as text, not a number (write '
                'exponents with a sign, as in 1.0e+3)')
    if isinstance(value, int) and not isinstance(value, bool) and len(str(value)) > 30:
        return f'an integer of {len(str(value))} digits'
    return repr(value)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


SECTIONS = ('Application', 'Daemon', 'Logging')


def load(path: str) -> Settings:
    """Read and validate the configuration file at ``path``.

    Raises ConfigError listing every problem when the file is missing,
    unreadable, not YAML, or contains invalid values.
    """
    # The daemon changes its directory to /, and a reload reads the file
    # again from there.
    path = os.path.abspath(path)
    document = _read(path)
    collector = _Collector(path)
    root = collector.section(document, 'top level')
    for key in root:
        if key not in SECTIONS:
            LOGGER.warning('%s: unknown section %r is ignored; the sections are %s',
                           path, key, ', '.join(SECTIONS))
    application = collector.section(root.get('Application'), 'Application')
    app = collector.options(application, APPLICATION_OPTIONS, 'Application')
    statsd = collector.options(collector.section(app['statsd'], 'Application.statsd'),
                               STATSD_OPTIONS, 'Application.statsd')
    daemon = collector.options(collector.section(root.get('Daemon'), 'Daemon'),
                               DAEMON_OPTIONS, 'Daemon')
    workers = _workers(collector, app['workers'] or {})
    logging_config = root.get('Logging')
    if logging_config is not None and not isinstance(logging_config, Mapping):
        collector.problems.append('Logging: must be a logging.config.dictConfig mapping')
    if application.get('workers') == {}:
        collector.problems.append('Application.workers: configure at least one queue')
    if collector.problems:
        raise ConfigError(path, collector.problems)
    del daemon['prevent_core']
    return Settings(
        path=path, workers=workers, poll_interval=app['poll_interval'],
        shutdown_timeout=app['shutdown_timeout'], sentry_dsn=app['sentry_dsn'],
        statsd=StatsdSettings(**statsd), daemon=DaemonSettings(**daemon),
        logging=dict(logging_config) if logging_config else None)


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen = set()
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f'duplicate key {key!r}; a second one would silently '
                    'replace the first', key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML aliases can make a short file expand to billions of values.
MAX_VALUES = 100_000


def _count_values(document: Any) -> int:
    """Return how many values ``document`` holds, stopping past MAX_VALUES."""
    count, pending = 0, [document]
    while pending and count <= MAX_VALUES:
        value = pending.pop()
        count += 1
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return count


def _read(path: str) -> Any:
    try:
        with open(path, encoding='utf-8') as handle:
            document = yaml.load(handle, Loader=_StrictLoader)
    except IsADirectoryError:
        raise ConfigError(path, ['is a directory; pass the configuration file with -c']) from None
    except FileNotFoundError:
        raise ConfigError(path, ['file not found; pass an existing file with -c']) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(path, [f'cannot read the file: {error}']) from None
    except yaml.YAMLError as error:
        detail = ' '.join(str(error).split())
        raise ConfigError(path, [f'invalid YAML: {detail}']) from None
    if _count_values(document) > MAX_VALUES:
        raise ConfigError(path, [f'the file expands to more than {MAX_VALUES:,} values '
                                 '(through YAML aliases?); write it out plainly'])
    return document


def _workers(collector: _Collector, workers: dict[str, Any]) -> dict[str, QueueSettings]:
    result = {}
    for queue, values in workers.items():
        where = f'Application.workers.{queue}'
        if not isinstance(queue, str) or not queue:
            collector.problems.append(f'{where}: a queue name must be a non-empty string')
            continue
        options = collector.options(collector.section(values, where), QUEUE_OPTIONS, where)
        rabbitmq = _rabbitmq(collector, options.pop('rabbitmq'),
                             options.pop('rabbitmq_url'), where)
        if options['postgres_url'] is None:
            continue
        result[queue] = QueueSettings(queue=queue, rabbitmq=rabbitmq, **options)
    return result


def _rabbitmq(collector: _Collector, section: dict[str, Any] | None,
              url: str | None, where: str) -> RabbitMQSettings:
    if section is not None and url is not None:
        collector.problems.append(f'{where}: set rabbitmq or rabbitmq_url, not both')
    if url is not None:
        try:
            return parse_amqp_url(url)
        except ValueError as error:
            collector.problems.append(f'{where}.rabbitmq_url: {error}')
            return RabbitMQSettings()
    values = collector.options(section or {}, RABBITMQ_OPTIONS, f'{where}.rabbitmq')
    ssl_options = values['ssl_options']
    if ssl_options is not None:
        for key in ssl_options:
            if key not in SSL_OPTION_KEYS:
                collector.problems.append(
                    f'{where}.rabbitmq.ssl_options.{key}: unknown key; expected one of '
                    f'{", ".join(SSL_OPTION_KEYS)}')
        for problem in tls.check_options(ssl_options):
            collector.problems.append(f'{where}.rabbitmq.{problem}')
    if values['port'] is None:
        values['port'] = AMQP_PORT if ssl_options is None else AMQPS_PORT
    return RabbitMQSettings(**values)


def parse_amqp_url(url: str) -> RabbitMQSettings:
    """Return the connection settings an amqp:// or amqps:// URL describes.

    Raises ValueError naming what is wrong with the URL.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as error:
        raise ValueError(f'invalid URL {mask_url(url)!r}: {error}') from None
    if parts.scheme not in ('amqp', 'amqps') or not url.startswith(f'{parts.scheme}://'):
        raise ValueError('must look like amqp://user:password@host:port/vhost or '
                         f'amqps://..., got {mask_url(url)!r}')
    if parts.password is not None and ('#' in parts.password or '?' in parts.password
                                       or '/' in parts.password):
        raise ValueError('percent-encode the characters # ? / in the password '
                         '(as %23 %3F %2F)')
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f'invalid port in {mask_url(url)!r}; use 1 to 65535')
    secure = parts.scheme == 'amqps'
    query = urllib.parse.parse_qs(parts.query)
    ssl_options = tls.options_from_url_query(query) if secure else None
    heartbeat = query.get('heartbeat', query.get('heartbeat_interval', ['300']))[0]
    if not (heartbeat.isascii() and heartbeat.isdigit()) or int(heartbeat) > MAX_HEARTBEAT:
        raise ValueError(f'heartbeat must be a whole number of seconds from 0 to '
                         f'{MAX_HEARTBEAT}, got {heartbeat!r}')
    vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else '/'
    return RabbitMQSettings(
        host=parts.hostname or 'localhost',
        port=port or (AMQPS_PORT if secure else AMQP_PORT),
        vhost=vhost,
        username=urllib.parse.unquote(parts.username or 'guest'),
        password=urllib.parse.unquote(parts.password or 'guest'),
        ssl_options=ssl_options,
        heartbeat_interval=int(heartbeat))


_LIBPQ_PASSWORD = re.compile(r"""password\s*=\s*('(?:[^'\\]|\\.)*(?:'|$)|\S+)""")
_QUERY_PASSWORD = re.compile(r'([?&]password=)[^&#]*')


def mask_url(url: str) -> str:
    """Return ``url`` with every password in it replaced by asterisks.

    Handles URLs (scheme://user:password@host, or ?password= in the query)
    and libpq key=value strings, quoted or not. It does not rely on the URL
    being valid: libpq accepts passwords with characters such as # and ?
    that a URL parser reads as the start of a fragment or query.
    """
    scheme, separator, rest = url.partition('://')
    if not separator:
        if '=' in url:
            return _LIBPQ_PASSWORD.sub('password=****', url)
        if '@' in url:
            # Neither a URL nor key=value: show nothing before the host.
            return '****@' + url.rpartition('@')[2]
        return url
    # The user information ends at the last @, because a password may
    # contain one; masking a bit too much is the safe side.
    user_info, at, host_part = rest.rpartition('@')
    if at and ':' in user_info:
        rest = f'{user_info.split(":", 1)[0]}:****@{host_part}'
    rest = _QUERY_PASSWORD.sub(r'\1****', rest)
    return f'{scheme}://{rest}'


def masked(value: Any) -> Any:
    """Return a copy of a settings value that is safe to log."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {key: '****' if key in SECRET_KEYS and val else
                mask_url(val) if key in URL_KEYS and isinstance(val, str)
                else masked(val)
                for key, val in value.items()}
    if isinstance(value, list):
        return [masked(item) for item in value]
    return value


# Passwords shorter than this are not masked inside log lines, where they
# would replace ordinary words; the well-known default is no secret.
MIN_SECRET_LENGTH = 4
PUBLIC_PASSWORDS = frozenset({'guest'})


def secrets_in(settings: Settings) -> set[str]:
    """Return the passwords of ``settings``, as written and percent-decoded."""
    found = set()
    for queue in settings.workers.values():
        found.update(_url_passwords(queue.postgres_url))
        found.add(queue.rabbitmq.password)
        found.add(str((queue.rabbitmq.ssl_options or {}).get('password') or ''))
    if settings.sentry_dsn:
        found.update(_url_passwords(settings.sentry_dsn))
    return {secret for secret in found
            if len(secret) >= MIN_SECRET_LENGTH and secret not in PUBLIC_PASSWORDS}


def _url_passwords(url: str) -> set[str]:
    found = set()
    for match in _LIBPQ_PASSWORD.finditer(url):
        found.add(match.group(1).strip("'"))
    scheme, separator, rest = url.partition('://')
    user_info, at, _host = rest.rpartition('@')
    if separator and at and ':' in user_info:
        found.add(user_info.split(':', 1)[1])
    for match in re.finditer(r'[?&]password=([^&#]*)', url):
        found.add(match.group(1))
    return found | {urllib.parse.unquote(secret) for secret in found}
