import sys

from debater.cli import main

sys.exit(main())
