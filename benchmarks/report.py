"""Collect benchmark figures, check the targets and format the text report."""
from __future__ import annotations

import dataclasses
import operator
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pika
import psycopg2


@dataclasses.dataclass
class Figure:
    """One measured quantity and its value in each repetition."""

    name: str
    unit: str
    values: list[float] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {'name': self.name, 'unit': self.unit, 'values': self.values,
                'min': min(self.values), 'median': self.median, 'max': max(self.values)}


COMPARISONS = {'>=': operator.ge, '<=': operator.le, '<': operator.lt}


@dataclasses.dataclass
class Target:
    """A goal on the median of one figure; ``value`` is None when not measured."""

    description: str
    value: float | None
    comparison: str     # a key of COMPARISONS, met when value <comparison> threshold
    threshold: float
    unit: str

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return bool(COMPARISONS[self.comparison](self.value, self.threshold))

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), 'met': self.met}


class Figures:
    """The figures of one benchmark run, in the order they are printed."""

    def __init__(self) -> None:
        self.by_name: dict[str, Figure] = {}

    def add(self, name: str, unit: str, value: float) -> None:
        self.by_name.setdefault(name, Figure(name, unit)).values.append(value)

    def get(self, name: str) -> Figure | None:
        return self.by_name.get(name)


def format_number(value: float) -> str:
    # Four significant digits, so that 0.9996 never prints as a rounded 1.
    if abs(value) >= 1000:
        return f'{value:,.0f}'
    return f'{value:.4g}'


def format_table(figures: Figures) -> str:
    header = ('figure', 'unit', 'min', 'median', 'max')
    rows = [header] + [
        (figure.name, figure.unit, format_number(min(figure.values)),
         format_number(figure.median), format_number(max(figure.values)))
        for figure in figures.by_name.values()]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = []
    for row in rows:
        left = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        right = [row[column].rjust(widths[column]) for column in range(2, len(header))]
        lines.append('  '.join(left + right).rstrip())
    lines.insert(1, '-' * len(lines[0]))
    return '\n'.join(lines)


def format_targets(targets: list[Target]) -> str:
    rows = []
    for target in targets:
        goal = f'{target.comparison} {format_number(target.threshold)} {target.unit}'
        if target.value is None:
            rows.append((target.description, goal, 'not measured', ''))
            continue
        rows.append((target.description, goal,
                     f'{format_number(target.value)} {target.unit}',
                     'met' if target.met else 'MISSED'))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return '\n'.join('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)


def format_pairs(pairs: dict[str, str]) -> str:
    width = max(len(key) for key in pairs)
    return '\n'.join(f'{key.ljust(width)}  {value}' for key, value in pairs.items())


def machine() -> dict[str, str]:
    model = 'unknown'
    for line in Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('model name'):
            model = line.split(':', 1)[1].strip()
            break
    memory_kib = 0
    for line in Path('/proc/meminfo').read_text().splitlines():
        if line.startswith('MemTotal:'):
            memory_kib = int(line.split()[1])
    load = ' '.join(f'{value:.2f}' for value in os.getloadavg())
    return {'nproc': str(len(os.sched_getaffinity(0))), 'CPU': model,
            'RAM': f'{memory_kib / 1024 ** 2:.1f} GiB',
            'load average at start': load}


def versions(postgres: str, pgq: str, rabbitmq: str) -> dict[str, str]:
    import mikkoo

    return {'PostgreSQL': postgres, 'PgQ': pgq, 'RabbitMQ': rabbitmq,
            'pika': pika.__version__, 'psycopg2': getattr(psycopg2, '__version__', 'unknown').split()[0],
            'Python': platform.python_version(),
            'mikkoo': f'{mikkoo.__version__} ({git_revision()})'}


def git_revision() -> str:
    """Return the commit of the working tree, marked dirty when mikkoo/ has changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root,
                                capture_output=True, text=True, check=True,
                                timeout=10).stdout.strip()
        changes = subprocess.run(['git', 'status', '--porcelain', '--', 'mikkoo'],
                                 cwd=root, capture_output=True, text=True, check=True,
                                 timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'git commit unknown'
    return f'git {commit}{" with uncommitted changes in mikkoo/" if changes else ""}'
