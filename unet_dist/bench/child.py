"""`python -m unet_dist.bench.child`: run one measurement in a fresh process (see common.run_child).

Reads {"target": "module:function", "kwargs": {...}} on stdin, calls the function, and prints its
result dict as JSON on the last stdout line, with `peak_rss_bytes` added: this process's peak RSS
since the function last called `common.reset_peak_rss()` (else over the process's lifetime).
"""

from __future__ import annotations

import importlib
import json
import sys


def main() -> int:
    spec = json.loads(sys.stdin.read())
    module, _, name = spec["target"].partition(":")
    result = getattr(importlib.import_module(module), name)(**spec["kwargs"])
    from unet_dist.bench.common import peak_rss_bytes

    result["peak_rss_bytes"] = peak_rss_bytes()
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
