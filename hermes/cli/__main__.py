"""``python -m hermes.cli`` (e.g. under torchrun) runs the ``hermes`` command."""

import sys

from hermes.cli import main

sys.exit(main())
