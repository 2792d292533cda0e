"""Build a teacher-output cache for ``train/main.py --teacher-cache DIR``:
``[torchrun --nproc-per-node N] train/cache_teacher.py --teacher-cache DIR [trainer's flags]``.

See ``python train/cache_teacher.py --help``; the logic lives in ``fastkd.engine.cache_teacher``.
"""

from fastkd.engine.cli import cache_teacher

if __name__ == "__main__":
    cache_teacher()
