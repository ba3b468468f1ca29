import sys

from dppo_megatron.commands.cli import main

sys.exit(main())
