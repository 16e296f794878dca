"""Argument checks of the benchmark, before it touches any service."""
from pathlib import Path

import pytest

from benchmarks.relay import parse_arguments


def exit_status_and_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as raised:
        parse_arguments(argv)
    return int(raised.value.code or 0), capsys.readouterr().err


def test_log_dir_file_rejected(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    existing_file = tmp_path / 'file'
    existing_file.write_text('')

    status, error = exit_status_and_error(['--log-dir', str(existing_file)], capsys)

    assert status == 2
    assert f'--log-dir {existing_file}: not a directory' in error


def test_log_dir_created_when_missing(tmp_path: Path) -> None:
    log_dir = tmp_path / 'logs' / 'run'

    arguments = parse_arguments(['--log-dir', str(log_dir)])

    assert arguments.log_dir == log_dir
    assert log_dir.is_dir()


@pytest.mark.parametrize('name', ['missing/result.json', '.'])
def test_unwritable_json_path_rejected(tmp_path: Path, name: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name

    status, error = exit_status_and_error(['--json', str(path)], capsys)

    assert status == 2
    assert f'--json {path}: not a writable file path' in error


def test_quick_replaces_explicit_sizes() -> None:
    arguments = parse_arguments(['--quick', '--events', '10', '--repeat', '5'])

    assert arguments.events == 2000
    assert arguments.repeat == 1
    assert arguments.big_batch == 0
