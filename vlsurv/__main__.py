import sys

from vlsurv.cli import main

sys.exit(main())
