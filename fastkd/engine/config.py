"""The trainer's command line (timm train.py's names where they overlap) and YAML configs.

``parse_args(argv)``: ``--config FILE.yaml`` supplies defaults whose keys are the long option
names (dashes or underscores); the command line wins over the file. Every check that the flags
alone decide runs before torch is imported (this module does not import it), so that a refused
command line answers at once; then ``check_registries`` imports timm to look up the model,
optimiser and compiler names.
"""

import argparse
import ast
import dataclasses
import difflib
import math
import os
import tempfile

import yaml

from .. import __version__
from ..data import DATASETS, LOADERS
from ..data.crop_flip import CropFlip
from ..data.demo import foreign_demo_entries
from ..data.glyphs import foreign_glyph_entries
from ..data.splits import eval_split_problem
from ..methods import method_options_classes, methods
from .refusal import Refused

# Dataset-specific defaults used when the corresponding option is not given.
# The demo's learning rate is low for its 8 epochs because LDRLD's loss weights (alpha 10.5,
# beta 7) make its gradients ~10x KD's; the authors tame that with 20 warm-up epochs. Its one
# warm-up epoch at half the rate, then x0.1 from epochs 5 and 7 (timm's multistep decays from
# epoch m - 1, counting from 0). Digits are not mirror images of themselves, and a crop of 8% of
# an 8x8 scan leaves no digit: no flips, crops of at least half the image (the teacher then
# reaches 98.9% top-1 where ImageNet's crop and flip left it at 85%).
DEMO_DEFAULTS = dict(model="resnet20", teacher="wrn_16_2", epochs=8, batch_size=64, lr=0.02,
                     warmup_epochs=1, warmup_lr=0.01, sched="multistep", decay_milestones=(6, 8),
                     img_size=32, scale=(0.5, 1.0), hflip=0.0)
# The glyphs (100 classes, val and test in held-out fonts), the main job's data: a student short
# of its teacher (5 epochs, where the wrn_16_2 teacher trains 12: DEMO_TEACHERS), so that what
# the teacher knows shows. The digits' crops; no flips (b and d, p and q mirror each other).
# Chosen on val: a global batch of 128 (64 a process) left CE stuck near chance for 2-4 epochs
# and its 7-epoch score at the mercy of the seed (63.4 and 76.9 for seeds 1 and 2); 32 a
# process (the LDRLD authors' global 64) doubles the steps for the same time (69.5 s) and gave
# 86.0 and 81.1; 5 epochs then leave the teacher room above CE.
GLYPHS_DEFAULTS = dict(DEMO_DEFAULTS, teacher="wrn_16_2", epochs=5, batch_size=32, lr=0.05,
                       sched="cosine")
# Method settings that a dataset's short recipe needs where a method's defaults (its paper's, for
# hundreds of epochs) fail, chosen on val (README, "HCD on the glyphs"): HCD at the authors'
# T = 1, w_sdd = 6 starts as KD at T = 1 with weight 19, and the glyphs' 5-epoch student stays at
# chance. bench/demo_table.py passes them; a run without them is warned, not changed (a method
# option's default stays its paper's).
RECIPE_METHOD_SETTINGS = {"glyphs": {"hcd": {"temperature": 4.0, "w_sdd": 0.33}}}
DATASET_DEFAULTS = {"demo": DEMO_DEFAULTS, "glyphs": GLYPHS_DEFAULTS,
                    "synthetic": dict(num_classes=1000, synthetic_samples=12800)}
# The datasets whose main job trains its own teacher (cached: the demo teacher), and where that
# teacher's recipe differs from its dataset's defaults.
DEMO_TEACHERS = {"demo": {}, "glyphs": dict(epochs=12)}
# A demo teacher model whose recipe differs again, on any of those datasets. The hybrid ViT
# (evidence table's hcd-vit) stayed at chance for 4 of the glyphs' 12 SGD epochs and reached
# 70.8% on val in 12 AdamW ones; chosen on val (README, "HCD from a ViT teacher").
DEMO_TEACHER_MODELS = {"vit_tiny_hybrid_cifar": dict(epochs=24, opt="adamw", lr=1e-3,
                                                     weight_decay=0.05, warmup_lr=1e-5)}
# Everything else: SGD 0.1 for 100 epochs, x0.1 every 30 (timm's step schedule).
DEFAULTS = dict(epochs=100, batch_size=128, lr=0.1, warmup_epochs=0, warmup_lr=1e-5,
                sched="step", decay_epochs=30, decay_milestones=(30, 60, 90),
                **{field.name: field.default for field in dataclasses.fields(CropFlip)})
SCHEDULES = ("step", "multistep", "cosine")
# The datasets fastkd writes itself, under --data-dir or the user cache: what else a folder holds.
FOREIGN_ENTRIES = {"demo": foreign_demo_entries, "glyphs": foreign_glyph_entries}


