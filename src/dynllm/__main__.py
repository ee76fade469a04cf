import sys

from dynllm.cli import main

sys.exit(main())
