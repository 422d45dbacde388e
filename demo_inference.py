"""Demo: stream generations for five varied prompts from a trained checkpoint.

    python demo_inference.py [MODEL] [--max-new-bytes 200 --temp 0.8 --seed 1 ...]

With no model file it says how to train one (`python train.py`) and exits non-zero.
The work is done by bytelm.cli.generate.demo_main; this file only dispatches.
"""
import sys

from bytelm.cli.run import run_cli
from bytelm.cli.generate import demo_main

if __name__ == "__main__":
    sys.exit(run_cli(demo_main))
