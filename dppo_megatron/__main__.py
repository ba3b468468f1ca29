import sys

from dppo_megatron.cli import main

sys.exit(main())
