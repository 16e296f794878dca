"""The ``mikkoo`` command: validate the configuration, then run the controller."""
from __future__ import annotations

import argparse
import copy
import logging
import logging.config
import sys
from typing import Any

from mikkoo import __version__, sentry
from mikkoo.config import ConfigError, Settings, load, masked, secrets_in
from mikkoo.controller import Controller
from mikkoo.daemon import DaemonError, run_detached

LOGGER = logging.getLogger('mikkoo')

# Exit statuses of the mikkoo command.
EXIT_OK = 0
EXIT_FAILURE = 1          # mikkoo failed while running
EXIT_CONFIG_ERROR = 2     # the configuration file or command line is unusable
EXIT_CANNOT_START = 3     # could not daemonise (pidfile, user, already running)

DEFAULT_FORMAT = ('%(asctime)s %(levelname)-8s %(processName)s[%(process)d] '
                  '%(name)s: %(message)s')


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='mikkoo', description='Mikkoo is a PgQ to RabbitMQ Relay')
    parser.add_argument('-c', '--config', help='Path to the configuration file')
    parser.add_argument('-f', '--foreground', action='store_true',
                        help='Run interactively in the foreground')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run mikkoo with command-line arguments ``argv``; return the exit status."""
    arguments = parse_arguments(argv)
    if not arguments.config:
        print('mikkoo: no configuration file given; run mikkoo -c mikkoo.yml',
              file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        settings = load(arguments.config)
        configure_logging(settings, arguments.foreground)
    except ConfigError as error:
        for problem in error.problems:
            print(f'mikkoo: {error.path}: {problem}', file=sys.stderr)
        return EXIT_CONFIG_ERROR

    if arguments.foreground:
        return run(settings, foreground=True)
    return daemonise(settings)


def run(settings: Settings, foreground: bool = True) -> int:
    LOGGER.info('mikkoo %s starting with configuration %s: %s', __version__,
                settings.path, masked(settings))
    sentry.init(settings.sentry_dsn, __version__)
    try:
        controller = Controller(
            settings, apply_logging=lambda new: configure_logging(new, foreground))
        return controller.run()
    except Exception:
        LOGGER.exception('mikkoo controller failed')
        sentry.capture_exception()
        return EXIT_FAILURE


def daemonise(settings: Settings) -> int:
    """Fork into the background and run there; return the daemon's exit status.

    The calling process exits with status 0 once the daemon is forked, or
    returns EXIT_CANNOT_START when the daemon cannot be set up.
    """
    daemon = settings.daemon
    try:
        return run_detached(lambda: run(settings, foreground=False),
                            daemon.pidfile, daemon.user, daemon.group)
    except DaemonError as error:
        print(f'mikkoo: cannot start the daemon: {error}', file=sys.stderr)
        return EXIT_CANNOT_START


def configure_logging(settings: Settings, foreground: bool) -> None:
    """Apply the Logging section, or log to stderr when there is none.

    Handlers marked ``debug_only: true`` are used only in the foreground.
    Every handler masks the configuration's passwords in what it writes.
    Raises ConfigError when the section is invalid.
    """
    if settings.logging is None:
        logging.basicConfig(level=logging.INFO, format=DEFAULT_FORMAT)
        _quiet_pika()
    else:
        config = copy.deepcopy(settings.logging)
        problems = _logging_problems(config)
        if problems:
            raise ConfigError(settings.path, problems)
        config = _without_debug_only_handlers(config, foreground)
        config.setdefault('version', 1)
        config.setdefault('disable_existing_loggers', False)
        try:
            logging.config.dictConfig(config)
        except (ValueError, TypeError, AttributeError, ImportError) as error:
            raise ConfigError(settings.path, [f'Logging: invalid logging configuration: '
                                              f'{" ".join(str(error).split())}']) from None
        if 'pika' not in config.get('loggers', {}):
            _quiet_pika()
    _mask_secrets_in_handlers(secrets_in(settings))


def _logging_problems(config: dict[str, Any]) -> list[str]:
    """Return what dictConfig would choke on later, or only at the first log line."""
    problems = []
    for section in ('formatters', 'filters', 'handlers', 'loggers'):
        entries = config.get(section, {})
        if not isinstance(entries, dict) or not all(
                isinstance(entry, dict) for entry in entries.values()):
            problems.append(f'Logging.{section}: must map names to mappings')
    if not isinstance(config.get('root', {}), dict):
        problems.append('Logging.root: must be a mapping')
    formatters = config.get('formatters')
    if isinstance(formatters, dict):
        for name, formatter in formatters.items():
            problem = _formatter_problem(formatter)
            if problem:
                problems.append(f'Logging.formatters.{name}: {problem}')
    return problems


def _formatter_problem(formatter: Any) -> str | None:
    if not isinstance(formatter, dict) or '()' in formatter or 'class' in formatter:
        return None
    record = logging.LogRecord('mikkoo', logging.INFO, __file__, 1, 'message', None, None)
    try:
        logging.Formatter(formatter.get('format'), formatter.get('datefmt'),
                          formatter.get('style', '%')).format(record)
    except (ValueError, KeyError, TypeError) as error:
        return f'invalid format {formatter.get("format")!r}: {error!r}'
    return None


def _quiet_pika() -> None:
    # pika narrates every connection step at INFO, and logs each failed
    # connection as several ERROR lines with a traceback. mikkoo logs every
    # failure itself, in one line with its cause. A Logging section that
    # configures the pika logger keeps its own level.
    logging.getLogger('pika').setLevel(logging.CRITICAL)


def _without_debug_only_handlers(config: dict[str, Any], foreground: bool) -> dict[str, Any]:
    handlers = config.get('handlers') or {}
    dropped = set()
    for name, handler in list(handlers.items()):
        if handler.pop('debug_only', False) and not foreground:
            dropped.add(name)
            del handlers[name]
    if dropped:
        for section in [*(config.get('loggers') or {}).values(), config.get('root') or {}]:
            if 'handlers' in section:
                section['handlers'] = [h for h in section['handlers'] if h not in dropped]
    return config


class SecretFilter(logging.Filter):
    """Replace the configured passwords in every record a handler writes.

    Error messages of libraries can quote a password (libpq quotes a
    malformed URL, for one), so masking the configuration dump is not
    enough.
    """

    def __init__(self, secrets: set[str]) -> None:
        super().__init__()
        self.secrets = sorted(secrets, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        for secret in self.secrets:
            if secret in message:
                message = message.replace(secret, '****')
                record.msg, record.args = message, None
            if record.exc_text and secret in record.exc_text:
                record.exc_text = record.exc_text.replace(secret, '****')
        return True


def _mask_secrets_in_handlers(secrets: set[str]) -> None:
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            for old in [f for f in handler.filters if isinstance(f, SecretFilter)]:
                handler.removeFilter(old)
            if secrets:
                handler.addFilter(SecretFilter(secrets))


if __name__ == '__main__':
    sys.exit(main())
