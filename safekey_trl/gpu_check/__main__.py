"""`python -m safekey_trl.gpu_check`: see the package's docstring."""

import sys

from . import main

sys.exit(main())
