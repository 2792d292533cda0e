"""Knowledge distillation with fastkd: ``torchrun --nproc-per-node N train/main.py [options]``.

With no data options it trains on the built-in demo data (a small teacher first, cached).
See ``python train/main.py --help``; the logic lives in ``fastkd.engine``.
"""

from fastkd.engine.trainer import main

if __name__ == "__main__":
    main()