class KeyValues(argparse.Action):
    """``KEY=VALUE ...`` as timm's ``ParseKwargs`` reads them (a Python literal, else the string),
    with a usage error rather than a traceback for a bare key."""

    def __call__(self, parser, namespace, values, option_string=None):
        settings = {}
        for value in filter(None, values):
            if "=" not in value:
                parser.error(f"{option_string} takes KEY=VALUE pairs, got {value!r}")
            key, value = value.split("=", 1)
            try:
                settings[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                settings[key] = value
        setattr(namespace, self.dest, settings)


def add_method_options(parser):
    """``--<method>-<field>`` for every field of every method's options dataclass: the flags and
    their defaults come from the methods' options (``fastkd.methods.<method>`` for the built-in
    ones) and nowhere else."""
    for method, options_class in method_options_classes().items():
        group = parser.add_argument_group(f"{method} options (with --distiller {method})")
        for item in dataclasses.fields(options_class):
            flag = f"--{method_flag(method, item.name)}"
            settings = dict(default=item.default, dest=f"{method}_{item.name}",
                            help=f"{item.metadata['help']} (default: {item.default})")
            if isinstance(item.default, bool):
                settings["action"] = argparse.BooleanOptionalAction
            elif isinstance(item.default, tuple):  # stage numbers
                settings.update(nargs="+", type=int)
            else:
                settings.update(type=type(item.default), choices=item.metadata["choices"])
            group.add_argument(flag, **settings)


def method_options(args):
    """The options dataclass of ``args.distiller`` from its flags (None for ``ce``)."""
    options_class = method_options_classes().get(args.distiller)
    if options_class is None:
        return None
    values = {item.name: getattr(args, f"{args.distiller}_{item.name}")
              for item in dataclasses.fields(options_class)}
    return options_class(**{name: tuple(value) if isinstance(value, list) else value
                            for name, value in values.items()})


def method_option_names():
    """``{dest: method}`` of every method's flags (``ldrld_top_d: "ldrld"``)."""
    return {f"{method}_{item.name}": method
            for method, options_class in method_options_classes().items()
            for item in dataclasses.fields(options_class)}


def distils(args):
    """Whether ``args.distiller`` learns from a teacher (every method but ce)."""
    return methods()[args.distiller].needs_teacher


def method_flag(method, field_name):
    """``ldrld-top-d``: a method option's flag, without its leading dashes."""
    return f"{method}-{field_name}".replace("_", "-")


def _recipe_settings(dataset, distiller):
    """``RECIPE_METHOD_SETTINGS``' ``{field: value}`` for ``distiller`` on ``dataset``; empty
    where the method's defaults serve."""
    return RECIPE_METHOD_SETTINGS.get(dataset, {}).get(distiller, {})


def recipe_method_flags(dataset, distiller):
    """The recipe's settings for ``distiller`` on ``dataset`` as flags
    (``["--hcd-temperature", "4", ...]``); none where the method's defaults serve."""
    return _method_flags(distiller, _recipe_settings(dataset, distiller))


def off_recipe_warning(args):
    """A warning for a run whose method settings differ from its dataset's recipe
    (``RECIPE_METHOD_SETTINGS``), naming the flags; None for a run that has them."""
    settings = _recipe_settings(args.dataset, args.distiller)
    given = {name: getattr(args, f"{args.distiller}_{name}") for name in settings}
    if given == settings:
        return None
    return (f"warning: --distiller {args.distiller} with "
            f"{' '.join(_method_flags(args.distiller, given))} has not trained in the --dataset "
            f"{args.dataset} recipe (its student stayed near chance); that recipe takes "
            f"{' '.join(_method_flags(args.distiller, settings))} (README's evidence section)")


def _method_flags(method, settings):
    """``{field: value}`` of ``method``'s options as its command-line flags."""
    return [text for name, value in settings.items()
            for text in (f"--{method_flag(method, name)}", f"{value:g}")]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastkd-train", description="Knowledge distillation with fastkd (timm models). "
        "Options named as in timm's train.py mean what they mean there.",
        allow_abbrev=False,  # "--epoch 3" is a typo, not --epochs
        # One line above an error rather than every option's (--help lists those).
        usage="%(prog)s [--config FILE] [--dataset NAME] [--model NAME] [--distiller NAME] "
        "[options]; --help lists them")
    parser.add_argument("--config", metavar="FILE", help="YAML file of option defaults")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    group = parser.add_argument_group("model")
    group.add_argument("--model", help="student: any timm model or a CIFAR net (resnet8x4, ...)")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=KeyValues,
                       metavar="KEY=VALUE", help="keyword arguments for the student's "
                       "timm.create_model, e.g. img_size=32 patch_size=4")
    group.add_argument("--teacher", help="teacher model name")
    group.add_argument("--teacher-kwargs", nargs="*", default={}, action=KeyValues,
                       metavar="KEY=VALUE", help="keyword arguments for the teacher's "
                       "timm.create_model")
    group.add_argument("--teacher-checkpoint", help="teacher weights: a fastkd best.pth, a timm "
                       "train.py checkpoint, a (DDP) state dict or a .safetensors file")
    group.add_argument("--teacher-pretrained", action="store_true",
                       help="timm hub weights for the teacher (needs the internet)")
    group.add_argument("--allow-untrained-teacher", action="store_true",
                       help="distil from a teacher without weights, or one at chance level on "
                       "the validation set (otherwise refused)")
    group.add_argument("--distiller", default="ldrld", choices=tuple(methods()),
                       help="the method; ce trains without a teacher (default: ldrld)")
    group.add_argument("--num-classes", type=int,
                       help="default: the dataset's (synthetic: 1000)")
    group.add_argument("--img-size", type=int, help="input image size, the model's "
                       "pretrained_cfg's where not set")
    group.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                       help="input dimensions, overrides --img-size")
    group.add_argument("--channels-last", action="store_true")
    group.add_argument("--torchcompile", nargs="?", const="inductor", metavar="BACKEND",
                       help="torch.compile the student and teacher (backend: inductor)")
    group.add_argument("--model-ema", action="store_true",
                       help="keep an EMA of the student (and HCD's modules), evaluated and saved")
    group.add_argument("--model-ema-decay", type=float, default=0.9998)

    group = parser.add_argument_group("data and augmentation")
    group.add_argument("--data-dir", help="dataset root (not needed for the demo data)")
    group.add_argument("--dataset", default="glyphs", choices=DATASETS,
                       help="default: glyphs, the built-in demo data")
    group.add_argument("--val-split", default="val", metavar="NAME",
                       help="the split that evaluation reads, in training and with --eval-only: "
                       "the folder under --data-dir (glyphs: val or test; default: val)")
    group.add_argument("--loader", default="auto", choices=LOADERS,
                       help="auto: DALI when installed, else on CUDA torchvision's nvJPEG "
                       "decoding (nvjpeg), else torchvision on the CPU (torch)")
    group.add_argument("--synthetic-samples", type=int,
                       help="--dataset synthetic: training samples per epoch, all ranks "
                       "(default 12800)")
    group.add_argument("-j", "--workers", type=int, default=2,
                       help="data loading processes (DALI: threads) per training process")
    group.add_argument("--bad-images", default="skip", choices=("skip", "error"),
                       help="image files that do not decode: 'skip' leaves each out (replaced "
                       "by another sample of its split; listed in RUN/bad_images.txt), 'error' "
                       "stops the run naming them")
    group.add_argument("--scale", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="random-resized crop's area fraction range")
    group.add_argument("--ratio", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="random-resized crop's aspect ratio range")
    group.add_argument("--hflip", type=float, help="horizontal flip probability")
    group.add_argument("--aa", metavar="POLICY", help="auto-augment policy, timm's names "
                       "(rand-m9-mstd0.5-inc1, original, ...); DALI runs those it has")
    group.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    group.add_argument("--remode", default="pixel", help="random erasing mode")
    group.add_argument("--recount", type=int, default=1, help="random erasing count")
    group.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (active if > 0)")
    group.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (active if > 0)")
    group.add_argument("--cutmix-minmax", type=float, nargs=2, help="cutmix min/max area ratio "
                       "(overrides --cutmix)")
    group.add_argument("--mixup-prob", type=float, default=1.0)
    group.add_argument("--mixup-switch-prob", type=float, default=0.5)
    group.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    group.add_argument("--mixup-off-epoch", type=int, default=0,
                       help="turn mixup/cutmix off from this epoch (0: never)")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int)
    group.add_argument("-b", "--batch-size", type=int, help="per process")
    group.add_argument("--lr", type=float)
    group.add_argument("--opt", default="sgd", help="any timm optimizer (timm.optim)")
    group.add_argument("--opt-eps", type=float)
    group.add_argument("--opt-betas", type=float, nargs="+")
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, default=5e-4)
    group.add_argument("--clip-grad", type=float, help="clip gradients at this norm/value")
    group.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"))
    group.add_argument("--sched", choices=SCHEDULES)
    group.add_argument("--decay-epochs", type=float, help="step: epochs between decays")
    group.add_argument("--decay-milestones", type=int, nargs="+",
                       help="multistep: epochs at which to decay")
    group.add_argument("--decay-rate", type=float, default=0.1)
    group.add_argument("--warmup-epochs", type=int)
    group.add_argument("--warmup-lr", type=float, help="learning rate at the warm-up's start")
    group.add_argument("--warmup-prefix", action="store_true",
                       help="warm-up epochs are not counted in the decay schedule")
    group.add_argument("--min-lr", type=float, default=0.0, help="cosine: the final rate")
    group.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    group.add_argument("--amp", action="store_true", help="mixed precision")
    group.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    group.add_argument("--seed", type=int, default=42)

    add_method_options(parser)

    group = parser.add_argument_group("teacher cache")
    group.add_argument("--teacher-cache", metavar="DIR",
                       help="read the teacher's outputs from DIR (built by "
                       "train/cache_teacher.py with this run's data, teacher and augmentation "
                       "flags) instead of running the teacher")
    group.add_argument("--augment-views", type=int, metavar="K",
                       help="epoch e draws the augmentations of epoch e mod K, in a new order "
                       "every epoch: K views of each sample, which a cache of K views serves")

    group = parser.add_argument_group("run")
    group.add_argument("--output", default="output",
                       help="runs go to OUTPUT/<run name>/ (default: output)")
    group.add_argument("--experiment", help="run name (default: time-distiller-model)")
    group.add_argument("--resume", metavar="CHECKPOINT|auto",
                       help="continue a run from its last.pth; 'auto': continue "
                       "OUTPUT/EXPERIMENT from its last.pth if it has one, else start it there "
                       "(for torchrun --max-restarts)")
    group.add_argument("--eval-only", metavar="CHECKPOINT",
                       help="evaluate a fastkd checkpoint's student (its EMA too, if saved) on "
                       "the validation split; model settings come from the checkpoint")
    group.add_argument("--log-interval", type=int, default=50,
                       help="steps between log lines; also how often the loss is read back "
                       "from the device and a non-finite loss acted on")
    group.add_argument("--recovery-interval", type=int, default=0, metavar="STEPS",
                       help="also save last.pth every STEPS steps of an epoch, so that a killed "
                       "job (kill -9) loses at most that many (0: at epoch ends only; a stop "
                       "signal always saves)")
    _name_dataset_defaults(parser)
    return parser


