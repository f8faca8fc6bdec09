"The `influence-nb` console script as a file, for `torchrun tests/cli_main.py ...` (torchrun runs a script or a module)."
import sys
from influence_nb.cli import main
sys.exit(main())
