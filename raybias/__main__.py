import sys

from raybias.cli import main

sys.exit(main())