def _name_dataset_defaults(parser):
    """Each option whose default depends on --dataset (``fill_defaults``) says so in --help,
    from ``DATASET_DEFAULTS`` and ``DEFAULTS`` themselves."""
    def shown(value):
        values = value if isinstance(value, tuple) else (value,)
        return " ".join(f"{item:g}" if isinstance(item, float) else str(item) for item in values)

    for action in parser._actions:
        defaults = [f"{dataset} {shown(values[action.dest])}"
                    for dataset, values in DATASET_DEFAULTS.items() if action.dest in values]
        if action.dest in DEFAULTS:
            general = shown(DEFAULTS[action.dest])
            defaults.append(f"otherwise {general}" if defaults else general)
        if defaults and "default" not in (action.help or ""):
            action.help = (f"{action.help} " if action.help else "") + (
                f"(default: {'; '.join(defaults)})")


def _config_defaults(parser, path):
    """The option values that the YAML file ``path`` sets, converted and checked as the command
    line's; a ValueError naming the file (and the option) if it cannot be used."""
    if not os.path.isfile(path):
        problem = "is a folder, not a YAML file" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"--config {path} {problem}")
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path} is not valid YAML: "
                         f"{' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of option: value")
    actions = {action.dest: action for action in parser._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or dest == "config":
            raise ValueError(f"--config {path}: unknown option {key!r}")
        if value is None:  # YAML null: not set (as args.yaml records unset options)
            continue
        defaults[dest] = _config_value(actions[dest], value, f"--config {path}: {key}")
    return defaults


def _config_value(action, value, where):
    """``value`` from a config file, checked and converted as the command line would be: its
    type, its number of values and its choices."""
    if isinstance(action, KeyValues):  # args.yaml records --model-kwargs as a mapping
        if not isinstance(value, dict):
            raise ValueError(f"{where} takes a mapping of KEY: VALUE, got {value!r}")
        return value
    takes_list = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 0)
    if isinstance(value, list) != takes_list:
        expected = "a list" if takes_list else "one value"
        raise ValueError(f"{where} takes {expected}, got {value!r}")
    if isinstance(action.nargs, int) and action.nargs > 0 and len(value) != action.nargs:
        raise ValueError(f"{where} takes {action.nargs} values, got {value!r}")
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if not isinstance(value, bool):
            raise ValueError(f"{where} takes true or false, got {value!r}")
        return value
    if action.type is not None:
        try:
            value = [_strict(action.type, item) for item in value] if takes_list else (
                _strict(action.type, value))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: invalid {action.type.__name__} value "
                             f"{value!r}") from None
    for item in value if takes_list else [value]:
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"{where}: invalid choice {item!r} (choose from "
                             f"{', '.join(map(repr, action.choices))})")
    return value


