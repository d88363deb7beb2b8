import sys

from kd_dist.cli import main

sys.exit(main())
