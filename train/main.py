"""Knowledge distillation with fastkd: ``torchrun --nproc-per-node N train/main.py [options]``.

With no data options it trains on the built-in demo data (a small teacher first, cached).
See ``python train/main.py --help``; the logic lives in ``fastkd.engine``
(the flags are checked before torch is imported).
"""

from fastkd.engine.cli import main

if __name__ == "__main__":
    main()
