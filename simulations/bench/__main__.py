"""``python -m simulations.bench``: the benchmark command (simulations/bench/cli.py)."""

import sys

from simulations.bench.cli import main

sys.exit(main())
