import sys

from edgeprune_runtime.cli import main

sys.exit(main())
