"""The main job: train CoLT5 with transformers' Trainer (`python scripts/train.py --help`; the same program as the
`colt5-train` command and `python -m colt5.train`). The code lives in colt5/train.py so that the installed
command and multi-GPU launchers (`torchrun -m colt5.train`) run it too."""

from colt5.train import main

if __name__ == "__main__":
    main()
