import sys

from tandem_rt.cli import main

sys.exit(main())
