"""The main job's teacher on the data fastkd writes itself (``DEMO_TEACHERS``: the glyphs, the
digits): trained once with CE and kept in
``OUTPUT/<dataset>-teacher-<model>-<classes>cls-<size>px-<epochs>ep-<crop and flip>/``.

That folder's ``complete.json`` is written only after the teacher's last epoch and records the
settings it was trained with; without it (an interrupted teacher) the teacher run resumes from
its ``last.pth`` rather than being distilled from half-trained.
"""

import json
import os

from ..files import atomic_write
from .checkpoint import RUN_OPTIONS, RUN_RECORDS, changed_options
from .config import DATASET_DEFAULTS, DEMO_TEACHER_MODELS, DEMO_TEACHERS, default_args
from .run_folder import BEST

COMPLETE = "complete.json"


def teacher_args(args):
    """The teacher run's options: its dataset's recipe (with ``DEMO_TEACHERS``' changes, then
    ``DEMO_TEACHER_MODELS``' for its model) for ``args.teacher`` at the student's image size,
    classes and crop and flip, in a folder named by those settings, resumed there if
    interrupted; the student's loaders (hence batch size) and logging."""
    recipe = {"epochs": DATASET_DEFAULTS[args.dataset]["epochs"], **DEMO_TEACHERS[args.dataset],
              **DEMO_TEACHER_MODELS.get(args.teacher, {})}
    low, high = args.scale
    # --teacher-kwargs make another model (a ViT's patch size): another teacher, another folder.
    kwargs = "".join(f"-{key}{value}" for key, value in sorted(args.teacher_kwargs.items()))
    name = (f"{args.dataset}-teacher-{args.teacher}{kwargs}-{args.num_classes}cls-"
            f"{args.img_size}px-{recipe['epochs']}ep-scale{low:g}-{high:g}-flip{args.hflip:g}")
    return default_args(
        dataset=args.dataset, distiller="ce", model=args.teacher,
        model_kwargs=args.teacher_kwargs, **recipe, img_size=args.img_size,
        num_classes=args.num_classes, output=args.output, experiment=name, resume="auto",
        seed=args.seed, workers=args.workers, loader=args.loader,
        batch_size=args.batch_size,  # it reads the student's loaders
        log_interval=args.log_interval, recovery_interval=args.recovery_interval,
        scale=[low, high], ratio=list(args.ratio), hflip=args.hflip, amp=args.amp,
        amp_dtype=args.amp_dtype,
        val_split=args.val_split)  # it is evaluated on the student's loaders


def _record(settings):
    """What ``complete.json`` records of a finished teacher: every option it was trained with,
    but the seed (one teacher serves every seed of a table) and those that say how a job runs
    (``RUN_OPTIONS``)."""
    return {key: value for key, value in sorted(vars(settings).items())
            if key not in RUN_OPTIONS and key not in RUN_RECORDS and key != "seed"}


def finished(settings):
    """``(best.pth, [])`` of a teacher finished in its folder with these settings; ``(None,
    changes)`` of one finished with others ("--lr 0.5 -> 0.02", ...: the options its record holds
    with other values; a record older than an option is not compared on it); ``(None, [])``
    when none has finished there."""
    folder = os.path.join(settings.output, settings.experiment)
    try:
        with open(os.path.join(folder, COMPLETE)) as handle:
            recorded = json.load(handle)
    except (OSError, ValueError):
        return None, []
    changed = changed_options(recorded, settings, skip=("seed",))
    best = os.path.join(folder, BEST)
    return (None if changed or not os.path.isfile(best) else best), changed


def mark_finished(settings, folder):
    with atomic_write(os.path.join(folder, COMPLETE)) as handle:
        json.dump(_record(settings), handle)
