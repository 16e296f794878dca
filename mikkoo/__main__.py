import sys

from mikkoo.cli import main

sys.exit(main())
