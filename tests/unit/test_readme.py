"""Check that README.rst documents every configuration option by its key."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mikkoo import config

README = Path(__file__).resolve().parents[2] / 'README.rst'

OPTION_TABLES = {
    'APPLICATION_OPTIONS': config.APPLICATION_OPTIONS,
    'QUEUE_OPTIONS': config.QUEUE_OPTIONS,
    'RABBITMQ_OPTIONS': config.RABBITMQ_OPTIONS,
    'STATSD_OPTIONS': config.STATSD_OPTIONS,
    'DAEMON_OPTIONS': config.DAEMON_OPTIONS,
}


def documented_keys(text: str) -> set[str]:
    """Return the names README.rst shows as keys.

    A key counts when it is an inline literal (``key`` or ``a/b.key``) or
    the first word of a line, which is where the first column of an RST
    table or a definition list term starts.
    NOTE: a first word of ordinary prose counts too, so a common word such
    as "host" passes if a sentence starts with it.
    """
    keys = set()
    for literal in re.findall(r'``([^`]+)``', text):
        keys.add(re.split(r'[/.]', literal.strip())[-1].rstrip(':'))
    for line in text.splitlines():
        words = line.strip().lstrip('|*-').split()
        if words:
            keys.add(words[0].strip('`').rstrip(':'))
    return keys


@pytest.mark.parametrize('table', list(OPTION_TABLES))
def test_readme_documents_options(table: str) -> None:
    keys = documented_keys(README.read_text(encoding='utf-8'))

    missing = [option.key for option in OPTION_TABLES[table] if option.key not in keys]

    assert missing == []


def test_readme_documents_ssl_options() -> None:
    keys = documented_keys(README.read_text(encoding='utf-8'))

    missing = [key for key in config.SSL_OPTION_KEYS if key not in keys]

    assert missing == []


def test_documented_keys_reads_tables() -> None:
    text = ('===== =======\n'
            'Key   Meaning\n'
            '===== =======\n'
            'alpha First.\n'
            '===== =======\n'
            '\n'
            'Set ``section.beta`` and ``gamma`` here.\n')

    keys = documented_keys(text)

    assert {'alpha', 'beta', 'gamma'} <= keys
    assert 'delta' not in keys
