"""Entry point of ``python -m minipar.train`` (see ``minipar.train.cli``)."""

import sys

from minipar.train.cli import main  # sets the BLAS threads before NumPy loads

sys.exit(main())
