"""`python -m tunewire.cli ...`: the same as the `tunewire` command."""

import sys

from tunewire.cli import main

# vLLM starts its engine processes with multiprocessing's spawn, which re-imports this module
# (as __mp_main__): only the real entry point may run the command.
if __name__ == "__main__":
    sys.exit(main())