def _strict(convert, value):
    """``convert(value)``, refusing what the command line would refuse: 32.5 for an int (int()
    would truncate it) and a bool for a number."""
    if isinstance(value, bool) or (convert is int and isinstance(value, float)):
        raise ValueError(value)
    return convert(value)


def _parse(parser, argv):
    """``(args, changed)``: the options with a ``--config`` file's values under the command
    line's; ``changed``: those the command line moves from the built-in defaults (a config
    file's values do not count: a run's args.yaml holds every option)."""
    known, unrecognized = parser.parse_known_args(argv)
    _refuse_unrecognized(parser, unrecognized)
    changed = {name for name, value in vars(known).items()
               if value != parser.get_default(name) and name != "config"}
    if known.config:
        try:
            parser.set_defaults(**_config_defaults(parser, known.config))
        except ValueError as error:
            parser.error(str(error))
    args = parser.parse_args(argv)
    return args, changed


def _refuse_unrecognized(parser, unrecognized):
    """argparse's refusal of arguments it does not know, naming the closest flag of each
    mistyped one (what Python 3.14's ``suggest_on_error`` does for choices)."""
    if not unrecognized:
        return
    flags = [flag for action in parser._actions for flag in action.option_strings]
    hints = []
    for given in unrecognized:
        close = difflib.get_close_matches(given.partition("=")[0], flags, n=1)
        if given.startswith("--") and close:
            hints.append(f"{given}: did you mean {close[0]}?")
    parser.error(f"unrecognized arguments: {' '.join(unrecognized)}"
                 + (f" ({'; '.join(hints)})" if hints else ""))


def parse_args(argv=None):
    """Options with the file's values under the command line's, dataset defaults filled and, with
    ``--eval-only``, the model settings taken from the checkpoint."""
    parser = build_parser()
    args, changed = _parse(parser, argv)
    if args.eval_only:
        check_eval_only_flags(parser, args, changed)  # before the checkpoint (and torch) loads
        take_checkpoint_settings(parser, args)
    given = {key for key, value in vars(args).items() if value is not None}
    fill_defaults(args)
    check_args(parser, args, given)
    check_unused(parser, args, changed)
    check_registries(parser, args)
    return args


