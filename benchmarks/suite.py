"""`python -m benchmarks.suite [options]` is `attnres-fx bench [options]` (the suite lives in attnres_fx/bench/)."""

import sys

from attnres_fx.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
