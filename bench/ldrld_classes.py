"""What top_d = 7 means with 10 classes and with 100: group sizes, and the per-row gradient on the
student's logits of each LDRLD term against cross-entropy's, at a fresh student.

The 10-class teacher logits are the demo teacher's on the digits' validation split (give its
checkpoint); a 100-class teacher is not at hand, so the 100-class rows use synthetic teacher logits
built to match that teacher's statistics (its mean top-1 margin over the runner-up, and the spread
of its other logits): they show how the terms scale with C, not a measured 100-class teacher.

    python bench/ldrld_classes.py TEACHER/best.pth
"""

import math
import sys

import timm
import torch
import torch.nn.functional as F

from fastkd.data.loaders import create_loaders
from fastkd.engine import checkpoint
from fastkd.functional import ldrld_loss
from fastkd.models import data_config as model_data_config


def teacher_logits(path):
    teacher = timm.create_model("wrn_16_2", num_classes=10)
    checkpoint.load_weights(teacher, path, arch="wrn_16_2")
    config = model_data_config("resnet20", 32, None)
    trained_with = checkpoint.data_config_of(path) or config
    _, val = create_loaders("demo", batch_size=128, image_size=32, mean=trained_with["mean"],
                            std=trained_with["std"], loader="torch", workers=0)
    val.start()
    teacher.eval()
    with torch.no_grad():
        logits, labels = zip(*((teacher(images), target) for images, target in val))
    val.close()
    return torch.cat(logits), torch.cat(labels)


def row_grad_norms(zs, zt, y, top_d, **weights):
    """Mean per-row L2 norm of d(term)/d zs for CE, alpha L_local, beta L_rntk (B x the
    batch-mean loss's gradient is the per-row one)."""
    out = {}
    for name, kwargs in (("local", dict(beta=0.0)), ("rntk", dict(alpha=0.0))):
        z = zs.clone().requires_grad_(True)
        loss = ldrld_loss(z, zt, None, top_d=top_d, ce_weight=0.0, backend="torch",
                          **{**weights, **kwargs})
        (grad,) = torch.autograd.grad(loss, z)
        out[name] = float((grad * len(z)).norm(dim=1).mean())
        out[name + "_loss"] = float(loss)
    z = zs.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    out["ce"] = float((grad * len(z)).norm(dim=1).mean())
    return out


def main():
    torch.manual_seed(0)
    zt10, y10 = teacher_logits(sys.argv[1])
    top2 = zt10.topk(2, dim=1).values
    margin = float((top2[:, 0] - top2[:, 1]).mean())
    rest = zt10.sort(dim=1, descending=True).values[:, 1:]
    spread, centre = float(rest.std(dim=1).mean()), float((rest.mean(1) - top2[:, 0]).mean())
    print(f"demo teacher: top-1 {100 * float((zt10.argmax(1) == y10).float().mean()):.2f}%, "
          f"mean top-1 margin {margin:.2f}, other logits: mean {centre:.2f} below top-1, "
          f"std {spread:.2f}")
    weights = dict(alpha=10.5, beta=7.0, temperature=4.0)
    for classes in (10, 100):
        d = 7
        groups = d * (d - 1) // 2 + 1
        print(f"\nC = {classes}, d = {d}: top set {d}/{classes} = {100 * d / classes:.0f}% of "
              f"the classes, remainder R = {classes - d} classes; {groups - 1} pairs + 1 top set "
              f"= {groups} groups whatever C; a random ranking leaves the label in R with "
              f"probability {(classes - d) / classes:.2f}")
        if classes == 10:
            zt, y = zt10, y10
        else:
            # Synthetic: label logit `margin` above a runner-up, the others spread like the
            # demo teacher's non-top-1 logits.
            n = len(y10)
            y = torch.randint(classes, (n,))
            zt = torch.randn(n, classes) * spread + centre
            zt[torch.arange(n), y] = zt.max(1).values + margin
        # A fresh student's logits: small and random (resnet20 at init: |z| ~ 0.5).
        zs = 0.5 * torch.randn(len(zt), classes)
        stats = row_grad_norms(zs, zt, y, d, **weights)
        rest = zt.topk(classes, dim=1).indices[:, d:]
        pt_rest = F.softmax(zt.gather(1, rest) / 4.0, dim=1)
        print(f"  fresh student: per-row |grad on logits| CE {stats['ce']:.2f}, alpha*L_local "
              f"{stats['local']:.2f} ({stats['local'] / stats['ce']:.1f}x CE), beta*L_rntk "
              f"{stats['rntk']:.2f} ({stats['rntk'] / stats['ce']:.1f}x CE); losses alpha*L_local "
              f"{stats['local_loss']:.2f}, beta*L_rntk {stats['rntk_loss']:.2f}")
        # Once the student ranks like the teacher, R is the teacher's C - d weakest classes.
        entropy = float(-(pt_rest * pt_rest.log()).sum(1).mean())
        print(f"  student ranked as the teacher: R = the teacher's {classes - d} weakest classes, "
              f"its softmax at T=4 has entropy {entropy:.2f} nats of at most "
              f"{math.log(classes - d):.2f} (max prob {float(pt_rest.max(1).values.mean()):.2f})")


if __name__ == "__main__":
    main()
