import sys

from leanfit.cli import main

sys.exit(main())
