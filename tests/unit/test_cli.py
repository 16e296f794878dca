"""Unit tests for mikkoo.cli: arguments, configuration errors and logging.

No test here calls main() with a valid configuration, because main() then
daemonises or runs the controller.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mikkoo import __version__, cli
from mikkoo.config import ConfigError, Settings

POSTGRES_URL = 'postgresql://mikkoo@db.example.com/orders'
# A logger name of its own, so that the tests leave mikkoo's loggers alone.
TEST_LOGGER = 'mikkoo_cli_test'


def write_config(tmp_path: Path, document: Any) -> str:
    path = tmp_path / 'mikkoo.yml'
    path.write_text(yaml.safe_dump(document), encoding='utf-8')
    return str(path)


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def settings_with_logging(logging_config: dict[str, Any]) -> Settings:
    return Settings(path='mikkoo.yml', workers={}, logging=logging_config)


@pytest.fixture
def isolated_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger(TEST_LOGGER)
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


# -- command line -----------------------------------------------------------

def test_no_config_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == cli.EXIT_CONFIG_ERROR


def test_no_config_message(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main([])
    lines = stderr_lines(capsys)

    assert len(lines) == 1
    assert lines[0].startswith('mikkoo: no configuration file given')
    assert '-c' in lines[0]


def test_exit_status_values() -> None:
    assert cli.EXIT_OK == 0
    assert cli.EXIT_FAILURE == 1
    assert cli.EXIT_CONFIG_ERROR == 2
    assert cli.EXIT_CANNOT_START == 3


def test_help_describes_mikkoo(capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    # argparse wraps help text at $COLUMNS.
    monkeypatch.setenv('COLUMNS', '100')

    with pytest.raises(SystemExit) as caught:
        cli.main(['--help'])
    output = capsys.readouterr().out

    assert caught.value.code == 0
    assert 'Mikkoo is a PgQ to RabbitMQ Relay' in output
    assert '--config' in output
    assert '--foreground' in output


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(['--version'])

    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f'mikkoo {__version__}'


def test_unknown_option_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(['--colour'])

    assert caught.value.code == cli.EXIT_CONFIG_ERROR


def test_foreground_flag() -> None:
    arguments = cli.parse_arguments(['-c', 'mikkoo.yml', '-f'])

    assert arguments.config == 'mikkoo.yml'
    assert arguments.foreground


def test_background_by_default() -> None:
    assert not cli.parse_arguments(['--config', 'mikkoo.yml']).foreground


# -- configuration errors ---------------------------------------------------

def test_missing_file_exit_status(tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / 'absent.yml')

    status = cli.main(['-c', path])
    lines = stderr_lines(capsys)

    assert status == cli.EXIT_CONFIG_ERROR
    assert len(lines) == 1
    assert lines[0].startswith(f'mikkoo: {path}: ')


def test_bad_config_lines_name_file(tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    document = {'Application': {'poll_interval': 0, 'workers': {
        'orders': {'postgres_url': POSTGRES_URL, 'confirm': 'maybe'}}}}
    path = write_config(tmp_path, document)

    status = cli.main(['-c', path, '-f'])
    lines = stderr_lines(capsys)

    assert status == cli.EXIT_CONFIG_ERROR
    assert len(lines) == 2
    for line in lines:
        assert line.startswith(f'mikkoo: {path}: '), line


def test_bad_config_lines_name_keys(tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    document = {'Application': {'poll_interval': 0, 'workers': {
        'orders': {'postgres_url': POSTGRES_URL, 'confirm': 'maybe'}}}}
    path = write_config(tmp_path, document)

    cli.main(['-c', path])
    text = capsys.readouterr().err

    assert 'Application.poll_interval' in text
    assert 'Application.workers.orders.confirm' in text


def test_bad_logging_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = {'Application': {'workers': {'orders': {'postgres_url': POSTGRES_URL}}},
                'Logging': {'handlers': {'broken': {'class': 'no.such.Handler'}}}}
    path = write_config(tmp_path, document)

    status = cli.main(['-c', path])
    lines = stderr_lines(capsys)

    assert status == cli.EXIT_CONFIG_ERROR
    assert len(lines) == 1
    assert lines[0].startswith(f'mikkoo: {path}: Logging:')


# -- logging ----------------------------------------------------------------

def debug_only_config() -> dict[str, Any]:
    return {
        'handlers': {
            'always': {'class': 'logging.NullHandler'},
            'console': {'class': 'logging.StreamHandler', 'debug_only': True},
        },
        'loggers': {TEST_LOGGER: {'level': 'DEBUG', 'handlers': ['always', 'console']}},
    }


def test_background_drops_debug_only(isolated_logger: logging.Logger) -> None:
    cli.configure_logging(settings_with_logging(debug_only_config()), foreground=False)

    assert [type(handler) for handler in isolated_logger.handlers] == [logging.NullHandler]


def test_foreground_keeps_debug_only(isolated_logger: logging.Logger) -> None:
    cli.configure_logging(settings_with_logging(debug_only_config()), foreground=True)
    types = {type(handler) for handler in isolated_logger.handlers}

    assert types == {logging.NullHandler, logging.StreamHandler}


def test_debug_only_dropped_from_root(isolated_logger: logging.Logger) -> None:
    root = logging.getLogger()
    root_handlers = list(root.handlers)
    logging_config = debug_only_config()
    logging_config['root'] = {'handlers': ['console']}

    try:
        cli.configure_logging(settings_with_logging(logging_config), foreground=False)
        added = [handler for handler in root.handlers if handler not in root_handlers]
    finally:
        for handler in list(root.handlers):
            if handler not in root_handlers:
                root.removeHandler(handler)
        for handler in root_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)

    assert added == []


def test_configure_logging_copies_settings(isolated_logger: logging.Logger) -> None:
    settings = settings_with_logging(debug_only_config())

    cli.configure_logging(settings, foreground=False)

    assert settings.logging is not None
    assert settings.logging['handlers']['console']['debug_only'] is True
    assert 'version' not in settings.logging


def test_configure_logging_keeps_loggers(isolated_logger: logging.Logger) -> None:
    existing = logging.getLogger('mikkoo_cli_test_existing')

    cli.configure_logging(settings_with_logging(debug_only_config()), foreground=False)

    assert not existing.disabled


@pytest.mark.parametrize('logging_config', [
    pytest.param({'handlers': {'broken': {'class': 'no.such.Handler'}}},
                 id='unknown-class'),
    pytest.param({'version': 2}, id='version-2'),
    pytest.param({'loggers': {TEST_LOGGER: {'level': 'LOUD'}}}, id='unknown-level'),
    pytest.param({'handlers': {'h': {'class': 'logging.NullHandler'}},
                  'loggers': {TEST_LOGGER: {'handlers': ['missing']}}},
                 id='unknown-handler'),
])
def test_invalid_logging_is_config_error(isolated_logger: logging.Logger,
                                         logging_config: dict[str, Any]) -> None:
    settings = settings_with_logging(logging_config)

    with pytest.raises(ConfigError) as caught:
        cli.configure_logging(settings, foreground=True)

    assert caught.value.path == 'mikkoo.yml'
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith('Logging: invalid logging configuration')
