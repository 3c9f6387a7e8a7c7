"""Entry point: ``python -m simulations run SCENARIO ...``."""

import sys

from simulations.cli import main

sys.exit(main())
