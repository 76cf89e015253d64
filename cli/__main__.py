import sys

from llmpareto.cli.main import main

sys.exit(main())
