"""Job entrypoint for one stage: `python jobs/stage.py STAGE CONFIG [key=value ...] [--resume]`.

For example `ray job submit -- python jobs/stage.py prepare configs/celeba.yaml --run-dir s3://…`.
"""

import sys

from raybias.cli import main
from raybias.stages import STAGES

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in STAGES:
        print(f"usage: python jobs/stage.py STAGE CONFIG [key=value ...] (STAGE: {', '.join(STAGES)})",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
