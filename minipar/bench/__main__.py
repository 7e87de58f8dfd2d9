"""Entry point of ``python -m minipar.bench`` (see ``minipar.bench.step``)."""

import sys

from minipar.bench.step import main  # sets the BLAS threads before NumPy loads

sys.exit(main())
