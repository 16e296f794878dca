"""Smoke test of benchmarks/relay.py: a quick run against the local services.

It needs what the integration tests need (PostgreSQL with PgQ on
127.0.0.1:5432 and RabbitMQ on 127.0.0.1:5672) and the mikkoo command
installed. It checks that the benchmark completes, never its figures.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A quick run takes under 10 s on two cores; the limit covers a busy machine.
TIMEOUT = 180


def run_quick_benchmark(json_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the benchmark in --quick mode, stopping it with SIGTERM first on a timeout.

    SIGTERM makes the benchmark stop mikkoo and drop its database and queue.
    """
    process = subprocess.Popen(
        [sys.executable, '-m', 'benchmarks.relay', '--quick', '--json', str(json_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        raise AssertionError(f'the quick benchmark ran longer than {TIMEOUT} s\n'
                             f'{stderr}') from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_quick_run_completes(tmp_path: Path) -> None:
    json_path = tmp_path / 'result.json'
    result = run_quick_benchmark(json_path)

    assert result.returncode == 0, result.stderr
    assert 'figure' in result.stdout, result.stdout
    assert 'median' in result.stdout, result.stdout
    for row in ('limit: pika publisher, confirm on', 'limit: pika publisher, confirm off',
                'reference: pika publisher, joined writes, confirm on',
                'reference: pika publisher, joined writes, confirm off',
                'limit: PgQ drain, no AMQP', 'mikkoo confirm: true',
                'mikkoo confirm: false', 'idle mikkoo, worker CPU'):
        assert row in result.stdout, f'row {row!r} missing from:\n{result.stdout}'
    assert 'targets' in result.stdout, result.stdout

    summary = json.loads(json_path.read_text())
    names = {figure['name'] for figure in summary['figures']}
    assert 'mikkoo confirm: true' in names, names
    assert all(len(figure['values']) == 1 for figure in summary['figures'])
    assert len(summary['targets']) == 4, summary['targets']
    assert len(summary['comparisons']) == 2, summary['comparisons']
    assert any('--quick' in note for note in summary['notes']), summary['notes']


def benchmark_databases() -> set[str]:
    output = subprocess.run(
        ['psql', '-h', '127.0.0.1', '-U', 'postgres', '-d', 'postgres', '-Atc',
         "SELECT datname FROM pg_database WHERE datname LIKE 'mikkoo\\_benchmark\\_%'"],
        capture_output=True, text=True, check=True, timeout=30).stdout
    return set(output.split())


def test_ctrl_c_drops_database() -> None:
    before = benchmark_databases()
    process = subprocess.Popen(
        [sys.executable, '-m', 'benchmarks.relay', '--events', '20000', '--repeat', '1',
         '--big-batch', '0'],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not benchmark_databases() - before:
            assert time.monotonic() < deadline, 'the benchmark created no database in 60 s'
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)

        process.send_signal(signal.SIGINT)
        _stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()

    assert process.returncode == 1, stderr
    assert 'stopped by SIGINT' in stderr
    assert 'Traceback' not in stderr
    assert benchmark_databases() == before
