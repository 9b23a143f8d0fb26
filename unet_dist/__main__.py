"""`python -m unet_dist ...` (what `torchrun -m unet_dist train ...` runs)."""

import sys

from unet_dist.cli import main

sys.exit(main())
