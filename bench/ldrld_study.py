"""Why LDRLD's demo student blows up early: its loss parts and their gradients, step by step.

Drives the trainer's own ``Run`` (same models, loaders, optimiser, schedule, autocast) for the
first ``--steps`` steps of ``train/main.py``'s job and, at every step, before the real update:

- the weighted loss parts the distiller logs (ce, alpha L_local, beta L_rntk);
- the L2 norm of the student's parameter gradient from each part alone (autograd.grad of each
  part through the same forward graph) and from the total (what the optimiser then applies);
  the ce part's is the gradient a CE-only step would take at the same weights;
- the student's logits in training mode (batch statistics): mean |z|, mean per-row max - min gap;
- how often the label, and the teacher's arg-max, fall outside the student's top-d set G;
- every ``--probe-every`` steps, the cross-entropy of one fixed validation batch in eval mode
  (BatchNorm running statistics: what the epoch's evaluation sees) and in train mode (batch
  statistics), without updating the running statistics.

The trainer's flags pass through (``--`` then train/main.py's options), e.g.

    python bench/ldrld_study.py --steps 100 --csv /tmp/s.csv -- --distiller ldrld --amp \
        --teacher-checkpoint TEACHER/best.pth

With ``--distiller ce`` it records the CE-only trajectory's gradient norms (no teacher).
"""

import argparse
import copy
import csv
import math
import sys
import time

import torch
import torch.nn.functional as F

from fastkd.data.loaders import create_loaders, resolve_loader
from fastkd.engine.config import crop_flip, parse_args
from fastkd.engine.distributed import World
from fastkd.engine.optim import resolve_amp
from fastkd.engine.run import Run
from fastkd.engine.trainer import seed_everything
from fastkd.functional import ldrld_loss
from fastkd.models import data_config as model_data_config


def grad_norm(terms, params):
    grads = torch.autograd.grad(terms, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))


def probe(model, images, target, autocast, device_type):
    """Validation CE of ``model`` on one batch with running statistics and with batch
    statistics, the BatchNorm buffers left as they were."""
    out = {}
    saved = copy.deepcopy(model.state_dict())
    with torch.no_grad(), autocast(device_type):
        model.eval()
        logits = model(images).float()
        out["val_ce_eval"] = float(F.cross_entropy(logits, target))
        out["val_absz_eval"] = float(logits.abs().mean())
        model.train()
        ratios, hooks = [], []
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                def hook(module, inputs):
                    x = inputs[0].float()
                    batch_var = x.transpose(0, 1).flatten(1).var(dim=1)
                    ratios.append(float((batch_var / (module.running_var + module.eps)).max()))
                hooks.append(module.register_forward_pre_hook(hook))
        logits = model(images).float()
        for handle in hooks:
            handle.remove()
        # The largest (batch variance / running variance) of any channel of any BatchNorm: how
        # much larger eval mode's normalised activations are than train mode's, at worst.
        out["bn_var_ratio_max"] = max(ratios)
        out["val_ce_batchstats"] = float(F.cross_entropy(logits, target))
        out["val_absz_batchstats"] = float(logits.abs().mean())
    model.load_state_dict(saved)
    model.train()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--probe-every", type=int, default=5)
    parser.add_argument("--csv", required=True)
    own, trainer_argv = parser.parse_known_args()
    trainer_argv = [a for a in trainer_argv if a != "--"]
    args = parse_args(trainer_argv + ["--output", "/tmp/ldrld_study_unused"])
    world = World()
    resolve_amp(args, world.device, world.log)
    args.loader = resolve_loader(args.loader, args.dataset, world.device)
    seed_everything(args, world)
    data_config = model_data_config(args.model, args.img_size, args.input_size)
    loaders = create_loaders(
        args.dataset, args.data_dir, batch_size=args.batch_size,
        image_size=data_config["input_size"][-1], mean=data_config["mean"],
        std=data_config["std"], crop_ratio=data_config["crop_pct"], crop_flip=crop_flip(args),
        loader=args.loader, device=world.device, workers=args.workers, seed=args.seed,
        num_classes=args.num_classes)
    for loader in loaders:
        loader.start()
    args.num_classes = loaders[0].num_classes
    seed_everything(args, world)
    run = Run(args, world, loaders, data_config, args.teacher_checkpoint)
    task, device_type = run.task, world.device.type
    student = task.student
    params = [p for p in student.parameters() if p.requires_grad]
    # A fixed batch drawn across the whole validation split (its loader is in class order: its
    # first batch alone would hold one or two classes, and batch statistics of those mislead).
    batches = list(run.val_loader)
    all_images = torch.cat([images for images, _ in batches])
    all_target = torch.cat([target for _, target in batches])
    pick = torch.randperm(len(all_target), generator=torch.Generator().manual_seed(0))
    pick = pick[:args.batch_size].to(all_target.device)
    val_images, val_target = all_images[pick], all_target[pick]
    options = task.options
    steps_per_epoch = len(run.train_loader)
    rows, done, started = [], 0, time.perf_counter()
    for epoch in range(args.epochs):
        run.scheduler.step(epoch)
        run.train_loader.set_epoch(epoch, 0)
        task.train()
        for step, (images, target) in enumerate(run.train_loader):
            if done >= own.steps:
                break
            row = {"step": done, "epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"]}
            if done % own.probe_every == 0:
                row.update(probe(student, val_images, val_target, run.autocast, device_type))
            result = run.step(images, target, epoch, step, steps_per_epoch)
            logits = result["output"]
            row["loss"] = float(result["loss"].detach())
            row["grad_total"] = grad_norm(result["loss"], params)
            with run.autocast(device_type):
                ce = task.cross_entropy(logits, target)
            row["ce"] = float(ce)
            row["grad_ce"] = grad_norm(ce, params)
            if options is not None and hasattr(options, "top_d"):
                zt = task.teacher_logits(images)
                keywords = dict(task.loss_keywords)
                local = ldrld_loss(logits, zt, None, **{**keywords, "beta": 0.0})
                rntk = ldrld_loss(logits, zt, None, **{**keywords, "alpha": 0.0})
                row["local"], row["rntk"] = float(local), float(rntk)
                row["grad_local"] = grad_norm(local, params)
                row["grad_rntk"] = grad_norm(rntk, params)
                top = logits.detach().float().topk(options.top_d, dim=1).indices
                row["label_in_R"] = float((top != target[:, None]).all(1).float().mean())
                row["teacher_top1_in_R"] = float(
                    (top != zt.argmax(1)[:, None]).all(1).float().mean())
                row["teacher_gap"] = float((zt.max(1).values - zt.min(1).values).float().mean())
            z = logits.detach().float()
            row["absz"] = float(z.abs().mean())
            row["gap"] = float((z.max(1).values - z.min(1).values).mean())
            run.backward(result["loss"])
            row["weight_norm"] = math.sqrt(sum(float(p.detach().float().pow(2).sum())
                                               for p in params))
            rows.append(row)
            done += 1
        if done >= own.steps:
            break
    seconds = time.perf_counter() - started
    names = list(dict.fromkeys(name for row in rows for name in row))
    with open(own.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, names)
        writer.writeheader()
        writer.writerows(rows)
    for loader in loaders:
        loader.close()
    print(f"{done} steps in {seconds:.0f} s -> {own.csv}", file=sys.stderr)


if __name__ == "__main__":
    main()