# What the teacher cache's builder reads: the teacher, the student (whose data config sets the
# input's size and normalisation), the data and augmentation, and how to run.
CACHE_OPTIONS = {"model", "model_kwargs", "teacher", "teacher_kwargs", "teacher_checkpoint",
                 "teacher_pretrained", "allow_untrained_teacher", "distiller", "num_classes",
                 "img_size", "input_size", "channels_last", "epochs", "batch_size", "amp",
                 "amp_dtype", "seed", "augment_views", "teacher_cache", "cache_dtype", "verify"}


def build_cache_parser():
    parser = build_parser()
    parser.prog = "fastkd-cache-teacher"
    parser.description = (
        "Build a teacher-output cache for fastkd-train --teacher-cache: the teacher's outputs "
        "for every training sample in each of --epochs views (the augmentations that training "
        "epoch draws). Takes the trainer's data, teacher and augmentation flags.")
    parser.usage = ("%(prog)s --teacher-cache DIR [--teacher NAME --teacher-checkpoint FILE] "
                    "[trainer's data and augmentation options]; --help lists them")
    taken = _builder_options(parser) | {"help", "version", "config"}
    for action in parser._actions:
        if action.dest == "teacher_cache":
            action.help = ("where to write the cache (a build resumes in DIR where it stopped, "
                           "and extends a finished cache to more --epochs)")
        elif action.dest == "epochs":
            action.help = "views to cache: view e is what training epoch e draws"
        elif action.dest == "distiller":
            action.help = "the run's method (hcd also stores the teacher embedding it fuses)"
        elif action.dest not in taken:  # refused by parse_cache_args: not listed
            action.help = argparse.SUPPRESS
    group = parser.add_argument_group("teacher cache builder")
    group.add_argument("--cache-dtype", default="float16", choices=("float16", "bfloat16",
                                                                    "float32"))
    group.add_argument("--verify", metavar="DIR",
                       help="recompute a random sample of DIR's entries with the live teacher "
                       "and print the largest difference; exit 1 if it is beyond the rounding "
                       "of the cache's dtype and precision")
    return parser


def parse_cache_args(argv=None):
    """The teacher cache builder's options (``train/cache_teacher.py``), checked as the
    trainer's are, before torch is imported."""
    parser = build_cache_parser()
    args, changed = _parse(parser, argv)
    given = {key for key, value in vars(args).items() if value is not None}
    fill_defaults(args)
    check_launch(parser)
    unused = sorted(changed - _builder_options(parser))
    if unused:
        parser.error(f"{_flags(unused)} would change nothing in a teacher cache")
    if bool(args.teacher_cache) == bool(args.verify):
        parser.error("give --teacher-cache DIR (build) or --verify DIR (check), one of them")
    if not distils(args):
        parser.error("--distiller ce trains without a teacher: there is nothing to cache")
    folder = args.teacher_cache or args.verify
    if args.verify:
        problem = cache_folder_problem(args.verify)
        if problem:
            parser.error(f"--verify {args.verify} {problem}")
    else:
        problem = unwritable_folder(folder) or foreign_cache_folder(folder)
        if problem:
            parser.error(f"--teacher-cache {folder} {problem}")
    args.teacher_cache, cache_folder = None, args.teacher_cache  # nothing to read yet
    for check in (check_required, check_data, check_teacher_weights, check_numbers):
        check(parser, args, given)
    args.teacher_cache = cache_folder
    _check_cacheable(parser, args, "--verify" if args.verify else "--teacher-cache")
    check_registries(parser, args)
    return args


def _builder_options(parser):
    """The trainer's options the cache builder takes: ``CACHE_OPTIONS`` and the data's."""
    return CACHE_OPTIONS | {"data_dir"} | _group_dests(parser, "data")


def _group_dests(parser, title_start):
    return {action.dest for group in parser._action_groups
            if group.title.startswith(title_start) for action in group._group_actions}


def foreign_cache_folder(path):
    """Why the builder must not write in ``path`` (None: absent, empty, or a cache's own)."""
    if not os.path.isdir(path) or not os.listdir(path):
        return None
    if not os.path.isfile(os.path.join(path, "build.json")):
        return ("holds files that are not a teacher cache's (no build.json): give an empty or "
                "new folder")
    return None


