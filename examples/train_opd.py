"""Entry point of the reference run: on-policy distillation with vOPD + Prune-OPD.

python examples/train_opd.py [--method opd|vopd|prune|prune+vopd] [--help]
"""

import sys
from pathlib import Path

# Appended, not prepended: an installed opd_ext wins over the source tree (which lacks _C unless
# built in place with scripts/dev_build.sh); `examples` itself is only found here.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from examples.opd.train import main  # noqa: E402

if __name__ == "__main__":
    main()
