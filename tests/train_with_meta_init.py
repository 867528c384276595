"""`argonne train` with the large-model path forced: the model is built on the meta device, sharded, then
initialised (run by tests/test_distributed.py under torchrun)."""

import sys

import argonne.train
from argonne.cli import main

argonne.train.META_INIT_PARAMETERS = 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
