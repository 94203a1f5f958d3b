"""`python -m medsynapse.cli ...` = `medsynapse ...`."""

import sys

from medsynapse.cli import main

sys.exit(main())
