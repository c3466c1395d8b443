"""Entry point of the reproduction: the four OPD variants side by side, table + plots in docs/

python examples/reproduce_opd.py [--steps N] [--docs DIR] [--help]
"""

import sys
from pathlib import Path

# Appended, not prepended: an installed opd_ext wins over the source tree (which lacks _C unless
# built in place with scripts/dev_build.sh); `examples` itself is only found here.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from examples.opd.reproduce import main  # noqa: E402

if __name__ == "__main__":
    main()
