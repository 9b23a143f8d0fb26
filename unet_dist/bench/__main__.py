"""`python -m unet_dist.bench SUITE ...`: the bench command without the rest of the CLI."""

import sys

from unet_dist.bench import main

sys.exit(main())
