"""Job entrypoint: `python jobs/sweep.py CONFIG [key=value ...] [--run-dir DIR] [--resume]`.

The same as `raybias sweep ...` (Ray Tune over severity x synthetic_ratio x method x seed).
"""

import sys

from raybias.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
