"""``python -m trl_cream.cli`` (e.g. under ``accelerate launch -m trl_cream.cli train ...``): the `trl-cream`
command."""

import sys

from . import main

sys.exit(main())
