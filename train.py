"""Train a bytelm model: `python train.py` (same as `bytelm train`). `python train.py --help` lists the flags.

    python train.py                              # default model on the built-in corpus -> byte_llm_model.pt
    python train.py --preset seed --data my.txt  # the seed recipe on your own text
    python train.py --resume                     # continue after a crash or Ctrl-C
    torchrun --nproc_per_node=2 train.py         # several processes or GPUs (DDP)

The command line is bytelm.cli.train, the loop bytelm.train.loop; docs/training.md explains the run, its files and
its defaults.
"""
import sys

from bytelm.cli.run import run_cli
from bytelm.cli.train import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
