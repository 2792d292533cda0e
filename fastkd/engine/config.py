"""The trainer's command line (timm train.py's names where they overlap) and YAML configs.

``parse_args(argv)``: ``--config FILE.yaml`` supplies defaults whose keys are the long option
names (dashes or underscores); the command line wins over the file.
"""

import argparse
import os

import yaml

from ..data import DATASETS, LOADERS
from ..distillers import DISTILLERS

# Dataset-specific defaults used when the corresponding option is not given.
# The demo's learning rate is low for its 8 epochs because LDRLD's loss weights (alpha 10.5,
# beta 7) make its gradients ~10x KD's; the authors tame that with 20 warm-up epochs.
DEMO_DEFAULTS = dict(model="resnet20", teacher="wrn_16_2", epochs=8, batch_size=64, lr=0.02,
                     warmup_epochs=2, decay_epochs=(5, 7), image_size=32)
CIFAR_DEFAULTS = dict(image_size=32)
IMAGENET_DEFAULTS = dict(image_size=224)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastkd-train", description="Knowledge distillation with fastkd (timm models).")
    parser.add_argument("--config", metavar="FILE", help="YAML file of option defaults")

    group = parser.add_argument_group("model")
    group.add_argument("--model", help="student: any timm model or a CIFAR net (resnet8x4, ...)")
    group.add_argument("--teacher", help="teacher model name")
    group.add_argument("--teacher-checkpoint", help="teacher weights (a fastkd best.pth or a "
                       "state dict)")
    group.add_argument("--teacher-pretrained", action="store_true",
                       help="timm hub weights for the teacher (needs the internet)")
    group.add_argument("--distiller", default="ldrld", choices=tuple(DISTILLERS))
    group.add_argument("--num-classes", type=int)
    group.add_argument("--channels-last", action="store_true")
    group.add_argument("--torchcompile", action="store_true", help="torch.compile the student")

    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", help="dataset root (not needed for the demo data)")
    group.add_argument("--dataset", default="demo", choices=DATASETS)
    group.add_argument("--loader", default="auto", choices=LOADERS)
    group.add_argument("--image-size", type=int)
    group.add_argument("--workers", type=int, default=2)
    group.add_argument("--bad-images", default="skip", choices=("skip", "error"),
                       help="image files that do not decode: 'skip' leaves each out (replaced "
                       "by another sample of its split; listed in RUN/bad_images.txt), 'error' "
                       "stops the run naming them")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int)
    group.add_argument("-b", "--batch-size", type=int, help="per process")
    group.add_argument("--lr", type=float)
    group.add_argument("--opt", default="sgd", choices=("sgd", "adamw"))
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, default=5e-4)
    group.add_argument("--sched", default="step", choices=("step", "cosine"))
    group.add_argument("--decay-epochs", type=int, nargs="+", help="step schedule milestones")
    group.add_argument("--decay-rate", type=float, default=0.1)
    group.add_argument("--warmup-epochs", type=int)
    group.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    group.add_argument("--amp", action="store_true", help="mixed precision")
    group.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    group.add_argument("--seed", type=int, default=42)

    group = parser.add_argument_group("distiller options")
    group.add_argument("--kd-temperature", type=float, default=4.0)
    group.add_argument("--kd-weight", type=float, default=1.0)
    group.add_argument("--ldrld-top-d", type=int, default=7)
    group.add_argument("--ldrld-alpha", type=float, default=10.5)
    group.add_argument("--ldrld-beta", type=float, default=7.0)
    group.add_argument("--dkd-alpha", type=float, default=1.0)
    group.add_argument("--dkd-beta", type=float, default=8.0)
    group.add_argument("--dkd-warmup-epochs", type=int, default=20)
    group.add_argument("--hcd-num-sub", type=int, default=4)
    group.add_argument("--hcd-stages", type=int, nargs="+", default=(1, 2, 3, 4))
    group.add_argument("--hcd-cfm", default="mlp", choices=("mlp", "linear"))
    group.add_argument("--hcd-temperature", type=float, default=1.0)

    group = parser.add_argument_group("run")
    group.add_argument("--output", default="output", help="runs go to OUTPUT/<run name>/")
    group.add_argument("--experiment", help="run name (default: time-distiller-model)")
    group.add_argument("--resume", metavar="CHECKPOINT|auto",
                       help="continue a run from its last.pth; 'auto': continue "
                       "OUTPUT/EXPERIMENT from its last.pth if it has one, else start it there "
                       "(for torchrun --max-restarts)")
    group.add_argument("--eval-only", action="store_true")
    group.add_argument("--log-interval", type=int, default=50)
    return parser


def _config_defaults(parser, path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: --config {path} does not exist")
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"error: --config {path} must hold a mapping of option: value")
    known = {action.dest for action in parser._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest == "config":
            raise SystemExit(f"error: --config {path}: unknown option {key!r}")
        defaults[dest] = value
    return defaults


def parse_args(argv=None):
    """Options with the file's values under the command line's, and dataset defaults filled."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_config_defaults(parser, known.config))
    args = parser.parse_args(argv)
    defaults = {"demo": DEMO_DEFAULTS, "cifar100": CIFAR_DEFAULTS}.get(args.dataset,
                                                                       IMAGENET_DEFAULTS)
    for key, value in {**dict(epochs=100, batch_size=128, lr=0.1, warmup_epochs=0,
                              decay_epochs=(30, 60, 90)), **defaults}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Errors a user can fix from the message, before any model or data is built."""
    if args.model is None:
        parser.error("--model is required for this dataset")
    if args.distiller != "ce" and not args.teacher:
        parser.error(f"--distiller {args.distiller} needs --teacher")
    if args.dataset != "demo" and not args.data_dir:
        parser.error(f"--dataset {args.dataset} needs --data-dir")
    if args.data_dir and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} does not exist")
    if args.resume == "auto" and not args.experiment:
        parser.error("--resume auto needs --experiment NAME (the run folder to continue)")
    if args.experiment and (os.sep in args.experiment or args.experiment in (".", "..")):
        parser.error(f"--experiment must be a folder name (the run goes to OUTPUT/NAME), got "
                     f"{args.experiment!r}")
    for option in ("teacher_checkpoint", "resume"):
        path = getattr(args, option)
        if path and path != "auto" and not os.path.isfile(path):
            problem = "is a folder, not a checkpoint file" if os.path.isdir(path) else (
                "does not exist")
            parser.error(f"--{option.replace('_', '-')} {path} {problem}")
    for option in ("epochs", "batch_size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be positive, got "
                         f"{getattr(args, option)}")
    if args.workers < 0:
        parser.error(f"--workers must be 0 or more, got {args.workers}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
