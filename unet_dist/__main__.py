"""`python -m unet_dist ...` (what `torchrun -m unet_dist train ...` runs)."""

import sys

from .cli import main

sys.exit(main())
