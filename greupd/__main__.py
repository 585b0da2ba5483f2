import sys

from greupd.cli import main

sys.exit(main())