def fill_defaults(args):
    """The options left unset (None) take their dataset's defaults, else the general ones."""
    for key, value in {**DEFAULTS, **DATASET_DEFAULTS.get(args.dataset, {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def default_args(**settings):
    """The options of a run built in code (the demo's teacher): every flag at its default,
    ``settings`` set, then the dataset's defaults filled, as ``parse_args`` would give them for
    the equivalent command line (unchecked: the caller's settings are known good)."""
    parser = build_parser()
    args = argparse.Namespace(**{action.dest: action.default for action in parser._actions
                                 if action.dest not in ("help", "version")})
    vars(args).update(settings)
    return fill_defaults(args)


# What --eval-only takes from the checkpoint: how to build the student and what it was trained as.
CHECKPOINT_SETTINGS = ("model", "model_kwargs", "num_classes", "img_size", "input_size",
                       "distiller", "teacher")


def check_eval_only_flags(parser, args, changed):
    """--eval-only's file exists, and no training option is given beside it."""
    if not os.path.isfile(args.eval_only):
        problem = "is a folder, not a checkpoint file" if os.path.isdir(args.eval_only) else (
            "does not exist")
        parser.error(f"--eval-only {args.eval_only} {problem}")
    unused = sorted(changed - EVAL_ONLY_OPTIONS)
    if unused:
        parser.error(f"{_flags(unused)} would change nothing with --eval-only (it evaluates "
                     "the checkpoint's student with the model settings saved in it)")


def take_checkpoint_settings(parser, args):
    # Only --eval-only reads a checkpoint while parsing.
    from .checkpoint import load, missing_entry

    saved = load(args.eval_only, "--eval-only")
    if missing_entry(saved, ("args",)):
        parser.error(f"--eval-only {args.eval_only} is not a fastkd checkpoint (no 'args' "
                     "entry): evaluate timm checkpoints with timm's validate.py")
    for name in CHECKPOINT_SETTINGS:
        setattr(args, name, saved["args"].get(name))
    for name, value in saved["args"].items():  # the method's options
        if name.startswith(f"{args.distiller}_"):
            setattr(args, name, value)


def check_args(parser, args, given=()):
    """Errors a user can fix from the message, before any model or data is built, one concern
    after another. ``given``: the options the user set (command line or config), as opposed to
    defaults."""
    for check in (check_launch, check_required, check_data, check_teacher_weights,
                  check_teacher_cache, check_run_folder, check_numbers, check_optimisation):
        check(parser, args, given)


def check_launch(parser, args=None, given=()):
    """How torchrun started this process: what it cannot restart. Across nodes an agent
    restarts its workers without counting the restart when another node failed, so the
    attempt's keys in the store the agents share would not match
    (``distributed.init_process_group``)."""
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0):
        parser.error("torchrun --max-restarts across several nodes needs "
                     "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment: its shared "
                     "rendezvous store keeps the failed attempt's keys, so restarted workers "
                     "cannot connect")


def check_required(parser, args, given):
    """What the dataset and the method cannot do without, all named in one message: the data's
    folder, a student, and a teacher when the method distils (``check_registries`` checks that
    timm has the models)."""
    missing = []
    if args.dataset not in (*FOREIGN_ENTRIES, "synthetic") and not args.data_dir:
        missing.append(f"--dataset {args.dataset} needs --data-dir")
    if args.model is None:
        missing.append("--model is required for this dataset")
    if distils(args) and not args.teacher:
        missing.append(f"--distiller {args.distiller} needs --teacher")
    if missing:
        parser.error("; ".join(missing))


def check_data(parser, args, given):
    """The dataset's folder, and augmentations the dataset can take."""
    try:
        crop_flip(args)
    except ValueError as error:  # its message starts with the field's name
        parser.error(f"--{error}")
    if args.dataset == "synthetic":
        # No files and no loader: options that would change nothing are mistakes.
        unused = [flag for flag, used in (("--data-dir", args.data_dir),
                                          ("--loader", args.loader != "auto"),
                                          ("--aa", args.aa), ("--reprob", args.reprob),
                                          *((f"--{name}", name in crop_flip_changes(args))
                                            for name in ("scale", "ratio", "hflip")),
                                          ("--bad-images", args.bad_images != "skip"))
                  if used]
        if unused:
            parser.error(f"--dataset synthetic makes random tensors on the device: "
                         f"{', '.join(unused)} would change nothing")
        if args.num_classes is not None and args.num_classes < 2:
            parser.error(f"--num-classes must be 2 or more for --dataset synthetic, got "
                         f"{args.num_classes}")
    elif args.synthetic_samples is not None:
        parser.error(f"--synthetic-samples is for --dataset synthetic, not {args.dataset}")
    if args.data_dir and not os.path.isdir(args.data_dir):
        if os.path.exists(args.data_dir):
            parser.error(f"--data-dir {args.data_dir} is a file, not a folder")
        if args.dataset not in FOREIGN_ENTRIES:  # the datasets fastkd writes may go to a new one
            parser.error(f"--data-dir {args.data_dir} does not exist")
    if args.dataset in FOREIGN_ENTRIES and args.data_dir:
        problem = FOREIGN_ENTRIES[args.dataset](args.data_dir)
        if problem:
            parser.error(f"--data-dir {args.data_dir} {problem}")
    problem = eval_split_problem(args.dataset, args.val_split)
    if problem:
        parser.error(f"--val-split {args.val_split} {problem}")
    # A folder dataset's other split folders (train, the default val) are checked where the
    # loaders scan them, naming --data-dir; one the user names is checked here.
    split_folder = os.path.join(args.data_dir or "", args.val_split)
    if (args.dataset in ("imagenet", "folder") and args.val_split != parser.get_default("val_split")
            and not os.path.isdir(split_folder)):
        problem = "is a file, not a folder" if os.path.exists(split_folder) else "does not exist"
        parser.error(f"--val-split {args.val_split}: {split_folder} {problem} (evaluation reads "
                     "that folder under --data-dir)")
    if args.dataset == "cifar100" and {"scale", "ratio"} & crop_flip_changes(args):
        parser.error("--scale and --ratio set a random-resized crop; CIFAR-100 trains with a "
                     "padded random crop (only --hflip applies)")
    if args.input_size is not None and (args.input_size[0] != 3
                                        or args.input_size[1] != args.input_size[2]):
        parser.error(f"--input-size must be 3 H W with H = W (RGB; the loaders crop squares), "
                     f"got {' '.join(map(str, args.input_size))}")
    if mixes(args) and methods()[args.distiller].needs_hard_labels:
        parser.error(f"--distiller {args.distiller} needs hard labels (a loss term indexes the "
                     "true class): --mixup/--cutmix give soft targets; drop them")


def check_teacher_weights(parser, args, given):
    """One source of the teacher's weights, and one at all outside the demo."""
    if args.teacher_checkpoint and args.teacher_pretrained:
        parser.error("--teacher-checkpoint and --teacher-pretrained exclude each other (both "
                     "give the teacher's weights)")
    if (distils(args) and args.dataset not in DEMO_TEACHERS and not args.teacher_checkpoint
            and not args.teacher_pretrained and not args.allow_untrained_teacher
            and not args.eval_only):
        parser.error(f"--distiller {args.distiller} needs the teacher's weights: "
                     "--teacher-checkpoint FILE or --teacher-pretrained (or "
                     "--allow-untrained-teacher to distil from random weights)")


def check_teacher_cache(parser, args, given):
    """A teacher cache to read, and a run it can serve (``teacher_cache.open_for_run`` then
    compares the cache's manifest with the run)."""
    if not args.teacher_cache:
        return
    if not distils(args):
        parser.error(f"--teacher-cache holds a teacher's outputs: --distiller {args.distiller} "
                     "trains without a teacher")
    problem = cache_folder_problem(args.teacher_cache)
    if problem:
        parser.error(f"--teacher-cache {args.teacher_cache} {problem}")
    _check_cacheable(parser, args, "--teacher-cache")


def _check_cacheable(parser, args, flag):
    """What a cache (at ``flag``: --teacher-cache, or the builder's --verify) can hold:
    per-sample augmentations of a dataset's files, and a teacher whose weights are named (the
    manifest records which)."""
    if args.dataset == "synthetic":
        parser.error(f"{flag} reads a dataset's samples: --dataset synthetic has none")
    if mixes(args):
        mixing = [name for name in ("mixup", "cutmix", "cutmix_minmax") if vars(args)[name]]
        parser.error(f"{flag} serves per-sample augmentations only: {_flags(mixing)} "
                     f"{'mixes' if len(mixing) == 1 else 'mix'} samples across a batch, which "
                     "the cache cannot replay; drop them")
    if not (args.teacher_checkpoint or args.teacher_pretrained or args.allow_untrained_teacher):
        parser.error(f"{flag} needs the teacher's weights named (the cache records which): "
                     "--teacher-checkpoint FILE, --teacher-pretrained or "
                     "--allow-untrained-teacher")


def cache_folder_problem(path):
    """Why ``path`` is not a finished teacher cache (None if it is one), from its files alone."""
    if not os.path.isdir(path):
        return ("is a file, not a cache folder" if os.path.exists(path) else
                "does not exist: build it with train/cache_teacher.py")
    if not os.path.isfile(os.path.join(path, "build.json")):
        return "is not a teacher cache (no build.json): train/cache_teacher.py builds one"
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        return ("is not a finished teacher cache (no manifest.json): run "
                "train/cache_teacher.py again to finish it")
    return None


def check_run_folder(parser, args, given):
    """Where the run writes and what it reads back: --output, --experiment, --resume and the
    checkpoint files."""
    problem = unwritable_folder(args.output)
    if problem:
        parser.error(f"--output {args.output} {problem}; runs go to OUTPUT/<run name>/")
    if args.resume == "auto" and not args.experiment:
        parser.error("--resume auto needs --experiment NAME (the run folder to continue)")
    if args.resume and args.eval_only:
        parser.error("--resume and --eval-only exclude each other")
    if args.experiment is not None and (not args.experiment or os.sep in args.experiment
                                        or args.experiment in (".", "..")):
        parser.error(f"--experiment must be a folder name (the run goes to OUTPUT/NAME), got "
                     f"{args.experiment!r}")
    for option in ("teacher_checkpoint", "resume"):
        path = getattr(args, option)
        if path and path != "auto" and not os.path.isfile(path):
            problem = "is a folder, not a checkpoint file" if os.path.isdir(path) else (
                "does not exist")
            parser.error(f"--{option.replace('_', '-')} {path} {problem}")


def check_numbers(parser, args, given):
    """Numeric options in their ranges (NaN refused everywhere)."""
    positive = ["epochs", "batch_size", "lr", "recount", "decay_rate", "log_interval"]
    positive += [name for name in ("img_size", "clip_grad", "decay_epochs", "synthetic_samples",
                                   "augment_views")
                 if getattr(args, name) is not None]
    for name in positive:
        value = getattr(args, name)
        if not (value > 0 and math.isfinite(value)):  # also refuses nan
            parser.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    for name in ("workers", "warmup_epochs", "min_lr", "warmup_lr", "mixup", "cutmix",
                 "weight_decay", "smoothing", "mixup_off_epoch", "seed", "recovery_interval"):
        value = getattr(args, name)
        if not (value >= 0 and math.isfinite(value)):
            parser.error(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
    for name in ("reprob", "mixup_prob", "mixup_switch_prob", "smoothing"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1], got "
                         f"{getattr(args, name)}")
    if not 0 <= args.momentum < 1:  # 1 or more: each step's update grows without bound
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if not 0 < args.model_ema_decay < 1:
        parser.error(f"--model-ema-decay must be in (0, 1), got {args.model_ema_decay}")


def check_optimisation(parser, args, given):
    """The schedule fits the run."""
    # A default warm-up may fill a short smoke run; one the user asked for must end in it.
    if "warmup_epochs" in given and args.warmup_epochs >= args.epochs > 0:
        parser.error(f"--warmup-epochs {args.warmup_epochs} must be below --epochs "
                     f"{args.epochs} (the run would end still warming up)")
    if args.sched == "multistep" and not args.decay_milestones:
        parser.error("--sched multistep needs --decay-milestones EPOCH [EPOCH ...]")


def check_registries(parser, args):
    """The names that only timm and torch know: the models, the optimiser and the compiler
    backend (the first import of torch and timm, once every other check has passed)."""
    import timm  # also registers fastkd's CIFAR nets (see fastkd/__init__.py)
    import torch
    from timm.optim import list_optimizers

    for option in ("model", "teacher") if distils(args) else ("model",):
        if not timm.is_model(getattr(args, option)):
            parser.error(f"--{option} {getattr(args, option)} is not a timm model (nor a "
                         "fastkd CIFAR net); timm.list_models() lists them")
    if args.opt.lower() not in list_optimizers():
        parser.error(f"--opt {args.opt} is not a timm optimizer; see timm.optim.list_optimizers()")
    if args.torchcompile is not None and args.torchcompile not in (
            torch.compiler.list_backends(exclude_tags=())):
        parser.error(f"--torchcompile {args.torchcompile} is not a torch.compile backend; "
                     f"choose from {', '.join(torch.compiler.list_backends())}")


# Options that act only with another setting: (option, whether that setting is on, what it is).
DEPENDENT_OPTIONS = (
    *((name, distils, "a --distiller other than ce (ce trains "
       "without a teacher)")
      for name in ("teacher", "teacher_kwargs", "teacher_checkpoint", "teacher_pretrained",
                   "allow_untrained_teacher", "teacher_cache")),
    ("decay_milestones", lambda args: args.sched == "multistep", "--sched multistep"),
    ("decay_epochs", lambda args: args.sched == "step", "--sched step"),
    ("amp_dtype", lambda args: args.amp, "--amp"),
    ("clip_mode", lambda args: args.clip_grad is not None, "--clip-grad"),
    ("model_ema_decay", lambda args: args.model_ema, "--model-ema"),
    *((name, lambda args: args.reprob > 0, "--reprob above 0") for name in ("remode", "recount")),
    *((name, lambda args: mixes(args), "--mixup, --cutmix or --cutmix-minmax")
      for name in ("mixup_prob", "mixup_switch_prob", "mixup_mode", "mixup_off_epoch")),
)
# What --eval-only reads from the command line; the rest comes from the checkpoint or is training.
EVAL_ONLY_OPTIONS = {"eval_only", "dataset", "data_dir", "val_split", "loader", "workers",
                     "batch_size", "bad_images", "amp", "amp_dtype", "channels_last", "seed"}


def check_unused(parser, args, changed):
    """Refuse options given on the command line (``changed``) that would change nothing: another
    method's options, an option whose setting is off (--eval-only: ``check_eval_only_flags``)."""
    if args.eval_only:
        return
    methods = method_option_names()
    other_methods = [name for name in sorted(changed)
                     if methods.get(name, args.distiller) != args.distiller]
    if other_methods:
        parser.error(f"{_flags(other_methods)} would change nothing: --distiller "
                     f"{args.distiller} does not use "
                     f"{'it' if len(other_methods) == 1 else 'them'}")
    for name, active, setting in DEPENDENT_OPTIONS:
        if name in changed and not active(args):
            parser.error(f"--{name.replace('_', '-')} acts only with {setting}: here it would "
                         "change nothing")


def unwritable_folder(path):
    """Why a folder ``path`` cannot be used or made for writing (None if it can), found without
    leaving anything behind: its nearest existing ancestor must be a folder where this process
    can create one (tried with a temporary folder, removed at once)."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder"
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"is under {existing}, which is a file"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fastkd-probe-", dir=existing))
    except OSError as error:
        return f"cannot be made: making a folder in {existing} fails ({error.strerror})"
    return None


def _flags(names):
    return ", ".join(f"--{name.replace('_', '-')}" for name in names)


def crop_flip(args):
    """The training crop and flip of ``--scale``, ``--ratio`` and ``--hflip``."""
    return CropFlip(tuple(args.scale), tuple(args.ratio), args.hflip)


def crop_flip_changes(args):
    """Which of --scale, --ratio, --hflip differ from timm's defaults (as values, not as given:
    a run's args.yaml, read back with --config, holds the defaults too)."""
    current = dataclasses.asdict(crop_flip(args))
    return {name for name, default in dataclasses.asdict(CropFlip()).items()
            if current[name] != default}


def mixes(args):
    """Whether timm's Mixup is active: mixup, cutmix or a cutmix area range."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def check_method_options(args):
    """The method's options through its own checks (``Distiller.check_options``: the built-in
    methods run their loss on a dummy batch of ``args.num_classes`` classes); an error names the
    flag (``--ldrld-top-d``), not the loss's argument (``top_d``)."""
    options_class = method_options_classes().get(args.distiller)
    if options_class is None:
        return
    try:  # making the options checks the distiller-only ones, the method the rest
        methods()[args.distiller].load().check_options(method_options(args), args.num_classes)
    except (TypeError, ValueError) as error:
        message = str(error)
        names = sorted((item.name for item in dataclasses.fields(options_class)
                        if message.startswith(item.name)), key=len, reverse=True)
        flag = f"--{method_flag(args.distiller, names[0])}: " if names else ""
        raise Refused(f"error: {flag}{message}") from None
