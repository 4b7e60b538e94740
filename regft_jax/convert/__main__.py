import sys

from regft_jax.convert.cli import main

sys.exit(main())
