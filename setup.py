import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"^__version__ = '([^']+)'",
                    (HERE / 'mikkoo' / '__init__.py').read_text(),
                    re.MULTILINE).group(1)

setup(
    name='mikkoo',
    version=VERSION,
    description='Mikkoo is a PgQ to RabbitMQ Relay',
    long_description=(HERE / 'README.rst').read_text(),
    long_description_content_type='text/x-rst',
    license='BSD-3-Clause',
    packages=find_packages(exclude=['tests', 'tests.*']),
    python_requires='>=3.11',
    install_requires=[
        'pika>=1.3,<2',
        'psycopg2-binary>=2.9,<3',
        'PyYAML>=6,<7',
    ],
    extras_require={
        'sentry': ['sentry-sdk>=2'],
        'test': ['pytest>=8', 'mypy>=1.10', 'types-PyYAML', 'types-psycopg2',
                 'cryptography', 'hypothesis'],
    },
    entry_points={'console_scripts': [
        'mikkoo=mikkoo.cli:main',
        'mikkoo-audit=mikkoo.audit:main',
    ]},
    classifiers=[
        'License :: OSI Approved :: BSD License',
        'Operating System :: POSIX',
        'Programming Language :: Python :: 3',
        'Topic :: Database',
        'Topic :: System :: Networking',
    ],
)
