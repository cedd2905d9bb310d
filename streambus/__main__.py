import sys

from streambus.cli import main

sys.exit(main())
