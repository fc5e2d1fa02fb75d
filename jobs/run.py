"""Job entrypoint: `python jobs/run.py CONFIG [key=value ...] [--run-dir DIR] [--resume]`.

The same as `raybias run ...`; a Ray job (`ray job submit -- python jobs/run.py ...`, the
KubeRay RayJob in cluster/kuberay/rayjob.yaml) joins the cluster through RAY_ADDRESS.
"""

import sys

from raybias.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
