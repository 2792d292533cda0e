"""Distillers on real (randomly initialised) timm models: HCD across families, the logit
distillers, stage taps, the CFM plumbing of the HCD spec, and bad input. The timm task protocol
(teacher normalisation, DDP, EMA, compile, checkpoint state, soft targets) is in
test_distiller_tasks.py."""

import pytest
import torch
import torch.nn.functional as F
from test_hcd import SPEC_SHARED, SPEC_STUDENT, SPEC_TEACHER
from torch import nn

from fastkd import dkd_loss, hcd_logit_loss, kd_loss, ldrld_loss
from fastkd.distillers import HCD, build_distiller, methods
from fastkd.distillers.hcd import complementary_feature_mapper
from fastkd.methods.ldrld import LDRLD, LDRLDOptions
from fastkd.models.taps import stage_taps

timm = pytest.importorskip("timm")

NUM_CLASSES = 10
IMAGE_SIZE = 32


def create(name):
    """A timm model, no pretrained weights, sized for IMAGE_SIZE inputs."""
    extra = {"img_size": IMAGE_SIZE} if name.startswith(("vit", "deit")) else {}
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **extra)


def batch(size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return images, torch.randint(0, NUM_CLASSES, (size,), generator=generator)


def snapshot(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return any(not torch.equal(before[name], after[name]) for name in before
               if before[name].is_floating_point())


@pytest.mark.parametrize("teacher_name,student_name", [
    ("vit_tiny_patch16_224", "resnet18"),  # ViT -> CNN: map projectors
    ("resnet18", "deit_tiny_patch16_224"),  # CNN -> ViT: token projectors
])
def test_hcd_one_step_across_families(teacher_name, student_name):
    torch.manual_seed(0)
    teacher, student = create(teacher_name), create(student_name)
    distiller = HCD(student, teacher, num_classes=NUM_CLASSES, label_smoothing=0.1)
    trainable = distiller.get_trainable_module()
    assert len(trainable.projectors) == len(trainable.mappers) == 4
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    optimizer = torch.optim.SGD(trainable.parameters(), lr=0.1)
    before = {"student": snapshot(student), "teacher": snapshot(teacher),
              "projectors": snapshot(trainable.projectors), "mappers": snapshot(trainable.mappers)}

    distiller.train()
    assert not teacher.training
    images, target = batch()
    result = distiller(images, target)
    assert result["output"].shape == (4, NUM_CLASSES)
    assert set(result) == {"loss", "output", "ce", "kd", "sce", "sdd", "ol"}
    assert all(torch.isfinite(value).all() for value in result.values())
    optimizer.zero_grad()
    result["loss"].backward()
    optimizer.step()

    assert changed(before["student"], student)
    assert changed(before["projectors"], trainable.projectors)
    assert changed(before["mappers"], trainable.mappers)
    assert not changed(before["teacher"], teacher)
    assert distiller.get_eval_model() is student


def test_hcd_total_is_the_spec_formula():
    """Sum of the dict = CE + KD + sum over stages of w_gt L_sce + w_sdd L_sdd + w_ol L_ol, with
    the per-stage shared logits recomputed through the distiller's own modules."""
    torch.manual_seed(1)
    teacher, student = create("resnet18"), create("resnet18")
    distiller = HCD(student, teacher, num_classes=NUM_CLASSES, stages=(2, 4), w_sdd=3.0,
                    w_ol=2.0, backend="reference").train()
    images, target = batch(seed=1)
    losses = distiller(images, target)
    logits = losses.pop("output")
    trainable = distiller.get_trainable_module()
    with torch.no_grad():
        features = teacher.forward_features(images)
        teacher_logits = teacher.forward_head(features)
        embedding = teacher.forward_head(features, pre_logits=True)
        final, maps = student.forward_intermediates(images, indices=[2, 4])
        expected = F.cross_entropy(logits, target) + kd_loss(logits, teacher_logits,
                                                             temperature=1.0)
        sce = sdd = ol = 0.0
        for feature_map, projector, mapper in zip(maps, trainable.projectors, trainable.mappers):
            shared = mapper(torch.cat([projector(feature_map), embedding], dim=1))
            stage, parts = hcd_logit_loss(shared, teacher_logits, logits, target, w_sdd=3.0,
                                          w_ol=2.0, return_parts=True)
            expected = expected + stage
            sce = sce + parts["sce"]
            sdd = sdd + 3.0 * parts["sdd"]
            ol = ol + 2.0 * parts["ol"]
    total = losses.pop("loss")
    torch.testing.assert_close(total.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(losses.values()), expected, rtol=1e-5, atol=1e-6)
    # Each part is its own term (w_gt = 1), not the remainder of the total.
    for name, term in {"sce": sce, "sdd": sdd, "ol": ol}.items():
        torch.testing.assert_close(losses[name], term, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_spec_plumbing_through_a_linear_cfm(backend):
    """The spec's S is cat(p_s, f_t) @ W for a bias-free linear CFM: the mapper reproduces it and
    the loss on it reproduces the spec's worked example."""
    pooled = torch.tensor([[0.5, -1.0, 0.25, 2.0], [1.5, 0.0, -0.5, 1.0]])
    embedding = torch.tensor([[1.0, 0.5, -0.5], [-1.0, 2.0, 0.0]])
    weights = torch.tensor([[((18 * i + j) % 7 - 3) * 0.1 for j in range(18)] for i in range(7)])
    mapper = complementary_feature_mapper(4 + 3, 3, 3 * 6, "linear")
    with torch.no_grad():
        mapper.weight.copy_(weights.t())
        mapper.bias.zero_()
    shared = mapper(torch.cat([pooled, embedding], dim=1)).double()
    torch.testing.assert_close(shared, torch.tensor(SPEC_SHARED, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    _, parts = hcd_logit_loss(shared, torch.tensor(SPEC_TEACHER, dtype=torch.float64),
                              torch.tensor(SPEC_STUDENT, dtype=torch.float64),
                              torch.tensor([1, 4]), num_sub=3, backend=backend,
                              return_parts=True)
    assert parts["sce"].item() == pytest.approx(0.803543, abs=1e-6)
    assert parts["sdd"].item() == pytest.approx(0.142059, abs=1e-6)
    assert parts["ol"].item() == pytest.approx(0.119343, abs=1e-6)


def test_stage_taps_of_pyramid_and_isotropic_models():
    resnet = [(tap.feature_index, tap.channels, tap.reduction, tap.tokens)
              for tap in stage_taps(create("resnet18"))]
    assert resnet == [(1, 64, 4, False), (2, 128, 8, False), (3, 256, 16, False),
                      (4, 512, 32, False)]
    vit = [(tap.feature_index, tap.tokens) for tap in stage_taps(create("vit_tiny_patch16_224"))]
    assert vit == [(2, True), (5, True), (8, True), (11, True)]
    assert [tap.stage for tap in stage_taps(create("resnet18"), stages=(3,))] == [3]


def logit_distiller_cases():
    """(name, options, expected losses from the public functions)."""
    def expect_kd(logits, teacher_logits, target):
        return {"ce": F.cross_entropy(logits, target),
                "kd": 0.5 * kd_loss(logits, teacher_logits, temperature=2.0)}

    def expect_dkd(logits, teacher_logits, target):
        return {"ce": F.cross_entropy(logits, target),
                "kd": 0.25 * dkd_loss(logits, teacher_logits, target)}  # epoch 5 of 20

    def expect_ldrld(logits, teacher_logits, target):
        """Its own terms, weighted: alpha L_local and beta L_rntk (issue 24: not one "kd")."""
        _, parts = ldrld_loss(logits, teacher_logits, target, top_d=5, ce_weight=0.0,
                              return_parts=True)
        return {"ce": F.cross_entropy(logits, target), "local": LDRLD.alpha * parts["local"],
                "rntk": LDRLD.beta * parts["rntk"]}

    return [("kd", dict(temperature=2.0, weight=0.5), expect_kd),
            ("dkd", dict(warmup_epochs=20), expect_dkd),
            ("ldrld", dict(top_d=5), expect_ldrld)]


@pytest.mark.parametrize("name,options,expect", logit_distiller_cases(),
                         ids=[case[0] for case in logit_distiller_cases()])
def test_logit_distillers(name, options, expect):
    torch.manual_seed(2)
    teacher, student = create("resnet18"), create("resnet18")
    distiller = build_distiller(name, student, teacher, **options).train()
    images, target = batch(seed=2)
    result = distiller(images, target, epoch=5)
    logits = result["output"]
    with torch.no_grad():
        expected = expect(logits, teacher(images), target)
    assert set(result) == {"loss", "output", *expected}
    for key in expected:
        torch.testing.assert_close(result[key], expected[key])
    torch.testing.assert_close(result["loss"], sum(expected.values()))
    assert distiller.get_trainable_module() is student
    result["loss"].backward()
    assert all(parameter.grad is None for parameter in teacher.parameters())


def test_ce_distiller_needs_no_teacher():
    student = create("resnet18")
    distiller = build_distiller("ce", student, label_smoothing=0.1).train()
    images, target = batch(seed=3)
    result = distiller(images, target)
    torch.testing.assert_close(result["loss"], F.cross_entropy(result["output"], target,
                                                               label_smoothing=0.1))
    assert set(methods()) == {"ce", "kd", "dkd", "ldrld", "hcd"}


def test_bad_distiller_input():
    student, teacher = create("resnet18"), create("resnet18")
    with pytest.raises(ValueError, match=r"stages must be a subset of \(1, 2, 3, 4\) for ResNet, got \(1, 5\)"):
        HCD(student, teacher, stages=(1, 5))
    other = timm.create_model("resnet18", pretrained=False, num_classes=7)
    with pytest.raises(ValueError, match="teacher has 7 classes but the student has 10"):
        HCD(student, other)
    with pytest.raises(ValueError, match="teacher has 7 classes but the student has 10"):
        build_distiller("kd", student, other)
    with pytest.raises(ValueError, match="num_classes is 100 but the student has 10"):
        HCD(student, teacher, num_classes=100)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMAGE_SIZE**2, NUM_CLASSES))
    with pytest.raises(ValueError, match="student Sequential has no feature taps"):
        HCD(plain, teacher)
    with pytest.raises(ValueError, match=r"cfm must be one of \('mlp', 'linear'\), got 'conv'"):
        HCD(student, teacher, cfm="conv")
    with pytest.raises(ValueError, match=r"stages must be a tuple of stage numbers \(1, 2, "
                                         r"...\), got \(0, 2\)"):
        HCD(student, teacher, stages=(0, 2))
    with pytest.raises(ValueError, match="kd_weight must be a finite number >= 0, got -1.0"):
        HCD(student, teacher, kd_weight=-1.0)
    with pytest.raises(ValueError, match="warmup_epochs must be an integer >= 0, got 2.5"):
        build_distiller("dkd", student, teacher, warmup_epochs=2.5)
    with pytest.raises(TypeError, match="KD takes KDOptions options, got LDRLDOptions"):
        build_distiller("kd", student, teacher, LDRLDOptions())
    with pytest.raises(TypeError, match="LDRLDOptions has no option topd; options: alpha"):
        build_distiller("ldrld", student, teacher, topd=5)
    with pytest.raises(ValueError, match=r"distiller must be one of \('ce', 'kd', 'dkd', 'ldrld', 'hcd'\), got 'fitnet'"):
        build_distiller("fitnet", student, teacher)
    with pytest.raises(ValueError, match="LDRLD was built without a teacher: give each call its "
                                         "teacher_outputs"):
        build_distiller("ldrld", student).train()(*batch())
    with pytest.raises(ValueError, match="target must be given"):
        build_distiller("kd", student, teacher).train()(batch()[0], None)
