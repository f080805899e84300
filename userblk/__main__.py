import sys

from userblk.cli import main

sys.exit(main())
