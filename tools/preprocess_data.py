"""Tokenize a corpus into an IronCore indexed dataset; see `ironcore/data/preprocess.py`."""

import sys

from ironcore.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
