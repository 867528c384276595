"""`python -m argonne COMMAND ...` (and `torchrun ... -m argonne train ...`): the `argonne` command line."""

import sys

from argonne_cli import main

sys.exit(main())
